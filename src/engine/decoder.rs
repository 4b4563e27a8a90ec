//! Decoder-only transformers of every supported family, as one configurable model.
//!
//! The families differ in a small set of choices — where norms sit, whether q/k are
//! normalized, how RoPE is scaled (or skipped), soft-capping, sliding windows, multipliers,
//! dense or mixture-of-experts feed-forward — so they are fields of [`DecoderConfig`], read
//! from a Hugging Face `config.json` by [`DecoderConfig::from_hf`]. The semantics follow
//! mlx-lm's model files (`mlx_lm/models/<family>.py`), which the reference tests check.
//!
//! The forward pass takes a whole batch: prefill runs one sequence at a time over its own
//! cache, decode runs every running sequence in one step over a left-padded [`BatchCache`]
//! with RoPE applied per row by MLX's fused kernel (positions as an array).

use mlx_rs::fast::{self, ScaledDotProductAttentionMask};
use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::error::Exception;
use mlx_rs::{ops, Array, Dtype};
use serde_json::Value;

use super::nn::{BatchCache, Embedding, KvCache, Linear, Projections, Result, Weight};
use super::EngineError;

/// A prompt chunk of at least this many tokens is evaluated in pieces of layers where the
/// model asks for it ([`DecoderModel::prompt_piece_layers`]).
const PROMPT_PIECE_MIN_TOKENS: i32 = 64;
/// Layers per piece on a GPU: at most this many layers' temporaries are held at once.
pub const GPU_PROMPT_PIECE_LAYERS: usize = 8;

/// The model families this engine runs, by Hugging Face `model_type`.
pub const SUPPORTED_FAMILIES: &[&str] = &[
    "llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "phi3", "gemma2", "gemma3_text", "smollm3", "olmo2", "granite", "mixtral", "exaone4", "cohere2",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// GELU, tanh approximation (Gemma).
    GeluTanh,
}

/// Where the norms of a block sit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockLayout {
    /// `x + attn(norm(x))`, `h + mlp(norm(h))` (Llama and most others).
    PreNorm,
    /// Gemma 2/3: pre- and post-norms around both attention and the MLP.
    Sandwich,
    /// OLMo 2: `x + norm(attn(x))`, `h + norm(mlp(h))`.
    PostNorm,
    /// Cohere 2: one norm feeds attention and the MLP side by side, `x + attn(n) + mlp(n)`.
    Parallel,
}

/// The normalization of the residual stream (q/k norms are always RMSNorm).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    Rms,
    /// Mean-centered LayerNorm with a weight and no bias (Cohere 2).
    Layer,
}

/// How q and k are normalized before RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// RMSNorm over each head (Qwen3, Gemma 3).
    PerHead,
    /// RMSNorm over the whole projection (OLMo 2).
    Full,
}

/// How a mixture-of-experts layer turns router logits into expert weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// Softmax over all experts, then the top k (optionally renormalized): Qwen3-MoE.
    SoftmaxTopK { normalize: bool },
    /// Top k logits, then a softmax over those: Mixtral.
    TopKSoftmax,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MoeConfig {
    pub num_experts: i32,
    pub top_k: i32,
    pub routing: Routing,
}

/// Rotary embedding of one kind (a model may use two: Gemma 3's local and global layers).
#[derive(Debug, Clone)]
pub struct Rope {
    /// Leading features of each head that rotate (partial rotary: fewer than head_dim).
    pub dims: i32,
    pub traditional: bool,
    pub base: f32,
    /// Per-pair frequencies when scaling computes them (llama3, longrope, yarn).
    pub freqs: Option<Array>,
    /// Positions are multiplied by this (linear scaling: 1/factor).
    pub position_scale: f32,
    /// The rotated features are multiplied by this first (longrope's and yarn's mscale).
    pub input_scale: f32,
}

/// Per-layer attention choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerKind {
    /// Index into the model's ropes; None: this layer has no positional encoding (NoPE).
    pub rope: Option<usize>,
    /// Attend only to this many most recent positions.
    pub window: Option<i32>,
    pub moe: bool,
}

#[derive(Debug, Clone)]
pub struct DecoderConfig {
    pub family: String,
    pub hidden_size: i32,
    pub num_layers: usize,
    pub num_heads: i32,
    pub num_kv_heads: i32,
    pub head_dim: i32,
    pub intermediate_size: i32,
    pub vocab_size: i32,
    pub norm_eps: f32,
    /// Gemma's norms compute with `1 + w`.
    pub norm_offset: bool,
    pub layout: BlockLayout,
    pub qk_norm: QkNorm,
    pub activation: Activation,
    pub attention_scale: f32,
    pub attn_softcap: Option<f32>,
    pub final_softcap: Option<f32>,
    pub embed_scale: Option<f32>,
    pub residual_scale: f32,
    /// Logits are divided by this (Granite's `logits_scaling`).
    pub logits_divisor: f32,
    /// Logits are multiplied by this (Cohere's `logit_scale`).
    pub logits_multiplier: f32,
    pub norm_kind: NormKind,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    pub ropes: Vec<Rope>,
    pub layers: Vec<LayerKind>,
    pub moe: Option<MoeConfig>,
    /// Separate `w1/w2/w3` names of Mixtral experts in Hugging Face checkpoints.
    pub fused_qkv: bool,
    pub fused_gate_up: bool,
}

fn invalid(detail: impl std::fmt::Display) -> EngineError {
    EngineError::InvalidModel(detail.to_string())
}

