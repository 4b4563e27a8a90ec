//! Chat templates: the model's own Jinja template rendered with minijinja, configured the way
//! Hugging Face's `apply_chat_template` renders it (trim/lstrip blocks, Python string methods,
//! `raise_exception`, `strftime_now`). A ChatML template stands in only when a model has none.

use minijinja::{context, Environment, Error as JinjaError, ErrorKind};
use serde::Serialize;

use super::EngineError;

/// ChatML, used when a model ships no template (and `show` says so).
pub const FALLBACK_CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// One turn of a conversation as templates see it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TemplateMessage {
    pub role: String,
    pub content: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl TemplateMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        TemplateMessage { role: role.into(), content: content.into(), tool_calls: None, tool_call_id: None, name: None }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    pub source: String,
    /// True when the model had no template and ChatML stands in.
    pub is_fallback: bool,
    bos_token: String,
    eos_token: String,
}

fn raise_exception(message: String) -> Result<String, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, message))
}

fn strftime_now(format: String) -> String {
    chrono::Local::now().format(&format).to_string()
}

impl ChatTemplate {
    pub fn new(source: Option<String>, bos_token: &str, eos_token: &str) -> Result<ChatTemplate, EngineError> {
        let (source, is_fallback) = match source {
            Some(source) if !source.trim().is_empty() => (source, false),
            _ => (FALLBACK_CHATML.to_string(), true),
        };
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned("chat", source.clone())
            .map_err(|error| EngineError::Template(format!("the model's chat template does not compile: {error}")))?;
        Ok(ChatTemplate { env, source, is_fallback, bos_token: bos_token.to_string(), eos_token: eos_token.to_string() })
    }

    /// Renders `messages`, ending with the assistant's turn opened when `add_generation_prompt`.
    pub fn render(&self, messages: &[TemplateMessage], add_generation_prompt: bool, tools: Option<&serde_json::Value>) -> Result<String, EngineError> {
        self.render_with(messages, add_generation_prompt, tools, None)
    }

    /// As [`render`](Self::render), with `enable_thinking` set for templates that have the
    /// switch (Qwen3's); unset, the template's own default applies.
    pub fn render_with(&self, messages: &[TemplateMessage], add_generation_prompt: bool, tools: Option<&serde_json::Value>, enable_thinking: Option<bool>) -> Result<String, EngineError> {
        let template = self.env.get_template("chat").map_err(|error| EngineError::Template(error.to_string()))?;
        let base = context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
            tools => tools,
        };
        let context = match enable_thinking {
            Some(enabled) => context! { enable_thinking => enabled, ..base },
            None => base,
        };
        template
            .render(context)
            .map_err(|error| EngineError::Template(format!("rendering the chat template failed: {error}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_is_chatml() {
        let template = ChatTemplate::new(None, "", "").unwrap();
        assert!(template.is_fallback);
        let text = template.render(&[TemplateMessage::new("user", "hi")], true, None).unwrap();
        assert_eq!(text, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn python_string_methods_and_exceptions() {
        let source = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ messages[0]['content'].strip().upper() }}";
        let template = ChatTemplate::new(Some(source.into()), "", "").unwrap();
        assert_eq!(template.render(&[TemplateMessage::new("user", "  hi ")], false, None).unwrap(), "HI");
        let error = template.render(&[TemplateMessage::new("system", "x")], false, None).unwrap_err();
        assert!(error.to_string().contains("first must be user"), "{error}");
    }
}
