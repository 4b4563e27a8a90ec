//! Loading a model from disk into MLX arrays: GGUF files, Hugging Face folders
//! (config.json + safetensors, sharded or not) and MLX folders whose config.json carries a
//! `quantization` block. Whatever the source, the model is described by a Hugging Face
//! config.json and Hugging Face tensor names (a GGUF's metadata and tensors are translated
//! into them, Q/K rows put back in half-split RoPE order), so one decoder serves every path.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mlx_rs::{ops, Array, Dtype};
use serde_json::Value;

use super::bert::{BertConfig, BertLayer, BertModel, ClassifierHead, LayerNorm, Pooling};
use super::decoder::{BlockLayout, DecoderConfig, DecoderModel, Experts, FeedForward, Layer, QkNorm, SUPPORTED_FAMILIES};
use super::device::{DevicePolicy, WeightPolicy};
use super::gguf;
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
    /// A cross-encoder (reranker, `BertForSequenceClassification`): it scores (query,
    /// document) pairs with [`super::Engine::score_pairs`] (pairs tokenized by
    /// [`EmbedFrontend::encode_pair`]) and refuses to embed single texts.
    pub cross_encoder: bool,
}

impl EmbedFrontend {
    /// A (query, document) pair tokenized for [`super::Engine::score_pairs`], cut to the
    /// model's `max_tokens`.
    pub fn encode_pair(&self, query: &str, document: &str) -> Result<super::bert::PairInput> {
        super::bert::encode_pair(&self.tokenizer, query, document, self.max_tokens)
    }
}

/// Whether a config.json describes a BERT cross-encoder (`BertForSequenceClassification`).
pub fn is_cross_encoder(config: &Value) -> bool {
    config["architectures"].as_array().is_some_and(|list| list.iter().any(|a| a.as_str() == Some("BertForSequenceClassification")))
}

