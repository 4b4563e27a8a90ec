//! Every supported model family against mlx-lm, the independent reference.
//!
//! `scripts/reference/make_family_references.py` built a tiny random-weight model of each
//! family with mlx-lm's own model classes and recorded its greedy tokens and logits in
//! `tests/fixtures/reference/families/`. The weights themselves are not stored: each fixture
//! holds a recipe (a seeded generator per tensor) that this test replays bit for bit into a
//! Hugging Face folder, which the engine then loads like any pulled model.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use mlx_rs::Dtype;
use mlxserver::config::{CpuDtype, EngineConfig};
use mlxserver::engine::decoder::SequenceSlot;
use mlxserver::engine::device::{Backend, DevicePolicy};
use mlxserver::engine::loader::{self, LoadedModel};
use mlxserver::engine::nn::BatchCache;
use mlxserver::engine::Engine;
use serde_json::{json, Value};

use crate::engine_reference::{greedy, mlx_lock};

fn fixtures() -> Vec<(String, Value)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference/families");
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).map(|e| e.unwrap().path()).collect();
    entries.sort();
    entries
        .into_iter()
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (p.file_stem().unwrap().to_string_lossy().into_owned(), serde_json::from_str(&text).unwrap())
        })
        .collect()
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The recipe's values: `offset + scale * (2u - 1)` in f64, rounded to f32, with
/// `u = (splitmix64(seed + i) >> 40) / 2^24`.
pub fn recipe_values(tensor: &Value) -> (Vec<usize>, Vec<f32>) {
    let shape: Vec<usize> = tensor["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
    let count: usize = shape.iter().product();
    let seed = tensor["seed"].as_u64().unwrap();
    let offset = tensor["offset"].as_f64().unwrap();
    let scale = tensor["scale"].as_f64().unwrap();
    let values = (0..count as u64)
        .map(|i| {
            let u = (splitmix64(seed.wrapping_add(i)) >> 40) as f64 / (1u64 << 24) as f64;
            (offset + scale * (2.0 * u - 1.0)) as f32
        })
        .collect();
    (shape, values)
}

/// A word-level tokenizer over the model's vocabulary (`w0`, `w1`, ...), so prompts and
/// answers are text like any model's.
fn tokenizer_json(vocab_size: usize) -> Value {
    let vocab: serde_json::Map<String, Value> = (0..vocab_size).map(|i| (format!("w{i}"), json!(i))).collect();
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}
    })
}