fn rope_from_hf(config: &Value, dims: i32, base: f32, scaling: &Value, max_positions: usize) -> Result<Rope> {
    let kind = scaling["rope_type"].as_str().or_else(|| scaling["type"].as_str()).unwrap_or("default");
    let number = |key: &str, default: f64| scaling[key].as_f64().unwrap_or(default);
    let default_freqs = || -> Vec<f32> { (0..dims / 2).map(|i| base.powf(2.0 * i as f32 / dims as f32)).collect() };
    let mut rope = Rope { dims, traditional: config["rope_traditional"].as_bool().unwrap_or(false), base, freqs: None, position_scale: 1.0, input_scale: 1.0 };
    match kind {
        "default" | "" => {}
        "linear" => rope.position_scale = 1.0 / number("factor", 1.0) as f32,
        "llama3" => {
            let factor = number("factor", 8.0) as f32;
            let low = number("low_freq_factor", 1.0) as f32;
            let high = number("high_freq_factor", 4.0) as f32;
            let old = number("original_max_position_embeddings", 8192.0) as f32;
            let (low_wavelen, high_wavelen) = (old / low, old / high);
            let freqs: Vec<f32> = default_freqs()
                .into_iter()
                .map(|freq| {
                    let wavelen = 2.0 * std::f32::consts::PI * freq;
                    if wavelen > low_wavelen {
                        freq * factor
                    } else if wavelen > high_wavelen {
                        let smooth = (old / wavelen - low) / (high - low);
                        freq / ((1.0 - smooth) / factor + smooth)
                    } else {
                        freq
                    }
                })
                .collect();
            rope.freqs = Some(Array::from_slice(&freqs, &[dims / 2]));
        }
        "longrope" | "su" => {
            // mlx-lm's phi3 reads the top-level key (the one Phi-3 configs carry).
            let original = config["original_max_position_embeddings"]
                .as_f64()
                .or_else(|| scaling["original_max_position_embeddings"].as_f64())
                .unwrap_or(4096.0);
            let long: Vec<f32> = scaling["long_factor"].as_array().map(|v| v.iter().filter_map(Value::as_f64).map(|f| f as f32).collect()).unwrap_or_default();
            if long.len() != (dims / 2) as usize {
                return Err(invalid(format!("rope_scaling long_factor has {} values, expected {}", long.len(), dims / 2)));
            }
            let freqs: Vec<f32> = default_freqs().iter().zip(&long).map(|(f, l)| f * l).collect();
            rope.freqs = Some(Array::from_slice(&freqs, &[dims / 2]));
            let factor = max_positions as f64 / original;
            rope.input_scale = match scaling["long_mscale"].as_f64() {
                Some(mscale) => mscale as f32,
                None if factor <= 1.0 => 1.0,
                None => (1.0 + factor.ln() / original.ln()).sqrt() as f32,
            };
        }
        "yarn" => {
            let factor = number("factor", 1.0);
            let original = number("original_max_position_embeddings", 4096.0);
            let beta_fast = number("beta_fast", 32.0);
            let beta_slow = number("beta_slow", 1.0);
            let mscale = number("mscale", 1.0);
            let mscale_all_dim = number("mscale_all_dim", 0.0);
            let d = f64::from(dims);
            let b = f64::from(base);
            let correction = |rotations: f64| d * (original / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * b.ln());
            let low = correction(beta_fast).floor().max(0.0);
            let high = correction(beta_slow).ceil().min(d - 1.0);
            let get_mscale = |scale: f64, m: f64| if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 };
            rope.input_scale = (get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)) as f32;
            let high = if low == high { high + 0.001 } else { high };
            let freqs: Vec<f32> = (0..dims / 2)
                .map(|i| {
                    let extra = b.powf(2.0 * f64::from(i) / d);
                    let inter = factor * extra;
                    let ramp = ((f64::from(i) - low) / (high - low)).clamp(0.0, 1.0);
                    let mask = 1.0 - ramp;
                    ((inter * extra) / (inter * mask + extra * (1.0 - mask))) as f32
                })
                .collect();
            rope.freqs = Some(Array::from_slice(&freqs, &[dims / 2]));
        }
        "dynamic" => {
            // Dynamic NTK changes the base only past the trained length; within it (and
            // contexts are capped at max_position_embeddings) it is plain RoPE.
        }
        other => return Err(EngineError::UnsupportedArchitecture(format!("rope scaling '{other}'"))),
    }
    Ok(rope)
}

