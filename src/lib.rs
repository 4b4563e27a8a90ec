//! mlxserver: a local AI model server on Apple's MLX, with OpenAI- and Ollama-compatible APIs.
//!
//! # Layout
//!
//! - [`cli`]: the `mlxserver` command line (clap), every message through [`i18n`].
//! - [`config`]: defaults, `config.toml` under the home folder, environment, flags.
//! - [`answer`]: the answer pipeline every front end shares: request types and family
//!   defaults, prompt composition, the typed answer stream, the `Backend` trait.
//! - [`api`]: the axum application; one module per API family, errors shaped per family,
//!   the OpenAPI document and Swagger UI.
//! - [`engine`]: MLX models (llama family, BERT), tokenizers, chat templates, sampling, and
//!   the worker thread that batches generation.
//! - [`server`]: serving a listener with graceful shutdown.
//! - [`i18n`]: English and Japanese catalogs.

pub mod answer;
pub mod api;
pub mod cli;
pub mod config;
pub mod engine;
#[doc(hidden)]
pub mod fuzz_targets;
pub mod i18n;
pub mod metrics;
pub mod rag;
pub mod scheduler;
pub mod server;
pub mod service;
pub mod store;
