//! Every family that llama.cpp defines, loaded from GGUF, against two independent references.
//!
//! 1. Layout: `scripts/reference/make_gguf_references.py` ran llama.cpp's own converter
//!    (convert_hf_to_gguf.py) on the tiny random models of `tests/fixtures/reference/families/`
//!    and recorded every metadata key and every tensor (name, dims, ggml type, sha256 of its
//!    bytes) in `tests/fixtures/reference/gguf/<arch>.json`. Here a small GGUF writer that
//!    follows the converter's conventions rebuilds the same file from the recipe, and the file
//!    must equal that record bit for bit (tensor data hashed, metadata compared value by value).
//! 2. Numbers: the file is loaded like any pulled GGUF and its first-step logits and 16 greedy
//!    tokens are compared with mlx-lm's (the families fixture). Where the GGUF cannot carry a
//!    setting of the tiny model (Gemma's `query_pre_attn_scalar`, Gemma 3's layer pattern),
//!    llama.cpp's reading of the file is the model, and the reference is our Hugging Face path
//!    (itself checked against mlx-lm in families.rs) with those settings as llama.cpp reads them.
//! 3. llama.cpp itself: `scripts/reference/make_gguf_llama_cpp_references.py` ran
//!    llama-cpp-python on the converter's file and recorded its first-step logits and 16 greedy
//!    tokens (`tests/fixtures/reference/gguf-llama-cpp/<arch>.json`); the same numbers must
//!    come out of our load of the bit-identical file. For Gemma 2/3 and SmolLM3 this is the
//!    one reference that does not go through our own code.
//!
//! qwen3moe: llama.cpp's architecture has experts in every block, so its record carries a
//! variant of the families model (every layer sparse, its own salt; make_gguf_references.py
//! VARIANTS); there llama.cpp is the reference, beside our Hugging Face load of the same weights.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mlxserver::config::CpuDtype;
use mlxserver::engine::device::{Backend, DevicePolicy};
use mlxserver::engine::loader::{self, LoadedModel};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::engine_reference::mlx_lock;
use crate::families::{check_tokens, max_abs_diff, recipe_values, run_model, write_family_folder};

fn fixture_dir(kind: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference").join(kind)
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

fn gguf_fixtures() -> Vec<(String, Value)> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(fixture_dir("gguf")).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|x| x == "json")).collect();
    paths.sort();
    paths.into_iter().map(|p| (p.file_stem().unwrap().to_string_lossy().into_owned(), read_json(&p))).collect()
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------
// A test-only GGUF writer (version 3, alignment 32), as gguf-py's GGUFWriter lays files out.

#[derive(Debug, Clone, PartialEq)]
enum Meta {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
    Bools(Vec<bool>),
}

impl Meta {
    fn type_name(&self) -> &'static str {
        match self {
            Meta::U32(_) => "uint32",
            Meta::F32(_) => "float32",
            Meta::Bool(_) => "bool",
            Meta::Str(_) => "string",
            Meta::Strs(_) | Meta::I32s(_) | Meta::Bools(_) => "array",
        }
    }

    /// The items of an array as stored (strings: u64 length + UTF-8 bytes).
    fn array_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Meta::Strs(items) => items.iter().for_each(|s| put_str(&mut out, s)),
            Meta::I32s(items) => items.iter().for_each(|v| out.extend(v.to_le_bytes())),
            Meta::Bools(items) => out.extend(items.iter().map(|v| u8::from(*v))),
            _ => {}
        }
        out
    }

    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Meta::U32(v) => {
                out.extend(4u32.to_le_bytes());
                out.extend(v.to_le_bytes());
            }
            Meta::F32(v) => {
                out.extend(6u32.to_le_bytes());
                out.extend(v.to_le_bytes());
            }
            Meta::Bool(v) => {
                out.extend(7u32.to_le_bytes());
                out.push(u8::from(*v));
            }
            Meta::Str(v) => {
                out.extend(8u32.to_le_bytes());
                put_str(out, v);
            }
            Meta::Strs(items) => {
                out.extend(9u32.to_le_bytes());
                out.extend(8u32.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                out.extend(self.array_bytes());
            }
            Meta::I32s(items) => {
                out.extend(9u32.to_le_bytes());
                out.extend(5u32.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                out.extend(self.array_bytes());
            }
            Meta::Bools(items) => {
                out.extend(9u32.to_le_bytes());
                out.extend(7u32.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                out.extend(self.array_bytes());
            }
        }
    }
}