/// Writes the fixture's model as a Hugging Face folder under `dir`.
pub fn write_family_folder(fixture: &Value, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut buffers: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for tensor in fixture["tensors"].as_array().unwrap() {
        let (shape, values) = recipe_values(tensor);
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        buffers.push((tensor["name"].as_str().unwrap().to_string(), shape, bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = buffers
        .iter()
        .map(|(name, shape, bytes)| (name.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let mut config = fixture["config"].clone();
    config["torch_dtype"] = json!("float32");
    write_config_and_tokenizer(&config, dir);
}

/// config.json, tokenizer.json and tokenizer_config.json of a family folder.
fn write_config_and_tokenizer(config: &Value, dir: &Path) {
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(config).unwrap()).unwrap();
    let vocab = config["vocab_size"].as_u64().unwrap() as usize;
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json(vocab).to_string()).unwrap();
    let template = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";
    std::fs::write(dir.join("tokenizer_config.json"), json!({"chat_template": template, "eos_token": "w0"}).to_string()).unwrap();
}

fn ids(value: &Value) -> Vec<u32> {
    value.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

fn floats(value: &Value) -> Vec<f32> {
    value.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect()
}

fn load(path: &Path, policy: DevicePolicy) -> mlxserver::engine::decoder::DecoderModel {
    match loader::load(path, policy).unwrap_or_else(|e| panic!("{}: {e}", path.display())) {
        LoadedModel::Chat { model, .. } => model,
        LoadedModel::Embedding { .. } => panic!("expected a chat model"),
    }
}

/// First-step logits and `steps` greedy tokens through the engine's own paths: prefill of
/// the prompt, then batched decode steps.
pub fn run_model(model: &mlxserver::engine::decoder::DecoderModel, prompt: &[u32], steps: usize) -> (Vec<f32>, Vec<u32>, Dtype) {
    let mut cache = model.new_cache();
    let input: Vec<i32> = prompt.iter().map(|&t| t as i32).collect();
    let logits = model.forward(&mlx_rs::Array::from_slice(&input, &[1, input.len() as i32]), &mut SequenceSlot { cache: &mut cache }).unwrap();
    let dtype = logits.dtype();
    let first = logits.as_dtype(Dtype::Float32).unwrap();
    first.eval().unwrap();
    let first: Vec<f32> = first.as_slice::<f32>().to_vec();
    let argmax = |row: &[f32]| row.iter().enumerate().fold((0usize, f32::NEG_INFINITY), |best, (i, v)| if *v > best.1 { (i, *v) } else { best }).0 as u32;
    let mut tokens = vec![argmax(&first)];
    let mut batch = BatchCache::default();
    batch.push(&cache).unwrap();
    while tokens.len() < steps {
        let last = *tokens.last().unwrap() as i32;
        let logits = model.decode_batched(&mlx_rs::Array::from_slice(&[last], &[1, 1]), &mut batch).unwrap().as_dtype(Dtype::Float32).unwrap();
        logits.eval().unwrap();
        tokens.push(argmax(logits.as_slice::<f32>()));
    }
    (first, tokens, dtype)
}

/// Largest |a - b|; a NaN anywhere is an infinite difference (f32::max would skip it).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "logit counts differ");
    a.iter().zip(b).map(|(x, y)| if x.is_nan() || y.is_nan() { f32::INFINITY } else { (x - y).abs() }).fold(0.0, f32::max)
}

/// Tokens must agree up to the first step whose reference margin is too small to decide.
pub fn check_tokens(name: &str, ours: &[u32], expected: &[u32], margins: &[f64], tolerance: f64) {
    for (step, (a, b)) in ours.iter().zip(expected).enumerate() {
        if a != b {
            let margin = margins.get(step).copied().unwrap_or(0.0);
            assert!(margin < tolerance, "{name}: token {step} is {a}, the reference chose {b} with a margin of {margin} (ours {ours:?}, expected {expected:?})");
            return;
        }
    }
}

#[test]
fn every_family_matches_mlx_lm_in_float32() {
    let _guard = mlx_lock();
    let fixtures = fixtures();
    assert!(fixtures.len() >= 10, "expected a fixture per family, found {}", fixtures.len());
    let root = tempfile::tempdir().unwrap();
    let policy = DevicePolicy::new(Backend::Cpu, CpuDtype::Float32);
    let mut report = Vec::new();
    for (name, fixture) in &fixtures {
        let dir = root.path().join(name);
        write_family_folder(fixture, &dir);
        let model = load(&dir, policy);
        let expected_ids = ids(&fixture["greedy_ids"]);
        let (first, tokens, dtype) = run_model(&model, &ids(&fixture["prompt_ids"]), expected_ids.len());
        assert_eq!(dtype, Dtype::Float32, "{name}");
        let reference = floats(&fixture["first_logits"]);
        let diff = max_abs_diff(&first, &reference);
        let spread = reference.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        report.push(format!("{name}: max |logit diff| {diff:.2e} (logits up to {spread:.1}), tokens {:?}", tokens == expected_ids));
        assert!(diff <= 2e-4 * spread.max(1.0), "{name}: first-step logits differ by {diff} from mlx-lm's");
        let margins: Vec<f64> = fixture["margins"].as_array().unwrap().iter().map(|m| m.as_f64().unwrap()).collect();
        check_tokens(name, &tokens, &expected_ids, &margins, 1e-3);
    }
    eprintln!("{}", report.join("\n"));
}

#[test]
fn quantized_families_match_mlx_lm_quantized() {
    let _guard = mlx_lock();
    let root = tempfile::tempdir().unwrap();
    let policy = DevicePolicy::new(Backend::Cpu, CpuDtype::Float32);
    let mut checked = 0;
    for (name, fixture) in fixtures() {
        let Some(quantized) = fixture.get("quantized").filter(|q| q.is_object()) else { continue };
        let bits = quantized["bits"].as_i64().unwrap() as i32;
        let group = quantized["group_size"].as_i64().unwrap() as i32;
        let (_, out) = family_and_quantized_folders(root.path(), &name, &fixture, "q", bits, group);
        let model = load(&out, policy);
        let expected_ids = ids(&quantized["greedy_ids"]);
        let (first, tokens, _) = run_model(&model, &ids(&fixture["prompt_ids"]), expected_ids.len());
        let reference = floats(&quantized["first_logits"]);
        let diff = max_abs_diff(&first, &reference);
        let spread = reference.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        eprintln!("{name} {bits}-bit: max |logit diff| {diff:.2e}, tokens equal: {}", tokens == expected_ids);
        assert!(diff <= 5e-4 * spread.max(1.0), "{name}: quantized first-step logits differ by {diff}");
        assert_eq!(tokens.first(), expected_ids.first(), "{name}: first quantized token");
        checked += 1;
    }
    assert!(checked >= 3, "only {checked} quantized references");
}

/// A long prompt evaluated in pieces of layers (what a GPU does to bound its temporaries) gives
/// the same logits and caches as one graph over every layer, window masks included.
#[test]
fn prompt_in_pieces_of_layers_gives_the_same_answer() {
    let _guard = mlx_lock();
    let root = tempfile::tempdir().unwrap();
    let prompt: Vec<i32> = (0..80).map(|i| 1 + (i * 37) % 500).collect();
    for (name, fixture) in fixtures().into_iter().filter(|(name, _)| ["llama", "gemma2", "exaone4"].contains(&name.as_str())) {
        let dir = root.path().join(&name);
        write_family_folder(&fixture, &dir);
        let mut model = load(&dir, DevicePolicy::new(Backend::Cpu, CpuDtype::Float32));
        let mut outputs = Vec::new();
        for piece in [None, Some(1)] {
            model.prompt_piece_layers = piece;
            let mut cache = model.new_cache();
            let first = model.forward(&mlx_rs::Array::from_slice(&prompt, &[1, prompt.len() as i32]), &mut SequenceSlot { cache: &mut cache }).unwrap();
            let next = model.forward(&mlx_rs::Array::from_slice(&[7i32], &[1, 1]), &mut SequenceSlot { cache: &mut cache }).unwrap();
            let (keys, _) = cache[0].filled().unwrap();
            outputs.push([first, next, keys].map(|a| a.as_dtype(Dtype::Float32).unwrap().reshape(&[-1]).unwrap().as_slice::<f32>().to_vec()));
        }
        assert!(outputs[0] == outputs[1], "{name}: evaluating the prompt in pieces changed the answer");
    }
}

/// The GPU dtype policy forced on the CPU: every family computes in bfloat16 from end to end
/// (no silent float32 promotion), keys and values included.
#[test]
fn gpu_policy_keeps_one_dtype_through_the_forward_pass() {
    let _guard = mlx_lock();
    let root = tempfile::tempdir().unwrap();
    let gpu_like = DevicePolicy::new(Backend::Cuda, CpuDtype::Float32);
    for (name, fixture) in fixtures() {
        let dir = root.path().join(&name);
        write_family_folder(&fixture, &dir);
        let model = load(&dir, gpu_like);
        assert_eq!(model.dtype, Dtype::Bfloat16, "{name}");
        for array in model.arrays() {
            assert!(matches!(array.dtype(), Dtype::Bfloat16 | Dtype::Uint32), "{name}: a weight is {:?}", array.dtype());
        }
        let mut cache = model.new_cache();
        let logits = model.forward(&mlx_rs::Array::from_slice(&[1i32, 2, 3, 4], &[1, 4]), &mut SequenceSlot { cache: &mut cache }).unwrap();
        assert_eq!(logits.dtype(), Dtype::Bfloat16, "{name}: prefill logits");
        for layer in &cache {
            for array in layer.arrays() {
                assert_eq!(array.dtype(), Dtype::Bfloat16, "{name}: key/value cache");
            }
        }
        let mut batch = BatchCache::default();
        batch.push(&cache).unwrap();
        batch.push(&cache).unwrap();
        let logits = model.decode_batched(&mlx_rs::Array::from_slice(&[5i32, 6], &[2, 1]), &mut batch).unwrap();
        assert_eq!(logits.dtype(), Dtype::Bfloat16, "{name}: decode logits");
        // MLX's CPU backend has gather_mm for float32 only; the dtypes above are the graph's.
        if model.config.moe.is_none() {
            logits.eval().unwrap();
        }
    }
}

/// A family model served end to end: greedy tokens through the engine's scheduler (prefill,
/// batched decode, two sequences at once) equal mlx-lm's.
#[test]
fn engine_serves_family_models_batched() {
    let _guard = mlx_lock();
    let root = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let engine = Engine::start(EngineConfig { prefix_cache_bytes: 0, ..Default::default() });
    let mut loaded: HashMap<String, (u64, Value)> = HashMap::new();
    for (index, (name, fixture)) in fixtures().into_iter().enumerate() {
        if !["gemma3_text", "qwen3_moe", "phi3"].contains(&name.as_str()) {
            continue;
        }
        let dir = root.path().join(&name);
        write_family_folder(&fixture, &dir);
        let id = 100 + index as u64;
        runtime.block_on(engine.load(id, &dir)).unwrap_or_else(|e| panic!("{name}: {e}"));
        loaded.insert(name, (id, fixture));
    }
    assert_eq!(loaded.len(), 3, "fixtures for gemma3_text, qwen3_moe and phi3");
    for (name, (id, fixture)) in &loaded {
        let expected = ids(&fixture["greedy_ids"]);
        let margins: Vec<f64> = fixture["margins"].as_array().unwrap().iter().map(|m| m.as_f64().unwrap()).collect();
        let (tokens, _, _) = greedy(&engine, &runtime, *id, ids(&fixture["prompt_ids"]), expected.len());
        check_tokens(name, &tokens, &expected, &margins, 1e-3);
    }
    engine.shutdown();
}

#[test]
fn unknown_family_is_a_clear_error_naming_the_supported_ones() {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("config.json"), r#"{"model_type": "falcon_mamba", "hidden_size": 64}"#).unwrap();
    let error = loader::load(root.path(), DevicePolicy::new(Backend::Cpu, CpuDtype::Float32)).err().expect("an error");
    let text = error.to_string();
    assert!(text.contains("falcon_mamba") && text.contains("gemma3_text") && text.contains("phi3"), "{text}");
}

/// The seed's own first example: `pull mlx-community/Phi-3-mini-4k-instruct-8bit` from a Hub
/// (the stand-in server of the Hub tests, serving a tiny 8-bit phi3 under that name), then
/// `run` answers.
#[test]
fn pull_phi3_8bit_from_the_hub_then_run_answers() {
    let _guard = mlx_lock();
    let root = tempfile::tempdir().unwrap();
    let fixture = fixtures().into_iter().find(|(name, _)| name == "phi3").expect("phi3 fixture").1;
    let (_, quantized) = family_and_quantized_folders(root.path(), "phi3", &fixture, "8bit", 8, 64);
    let hub = std::sync::Arc::new(crate::hub::Hub::default());
    hub.repos
        .lock()
        .unwrap()
        .insert("mlx-community/Phi-3-mini-4k-instruct-8bit".into(), std::sync::Arc::new(crate::hub::Repo { files: crate::hub::folder_files(&quantized) }));
    let endpoint = crate::hub::start_hub(hub);
    let home = crate::common::Home::new();
    let output = crate::hub::pull(&home, &endpoint, &["mlx-community/Phi-3-mini-4k-instruct-8bit"]);
    let said = crate::common::stdout(&output);
    assert!(output.status.success(), "{}\n{}", said, crate::common::stderr(&output));
    let name = said.lines().find_map(|l| l.strip_prefix("Added ")).map(|n| n.split_whitespace().next().unwrap_or_default().to_string()).expect("Added NAME");
    let show = home.run(&["show", &name]);
    let shown = crate::common::stdout(&show);
    assert!(shown.contains("family: phi3") && shown.contains("quantization"), "{shown}");
    let answer = home.run(&["run", &name, "w5 w6 w7"]);
    let text = crate::common::stdout(&answer);
    assert!(answer.status.success(), "{text}\n{}", crate::common::stderr(&answer));
    assert!(text.split_whitespace().any(|w| w.starts_with('w')), "no answer: {text:?}");
}

/// A folder with random bytes for weights is refused by `pull` with the first problem named,
/// and nothing is listed or left behind.
#[test]
fn pull_refuses_a_broken_model_before_listing_it() {
    let root = tempfile::tempdir().unwrap();
    let garbage = root.path().join("garbage");
    std::fs::create_dir_all(&garbage).unwrap();
    std::fs::write(garbage.join("config.json"), r#"{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 512}"#).unwrap();
    let noise: Vec<u8> = (0..100_000u32).map(|i| (splitmix64(u64::from(i)) >> 56) as u8).collect();
    std::fs::write(garbage.join("model.safetensors"), noise).unwrap();
    let home = crate::common::Home::new();
    let output = home.run(&["pull", garbage.to_str().unwrap(), "--name", "garbage"]);
    let said = format!("{}{}", crate::common::stdout(&output), crate::common::stderr(&output));
    assert!(!output.status.success(), "{said}");
    assert!(said.contains("model.safetensors") && said.contains("not a safetensors file"), "{said}");
    let listed = crate::common::stdout(&home.run(&["list"]));
    assert!(!listed.contains("garbage"), "{listed}");
    let models = home.path().join("models");
    let left: Vec<String> = std::fs::read_dir(&models).map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect()).unwrap_or_default();
    assert!(left.iter().all(|name| !name.contains("garbage")), "left behind: {left:?}");

    // A truncated copy of a real model (the phi3 fixture) is refused as well.
    let fixture = fixtures().into_iter().find(|(name, _)| name == "phi3").unwrap().1;
    let cut = root.path().join("cut");
    write_family_folder(&fixture, &cut);
    let weights = std::fs::read(cut.join("model.safetensors")).unwrap();
    std::fs::write(cut.join("model.safetensors"), &weights[..weights.len() / 2]).unwrap();
    let output = home.run(&["pull", cut.to_str().unwrap(), "--name", "cut"]);
    let said = format!("{}{}", crate::common::stdout(&output), crate::common::stderr(&output));
    assert!(!output.status.success() && said.contains("truncated"), "{said}");

    // A quantization mode other than affine (gpt-oss folders use "mxfp4") is refused by name
    // rather than read as affine weights.
    let (_, quantized) = family_and_quantized_folders(root.path(), "phi3", &fixture, "4bit", 4, 64);
    let config_path = quantized.join("config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["quantization"]["mode"] = Value::from("mxfp4");
    std::fs::write(&config_path, serde_json::to_string(&config).unwrap()).unwrap();
    let output = home.run(&["pull", quantized.to_str().unwrap(), "--name", "mxfp4"]);
    let said = format!("{}{}", crate::common::stdout(&output), crate::common::stderr(&output));
    assert!(!output.status.success() && said.contains("\"mxfp4\" mode") && said.contains("affine"), "{said}");
    assert!(!crate::common::stdout(&home.run(&["list"])).contains("mxfp4"));
}

// ---------------------------------------------------------------------------------------
// Every family from the other layouts a model arrives in: Hugging Face bfloat16 in shards,
// MLX-community 8-bit, and per-layer mixed quantization (config.json overrides).

/// float32 to bfloat16 bits, rounding to nearest even (what `mx.astype(bfloat16)` and
/// PyTorch's `.to(torch.bfloat16)` do; the recipe has no NaNs).
fn bf16_bits(value: f32) -> u16 {
    let bits = value.to_bits();
    ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) as u16
}

/// The fixture's model cast to bfloat16, written in Hugging Face's sharded layout: the
/// shards the fixture names (`model-0000N-of-00002.safetensors`, tensors split as mlx-lm's
/// reference run had them) and a `model.safetensors.index.json` mapping each tensor to its
/// shard.
fn write_bf16_sharded_folder(fixture: &Value, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let tensors: HashMap<&str, &Value> = fixture["tensors"].as_array().unwrap().iter().map(|t| (t["name"].as_str().unwrap(), t)).collect();
    let shards = fixture["bfloat16"]["shards"].as_object().expect("bfloat16.shards");
    assert!(shards.len() >= 2, "expected at least two shards");
    let mut weight_map = serde_json::Map::new();
    let mut total_size = 0usize;
    let mut written = 0usize;
    for (file, names) in shards {
        let mut buffers: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for name in names.as_array().unwrap() {
            let name = name.as_str().unwrap();
            let (shape, values) = recipe_values(tensors[name]);
            let bytes: Vec<u8> = values.iter().flat_map(|v| bf16_bits(*v).to_le_bytes()).collect();
            total_size += bytes.len();
            weight_map.insert(name.to_string(), json!(file));
            buffers.push((name.to_string(), shape, bytes));
        }
        written += buffers.len();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = buffers
            .iter()
            .map(|(name, shape, bytes)| (name.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, shape.clone(), bytes).unwrap()))
            .collect();
        let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
        safetensors::serialize_to_file(views, metadata, &dir.join(file)).unwrap();
    }
    assert_eq!(written, tensors.len(), "the shards hold every tensor once");
    let index = json!({"metadata": {"total_size": total_size}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), serde_json::to_string_pretty(&index).unwrap()).unwrap();
    let mut config = fixture["config"].clone();
    config["torch_dtype"] = json!("bfloat16");
    write_config_and_tokenizer(&config, dir);
}

fn margins_of(reference: &Value) -> Vec<f64> {
    reference["margins"].as_array().unwrap().iter().map(|m| m.as_f64().unwrap()).collect()
}

/// Leading tokens equal to the reference's.
fn agreeing(ours: &[u32], expected: &[u32]) -> usize {
    ours.iter().zip(expected).take_while(|(a, b)| a == b).count()
}

/// Runs `model` on the fixture's prompt and compares with `reference` (greedy_ids,
/// first_logits, margins): logits within `relative * max(|logit|, 1)`, tokens equal up to
/// the first step whose reference margin is below `margin`. Returns a report line.
fn compare(label: &str, model: &mlxserver::engine::decoder::DecoderModel, fixture: &Value, reference: &Value, relative: f32, margin: f64) -> String {
    let expected = ids(&reference["greedy_ids"]);
    let (first, tokens, _) = run_model(model, &ids(&fixture["prompt_ids"]), expected.len());
    let wanted = floats(&reference["first_logits"]);
    let diff = max_abs_diff(&first, &wanted);
    let spread = wanted.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let line = format!("{label}: max |logit diff| {diff:.2e} (logits up to {spread:.1}), tokens {}/{}", agreeing(&tokens, &expected), expected.len());
    eprintln!("{line}");
    assert!(diff <= relative * spread.max(1.0), "{label}: first-step logits differ by {diff} from the reference's (allowed {})", relative * spread.max(1.0));
    check_tokens(label, &tokens, &expected, &margins_of(reference), margin);
    line
}

/// Hugging Face bfloat16 checkpoints in two shards with an index, for every family.
///
/// Two comparisons. (1) Loaded with the CPU float32 policy, the bfloat16 weights are upcast
/// exactly, so the numbers must equal mlx-lm's run of the same loaded model after
/// `set_dtype(float32)` as tightly as the float32 test (2e-4 of the logit range): this pins
/// the shard/index reading and the bf16 decoding bit for bit, MoE families included.
/// (2) Loaded with the bfloat16 CPU policy, we compute in bfloat16 end to end like mlx-lm
/// run in bfloat16 (not for MoE families: MLX's CPU gather_mm is float32-only, in mlx-lm as
/// here). One bf16 ulp is 2^-8 of a value: 0.0625 for logits in [8, 16), and mlx-lm's own bf16
/// logits differ from its f32 ones by ~1.5% of the range, so a loose bound (3% of the range)
/// would pass anything that is "bf16-close". It also passed three real mismatches this test
/// found (fixed): granite multiplying by 1/logits_scaling (1 ulp), gemma's GELU computing x^3
/// as x*x*x (1.5 ulps, greedy path diverged at step 2 on a tie), qwen2's matmul-then-add bias
/// (3 ulps). With those fixed every family agrees with mlx-lm bit for bit (up to the
/// fixture's 5-decimal rounding), the same ops in the same order on the same MLX CPU
/// kernels. So logits must agree within 5e-3 of the range (under one ulp of the top logits:
/// any single different rounding that reaches the output fails), and tokens until mlx-lm's
/// top-2 margin falls below 0.125 (two bf16 ulps of a logit in [4, 8); bf16 margins are often
/// exact ties).
#[test]
fn every_family_loads_sharded_bfloat16_like_mlx_lm() {
    let _guard = mlx_lock();
    let root = tempfile::tempdir().unwrap();
    let mut report = Vec::new();
    for (name, fixture) in fixtures() {
        let reference = fixture.get("bfloat16").filter(|r| r.is_object()).unwrap_or_else(|| panic!("{name}: no bfloat16 reference"));
        let dir = root.path().join(format!("{name}-bf16"));
        write_bf16_sharded_folder(&fixture, &dir);
        let upcast = load(&dir, DevicePolicy::new(Backend::Cpu, CpuDtype::Float32));
        assert_eq!(upcast.dtype, Dtype::Float32, "{name}");
        report.push(compare(&format!("{name} bf16 sharded, f32 compute"), &upcast, &fixture, &reference["f32_compute"], 2e-4, 1e-3));
        drop(upcast);
        if let Some(bf16) = reference.get("bf16_compute").filter(|r| r.is_object()) {
            let model = load(&dir, DevicePolicy::new(Backend::Cpu, CpuDtype::Bfloat16));
            assert_eq!(model.dtype, Dtype::Bfloat16, "{name}");
            report.push(compare(&format!("{name} bf16 sharded, bf16 compute"), &model, &fixture, bf16, 5e-3, 0.125));
        } else {
            assert!(fixture["config"]["model_type"].as_str().is_some_and(|t| t.contains("moe") || t == "mixtral"), "{name}: no bf16_compute reference");
        }
    }
    eprintln!("{}", report.join("\n"));
}

/// Every family quantized to 8 bits, group 64 (MLX-community's "-8bit" folders) by our
/// converter, against mlx-lm's quantize_model(model, config, 64, 8). The quantized tensors
/// are bit-identical to mlx-lm's (the script checks its side against a numpy port of MLX's
/// quantizer, and ours is MLX's), so the same tolerance as the 4-bit test applies.
#[test]
fn every_family_8bit_matches_mlx_lm_8bit() {
    let _guard = mlx_lock();
    let root = tempfile::tempdir().unwrap();
    let policy = DevicePolicy::new(Backend::Cpu, CpuDtype::Float32);
    let mut report = Vec::new();
    for (name, fixture) in fixtures() {
        let reference = fixture.get("quantized_8bit").filter(|r| r.is_object()).unwrap_or_else(|| panic!("{name}: no 8-bit reference"));
        assert_eq!((reference["bits"].as_i64(), reference["group_size"].as_i64()), (Some(8), Some(64)), "{name}");
        let (_, out) = family_and_quantized_folders(root.path(), &name, &fixture, "8bit", 8, 64);
        let model = load(&out, policy);
        report.push(compare(&format!("{name} 8-bit g64"), &model, &fixture, reference, 5e-4, 1e-3));
    }
    eprintln!("{}", report.join("\n"));
}

/// Every family on this machine's GPU (CUDA or Metal) as the server runs it: a float32
/// checkpoint computes in the GPU's half-precision dtype, a 4-bit one stays quantized.
/// References: on CUDA the bfloat16 run compares with mlx-lm's own bfloat16 run on an H200
/// (tests/fixtures/reference/gpu-bf16, scripts/reference/make_gpu_bf16_references.py); elsewhere
/// with mlx-lm's CPU run in bfloat16 where there is one (MLX's CPU has no bfloat16 gather_mm,
/// so the MoE families compare with float32); the 4-bit folder with mlx-lm's 4-bit reference.
/// GPU kernels sum in another order than the CPU's, so this is a half-precision-close check:
/// logits within 5% of their range, tokens equal until the reference's top-2 margin falls below
/// 0.25 (two bfloat16 ulps of a logit in [8, 16)). The 4-bit run computes in bfloat16 against a
/// float32-compute reference, so it inherits the family's own bfloat16 deviation: mlx-lm's run
/// on the H200 is 13% of the range from float32 for the tiny mixtral (a bfloat16 tie in its
/// router: ours shows the same 1.3026) and 5.3% for granite (its multipliers), so the 4-bit
/// bound is 1.25 times that deviation where it exceeds 5%. Needs a GPU; the device machine runs
/// it (`bench/gpu/remote.sh families`).
#[test]
#[ignore = "needs a GPU: bench/gpu/remote.sh families"]
fn every_family_on_this_machines_gpu() {
    // Measured on an H200 (bfloat16, against mlx-lm's CPU bfloat16 run): 0.9-3.6% of the
    // logit range (granite the widest).
    const TOLERANCE: f32 = 0.05;
    let _guard = mlx_lock();
    let backend = mlxserver::engine::device::detect();
    assert_ne!(backend, Backend::Cpu, "MLX offers no GPU in this process");
    // MLX's quantized matmul alone, GPU against CPU, at the tiny models' widths and real ones:
    // tells a kernel problem at some width from one of the model code. Reported, not
    // asserted: it is MLX's (64 columns are wrong on CUDA with MLX 0.32.4; the loader keeps
    // such weights dense there, WeightPolicy::dense_below_width).
    let mut failures = Vec::new();
    let mut kernels = Vec::new();
    // MLXSERVER_GPU_FAMILIES=a,b runs only those families and skips the kernel probe (each
    // new kernel shape is compiled on first use, tens of seconds on a fresh machine).
    let only: Option<Vec<String>> = std::env::var("MLXSERVER_GPU_FAMILIES").ok().filter(|v| !v.is_empty()).map(|v| v.split(',').map(str::to_string).collect());
    let probes: &[(i32, i32, i32)] = if only.is_some() { &[] } else { &[(12, 64, 32), (12, 64, 128), (1, 64, 128), (12, 128, 256), (1, 128, 256), (12, 4096, 512), (1, 4096, 512)] };
    for &(rows, width, out) in probes {
        let weight = mlx_rs::random::normal::<f32>(&[out, width], None, None, None).unwrap();
        let x = mlx_rs::random::normal::<f32>(&[rows, width], None, None, None).unwrap();
        let (w, scales, biases) = mlx_rs::ops::quantize(&weight, 64, 4).unwrap();
        mlxserver::engine::device::activate(Backend::Cpu);
        let cpu = mlx_rs::ops::quantized_matmul(&x, &w, &scales, &biases, true, 64, 4).unwrap();
        cpu.eval().unwrap();
        mlxserver::engine::device::activate(backend);
        let half = |a: &mlx_rs::Array| a.as_dtype(Dtype::Bfloat16).unwrap();
        let gpu = mlx_rs::ops::quantized_matmul(&half(&x), &w, &half(&scales), &half(&biases), true, 64, 4).unwrap().as_dtype(Dtype::Float32).unwrap();
        gpu.eval().unwrap();
        let (c, g) = (cpu.as_slice::<f32>().to_vec(), gpu.as_slice::<f32>().to_vec());
        let diff = max_abs_diff(&g, &c);
        let spread = c.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let finite = g.iter().all(|v| v.is_finite());
        let right = finite && diff <= 0.03 * spread.max(1.0);
        kernels.push(format!("MLX quantized_matmul [{rows}, {width}] x [{out}, {width}]^T 4-bit g64 on {}: max |diff| {diff:.3e} of {spread:.1}{}", backend.name(), if right { "" } else { ", WRONG" }));
    }
    eprintln!("{}", kernels.join("\n"));
    let policy = DevicePolicy::new(backend, CpuDtype::Float32);
    let half = if backend == Backend::Metal { Dtype::Float16 } else { Dtype::Bfloat16 };
    let root = tempfile::tempdir().unwrap();
    let mut report = Vec::new();
    let families: Vec<(String, Value)> = fixtures().into_iter().filter(|(name, _)| only.as_ref().is_none_or(|only| only.contains(name))).collect();
    for (name, fixture) in &families {
        let (source, out) = family_and_quantized_folders(root.path(), name, fixture, "4bit", 4, 64);
        let gpu_bf16 = (backend == Backend::Cuda).then(|| side_reference("gpu-bf16", name, fixture));
        let bf16_reference = gpu_bf16.clone().unwrap_or_else(|| fixture["bfloat16"].get("bf16_compute").filter(|r| r.is_object()).unwrap_or(fixture).clone());
        let bf16_deviation = gpu_bf16.as_ref().and_then(|r| r["float32_reference_diff_of_range"].as_f64()).unwrap_or(0.0) as f32;
        // (label, folder, reference, the compute dtype the float32 checkpoint must get, bound)
        let runs = [
            (format!("{name} on {}, {half:?}", backend.name()), source, bf16_reference, Some(half), TOLERANCE),
            (format!("{name} 4-bit g64 on {}", backend.name()), out, side_reference("families-4bit", name, fixture), None, TOLERANCE.max(1.25 * bf16_deviation)),
        ];
        for (label, folder, reference, dtype, tolerance) in runs {
            let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let model = load(&folder, policy);
                if let Some(dtype) = dtype {
                    assert_eq!(model.dtype, dtype, "{label}");
                }
                compare(&label, &model, fixture, &reference, tolerance, 0.25)
            }));
            match checked {
                Ok(line) => report.push(line),
                Err(panic) => failures.push(panic.downcast_ref::<String>().cloned().unwrap_or_else(|| format!("{label}: panicked"))),
            }
        }
    }
    mlxserver::engine::device::activate(Backend::Cpu);
    eprintln!("{}", report.join("\n"));
    assert!(failures.is_empty(), "{} of {} checks failed:\n{}", failures.len(), 2 * families.len(), failures.join("\n"));
}

