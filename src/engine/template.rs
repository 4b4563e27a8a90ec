//! Chat templates: the model's own Jinja template rendered with minijinja, configured the way
//! Hugging Face's `apply_chat_template` renders it (trim/lstrip blocks, Python string methods,
//! `raise_exception`, `strftime_now`). A ChatML template stands in only when a model has none.

use minijinja::value::{Kwargs, Value as JinjaValue};
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

/// chrono's formatter fails on an unknown specifier, and `to_string` would turn that into a
/// panic (found by tests/it/fuzz.rs): the template gets an error instead.
fn strftime_now(format: String) -> Result<String, JinjaError> {
    use std::fmt::Write;
    let mut out = String::new();
    write!(out, "{}", chrono::Local::now().format(&format)).map_err(|_| JinjaError::new(ErrorKind::InvalidOperation, format!("strftime_now: invalid format {format:?}")))?;
    Ok(out)
}

/// The widest `tojson` indent a template may ask for (a huge one would allocate without bound).
const MAX_INDENT: usize = 64;

/// transformers replaces Jinja's `tojson` with `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, and templates put its output straight into the prompt
/// (Qwen's `<tools>` list, tool-call arguments). minijinja's own filter writes compact
/// `{"a":1}` and HTML-escapes `<>&'`, so the prompt the model was trained on would change.
/// Python's defaults: `", "` and `": "` without indent, `","` and `": "` with it.
fn tojson(value: &JinjaValue, ensure_ascii: Option<bool>, kwargs: Kwargs) -> Result<String, JinjaError> {
    let ensure_ascii = match ensure_ascii {
        Some(flag) => flag,
        None => kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
    };
    let indent = match kwargs.get::<Option<JinjaValue>>("indent")? {
        Some(indent) if indent.is_none() || indent.is_undefined() => None,
        Some(indent) => match indent.as_str() {
            Some(text) => Some(text.to_string()),
            None => {
                let width = usize::try_from(indent)?;
                if width > MAX_INDENT {
                    return Err(JinjaError::new(ErrorKind::InvalidOperation, format!("tojson indent {width} is wider than {MAX_INDENT}")));
                }
                Some(" ".repeat(width))
            }
        },
        None => None,
    };
    let (item_sep, key_sep) = match kwargs.get::<Option<JinjaValue>>("separators")? {
        Some(pair) if !pair.is_none() => {
            let part = |i: usize| -> Result<String, JinjaError> {
                let item = pair.get_item(&JinjaValue::from(i))?;
                item.as_str().map(str::to_string).ok_or_else(|| JinjaError::new(ErrorKind::InvalidOperation, "tojson separators must be two strings"))
            };
            (part(0)?, part(1)?)
        }
        _ => ((if indent.is_some() { "," } else { ", " }).to_string(), ": ".to_string()),
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let unserializable = |error: serde_json::Error| JinjaError::new(ErrorKind::InvalidOperation, "cannot serialize to JSON").with_source(error);
    let mut json = serde_json::to_value(value).map_err(unserializable)?;
    if sort_keys {
        sort_json_keys(&mut json);
    }
    let mut out = Vec::new();
    let formatter = PythonJsonFormatter { indent, item_sep, key_sep, ensure_ascii, depth: 0, has_value: false };
    json.serialize(&mut serde_json::Serializer::with_formatter(&mut out, formatter)).map_err(unserializable)?;
    String::from_utf8(out).map_err(|_| JinjaError::new(ErrorKind::InvalidOperation, "tojson produced invalid UTF-8"))
}

fn sort_json_keys(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            map.sort_keys();
            map.values_mut().for_each(sort_json_keys);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(sort_json_keys),
        _ => {}
    }
}

/// `json.dumps`' layout: separators and indentation as Python writes them; with
/// `ensure_ascii` every non-ASCII character becomes `\uXXXX` (UTF-16, lower-case hex).
struct PythonJsonFormatter {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    ensure_ascii: bool,
    depth: usize,
    has_value: bool,
}

impl PythonJsonFormatter {
    fn newline<W: ?Sized + std::io::Write>(&self, writer: &mut W) -> std::io::Result<()> {
        if let Some(indent) = &self.indent {
            writer.write_all(b"\n")?;
            for _ in 0..self.depth {
                writer.write_all(indent.as_bytes())?;
            }
        }
        Ok(())
    }

    fn open<W: ?Sized + std::io::Write>(&mut self, writer: &mut W, bracket: &[u8]) -> std::io::Result<()> {
        self.depth += 1;
        self.has_value = false;
        writer.write_all(bracket)
    }

    fn close<W: ?Sized + std::io::Write>(&mut self, writer: &mut W, bracket: &[u8]) -> std::io::Result<()> {
        self.depth -= 1;
        if self.has_value {
            self.newline(writer)?;
        }
        writer.write_all(bracket)
    }

    fn item<W: ?Sized + std::io::Write>(&mut self, writer: &mut W, first: bool) -> std::io::Result<()> {
        if !first {
            writer.write_all(self.item_sep.as_bytes())?;
        }
        self.newline(writer)
    }
}

impl serde_json::ser::Formatter for PythonJsonFormatter {
    fn begin_array<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.open(writer, b"[")
    }
    fn end_array<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.close(writer, b"]")
    }
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, writer: &mut W, first: bool) -> std::io::Result<()> {
        self.item(writer, first)
    }
    fn end_array_value<W: ?Sized + std::io::Write>(&mut self, _writer: &mut W) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }
    fn begin_object<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.open(writer, b"{")
    }
    fn end_object<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.close(writer, b"}")
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, writer: &mut W, first: bool) -> std::io::Result<()> {
        self.item(writer, first)
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        writer.write_all(self.key_sep.as_bytes())
    }
    fn end_object_value<W: ?Sized + std::io::Write>(&mut self, _writer: &mut W) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }
    fn write_string_fragment<W: ?Sized + std::io::Write>(&mut self, writer: &mut W, fragment: &str) -> std::io::Result<()> {
        if !self.ensure_ascii || fragment.is_ascii() {
            return writer.write_all(fragment.as_bytes());
        }
        let mut units = [0u16; 2];
        for c in fragment.chars() {
            if c.is_ascii() {
                writer.write_all(&[c as u8])?;
            } else {
                for unit in c.encode_utf16(&mut units) {
                    write!(writer, "\\u{unit:04x}")?;
                }
            }
        }
        Ok(())
    }
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
        env.add_filter("tojson", tojson);
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
