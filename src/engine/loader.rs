//! Loading a model from disk into MLX arrays: GGUF files, Hugging Face folders
//! (config.json + safetensors, sharded or not) and MLX folders whose config.json carries a
//! `quantization` block. Whatever the source, tensors are renamed to Hugging Face's llama
//! naming, and GGUF's permuted Q/K rows are put back in the half-split RoPE order, so one
//! model implementation serves every path.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mlx_rs::{Array, Dtype};
use serde_json::Value;

use super::bert::{BertConfig, BertLayer, BertModel, LayerNorm, Pooling};
use super::device::WeightPolicy;
use super::llama::{Attention, Layer, LlamaConfig, LlamaModel, Mlp, RopeScaling};
use super::nn::{Embedding, Linear, Projections, Quantized, Weight};
use super::template::ChatTemplate;
use super::tokenizer::{self, GgufVocab};
use super::{EngineError, ModelKind};

pub type Result<T> = std::result::Result<T, EngineError>;

/// What the rest of the server needs to talk to a loaded chat model, usable from any thread.
pub struct ChatFrontend {
    pub tokenizer: Arc<tokenizers::Tokenizer>,
    pub template: ChatTemplate,
    pub bos_token: Option<(u32, String)>,
    /// Whether prompts start with the BOS token.
    pub add_bos: bool,
    pub eos_token_ids: Vec<u32>,
    pub context_length: usize,
    pub vocab_size: usize,
}

impl ChatFrontend {
    /// Token ids of an already formatted prompt, with BOS prepended when the model wants it
    /// and the template did not write it.
    pub fn encode_prompt(&self, prompt: &str) -> Result<Vec<u32>> {
        let mut ids = tokenizer::encode(&self.tokenizer, prompt)?;
        if self.add_bos {
            if let Some((bos_id, _)) = &self.bos_token {
                if ids.first() != Some(bos_id) {
                    ids.insert(0, *bos_id);
                }
            }
        }
        Ok(ids)
    }
}

/// What the rest of the server needs to talk to a loaded embedding model.
pub struct EmbedFrontend {
    pub tokenizer: Arc<tokenizers::Tokenizer>,
    pub dimensions: usize,
    pub max_tokens: usize,
}

pub enum LoadedModel {
    Chat { model: LlamaModel, frontend: Arc<ChatFrontend> },
    Embedding { model: BertModel, frontend: Arc<EmbedFrontend> },
}

impl LoadedModel {
    pub fn kind(&self) -> ModelKind {
        match self {
            LoadedModel::Chat { .. } => ModelKind::Chat,
            LoadedModel::Embedding { .. } => ModelKind::Embedding,
        }
    }

    pub fn arrays(&self) -> Vec<&Array> {
        match self {
            LoadedModel::Chat { model, .. } => model.arrays(),
            LoadedModel::Embedding { model, .. } => model.arrays(),
        }
    }

    /// Bytes of weights actually held.
    pub fn weight_bytes(&self) -> u64 {
        self.arrays().iter().map(|a| a.nbytes() as u64).sum()
    }
}

fn invalid(path: &Path, detail: impl std::fmt::Display) -> EngineError {
    EngineError::InvalidModel(format!("{}: {detail}", path.display()))
}

/// Loads the model at `path`: a `.gguf` file or a folder.
pub fn load(path: &Path, policy: WeightPolicy) -> Result<LoadedModel> {
    if !path.exists() {
        return Err(EngineError::Io { path: path.to_path_buf(), reason: "no such file or folder".into() });
    }
    if path.is_file() {
        if path.extension().is_some_and(|ext| ext.eq_ignore_ascii_case("gguf")) {
            return load_gguf(path, policy);
        }
        return Err(invalid(path, "expected a .gguf file or a model folder"));
    }
    let gguf = std::fs::read_dir(path)
        .map_err(|error| EngineError::Io { path: path.to_path_buf(), reason: error.to_string() })?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|ext| ext == "gguf"));
    if !path.join("config.json").exists() {
        if let Some(gguf) = gguf {
            return load_gguf(&gguf, policy);
        }
        return Err(invalid(path, "no config.json or .gguf file in the folder"));
    }
    let config = read_json(&path.join("config.json"))?;
    let model_type = config["model_type"].as_str().unwrap_or_default().to_string();
    let architectures: Vec<String> = config["architectures"]
        .as_array()
        .map(|list| list.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    if model_type == "bert" || architectures.iter().any(|a| a.starts_with("Bert")) {
        return load_bert(path, &config, policy);
    }
    match model_type.as_str() {
        "llama" | "mistral" | "qwen2" | "smollm" | "smollm2" => load_hf_llama(path, &config, policy),
        other => Err(EngineError::UnsupportedArchitecture(if other.is_empty() { architectures.join(",") } else { other.to_string() })),
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|error| EngineError::Io { path: path.to_path_buf(), reason: error.to_string() })?;
    serde_json::from_str(&text).map_err(|error| invalid(path, format!("not valid JSON: {error}")))
}