fn put_str(out: &mut Vec<u8>, text: &str) {
    out.extend((text.len() as u64).to_le_bytes());
    out.extend(text.as_bytes());
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum GgmlType {
    F32,
    F16,
}

struct GgufTensor {
    name: String,
    /// Row-major shape (numpy order); the file stores it reversed.
    shape: Vec<usize>,
    ggml: GgmlType,
    data: Vec<u8>,
}

impl GgufTensor {
    fn new(name: &str, shape: Vec<usize>, values: &[f32], ggml: GgmlType) -> Self {
        let data = match ggml {
            GgmlType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            GgmlType::F16 => values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
        };
        GgufTensor { name: name.to_string(), shape, ggml, data }
    }

    fn dims(&self) -> Vec<u64> {
        self.shape.iter().rev().map(|d| *d as u64).collect()
    }

    fn type_name(&self) -> &'static str {
        match self.ggml {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
        }
    }
}

const ALIGNMENT: usize = 32;

fn write_gguf(path: &Path, metadata: &[(String, Meta)], tensors: &[GgufTensor]) {
    let pad = |n: usize| n.div_ceil(ALIGNMENT) * ALIGNMENT;
    let mut out = Vec::new();
    out.extend(b"GGUF");
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_str(&mut out, key);
        value.encode(&mut out);
    }
    let mut offset = 0usize;
    for tensor in tensors {
        put_str(&mut out, &tensor.name);
        out.extend((tensor.shape.len() as u32).to_le_bytes());
        for d in tensor.dims() {
            out.extend(d.to_le_bytes());
        }
        out.extend(match tensor.ggml {
            GgmlType::F32 => 0u32,
            GgmlType::F16 => 1u32,
        }
        .to_le_bytes());
        out.extend((offset as u64).to_le_bytes());
        offset += pad(tensor.data.len());
    }
    out.resize(pad(out.len()), 0);
    for tensor in tensors {
        out.extend(&tensor.data);
        out.resize(pad(out.len()), 0);
    }
    std::fs::write(path, out).unwrap();
}

// ---------------------------------------------------------------------------------------
// llama.cpp's converter conventions, per architecture (conversion/*.py in the llama.cpp the
// fixture names), written independently of src/engine/loader.rs.

/// The made-up tokenizer of make_gguf_references.py: GPT-2's 256 byte symbols, then the 256
/// two-letter merges of a..p.
fn vocabulary() -> (Vec<String>, Vec<String>) {
    let mut bs: Vec<u32> = (u32::from('!')..=u32::from('~')).chain(u32::from('¡')..=u32::from('¬')).chain(u32::from('®')..=u32::from('ÿ')).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![0u32; 256];
    for (b, c) in bs.iter().zip(&cs) {
        table[*b as usize] = *c;
    }
    let mut tokens: Vec<String> = table.iter().map(|c| char::from_u32(*c).unwrap().to_string()).collect();
    let letters: Vec<char> = "abcdefghijklmnop".chars().collect();
    let mut merges = Vec::new();
    for a in &letters {
        for b in &letters {
            tokens.push(format!("{a}{b}"));
            merges.push(format!("{a} {b}"));
        }
    }
    (tokens, merges)
}

/// gguf-py's size label: parameters in thousands with two significant digits at least; for a
/// mixture of experts `<experts>x<shared + one expert's parameters>`.
fn size_label(shared: usize, per_expert: usize, experts: usize) -> String {
    let count = if experts > 0 { shared + per_expert } else { shared };
    let scaled = count as f64 * 1e-3;
    let digits = format!("{}", scaled.round() as i64).trim_start_matches('0').len();
    let fix = 2usize.saturating_sub(digits);
    let label = format!("{scaled:.fix$}K");
    if experts > 0 {
        format!("{experts}x{label}")
    } else {
        label
    }
}

/// `model.layers.L.mlp.experts.E.<part>_proj.weight` -> (L, E, part): the converter stacks
/// each layer's experts into one `blk.L.ffn_<part>_exps.weight` of shape [experts, out, in].
fn expert_part(name: &str) -> Option<(usize, usize, &str)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once(".mlp.experts.")?;
    let (expert, rest) = rest.split_once('.')?;
    let part = rest.strip_suffix("_proj.weight")?;
    Some((layer.parse().ok()?, expert.parse().ok()?, part))
}

