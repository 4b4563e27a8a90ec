//! Prompt composition, apart from the service hub: a personality's SYSTEM and few-shots
//! around the request's messages, retrieved sources, offered tools, the chat template (the
//! model's, or a personality's own Jinja or Go-style TEMPLATE), the grammar an answer must
//! follow, and the sampling parameters in force.

use super::error::{Result, ServiceError};
use super::request::{ChatMessage, ChatRequest, OutputFormat, Options};
use crate::engine::constrain::Grammar;
use crate::engine::template::TemplateMessage;
use crate::engine::tools::{self, ToolChoice, ToolFormat, ToolSpec};
use crate::engine::{self, ChatFrontend, SamplingParams};
use crate::rag::{self, Source};
use crate::store::{Modelfile, Parameters};

/// The messages a personality adds around a request's: its SYSTEM (unless the request
/// brings one) and its MESSAGE few-shots.
pub fn compose_messages(modelfile: &Modelfile, messages: &[ChatMessage]) -> Vec<TemplateMessage> {
    let mut composed = Vec::with_capacity(messages.len() + modelfile.messages.len() + 1);
    let request_system = messages.iter().any(|m| m.role == "system");
    if !request_system {
        if let Some(system) = &modelfile.system {
            composed.push(TemplateMessage::new("system", system.clone()));
        }
    }
    let mut rest = messages.iter().peekable();
    while let Some(message) = rest.next_if(|m| m.role == "system") {
        composed.push(message.to_template());
    }
    composed.extend(modelfile.messages.iter().map(|m| TemplateMessage::new(&m.role, m.content.clone())));
    composed.extend(rest.map(ChatMessage::to_template));
    composed
}

/// Renders messages with the personality's TEMPLATE when it has one, else the model's.
pub fn render_chat(frontend: &ChatFrontend, modelfile: &Modelfile, messages: &[TemplateMessage], tools: Option<&serde_json::Value>, think: Option<bool>) -> Result<String> {
    match &modelfile.template {
        Some(template) if !template.trim().is_empty() => render_custom_template(frontend, template, messages),
        _ => Ok(frontend.template.render_with(messages, true, tools, think)?),
    }
}

/// Puts the offered tools and earlier calls into the conversation the way the template
/// can take them, and returns the `tools` value for the template (None when the template
/// knows no tools and they went into the system prompt) and the call format to expect.
pub fn prepare_tools(frontend: &ChatFrontend, modelfile: &Modelfile, messages: &mut Vec<TemplateMessage>, offered: &[ToolSpec]) -> (Option<serde_json::Value>, ToolFormat) {
    let own_template = modelfile.template.as_ref().is_none_or(|t| t.trim().is_empty());
    let source = &frontend.template.source;
    if own_template && !frontend.template.is_fallback && source.contains("tools") {
        let value = (!offered.is_empty()).then(|| tools::template_tools(offered));
        (value, ToolFormat::of_template(source))
    } else {
        tools::inline_for_plain_template(messages, offered);
        (None, ToolFormat::Hermes)
    }
}

/// The tools a request offers the model (none when `tool_choice` is none).
pub fn offered_tools(request: &ChatRequest) -> &[ToolSpec] {
    if request.tool_choice == ToolChoice::None {
        &[]
    } else {
        &request.tools
    }
}

/// The grammar the answer must follow: a forced tool call, else the output format.
pub fn grammar_for(request: &ChatRequest, offered: &[ToolSpec], format: ToolFormat) -> Result<Option<Grammar>> {
    match &request.tool_choice {
        ToolChoice::Required if !offered.is_empty() => Ok(Some(format.forced_call(offered))),
        ToolChoice::Required => Err(ServiceError::BadRequest("tool_choice is required but no tools were given".into())),
        ToolChoice::Named(name) => match offered.iter().find(|t| &t.name == name) {
            Some(tool) => Ok(Some(format.forced_call(std::slice::from_ref(tool)))),
            None => Err(ServiceError::BadRequest(format!("tool_choice names '{name}', which is not among the tools"))),
        },
        _ => Ok(output_grammar(&request.options.format)),
    }
}