/// Tensors by name, taken out one at a time as the model is assembled.
struct Tensors {
    source: PathBuf,
    arrays: HashMap<String, Array>,
    /// Group sizes of quantized tensors (bits follow from the packed shapes).
    quantization: QuantSpec,
}

/// Group sizes of a quantized checkpoint: one default (32 for GGUF blocks) and per-module
/// overrides as mlx-lm writes them in config.json (`"model.embed_tokens": {...}`).
#[derive(Debug, Clone)]
struct QuantSpec {
    group_size: i32,
    overrides: HashMap<String, i32>,
}

impl QuantSpec {
    fn gguf() -> Self {
        QuantSpec { group_size: 32, overrides: HashMap::new() }
    }

    fn from_config(config: &Value) -> Self {
        let block = &config["quantization"];
        let group_size = block["group_size"].as_i64().unwrap_or(64) as i32;
        let overrides = block
            .as_object()
            .map(|map| {
                map.iter()
                    .filter_map(|(name, value)| value["group_size"].as_i64().map(|g| (name.clone(), g as i32)))
                    .collect()
            })
            .unwrap_or_default();
        QuantSpec { group_size, overrides }
    }
}

impl Tensors {
    fn take(&mut self, name: &str) -> Result<Array> {
        self.arrays.remove(name).ok_or_else(|| invalid(&self.source, format!("missing tensor {name}")))
    }

    fn take_optional(&mut self, name: &str) -> Option<Array> {
        self.arrays.remove(name)
    }

    /// `prefix.weight`, with `prefix.scales`/`prefix.biases` when quantized.
    fn weight(&mut self, prefix: &str) -> Result<Weight> {
        let weight = self.take(&format!("{prefix}.weight"))?;
        match self.take_optional(&format!("{prefix}.scales")) {
            Some(scales) => {
                let biases = self.take(&format!("{prefix}.biases"))?;
                let group_size = self.quantization.overrides.get(prefix).copied().unwrap_or(self.quantization.group_size);
                // Packed as u32: `in_features * bits / 32` words per row.
                let in_features = scales.dim(-1) * group_size;
                let bits = weight.dim(-1) * 32 / in_features.max(1);
                if !matches!(bits, 2 | 3 | 4 | 5 | 6 | 8) {
                    return Err(invalid(&self.source, format!("{prefix}: cannot tell the quantization bits from its shape")));
                }
                Ok(Weight::Quantized(Quantized { weight, scales, biases, group_size, bits }))
            }
            None => Ok(Weight::Dense(weight)),
        }
    }

    fn linear(&mut self, prefix: &str, policy: WeightPolicy) -> Result<Linear> {
        let weight = self.weight(prefix)?.prepared(policy.dense, policy.dtype)?;
        let bias = match self.take_optional(&format!("{prefix}.bias")) {
            Some(bias) => Some(bias.as_dtype(policy.dtype)?),
            None => None,
        };
        Ok(Linear { weight, bias })
    }

    fn vector(&mut self, name: &str, policy: WeightPolicy) -> Result<Array> {
        Ok(self.take(name)?.as_dtype(policy.dtype)?)
    }
}

/// Reverses llama.cpp's Q/K row permutation (interleaved RoPE pairs back to half-split).
fn unpermute_rows(array: &Array, heads: i32) -> Result<Array> {
    let rows = array.dim(0);
    let cols = array.dim(1);
    Ok(array.reshape(&[heads, rows / heads / 2, 2, cols])?.swap_axes(1, 2)?.reshape(&[rows, cols])?)
}

