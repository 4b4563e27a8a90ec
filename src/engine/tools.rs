//! Tool calling in the models' own formats: how tools reach the prompt, how a model writes a
//! call (Hermes/Qwen `<tool_call>` JSON, Llama 3 bare JSON, Mistral `[TOOL_CALLS]`), how calls
//! are read back out of its text, and the grammar that forces a call when one is required.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::constrain::{with_compact_layout, Grammar};
use super::template::TemplateMessage;

/// A function the model may call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// JSON schema of the arguments object.
    #[serde(default = "empty_object_schema")]
    pub parameters: Value,
}

fn empty_object_schema() -> Value {
    json!({"type": "object", "properties": {}})
}

/// A call the model made (or made earlier in the conversation).
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: Value,
}

impl ToolCall {
    pub fn new(name: impl Into<String>, arguments: Value) -> ToolCall {
        ToolCall { id: format!("call_{}", &uuid::Uuid::new_v4().simple().to_string()[..24]), name: name.into(), arguments }
    }
}

/// Whether and which tool the model must call (OpenAI's `tool_choice`).
#[derive(Debug, Clone, Default, PartialEq)]
pub enum ToolChoice {
    #[default]
    Auto,
    None,
    Required,
    Named(String),
}

/// How a model family writes tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    /// `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Hermes, Qwen 2/2.5, and
    /// what we teach models whose template knows no tools).
    Hermes,
    /// A bare `{"name": ..., "parameters": {...}}` object (Llama 3.1+).
    Llama3Json,
    /// `[TOOL_CALLS] [{"name": ..., "arguments": {...}}]` (Mistral).
    Mistral,
}

impl ToolFormat {
    /// The format a chat template expects, read from its source.
    pub fn of_template(source: &str) -> ToolFormat {
        if source.contains("[TOOL_CALLS]") {
            ToolFormat::Mistral
        } else if source.contains("<tool_call>") {
            ToolFormat::Hermes
        } else if source.contains("<|start_header_id|>") && source.contains("tools") {
            ToolFormat::Llama3Json
        } else {
            ToolFormat::Hermes
        }
    }

    /// The text of an assistant turn that made these calls, for templates that cannot
    /// render `tool_calls` themselves.
    pub fn render_calls(self, calls: &[ToolCall]) -> String {
        let objects: Vec<Value> = calls.iter().map(|c| json!({"name": c.name, self.arguments_key(): c.arguments})).collect();
        match self {
            ToolFormat::Hermes => objects.iter().map(|o| format!("<tool_call>\n{o}\n</tool_call>")).collect::<Vec<_>>().join("\n"),
            ToolFormat::Llama3Json => objects.iter().map(Value::to_string).collect::<Vec<_>>().join("\n"),
            ToolFormat::Mistral => format!("[TOOL_CALLS] {}", Value::Array(objects)),
        }
    }

    fn arguments_key(self) -> &'static str {
        match self {
            ToolFormat::Llama3Json => "parameters",
            _ => "arguments",
        }
    }

    /// A grammar that admits exactly one call of one of `tools`, in this format.
    pub fn forced_call(self, tools: &[ToolSpec]) -> Grammar {
        let alternatives: Vec<Value> = tools
            .iter()
            .map(|tool| {
                json!({
                    "type": "object",
                    "properties": {"name": {"const": tool.name}, self.arguments_key(): tool.parameters},
                    "required": ["name", self.arguments_key()],
                    "additionalProperties": false,
                })
            })
            .collect();
        let schema = with_compact_layout(json!({"anyOf": alternatives}));
        let lark = match self {
            ToolFormat::Hermes => format!("start: \"<tool_call>\\n\" call \"\\n</tool_call>\"\ncall: %json {schema}\n"),
            ToolFormat::Llama3Json => format!("start: call\ncall: %json {schema}\n"),
            ToolFormat::Mistral => format!("start: \"[TOOL_CALLS] [\" call \"]\"\ncall: %json {schema}\n"),
        };
        Grammar::Lark(lark)
    }
}

/// The tools in OpenAI's wire shape, as chat templates (`tools` variable) expect them.
pub fn template_tools(tools: &[ToolSpec]) -> Value {
    Value::Array(tools.iter().map(|t| json!({"type": "function", "function": t})).collect())
}

/// Instructions for a model whose template has no notion of tools (Hermes' system prompt).
pub fn system_instructions(tools: &[ToolSpec]) -> String {
    let listed: Vec<String> = template_tools(tools).as_array().into_iter().flatten().map(Value::to_string).collect();
    format!(
        "You are a function calling AI model. You may call one or more functions to assist with the user query. \
         Here are the available tools: <tools>\n{}\n</tools>\n\
         For each function call, return a json object with the function name and arguments within <tool_call></tool_call> XML tags:\n\
         <tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>",
        listed.join("\n")
    )
}