/// The family's float32 folder at `root/<name>` and its copy quantized by our converter
/// (`bits`, `group`) at `root/<name>-<suffix>`.
fn family_and_quantized_folders(root: &Path, name: &str, fixture: &Value, suffix: &str, bits: i32, group: i32) -> (PathBuf, PathBuf) {
    let source = root.join(name);
    write_family_folder(fixture, &source);
    let out = root.join(format!("{name}-{suffix}"));
    std::fs::create_dir_all(&out).unwrap();
    mlxserver::engine::convert::quantize_folder(&source, &out, bits, group).unwrap();
    (source, out)
}

/// A reference made beside the families fixtures, `tests/fixtures/reference/<kind>/<name>.json`,
/// checked to come from the same recipe as the family's fixture.
fn side_reference(kind: &str, name: &str, fixture: &Value) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference").join(kind).join(format!("{name}.json"));
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap();
    assert_eq!(reference["families_salt"], fixture["salt"], "{name}: the {kind} reference was made from another recipe");
    reference
}

/// Every family quantized to 4 bits, group 64 (MLX-community's "-4bit" folders, `pull
/// --quantize 4`) by our converter, against mlx-lm's quantize_model(model, config, 64, 4)
/// (scripts/reference/make_4bit_references.py), dequantized at load (the CPU policy) and kept
/// quantized (the quantized matmuls a GPU runs).
#[test]
fn every_family_4bit_matches_mlx_lm_4bit() {
    let _guard = mlx_lock();
    let root = tempfile::tempdir().unwrap();
    let mut report = Vec::new();
    let families = fixtures();
    for (name, fixture) in &families {
        let reference = side_reference("families-4bit", name, fixture);
        assert_eq!((reference["bits"].as_i64(), reference["group_size"].as_i64()), (Some(4), Some(64)), "{name}");
        let (_, out) = family_and_quantized_folders(root.path(), name, fixture, "4bit", 4, 64);
        // The same recipe as mlx-lm's, per-family 8-bit modules included (granite, qwen3_moe).
        let written: Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(written["quantization"], reference["config_quantization"], "{name}: config.json quantization block");
        let model = load(&out, DevicePolicy::new(Backend::Cpu, CpuDtype::Float32));
        report.push(compare(&format!("{name} 4-bit g64"), &model, fixture, &reference, 5e-4, 1e-3));
        drop(model);
        let kept = load(&out, DevicePolicy::new(Backend::Cpu, CpuDtype::Quantized));
        report.push(compare(&format!("{name} 4-bit g64, kept quantized"), &kept, fixture, &reference, 5e-4, 1e-3));
    }
    assert_eq!(report.len(), 2 * families.len());
    eprintln!("{}", report.join("\n"));
}

