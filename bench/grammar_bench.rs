//! Cost of constrained decoding per token, without the model: the time to compute the token
//! mask (llguidance over the whole vocabulary) and advance the grammar, for each token of a
//! valid answer to a JSON schema, and the one-off cost of indexing the vocabulary. Prints
//! one JSON line.
//!
//! usage: grammar_bench TOKENIZER_JSON [--runs 20]

use std::sync::Arc;
use std::time::{Duration, Instant};

use mlxserver::engine::constrain::{Grammar, GrammarCompiler};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(path) = args.get(1) else {
        eprintln!("usage: grammar_bench TOKENIZER_JSON [--runs N]");
        std::process::exit(2);
    };
    let runs: usize = args.iter().position(|a| a == "--runs").and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(20);
    let tokenizer = Arc::new(mlxserver::engine::tokenizer::from_file(std::path::Path::new(path)).expect("tokenizer"));
    let eos = ["<|im_end|>", "<|endoftext|>", "</s>", "<|eot_id|>"].iter().find_map(|t| tokenizer.token_to_id(t)).unwrap_or(0);
    let vocab = tokenizer.get_vocab_size(true);
    let started = Instant::now();
    let compiler = GrammarCompiler::new(tokenizer.clone(), &[eos], vocab).expect("compiler");
    let index_seconds = started.elapsed().as_secs_f64();
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer"},
            "role": {"enum": ["admin", "editor", "viewer"]},
            "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["city", "zip"]},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}
        },
        "required": ["name", "age", "role", "address", "tags"]
    });
    let answer = r#"{"name": "Ada Lovelace", "age": 36, "role": "editor", "address": {"city": "London", "zip": "12345"}, "tags": ["math", "engines"]}"#;
    let tokens = tokenizer.encode(answer, false).expect("encode").get_ids().to_vec();
    let mut logits = vec![0.0f32; vocab];
    let mut steps: Vec<Duration> = Vec::new();
    let mut compile = Duration::ZERO;
    for _ in 0..runs {
        let compile_started = Instant::now();
        let mut constraint = compiler.constraint(&Grammar::JsonSchema(schema.clone())).expect("schema");
        compile += compile_started.elapsed();
        for &token in &tokens {
            let step = Instant::now();
            constraint.mask(&mut logits).expect("mask");
            assert!(logits[token as usize].is_finite(), "the grammar refused a token of a valid answer");
            constraint.advance(token).expect("advance");
            steps.push(step.elapsed());
            logits.iter_mut().for_each(|l| *l = 0.0);
        }
    }
    steps.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mean = steps.iter().sum::<Duration>() / steps.len() as u32;
    println!(
        "{}",
        serde_json::json!({
            "bench": "grammar", "vocab": vocab, "answer_tokens": tokens.len(), "runs": runs,
            "vocabulary_index_ms": index_seconds * 1000.0,
            "schema_compile_ms": ms(compile / runs as u32),
            "mask_and_advance_ms_mean": ms(mean),
            "mask_and_advance_ms_p50": ms(steps[steps.len() / 2]),
            "mask_and_advance_ms_p99": ms(steps[steps.len() * 99 / 100]),
        })
    );
}