impl DecoderConfig {
    /// Reads a Hugging Face `config.json` of a supported family.
    pub fn from_hf(config: &Value) -> Result<DecoderConfig> {
        let family = config["model_type"].as_str().unwrap_or_default().to_string();
        let family = match family.as_str() {
            "smollm" | "smollm2" => "llama".to_string(),
            "gemma3" if config["text_config"].is_object() => return DecoderConfig::from_hf(&config["text_config"]),
            "gemma3" => "gemma3_text".to_string(),
            _ => family,
        };
        if !SUPPORTED_FAMILIES.contains(&family.as_str()) {
            let shown = if family.is_empty() { "(no model_type)".to_string() } else { family };
            return Err(EngineError::UnsupportedArchitecture(format!("{shown}; supported: {}", SUPPORTED_FAMILIES.join(", "))));
        }
        let number = |key: &str| config[key].as_f64();
        let required = |key: &str| number(key).ok_or_else(|| invalid(format!("config.json has no {key}")));
        let hidden_size = required("hidden_size")? as i32;
        let num_heads = required("num_attention_heads")? as i32;
        let num_layers = required("num_hidden_layers")? as usize;
        if hidden_size <= 0 || num_heads <= 0 || num_layers == 0 || num_layers > 1024 {
            return Err(invalid("config.json has a non-positive size"));
        }
        let head_dim = number("head_dim").map(|n| n as i32).unwrap_or(hidden_size / num_heads);
        let num_kv_heads = number("num_key_value_heads").map(|n| n as i32).unwrap_or(num_heads);
        if num_kv_heads <= 0 || num_heads % num_kv_heads != 0 || head_dim <= 0 || head_dim % 2 != 0 {
            return Err(invalid(format!("config.json: {num_heads} heads, {num_kv_heads} key/value heads, head_dim {head_dim} do not fit together")));
        }
        let max_position_embeddings = number("max_position_embeddings").unwrap_or(4096.0).max(1.0) as usize;
        let base = number("rope_theta").or_else(|| config["rope_parameters"]["rope_theta"].as_f64()).unwrap_or(10000.0) as f32;
        let scaling = if config["rope_scaling"].is_object() { config["rope_scaling"].clone() } else { config["rope_parameters"].clone() };
        let partial = number("partial_rotary_factor").unwrap_or(1.0);
        let rope_dims = ((f64::from(head_dim) * partial) as i32) & !1;
        let gemma = family.starts_with("gemma");
        let mut ropes = vec![rope_from_hf(config, rope_dims, base, &scaling, max_position_embeddings)?];
        if family == "cohere2" {
            // Cohere rotates interleaved pairs (transformers' repeat_interleave, mlx-lm's
            // traditional RoPE).
            ropes[0].traditional = true;
        }
        let window = config["sliding_window"].as_i64().filter(|w| *w > 0).map(|w| w as i32);
        // transformers' per-layer kinds ("sliding_attention" / "full_attention"), when listed
        let layer_types: Vec<&str> = config["layer_types"].as_array().map(|l| l.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
        let moe_layer = |index: usize| -> bool {
            match family.as_str() {
                "mixtral" => true,
                "qwen3_moe" => {
                    let only_dense = config["mlp_only_layers"].as_array().is_some_and(|l| l.iter().any(|v| v.as_u64() == Some(index as u64)));
                    let step = config["decoder_sparse_step"].as_u64().unwrap_or(1).max(1) as usize;
                    !only_dense && config["num_experts"].as_u64().unwrap_or(0) > 0 && (index + 1) % step == 0
                }
                _ => false,
            }
        };
        let layers: Vec<LayerKind> = match family.as_str() {
            "gemma3_text" => {
                let pattern = config["sliding_window_pattern"].as_u64().unwrap_or(6).max(1) as usize;
                let local_base = number("rope_local_base_freq").unwrap_or(10000.0) as f32;
                ropes.push(Rope { dims: rope_dims, traditional: false, base: local_base, freqs: None, position_scale: 1.0, input_scale: 1.0 });
                (0..num_layers)
                    .map(|i| {
                        let global = i % pattern == pattern - 1;
                        LayerKind { rope: Some(if global { 0 } else { 1 }), window: if global { None } else { window }, moe: false }
                    })
                    .collect()
            }
            "gemma2" => {
                // Even layers slide, as in transformers and llama.cpp (`layer_types` when the
                // config lists them); mlx-lm's gemma2 attends globally everywhere, which
                // differs once a chat is longer than the window (tests/it/families.rs,
                // sliding windows against transformers).
                (0..num_layers)
                    .map(|i| {
                        let sliding = layer_types.get(i).map_or(i % 2 == 0, |kind| *kind == "sliding_attention");
                        LayerKind { rope: Some(0), window: if sliding { window } else { None }, moe: false }
                    })
                    .collect()
            }
            "smollm3" => {
                let no_rope: Vec<u64> = config["no_rope_layers"].as_array().map(|l| l.iter().filter_map(Value::as_u64).collect()).unwrap_or_default();
                let interval = config["no_rope_layer_interval"].as_u64().unwrap_or(4).max(1) as usize;
                (0..num_layers)
                    .map(|i| {
                        let uses_rope = match no_rope.get(i) {
                            Some(flag) => *flag != 0,
                            None => (i + 1) % interval != 0,
                        };
                        LayerKind { rope: uses_rope.then_some(0), window: None, moe: false }
                    })
                    .collect()
            }
            "exaone4" | "cohere2" => {
                // transformers: `layer_types`, else `sliding_window_pattern` (EXAONE's "LLLG":
                // a letter per layer, repeating; n: every n-th layer global); no window
                // configured means every layer global. When there is a window, global layers
                // have no RoPE. Cohere's pattern defaults to every 4th layer global.
                let pattern = &config["sliding_window_pattern"];
                let default_every = if family == "cohere2" { 4 } else { 0 };
                let sliding = |i: usize| -> bool {
                    if window.is_none() {
                        return false;
                    }
                    if let Some(kind) = layer_types.get(i) {
                        return *kind == "sliding_attention";
                    }
                    match (pattern.as_str(), pattern.as_u64().or_else(|| pattern.is_null().then_some(default_every))) {
                        (Some(letters), _) if !letters.is_empty() => letters.as_bytes()[i % letters.len()] == b'L',
                        (_, Some(every)) if every > 0 => (i + 1) % every as usize != 0,
                        _ => false,
                    }
                };
                (0..num_layers)
                    .map(|i| {
                        let local = sliding(i);
                        LayerKind { rope: (local || window.is_none()).then_some(0), window: if local { window } else { None }, moe: false }
                    })
                    .collect()
            }
            "mistral" | "mixtral" | "qwen2" | "qwen3" | "qwen3_moe" => {
                let use_window = family == "mistral" || family == "mixtral" || config["use_sliding_window"].as_bool().unwrap_or(false);
                (0..num_layers).map(|i| LayerKind { rope: Some(0), window: if use_window { window } else { None }, moe: moe_layer(i) }).collect()
            }
            _ => (0..num_layers).map(|i| LayerKind { rope: Some(0), window: None, moe: moe_layer(i) }).collect(),
        };
        let moe = match family.as_str() {
            "mixtral" => Some(MoeConfig {
                num_experts: required("num_local_experts")? as i32,
                top_k: number("num_experts_per_tok").unwrap_or(2.0) as i32,
                routing: Routing::TopKSoftmax,
            }),
            "qwen3_moe" => Some(MoeConfig {
                num_experts: required("num_experts")? as i32,
                top_k: number("num_experts_per_tok").unwrap_or(8.0) as i32,
                routing: Routing::SoftmaxTopK { normalize: config["norm_topk_prob"].as_bool().unwrap_or(false) },
            }),
            _ => None,
        };
        if let Some(moe) = &moe {
            if moe.top_k <= 0 || moe.top_k > moe.num_experts {
                return Err(invalid(format!("config.json: {} experts per token of {}", moe.top_k, moe.num_experts)));
            }
        }
        let granite = family == "granite";
        let attention_scale = if gemma {
            (number("query_pre_attn_scalar").unwrap_or(f64::from(head_dim)) as f32).powf(-0.5)
        } else if granite {
            number("attention_multiplier").unwrap_or(1.0) as f32
        } else {
            (head_dim as f32).powf(-0.5)
        };
        let embed_scale = if family == "gemma3_text" {
            // Gemma 3 rounds the scale to bfloat16 (34.0 rather than 33.94 for hidden 1152).
            Some(half::bf16::from_f32((hidden_size as f32).sqrt()).to_f32())
        } else if gemma {
            Some((hidden_size as f32).sqrt())
        } else if granite {
            number("embedding_multiplier").map(|m| m as f32)
        } else {
            None
        };
        let default_eps = if gemma { 1e-6 } else { 1e-5 };
        Ok(DecoderConfig {
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            intermediate_size: number("intermediate_size").unwrap_or(0.0) as i32,
            vocab_size: required("vocab_size")? as i32,
            norm_eps: number("rms_norm_eps").or_else(|| number("layer_norm_eps")).unwrap_or(default_eps) as f32,
            norm_offset: gemma,
            layout: match family.as_str() {
                "gemma2" | "gemma3_text" => BlockLayout::Sandwich,
                "olmo2" | "exaone4" => BlockLayout::PostNorm,
                "cohere2" => BlockLayout::Parallel,
                _ => BlockLayout::PreNorm,
            },
            qk_norm: match family.as_str() {
                "qwen3" | "qwen3_moe" | "gemma3_text" | "exaone4" => QkNorm::PerHead,
                "olmo2" => QkNorm::Full,
                _ => QkNorm::None,
            },
            activation: if gemma { Activation::GeluTanh } else { Activation::Silu },
            attention_scale,
            attn_softcap: if family == "gemma2" { number("attn_logit_softcapping").map(|c| c as f32) } else { None },
            final_softcap: if family == "gemma2" { number("final_logit_softcapping").map(|c| c as f32) } else { None },
            embed_scale,
            residual_scale: if granite { number("residual_multiplier").unwrap_or(1.0) as f32 } else { 1.0 },
            logits_divisor: if granite { number("logits_scaling").unwrap_or(1.0) as f32 } else { 1.0 },
            logits_multiplier: if family == "cohere2" { number("logit_scale").unwrap_or(0.0625) as f32 } else { 1.0 },
            norm_kind: if family == "cohere2" { NormKind::Layer } else { NormKind::Rms },
            tie_word_embeddings: config["tie_word_embeddings"].as_bool().unwrap_or(gemma || family == "cohere2"),
            max_position_embeddings,
            ropes,
            layers,
            moe,
            fused_qkv: family == "phi3",
            fused_gate_up: family == "phi3",
            family,
        })
    }

    /// Parameters of the model (weights of embeddings, attention and feed-forward layers).
    pub fn parameter_count(&self) -> u64 {
        let h = i64::from(self.hidden_size);
        let attention = h * i64::from(self.head_dim) * i64::from(2 * self.num_heads + 2 * self.num_kv_heads);
        let dense = 3 * h * i64::from(self.intermediate_size);
        let mut total = i64::from(self.vocab_size) * h * if self.tie_word_embeddings { 1 } else { 2 };
        for layer in &self.layers {
            total += attention;
            total += match (&self.moe, layer.moe) {
                (Some(moe), true) => i64::from(moe.num_experts) * 3 * h * i64::from(self.intermediate_size) + h * i64::from(moe.num_experts),
                _ => dense,
            };
        }
        total.max(0) as u64
    }
}

/// Stacked expert weights `[experts, out, in]`, dense or quantized.
pub struct Experts {
    pub weight: Weight,
}

impl Experts {
    /// `x`: `[N, k or 1, 1, in]`, `indices`: `[N, k]` → `[N, k, 1, out]`.
    fn forward(&self, x: &Array, indices: &Array) -> Result<Array> {
        Ok(match &self.weight {
            Weight::Dense(w) => ops::gather_mm(x, w.swap_axes(-1, -2)?, None, indices, None)?,
            Weight::Quantized(q) => ops::gather_qmm(x, &q.weight, &q.scales, &q.biases, None, indices, true, q.group_size, q.bits, None)?,
        })
    }