fn build_llama(mut tensors: Tensors, config: LlamaConfig, policy: WeightPolicy) -> Result<LlamaModel> {
    let embed = tensors.weight("model.embed_tokens")?;
    // On the CPU the embedding is held dense too: it doubles as the output projection.
    let embed_tokens = Embedding { table: embed.prepared(policy.dense, policy.dtype)? };
    let mut layers = Vec::with_capacity(config.num_layers);
    for index in 0..config.num_layers {
        let prefix = format!("model.layers.{index}");
        let q_proj_weight = tensors.weight(&format!("{prefix}.self_attn.q_proj"))?;
        let k_proj_weight = tensors.weight(&format!("{prefix}.self_attn.k_proj"))?;
        let bias = |tensors: &mut Tensors, name: &str| -> Result<Option<Array>> {
            match tensors.take_optional(&format!("{prefix}.self_attn.{name}.bias")) {
                Some(b) => Ok(Some(b.as_dtype(policy.dtype)?)),
                None => Ok(None),
            }
        };
        let q_proj = Linear { weight: q_proj_weight.prepared(policy.dense, policy.dtype)?, bias: bias(&mut tensors, "q_proj")? };
        let k_proj = Linear { weight: k_proj_weight.prepared(policy.dense, policy.dtype)?, bias: bias(&mut tensors, "k_proj")? };
        let v_proj = tensors.linear(&format!("{prefix}.self_attn.v_proj"), policy)?;
        let gate_proj = tensors.linear(&format!("{prefix}.mlp.gate_proj"), policy)?;
        let up_proj = tensors.linear(&format!("{prefix}.mlp.up_proj"), policy)?;
        layers.push(Layer {
            input_layernorm: tensors.vector(&format!("{prefix}.input_layernorm.weight"), policy)?,
            attention: Attention {
                qkv: Projections::new(vec![q_proj, k_proj, v_proj])?,
                o_proj: tensors.linear(&format!("{prefix}.self_attn.o_proj"), policy)?,
            },
            post_attention_layernorm: tensors.vector(&format!("{prefix}.post_attention_layernorm.weight"), policy)?,
            mlp: Mlp { gate_up: Projections::new(vec![gate_proj, up_proj])?, down_proj: tensors.linear(&format!("{prefix}.mlp.down_proj"), policy)? },
        });
    }
    let norm = tensors.vector("model.norm.weight", policy)?;
    let lm_head = if tensors.arrays.contains_key("lm_head.weight") && !config.tie_word_embeddings {
        Some(tensors.linear("lm_head", policy)?)
    } else {
        None
    };
    LlamaModel::new(config, embed_tokens, layers, norm, lm_head)
}

// ---------------------------------------------------------------------------------------
// GGUF

fn gguf_key_name(name: &str) -> Option<String> {
    let renamed = match name {
        "token_embd" => "model.embed_tokens".to_string(),
        "output_norm" => "model.norm".to_string(),
        "output" => "lm_head".to_string(),
        _ => {
            let rest = name.strip_prefix("blk.")?;
            let (index, part) = rest.split_once('.')?;
            let part = match part {
                "attn_norm" => "input_layernorm",
                "attn_q" => "self_attn.q_proj",
                "attn_k" => "self_attn.k_proj",
                "attn_v" => "self_attn.v_proj",
                "attn_output" => "self_attn.o_proj",
                "ffn_norm" => "post_attention_layernorm",
                "ffn_gate" => "mlp.gate_proj",
                "ffn_up" => "mlp.up_proj",
                "ffn_down" => "mlp.down_proj",
                _ => return None,
            };
            format!("model.layers.{index}.{part}")
        }
    };
    Some(renamed)
}

/// Everything a GGUF file holds, with tensors renamed to Hugging Face's llama naming and Q/K
/// rows back in half-split order (still quantized as stored).
pub struct GgufContents {
    pub arch: String,
    pub config: LlamaConfig,
    pub tensors: HashMap<String, Array>,
    pub tokenizer: tokenizers::Tokenizer,
    pub chat_template: Option<String>,
    pub bos_token: Option<(u32, String)>,
    pub eos_token_ids: Vec<u32>,
    pub eos_text: String,
    pub add_bos: bool,
    /// The GGUF file type of the weights, e.g. "Q4_1".
    pub file_type: Option<String>,
}

/// llama.cpp's `general.file_type` codes that MLX can load.
fn file_type_name(code: u32) -> Option<&'static str> {
    Some(match code {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        _ => return None,
    })
}

