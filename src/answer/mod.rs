//! The answer pipeline every front end shares (the HTTP API families and the terminal
//! chat): request types with each family's defaults, prompt composition, one typed stream
//! of answer events, and the [`Backend`] trait the handlers call.
//!
//! The flow: a handler translates its wire request into a [`ChatRequest`] or
//! [`CompletionRequest`]; the backend (the service) composes the prompt ([`prompt`]),
//! runs it on the engine and shapes the engine's events into [`AnswerEvent`]s ([`stream`]);
//! the handler folds those into its wire format.

pub mod backend;
pub mod error;
pub mod prompt;
pub mod request;
pub mod stream;

pub use backend::{Backend, EmbedRequest, Embeddings, Relevance, Tokenized};
pub use error::{Result, ServiceError};
pub use request::{ApiFamily, ChatMessage, ChatRequest, CompletionRequest, Options, OutputFormat, RagOptions, TokenizeInput};
pub use stream::{Answer, AnswerEvent, Collected, Finish, FinishReason, Logprob, Usage};