pub fn output_grammar(format: &Option<OutputFormat>) -> Option<Grammar> {
    match format {
        Some(OutputFormat::Json) => Some(Grammar::JsonObject),
        Some(OutputFormat::JsonSchema(schema)) => Some(Grammar::JsonSchema(schema.clone())),
        None => None,
    }
}

/// The parameters in force: the family's defaults, the personality's, then the request's.
pub fn effective_parameters(modelfile: &Modelfile, options: &Options) -> Parameters {
    let mut parameters = options.family.sampling_defaults();
    parameters.overlay(&modelfile.parameters);
    parameters.overlay(&options.parameters);
    parameters
}

pub fn sampling(parameters: &Parameters) -> SamplingParams {
    let defaults = SamplingParams::default();
    SamplingParams {
        temperature: parameters.temperature.unwrap_or(defaults.temperature),
        top_k: parameters.top_k.unwrap_or(defaults.top_k),
        top_p: parameters.top_p.unwrap_or(defaults.top_p),
        min_p: parameters.min_p.unwrap_or(defaults.min_p),
        repeat_penalty: parameters.repeat_penalty.unwrap_or(defaults.repeat_penalty),
        repeat_last_n: match parameters.repeat_last_n {
            Some(n) if n < 0 => usize::MAX,
            Some(n) => n as usize,
            None => defaults.repeat_last_n,
        },
        presence_penalty: parameters.presence_penalty.unwrap_or(defaults.presence_penalty),
        frequency_penalty: parameters.frequency_penalty.unwrap_or(defaults.frequency_penalty),
        seed: parameters.seed,
    }
}

/// The context window of a request: as in Ollama, a request that sets no num_ctx gets the
/// configured window rather than the model's whole context (which also bounds a small model
/// that never stops); never more than the model has.
pub fn context_window(parameters: &Parameters, configured: usize, model_context: usize) -> usize {
    parameters.num_ctx.unwrap_or(configured).min(model_context)
}

/// Puts retrieved chunks into the conversation: appended to the system message, or as one.
pub fn inject_sources(messages: &mut Vec<TemplateMessage>, sources: &[Source]) {
    let context = if sources.is_empty() {
        "No document in the index matched this question; say that the documents do not cover it if you cannot answer from general knowledge.".to_string()
    } else {
        rag::context_message(sources)
    };
    match messages.iter_mut().find(|m| m.role == "system") {
        Some(system) => {
            system.content.push_str("\n\n");
            system.content.push_str(&context);
        }
        None => messages.insert(0, TemplateMessage::new("system", context)),
    }
}

/// Ollama-style TEMPLATE of a personality: either Jinja (used as the chat template) or a
/// Go-template subset: `{{ .System }}`, `{{ .Prompt }}`, `{{ .Response }}` and
/// `{{ if .System }}…{{ end }}`. Earlier turns are rendered in sequence, as Ollama does for
/// templates without a `.Messages` loop.
fn render_custom_template(frontend: &ChatFrontend, template: &str, messages: &[TemplateMessage]) -> Result<String> {
    if template.contains("{%") || template.contains("messages") {
        let custom = engine::template::ChatTemplate::new(Some(template.to_string()), frontend.bos_token.as_ref().map(|b| b.1.as_str()).unwrap_or(""), "")?;
        return Ok(custom.render(messages, true, None)?);
    }
    let system = messages.iter().filter(|m| m.role == "system").map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n");
    let mut out = String::new();
    let mut pending_prompt: Option<&str> = None;
    let turns: Vec<&TemplateMessage> = messages.iter().filter(|m| m.role != "system").collect();
    let mut first = true;
    for message in &turns {
        match message.role.as_str() {
            "assistant" => {
                out.push_str(&fill_go_template(template, if first { &system } else { "" }, pending_prompt.unwrap_or(""), &message.content));
                pending_prompt = None;
                first = false;
            }
            _ => {
                if let Some(prompt) = pending_prompt {
                    out.push_str(&fill_go_template(template, if first { &system } else { "" }, prompt, ""));
                    first = false;
                }
                pending_prompt = Some(message.content.as_str());
            }
        }
    }
    if let Some(prompt) = pending_prompt {
        out.push_str(&fill_go_template(template, if first { &system } else { "" }, prompt, ""));
    }
    Ok(out)
}