pub fn read_gguf(path: &Path) -> Result<GgufContents> {
    use mlx_rs::io::GgufFile;
    let file = GgufFile::load(path).map_err(|error| invalid(path, format!("cannot read GGUF: {error}")))?;
    let meta_string = |key: &str| file.get_metadata_string(key).ok().flatten();
    let meta_number = |key: &str| -> Option<f64> {
        let array = file.get_metadata_array(key).ok().flatten()?;
        let array = array.as_dtype(Dtype::Float64).ok()?;
        array.eval().ok()?;
        array.try_as_slice::<f64>().ok()?.first().copied()
    };
    let arch = meta_string("general.architecture").ok_or_else(|| invalid(path, "no general.architecture"))?;
    if !matches!(arch.as_str(), "llama" | "qwen2" | "mistral") {
        return Err(EngineError::UnsupportedArchitecture(arch));
    }
    let key = |name: &str| format!("{arch}.{name}");
    let required = |name: &str| meta_number(&key(name)).ok_or_else(|| invalid(path, format!("missing {}", key(name))));
    let tokens = file
        .get_metadata_strings("tokenizer.ggml.tokens")
        .ok()
        .flatten()
        .ok_or_else(|| invalid(path, "no tokenizer in the GGUF metadata"))?;
    let hidden_size = required("embedding_length")? as i32;
    let num_heads = required("attention.head_count")? as i32;
    let num_kv_heads = meta_number(&key("attention.head_count_kv")).map(|n| n as i32).unwrap_or(num_heads);
    let head_dim = meta_number(&key("attention.key_length")).map(|n| n as i32).unwrap_or(hidden_size / num_heads);
    let rope_scaling = match meta_string(&key("rope.scaling.type")).as_deref() {
        Some("linear") => RopeScaling::Linear { factor: meta_number(&key("rope.scaling.factor")).unwrap_or(1.0) as f32 },
        _ => RopeScaling::None,
    };

    let raw = file.arrays().map_err(|error| {
        invalid(path, format!("cannot read GGUF tensors ({error}); supported tensor types are F32, F16, Q4_0, Q4_1 and Q8_0"))
    })?;
    let mut tensors = HashMap::with_capacity(raw.len());
    for (name, array) in raw {
        let Some((base, suffix)) = name.rsplit_once('.') else { continue };
        match gguf_key_name(base) {
            Some(renamed) => {
                tensors.insert(format!("{renamed}.{suffix}"), array);
            }
            None if base.starts_with("rope_freqs") => {}
            None => return Err(invalid(path, format!("unexpected tensor {name}"))),
        }
    }
    // llama.cpp permutes Q/K rows of llama-architecture models for its interleaved RoPE.
    if arch == "llama" || arch == "mistral" {
        let names: Vec<String> = tensors.keys().filter(|n| n.contains(".self_attn.q_proj.") || n.contains(".self_attn.k_proj.")).cloned().collect();
        for name in names {
            let heads = if name.contains(".q_proj.") { num_heads } else { num_kv_heads };
            if name.ends_with(".bias") {
                continue;
            }
            if let Some(array) = tensors.remove(&name) {
                tensors.insert(name, unpermute_rows(&array, heads)?);
            }
        }
    }
    let tie_word_embeddings = !tensors.contains_key("lm_head.weight");
    let config = LlamaConfig {
        hidden_size,
        num_layers: required("block_count")? as usize,
        num_heads,
        num_kv_heads,
        head_dim,
        intermediate_size: required("feed_forward_length")? as i32,
        vocab_size: meta_number(&key("vocab_size")).map(|n| n as i32).unwrap_or(tokens.len() as i32),
        rms_norm_eps: meta_number(&key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5) as f32,
        rope_theta: meta_number(&key("rope.freq_base")).unwrap_or(10000.0) as f32,
        rope_scaling,
        rope_traditional: false,
        tie_word_embeddings,
        max_position_embeddings: meta_number(&key("context_length")).unwrap_or(4096.0) as usize,
    };
    let vocab = GgufVocab {
        model: meta_string("tokenizer.ggml.model").unwrap_or_else(|| "gpt2".into()),
        pre: meta_string("tokenizer.ggml.pre"),
        token_types: file
            .get_metadata_array("tokenizer.ggml.token_type")
            .ok()
            .flatten()
            .and_then(|a| a.as_dtype(Dtype::Int32).ok())
            .map(|a| {
                let _ = a.eval();
                a.try_as_slice::<i32>().map(<[i32]>::to_vec).unwrap_or_default()
            })
            .unwrap_or_else(|| vec![1; tokens.len()]),
        merges: file.get_metadata_strings("tokenizer.ggml.merges").ok().flatten().unwrap_or_default(),
        tokens: tokens.clone(),
    };
    let token_id = |name: &str| meta_number(name).map(|n| n as u32);
    let bos_token = token_id("tokenizer.ggml.bos_token_id").and_then(|id| tokens.get(id as usize).map(|t| (id, t.clone())));
    let mut eos_token_ids: Vec<u32> =
        ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"].iter().filter_map(|k| token_id(k)).collect();
    eos_token_ids.sort_unstable();
    eos_token_ids.dedup();
    let eos_text = eos_token_ids.first().and_then(|id| tokens.get(*id as usize)).cloned().unwrap_or_default();
    let add_bos = meta_number("tokenizer.ggml.add_bos_token").map(|v| v != 0.0).unwrap_or(arch == "llama" && bos_token.is_some());
    let chat_template = meta_string("tokenizer.chat_template");
    let file_type = meta_number("general.file_type").and_then(|code| file_type_name(code as u32)).map(str::to_string);
    let tokenizer = tokenizer::from_gguf(vocab)?;
    Ok(GgufContents { arch, config, tensors, tokenizer, chat_template, bos_token, eos_token_ids, eos_text, add_bos, file_type })
}

