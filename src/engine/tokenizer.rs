//! Tokenizers: from a `tokenizer.json` (Hugging Face folders) or rebuilt from GGUF metadata
//! (`tokenizer.ggml.*`), plus incremental detokenization that never splits a UTF-8 character.

use std::sync::Arc;

use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::EngineError;

/// GGUF's token types (llama.cpp `llama_token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// What a GGUF file says about its tokenizer.
pub struct GgufVocab {
    pub model: String,
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    pub token_types: Vec<i32>,
    pub merges: Vec<String>,
}

/// The pre-tokenizer llama.cpp applies for each `tokenizer.ggml.pre` value.
fn pre_tokenizer_for(pre: &str) -> Result<PreTokenizerWrapper, EngineError> {
    // Regexes as in llama.cpp's llama-vocab.cpp and the models' tokenizer.json files.
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let split = |pattern: &str| -> Result<PreTokenizerWrapper, EngineError> {
        let split = Split::new(SplitPattern::Regex(pattern.to_string()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|error| EngineError::Tokenizer(error.to_string()))?;
        Ok(PreTokenizerWrapper::Sequence(PreSequence::new(vec![
            PreTokenizerWrapper::Split(split),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)),
        ])))
    };
    match pre {
        "default" | "gpt-2" | "gpt2" | "starcoder" | "refact" => {
            Ok(PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)))
        }
        // SmolLM (and other HuggingFaceTB models) split every digit, then GPT-2's regex.
        "smollm" => Ok(PreTokenizerWrapper::Sequence(PreSequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
        ]))),
        "llama-bpe" | "llama3" | "dbrx" | "smaug-bpe" => split(LLAMA3),
        "qwen2" | "deepseek-r1-qwen" => split(QWEN2),
        other => Err(EngineError::Tokenizer(format!("unsupported GGUF pre-tokenizer '{other}'"))),
    }
}

/// Rebuilds a byte-level BPE tokenizer (`tokenizer.ggml.model = gpt2`) from GGUF metadata.
pub fn from_gguf(vocab: GgufVocab) -> Result<Tokenizer, EngineError> {
    if vocab.model != "gpt2" {
        return Err(EngineError::Tokenizer(format!(
            "GGUF tokenizer model '{}' is not supported; pull the model's Hugging Face folder instead",
            vocab.model
        )));
    }
    let ids: tokenizers::models::bpe::Vocab =
        vocab.tokens.iter().enumerate().map(|(id, token)| (token.clone(), id as u32)).collect();
    let merges: Vec<(String, String)> = vocab
        .merges
        .iter()
        .filter_map(|merge| merge.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(ids, merges)
        .build()
        .map_err(|error| EngineError::Tokenizer(error.to_string()))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer_for(vocab.pre.as_deref().unwrap_or("default"))?));
    tokenizer.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
    let special: Vec<AddedToken> = vocab
        .tokens
        .iter()
        .zip(&vocab.token_types)
        .filter(|(_, kind)| matches!(**kind, TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED))
        .map(|(token, kind)| AddedToken::from(token.clone(), *kind == TOKEN_TYPE_CONTROL))
        .collect();
    tokenizer.add_special_tokens(&special);
    Ok(tokenizer)
}

/// Reads a `tokenizer.json`. Its padding and truncation settings are dropped: the engine
/// batches and bounds sequences itself, a chat prompt must never be cut silently, and a hostile
/// `pad_to_multiple_of` made the tokenizers crate panic on every encode (found by
/// tests/it/fuzz.rs). The file must parse as JSON, strings included, before the tokenizers
/// crate reads it: a syntax error or an invalid code point inside the `decoder` object made
/// it panic (`expect("Helper")` in its decoder deserializer, tokenizers 0.22.2; found by
/// libFuzzer, tests/fixtures/fuzz/tokenizer/). Skipping the document (`IgnoredAny`) is not
/// enough: it does not check the strings it skips. The tokenizer is then built from the parsed
/// value, so the file is parsed once.
pub fn from_file(path: &std::path::Path) -> Result<Tokenizer, EngineError> {
    let unreadable = |error: &dyn std::fmt::Display| EngineError::Tokenizer(format!("{}: {error}", path.display()));
    let bytes = std::fs::read(path).map_err(|error| unreadable(&error))?;
    let document = serde_json::from_slice::<serde_json::Value>(&bytes).map_err(|error| unreadable(&error))?;
    let mut tokenizer: Tokenizer = serde_json::from_value(document).map_err(|error| unreadable(&error))?;
    tokenizer.with_padding(None);
    tokenizer.with_truncation(None).map_err(|error| EngineError::Tokenizer(error.to_string()))?;
    Ok(tokenizer)
}

/// Token ids of `text` without special tokens added around it (chat templates add their own).
pub fn encode(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>, EngineError> {
    tokenizer
        .encode(text, false)
        .map(|encoding| encoding.get_ids().to_vec())
        .map_err(|error| EngineError::Tokenizer(error.to_string()))
}

pub fn decode(tokenizer: &Tokenizer, ids: &[u32]) -> Result<String, EngineError> {
    tokenizer.decode(ids, true).map_err(|error| EngineError::Tokenizer(error.to_string()))
}

/// Turns a growing list of token ids into text deltas. Text is released only once it forms
/// whole characters, so a multi-byte character split across tokens never comes out garbled
/// (the approach of Hugging Face's text-generation-inference).
pub struct IncrementalDecoder {
    tokenizer: Arc<Tokenizer>,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    pub fn new(tokenizer: Arc<Tokenizer>) -> Self {
        IncrementalDecoder { tokenizer, ids: Vec::new(), prefix_offset: 0, read_offset: 0 }
    }

    /// Adds one token and returns the text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String, EngineError> {
        self.ids.push(id);
        let prefix = decode(&self.tokenizer, &self.ids[self.prefix_offset..self.read_offset])?;
        let full = decode(&self.tokenizer, &self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.is_char_boundary(prefix.len()) {
            let delta = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(delta)
        } else {
            Ok(String::new())
        }
    }

    /// Text still held back at the end (an incomplete character becomes U+FFFD).
    pub fn flush(&mut self) -> Result<String, EngineError> {
        let prefix = decode(&self.tokenizer, &self.ids[self.prefix_offset..self.read_offset])?;
        let full = decode(&self.tokenizer, &self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(if full.len() > prefix.len() && full.is_char_boundary(prefix.len()) {
            full[prefix.len()..].to_string()
        } else {
            String::new()
        })
    }
}