    pub fn arrays(&self) -> Vec<&Array> {
        self.weight.arrays()
    }
}

pub enum FeedForward {
    Dense { gate_up: Projections, down: Linear },
    Experts { router: Linear, gate: Experts, up: Experts, down: Experts },
}

pub struct Layer {
    pub input_norm: Option<Array>,
    /// Applied to the attention output (Gemma, OLMo 2).
    pub post_attention_norm: Option<Array>,
    /// Before the feed-forward (Llama's `post_attention_layernorm`, Gemma's
    /// `pre_feedforward_layernorm`).
    pub pre_ff_norm: Option<Array>,
    pub post_ff_norm: Option<Array>,
    pub q_norm: Option<Array>,
    pub k_norm: Option<Array>,
    pub qkv: Projections,
    pub o_proj: Linear,
    pub ff: FeedForward,
}

pub struct DecoderModel {
    pub config: DecoderConfig,
    pub embed_tokens: Embedding,
    pub layers: Vec<Layer>,
    pub norm: Array,
    /// `None` when the output projection is the embedding table.
    pub lm_head: Option<Linear>,
    /// Activation dtype: the dtype of norms and dense weights (the loader's policy).
    pub dtype: Dtype,
    /// Evaluate long prompt chunks every this many layers (the loader sets
    /// GPU_PROMPT_PIECE_LAYERS on a GPU: MLX's GPU backends hold each kernel's temporaries
    /// until its command buffer completes).
    pub prompt_piece_layers: Option<usize>,
}

/// One sequence's place in a prefill pass.
pub struct SequenceSlot<'a> {
    pub cache: &'a mut [KvCache],
}