fn load_gguf(path: &Path, policy: WeightPolicy) -> Result<LoadedModel> {
    let contents = read_gguf(path)?;
    let template = ChatTemplate::new(contents.chat_template, contents.bos_token.as_ref().map(|(_, t)| t.as_str()).unwrap_or(""), &contents.eos_text)?;
    let context_length = contents.config.max_position_embeddings;
    let vocab_size = contents.config.vocab_size as usize;
    let tensors = Tensors { source: path.to_path_buf(), arrays: contents.tensors, quantization: QuantSpec::gguf() };
    let model = build_llama(tensors, contents.config, policy)?;
    let frontend = ChatFrontend {
        tokenizer: Arc::new(contents.tokenizer),
        template,
        bos_token: contents.bos_token,
        add_bos: contents.add_bos,
        eos_token_ids: contents.eos_token_ids,
        context_length,
        vocab_size,
    };
    Ok(LoadedModel::Chat { model, frontend: Arc::new(frontend) })
}

// ---------------------------------------------------------------------------------------
// Hugging Face / MLX folders

fn load_safetensors(folder: &Path) -> Result<HashMap<String, Array>> {
    let index = folder.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if index.exists() {
        let index = read_json(&index)?;
        let mut files: Vec<String> = index["weight_map"]
            .as_object()
            .ok_or_else(|| invalid(folder, "model.safetensors.index.json has no weight_map"))?
            .values()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        files.sort();
        files.dedup();
        files.into_iter().map(|f| folder.join(f)).collect()
    } else {
        let mut files: Vec<PathBuf> = std::fs::read_dir(folder)
            .map_err(|error| EngineError::Io { path: folder.to_path_buf(), reason: error.to_string() })?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|ext| ext == "safetensors"))
            .collect();
        files.sort();
        files
    };
    if files.is_empty() {
        return Err(invalid(folder, "no .safetensors weights (PyTorch .bin files are not supported; convert them first)"));
    }
    let mut arrays = HashMap::new();
    for file in files {
        let loaded = Array::load_safetensors(&file).map_err(|error| invalid(&file, format!("cannot read safetensors: {error}")))?;
        arrays.extend(loaded);
    }
    Ok(arrays)
}

fn token_text(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text.clone()),
        Value::Object(map) => map.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn chat_template_of(folder: &Path, tokenizer_config: &Value) -> Option<String> {
    if let Ok(text) = std::fs::read_to_string(folder.join("chat_template.jinja")) {
        return Some(text);
    }
    match &tokenizer_config["chat_template"] {
        Value::String(text) => Some(text.clone()),
        Value::Array(named) => named
            .iter()
            .find(|entry| entry["name"] == "default")
            .or_else(|| named.first())
            .and_then(|entry| entry["template"].as_str().map(str::to_string)),
        _ => None,
    }
}