/// An MLX folder with per-layer mixed quantization, as `mlx_lm convert --quant-predicate`
/// writes them: config.json's `quantization` block has the default (4-bit, group 64) and
/// entries for single modules (`"model.layers.0.mlp.down_proj": {"group_size": 64, "bits":
/// 8}`, one with group 32), and a module left unquantized has no entry and no scales. No
/// weights are committed: the folder is assembled from our own quantize_folder outputs at
/// each (bits, group) the fixture's block names, module by module, plus the float weights of
/// the unquantized modules, and its config carries the block mlx-lm wrote.
#[test]
fn mixed_per_layer_quantization_matches_mlx_lm() {
    let _guard = mlx_lock();
    let root = tempfile::tempdir().unwrap();
    let policy = DevicePolicy::new(Backend::Cpu, CpuDtype::Float32);
    let mut report = Vec::new();
    let mut checked = Vec::new();
    for (name, fixture) in fixtures() {
        let Some(reference) = fixture.get("quantized_mixed").filter(|r| r.is_object()) else { continue };
        let source = root.path().join(&name);
        write_family_folder(&fixture, &source);
        let out = root.path().join(format!("{name}-mixed"));
        write_mixed_folder(&source, reference, &root.path().join(format!("{name}-parts")), &out);
        let model = load(&out, policy);
        report.push(compare(&format!("{name} mixed 4/8-bit"), &model, &fixture, reference, 5e-4, 1e-3));
        // The same folder kept quantized (no dequantization at load): the quantized matmuls
        // must read each module's own bits and group size.
        let kept = load(&out, DevicePolicy::new(Backend::Cpu, CpuDtype::Quantized));
        report.push(compare(&format!("{name} mixed 4/8-bit, kept quantized"), &kept, &fixture, reference, 5e-4, 1e-3));
        checked.push(name);
    }
    for family in ["llama", "qwen3", "qwen3_moe", "exaone4"] {
        assert!(checked.iter().any(|name| name == family), "no mixed reference for {family}: {checked:?}");
    }
    eprintln!("{}", report.join("\n"));
}