/// Rewrites a conversation with tools for a template that does not know them: the tool list
/// joins the system prompt, earlier calls become the assistant's text, and tool results are
/// handed back in `<tool_response>` blocks of a user turn (as Qwen's template does).
pub fn inline_for_plain_template(messages: &mut Vec<TemplateMessage>, tools: &[ToolSpec]) {
    if !tools.is_empty() {
        let instructions = system_instructions(tools);
        match messages.iter_mut().find(|m| m.role == "system") {
            Some(system) => {
                system.content.push_str("\n\n");
                system.content.push_str(&instructions);
            }
            None => messages.insert(0, TemplateMessage::new("system", instructions)),
        }
    }
    for message in messages.iter_mut() {
        if let Some(calls) = message.tool_calls.take() {
            let calls: Vec<ToolCall> = calls
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| Some(ToolCall { id: String::new(), name: c["function"]["name"].as_str()?.to_string(), arguments: c["function"]["arguments"].clone() }))
                .collect();
            let rendered = ToolFormat::Hermes.render_calls(&calls);
            message.content = if message.content.trim().is_empty() { rendered } else { format!("{}\n{rendered}", message.content) };
        }
        if message.role == "tool" {
            message.role = "user".into();
            message.content = format!("<tool_response>\n{}\n</tool_response>", message.content);
            message.tool_call_id = None;
            message.name = None;
        }
    }
}

/// The calls of an answer that name only tools the request offered: an answer that merely
/// looks like JSON (`{"name": "Bob"}`) stays content.
pub fn parse_offered_calls(text: &str, tools: &[ToolSpec]) -> Option<(String, Vec<ToolCall>)> {
    let (content, calls) = parse_calls(text)?;
    calls.iter().all(|call| tools.iter().any(|tool| tool.name == call.name)).then_some((content, calls))
}

/// Reads tool calls out of a model's answer, in any of the known formats. Returns the text
/// before the first call and the calls, or None when the answer calls nothing.
pub fn parse_calls(text: &str) -> Option<(String, Vec<ToolCall>)> {
    parse_hermes(text).or_else(|| parse_mistral(text)).or_else(|| parse_bare_json(text))
}

fn call_from(value: &Value) -> Option<ToolCall> {
    let object = value.as_object()?;
    let name = object.get("name")?.as_str()?;
    let arguments = object.get("arguments").or_else(|| object.get("parameters")).cloned().unwrap_or_else(|| json!({}));
    // Some models write the arguments as a JSON string.
    let arguments = match arguments {
        Value::String(text) => serde_json::from_str(&text).unwrap_or(Value::String(text)),
        other => other,
    };
    Some(ToolCall::new(name, arguments))
}

fn calls_from(value: &Value) -> Option<Vec<ToolCall>> {
    match value {
        Value::Array(items) => items.iter().map(call_from).collect::<Option<Vec<_>>>().filter(|c| !c.is_empty()),
        other => call_from(other).map(|c| vec![c]),
    }
}

fn parse_hermes(text: &str) -> Option<(String, Vec<ToolCall>)> {
    const OPEN: &str = "<tool_call>";
    const CLOSE: &str = "</tool_call>";
    let first = text.find(OPEN)?;
    let mut calls = Vec::new();
    let mut rest = &text[first..];
    while let Some(start) = rest.find(OPEN) {
        let body = &rest[start + OPEN.len()..];
        let (inner, after) = match body.find(CLOSE) {
            Some(end) => (&body[..end], &body[end + CLOSE.len()..]),
            None => (body, ""),
        };
        let value: Value = serde_json::from_str(inner.trim()).ok()?;
        calls.extend(calls_from(&value)?);
        rest = after;
    }
    (!calls.is_empty()).then(|| (text[..first].trim().to_string(), calls))
}

fn parse_mistral(text: &str) -> Option<(String, Vec<ToolCall>)> {
    let start = text.find("[TOOL_CALLS]")?;
    let value: Value = serde_json::from_str(text[start + "[TOOL_CALLS]".len()..].trim()).ok()?;
    Some((text[..start].trim().to_string(), calls_from(&value)?))
}

fn parse_bare_json(text: &str) -> Option<(String, Vec<ToolCall>)> {
    let trimmed = text.trim().trim_start_matches("<|python_tag|>").trim();
    if !(trimmed.starts_with('{') || trimmed.starts_with('[')) {
        return None;
    }
    // One object per line is how Llama 3 writes several calls.
    let value: Value = serde_json::from_str(trimmed)
        .ok()
        .or_else(|| trimmed.lines().map(serde_json::from_str::<Value>).collect::<Result<Vec<_>, _>>().ok().map(Value::Array))?;
    Some((String::new(), calls_from(&value)?))
}