fn ids_of(value: &Value) -> Vec<u32> {
    match value {
        Value::Number(n) => n.as_u64().map(|id| vec![id as u32]).unwrap_or_default(),
        Value::Array(list) => list.iter().filter_map(Value::as_u64).map(|id| id as u32).collect(),
        _ => Vec::new(),
    }
}

fn load_hf_llama(folder: &Path, config: &Value, policy: WeightPolicy) -> Result<LoadedModel> {
    let number = |key: &str| config[key].as_f64();
    let required = |key: &str| number(key).ok_or_else(|| invalid(folder, format!("config.json has no {key}")));
    let hidden_size = required("hidden_size")? as i32;
    let num_heads = required("num_attention_heads")? as i32;
    let rope = &config["rope_scaling"];
    let rope_kind = rope["rope_type"].as_str().or_else(|| rope["type"].as_str()).unwrap_or("");
    let rope_scaling = match rope_kind {
        "linear" => RopeScaling::Linear { factor: rope["factor"].as_f64().unwrap_or(1.0) as f32 },
        "llama3" => RopeScaling::Llama3 {
            factor: rope["factor"].as_f64().unwrap_or(8.0) as f32,
            low_freq_factor: rope["low_freq_factor"].as_f64().unwrap_or(1.0) as f32,
            high_freq_factor: rope["high_freq_factor"].as_f64().unwrap_or(4.0) as f32,
            original_max_position: rope["original_max_position_embeddings"].as_f64().unwrap_or(8192.0) as f32,
        },
        "" | "default" => RopeScaling::None,
        other => return Err(EngineError::UnsupportedArchitecture(format!("rope scaling '{other}'"))),
    };
    let quantization = QuantSpec::from_config(config);
    let arrays = load_safetensors(folder)?;
    let tie_word_embeddings = config["tie_word_embeddings"].as_bool().unwrap_or(!arrays.contains_key("lm_head.weight"));
    let llama = LlamaConfig {
        hidden_size,
        num_layers: required("num_hidden_layers")? as usize,
        num_heads,
        num_kv_heads: number("num_key_value_heads").map(|n| n as i32).unwrap_or(num_heads),
        head_dim: number("head_dim").map(|n| n as i32).unwrap_or(hidden_size / num_heads),
        intermediate_size: required("intermediate_size")? as i32,
        vocab_size: required("vocab_size")? as i32,
        rms_norm_eps: number("rms_norm_eps").unwrap_or(1e-5) as f32,
        rope_theta: number("rope_theta").unwrap_or(10000.0) as f32,
        rope_scaling,
        rope_traditional: config["rope_traditional"].as_bool().unwrap_or(false),
        tie_word_embeddings,
        max_position_embeddings: number("max_position_embeddings").unwrap_or(4096.0) as usize,
    };
    let tokenizer = Arc::new(tokenizer::from_file(&folder.join("tokenizer.json"))?);
    let tokenizer_config = read_json(&folder.join("tokenizer_config.json")).unwrap_or(Value::Null);
    let generation_config = read_json(&folder.join("generation_config.json")).unwrap_or(Value::Null);
    let token_of = |text: &str| tokenizer.token_to_id(text).map(|id| (id, text.to_string()));
    let bos_token = token_text(&tokenizer_config["bos_token"]).and_then(|t| token_of(&t));
    let eos_text = token_text(&tokenizer_config["eos_token"]);
    let mut eos_token_ids = ids_of(&generation_config["eos_token_id"]);
    eos_token_ids.extend(ids_of(&config["eos_token_id"]));
    if let Some((id, _)) = eos_text.as_deref().and_then(|t| token_of(t)) {
        eos_token_ids.push(id);
    }
    eos_token_ids.sort_unstable();
    eos_token_ids.dedup();
    let add_bos = tokenizer_config["add_bos_token"].as_bool().unwrap_or(false);
    let template = ChatTemplate::new(
        chat_template_of(folder, &tokenizer_config),
        bos_token.as_ref().map(|(_, t)| t.as_str()).unwrap_or(""),
        eos_text.as_deref().unwrap_or(""),
    )?;
    let context_length = llama.max_position_embeddings;
    let vocab_size = llama.vocab_size as usize;
    let tensors = Tensors { source: folder.to_path_buf(), arrays, quantization };
    let model = build_llama(tensors, llama, policy)?;
    let frontend = ChatFrontend { tokenizer, template, bos_token, add_bos, eos_token_ids, context_length, vocab_size };
    Ok(LoadedModel::Chat { model, frontend: Arc::new(frontend) })
}