/// Builds the mixed folder `out` from the float folder `source`, following the fixture's
/// `config_quantization` block (default + per-module entries) and `unquantized_modules`.
fn write_mixed_folder(source: &Path, reference: &Value, parts: &Path, out: &Path) {
    use std::collections::BTreeMap;
    use mlx_rs::Array;
    let block = reference["config_quantization"].as_object().expect("config_quantization");
    let default = (block["bits"].as_i64().unwrap() as i32, block["group_size"].as_i64().unwrap() as i32);
    let overrides: Vec<(String, (i32, i32))> = block
        .iter()
        .filter(|(_, v)| v.is_object())
        .map(|(path, v)| (path.clone(), (v["bits"].as_i64().unwrap() as i32, v["group_size"].as_i64().unwrap() as i32)))
        .collect();
    assert!(!overrides.is_empty(), "no per-module entries in {block:?}");
    let mut quantized: HashMap<(i32, i32), HashMap<String, Array>> = HashMap::new();
    for &(bits, group) in std::iter::once(&default).chain(overrides.iter().map(|(_, k)| k)) {
        if quantized.contains_key(&(bits, group)) {
            continue;
        }
        let dir = parts.join(format!("{bits}bit-g{group}"));
        std::fs::create_dir_all(&dir).unwrap();
        mlxserver::engine::convert::quantize_folder(source, &dir, bits, group).unwrap();
        quantized.insert((bits, group), Array::load_safetensors(dir.join("model.safetensors")).unwrap());
    }
    let float = Array::load_safetensors(source.join("model.safetensors")).unwrap();
    let mut arrays: BTreeMap<String, Array> = quantized[&default].iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    for (path, key) in &overrides {
        for part in ["weight", "scales", "biases"] {
            let name = format!("{path}.{part}");
            let array = quantized[key].get(&name).unwrap_or_else(|| panic!("{name} not quantized at {key:?}"));
            assert!(arrays.contains_key(&name), "{name}");
            arrays.insert(name, array.clone());
        }
    }
    for path in reference["unquantized_modules"].as_array().unwrap() {
        let path = path.as_str().unwrap();
        arrays.remove(&format!("{path}.scales")).unwrap_or_else(|| panic!("{path} was not quantized"));
        arrays.remove(&format!("{path}.biases"));
        arrays.insert(format!("{path}.weight"), float[&format!("{path}.weight")].clone());
    }
    // The modules quantized are exactly mlx-lm's.
    let mut ours: Vec<String> = arrays.keys().filter_map(|k| k.strip_suffix(".scales").map(str::to_string)).collect();
    ours.sort();
    let mut theirs: Vec<String> = reference["quantized_modules"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect();
    theirs.sort();
    assert_eq!(ours, theirs, "quantized modules");
    std::fs::create_dir_all(out).unwrap();
    Array::save_safetensors(arrays.iter().map(|(k, v)| (k.as_str(), v)), None, out.join("model.safetensors")).unwrap();
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(source.join("config.json")).unwrap()).unwrap();
    config["quantization"] = Value::Object(block.clone());
    write_config_and_tokenizer(&config, out);
}

