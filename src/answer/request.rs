//! What a front end asks of the core: the request types every API family translates into,
//! with each family's defaults (sampling, answer length) in one place.

use crate::config::KeepAlive;
use crate::engine::template::TemplateMessage;
use crate::engine::tools::{ToolCall, ToolChoice, ToolSpec};
use crate::store::Parameters;

/// The API families. They differ in sampling defaults, answer length and error shape.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ApiFamily {
    OpenAi,
    Anthropic,
    #[default]
    Ollama,
    /// mlxserver's own `/generate` and the terminal chat (Ollama's defaults).
    Native,
}

impl ApiFamily {
    /// The family a path belongs to (for error shapes of requests no handler saw).
    pub fn of_path(path: &str) -> ApiFamily {
        if path == "/v1/messages" || path.starts_with("/v1/messages/") {
            ApiFamily::Anthropic
        } else if path == "/v1" || path.starts_with("/v1/") || path == "/tokenize" || path == "/detokenize" {
            ApiFamily::OpenAi
        } else {
            ApiFamily::Ollama
        }
    }

    /// Sampling defaults below a personality's PARAMETERs. OpenAI and Anthropic sample at
    /// temperature 1 over the whole distribution, without a repeat penalty; Ollama's 0.8 /
    /// top-k 40 / top-p 0.9 / repeat 1.1 are the engine's own defaults.
    pub fn sampling_defaults(self) -> Parameters {
        match self {
            ApiFamily::OpenAi | ApiFamily::Anthropic => {
                Parameters { temperature: Some(1.0), top_p: Some(1.0), top_k: Some(0), repeat_penalty: Some(1.0), ..Default::default() }
            }
            ApiFamily::Ollama | ApiFamily::Native => Parameters::default(),
        }
    }

    /// Tokens a completion of a bare prompt generates when the request names no limit
    /// (OpenAI's legacy completions stop at 16; the others run to the context's end).
    pub fn completion_max_tokens(self) -> Option<i64> {
        match self {
            ApiFamily::OpenAi => Some(16),
            _ => None,
        }
    }
}

/// One chat turn as the front ends pass it.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// Calls an assistant turn made.
    pub tool_calls: Vec<ToolCall>,
    /// The call a `tool` turn answers.
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into(), tool_calls: Vec::new(), tool_call_id: None }
    }

    pub(crate) fn to_template(&self) -> TemplateMessage {
        let tool_calls = (!self.tool_calls.is_empty()).then(|| {
            serde_json::Value::Array(
                self.tool_calls
                    .iter()
                    .map(|c| serde_json::json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
                    .collect(),
            )
        });
        TemplateMessage { tool_calls, tool_call_id: self.tool_call_id.clone(), ..TemplateMessage::new(&self.role, self.content.clone()) }
    }
}

/// What the answer must look like.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputFormat {
    /// Any JSON object.
    Json,
    /// JSON that validates against this schema.
    JsonSchema(serde_json::Value),
}

/// Request options on top of the personality's parameters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Options {
    /// Whose defaults apply below the personality's parameters.
    pub family: ApiFamily,
    pub parameters: Parameters,
    /// Report log-probabilities with this many alternatives per token.
    pub logprobs: Option<usize>,
    /// Structured output, enforced by constrained decoding.
    pub format: Option<OutputFormat>,
}

impl Options {
    pub fn new(family: ApiFamily, parameters: Parameters) -> Options {
        Options { family, parameters, logprobs: None, format: None }
    }
}

/// Retrieval settings of a request; unset fields take the collection's model and the
/// configured defaults.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize, serde::Serialize, utoipa::ToSchema)]
pub struct RagOptions {
    /// Collection to search (default "default").
    pub collection: Option<String>,
    /// Chunks to retrieve.
    pub top_k: Option<usize>,
    /// Lowest cosine similarity kept.
    pub min_score: Option<f32>,
    /// Embedding model (default: the one the collection was built with).
    pub embedding_model: Option<String>,
    /// Fuse full-text (BM25) with vector search (default: `rag.hybrid`).
    pub hybrid: Option<bool>,
}

impl RagOptions {
    /// Reads the `rag` field of a request: `true`, or an object of options; `false` and
    /// null ask for nothing.
    pub fn from_value(value: &serde_json::Value) -> Result<Option<RagOptions>, String> {
        match value {
            serde_json::Value::Null | serde_json::Value::Bool(false) => Ok(None),
            serde_json::Value::Bool(true) => Ok(Some(RagOptions::default())),
            object @ serde_json::Value::Object(_) => serde_json::from_value(object.clone()).map(Some).map_err(|e| format!("invalid rag options: {e}")),
            _ => Err("rag must be true or an object".into()),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub options: Options,
    pub keep_alive: Option<KeepAlive>,
    pub rag: Option<RagOptions>,
    /// Functions the model may call.
    pub tools: Vec<ToolSpec>,
    pub tool_choice: ToolChoice,
    /// Reasoning models: `Some(false)` turns thinking off where the template has a switch.
    pub think: Option<bool>,
}

#[derive(Debug, Clone, Default)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: String,
    /// Overrides the personality's SYSTEM.
    pub system: Option<String>,
    /// Overrides the prompt template (Ollama's `template`).
    pub template: Option<String>,
    /// Send the prompt as is, without any template (OpenAI completions, Ollama `raw`).
    pub raw: bool,
    /// Ollama's `context`: token ids of an earlier exchange to continue from.
    pub context: Vec<u32>,
    pub options: Options,
    pub keep_alive: Option<KeepAlive>,
}

/// What `tokenize` counts: a bare text, or a chat rendered through the model's template.
#[derive(Debug, Clone)]
pub enum TokenizeInput {
    Text { text: String, add_special_tokens: bool },
    Chat { messages: Vec<ChatMessage>, tools: Vec<ToolSpec>, add_generation_prompt: bool },
}