fn load_bert(folder: &Path, config: &Value, policy: WeightPolicy) -> Result<LoadedModel> {
    let number = |key: &str| config[key].as_f64().ok_or_else(|| invalid(folder, format!("config.json has no {key}")));
    let mut arrays = load_safetensors(folder)?;
    // Checkpoints saved from BertForMaskedLM and friends carry a "bert." prefix.
    arrays = arrays.into_iter().map(|(name, array)| (name.strip_prefix("bert.").map(str::to_string).unwrap_or(name), array)).collect();
    let sentence_config = read_json(&folder.join("sentence_bert_config.json")).unwrap_or(Value::Null);
    let pooling_config = read_json(&folder.join("1_Pooling/config.json")).unwrap_or(Value::Null);
    let modules = read_json(&folder.join("modules.json")).unwrap_or(Value::Null);
    let max_position = number("max_position_embeddings")? as i32;
    let max_tokens = sentence_config["max_seq_length"].as_u64().map(|n| n as usize).unwrap_or(max_position as usize).min(max_position as usize);
    let bert = BertConfig {
        hidden_size: number("hidden_size")? as i32,
        num_layers: number("num_hidden_layers")? as usize,
        num_heads: number("num_attention_heads")? as i32,
        intermediate_size: number("intermediate_size")? as i32,
        max_position_embeddings: max_position,
        layer_norm_eps: config["layer_norm_eps"].as_f64().unwrap_or(1e-12) as f32,
        max_tokens,
    };
    let pooling = if pooling_config["pooling_mode_cls_token"].as_bool() == Some(true) { Pooling::Cls } else { Pooling::Mean };
    let normalize = modules
        .as_array()
        .is_some_and(|list| list.iter().any(|m| m["type"].as_str().is_some_and(|t| t.ends_with("Normalize"))));
    let mut tensors = Tensors { source: folder.to_path_buf(), arrays, quantization: QuantSpec::from_config(config) };
    let norm = |tensors: &mut Tensors, prefix: &str| -> Result<LayerNorm> {
        Ok(LayerNorm { weight: tensors.vector(&format!("{prefix}.weight"), policy)?, bias: tensors.vector(&format!("{prefix}.bias"), policy)? })
    };
    let word_embeddings = tensors.vector("embeddings.word_embeddings.weight", policy)?;
    let position_embeddings = tensors.vector("embeddings.position_embeddings.weight", policy)?;
    let token_type_embeddings = tensors.vector("embeddings.token_type_embeddings.weight", policy)?;
    let embeddings_norm = norm(&mut tensors, "embeddings.LayerNorm")?;
    let mut layers = Vec::with_capacity(bert.num_layers);
    for index in 0..bert.num_layers {
        let prefix = format!("encoder.layer.{index}");
        layers.push(BertLayer {
            query: tensors.linear(&format!("{prefix}.attention.self.query"), policy)?,
            key: tensors.linear(&format!("{prefix}.attention.self.key"), policy)?,
            value: tensors.linear(&format!("{prefix}.attention.self.value"), policy)?,
            attention_output: tensors.linear(&format!("{prefix}.attention.output.dense"), policy)?,
            attention_norm: norm(&mut tensors, &format!("{prefix}.attention.output.LayerNorm"))?,
            intermediate: tensors.linear(&format!("{prefix}.intermediate.dense"), policy)?,
            output: tensors.linear(&format!("{prefix}.output.dense"), policy)?,
            output_norm: norm(&mut tensors, &format!("{prefix}.output.LayerNorm"))?,
        });
    }
    let mut tokenizer = tokenizer::from_file(&folder.join("tokenizer.json"))?;
    tokenizer
        .with_truncation(Some(tokenizers::TruncationParams { max_length: max_tokens, ..Default::default() }))
        .map_err(|error| EngineError::Tokenizer(error.to_string()))?;
    tokenizer.with_padding(None);
    let dimensions = bert.hidden_size as usize;
    let model = BertModel { config: bert, word_embeddings, position_embeddings, token_type_embeddings, embeddings_norm, layers, pooling, normalize };
    let frontend = EmbedFrontend { tokenizer: Arc::new(tokenizer), dimensions, max_tokens };
    Ok(LoadedModel::Embedding { model, frontend: Arc::new(frontend) })
}
