//! mlxserver's own routes, as the original mlxserver README defines them: `POST /generate`
//! (a personality and a prompt) and `POST /embeddings`.
//!
//! A streamed `/generate` answers `text/plain; charset=utf-8` with the text as it is
//! generated and nothing else, so `curl -N` shows the answer as it comes; an error after the
//! first byte ends the body with a line `[error] message`.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::extract::Path;
use axum::routing::{delete, get, post};
use axum::Router;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{json_response, stream_error, ApiError, ApiJson, Family};
use super::ollama_types::EmbedInput;
use super::AppState;
use crate::answer::{AnswerEvent, ApiFamily, ChatMessage, ChatRequest, EmbedRequest, FinishReason, Options, RagOptions, ServiceError};
use crate::rag::ingest::{Document, IngestError, IngestOptions};
use crate::rag::{CollectionStatus, Source};
use crate::store::Parameters;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/generate", post(generate))
        .route("/embeddings", post(embeddings))
        .route("/api/rag/documents", post(add_documents))
        .route("/api/rag/status", get(rag_status))
        .route("/api/rag/{collection}", delete(clear_collection))
}

/// A prompt for a personality (or a base model).
#[derive(Debug, Deserialize, ToSchema)]
pub struct GenerateRequest {
    /// The personality (or model) that answers.
    #[schema(example = "nyan-sensei")]
    pub personality_name: String,
    #[schema(example = "今日の調子はどう？")]
    pub prompt: String,
    /// Tokens to generate at most.
    #[schema(example = 50)]
    pub max_tokens: Option<u32>,
    /// Stream plain text as it is generated (default false).
    #[serde(default)]
    pub stream: bool,
    /// Answer from the RAG index.
    #[serde(default)]
    pub use_rag: bool,
    /// RAG options: `{"collection": "default", "top_k": 4}`.
    #[schema(value_type = Option<Object>)]
    pub rag: Option<serde_json::Value>,
}

/// The whole answer when `stream` is false.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct GenerateResponse {
    pub personality_name: String,
    pub response: String,
    /// `stop` or `length`.
    pub done_reason: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// The retrieved chunks the answer could cite (with use_rag).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<Source>,
}

/// Answer a prompt with a personality.
#[utoipa::path(post, path = "/generate", tag = "native", request_body = GenerateRequest,
    responses((status = 200, description = "The answer as JSON, or as streamed plain text when stream is true", body = GenerateResponse),
              (status = 400, body = super::error::SimpleErrorBody), (status = 404, body = super::error::SimpleErrorBody)))]
pub async fn generate(State(state): State<AppState>, ApiJson(request): ApiJson<GenerateRequest>) -> Result<Response, ApiError> {
    let rag = match (&request.rag, request.use_rag) {
        (Some(options), _) => RagOptions::from_value(options).map_err(|e| ApiError::invalid_param("rag", e))?,
        (None, true) => Some(RagOptions::default()),
        (None, false) => None,
    };
    if request.prompt.trim().is_empty() {
        return Err(ApiError::invalid_param("prompt", "prompt must not be empty"));
    }
    let parameters = Parameters { num_predict: request.max_tokens.map(i64::from), ..Default::default() };
    let mut answer = state
        .backend
        .chat(ChatRequest {
            model: request.personality_name.clone(),
            messages: vec![ChatMessage::new("user", request.prompt)],
            options: Options::new(ApiFamily::Native, parameters),
            rag,
            ..Default::default()
        })
        .await?;
    if request.stream {
        let body = async_stream::stream! {
            while let Some(event) = answer.next().await {
                match event {
                    AnswerEvent::Text { text, .. } => {
                        if !text.is_empty() { yield Ok::<_, std::convert::Infallible>(text.into_bytes()); }
                    }
                    AnswerEvent::Reasoning(_) | AnswerEvent::ToolCalls(_) => {}
                    AnswerEvent::Done(_) => {
                        // Sources close the plain-text answer, one line each.
                        if let Some(sources) = answer.sources.as_ref().filter(|s| !s.is_empty()) {
                            let mut tail = String::from("\n\nSources:\n");
                            for source in sources {
                                tail.push_str(&format!("[{}] {}\n", source.index, source.source));
                            }
                            yield Ok(tail.into_bytes());
                        }
                        break;
                    }
                    AnswerEvent::Error(error) => {
                        let body = stream_error(Family::Native, error);
                        yield Ok(format!("\n[error] {}\n", body["error"].as_str().unwrap_or("error")).into_bytes());
                        break;
                    }
                }
            }
        };
        let mut response = Response::new(Body::from_stream(body));
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        response.headers_mut().insert("x-content-type-options", HeaderValue::from_static("nosniff"));
        return Ok(response);
    }
    let sources = answer.sources.clone().unwrap_or_default();
    let collected = answer.collect().await?;
    Ok(json_response(
        StatusCode::OK,
        &GenerateResponse {
            personality_name: request.personality_name,
            response: collected.text,
            done_reason: match collected.finish.reason {
                FinishReason::Length => "length".into(),
                FinishReason::Stop | FinishReason::ToolCalls => "stop".into(),
            },
            prompt_tokens: collected.finish.usage.prompt_tokens,
            completion_tokens: collected.finish.usage.completion_tokens,
            sources,
        },
    ))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct EmbeddingsRequest {
    #[schema(example = "all-MiniLM-L6-v2")]
    pub model: String,
    /// A text or a list of texts.
    pub input: EmbedInput,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EmbeddingsResponse {
    pub model: String,
    pub embeddings: Vec<Vec<f32>>,
    pub dimensions: usize,
}

/// Embed texts.
#[utoipa::path(post, path = "/embeddings", tag = "native", request_body = EmbeddingsRequest,
    responses((status = 200, body = EmbeddingsResponse), (status = 404, body = super::error::SimpleErrorBody)))]