fn fill_go_template(template: &str, system: &str, prompt: &str, response: &str) -> String {
    let mut text = template.to_string();
    for (field, value) in [("System", system), ("Prompt", prompt), ("Response", response)] {
        // {{ if .Field }}...{{ end }}
        loop {
            let Some(start) = find_tag(&text, &format!("if .{field}")) else { break };
            let (open_start, open_end) = start;
            let Some((end_start, end_end)) = find_tag(&text[open_end..], "end").map(|(s, e)| (s + open_end, e + open_end)) else { break };
            let inner = text[open_end..end_start].to_string();
            let replacement = if value.is_empty() { String::new() } else { inner };
            text.replace_range(open_start..end_end, &replacement);
        }
        for spelling in [format!("{{{{ .{field} }}}}"), format!("{{{{.{field}}}}}")] {
            text = text.replace(&spelling, value);
        }
    }
    text
}

/// Finds `{{ body }}` (any spacing, `{{-` trims too) and returns its byte range.
fn find_tag(text: &str, body: &str) -> Option<(usize, usize)> {
    let mut from = 0;
    while let Some(offset) = text[from..].find("{{") {
        let start = from + offset;
        let end = text[start..].find("}}")? + start + 2;
        let inner = text[start + 2..end - 2].trim_matches(|c: char| c == '-' || c.is_whitespace());
        if inner == body {
            return Some((start, end));
        }
        from = end;
    }
    None
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn personality_system_and_few_shots_are_placed_around_the_request() {
        let modelfile = Modelfile {
            from: "base".into(),
            system: Some("be a cat".into()),
            messages: vec![crate::store::modelfile::Message { role: "user".into(), content: "hi".into() }, crate::store::modelfile::Message { role: "assistant".into(), content: "nyan".into() }],
            ..Default::default()
        };
        let composed = compose_messages(&modelfile, &[ChatMessage::new("user", "hello")]);
        let roles: Vec<&str> = composed.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user"]);
        assert_eq!(composed[0].content, "be a cat");
        // A request's own system message wins.
        let composed = compose_messages(&modelfile, &[ChatMessage::new("system", "be a dog"), ChatMessage::new("user", "hello")]);
        assert_eq!(composed[0].content, "be a dog");
        assert_eq!(composed.iter().filter(|m| m.role == "system").count(), 1);
    }

    #[test]
    fn go_template_subset() {
        let template = "{{ if .System }}<<SYS>>{{ .System }}<</SYS>>{{ end }}[INST] {{ .Prompt }} [/INST]{{ .Response }}";
        assert_eq!(fill_go_template(template, "sys", "hi", ""), "<<SYS>>sys<</SYS>>[INST] hi [/INST]");
        assert_eq!(fill_go_template(template, "", "hi", "yo"), "[INST] hi [/INST]yo");
    }

    #[test]
    fn family_defaults_sit_below_the_personality_and_the_request() {
        let modelfile = Modelfile { from: "base".into(), parameters: Parameters { temperature: Some(0.3), ..Default::default() }, ..Default::default() };
        let options = Options::new(super::super::ApiFamily::OpenAi, Parameters { top_p: Some(0.5), ..Default::default() });
        let parameters = effective_parameters(&modelfile, &options);
        assert_eq!((parameters.temperature, parameters.top_p, parameters.top_k), (Some(0.3), Some(0.5), Some(0)));
        let ollama = effective_parameters(&Modelfile::default(), &Options::default());
        assert_eq!(sampling(&ollama), SamplingParams::default());
    }
}