/// Where the tokens of a forward pass sit.
enum Positions<'a> {
    /// One sequence starting at this offset.
    Single(i32),
    /// One new token per row, at these positions (`[B]` int32).
    Rows(&'a Array),
}

/// GELU with the tanh approximation, `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, in the
/// input's dtype (mlx-rs's own version multiplies by float32 scalars). `x^3` is one
/// `power` as in mlx's `nn.gelu_approx` (`x**3`): in bfloat16, `x * x * x` rounds twice and
/// moved gemma3_text's logits by 1.5 bf16 ulps against mlx-lm (tests/it/families.rs,
/// every_family_loads_sharded_bfloat16_like_mlx_lm).
fn gelu_tanh(x: &Array) -> std::result::Result<Array, Exception> {
    // Scalars in x's dtype: float32 ones would promote half-precision activations.
    let scalar = |value: f32| Array::from_f32(value).as_dtype(x.dtype());
    let cube = x.power(scalar(3.0)?)?;
    let inner = x.add(cube.multiply(scalar(0.044715)?)?)?.multiply(scalar((2.0 / std::f32::consts::PI).sqrt())?)?;
    x.multiply(scalar(0.5)?)?.multiply(ops::tanh(&inner)?.add(scalar(1.0)?)?)
}

type CompiledPair = Box<dyn FnMut(&[Array]) -> std::result::Result<Vec<Array>, Exception>>;

thread_local! {
    // One traced function per activation and thread (the engine's worker builds every graph).
    static GATED: std::cell::RefCell<[Option<CompiledPair>; 2]> = const { std::cell::RefCell::new([None, None]) };
}

/// `activation(gate) * up` as one fused kernel, traced once, as mlx-lm's compiled `swiglu`.
/// (mlx-rs's `nn::silu` compiles a fresh function on every call and so re-traces it: 23 µs
/// of host time per layer and step against 3.7 µs, `cargo run --example op_overhead`.)
fn gated(activation: Activation, gate: &Array, up: &Array) -> Result<Array> {
    GATED.with(|cell| {
        let mut slots = cell.borrow_mut();
        let slot = &mut slots[activation as usize];
        let compiled = slot.get_or_insert_with(|| match activation {
            Activation::Silu => Box::new(mlx_rs::transforms::compile::compile(
                |args: &[Array]| -> std::result::Result<Vec<Array>, Exception> { Ok(vec![args[0].multiply(ops::sigmoid(&args[0])?)?.multiply(&args[1])?]) },
                true,
            )),
            Activation::GeluTanh => Box::new(mlx_rs::transforms::compile::compile(
                |args: &[Array]| -> std::result::Result<Vec<Array>, Exception> { Ok(vec![gelu_tanh(&args[0])?.multiply(&args[1])?]) },
                true,
            )),
        });
        let mut out = compiled(&[gate.clone(), up.clone()])?;
        out.pop().ok_or_else(|| EngineError::Mlx("the fused activation returned nothing".into()))
    })
}

fn rms_norm(x: &Array, weight: &Array, eps: f32) -> Result<Array> {
    Ok(fast::rms_norm(x, Some(weight), eps)?)
}

/// The residual stream's norm of `config`'s kind.
fn stream_norm(config: &DecoderConfig, x: &Array, weight: &Array) -> Result<Array> {
    match config.norm_kind {
        NormKind::Rms => rms_norm(x, weight, config.norm_eps),
        NormKind::Layer => Ok(fast::layer_norm(x, Some(weight), None::<&Array>, config.norm_eps)?),
    }
}

/// Additive mask `[L, T]` for `L` queries at positions `offset..offset+L` over keys
/// `0..T`: causal, and limited to the last `window` positions when given.
fn prefill_mask(length: i32, offset: i32, window: Option<i32>, dtype: Dtype) -> Result<Array> {
    let total = offset + length;
    let mut values = Vec::with_capacity((length * total) as usize);
    for query in 0..length {
        let position = offset + query;
        for key in 0..total {
            let visible = key <= position && window.is_none_or(|w| key > position - w);
            values.push(if visible { 0.0f32 } else { f32::NEG_INFINITY });
        }
    }
    Ok(Array::from_slice(&values, &[length, total]).as_dtype(dtype)?)
}

impl Rope {
    fn apply(&self, x: &Array, positions: &Positions<'_>, head_dim: i32) -> Result<Array> {
        let scaled;
        let x = if self.input_scale != 1.0 {
            scaled = if self.dims == head_dim {
                x.multiply(Array::from_f32(self.input_scale).as_dtype(x.dtype())?)?
            } else {
                let factors: Vec<f32> = (0..head_dim).map(|i| if i < self.dims { self.input_scale } else { 1.0 }).collect();
                x.multiply(Array::from_slice(&factors, &[head_dim]).as_dtype(x.dtype())?)?
            };
            &scaled
        } else {
            x
        };
        let base = if self.freqs.is_some() { None } else { Some(self.base) };
        Ok(match positions {
            Positions::Single(offset) => fast::rope(x, self.dims, self.traditional, base, self.position_scale, *offset, self.freqs.as_ref())?,
            Positions::Rows(offsets) => fast::rope_dynamic(x, self.dims, self.traditional, base, self.position_scale, *offsets, self.freqs.as_ref())?,
        })
    }
}

impl DecoderModel {
    pub fn new_cache(&self) -> Vec<KvCache> {
        (0..self.config.num_layers).map(|_| KvCache::new()).collect()
    }

    fn embed(&self, tokens: &Array) -> Result<Array> {
        let x = self.embed_tokens.forward(tokens)?;
        let x = if x.dtype() != self.dtype { x.as_dtype(self.dtype)? } else { x };
        Ok(match self.config.embed_scale {
            Some(scale) => x.multiply(Array::from_f32(scale).as_dtype(self.dtype)?)?,
            None => x,
        })
    }