/// Whether the text so far could still turn into a tool call, so a streaming answer must
/// hold it back rather than show it as content.
fn may_become_call(text: &str) -> bool {
    let trimmed = text.trim_start();
    ["<tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "{", "["]
        .iter()
        .any(|marker| trimmed.starts_with(marker) || marker.starts_with(trimmed))
}

/// Markers that open a call anywhere in an answer (a bare JSON call only counts at the start).
const CALL_MARKERS: &[&str] = &["<tool_call>", "[TOOL_CALLS]", "<|python_tag|>"];

/// Holds back streamed text while it may still become a tool call, so a call is never shown
/// as content: at the start of the answer anything that may open a call (bare JSON too),
/// later a call marker, held from its first character; once a marker is whole, everything
/// after it waits for the end of the answer, where it is parsed.
pub struct CallHolder {
    offered: bool,
    held: String,
    leading: bool,
    in_call: bool,
}

impl CallHolder {
    pub fn new(tools_offered: bool) -> CallHolder {
        CallHolder { offered: tools_offered, held: String::new(), leading: true, in_call: false }
    }

    /// The text to show now for this piece of the answer (empty while held).
    pub fn push(&mut self, text: String) -> String {
        if !self.offered {
            return text;
        }
        self.held.push_str(&text);
        if self.in_call {
            return String::new();
        }
        if self.leading {
            if may_become_call(&self.held) {
                return String::new();
            }
            self.leading = false;
        }
        if let Some(position) = CALL_MARKERS.iter().filter_map(|marker| self.held.find(marker)).min() {
            self.in_call = true;
            return self.held.drain(..position).collect();
        }
        let keep = CALL_MARKERS
            .iter()
            .flat_map(|marker| (1..marker.len()).filter(|&n| self.held.ends_with(&marker[..n])))
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        self.held.drain(..cut).collect()
    }

    /// What is still held when the answer ends: a call to parse, or text to show.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hermes_calls_and_leading_text() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Tokyo\"}}\n</tool_call>\n<tool_call>{\"name\": \"time\", \"arguments\": \"{\\\"zone\\\": \\\"JST\\\"}\"}</tool_call>";
        let (content, calls) = parse_calls(text).unwrap();
        assert_eq!(content, "Let me check.");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].name, "weather");
        assert_eq!(calls[0].arguments, json!({"city": "Tokyo"}));
        assert_eq!(calls[1].arguments, json!({"zone": "JST"}));
        assert!(calls[0].id.starts_with("call_") && calls[0].id != calls[1].id);
    }

    #[test]
    fn llama3_and_mistral_calls() {
        let (_, calls) = parse_calls("<|python_tag|>{\"name\": \"f\", \"parameters\": {\"x\": 1}}").unwrap();
        assert_eq!((calls[0].name.as_str(), &calls[0].arguments), ("f", &json!({"x": 1})));
        let (_, calls) = parse_calls("[TOOL_CALLS] [{\"name\": \"g\", \"arguments\": {}}, {\"name\": \"h\", \"arguments\": {\"y\": [1]}}]").unwrap();
        assert_eq!(calls.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["g", "h"]);
    }

    #[test]
    fn plain_answers_are_not_calls() {
        assert!(parse_calls("The weather is fine.").is_none());
        assert!(parse_calls("{\"answer\": 42}").is_none());
        assert!(parse_calls("<tool_call>not json</tool_call>").is_none());
        assert!(may_become_call("<tool_") && may_become_call("  {") && !may_become_call("Sure"));
    }

    #[test]
    fn held_text_is_released_once_it_cannot_be_a_call() {
        let mut holder = CallHolder::new(true);
        assert_eq!(holder.push("<tool".into()), "");
        assert_eq!(holder.push("_call>{".into()), "");
        assert_eq!(holder.finish(), "<tool_call>{");
        let mut holder = CallHolder::new(true);
        assert_eq!(holder.push(" Su".into()), " Su");
        // A call after some text is held from its marker on, even split across pieces.
        assert_eq!(holder.push("re. <tool".into()), "re. ");
        assert_eq!(holder.push("_call>{\"name\"".into()), "");
        assert_eq!(holder.finish(), "<tool_call>{\"name\"");
        let mut holder = CallHolder::new(true);
        assert_eq!(holder.push("Use <b>bold</b>".into()), "Use <b>bold</b>");
        assert_eq!(CallHolder::new(false).push("{".into()), "{");
    }

    #[test]
    fn rendered_calls_parse_back() {
        let calls = vec![ToolCall::new("weather", json!({"city": "Paris"}))];
        for format in [ToolFormat::Hermes, ToolFormat::Llama3Json, ToolFormat::Mistral] {
            let (_, parsed) = parse_calls(&format.render_calls(&calls)).unwrap();
            assert_eq!((parsed[0].name.as_str(), &parsed[0].arguments), ("weather", &json!({"city": "Paris"})), "{format:?}");
        }
    }

    #[test]
    fn plain_templates_get_tools_inline() {
        let mut messages = vec![
            TemplateMessage::new("user", "weather?"),
            TemplateMessage { tool_calls: Some(json!([{"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}])), ..TemplateMessage::new("assistant", "") },
            TemplateMessage { tool_call_id: Some("call_1".into()), ..TemplateMessage::new("tool", "12C") },
        ];
        inline_for_plain_template(&mut messages, &[ToolSpec { name: "weather".into(), description: None, parameters: empty_object_schema() }]);
        assert_eq!(messages[0].role, "system");
        assert!(messages[0].content.contains("\"name\":\"weather\""));
        assert!(messages[2].content.starts_with("<tool_call>"));
        assert_eq!((messages[3].role.as_str(), messages[3].content.as_str()), ("user", "<tool_response>\n12C\n</tool_response>"));
    }
}
