//! What the HTTP front ends need from the core, as a trait: the service implements it with
//! the store, scheduler and MLX engine; handler tests implement it with scripted answers, so
//! every API family's translation is tested without a model.

use std::time::Duration;

use futures::future::BoxFuture;

use super::error::Result;
use super::request::{ChatRequest, CompletionRequest, TokenizeInput};
use super::stream::Answer;
use crate::config::KeepAlive;

/// Embeddings with their token counts.
#[derive(Debug, Clone, Default)]
pub struct Embeddings {
    pub model: String,
    pub vectors: Vec<Vec<f32>>,
    pub prompt_tokens: usize,
    pub load_duration: Duration,
    pub total_duration: Duration,
}

#[derive(Debug, Clone)]
pub struct EmbedRequest {
    pub model: String,
    pub inputs: Vec<String>,
    /// Cut inputs longer than the model's window instead of refusing them.
    pub truncate: bool,
    pub keep_alive: Option<KeepAlive>,
}

/// Token ids and, for each, its piece of text.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tokenized {
    pub model: String,
    pub tokens: Vec<u32>,
    pub pieces: Vec<String>,
    /// The model's context length.
    pub max_context: usize,
}

/// Relevance of documents to a query, in the documents' order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Relevance {
    pub model: String,
    pub scores: Vec<f32>,
    pub tokens: usize,
}

pub trait Backend: Send + Sync + 'static {
    /// Starts a chat answer; errors before the first token come back here.
    fn chat(&self, request: ChatRequest) -> BoxFuture<'_, Result<Answer>>;
    /// Starts a completion of a prompt (templated unless `raw`).
    fn complete(&self, request: CompletionRequest) -> BoxFuture<'_, Result<Answer>>;
    fn embed(&self, request: EmbedRequest) -> BoxFuture<'_, Result<Embeddings>>;
    fn tokenize(&self, model: String, input: TokenizeInput) -> BoxFuture<'_, Result<Tokenized>>;
    fn detokenize(&self, model: String, tokens: Vec<u32>) -> BoxFuture<'_, Result<String>>;
    /// Scores documents against a query: a cross-encoder's relevance, or the cosine
    /// similarity of an embedding model's vectors.
    fn rerank(&self, model: String, query: String, documents: Vec<String>) -> BoxFuture<'_, Result<Relevance>>;
}
