//! Ollama's wire types, field by field as Ollama's `docs/api.md` defines them (durations in
//! nanoseconds). Shared by the server handlers and the CLI's client.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::store::Parameters;

/// Model parameters of a request (Ollama's `options`). Unknown options are accepted and
/// ignored, as Ollama does for options that do not apply to a runner.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Options {
    /// Randomness of sampling; 0 is greedy.
    #[schema(example = 0.8)]
    pub temperature: Option<f32>,
    pub top_k: Option<i64>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    /// Tokens to generate at most; -1 means until the context is full.
    pub num_predict: Option<i64>,
    /// Context window in tokens (at most the model's).
    pub num_ctx: Option<i64>,
    pub repeat_penalty: Option<f32>,
    /// Tokens the repeat penalty looks back over; -1 means the whole context.
    pub repeat_last_n: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    /// Same seed, same text.
    pub seed: Option<i64>,
    /// Generation stops before any of these strings.
    pub stop: Option<Vec<String>>,
}

impl Options {
    /// A personality's or a session's parameters as Ollama's options.
    pub fn from_parameters(parameters: &Parameters) -> Options {
        Options {
            temperature: parameters.temperature,
            top_k: parameters.top_k.map(|k| k as i64),
            top_p: parameters.top_p,
            min_p: parameters.min_p,
            num_predict: parameters.num_predict,
            num_ctx: parameters.num_ctx.map(|n| n as i64),
            repeat_penalty: parameters.repeat_penalty,
            repeat_last_n: parameters.repeat_last_n,
            presence_penalty: parameters.presence_penalty,
            frequency_penalty: parameters.frequency_penalty,
            seed: parameters.seed.map(|s| s as i64),
            stop: (!parameters.stop.is_empty()).then(|| parameters.stop.clone()),
        }
    }

    pub fn to_parameters(&self) -> Result<Parameters, String> {
        let mut parameters = Parameters {
            temperature: self.temperature,
            top_p: self.top_p,
            min_p: self.min_p,
            num_predict: self.num_predict,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed.map(|s| s.max(0) as u64),
            stop: self.stop.clone().unwrap_or_default(),
            ..Default::default()
        };
        if let Some(top_k) = self.top_k {
            parameters.top_k = Some(usize::try_from(top_k).map_err(|_| "options.top_k must not be negative".to_string())?);
        }
        if let Some(num_ctx) = self.num_ctx {
            parameters.num_ctx = Some(usize::try_from(num_ctx).ok().filter(|n| *n > 0).ok_or("options.num_ctx must be positive")?);
        }
        if let Some(t) = self.temperature {
            if !(0.0..=100.0).contains(&t) || t.is_nan() {
                return Err("options.temperature must be between 0 and 100".into());
            }
        }
        if let Some(p) = self.top_p {
            if !(0.0..=1.0).contains(&p) {
                return Err("options.top_p must be between 0 and 1".into());
            }
        }
        Ok(parameters)
    }
}

/// `keep_alive`: a duration string ("5m"), a number of seconds, 0 to unload right after, or a
/// negative value to keep the model loaded.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(untagged)]
pub enum KeepAliveValue {
    Seconds(f64),
    Text(String),
}

impl KeepAliveValue {
    pub fn parse(&self) -> Result<crate::config::KeepAlive, String> {
        match self {
            KeepAliveValue::Seconds(seconds) => Ok(crate::config::KeepAlive::from_seconds(*seconds)),
            KeepAliveValue::Text(text) => crate::config::KeepAlive::parse(text).ok_or_else(|| format!("invalid keep_alive '{text}'")),
        }
    }
}

/// A chat turn.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Message {
    /// `system`, `user`, `assistant` or `tool`.
    #[schema(example = "user")]
    pub role: String,
    #[serde(default)]
    #[schema(example = "Why is the sky blue?")]
    pub content: String,
    /// Images are not supported by mlxserver's text models; sending some is an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images: Option<Vec<String>>,
    /// Calls an assistant turn made: `[{"function": {"name", "arguments": {...}}}]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// On a `tool` turn: the function whose result this is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_name: Option<String>,
    /// A reasoning model's thinking before its answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thinking: Option<String>,
}