pub enum LoadedModel {
    Chat { model: DecoderModel, frontend: Arc<ChatFrontend> },
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
pub fn load(path: &Path, policy: DevicePolicy) -> Result<LoadedModel> {
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
    if model_type.is_empty() {
        return Err(EngineError::UnsupportedArchitecture(format!(
            "{} (config.json has no model_type); supported: {}",
            architectures.join(","),
            SUPPORTED_FAMILIES.join(", ")
        )));
    }
    load_hf_decoder(path, &config, policy)
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
    /// A quantization mode other than MLX's affine one (`"mode": "mxfp4"` in config.json, as
    /// gpt-oss folders have), for the whole model or any module: its packed weights would read
    /// as affine ones and give garbage, so such a model is refused by name.
    other_mode: Option<String>,
}

impl QuantSpec {
    fn gguf() -> Self {
        QuantSpec { group_size: 32, overrides: HashMap::new(), other_mode: None }
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
        QuantSpec { group_size, overrides, other_mode: non_affine_mode(config) }
    }
}

/// The first quantization mode in config.json other than MLX's affine one, if any.
pub(crate) fn non_affine_mode(config: &Value) -> Option<String> {
    let block = &config["quantization"];
    let modes = std::iter::once(&block["mode"]).chain(block.as_object().into_iter().flat_map(|map| map.values().map(|value| &value["mode"])));
    modes.filter_map(Value::as_str).find(|mode| *mode != "affine").map(str::to_string)
}

pub(crate) fn unsupported_mode(mode: &str) -> String {
    format!("quantized in MLX's \"{mode}\" mode; only affine quantization (MLX community's 2- to 8-bit folders) is supported")
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
                if let Some(mode) = &self.quantization.other_mode {
                    return Err(invalid(&self.source, format!("{prefix} is {}", unsupported_mode(mode))));
                }
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
        let weight = self.weight(prefix)?.prepared(policy)?;
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

/// The dtype a checkpoint was stored in: its quantization scales' dtype when quantized, else
/// its embedding's, else what config.json says.
fn native_dtype(arrays: &HashMap<String, Array>, config: &Value) -> Dtype {
    let floating = |d: Dtype| matches!(d, Dtype::Float16 | Dtype::Bfloat16 | Dtype::Float32);
    if let Some(scales) = arrays.iter().find(|(name, _)| name.ends_with(".scales")).map(|(_, a)| a.dtype()) {
        if floating(scales) {
            return scales;
        }
    }
    let declared = config["torch_dtype"].as_str().or_else(|| config["dtype"].as_str());
    match declared {
        Some("bfloat16") => return Dtype::Bfloat16,
        Some("float16") => return Dtype::Float16,
        Some("float32") => return Dtype::Float32,
        _ => {}
    }
    arrays
        .iter()
        .find(|(name, _)| name.ends_with("embed_tokens.weight"))
        .map(|(_, a)| a.dtype())
        .filter(|d| floating(*d))
        .unwrap_or(Dtype::Float32)
}

impl Tensors {
    /// A norm weight in the policy's dtype; Gemma's `1 + w` is folded in here.
    fn norm(&mut self, name: &str, config: &DecoderConfig, policy: WeightPolicy) -> Result<Array> {
        let weight = self.take(name)?;
        if config.norm_offset {
            Ok(weight.as_dtype(Dtype::Float32)?.add(Array::from_f32(1.0))?.as_dtype(policy.dtype)?)
        } else {
            Ok(weight.as_dtype(policy.dtype)?)
        }
    }

    fn optional_norm(&mut self, name: &str, config: &DecoderConfig, policy: WeightPolicy) -> Result<Option<Array>> {
        if self.arrays.contains_key(name) {
            Ok(Some(self.norm(name, config, policy)?))
        } else {
            Ok(None)
        }
    }

    /// Expert weights `[experts, out, in]`: stacked MLX layout (`switch_mlp.NAME`) or one
    /// tensor per expert in Hugging Face layout (`experts.E.NAME`).
    fn experts(&mut self, prefix: &str, stacked: &str, per_expert: &str, count: i32, policy: WeightPolicy) -> Result<Experts> {
        let stacked_name = format!("{prefix}.switch_mlp.{stacked}");
        if self.arrays.contains_key(&format!("{stacked_name}.weight")) {
            return Ok(Experts { weight: self.weight(&stacked_name)?.prepared(policy)? });
        }
        let mut parts = Vec::with_capacity(count as usize);
        for expert in 0..count {
            match self.weight(&format!("{prefix}.experts.{expert}.{per_expert}"))? {
                Weight::Dense(array) => parts.push(array),
                Weight::Quantized(_) => return Err(invalid(&self.source, format!("{prefix}: per-expert quantized weights are not supported"))),
            }
        }
        Ok(Experts { weight: Weight::Dense(ops::stack(&parts, 0)?).prepared(policy)? })
    }
}

/// Which projections reading the same input run as one stacked matmul.
///
/// q/k/v everywhere: split by heads it is one quantized matmul and three slice views where
/// separate ones are three matmuls and three reshapes, fewer nodes for MLX to encode on every
/// decode step. gate/up only on the CPU (fewer BLAS calls): on a GPU the stacked 28672-wide
/// weight raised the prompt pass's peak by 0.8 GiB (8B 4-bit on an H200, bench/README.md
/// session 7) and saves no node (two slices replace the second matmul).
/// `MLXSERVER_FUSE_PROJECTIONS=0|1` sets both, for measurements.
#[derive(Clone, Copy)]
struct Fusion {
    qkv: bool,
    gate_up: bool,
}

fn fusion(device: DevicePolicy) -> Fusion {
    match std::env::var("MLXSERVER_FUSE_PROJECTIONS").as_deref() {
        Ok("0") => Fusion { qkv: false, gate_up: false },
        Ok("1") => Fusion { qkv: true, gate_up: true },
        _ => Fusion { qkv: true, gate_up: device.backend == super::device::Backend::Cpu },
    }
}

/// Builds a decoder of any supported family from Hugging Face-named tensors.
/// Reads the family's settings from config.json; an unknown family is refused here, before
/// any weight is read.
fn decoder_config(source: &Path, config_json: &Value) -> Result<DecoderConfig> {
    DecoderConfig::from_hf(config_json).map_err(|error| match error {
        EngineError::InvalidModel(detail) => invalid(source, detail),
        other => other,
    })
}

fn build_decoder(mut tensors: Tensors, config_json: &Value, config: DecoderConfig, device: DevicePolicy) -> Result<DecoderModel> {
    let policy = device.for_model(native_dtype(&tensors.arrays, config_json));
    // Some checkpoints carry the `model.` prefix inside a `language_model.` wrapper.
    let renamed: Vec<String> = tensors.arrays.keys().filter(|n| n.starts_with("language_model.")).cloned().collect();
    for name in renamed {
        if let Some(array) = tensors.arrays.remove(&name) {
            tensors.arrays.insert(name.trim_start_matches("language_model.").to_string(), array);
        }
    }
    let embed = tensors.weight("model.embed_tokens")?;
    let embed_tokens = Embedding { table: embed.prepared(policy)? };
    let fusion = fusion(device);
    let mut layers = Vec::with_capacity(config.num_layers);
    for (index, kind) in config.layers.iter().enumerate() {
        let prefix = format!("model.layers.{index}");
        let attn = format!("{prefix}.self_attn");
        let linear_with_bias = |tensors: &mut Tensors, name: &str| tensors.linear(name, policy);
        let qkv = if config.fused_qkv {
            let fused = linear_with_bias(&mut tensors, &format!("{attn}.qkv_proj"))?;
            let q = config.num_heads * config.head_dim;
            let kv = config.num_kv_heads * config.head_dim;
            Projections::Fused { linear: fused, sizes: vec![q, kv, kv] }
        } else {
            let parts = vec![
                linear_with_bias(&mut tensors, &format!("{attn}.q_proj"))?,
                linear_with_bias(&mut tensors, &format!("{attn}.k_proj"))?,
                linear_with_bias(&mut tensors, &format!("{attn}.v_proj"))?,
            ];
            if fusion.qkv { Projections::new(parts)? } else { Projections::Separate(parts) }
        };
        let o_proj = tensors.linear(&format!("{attn}.o_proj"), policy)?;
        let (q_norm, k_norm) = match config.qk_norm {
            QkNorm::None => (None, None),
            _ => (Some(tensors.norm(&format!("{attn}.q_norm.weight"), &config, policy)?), Some(tensors.norm(&format!("{attn}.k_norm.weight"), &config, policy)?)),
        };
        let (input_norm, post_attention_norm, pre_ff_norm, post_ff_norm) = match config.layout {
            BlockLayout::PreNorm => (
                Some(tensors.norm(&format!("{prefix}.input_layernorm.weight"), &config, policy)?),
                None,
                Some(tensors.norm(&format!("{prefix}.post_attention_layernorm.weight"), &config, policy)?),
                None,
            ),
            BlockLayout::Sandwich => (
                Some(tensors.norm(&format!("{prefix}.input_layernorm.weight"), &config, policy)?),
                Some(tensors.norm(&format!("{prefix}.post_attention_layernorm.weight"), &config, policy)?),
                Some(tensors.norm(&format!("{prefix}.pre_feedforward_layernorm.weight"), &config, policy)?),
                Some(tensors.norm(&format!("{prefix}.post_feedforward_layernorm.weight"), &config, policy)?),
            ),
            BlockLayout::Parallel => (Some(tensors.norm(&format!("{prefix}.input_layernorm.weight"), &config, policy)?), None, None, None),
            BlockLayout::PostNorm => (
                tensors.optional_norm(&format!("{prefix}.input_layernorm.weight"), &config, policy)?,
                Some(tensors.norm(&format!("{prefix}.post_attention_layernorm.weight"), &config, policy)?),
                None,
                Some(tensors.norm(&format!("{prefix}.post_feedforward_layernorm.weight"), &config, policy)?),
            ),
        };
        let ff = match (kind.moe, config.moe) {
            (true, Some(moe)) => {
                let (block, names) = if config.family == "mixtral" {
                    (format!("{prefix}.block_sparse_moe"), [("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")])
                } else {
                    (format!("{prefix}.mlp"), [("gate_proj", "gate_proj"), ("up_proj", "up_proj"), ("down_proj", "down_proj")])
                };
                FeedForward::Experts {
                    router: tensors.linear(&format!("{block}.gate"), policy)?,
                    gate: tensors.experts(&block, names[0].0, names[0].1, moe.num_experts, policy)?,
                    up: tensors.experts(&block, names[1].0, names[1].1, moe.num_experts, policy)?,
                    down: tensors.experts(&block, names[2].0, names[2].1, moe.num_experts, policy)?,
                }
            }
            _ if config.fused_gate_up => {
                let fused = tensors.linear(&format!("{prefix}.mlp.gate_up_proj"), policy)?;
                let half = fused.weight.out_features() / 2;
                FeedForward::Dense { gate_up: Projections::Fused { linear: fused, sizes: vec![half, half] }, down: tensors.linear(&format!("{prefix}.mlp.down_proj"), policy)? }
            }
            _ => FeedForward::Dense {
                gate_up: {
                    let parts = vec![tensors.linear(&format!("{prefix}.mlp.gate_proj"), policy)?, tensors.linear(&format!("{prefix}.mlp.up_proj"), policy)?];
                    if fusion.gate_up { Projections::new(parts)? } else { Projections::Separate(parts) }
                },
                down: tensors.linear(&format!("{prefix}.mlp.down_proj"), policy)?,
            },
        };
        layers.push(Layer { input_norm, post_attention_norm, pre_ff_norm, post_ff_norm, q_norm, k_norm, qkv, o_proj, ff });
    }
    let norm = tensors.norm("model.norm.weight", &config, policy)?;
    let lm_head = if tensors.arrays.contains_key("lm_head.weight") && !config.tie_word_embeddings { Some(tensors.linear("lm_head", policy)?) } else { None };
    if lm_head.is_none() && !config.tie_word_embeddings && !tensors.arrays.contains_key("lm_head.weight") {
        tracing::debug!("no lm_head: the embedding table serves as the output projection");
    }
    if embed_tokens.table.out_features() < config.vocab_size {
        return Err(invalid(&tensors.source, format!("the embedding table has {} rows for a vocabulary of {}", embed_tokens.table.out_features(), config.vocab_size)));
    }
    Ok(DecoderModel { config, embed_tokens, layers, norm, lm_head, dtype: policy.dtype, prompt_piece_layers: (device.backend != super::device::Backend::Cpu).then_some(super::decoder::GPU_PROMPT_PIECE_LAYERS) })
}

// ---------------------------------------------------------------------------------------
// GGUF

/// llama.cpp's architecture names and the Hugging Face `model_type` each becomes.
const GGUF_ARCHITECTURES: &[(&str, &str)] = &[
    ("llama", "llama"),
    ("mistral", "mistral"),
    ("qwen2", "qwen2"),
    ("qwen3", "qwen3"),
    ("qwen3moe", "qwen3_moe"),
    ("gemma2", "gemma2"),
    ("gemma3", "gemma3_text"),
    ("phi3", "phi3"),
    ("olmo2", "olmo2"),
    ("granite", "granite"),
    ("smollm3", "smollm3"),
    ("exaone4", "exaone4"),
    ("cohere2", "cohere2"),
];

fn gguf_key_name(arch: &str, name: &str) -> Option<String> {
    let renamed = match name {
        "token_embd" => "model.embed_tokens".to_string(),
        "output_norm" => "model.norm".to_string(),
        "output" => "lm_head".to_string(),
        _ => {
            let rest = name.strip_prefix("blk.")?;
            let (index, part) = rest.split_once('.')?;
            let gemma = arch.starts_with("gemma");
            let part = match part {
                "attn_norm" => "input_layernorm",
                "attn_q" => "self_attn.q_proj",
                "attn_k" => "self_attn.k_proj",
                "attn_v" => "self_attn.v_proj",
                "attn_qkv" => "self_attn.qkv_proj",
                "attn_output" => "self_attn.o_proj",
                "attn_q_norm" => "self_attn.q_norm",
                "attn_k_norm" => "self_attn.k_norm",
                "post_attention_norm" => "post_attention_layernorm",
                "ffn_post_norm" | "post_ffw_norm" => "post_feedforward_layernorm",
                "ffn_norm" if gemma => "pre_feedforward_layernorm",
                "ffn_norm" => "post_attention_layernorm",
                "ffn_gate" => "mlp.gate_proj",
                "ffn_up" if arch == "phi3" => "mlp.gate_up_proj",
                "ffn_up" => "mlp.up_proj",
                "ffn_down" => "mlp.down_proj",
                "ffn_gate_inp" => "mlp.gate",
                "ffn_gate_exps" => "mlp.switch_mlp.gate_proj",
                "ffn_up_exps" => "mlp.switch_mlp.up_proj",
                "ffn_down_exps" => "mlp.switch_mlp.down_proj",
                _ => return None,
            };
            format!("model.layers.{index}.{part}")
        }
    };
    Some(renamed)
}

/// Everything a GGUF file holds, as a Hugging Face config.json and Hugging Face-named
/// tensors (still quantized as stored; Q/K rows back in half-split order; Gemma norms
/// without llama.cpp's folded `+1`).
pub struct GgufContents {
    pub arch: String,
    pub config: Value,
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

/// What the GGUF metadata says about the tokenizer whose `tokens` it lists.
pub fn gguf_vocabulary(header: &gguf::GgufHeader, tokens: Vec<String>) -> GgufVocab {
    GgufVocab {
        model: header.string("tokenizer.ggml.model").unwrap_or_else(|| "gpt2".into()),
        pre: header.string("tokenizer.ggml.pre"),
        token_types: header
            .numbers("tokenizer.ggml.token_type")
            .map(|types| types.into_iter().map(|t| t as i32).collect())
            .unwrap_or_else(|| vec![1; tokens.len()]),
        merges: header.strings("tokenizer.ggml.merges").unwrap_or_default(),
        tokens,
    }
}

pub fn read_gguf(path: &Path) -> Result<GgufContents> {
    use mlx_rs::io::GgufFile;
    let header = gguf::read_header(path).map_err(|error| invalid(path, format!("cannot read GGUF: {error}")))?;
    let arch = header.string("general.architecture").ok_or_else(|| invalid(path, "no general.architecture"))?;
    let Some(model_type) = GGUF_ARCHITECTURES.iter().find(|(a, _)| *a == arch).map(|(_, t)| *t) else {
        let known: Vec<&str> = GGUF_ARCHITECTURES.iter().map(|(a, _)| *a).collect();
        return Err(EngineError::UnsupportedArchitecture(format!("{arch} (GGUF); supported: {}", known.join(", "))));
    };
    let key = |name: &str| format!("{arch}.{name}");
    let number = |name: &str| header.number(&key(name));
    let required = |name: &str| number(name).ok_or_else(|| invalid(path, format!("missing {}", key(name))));
    let tokens = header.strings("tokenizer.ggml.tokens").ok_or_else(|| invalid(path, "no tokenizer in the GGUF metadata"))?;
    let hidden_size = required("embedding_length")?;
    let num_heads = required("attention.head_count")?;
    let head_dim = number("attention.key_length").unwrap_or(hidden_size / num_heads);
    let mut config = serde_json::json!({
        "model_type": model_type,
        "hidden_size": hidden_size,
        "num_hidden_layers": required("block_count")?,
        "num_attention_heads": num_heads,
        "num_key_value_heads": number("attention.head_count_kv").unwrap_or(num_heads),
        "head_dim": head_dim,
        "intermediate_size": required("feed_forward_length")?,
        "vocab_size": number("vocab_size").unwrap_or(tokens.len() as f64),
        "rope_theta": number("rope.freq_base").unwrap_or(10000.0),
        "max_position_embeddings": number("context_length").unwrap_or(4096.0),
    });
    if header.string(&key("rope.scaling.type")).as_deref() == Some("linear") {
        config["rope_scaling"] = serde_json::json!({"type": "linear", "factor": number("rope.scaling.factor").unwrap_or(1.0)});
    }
    if let Some(dims) = number("rope.dimension_count") {
        if dims < head_dim {
            config["partial_rotary_factor"] = (dims / head_dim).into();
        }
    }
    for (gguf_key, hf_key) in [
        ("attn_logit_softcapping", "attn_logit_softcapping"),
        ("final_logit_softcapping", "final_logit_softcapping"),
        ("attention.sliding_window", "sliding_window"),
        // Gemma 3's local-layer RoPE base and layer pattern (llama.cpp: rope.freq_base_swa,
        // attention.sliding_window_pattern, default 6); they were not read before.
        ("rope.freq_base_swa", "rope_local_base_freq"),
        ("attention.sliding_window_pattern", "sliding_window_pattern"),
        ("expert_count", "num_experts"),
        ("expert_used_count", "num_experts_per_tok"),
        ("expert_feed_forward_length", "moe_intermediate_size"),
        ("embedding_scale", "embedding_multiplier"),
        ("residual_scale", "residual_multiplier"),
        ("attention.scale", "attention_multiplier"),
        // Granite divides by its logits_scaling, Cohere multiplies by its logit_scale.
        ("logit_scale", if model_type == "cohere2" { "logit_scale" } else { "logits_scaling" }),
        ("attention.layer_norm_rms_epsilon", "rms_norm_eps"),
        ("attention.layer_norm_epsilon", "layer_norm_eps"),
    ] {
        if let Some(value) = number(gguf_key) {
            config[hf_key] = value.into();
        }
    }
    if model_type.starts_with("gemma") {
        config["query_pre_attn_scalar"] = head_dim.into();
    }
    // A per-layer pattern (EXAONE 4: one bool per layer, true = sliding window), where
    // Gemma 3's is a number (read above).
    if let Some(gguf::GgufValue::Array(flags)) = header.metadata.get(&key("attention.sliding_window_pattern")) {
        let kinds: Vec<&str> = flags.iter().map(|flag| if matches!(flag, gguf::GgufValue::Bool(true)) { "sliding_attention" } else { "full_attention" }).collect();
        config["layer_types"] = serde_json::json!(kinds);
    }
    if model_type == "qwen3_moe" {
        config["norm_topk_prob"] = true.into();
    }

    let file = GgufFile::load(path).map_err(|error| invalid(path, format!("cannot read GGUF: {error}")))?;
    let raw = file.arrays().map_err(|error| {
        invalid(path, format!("cannot read GGUF tensors ({error}); supported tensor types are F32, F16, Q4_0, Q4_1 and Q8_0"))
    })?;
    let mut tensors = HashMap::with_capacity(raw.len());
    let mut rope_factors: HashMap<String, Vec<f32>> = HashMap::new();
    for (name, array) in raw {
        let Some((base, suffix)) = name.rsplit_once('.') else { continue };
        match gguf_key_name(&arch, base) {
            Some(renamed) => {
                tensors.insert(format!("{renamed}.{suffix}"), array);
            }
            None if base.starts_with("rope_freqs") || base.starts_with("rope_factors") => {
                // Kept, not dropped (tests/it/gguf_families.rs found this): llama.cpp's converter
                // stores llama3 rope scaling only as `rope_freqs` and Phi-3's longrope only as
                // `rope_factors_long`/`_short`; without them the model ran unscaled RoPE.
                let values = array.as_dtype(Dtype::Float32)?;
                values.eval()?;
                rope_factors.insert(base.to_string(), values.as_slice::<f32>().to_vec());
            }
            None => return Err(invalid(path, format!("unexpected tensor {name}"))),
        }
    }
    // llama.cpp divides each RoPE frequency by its factor (multiplies the period), which is
    // what our longrope does with `long_factor`; the factors are given explicitly, so
    // `long_mscale` pins the feature scale: llama.cpp's `rope.scaling.attn_factor` (Phi-3)
    // or 1 (llama3 factors carry no scale).
    let long = rope_factors.get("rope_factors_long").or_else(|| rope_factors.get("rope_freqs"));
    if let Some(long) = long {
        let short = rope_factors.get("rope_factors_short").unwrap_or(long);
        let mscale = number("rope.scaling.attn_factor").unwrap_or(1.0);
        config["rope_scaling"] = serde_json::json!({
            "rope_type": "longrope", "long_factor": long, "short_factor": short,
            "long_mscale": mscale, "short_mscale": mscale,
        });
        if let Some(original) = number("rope.scaling.original_context_length") {
            config["original_max_position_embeddings"] = original.into();
        }
    }
    // GGUF numbers arrive here as f64 (8.0), and the decoder reads integer settings with
    // as_u64/as_i64, which refuse 8.0: Gemma 3's sliding window (and window pattern) from a
    // GGUF was silently ignored (tests/it/gguf_families.rs found it). Whole numbers of
    // integer settings become JSON integers.
    for key in [
        "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size",
        "max_position_embeddings", "original_max_position_embeddings", "sliding_window", "sliding_window_pattern", "num_experts",
        "num_experts_per_tok", "moe_intermediate_size",
    ] {
        if let Some(value) = config[key].as_f64().filter(|v| v.fract() == 0.0 && *v >= 0.0) {
            config[key] = (value as u64).into();
        }
    }
    let heads = |name: &str| -> i32 { if name.contains(".q_proj.") { num_heads as i32 } else { config["num_key_value_heads"].as_f64().unwrap_or(num_heads) as i32 } };
    // llama.cpp permutes Q/K rows of llama-architecture models for its interleaved RoPE.
    // smollm3 too (tests/it/gguf_families.rs found it): its converter class SmolLM3Model
    // inherits LlamaModel.undo_permute = True, so its GGUF Q/K rows are permuted like llama's
    // and were loaded scrambled.
    if arch == "llama" || arch == "mistral" || arch == "granite" || arch == "smollm3" {
        let names: Vec<String> = tensors.keys().filter(|n| (n.contains(".self_attn.q_proj.") || n.contains(".self_attn.k_proj.")) && !n.ends_with(".bias")).cloned().collect();
        for name in names {
            if let Some(array) = tensors.remove(&name) {
                tensors.insert(name.clone(), unpermute_rows(&array, heads(&name))?);
            }
        }
    }
    // llama.cpp stores Gemma's norms as `1 + w`; the Hugging Face convention is `w`.
    if model_type.starts_with("gemma") {
        let names: Vec<String> = tensors.keys().filter(|n| n.ends_with("norm.weight")).cloned().collect();
        for name in names {
            if let Some(array) = tensors.remove(&name) {
                tensors.insert(name, array.as_dtype(Dtype::Float32)?.subtract(Array::from_f32(1.0))?);
            }
        }
    }
    config["tie_word_embeddings"] = (!tensors.contains_key("lm_head.weight")).into();
    let vocab = gguf_vocabulary(&header, tokens.clone());
    let token_id = |name: &str| header.number(name).map(|n| n as u32);
    let bos_token = token_id("tokenizer.ggml.bos_token_id").and_then(|id| tokens.get(id as usize).map(|t| (id, t.clone())));
    let mut eos_token_ids: Vec<u32> =
        ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"].iter().filter_map(|k| token_id(k)).collect();
    eos_token_ids.sort_unstable();
    eos_token_ids.dedup();
    let eos_text = eos_token_ids.first().and_then(|id| tokens.get(*id as usize)).cloned().unwrap_or_default();
    let add_bos = header.number("tokenizer.ggml.add_bos_token").map(|v| v != 0.0).unwrap_or(arch == "llama" && bos_token.is_some());
    let chat_template = header.string("tokenizer.chat_template");
    let file_type = header.number("general.file_type").and_then(|code| file_type_name(code as u32)).map(str::to_string);
    let tokenizer = tokenizer::from_gguf(vocab)?;
    Ok(GgufContents { arch, config, tensors, tokenizer, chat_template, bos_token, eos_token_ids, eos_text, add_bos, file_type })
}

fn load_gguf(path: &Path, device: DevicePolicy) -> Result<LoadedModel> {
    let contents = read_gguf(path)?;
    let template = ChatTemplate::new(contents.chat_template, contents.bos_token.as_ref().map(|(_, t)| t.as_str()).unwrap_or(""), &contents.eos_text)?;
    let config = decoder_config(path, &contents.config)?;
    let tensors = Tensors { source: path.to_path_buf(), arrays: contents.tensors, quantization: QuantSpec::gguf() };
    let model = build_decoder(tensors, &contents.config, config, device)?;
    let frontend = ChatFrontend {
        tokenizer: Arc::new(contents.tokenizer),
        template,
        bos_token: contents.bos_token,
        add_bos: contents.add_bos,
        eos_token_ids: contents.eos_token_ids,
        context_length: model.config.max_position_embeddings,
        vocab_size: model.config.vocab_size as usize,
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

fn load_hf_decoder(folder: &Path, config: &Value, device: DevicePolicy) -> Result<LoadedModel> {
    let decoder = decoder_config(folder, config)?;
    let quantization = QuantSpec::from_config(config);
    let arrays = load_safetensors(folder)?;
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
    let tensors = Tensors { source: folder.to_path_buf(), arrays, quantization };
    let model = build_decoder(tensors, config, decoder, device)?;
    let context_length = model.config.max_position_embeddings;
    let vocab_size = model.config.vocab_size as usize;
    let frontend = ChatFrontend { tokenizer, template, bos_token, add_bos, eos_token_ids, context_length, vocab_size };
    Ok(LoadedModel::Chat { model, frontend: Arc::new(frontend) })
}

fn load_bert(folder: &Path, config: &Value, device: DevicePolicy) -> Result<LoadedModel> {
    let number = |key: &str| config[key].as_f64().ok_or_else(|| invalid(folder, format!("config.json has no {key}")));
    let mut arrays = load_safetensors(folder)?;
    let policy = device.for_model(native_dtype(&arrays, config));
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
    // MLXSERVER_HOST_KERNELS=0 keeps MLX's own ops on the CPU too (benchmarks compare both).
    let host_kernels = super::device::detect() == super::device::Backend::Cpu && std::env::var("MLXSERVER_HOST_KERNELS").map_or(true, |v| v != "0");
    let mut layers = Vec::with_capacity(bert.num_layers);
    for index in 0..bert.num_layers {
        let prefix = format!("encoder.layer.{index}");
        let qkv = vec![
            tensors.linear(&format!("{prefix}.attention.self.query"), policy)?,
            tensors.linear(&format!("{prefix}.attention.self.key"), policy)?,
            tensors.linear(&format!("{prefix}.attention.self.value"), policy)?,
        ];
        layers.push(BertLayer {
            // The host path reads q/k/v from one stacked product; a GPU keeps MLX's three.
            qkv: if host_kernels { Projections::new(qkv)? } else { Projections::Separate(qkv) },
            attention_output: tensors.linear(&format!("{prefix}.attention.output.dense"), policy)?,
            attention_norm: norm(&mut tensors, &format!("{prefix}.attention.output.LayerNorm"))?,
            intermediate: tensors.linear(&format!("{prefix}.intermediate.dense"), policy)?,
            output: tensors.linear(&format!("{prefix}.output.dense"), policy)?,
            output_norm: norm(&mut tensors, &format!("{prefix}.output.LayerNorm"))?,
        });
    }
    // A cross-encoder's head: `bert.pooler.dense` (prefix stripped above) and `classifier`.
    let head = if is_cross_encoder(config) {
        let pooler = tensors.linear("pooler.dense", policy)?;
        let classifier = tensors.linear("classifier", policy)?;
        // Rows of the weight, dense or packed.
        let num_labels = classifier.weight.arrays()[0].dim(0).max(0) as usize;
        if num_labels == 0 {
            return Err(invalid(folder, "classifier.weight has no rows"));
        }
        Some(ClassifierHead { pooler, classifier, num_labels })
    } else {
        None
    };
    let mut tokenizer = tokenizer::from_file(&folder.join("tokenizer.json"))?;
    tokenizer
        .with_truncation(Some(tokenizers::TruncationParams { max_length: max_tokens, ..Default::default() }))
        .map_err(|error| EngineError::Tokenizer(error.to_string()))?;
    let dimensions = bert.hidden_size as usize;
    let cross_encoder = head.is_some();
    let model = BertModel { config: bert, word_embeddings, position_embeddings, token_type_embeddings, embeddings_norm, layers, pooling, normalize, head, host_kernels };
    let frontend = EmbedFrontend { tokenizer: Arc::new(tokenizer), dimensions, max_tokens, cross_encoder };
    Ok(LoadedModel::Embedding { model, frontend: Arc::new(frontend) })
}
