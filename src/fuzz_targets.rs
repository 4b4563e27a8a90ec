//! The parsers of files users bring, each as one function over raw bytes that must return
//! (an `Ok` or an `Err`) and never panic: what `tests/it/fuzz.rs` (mutation fuzzing on the
//! stable toolchain, and the replay of every saved crash) and the coverage-guided libFuzzer
//! targets of `fuzz/` (`scripts/cargo-fuzz.sh`) both run, so an input saved by either one
//! means the same thing to both.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::engine::{decoder, gguf, loader, template, tokenizer, validate};

/// Runs one target, named by its folder of saved inputs under `tests/fixtures/fuzz/`, on one
/// input; `scratch` is a folder for the targets that read a file.
pub fn run(target: &str, input: &[u8], scratch: &Path) {
    match target {
        "gguf" => gguf_header(input),
        "safetensors" => safetensors_file(input, &scratch.join("model.safetensors")),
        "config" => decoder_config(input),
        "modelfile" => modelfile(input),
        "template" => chat_template(input),
        "tokenizer" => tokenizer_file(input, &scratch.join("tokenizer.json")),
        other => panic!("no fuzz target {other}"),
    }
}

/// The size of the file a fuzzed GGUF header is read as the start of: tensor data may lie
/// anywhere in the first GiB.
pub const GGUF_FILE_SIZE: u64 = 1 << 30;

/// A GGUF header and tensor table, and the tokenizer built from its vocabulary.
pub fn gguf_header(input: &[u8]) {
    if let Ok(header) = gguf::parse_prefix(input, GGUF_FILE_SIZE) {
        if let Some(tokens) = header.strings("tokenizer.ggml.tokens") {
            let _ = tokenizer::from_gguf(loader::gguf_vocabulary(&header, tokens));
        }
    }
}

/// A safetensors file: its JSON header against the bytes it describes.
pub fn safetensors_file(input: &[u8], path: &Path) {
    if std::fs::write(path, input).is_ok() {
        let _ = validate::safetensors_header(path);
    }
}

/// A `config.json`, read as the decoder configuration of its family.
pub fn decoder_config(input: &[u8]) {
    if let Ok(config) = serde_json::from_slice::<Value>(input) {
        let _ = decoder::DecoderConfig::from_hf(&config);
    }
}

/// A Modelfile.
pub fn modelfile(input: &[u8]) {
    let _ = crate::store::modelfile::Modelfile::parse(&String::from_utf8_lossy(input));
}

/// A chat template, rendered for a short chat with a system prompt and a tool.
pub fn chat_template(input: &[u8]) {
    let messages = [
        template::TemplateMessage::new("system", "Be brief."),
        template::TemplateMessage::new("user", "Hi"),
        template::TemplateMessage::new("assistant", "Hello"),
        template::TemplateMessage::new("user", "Weather?"),
    ];
    let tools = serde_json::json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    if let Ok(template) = template::ChatTemplate::new(Some(String::from_utf8_lossy(input).into_owned()), "<s>", "</s>") {
        let _ = template.render_with(&messages, true, Some(&tools), Some(false));
    }
}

/// A `tokenizer.json`, loaded, then encoding and decoding a mixed-script sentence.
pub fn tokenizer_file(input: &[u8], path: &Path) {
    if std::fs::write(path, input).is_err() {
        return;
    }
    if let Ok(tokenizer) = tokenizer::from_file(path) {
        if let Ok(ids) = tokenizer::encode(&tokenizer, "Hello wörld, 東京 123!") {
            let _ = tokenizer::decode(&tokenizer, &ids);
        }
    }
}

/// A per-process scratch folder for the file-reading targets (libFuzzer runs one process per
/// job, so the folder is never shared).
pub fn scratch_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mlxserver-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    dir
}