impl Message {
    pub fn assistant(content: String) -> Message {
        Message { role: "assistant".into(), content, images: None, tool_calls: None, tool_name: None, thinking: None }
    }
}

/// The log-probability of one generated token, with the likeliest alternatives.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Logprob {
    pub token: String,
    pub logprob: f32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<Vec<u8>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top_logprobs: Vec<TopLogprob>,
}

/// One of the likeliest tokens at a step.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<Vec<u8>>,
}

/// `format`: "json" or a JSON schema.
pub type FormatValue = serde_json::Value;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GenerateRequest {
    #[schema(example = "SmolLM2-135M-Instruct")]
    pub model: String,
    /// The prompt; empty just loads the model (or unloads it with `keep_alive: 0`).
    #[serde(default)]
    #[schema(example = "Why is the sky blue?")]
    pub prompt: String,
    /// Text after the response (fill-in-the-middle); not supported.
    pub suffix: Option<String>,
    /// Base64 images; not supported by mlxserver's text models.
    pub images: Option<Vec<String>>,
    #[schema(value_type = Option<Object>)]
    pub format: Option<FormatValue>,
    pub options: Option<Options>,
    /// Overrides the Modelfile's SYSTEM.
    pub system: Option<String>,
    /// Overrides the prompt template.
    pub template: Option<String>,
    /// Stream NDJSON objects (default true).
    pub stream: Option<bool>,
    /// Send the prompt without any template.
    pub raw: Option<bool>,
    pub keep_alive: Option<KeepAliveValue>,
    /// `context` of an earlier response, to continue that exchange.
    pub context: Option<Vec<u32>>,
    /// Report the log-probability of each generated token.
    pub logprobs: Option<bool>,
    /// With `logprobs`: this many alternatives per token (0-20).
    pub top_logprobs: Option<usize>,
    /// Reasoning models: return the thinking separately (`thinking`); false turns it off
    /// where the template has a switch.
    #[serde(default)]
    pub think: Option<bool>,
    /// Retrieval-augmented generation (mlxserver extension).
    #[schema(value_type = Option<Object>)]
    pub rag: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ChatRequest {
    #[schema(example = "SmolLM2-135M-Instruct")]
    pub model: String,
    /// The conversation; empty just loads the model.
    #[serde(default)]
    pub messages: Vec<Message>,
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<Vec<serde_json::Value>>,
    #[schema(value_type = Option<Object>)]
    pub format: Option<FormatValue>,
    pub options: Option<Options>,
    /// Stream NDJSON objects (default true).
    pub stream: Option<bool>,
    pub keep_alive: Option<KeepAliveValue>,
    /// Report the log-probability of each generated token.
    pub logprobs: Option<bool>,
    /// With `logprobs`: this many alternatives per token (0-20).
    pub top_logprobs: Option<usize>,
    /// Reasoning models: return the thinking separately (`thinking`); false turns it off
    /// where the template has a switch.
    #[serde(default)]
    pub think: Option<bool>,
    /// Retrieval-augmented generation (mlxserver extension).
    #[schema(value_type = Option<Object>)]
    pub rag: Option<serde_json::Value>,
}

/// Timing and count fields of a final response (all durations in nanoseconds).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Metrics {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_duration: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_duration: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_eval_count: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_eval_duration: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_count: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_duration: Option<u64>,
}

/// One streamed piece, or the whole answer, of `/api/generate`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GenerateResponse {
    pub model: String,
    /// RFC 3339 time.
    pub created_at: String,
    pub response: String,
    /// A reasoning model's thinking (with `think`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thinking: Option<String>,
    pub done: bool,
    /// `stop`, `length`, `load` or `unload`, on the final object.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub done_reason: Option<String>,
    /// Token ids of this exchange, to pass back as `context`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<Vec<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<Logprob>>,
    #[serde(flatten)]
    pub metrics: Metrics,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub rag: Option<serde_json::Value>,
}

/// One streamed piece, or the whole answer, of `/api/chat`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatResponse {
    pub model: String,
    pub created_at: String,
    pub message: Message,
    pub done: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub done_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<Logprob>>,
    #[serde(flatten)]
    pub metrics: Metrics,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub rag: Option<serde_json::Value>,
}

