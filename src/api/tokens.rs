//! Tokens and relevance: `POST /tokenize` and `POST /detokenize` (the shape vLLM and
//! llama.cpp's server use) and `POST /v1/rerank` (Cohere's and Jina's shape), translations
//! over the shared backend.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{json_response, ApiError, ApiJson};
use super::AppState;
use crate::answer::{ChatMessage, TokenizeInput};

pub fn router() -> Router<AppState> {
    Router::new().route("/tokenize", post(tokenize)).route("/detokenize", post(detokenize)).route("/v1/rerank", post(rerank))
}

/// A chat turn to tokenize (text content).
#[derive(Debug, Deserialize, ToSchema)]
pub struct TokenizeMessage {
    #[schema(example = "user")]
    pub role: String,
    #[serde(default)]
    pub content: String,
}

/// A text, or a chat rendered through the model's template, to turn into token ids.
#[derive(Debug, Deserialize, ToSchema)]
pub struct TokenizeRequest {
    #[schema(example = "SmolLM2-135M-Instruct")]
    pub model: String,
    /// A bare text (without `messages`).
    pub prompt: Option<String>,
    /// A chat, rendered with the model's chat template (without `prompt`).
    pub messages: Option<Vec<TokenizeMessage>>,
    /// Tools offered to the chat, as `{"type": "function", "function": {...}}`.
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<Vec<serde_json::Value>>,
    /// Add the tokenizer's special tokens (a BOS) to a bare text (default false).
    #[serde(default)]
    pub add_special_tokens: bool,
    /// End a chat with the assistant's turn opened (default true).
    pub add_generation_prompt: Option<bool>,
    /// Also return each token's text.
    #[serde(default)]
    pub with_pieces: bool,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenizeResponse {
    pub model: String,
    pub tokens: Vec<u32>,
    pub count: usize,
    /// The model's context length.
    pub max_model_len: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pieces: Option<Vec<String>>,
}

/// Token ids of a text or a chat.
#[utoipa::path(post, path = "/tokenize", tag = "tokens", request_body = TokenizeRequest,
    responses((status = 200, body = TokenizeResponse), (status = 400, body = super::error::OpenAiErrorBody), (status = 404, body = super::error::OpenAiErrorBody)))]
pub async fn tokenize(State(state): State<AppState>, ApiJson(request): ApiJson<TokenizeRequest>) -> Result<Response, ApiError> {
    let input = match (request.prompt, request.messages) {
        (Some(text), None) => TokenizeInput::Text { text, add_special_tokens: request.add_special_tokens },
        (None, Some(messages)) => {
            // The same `tools` shape as Ollama's chat (OpenAI's function objects).
            let tools = super::ollama::tool_specs(&request.tools)?;
            TokenizeInput::Chat {
                messages: messages.into_iter().map(|m| ChatMessage::new(m.role, m.content)).collect(),
                tools,
                add_generation_prompt: request.add_generation_prompt.unwrap_or(true),
            }
        }
        _ => return Err(ApiError::bad_request("send either prompt or messages")),
    };
    let tokenized = state.backend.tokenize(request.model, input).await?;
    let response = TokenizeResponse {
        model: tokenized.model,
        count: tokenized.tokens.len(),
        tokens: tokenized.tokens,
        max_model_len: tokenized.max_context,
        pieces: request.with_pieces.then_some(tokenized.pieces),
    };
    Ok(json_response(StatusCode::OK, &response))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct DetokenizeRequest {
    pub model: String,
    pub tokens: Vec<u32>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DetokenizeResponse {
    pub model: String,
    /// The text of the tokens.
    pub prompt: String,
}

/// The text of token ids.
#[utoipa::path(post, path = "/detokenize", tag = "tokens", request_body = DetokenizeRequest,
    responses((status = 200, body = DetokenizeResponse), (status = 400, body = super::error::OpenAiErrorBody), (status = 404, body = super::error::OpenAiErrorBody)))]
pub async fn detokenize(State(state): State<AppState>, ApiJson(request): ApiJson<DetokenizeRequest>) -> Result<Response, ApiError> {
    let model = request.model.clone();
    let prompt = state.backend.detokenize(request.model, request.tokens).await?;
    Ok(json_response(StatusCode::OK, &DetokenizeResponse { model, prompt }))
}

/// A document to rank: a text, or `{"text": ...}`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum RerankDocument {
    Text(String),
    Object { text: String },
}

impl RerankDocument {
    fn into_text(self) -> String {
        match self {
            RerankDocument::Text(text) | RerankDocument::Object { text } => text,
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct RerankRequest {
    /// A cross-encoder (BERT with a classification head) or an embedding model.
    #[schema(example = "all-MiniLM-L6-v2")]
    pub model: String,
    pub query: String,
    pub documents: Vec<RerankDocument>,
    /// Return the best `top_n` (default: all).
    pub top_n: Option<usize>,
    /// Echo each document's text in its result (default false).
    #[serde(default)]
    pub return_documents: bool,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RerankDocumentText {
    pub text: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RerankResult {
    /// The document's position in the request.
    pub index: usize,
    pub relevance_score: f32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document: Option<RerankDocumentText>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RerankUsage {
    pub total_tokens: usize,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RerankResponse {
    pub id: String,
    pub model: String,
    /// Most relevant first.
    pub results: Vec<RerankResult>,
    pub usage: RerankUsage,
}

/// Order documents by relevance to a query.
#[utoipa::path(post, path = "/v1/rerank", tag = "tokens", request_body = RerankRequest,
    responses((status = 200, body = RerankResponse), (status = 400, body = super::error::OpenAiErrorBody), (status = 404, body = super::error::OpenAiErrorBody)))]
pub async fn rerank(State(state): State<AppState>, ApiJson(request): ApiJson<RerankRequest>) -> Result<Response, ApiError> {
    if request.documents.is_empty() {
        return Err(ApiError::invalid_param("documents", "documents must not be empty"));
    }
    if request.top_n == Some(0) {
        return Err(ApiError::invalid_param("top_n", "top_n must be at least 1"));
    }
    let documents: Vec<String> = request.documents.into_iter().map(RerankDocument::into_text).collect();
    let relevance = state.backend.rerank(request.model, request.query, documents.clone()).await?;
    let mut order: Vec<usize> = (0..relevance.scores.len()).collect();
    order.sort_by(|&a, &b| relevance.scores[b].total_cmp(&relevance.scores[a]));
    order.truncate(request.top_n.unwrap_or(order.len()));
    let results = order
        .into_iter()
        .map(|index| RerankResult {
            index,
            relevance_score: relevance.scores[index],
            document: request.return_documents.then(|| RerankDocumentText { text: documents[index].clone() }),
        })
        .collect();
    let response = RerankResponse {
        id: format!("rerank-{}", uuid::Uuid::new_v4().simple()),
        model: relevance.model,
        results,
        usage: RerankUsage { total_tokens: relevance.tokens },
    };
    Ok(json_response(StatusCode::OK, &response))
}