/// The two new layouts through `pull` from a Hub (the stand-in server of the Hub tests):
/// a Hugging Face bfloat16 checkpoint in two shards with its index, and an MLX folder with
/// per-layer mixed quantization; both are listed and `run` answers.
#[test]
fn pull_sharded_bf16_and_mixed_quantized_from_the_hub_then_run_answers() {
    let _guard = mlx_lock();
    let root = tempfile::tempdir().unwrap();
    let fixture = fixtures().into_iter().find(|(name, _)| name == "llama").expect("llama fixture").1;
    let sharded = root.path().join("llama-bf16");
    write_bf16_sharded_folder(&fixture, &sharded);
    let source = root.path().join("llama");
    write_family_folder(&fixture, &source);
    let mixed = root.path().join("llama-mixed");
    write_mixed_folder(&source, &fixture["quantized_mixed"], &root.path().join("parts"), &mixed);
    let hub = std::sync::Arc::new(crate::hub::Hub::default());
    for (repo, folder) in [("test-org/tiny-llama-bf16", &sharded), ("mlx-community/tiny-llama-mixed-4-8bit", &mixed)] {
        hub.repos.lock().unwrap().insert(repo.into(), std::sync::Arc::new(crate::hub::Repo { files: crate::hub::folder_files(folder) }));
    }
    let endpoint = crate::hub::start_hub(hub);
    let home = crate::common::Home::new();
    for (repo, name) in [("test-org/tiny-llama-bf16", "tiny-bf16"), ("mlx-community/tiny-llama-mixed-4-8bit", "tiny-mixed")] {
        let output = crate::hub::pull(&home, &endpoint, &[repo, "--name", name]);
        let said = crate::common::stdout(&output);
        assert!(output.status.success(), "{repo}: {said}\n{}", crate::common::stderr(&output));
        let show = home.run(&["show", name]);
        let shown = crate::common::stdout(&show);
        assert!(shown.contains("family: llama"), "{repo}: {shown}");
        let answer = home.run(&["run", name, "w5 w6 w7"]);
        let text = crate::common::stdout(&answer);
        assert!(answer.status.success(), "{repo}: {text}\n{}", crate::common::stderr(&answer));
        assert!(text.split_whitespace().any(|w| w.starts_with('w')), "{repo}: no answer: {text:?}");
    }
}

