//! Integration tests, in one binary so the large dependency tree is linked once.
//! They run the real `mlxserver` binary and the real HTTP server on 127.0.0.1:0.

mod common;
mod config_cli;
mod crash;
mod engine_reference;
mod families;
mod fuzz;
mod gguf_families;
mod handlers;
mod hub;
mod i18n_catalogs;
mod models;
mod rag;
#[cfg(feature = "rag-s3")]
mod rag_s3;
mod rerank;
mod server_shell;
mod templates;
mod terminal_chat;
mod serving;
mod wizard;