fn hf_to_gguf_name(arch: &str, name: &str) -> Option<String> {
    let (base, suffix) = name.rsplit_once('.')?;
    let renamed = match base {
        "model.embed_tokens" => "token_embd".to_string(),
        "model.norm" => "output_norm".to_string(),
        "lm_head" => "output".to_string(),
        _ => {
            let rest = base.strip_prefix("model.layers.")?;
            let (index, part) = rest.split_once('.')?;
            let post_norm_names = arch.starts_with("gemma") || arch == "olmo2" || arch == "exaone4";
            let part = match part {
                "input_layernorm" => "attn_norm",
                "self_attn.q_proj" => "attn_q",
                "self_attn.k_proj" => "attn_k",
                "self_attn.v_proj" => "attn_v",
                "self_attn.o_proj" => "attn_output",
                "self_attn.qkv_proj" => "attn_qkv",
                "self_attn.q_norm" => "attn_q_norm",
                "self_attn.k_norm" => "attn_k_norm",
                "post_attention_layernorm" if post_norm_names => "post_attention_norm",
                "post_attention_layernorm" => "ffn_norm",
                "pre_feedforward_layernorm" => "ffn_norm",
                "post_feedforward_layernorm" => "post_ffw_norm",
                "mlp.gate_proj" => "ffn_gate",
                "mlp.up_proj" | "mlp.gate_up_proj" => "ffn_up",
                "mlp.down_proj" => "ffn_down",
                "mlp.gate" => "ffn_gate_inp",
                _ => return None,
            };
            format!("blk.{index}.{part}")
        }
    };
    Some(format!("{renamed}.{suffix}"))
}