pub async fn embeddings(State(state): State<AppState>, ApiJson(request): ApiJson<EmbeddingsRequest>) -> Result<Response, ApiError> {
    let inputs = request.input.into_vec();
    if inputs.is_empty() {
        return Err(ApiError::invalid_param("input", "input must not be empty"));
    }
    let result = state.backend.embed(EmbedRequest { model: request.model.clone(), inputs, truncate: true, keep_alive: None }).await?;
    let dimensions = result.vectors.first().map_or(0, Vec::len);
    Ok(json_response(StatusCode::OK, &EmbeddingsResponse { model: result.model, embeddings: result.vectors, dimensions }))
}

/// A text document for the RAG index.
#[derive(Debug, Deserialize, ToSchema)]
pub struct RagDocument {
    /// A name for where the text came from (shown as the source of answers).
    #[schema(example = "notes/tokyo.md")]
    pub source: String,
    pub text: String,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct AddDocumentsRequest {
    /// Collection (default "default").
    pub collection: Option<String>,
    /// Embedding model (default: the collection's, else `rag.default_embedding_model`).
    pub model: Option<String>,
    pub documents: Vec<RagDocument>,
    /// Chunk size in tokens (default 256).
    pub chunk_size: Option<usize>,
    /// Overlap between chunks in tokens (default 32).
    pub overlap: Option<usize>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AddDocumentsResponse {
    pub collection: String,
    /// Documents written (new or changed).
    pub added: usize,
    /// Documents already stored unchanged.
    pub unchanged: usize,
    pub chunks: usize,
}

/// Add text documents to a RAG collection.
#[utoipa::path(post, path = "/api/rag/documents", tag = "native", request_body = AddDocumentsRequest,
    responses((status = 200, body = AddDocumentsResponse), (status = 400, body = super::error::SimpleErrorBody), (status = 404, body = super::error::SimpleErrorBody)))]
pub async fn add_documents(State(state): State<AppState>, ApiJson(request): ApiJson<AddDocumentsRequest>) -> Result<Response, ApiError> {
    let collection = request.collection.unwrap_or_else(|| crate::rag::DEFAULT_COLLECTION.to_string());
    crate::rag::check_collection(&collection).map_err(ServiceError::from)?;
    if request.documents.iter().any(|d| d.source.trim().is_empty()) {
        return Err(ApiError::invalid_param("documents", "every document needs a source"));
    }
    let rag = state.service.rag().await?;
    let model = match request.model {
        Some(model) => model,
        None => match rag.model_of(&collection).await {
            Ok(model) => model,
            Err(_) => state.config.rag.default_embedding_model.clone().ok_or_else(|| ServiceError::from(crate::rag::RagError::NoEmbeddingModel))?,
        },
    };
    let options = IngestOptions { collection: collection.clone(), model, chunk_size: request.chunk_size.unwrap_or(256), overlap: request.overlap.unwrap_or(32) };
    let documents = request.documents.into_iter().map(|d| Document::from_text(d.source, d.text)).collect();
    let (written, unchanged) = crate::rag::ingest::add_documents(rag, &state.service, &options, documents, &()).await.map_err(ingest_error)?;
    Ok(json_response(
        StatusCode::OK,
        &AddDocumentsResponse { collection, added: written.iter().filter(|n| **n > 0).count(), unchanged, chunks: written.iter().sum() },
    ))
}

/// The embedder's errors are the service's own; anything else is the index's.
fn ingest_error(error: IngestError) -> ApiError {
    match error {
        IngestError::Rag(error) => ApiError::from(ServiceError::from(error)),
        IngestError::Embedder(error) => match error.downcast::<ServiceError>() {
            Ok(error) => ApiError::from(*error),
            Err(error) => match error.downcast::<crate::store::StoreError>() {
                Ok(error) => ApiError::from(*error),
                Err(error) => ApiError::internal(error.to_string()),
            },
        },
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RagStatusResponse {
    pub collections: Vec<CollectionStatus>,
}

/// The collections of the RAG index.
#[utoipa::path(get, path = "/api/rag/status", tag = "native", responses((status = 200, body = RagStatusResponse)))]
pub async fn rag_status(State(state): State<AppState>) -> Result<Response, ApiError> {
    let collections = state.service.rag().await?.status().await.map_err(ServiceError::from)?;
    Ok(json_response(StatusCode::OK, &RagStatusResponse { collections }))
}

/// Delete a RAG collection.
#[utoipa::path(delete, path = "/api/rag/{collection}", tag = "native", params(("collection" = String, Path, description = "Collection name")),
    responses((status = 200, description = "Deleted"), (status = 404, body = super::error::SimpleErrorBody)))]
pub async fn clear_collection(State(state): State<AppState>, Path(collection): Path<String>) -> Result<Response, ApiError> {
    let existed = state.service.rag().await?.clear(&collection).await.map_err(ServiceError::from)?;
    if !existed {
        return Err(ApiError::not_found(format!("collection '{collection}' not found")));
    }
    Ok(StatusCode::OK.into_response())
}