    fn logits(&self, hidden: &Array) -> Result<Array> {
        let logits = match &self.lm_head {
            Some(head) => head.forward(hidden)?,
            None => self.embed_tokens.as_linear(hidden)?,
        };
        // A division by the divisor in the logits' dtype, as mlx-lm's granite does
        // (`logits / logits_scaling`): multiplying by 1/1.6 instead differs by a bf16 ulp
        // since bf16(1.6) != 1.6 (tests/it/families.rs, bfloat16 test).
        let logits = if self.config.logits_divisor != 1.0 { logits.divide(Array::from_f32(self.config.logits_divisor).as_dtype(logits.dtype())?)? } else { logits };
        let logits = if self.config.logits_multiplier != 1.0 { logits.multiply(Array::from_f32(self.config.logits_multiplier).as_dtype(logits.dtype())?)? } else { logits };
        Ok(match self.config.final_softcap {
            Some(cap) => {
                let cap_array = Array::from_f32(cap).as_dtype(logits.dtype())?;
                ops::tanh(logits.divide(&cap_array)?)?.multiply(&cap_array)?
            }
            None => logits,
        })
    }

    /// Attention of `q` (`[B, H, L, D]`) over `keys`/`values` (`[B, KVH, T, D]`).
    fn attend(&self, q: &Array, keys: &Array, values: &Array, mask: Option<&Array>, causal: bool) -> Result<Array> {
        let config = &self.config;
        let Some(cap) = config.attn_softcap else {
            let mask = match (mask, causal) {
                (Some(mask), _) => Some(ScaledDotProductAttentionMask::Array(mask)),
                (None, true) => Some(ScaledDotProductAttentionMask::Causal),
                (None, false) => None,
            };
            return Ok(fast::scaled_dot_product_attention(q, keys, values, config.attention_scale, mask, None)?);
        };
        // Soft-capped scores need the explicit form (as mlx-lm's gemma2 does).
        let (batch, length) = (q.dim(0), q.dim(2));
        let repeats = config.num_heads / config.num_kv_heads;
        let q = q.multiply(Array::from_f32(config.attention_scale).as_dtype(q.dtype())?)?;
        let q = q.reshape(&[batch, config.num_kv_heads, repeats, length, config.head_dim])?;
        let keys = keys.expand_dims(2)?;
        let values = values.expand_dims(2)?;
        let scores = ops::matmul(&q, keys.swap_axes(-1, -2)?)?;
        let cap_array = Array::from_f32(cap).as_dtype(scores.dtype())?;
        let mut scores = ops::tanh(scores.divide(&cap_array)?)?.multiply(&cap_array)?;
        let causal_mask;
        let mask = match (mask, causal) {
            (Some(mask), _) => Some(mask),
            (None, true) => {
                let total = keys.dim(-2);
                causal_mask = prefill_mask(length, total - length, None, scores.dtype())?;
                Some(&causal_mask)
            }
            (None, false) => None,
        };
        if let Some(mask) = mask {
            // `[B, 1, 1, T]` or `[L, T]` broadcast over the kv-head and repeat axes.
            let mask = if mask.ndim() == 4 { mask.expand_dims(2)? } else { mask.clone() };
            scores = scores.add(mask)?;
        }
        let weights = ops::softmax_axis(&scores, -1, true)?;
        let output = ops::matmul(&weights, &values)?;
        Ok(output.reshape(&[batch, config.num_heads, length, config.head_dim])?)
    }

