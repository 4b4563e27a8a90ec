//! Cross-encoder (reranker) scoring against Hugging Face transformers.
//!
//! `scripts/reference/make_rerank_reference.py` built a tiny random-weight
//! `BertForSequenceClassification` (one-label and two-label variants) with the real
//! all-MiniLM-L6-v2 tokenizer and recorded, for (query, document) pairs, transformers' input
//! ids, token type ids and logits in `tests/fixtures/reference/rerank/`. The weights are a
//! seeded recipe replayed here (as in `families.rs`); the folder is pulled into a real store
//! by the `mlxserver` binary, shown, then loaded from the store by the engine and scored.

use std::path::{Path, PathBuf};

use mlxserver::config::{CpuDtype, EngineConfig};
use mlxserver::engine::{encode_pair, Engine, Frontend, ModelKind, PairInput};
use serde_json::Value;

use crate::common::{stderr, stdout, Home};
use crate::engine_reference::mlx_lock;
use crate::families::recipe_values;

const TOLERANCE: f32 = 1e-4;

fn fixture() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference/rerank/tiny_bert_reranker.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// The all-MiniLM-L6-v2 tokenizer files (scripts/fetch-models.sh). The chat/embedding
/// reference tests need the same folder, so it is required rather than skipped.
fn tokenizer_dir() -> PathBuf {
    let dir = std::env::var_os("MLXSERVER_TEST_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| dirs::home_dir().expect("home").join(".cache/mlxserver/models"))
        .join("all-MiniLM-L6-v2");
    assert!(dir.join("tokenizer.json").is_file(), "all-MiniLM-L6-v2 missing in {}: run scripts/fetch-models.sh", dir.display());
    dir
}

fn model<'a>(fixture: &'a Value, name: &str) -> &'a Value {
    fixture["models"].as_array().unwrap().iter().find(|m| m["name"] == name).unwrap_or_else(|| panic!("no model {name} in the fixture"))
}