/// Windows shorter than the chat: transformers' own mistral, gemma2 and gemma3_text (eager
/// attention, the whole sequence recomputed each step) with `sliding_window = 5` under a
/// 12-token prompt and 16 greedy tokens (scripts/reference/make_window_references.py). Our
/// prefill masks and the batched decode's masks over the cache must give the same numbers.
#[test]
fn sliding_windows_shorter_than_the_chat_match_transformers() {
    let _guard = mlx_lock();
    let root = tempfile::tempdir().unwrap();
    let policy = DevicePolicy::new(Backend::Cpu, CpuDtype::Float32);
    let windowed: Vec<(String, Value, Value)> = fixtures()
        .into_iter()
        .filter(|(name, _)| ["mistral", "gemma2", "gemma3_text"].contains(&name.as_str()))
        .map(|(name, fixture)| {
            let reference = side_reference("windows", &name, &fixture);
            (name, fixture, reference)
        })
        .collect();
    assert_eq!(windowed.len(), 3, "fixtures for mistral, gemma2 and gemma3_text");
    let mut report = Vec::new();
    for (family, fixture, reference) in &windowed {
        let mut variant = fixture.clone();
        variant["config"] = reference["config"].clone();
        let folder = root.path().join(family);
        write_family_folder(&variant, &folder);
        let model = load(&folder, policy);
        report.push(compare(&format!("{family} window 5 < 28 tokens vs transformers"), &model, fixture, reference, 2e-4, 1e-3));
    }
    eprintln!("{}", report.join("\n"));

    // Served: the reference prompt in a batch with a shorter and a longer one (left padding
    // under the window masks), then again alone (a prefix-cache hit).
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let engine = Engine::start(EngineConfig::default());
    for (index, (family, _, reference)) in windowed.iter().enumerate() {
        let id = 300 + index as u64;
        runtime.block_on(engine.load(id, &root.path().join(family))).unwrap_or_else(|e| panic!("{family}: {e}"));
        let prompt = ids(&reference["prompt_ids"]);
        let expected = ids(&reference["greedy_ids"]);
        let margins = margins_of(reference);
        let shorter = prompt[3..].to_vec();
        let longer: Vec<u32> = prompt.iter().copied().chain([5, 6, 7]).collect();
        let answers = runtime.block_on(futures::future::join_all([prompt.clone(), shorter, longer].into_iter().map(|tokens| {
            let mut events = engine
                .generate(id, mlxserver::engine::GenerateRequest {
                    prompt_tokens: tokens,
                    sampling: mlxserver::engine::SamplingParams::greedy(),
                    max_tokens: Some(expected.len()),
                    context_length: None,
                    stop: vec![],
                    logprobs: None,
                    grammar: None,
                })
                .unwrap();
            async move {
                while let Some(event) = events.recv().await {
                    match event {
                        mlxserver::engine::EngineEvent::Done(done) => return done.tokens,
                        mlxserver::engine::EngineEvent::Error(error) => panic!("{error}"),
                        _ => {}
                    }
                }
                panic!("the engine closed the stream")
            }
        })));
        check_tokens(&format!("{family} batched"), &answers[0], &expected, &margins, 1e-3);
        let (again, _, _) = greedy(&engine, &runtime, id, prompt, expected.len());
        check_tokens(&format!("{family} from the prefix cache"), &again, &expected, &margins, 1e-3);
    }
    engine.shutdown();
}