    /// q, k, v of a layer for `h` (`[B, L, hidden]`), normalized and rotated, `[B, heads, L, D]`.
    fn project(&self, layer: &Layer, kind: &LayerKind, h: &Array, positions: &Positions<'_>) -> Result<(Array, Array, Array)> {
        let config = &self.config;
        let (batch, length) = (h.dim(0), h.dim(1));
        let (heads, kv_heads, dim) = (config.num_heads, config.num_kv_heads, config.head_dim);
        // `[B, L, n·D]` as `[B, n, L, D]`. With one token per row the two orders are the same
        // bytes, so a reshape does it without a transpose node (fewer nodes for MLX to encode
        // on every decode step).
        let head_major = |y: &Array, count: i32| -> Result<Array> {
            Ok(if length == 1 { y.reshape(&[batch, count, 1, dim])? } else { y.reshape(&[batch, length, count, dim])?.transpose_axes(&[0, 2, 1, 3])? })
        };
        let by_heads = match &layer.qkv {
            // One matmul for q, k and v, split by heads after the reshape: three slice views
            // instead of three slices and three reshapes.
            Projections::Fused { linear, sizes } if config.qk_norm != QkNorm::Full && *sizes == [heads * dim, kv_heads * dim, kv_heads * dim] => {
                let all = head_major(&linear.forward(h)?, heads + 2 * kv_heads)?;
                Some((all.index((.., ..heads)), all.index((.., heads..heads + kv_heads)), all.index((.., heads + kv_heads..))))
            }
            _ => None,
        };
        let (mut q, mut k, v) = match by_heads {
            Some(split) => split,
            None => {
                let projected = layer.qkv.forward(h)?;
                let (mut q, mut k, v) = (projected[0].clone(), projected[1].clone(), projected[2].clone());
                if config.qk_norm == QkNorm::Full {
                    if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                        q = rms_norm(&q, qn, config.norm_eps)?;
                        k = rms_norm(&k, kn, config.norm_eps)?;
                    }
                }
                (head_major(&q, heads)?, head_major(&k, kv_heads)?, head_major(&v, kv_heads)?)
            }
        };
        if config.qk_norm == QkNorm::PerHead {
            // Over the last axis (head_dim): the layout does not matter.
            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                q = rms_norm(&q, qn, config.norm_eps)?;
                k = rms_norm(&k, kn, config.norm_eps)?;
            }
        }
        if let Some(rope) = kind.rope.map(|i| &config.ropes[i]) {
            q = rope.apply(&q, positions, config.head_dim)?;
            k = rope.apply(&k, positions, config.head_dim)?;
        }
        Ok((q, k, v))
    }

    /// Attention output `[B, H, L, D]` as `[B, L, H·D]` (a plain reshape for one token).
    fn merge_heads(&self, attended: &Array) -> Result<Array> {
        let (batch, length) = (attended.dim(0), attended.dim(2));
        let width = self.config.num_heads * self.config.head_dim;
        Ok(if length == 1 { attended.reshape(&[batch, 1, width])? } else { attended.transpose_axes(&[0, 2, 1, 3])?.reshape(&[batch, length, width])? })
    }

    fn feed_forward(&self, ff: &FeedForward, h: &Array) -> Result<Array> {
        let activation = self.config.activation;
        match ff {
            FeedForward::Dense { gate_up, down } => {
                let parts = gate_up.forward(h)?;
                down.forward(&gated(activation, &parts[0], &parts[1])?)
            }
            FeedForward::Experts { router, gate, up, down } => {
                let Some(moe) = self.config.moe else { return Err(invalid("expert layer without a mixture-of-experts config")) };
                let shape = h.shape().to_vec();
                let hidden = self.config.hidden_size;
                let tokens: i32 = shape[..shape.len() - 1].iter().product();
                let x = h.reshape(&[tokens, hidden])?;
                let logits = router.forward(&x)?;
                let k = moe.top_k;
                let (indices, scores) = match moe.routing {
                    Routing::SoftmaxTopK { normalize } => {
                        let gates = ops::softmax_axis(&logits, -1, true)?;
                        let indices = ops::argpartition_axis(&gates, -k, -1)?.index((.., -k..));
                        let scores = gates.take_along_axis(&indices, -1)?;
                        let scores = if normalize { scores.divide(scores.sum_axis(-1, true)?)? } else { scores };
                        (indices, scores)
                    }
                    Routing::TopKSoftmax => {
                        let indices = ops::argpartition_axis(logits.negative()?, k - 1, -1)?.index((.., ..k));
                        let scores = ops::softmax_axis(logits.take_along_axis(&indices, -1)?, -1, true)?;
                        (indices, scores)
                    }
                };
                let indices = indices.as_dtype(Dtype::Uint32)?;
                let xe = x.reshape(&[tokens, 1, 1, hidden])?;
                let activated = gated(activation, &gate.forward(&xe, &indices)?, &up.forward(&xe, &indices)?)?;
                let out = down.forward(&activated, &indices)?.squeeze_axes(&[-2])?;
                let out = out.multiply(scores.expand_dims(-1)?.as_dtype(out.dtype())?)?.sum_axis(-2, false)?;
                Ok(out.reshape(&shape)?)
            }
        }
    }

    /// One block: `attention` does cache update and attention for the layer's q, k, v.
    fn block(&self, layer: &Layer, x: &Array, attention: impl FnOnce(&Array) -> Result<Array>) -> Result<Array> {
        let config = &self.config;
        let scale_residual = |y: Array| -> Result<Array> {
            if config.residual_scale != 1.0 {
                Ok(y.multiply(Array::from_f32(config.residual_scale).as_dtype(y.dtype())?)?)
            } else {
                Ok(y)
            }
        };
        let normed = |weight: &Option<Array>, y: &Array| -> Result<Array> {
            match weight {
                Some(w) => stream_norm(config, y, w),
                None => Ok(y.clone()),
            }
        };
        if config.layout == BlockLayout::Parallel {
            let n = normed(&layer.input_norm, x)?;
            let attended = layer.o_proj.forward(&attention(&n)?)?;
            let ff = self.feed_forward(&layer.ff, &n)?;
            return Ok(x.add(attended)?.add(ff)?);
        }
        let attended = attention(&normed(&layer.input_norm, x)?)?;
        let attended = layer.o_proj.forward(&attended)?;
        let h = x.add(scale_residual(normed(&layer.post_attention_norm, &attended)?)?)?;
        let ff = self.feed_forward(&layer.ff, &normed(&layer.pre_ff_norm, &h)?)?;
        Ok(h.add(scale_residual(normed(&layer.post_ff_norm, &ff)?)?)?)
    }

    /// Runs one sequence's `tokens` (`[1, L]`) through the model, appending to its cache.
    /// Returns the logits of the last position, `[1, vocab]`.
    pub fn forward(&self, tokens: &Array, sequence: &mut SequenceSlot<'_>) -> Result<Array> {
        let hidden = self.hidden_states(tokens, sequence)?;
        let length = hidden.dim(1);
        self.logits(&hidden.index((.., length - 1, ..)))
    }

    /// All positions' logits (`[1, L, vocab]`); for scoring and tests.
    pub fn forward_all(&self, tokens: &Array, sequence: &mut SequenceSlot<'_>) -> Result<Array> {
        let hidden = self.hidden_states(tokens, sequence)?;
        self.logits(&hidden)
    }

    fn check_context(&self, highest: i32) -> Result<()> {
        let limit = self.config.max_position_embeddings as i32;
        if highest > limit {
            return Err(EngineError::ContextOverflow { prompt: highest as usize, limit: limit as usize });
        }
        Ok(())
    }

    fn hidden_states(&self, tokens: &Array, sequence: &mut SequenceSlot<'_>) -> Result<Array> {
        let config = &self.config;
        let length = tokens.dim(1);
        let offset = sequence.cache.first().map_or(0, |c| c.offset);
        self.check_context(offset + length)?;
        let mut x = self.embed(tokens)?;
        let positions = Positions::Single(offset);
        // Masks by window (None: plain causal), built once per pass.
        let mut window_masks: Vec<(i32, Array)> = Vec::new();
        for kind in &config.layers {
            if let Some(window) = kind.window {
                if offset + length > window && !window_masks.iter().any(|(w, _)| *w == window) {
                    window_masks.push((window, prefill_mask(length, offset, Some(window), self.dtype)?));
                }
            }
        }
        for (index, (layer, kind)) in self.layers.iter().zip(&config.layers).enumerate() {
            let cache = &mut sequence.cache[index];
            x = self.block(layer, &x, |h| {
                let (q, k, v) = self.project(layer, kind, h, &positions)?;
                let (keys, values) = cache.update(&k, &v)?;
                let mask = kind.window.and_then(|w| window_masks.iter().find(|(mw, _)| *mw == w).map(|(_, m)| m));
                self.merge_heads(&self.attend(&q, &keys, &values, mask, length > 1)?)
            })?;
            let piece_done = self.prompt_piece_layers.is_some_and(|piece| (index + 1) % piece.max(1) == 0);
            if piece_done && length >= PROMPT_PIECE_MIN_TOKENS && index + 1 < self.layers.len() {
                // A prompt pass runs in pieces of a few layers: MLX's GPU backends keep each
                // kernel's temporaries (a quantized matmul over many rows holds weight-sized
                // ones) until the command buffer completes, so one graph over every layer held
                // ~1.8 GiB beyond the weights at 8B shapes (bench/README.md, session 7).
                let arrays: Vec<&Array> = std::iter::once(&x).chain(sequence.cache[..=index].iter().flat_map(KvCache::arrays)).collect();
                mlx_rs::transforms::eval(arrays)?;
            }
        }
        stream_norm(config, &x, &self.norm)
    }

    /// One decode step for every row of `cache`: `tokens` is `[B, 1]`; returns `[B, vocab]`.
    pub fn decode_batched(&self, tokens: &Array, cache: &mut BatchCache) -> Result<Array> {
        let config = &self.config;
        let batch = tokens.dim(0);
        let rows = cache.positions();
        self.check_context(rows.iter().max().copied().unwrap_or(0) + 1)?;
        let mut x = self.embed(tokens)?;
        let offsets = Array::from_slice(&rows, &[batch]);
        // One row: the plain kernel with a constant offset (no positions array to upload).
        let positions = if batch == 1 { Positions::Single(rows[0]) } else { Positions::Rows(&offsets) };
        // Rows without left padding (a lone sequence, or all of equal length) need no mask.
        let padding_mask = if cache.lefts.iter().any(|left| *left > 0) { Some(cache.mask(self.dtype, None)?) } else { None };
        let mut window_masks: Vec<(i32, Array)> = Vec::new();
        for kind in &config.layers {
            if let Some(window) = kind.window {
                if !window_masks.iter().any(|(w, _)| *w == window) {
                    window_masks.push((window, cache.mask(self.dtype, Some(window))?));
                }
            }
        }
        for (index, (layer, kind)) in self.layers.iter().zip(&config.layers).enumerate() {
            x = self.block(layer, &x, |h| {
                let (q, k, v) = self.project(layer, kind, h, &positions)?;
                let (keys, values) = cache.update(index, &k, &v)?;
                let mask = match kind.window {
                    Some(w) => window_masks.iter().find(|(mw, _)| *mw == w).map(|(_, m)| m),
                    None => padding_mask.as_ref(),
                };
                self.merge_heads(&self.attend(&q, &keys, &values, mask, false)?)
            })?;
        }
        cache.advance();
        let hidden = stream_norm(config, &x, &self.norm)?;
        self.logits(&hidden.index((.., 0, ..)))
    }

    /// Every array the model holds, to evaluate at load time and to measure.
    pub fn arrays(&self) -> Vec<&Array> {
        let mut arrays = self.embed_tokens.table.arrays();
        arrays.push(&self.norm);
        if let Some(head) = &self.lm_head {
            arrays.extend(head.arrays());
        }
        for layer in &self.layers {
            for norm in [&layer.input_norm, &layer.post_attention_norm, &layer.pre_ff_norm, &layer.post_ff_norm, &layer.q_norm, &layer.k_norm].into_iter().flatten() {
                arrays.push(norm);
            }
            arrays.extend(layer.qkv.arrays());
            arrays.extend(layer.o_proj.arrays());
            match &layer.ff {
                FeedForward::Dense { gate_up, down } => {
                    arrays.extend(gate_up.arrays());
                    arrays.extend(down.arrays());
                }
                FeedForward::Experts { router, gate, up, down } => {
                    arrays.extend(router.arrays());
                    arrays.extend(gate.arrays());
                    arrays.extend(up.arrays());
                    arrays.extend(down.arrays());
                }
            }
        }
        arrays
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sliding_window_mask_keeps_the_last_positions() {
        let mask = prefill_mask(3, 2, Some(2), Dtype::Float32).unwrap();
        mask.eval().unwrap();
        let values = mask.as_slice::<f32>();
        // Query at position 2 sees keys 1 and 2; position 4 sees 3 and 4.
        let visible = |row: usize| -> Vec<usize> { (0..5).filter(|k| values[row * 5 + k] == 0.0).collect() };
        assert_eq!(visible(0), vec![1, 2]);
        assert_eq!(visible(2), vec![3, 4]);
    }

    #[test]
    fn unknown_families_name_the_supported_ones() {
        let error = DecoderConfig::from_hf(&serde_json::json!({"model_type": "falcon"})).unwrap_err();
        let text = format!("{error:?}");
        assert!(text.contains("falcon") && text.contains("qwen3_moe"), "{text}");
    }

    #[test]
    fn gemma3_alternates_local_and_global_layers() {
        let config = DecoderConfig::from_hf(&serde_json::json!({
            "model_type": "gemma3_text", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "num_hidden_layers": 4, "vocab_size": 10, "sliding_window": 8, "sliding_window_pattern": 2, "rope_theta": 1000000.0,
        }))
        .unwrap();
        let kinds: Vec<(Option<usize>, Option<i32>)> = config.layers.iter().map(|l| (l.rope, l.window)).collect();
        assert_eq!(kinds, vec![(Some(1), Some(8)), (Some(0), None), (Some(1), Some(8)), (Some(0), None)]);
        assert_eq!(config.layout, BlockLayout::Sandwich);
    }
}
