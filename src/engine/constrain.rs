//! Constrained decoding: before each sampled token, a grammar (a JSON schema, "any JSON
//! object", or a forced tool call) masks every token that could not continue a valid output.
//! The grammar engine is llguidance; this module adapts our tokenizer to it and applies its
//! masks to the logits, so structured output parses by construction, not by retrying.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use tokenizers::Tokenizer;

use super::EngineError;

/// What a request asks its output to be.
#[derive(Debug, Clone)]
pub enum Grammar {
    /// One JSON object, of any shape (OpenAI's `json_object`, Ollama's `format: "json"`).
    JsonObject,
    /// A JSON value that validates against this schema.
    JsonSchema(serde_json::Value),
    /// A grammar in llguidance's Lark dialect (forced tool calls).
    Lark(String),
}

impl Grammar {
    fn to_llguidance(&self) -> TopLevelGrammar {
        match self {
            Grammar::JsonObject => TopLevelGrammar::from_lark(ANY_JSON_OBJECT.to_string()),
            Grammar::JsonSchema(schema) => TopLevelGrammar::from_json_schema(with_compact_layout(schema.clone())),
            Grammar::Lark(source) => TopLevelGrammar::from_lark(source.clone()),
        }
    }
}

/// Any JSON object, laid out compactly, with every literal bounded: a schema-free object lets
/// a small model write one number or string forever, which no token budget survives.
const ANY_JSON_OBJECT: &str = r#"start: object
value: object | array | STRING | NUMBER | "true" | "false" | "null"
object: "{" [pair (", " pair)*] "}"
pair: STRING ": " value
array: "[" [value (", " value)*] "]"
STRING: /"([^"\\\x00-\x1f]|\\["\\bfnrt]|\\u[0-9a-fA-F]{4}){0,256}"/
NUMBER: /-?(0|[1-9][0-9]{0,15})(\.[0-9]{1,8})?([eE][+-]?[0-9]{1,3})?/
"#;

/// Fixed separators and no free whitespace: a small model given free whitespace can emit
/// newlines until it runs out of tokens. Numbers are bounded too (see [`bound_numbers`]).
/// Unknown schema keywords (formats, titles) are ignored rather than refused, as OpenAI's
/// non-strict mode does.
pub fn with_compact_layout(mut schema: serde_json::Value) -> serde_json::Value {
    bound_numbers(&mut schema);
    if let Some(object) = schema.as_object_mut() {
        let options = object.entry("x-guidance").or_insert_with(|| serde_json::json!({}));
        if let Some(options) = options.as_object_mut() {
            options.entry("whitespace_flexible").or_insert(false.into());
            options.entry("item_separator").or_insert(", ".into());
            options.entry("key_separator").or_insert(": ".into());
            options.entry("lenient").or_insert(true.into());
        }
    }
    schema
}

/// The largest integral part a schema's number may have: 16 digits, as llama.cpp's
/// schema converter allows.
const MAX_INTEGRAL: i64 = 9_999_999_999_999_999;

/// Gives every integer and number in a schema a bounded number of digits (16 before the
/// point, 8 after), unless the schema bounds them itself: unbounded, a small model at
/// temperature 0 can write `1111…` until its token budget runs out.
fn bound_numbers(schema: &mut serde_json::Value) {
    match schema {
        serde_json::Value::Object(object) => {
            let types: Vec<String> = match object.get("type") {
                Some(serde_json::Value::String(kind)) => vec![kind.clone()],
                Some(serde_json::Value::Array(kinds)) => kinds.iter().filter_map(|k| k.as_str().map(str::to_string)).collect(),
                _ => Vec::new(),
            };
            if types.iter().any(|t| t == "integer" || t == "number") {
                if !object.contains_key("minimum") && !object.contains_key("exclusiveMinimum") {
                    object.insert("minimum".into(), (-MAX_INTEGRAL).into());
                }
                if !object.contains_key("maximum") && !object.contains_key("exclusiveMaximum") {
                    object.insert("maximum".into(), MAX_INTEGRAL.into());
                }
                if types.iter().all(|t| t != "integer") && !object.contains_key("multipleOf") {
                    object.insert("multipleOf".into(), serde_json::json!(1e-8));
                }
            }
            // Values of these keywords are data, not schemas.
            for (key, value) in object.iter_mut() {
                if !matches!(key.as_str(), "const" | "enum" | "default" | "examples") {
                    bound_numbers(value);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(bound_numbers),
        _ => {}
    }
}

/// Our tokenizer as llguidance sees it: the bytes of every token, in a trie.
struct TokenizerBridge {
    tokenizer: Arc<Tokenizer>,
    trie: TokTrie,
}

impl TokenizerEnv for TokenizerBridge {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, bytes: &[u8]) -> Vec<TokenId> {
        let text = String::from_utf8_lossy(bytes);
        self.tokenizer.encode(text.as_ref(), false).map(|e| e.get_ids().to_vec()).unwrap_or_default()
    }
}

/// Compiles grammars for one model (built once per loaded model, on first use).
pub struct GrammarCompiler {
    factory: ParserFactory,
    vocab_size: usize,
}

impl GrammarCompiler {
    /// `vocab_size` is the model's logits width, which may exceed the tokenizer's vocabulary.
    pub fn new(tokenizer: Arc<Tokenizer>, eos_token_ids: &[u32], vocab_size: usize) -> Result<GrammarCompiler, EngineError> {
        let unsupported = |detail: String| EngineError::BadRequest(format!("structured output is not available for this model: {detail}"));
        let json: serde_json::Value = tokenizer
            .to_string(false)
            .map_err(|e| unsupported(e.to_string()))
            .and_then(|text| serde_json::from_str(&text).map_err(|e| unsupported(e.to_string())))?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| unsupported(e.to_string()))?;
        // Rows of the logits with no token behind them become never-allowed special tokens.
        let size = vocab_size.max(words.len());
        let placeholder = |id: usize| [&[TokTrie::SPECIAL_TOKEN_MARKER][..], format!("<unused_{id}>").as_bytes()].concat();
        for (id, word) in words.iter_mut().enumerate() {
            if word.is_empty() {
                *word = placeholder(id);
            }
        }
        while words.len() < size {
            words.push(placeholder(words.len()));
        }
        let eos = eos_token_ids.first().copied().ok_or_else(|| unsupported("the model has no end-of-sequence token".into()))?;
        let info = TokRxInfo::new(size as u32, eos);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(eos_token_ids);
        let env: TokEnv = Arc::new(TokenizerBridge { tokenizer, trie });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| unsupported(e.to_string()))?;
        factory.quiet();
        Ok(GrammarCompiler { factory, vocab_size: size })
    }

    /// A fresh matcher for one request; a schema llguidance cannot compile is the caller's error.
    pub fn constraint(&self, grammar: &Grammar) -> Result<Constraint, EngineError> {
        let parser = self
            .factory
            .create_parser(grammar.to_llguidance())
            .map_err(|e| EngineError::BadRequest(format!("the output format cannot be used: {e}")))?;
        Ok(Constraint { matcher: Matcher::new(Ok(parser)), vocab_size: self.vocab_size })
    }
}

/// The grammar state of one sequence.
pub struct Constraint {
    matcher: Matcher,
    vocab_size: usize,
}

impl Constraint {
    /// Sets the logits of every token the grammar forbids now to -inf.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), EngineError> {
        let allowed = self.matcher.compute_mask().map_err(|e| EngineError::Grammar(e.to_string()))?;
        let limit = logits.len().min(self.vocab_size);
        for (id, logit) in logits.iter_mut().enumerate() {
            if id >= limit || !allowed.is_allowed(id as TokenId) {
                *logit = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Advances past the sampled token; true once the grammar is complete and nothing else
    /// may follow.
    pub fn advance(&mut self, token: u32) -> Result<bool, EngineError> {
        self.matcher.consume_token(token).map_err(|e| EngineError::Grammar(e.to_string()))?;
        Ok(self.matcher.is_stopped())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepts(grammar: &Grammar, text: &str) -> bool {
        use llguidance::toktrie::ApproximateTokEnv;
        let env = ApproximateTokEnv::single_byte_env();
        let mut factory = ParserFactory::new_simple(&env).unwrap();
        factory.quiet();
        let mut matcher = Matcher::new(factory.create_parser(grammar.to_llguidance()));
        let consumed = matcher.consume_tokens(&env.tokenize(text)).is_ok();
        consumed && !matcher.is_error() && matcher.is_accepting().unwrap_or(false)
    }

    #[test]
    fn any_json_object_accepts_json_and_bounds_literals() {
        assert!(accepts(&Grammar::JsonObject, r#"{"a": [1, -2.5e3, "x\n\u00e9"], "b": {"c": null, "d": true}}"#));
        assert!(accepts(&Grammar::JsonObject, "{}"));
        assert!(!accepts(&Grammar::JsonObject, r#"[1, 2]"#));
        assert!(!accepts(&Grammar::JsonObject, r#"{"a": 12345678901234567890}"#));
        assert!(!accepts(&Grammar::JsonObject, r#"{"a": 1"#));
    }

    #[test]
    fn schemas_bind_types_enums_and_required_fields() {
        let grammar = Grammar::JsonSchema(serde_json::json!({
            "type": "object",
            "properties": {"n": {"type": "integer"}, "c": {"enum": ["red", "blue"]}},
            "required": ["n", "c"],
            "additionalProperties": false
        }));
        assert!(accepts(&grammar, r#"{"n": 3, "c": "red"}"#));
        assert!(!accepts(&grammar, r#"{"n": 3, "c": "green"}"#));
        assert!(!accepts(&grammar, r#"{"n": 3}"#));
        assert!(!accepts(&grammar, r#"{"n": "3", "c": "red"}"#));
    }

    #[test]
    fn numbers_get_a_bounded_number_of_digits() {
        let grammar = Grammar::JsonSchema(serde_json::json!({"type": "object", "properties": {"age": {"type": "integer"}, "x": {"type": "number"}}, "required": ["age", "x"]}));
        assert!(accepts(&grammar, r#"{"age": 9999999999999999, "x": -12.5}"#));
        assert!(!accepts(&grammar, r#"{"age": 11111111111111111, "x": 1}"#), "17 integral digits");
        assert!(accepts(&grammar, r#"{"age": 1, "x": 0.12345678}"#));
        assert!(!accepts(&grammar, r#"{"age": 1, "x": 0.123456789}"#), "9 fraction digits");
        // A schema's own bounds stand, and constants are left alone.
        let own = with_compact_layout(serde_json::json!({"type": "integer", "maximum": 5, "const": {"type": "integer"}}));
        assert_eq!((own["maximum"].clone(), own["const"].clone()), (serde_json::json!(5), serde_json::json!({"type": "integer"})));
    }

    #[test]
    fn compact_layout_keeps_explicit_options() {
        let schema = with_compact_layout(serde_json::json!({"type": "object", "x-guidance": {"lenient": false}}));
        assert_eq!(schema["x-guidance"]["lenient"], false);
        assert_eq!(schema["x-guidance"]["whitespace_flexible"], false);
    }
}