/// Writes one variant as a Hugging Face folder: recipe weights, config.json, tokenizer copy.
fn write_reranker(fixture: &Value, variant: &Value, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let buffers: Vec<(String, Vec<usize>, Vec<u8>)> = variant["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|tensor| {
            let (shape, values) = recipe_values(tensor);
            (tensor["name"].as_str().unwrap().to_string(), shape, values.iter().flat_map(|v| v.to_le_bytes()).collect())
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = buffers
        .iter()
        .map(|(name, shape, bytes)| (name.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&variant["config"]).unwrap()).unwrap();
    let source = tokenizer_dir();
    for file in fixture["meta"]["tokenizer_files"].as_array().unwrap() {
        let file = file.as_str().unwrap();
        if source.join(file).is_file() {
            std::fs::copy(source.join(file), dir.join(file)).unwrap();
        }
    }
}

fn ids(value: &Value) -> Vec<u32> {
    value.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

fn floats(value: &Value) -> Vec<f32> {
    value.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect()
}

/// Indices of `group` from the highest score to the lowest.
fn ranking(scores: &[f32], group: &[usize]) -> Vec<usize> {
    let mut order = group.to_vec();
    order.sort_by(|a, b| scores[*b].total_cmp(&scores[*a]));
    order
}

fn engine() -> Engine {
    Engine::start(EngineConfig { cpu_dtype: CpuDtype::Float32, prefix_cache_bytes: 0, ..Default::default() })
}

/// Pairs tokenized by `encode_pair` equal transformers' (truncation of the long document
/// included); the scores of the pulled model equal transformers' logits, and so does the
/// order of each query's documents.
#[test]
fn pulled_reranker_scores_pairs_like_transformers() {
    let _guard = mlx_lock();
    let fixture = fixture();
    let root = tempfile::tempdir().unwrap();
    let source = root.path().join("tiny-reranker");
    write_reranker(&fixture, model(&fixture, "one_label"), &source);

    let home = Home::new();
    let output = home.run(&["pull", source.to_str().unwrap(), "--name", "tiny-reranker"]);
    assert!(output.status.success(), "{}\n{}", stdout(&output), stderr(&output));
    let folder = home.path().join("models").join("tiny-reranker");
    let manifest: Value = serde_json::from_str(&std::fs::read_to_string(folder.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["kind"], "embedding", "{manifest}");
    let shown = stdout(&home.run(&["show", "tiny-reranker"]));
    assert!(shown.contains("reranker (cross-encoder, 1 label(s))") && shown.contains("family: bert"), "{shown}");

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let engine = engine();
    let info = runtime.block_on(engine.load(1, &folder)).unwrap_or_else(|e| panic!("load: {e}"));
    assert_eq!(info.kind, ModelKind::Embedding);
    let Frontend::Embedding(frontend) = &info.frontend else { panic!("expected an embedding frontend") };
    assert!(frontend.cross_encoder);
    let max_tokens = fixture["meta"]["max_tokens"].as_u64().unwrap() as usize;
    assert_eq!(frontend.max_tokens, max_tokens);

    let mut inputs = Vec::new();
    for (index, pair) in fixture["pairs"].as_array().unwrap().iter().enumerate() {
        let (query, document) = (pair["query"].as_str().unwrap(), pair["document"].as_str().unwrap());
        let ours = frontend.encode_pair(query, document).unwrap();
        assert_eq!(ours, encode_pair(&frontend.tokenizer, query, document, max_tokens).unwrap());
        assert_eq!(ours.ids, ids(&pair["ids"]), "pair {index}: token ids");
        assert_eq!(ours.type_ids, ids(&pair["type_ids"]), "pair {index}: token type ids");
        inputs.push(ours);
    }
    assert!(inputs.iter().any(|p| p.ids.len() == max_tokens), "the long document is cut to the window");

    let expected = floats(&model(&fixture, "one_label")["scores"]);
    let scores = runtime.block_on(engine.score_pairs(1, inputs.clone())).unwrap();
    let diff = scores.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    eprintln!("one_label: max |score diff| {diff:.2e}; ours {scores:?}, transformers {expected:?}");
    assert_eq!(scores.len(), expected.len());
    assert!(diff <= TOLERANCE, "scores differ by {diff}: ours {scores:?}, transformers {expected:?}");
    for group in fixture["groups"].as_array().unwrap() {
        let group: Vec<usize> = group.as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as usize).collect();
        assert_eq!(ranking(&scores, &group), ranking(&expected, &group), "document order for {:?}", fixture["pairs"][group[0]]["query"]);
    }

    // Order of the inputs does not matter (the engine sorts by length and pads), nor does a
    // pair scored alone.
    let reversed: Vec<PairInput> = inputs.iter().rev().cloned().collect();
    let mut again = runtime.block_on(engine.score_pairs(1, reversed)).unwrap();
    again.reverse();
    for (a, b) in again.iter().zip(&scores) {
        assert!((a - b).abs() <= 1e-5, "reversed batch: {again:?} vs {scores:?}");
    }
    let alone = runtime.block_on(engine.score_pairs(1, vec![inputs[0].clone()])).unwrap();
    assert!((alone[0] - scores[0]).abs() <= 1e-5, "alone {} vs batched {}", alone[0], scores[0]);
    assert!(runtime.block_on(engine.score_pairs(1, Vec::new())).unwrap().is_empty());

    // Token types matter: the same ids all as type 0 score differently.
    let flat: Vec<PairInput> = inputs.iter().map(|p| PairInput { ids: p.ids.clone(), type_ids: vec![0; p.ids.len()] }).collect();
    let untyped = runtime.block_on(engine.score_pairs(1, flat)).unwrap();
    assert!(untyped.iter().zip(&scores).any(|(a, b)| (a - b).abs() > 1e-3), "token type ids are ignored");

    // A cross-encoder does not embed single texts: a clear error.
    let error = runtime.block_on(engine.embed(1, vec![inputs[0].ids.clone()])).unwrap_err().to_string();
    assert!(error.contains("cross-encoder"), "{error}");
    // Malformed pairs are refused.
    let bad = PairInput { ids: vec![101, 102], type_ids: vec![0] };
    assert!(runtime.block_on(engine.score_pairs(1, vec![bad])).is_err());
    engine.shutdown();
}

/// A two-label model scores with the logit of label 1; a plain BERT embedding model (no
/// head) refuses to score.
#[test]
fn two_label_reranker_uses_label_one_and_plain_bert_refuses_to_score() {
    let _guard = mlx_lock();
    let fixture = fixture();
    let root = tempfile::tempdir().unwrap();
    let variant = model(&fixture, "two_labels");
    let dir = root.path().join("two");
    write_reranker(&fixture, variant, &dir);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let engine = engine();
    runtime.block_on(engine.load(2, &dir)).unwrap_or_else(|e| panic!("load: {e}"));
    let inputs: Vec<PairInput> =
        fixture["pairs"].as_array().unwrap().iter().map(|p| PairInput { ids: ids(&p["ids"]), type_ids: ids(&p["type_ids"]) }).collect();
    let scores = runtime.block_on(engine.score_pairs(2, inputs.clone())).unwrap();
    let expected = floats(&variant["scores"]);
    assert_eq!(variant["score_label"], 1);
    let label_one: Vec<f32> = variant["logits"].as_array().unwrap().iter().map(|row| row[1].as_f64().unwrap() as f32).collect();
    assert_eq!(expected, label_one);
    let diff = scores.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    eprintln!("two_labels: max |score diff| {diff:.2e}");
    assert!(diff <= TOLERANCE, "scores differ by {diff}: ours {scores:?}, transformers {expected:?}");

    // The same encoder declared as a plain BertModel: an embedding model without a head.
    let plain = root.path().join("plain");
    write_reranker(&fixture, variant, &plain);
    let mut config = variant["config"].clone();
    config["architectures"] = serde_json::json!(["BertModel"]);
    std::fs::write(plain.join("config.json"), config.to_string()).unwrap();
    let info = runtime.block_on(engine.load(3, &plain)).unwrap();
    let Frontend::Embedding(frontend) = &info.frontend else { panic!("expected an embedding frontend") };
    assert!(!frontend.cross_encoder);
    let error = runtime.block_on(engine.score_pairs(3, inputs[..1].to_vec())).unwrap_err().to_string();
    assert!(error.contains("not a cross-encoder"), "{error}");
    assert_eq!(runtime.block_on(engine.embed(3, vec![inputs[0].ids.clone()])).unwrap()[0].len(), 32);
    engine.shutdown();
}

/// `pull` refuses a folder that says BertForSequenceClassification but has no classifier.
#[test]
fn pull_refuses_a_reranker_without_its_head() {
    let fixture = fixture();
    let root = tempfile::tempdir().unwrap();
    let mut variant = model(&fixture, "one_label").clone();
    let tensors: Vec<Value> = variant["tensors"].as_array().unwrap().iter().filter(|t| !t["name"].as_str().unwrap().starts_with("classifier.")).cloned().collect();
    variant["tensors"] = Value::Array(tensors);
    let dir = root.path().join("headless");
    write_reranker(&fixture, &variant, &dir);
    let home = Home::new();
    let output = home.run(&["pull", dir.to_str().unwrap(), "--name", "headless"]);
    let said = format!("{}{}", stdout(&output), stderr(&output));
    assert!(!output.status.success() && said.contains("classifier.weight"), "{said}");
    assert!(!stdout(&home.run(&["list"])).contains("headless"));
}