/// The fixture's model cast to float16 (round to nearest even, as torch's `.half()`), one
/// `model.safetensors` with `torch_dtype: float16`, under `config`.
fn write_f16_folder(fixture: &Value, config: &Value, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let buffers: Vec<(String, Vec<usize>, Vec<u8>)> = fixture["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|tensor| {
            let (shape, values) = recipe_values(tensor);
            let bytes = values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect();
            (tensor["name"].as_str().unwrap().to_string(), shape, bytes)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = buffers
        .iter()
        .map(|(name, shape, bytes)| (name.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F16, shape.clone(), bytes).unwrap()))
        .collect();
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    safetensors::serialize_to_file(views, metadata, &dir.join("model.safetensors")).unwrap();
    write_config_and_tokenizer(config, dir);
}

/// Hugging Face float16 checkpoints of every family against transformers
/// (scripts/reference/make_float16_references.py). Loaded with the CPU float32 policy the
/// float16 weights are upcast exactly, so the numbers must equal transformers' float32 run
/// of the same upcast weights as tightly as the float32 test; with the float16 policy we
/// compute in float16 end to end, as transformers' float16 run does (not for MoE families:
/// MLX's CPU gather_mm is float32-only).
#[test]
fn every_family_loads_float16_like_transformers() {
    let _guard = mlx_lock();
    let root = tempfile::tempdir().unwrap();
    let mut report = Vec::new();
    let families = fixtures();
    for (name, fixture) in &families {
        let reference = side_reference("float16", name, fixture);
        let folder = root.path().join(format!("{name}-f16"));
        write_f16_folder(fixture, &reference["config"], &folder);
        let upcast = load(&folder, DevicePolicy::new(Backend::Cpu, CpuDtype::Float32));
        assert_eq!(upcast.dtype, Dtype::Float32, "{name}");
        report.push(compare(&format!("{name} f16 weights, f32 compute vs transformers"), &upcast, fixture, &reference["f32_compute"], 2e-4, 1e-3));
        drop(upcast);
        if fixture["config"]["model_type"].as_str().is_some_and(|t| t.contains("moe") || t == "mixtral") {
            continue;
        }
        let model = load(&folder, DevicePolicy::new(Backend::Cpu, CpuDtype::Float16));
        assert_eq!(model.dtype, Dtype::Float16, "{name}");
        report.push(compare(&format!("{name} f16 compute vs transformers"), &model, fixture, &reference["f16_compute"], F16_RELATIVE, F16_MARGIN));
    }
    assert_eq!(report.len(), 2 * families.len() - 2, "every family, float16 compute for the dense ones");
    eprintln!("{}", report.join("\n"));
}

/// float16 compute: first-step logits within 1% of their range of transformers' float16 run
/// (one float16 ulp is 2^-11 of a value; measured worst 4.5e-3, granite, ~6 ulps at 10.7)...
const F16_RELATIVE: f32 = 1e-2;
/// ...and greedy tokens equal wherever transformers' own choice was decided by at least this.
const F16_MARGIN: f64 = 0.05;