/// A string or a list of strings.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(untagged)]
pub enum EmbedInput {
    One(String),
    Many(Vec<String>),
}

impl EmbedInput {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            EmbedInput::One(text) => vec![text],
            EmbedInput::Many(list) => list,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EmbedRequest {
    #[schema(example = "all-MiniLM-L6-v2")]
    pub model: String,
    pub input: EmbedInput,
    /// Cut inputs longer than the model's window (default true); false makes them an error.
    pub truncate: Option<bool>,
    pub options: Option<Options>,
    pub keep_alive: Option<KeepAliveValue>,
    /// Not supported: the model's own dimension is always used.
    pub dimensions: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EmbedResponse {
    pub model: String,
    pub embeddings: Vec<Vec<f32>>,
    pub total_duration: u64,
    pub load_duration: u64,
    pub prompt_eval_count: usize,
}

/// The legacy single-text embedding request.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EmbeddingsRequest {
    pub model: String,
    pub prompt: String,
    pub options: Option<Options>,
    pub keep_alive: Option<KeepAliveValue>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EmbeddingsResponse {
    pub embedding: Vec<f32>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ModelDetails {
    pub parent_model: String,
    /// `gguf`, `safetensors` or `mlx`.
    pub format: String,
    pub family: String,
    pub families: Option<Vec<String>>,
    pub parameter_size: String,
    pub quantization_level: String,
}

/// A model in `/api/tags`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ListModel {
    pub name: String,
    pub model: String,
    pub modified_at: String,
    pub size: u64,
    pub digest: String,
    pub details: ModelDetails,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ListResponse {
    pub models: Vec<ListModel>,
}

/// A loaded model in `/api/ps`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProcessModel {
    pub name: String,
    pub model: String,
    /// Bytes held (weights).
    pub size: u64,
    pub digest: String,
    pub details: ModelDetails,
    /// When an idle model will be unloaded (RFC 3339); far in the future when kept forever.
    pub expires_at: String,
    /// Bytes on a GPU.
    pub size_vram: u64,
    /// Whether a request is using it now (mlxserver extension).
    pub busy: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProcessResponse {
    pub models: Vec<ProcessModel>,
    /// mlxserver's addition: the engine's memory (Ollama clients ignore it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<ProcessMemory>,
}

/// What MLX holds, in bytes.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ProcessMemory {
    /// Held now by weights and caches.
    pub active: u64,
    /// The most held at once since the server started.
    pub peak: u64,
    /// Freed buffers kept for reuse.
    pub cache: u64,
    /// MLX's memory limit (0 on the CPU: none).
    pub limit: u64,
    /// The server process's resident set size.
    pub resident: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ShowRequest {
    #[serde(alias = "name")]
    pub model: String,
    pub verbose: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ShowResponse {
    pub modelfile: String,
    /// PARAMETER lines, one per line: `name value`.
    pub parameters: String,
    pub template: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub license: Option<String>,
    pub details: ModelDetails,
    #[schema(value_type = Object)]
    pub model_info: serde_json::Value,
    /// `completion` or `embedding`.
    pub capabilities: Vec<String>,
    pub modified_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CopyRequest {
    pub source: String,
    pub destination: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeleteRequest {
    #[serde(alias = "name")]
    pub model: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PullRequest {
    #[serde(alias = "name")]
    pub model: String,
    pub insecure: Option<bool>,
    pub stream: Option<bool>,
}

/// A progress object of `/api/pull` and `/api/create`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ProgressResponse {
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completed: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateRequest {
    #[serde(alias = "name")]
    pub model: String,
    /// The base model or personality.
    pub from: Option<String>,
    /// A whole Modelfile (the older form of this request).
    pub modelfile: Option<String>,
    pub system: Option<String>,
    pub template: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub parameters: Option<serde_json::Value>,
    pub messages: Option<Vec<Message>>,
    #[schema(value_type = Option<Object>)]
    pub license: Option<serde_json::Value>,
    pub stream: Option<bool>,
    pub quantize: Option<String>,
}