/// llama.cpp's `LlamaModel.permute`: half-split RoPE rows to interleaved pairs, per head.
fn permute_rows(values: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let half = rows / heads / 2;
    let mut out = vec![0.0f32; values.len()];
    // source row (h, two, j) -> destination row (h, j, two)
    for h in 0..heads {
        for two in 0..2 {
            for j in 0..half {
                let src = (h * 2 + two) * half + j;
                let dst = (h * half + j) * 2 + two;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&values[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// llama.cpp's llama3 `rope_freqs` (conversion/llama.py, generate_extra_tensors), in float32 as
/// torch computes it there.
fn llama3_rope_factors(config: &Value, dims: usize) -> Vec<f32> {
    let scaling = &config["rope_scaling"];
    let base = config["rope_theta"].as_f64().unwrap() as f32;
    let factor = scaling["factor"].as_f64().unwrap() as f32;
    let low = scaling["low_freq_factor"].as_f64().unwrap() as f32;
    let high = scaling["high_freq_factor"].as_f64().unwrap() as f32;
    let old = scaling["original_max_position_embeddings"].as_f64().unwrap() as f32;
    let (low_wavelen, high_wavelen) = (old / low, old / high);
    (0..dims / 2)
        .map(|i| {
            let freq = 1.0f32 / base.powf((2 * i) as f32 / dims as f32);
            // torch's `scalar / tensor` is `tensor.reciprocal() * scalar`
            let wavelen = (1.0 / freq) * (2.0 * std::f64::consts::PI) as f32;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = ((1.0 / wavelen) * old - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect()
}

/// The GGUF llama.cpp's converter writes for this family model: metadata and tensors.
fn gguf_for(arch: &str, family: &Value, outtype: &str) -> (Vec<(String, Meta)>, Vec<GgufTensor>) {
    let c = &family["config"];
    let u = |k: &str| Meta::U32(c[k].as_u64().unwrap_or_else(|| panic!("config {k}")) as u32);
    let f = |k: &str| Meta::F32(c[k].as_f64().unwrap_or_else(|| panic!("config {k}")) as f32);
    let heads = c["num_attention_heads"].as_u64().unwrap() as usize;
    let kv_heads = c["num_key_value_heads"].as_u64().unwrap() as usize;
    let head_dim = c["head_dim"].as_u64().unwrap() as usize;
    let ggml_2d = if outtype == "f16" { GgmlType::F16 } else { GgmlType::F32 };

    // Tensors, in the recipe's order (the fixture is compared as a set).
    let mut tensors = Vec::new();
    let gemma = arch.starts_with("gemma");
    // LlamaModel.undo_permute (inherited by GraniteModel and SmolLM3Model)
    let permute = matches!(arch, "llama" | "granite" | "smollm3");
    let mut params = 0usize;
    // (layer, part) -> the experts' (shape, values) in expert order
    let mut experts: BTreeMap<(usize, String), Vec<(usize, Vec<usize>, Vec<f32>)>> = BTreeMap::new();
    for spec in family["tensors"].as_array().unwrap() {
        let name = spec["name"].as_str().unwrap();
        if arch == "gemma2" && name == "lm_head.weight" {
            continue; // Gemma2Model.filter_tensors drops it
        }
        let (shape, mut values) = recipe_values(spec);
        if let Some((layer, expert, part)) = expert_part(name) {
            experts.entry((layer, part.to_string())).or_default().push((expert, shape, values));
            continue;
        }
        if gemma && name.ends_with("norm.weight") {
            values.iter_mut().for_each(|v| *v += 1.0);
        }
        if permute && name.ends_with("self_attn.q_proj.weight") {
            values = permute_rows(&values, shape[0], shape[1], heads);
        }
        if permute && name.ends_with("self_attn.k_proj.weight") {
            values = permute_rows(&values, shape[0], shape[1], kv_heads);
        }
        params += values.len();
        let gguf_name = hf_to_gguf_name(arch, name).unwrap_or_else(|| panic!("{arch}: no GGUF name for {name}"));
        let ggml = if shape.len() == 1 { GgmlType::F32 } else { ggml_2d };
        tensors.push(GgufTensor::new(&gguf_name, shape, &values, ggml));
    }
    let (mut per_expert, mut expert_count) = (0usize, 0usize);
    for ((layer, part), mut parts) in experts {
        parts.sort_by_key(|(expert, _, _)| *expert);
        assert!(parts.iter().enumerate().all(|(i, (expert, _, _))| i == *expert), "{arch}: experts of layer {layer} are not 0..n");
        let mut shape = vec![parts.len()];
        shape.extend(&parts[0].1);
        let values: Vec<f32> = parts.iter().flat_map(|(_, _, v)| v.iter().copied()).collect();
        per_expert += values.len() / parts.len();
        expert_count = parts.len();
        tensors.push(GgufTensor::new(&format!("blk.{layer}.ffn_{part}_exps.weight"), shape, &values, ggml_2d));
    }
    let rope_dims = (head_dim as f64 * c["partial_rotary_factor"].as_f64().unwrap_or(1.0)) as usize;
    if arch == "llama" && c["rope_scaling"]["rope_type"] == "llama3" {
        let factors = llama3_rope_factors(c, head_dim);
        tensors.push(GgufTensor::new("rope_freqs.weight", vec![factors.len()], &factors, GgmlType::F32));
    }
    if arch == "phi3" {
        for (key, name) in [("long_factor", "rope_factors_long.weight"), ("short_factor", "rope_factors_short.weight")] {
            let factors: Vec<f32> = c["rope_scaling"][key].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
            assert_eq!(factors.len(), rope_dims / 2);
            tensors.push(GgufTensor::new(name, vec![factors.len()], &factors, GgmlType::F32));
        }
    }

    // Metadata.
    let file_type = if outtype == "f16" { 1 } else { 0 };
    let mut m: Vec<(String, Meta)> = vec![
        ("general.architecture".into(), Meta::Str(arch.into())),
        ("general.type".into(), Meta::Str("model".into())),
        ("general.name".into(), Meta::Str("Tiny".into())),
        ("general.size_label".into(), Meta::Str(size_label(params, per_expert, expert_count))),
        ("general.file_type".into(), Meta::U32(file_type)),
        ("general.quantization_version".into(), Meta::U32(2)),
    ];
    let mut a = |key: &str, value: Meta| m.push((format!("{arch}.{key}"), value));
    a("block_count", u("num_hidden_layers"));
    a("context_length", u("max_position_embeddings"));
    a("embedding_length", u("hidden_size"));
    a("feed_forward_length", u("intermediate_size"));
    a("attention.head_count", u("num_attention_heads"));
    a("attention.head_count_kv", u("num_key_value_heads"));
    if arch == "cohere2" {
        a("attention.layer_norm_epsilon", f("layer_norm_eps"));
    } else {
        a("attention.layer_norm_rms_epsilon", f("rms_norm_eps"));
    }
    if arch != "phi3" && arch != "granite" {
        // TextModel.set_gguf_parameters (and Gemma2Model's own list) when head_dim is set
        a("attention.key_length", u("head_dim"));
        a("attention.value_length", u("head_dim"));
    }
    if arch != "gemma2" {
        a("rope.freq_base", f("rope_theta"));
    }
    if arch == "cohere2" {
        // Cohere2Model.set_gguf_parameters (no layer pattern: llama.cpp assumes every 4th
        // layer global)
        a("logit_scale", f("logit_scale"));
        a("attention.sliding_window", u("sliding_window"));
        a("vocab_size", u("vocab_size"));
        a("rope.dimension_count", u("head_dim"));
        a("rope.scaling.type", Meta::Str("none".into()));
    }
    if arch == "exaone4" {
        // Exaone4Model.set_gguf_parameters: the vocabulary size, the window and a flag per
        // layer (true: sliding)
        a("vocab_size", u("vocab_size"));
        a("attention.sliding_window", u("sliding_window"));
        let flags: Vec<bool> = c["layer_types"].as_array().unwrap().iter().map(|t| t == "sliding_attention").collect();
        a("attention.sliding_window_pattern", Meta::Bools(flags));
    }
    if matches!(arch, "llama" | "granite" | "smollm3") {
        // LlamaModel.set_gguf_parameters
        a("vocab_size", u("vocab_size"));
        a("rope.dimension_count", u("head_dim"));
    }
    match arch {
        "granite" => {
            a("attention.scale", f("attention_multiplier"));
            a("embedding_scale", f("embedding_multiplier"));
            a("residual_scale", f("residual_multiplier"));
            a("logit_scale", f("logits_scaling"));
        }
        "gemma2" => {
            a("attn_logit_softcapping", f("attn_logit_softcapping"));
            a("final_logit_softcapping", f("final_logit_softcapping"));
            a("attention.sliding_window", u("sliding_window"));
        }
        "gemma3" => {
            a("rope.scaling.type", Meta::Str(c["rope_scaling"]["rope_type"].as_str().unwrap().into()));
            a("rope.scaling.factor", Meta::F32(c["rope_scaling"]["factor"].as_f64().unwrap() as f32));
            a("rope.freq_base_swa", f("rope_local_base_freq"));
            a("attention.sliding_window", u("sliding_window"));
        }
        "phi3" => {
            let max = c["max_position_embeddings"].as_f64().unwrap();
            let original = c["original_max_position_embeddings"].as_f64().unwrap();
            a("rope.dimension_count", Meta::U32(rope_dims as u32));
            a("rope.scaling.original_context_length", u("original_max_position_embeddings"));
            a("rope.scaling.attn_factor", Meta::F32((1.0 + (max / original).ln() / original.ln()).sqrt() as f32));
            a("attention.sliding_window", Meta::U32(0));
        }
        "qwen3moe" => {
            a("expert_count", u("num_experts"));
            a("expert_used_count", u("num_experts_per_tok"));
            a("expert_feed_forward_length", u("moe_intermediate_size"));
        }
        _ => {}
    }
    let (mut tokens, merges) = vocabulary();
    let bos = c["bos_token_id"].as_u64().unwrap() as usize;
    let eos = c["eos_token_id"].as_u64().unwrap() as usize;
    // BOS and EOS are added tokens that are not normalized: the converter stores
    // decode(encode(token)), the byte itself rather than its byte-level symbol.
    for id in [bos, eos] {
        tokens[id] = char::from(id as u8).to_string();
    }
    // tokenizer_config.json names BOS and EOS, so the converter marks them CONTROL (3).
    let types: Vec<i32> = (0..tokens.len()).map(|i| if i == bos || i == eos { 3 } else { 1 }).collect();
    m.extend([
        ("tokenizer.ggml.model".into(), Meta::Str("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Meta::Str("gpt-2".into())),
        ("tokenizer.ggml.tokens".into(), Meta::Strs(tokens)),
        ("tokenizer.ggml.token_type".into(), Meta::I32s(types)),
        ("tokenizer.ggml.merges".into(), Meta::Strs(merges)),
        ("tokenizer.ggml.bos_token_id".into(), Meta::U32(bos as u32)),
        ("tokenizer.ggml.eos_token_id".into(), Meta::U32(eos as u32)),
        ("tokenizer.ggml.add_bos_token".into(), Meta::Bool(false)),
    ]);
    if arch == "gemma2" {
        m.push(("tokenizer.ggml.add_space_prefix".into(), Meta::Bool(false)));
    }
    (m, tensors)
}

/// Differences between what we write and what llama.cpp's converter wrote.
fn layout_differences(metadata: &[(String, Meta)], tensors: &[GgufTensor], record: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let ours: BTreeMap<&str, &Meta> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let theirs = record["metadata"].as_object().unwrap();
    for (key, expected) in theirs {
        let Some(value) = ours.get(key.as_str()) else {
            problems.push(format!("metadata {key} missing (converter: {expected})"));
            continue;
        };
        if value.type_name() != expected["type"] {
            problems.push(format!("metadata {key}: type {} vs {}", value.type_name(), expected["type"]));
            continue;
        }
        let same = match value {
            Meta::U32(v) => expected["value"].as_u64() == Some(u64::from(*v)),
            Meta::F32(v) => expected["value"].as_f64().map(|e| (e as f32).to_bits()) == Some(v.to_bits()),
            Meta::Bool(v) => expected["value"].as_bool() == Some(*v),
            Meta::Str(v) => expected["value"].as_str() == Some(v.as_str()),
            Meta::Strs(items) => {
                expected["len"].as_u64() == Some(items.len() as u64)
                    && match expected.get("sha256") {
                        Some(hash) => hash.as_str() == Some(sha256(&value.array_bytes()).as_str()),
                        None => expected["value"] == json!(items),
                    }
            }
            Meta::I32s(items) => {
                expected["len"].as_u64() == Some(items.len() as u64)
                    && match expected.get("sha256") {
                        Some(hash) => hash.as_str() == Some(sha256(&value.array_bytes()).as_str()),
                        None => expected["value"] == json!(items),
                    }
            }
            Meta::Bools(items) => expected["item_type"] == "bool" && expected["value"] == json!(items),
        };
        if !same {
            let shown = match value {
                Meta::Strs(v) => format!("{} strings, sha256 {}", v.len(), sha256(&value.array_bytes())),
                Meta::I32s(v) => format!("{} ints, sha256 {}", v.len(), sha256(&value.array_bytes())),
                other => format!("{other:?}"),
            };
            problems.push(format!("metadata {key}: ours {shown}, converter {expected}"));
        }
    }
    for key in ours.keys() {
        if !theirs.contains_key(*key) {
            problems.push(format!("metadata {key} is not in the converter's file"));
        }
    }
    let expected: BTreeMap<&str, &Value> = record["tensors"].as_array().unwrap().iter().map(|t| (t["name"].as_str().unwrap(), t)).collect();
    for tensor in tensors {
        let Some(e) = expected.get(tensor.name.as_str()) else {
            problems.push(format!("tensor {} is not in the converter's file", tensor.name));
            continue;
        };
        let dims: Vec<u64> = e["dims"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect();
        if dims != tensor.dims() || e["ggml_type"] != tensor.type_name() {
            problems.push(format!("tensor {}: {:?} {} vs converter {:?} {}", tensor.name, tensor.dims(), tensor.type_name(), dims, e["ggml_type"]));
        } else if e["sha256"].as_str() != Some(sha256(&tensor.data).as_str()) {
            problems.push(format!("tensor {}: data differs from the converter's", tensor.name));
        }
    }
    for name in expected.keys() {
        if !tensors.iter().any(|t| t.name == *name) {
            problems.push(format!("tensor {name} missing (the converter wrote it)"));
        }
    }
    problems
}

/// The file just written, read back with the crate's own GGUF header reader: same keys and
/// values, same tensor table.
fn check_read_back(path: &Path, metadata: &[(String, Meta)], tensors: &[GgufTensor]) {
    use mlxserver::engine::gguf::{read_header, GgufValue};
    let header = read_header(path).unwrap();
    assert_eq!(header.metadata.len(), metadata.len());
    for (key, value) in metadata {
        let got = &header.metadata[key];
        let ok = match (value, got) {
            (Meta::U32(v), GgufValue::UInt(g)) => u64::from(*v) == *g,
            (Meta::F32(v), GgufValue::Float(g)) => f64::from(*v) == *g,
            (Meta::Bool(v), GgufValue::Bool(g)) => v == g,
            (Meta::Str(v), GgufValue::String(g)) => v == g,
            (Meta::Strs(v), GgufValue::Array(g)) => v.len() == g.len() && v.iter().zip(g).all(|(a, b)| b.as_str() == Some(a)),
            (Meta::I32s(v), GgufValue::Array(g)) => v.len() == g.len() && v.iter().zip(g).all(|(a, b)| b.as_f64() == Some(f64::from(*a))),
            (Meta::Bools(v), GgufValue::Array(g)) => v.len() == g.len() && v.iter().zip(g).all(|(a, b)| matches!(b, GgufValue::Bool(x) if x == a)),
            _ => false,
        };
        assert!(ok, "{}: {key} reads back as {got:?}", path.display());
    }
    let names: Vec<&str> = header.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, tensors.iter().map(|t| t.name.as_str()).collect::<Vec<_>>());
}

fn floats(value: &Value) -> Vec<f32> {
    value.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect()
}

fn ids(value: &Value) -> Vec<u32> {
    value.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

fn load_chat(path: &Path) -> mlxserver::engine::decoder::DecoderModel {
    match loader::load(path, DevicePolicy::new(Backend::Cpu, CpuDtype::Float32)).unwrap_or_else(|e| panic!("{}: {e}", path.display())) {
        LoadedModel::Chat { model, .. } => model,
        LoadedModel::Embedding { .. } => panic!("expected a chat model"),
    }
}

/// Settings a GGUF of this architecture cannot carry, as llama.cpp reads the file: Gemma 2/3
/// scale queries by head_dim^-0.5 (models/gemma2.cpp, gemma3.cpp: no query_pre_attn_scalar
/// key), Gemma 3's layer pattern is 6 unless attention.sliding_window_pattern is written
/// (the converter does not write it) and SmolLM3 skips RoPE on every 4th layer
/// (models/smollm3.cpp, not no_rope_layers). None: the GGUF carries the whole model.
fn llama_cpp_reading(arch: &str, family: &Value) -> Option<Value> {
    let mut config = family["config"].clone();
    match arch {
        "gemma2" => {
            config["query_pre_attn_scalar"] = config["head_dim"].clone();
        }
        "smollm3" => {
            // models/smollm3.cpp: n_no_rope_layer_step = 4, no key in the file
            let layers = config["num_hidden_layers"].as_u64().unwrap();
            config["no_rope_layers"] = json!((0..layers).map(|i| u64::from((i + 1) % 4 != 0)).collect::<Vec<_>>());
        }
        "cohere2" => {
            // models/cohere2.cpp: the layer pattern defaults to every 4th layer global and
            // the converter writes none
            config.as_object_mut().unwrap().remove("layer_types");
            config["sliding_window_pattern"] = json!(4);
        }
        "gemma3" => {
            config["query_pre_attn_scalar"] = config["head_dim"].clone();
            config["sliding_window_pattern"] = json!(6);
            let layers = config["num_hidden_layers"].as_u64().unwrap();
            config["layer_types"] = json!((0..layers).map(|i| if i % 6 == 5 { "full_attention" } else { "sliding_attention" }).collect::<Vec<_>>());
        }
        _ => return None,
    }
    Some(config)
}

/// Largest first-step logit difference from llama.cpp, relative to the largest logit. Its
/// run keeps keys and values in float32 (the script sets `type_k`/`type_v`); measured worst:
/// 3.5e-6 (granite).
const LLAMA_CPP_F32_TOLERANCE: f32 = 2e-5;
/// ggml's CPU GELU reads a float16 table, which moves Gemma's logits (measured worst 2.9e-4).
const LLAMA_CPP_GELU_TOLERANCE: f32 = 1e-3;
/// float16 weights: ggml rounds the activations to float16 for the products (measured worst
/// 1.0e-3, llama).
const LLAMA_CPP_F16_TOLERANCE: f32 = 2e-3;
/// A greedy token may differ only where llama.cpp's own choice was this close.
const LLAMA_CPP_MARGIN: f64 = 1e-3;

/// llama.cpp's inference on the converter's file, when recorded for this architecture and
/// file type (scripts/reference/make_gguf_llama_cpp_references.py).
fn llama_cpp_run(arch: &str, outtype: &str) -> Option<Value> {
    let path = fixture_dir("gguf-llama-cpp").join(format!("{arch}.json"));
    path.exists().then(|| read_json(&path)).and_then(|record| record["runs"].get(outtype).cloned())
}

#[test]
fn gguf_files_match_llama_cpp_converter_and_mlx_lm() {
    let _guard = mlx_lock();
    let fixtures = gguf_fixtures();
    assert!(fixtures.len() >= 8, "expected a GGUF fixture per llama.cpp architecture, found {}", fixtures.len());
    let root = tempfile::tempdir().unwrap();
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for (arch, record) in &fixtures {
        let family_name = record["family"].as_str().unwrap();
        let mut family = read_json(&fixture_dir("families").join(format!("{family_name}.json")));
        assert_eq!(record["families_salt"], family["salt"], "{arch}: the GGUF record was made from another recipe");
        // An architecture the converter cannot take as the families model is (qwen3moe: no
        // dense layers) is recorded with its variant: config and recipe replace the family's,
        // and mlx-lm's numbers for the original do not apply (see below).
        let is_variant = record.get("variant").is_some();
        if let Some(changes) = record.get("variant") {
            family["config"] = changes["config"].clone();
            family["tensors"] = changes["tensors"].clone();
        }
        if let Some(reason) = record.get("converter_refused").and_then(Value::as_str) {
            // Recorded by make_gguf_references.py; see tests/fixtures/reference/gguf/README.md.
            report.push(format!("{arch}: SKIPPED, llama.cpp's converter refuses the tiny model: {reason}"));
            continue;
        }
        let prompt = ids(&family["prompt_ids"]);
        let mut f32_logits: Option<Vec<f32>> = None;
        for (outtype, file) in record["files"].as_object().unwrap() {
            let (metadata, tensors) = gguf_for(arch, &family, outtype);
            let path = root.path().join(format!("{arch}-{outtype}.gguf"));
            write_gguf(&path, &metadata, &tensors);
            check_read_back(&path, &metadata, &tensors);
            let problems = layout_differences(&metadata, &tensors, file);
            if !problems.is_empty() {
                failures.push(format!("{arch} {outtype}: not the converter's file:\n  {}", problems.join("\n  ")));
                continue;
            }
            let model = load_chat(&path);
            let expected = ids(&family["greedy_ids"]);
            let (first, tokens, _) = run_model(&model, &prompt, expected.len());
            // The reference: mlx-lm's numbers, or (Gemma) our Hugging Face path with the
            // settings llama.cpp reads from the file.
            let reading = match llama_cpp_reading(arch, &family) {
                None if is_variant => Some(family["config"].clone()),
                other => other,
            };
            let (reference, ref_tokens, margins, against) = match reading {
                None => (floats(&family["first_logits"]), expected.clone(), floats(&family["margins"]).iter().map(|m| f64::from(*m)).collect::<Vec<_>>(), "mlx-lm"),
                Some(config) => {
                    let dir = root.path().join(format!("{arch}-hf"));
                    let mut variant = family.clone();
                    variant["config"] = config;
                    write_family_folder(&variant, &dir);
                    let (logits, toks, _) = run_model(&load_chat(&dir), &prompt, expected.len());
                    (logits, toks, vec![1.0; expected.len()], if is_variant { "our HF path on the variant's weights" } else { "our HF path configured as llama.cpp reads the GGUF" })
                }
            };
            if let Some(run) = llama_cpp_run(arch, outtype) {
                // The independent reference: llama.cpp itself running the converter's file.
                let logits = floats(&run["first_logits"]);
                let spread = logits.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let diff = max_abs_diff(&first, &logits);
                let lcp_tokens = ids(&run["greedy_ids"]);
                let lcp_margins: Vec<f64> = floats(&run["margins"]).iter().map(|m| f64::from(*m)).collect();
                let matching = tokens.iter().zip(&lcp_tokens).take_while(|(a, b)| a == b).count();
                report.push(format!("{arch} {outtype}: vs llama.cpp (llama-cpp-python): max |logit diff| {diff:.2e} (logits up to {spread:.1}), tokens {matching}/{}", lcp_tokens.len()));
                let tolerance = match (outtype.as_str(), arch.as_str()) {
                    ("f32", "gemma2" | "gemma3") => LLAMA_CPP_GELU_TOLERANCE,
                    ("f32", _) => LLAMA_CPP_F32_TOLERANCE,
                    _ => LLAMA_CPP_F16_TOLERANCE,
                };
                if diff > tolerance * spread.max(1.0) {
                    failures.push(format!("{arch} {outtype}: first-step logits differ by {diff} from llama.cpp's"));
                    continue;
                }
                check_tokens(&format!("{arch} {outtype} vs llama.cpp"), &tokens, &lcp_tokens, &lcp_margins, LLAMA_CPP_MARGIN);
            }
            let spread = reference.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let diff = max_abs_diff(&first, &reference);
            let matching = tokens.iter().zip(&ref_tokens).take_while(|(a, b)| a == b).count();
            report.push(format!("{arch} {outtype}: layout = converter's; vs {against}: max |logit diff| {diff:.2e} (logits up to {spread:.1}), tokens {matching}/{}", ref_tokens.len()));
            if outtype == "f32" {
                if diff > 2e-4 * spread.max(1.0) {
                    failures.push(format!("{arch} f32: first-step logits differ by {diff} from {against}"));
                    continue;
                }
                check_tokens(arch, &tokens, &ref_tokens, &margins, 1e-3);
                f32_logits = Some(first);
            } else {
                // float16 weights: near the float32 reference, same first token.
                assert!(diff <= 2e-2 * spread.max(1.0), "{arch} {outtype}: logits differ by {diff}");
                assert_eq!(tokens.first(), ref_tokens.first(), "{arch} {outtype}: first token");
                if let Some(f32_logits) = &f32_logits {
                    report.push(format!("{arch} {outtype}: vs our f32 GGUF: max |logit diff| {:.2e}", max_abs_diff(&first, f32_logits)));
                }
            }
        }
    }
    eprintln!("{}", report.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A GGUF of a family other than llama goes through the real binary: `pull FILE --name`,
/// `show` names the family, `run` answers.
#[test]
fn pull_and_run_a_qwen3_gguf_with_the_binary() {
    let family = read_json(&fixture_dir("families").join("qwen3.json"));
    let root = tempfile::tempdir().unwrap();
    let (metadata, tensors) = gguf_for("qwen3", &family, "f32");
    let path = root.path().join("tiny-qwen3.gguf");
    write_gguf(&path, &metadata, &tensors);
    let home = crate::common::Home::new();
    let output = home.run(&["pull", path.to_str().unwrap(), "--name", "tiny-qwen3"]);
    let said = format!("{}{}", crate::common::stdout(&output), crate::common::stderr(&output));
    assert!(output.status.success(), "{said}");
    let shown = crate::common::stdout(&home.run(&["show", "tiny-qwen3"]));
    assert!(shown.contains("qwen3"), "{shown}");
    let answer = home.run(&["run", "tiny-qwen3", "abc abc"]);
    let text = crate::common::stdout(&answer);
    assert!(answer.status.success(), "{text}\n{}", crate::common::stderr(&answer));
}
