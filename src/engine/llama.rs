//! The llama family of decoder models (Llama 2/3, SmolLM/SmolLM2, Mistral, Qwen2/2.5):
//! grouped-query attention with RoPE (optionally scaled), SwiGLU MLP, RMSNorm, optional q/k/v
//! biases and tied embeddings. The forward pass takes several sequences at once: the weight
//! matmuls run batched, attention runs per sequence over its own cache and position.

use mlx_rs::fast::{self, ScaledDotProductAttentionMask};
use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::{nn as mlx_nn, ops, Array};

use super::nn::{BatchCache, Embedding, KvCache, Linear, Projections, Result};

/// How RoPE frequencies are scaled for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear { factor: f32 },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 { factor: f32, low_freq_factor: f32, high_freq_factor: f32, original_max_position: f32 },
}

#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub hidden_size: i32,
    pub num_layers: usize,
    pub num_heads: i32,
    pub num_kv_heads: i32,
    pub head_dim: i32,
    pub intermediate_size: i32,
    pub vocab_size: i32,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    /// Interleaved ("traditional") RoPE pairs instead of the half-split layout.
    pub rope_traditional: bool,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
}

/// cos and sin tables for half-split RoPE: angle(p, i) = p * scale / theta^(2i/d), with the
/// pair frequencies given by `freqs` (already inverted) when scaling provides them.
fn rope_tables(config: &LlamaConfig, freqs: Option<&Array>, scale: f32) -> Result<(Array, Array)> {
    let half = config.head_dim / 2;
    let inverse: Vec<f32> = match freqs {
        Some(freqs) => {
            freqs.eval()?;
            freqs.as_slice::<f32>().iter().map(|f| 1.0 / f).collect()
        }
        None => (0..half).map(|i| 1.0 / config.rope_theta.powf(2.0 * i as f32 / config.head_dim as f32)).collect(),
    };
    let positions = config.max_position_embeddings.clamp(1, 1 << 17);
    let mut cos = Vec::with_capacity(positions * config.head_dim as usize);
    let mut sin = Vec::with_capacity(positions * config.head_dim as usize);
    for position in 0..positions {
        let p = position as f64 * scale as f64;
        for _ in 0..2 {
            for f in &inverse {
                let angle = p * *f as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
    }
    let shape = [positions as i32, config.head_dim];
    Ok((Array::from_slice(&cos, &shape), Array::from_slice(&sin, &shape)))
}

pub struct Attention {
    /// q, k and v projections.
    pub qkv: Projections,
    pub o_proj: Linear,
}

pub struct Mlp {
    /// gate and up projections.
    pub gate_up: Projections,
    pub down_proj: Linear,
}

pub struct Layer {
    pub input_layernorm: Array,
    pub attention: Attention,
    pub post_attention_layernorm: Array,
    pub mlp: Mlp,
}

pub struct LlamaModel {
    pub config: LlamaConfig,
    pub embed_tokens: Embedding,
    pub layers: Vec<Layer>,
    pub norm: Array,
    /// `None` when the output projection is the embedding table.
    pub lm_head: Option<Linear>,
    /// RoPE frequencies (per pair of dimensions) when scaling needs custom ones.
    rope_freqs: Option<Array>,
    rope_scale: f32,
    /// cos/sin of every position up to the context length, `[positions, head_dim]` in the
    /// half-split layout: one lookup serves a whole batch whose sequences sit at different
    /// positions (MLX's fused RoPE costs a fixed ~0.15 ms per call on the CPU).
    rope_cos: Array,
    rope_sin: Array,
}

/// One sequence's place in a batched forward pass.
pub struct SequenceSlot<'a> {
    pub cache: &'a mut [KvCache],
}

impl LlamaModel {
    pub fn new(config: LlamaConfig, embed_tokens: Embedding, layers: Vec<Layer>, norm: Array, lm_head: Option<Linear>) -> Result<Self> {
        let (rope_freqs, rope_scale) = match &config.rope_scaling {
            RopeScaling::None => (None, 1.0),
            RopeScaling::Linear { factor } => (None, 1.0 / factor),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position } => {
                let dims = config.head_dim;
                let low_freq_wavelen = original_max_position / low_freq_factor;
                let high_freq_wavelen = original_max_position / high_freq_factor;
                let freqs: Vec<f32> = (0..dims / 2)
                    .map(|i| {
                        let freq = config.rope_theta.powf(2.0 * i as f32 / dims as f32);
                        let wavelen = 2.0 * std::f32::consts::PI * freq;
                        if wavelen > low_freq_wavelen {
                            freq * factor
                        } else if wavelen < high_freq_wavelen {
                            freq
                        } else {
                            let smooth = (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            freq / ((1.0 - smooth) / factor + smooth)
                        }
                    })
                    .collect();
                (Some(Array::from_slice(&freqs, &[dims / 2])), 1.0)
            }
        };
        let (rope_cos, rope_sin) = rope_tables(&config, rope_freqs.as_ref(), rope_scale)?;
        Ok(LlamaModel { config, embed_tokens, layers, norm, lm_head, rope_freqs, rope_scale, rope_cos, rope_sin })
    }

    pub fn new_cache(&self) -> Vec<KvCache> {
        (0..self.config.num_layers).map(|_| KvCache::new()).collect()
    }

    /// Rotates `x` (`[B, heads, L, head_dim]`) by the positions in `cos`/`sin`
    /// (`[B, 1, L, head_dim]`), half-split layout.
    fn rotate(x: &Array, cos: &Array, sin: &Array, half: i32) -> Result<Array> {
        let first = x.index((.., .., .., ..half));
        let second = x.index((.., .., .., half..));
        let rotated = ops::concatenate(&[second.negative()?, first], -1)?;
        Ok(x.multiply(cos)?.add(rotated.multiply(sin)?)?)
    }

    /// RoPE for one sequence with MLX's kernel (interleaved layouts).
    fn rope_traditional(&self, x: &Array, offset: i32) -> Result<Array> {
        let base = if self.rope_freqs.is_some() { None } else { Some(self.config.rope_theta) };
        Ok(fast::rope(x, self.config.head_dim, true, base, self.rope_scale, offset, self.rope_freqs.as_ref())?)
    }

    /// Runs `tokens` (`[B, L]`, the same L for every sequence) through the model, appending
    /// to each sequence's cache. Returns the logits of the last position of each sequence,
    /// `[B, vocab]`.
    pub fn forward(&self, tokens: &Array, sequences: &mut [SequenceSlot<'_>]) -> Result<Array> {
        let hidden = self.hidden_states(tokens, sequences)?;
        let length = hidden.dim(1);
        let last = hidden.index((.., length - 1, ..));
        self.logits(&last)
    }

    /// All positions' logits (`[B, L, vocab]`); for scoring and tests.
    pub fn forward_all(&self, tokens: &Array, sequences: &mut [SequenceSlot<'_>]) -> Result<Array> {
        let hidden = self.hidden_states(tokens, sequences)?;
        self.logits(&hidden)
    }

    fn logits(&self, hidden: &Array) -> Result<Array> {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => self.embed_tokens.as_linear(hidden),
        }
    }

    fn hidden_states(&self, tokens: &Array, sequences: &mut [SequenceSlot<'_>]) -> Result<Array> {
        let config = &self.config;
        let batch = tokens.dim(0);
        let length = tokens.dim(1);
        let mut x = self.embed_tokens.forward(tokens)?;
        let scale = 1.0 / (config.head_dim as f32).sqrt();
        let half = config.head_dim / 2;
        // Positions of every token of every sequence: `[B, L]`, each row from its own offset.
        let offsets: Vec<i32> = sequences.iter().map(|s| s.cache.first().map_or(0, |c| c.offset)).collect();
        let limit = self.rope_cos.dim(0);
        if offsets.iter().any(|o| o + length > limit) {
            return Err(super::EngineError::ContextOverflow { prompt: (offsets.iter().max().copied().unwrap_or(0) + length) as usize, limit: limit as usize });
        }
        let positions: Vec<i32> = offsets.iter().flat_map(|o| *o..*o + length).collect();
        let positions = Array::from_slice(&positions, &[batch, length]);
        let table_shape = [batch, 1, length, config.head_dim];
        let cos = self.rope_cos.take_axis(&positions, 0)?.reshape(&table_shape)?;
        let sin = self.rope_sin.take_axis(&positions, 0)?.reshape(&table_shape)?;
        for (layer_index, layer) in self.layers.iter().enumerate() {
            let h = fast::rms_norm(&x, Some(&layer.input_layernorm), config.rms_norm_eps)?;
            let attention = &layer.attention;
            let heads = |y: &Array, count: i32| -> Result<Array> {
                Ok(y.reshape(&[batch, length, count, config.head_dim])?.transpose_axes(&[0, 2, 1, 3])?)
            };
            let projected = attention.qkv.forward(&h)?;
            let (mut q, mut k) = (heads(&projected[0], config.num_heads)?, heads(&projected[1], config.num_kv_heads)?);
            let v = heads(&projected[2], config.num_kv_heads)?;
            if !config.rope_traditional {
                q = Self::rotate(&q, &cos, &sin, half)?;
                k = Self::rotate(&k, &cos, &sin, half)?;
            }
            let mut outputs = Vec::with_capacity(sequences.len());
            for (index, slot) in sequences.iter_mut().enumerate() {
                let i = index as i32;
                let cache = &mut slot.cache[layer_index];
                let (mut qi, mut ki) = if batch == 1 { (q.clone(), k.clone()) } else { (q.index((i..i + 1, .., .., ..)), k.index((i..i + 1, .., .., ..))) };
                let vi = if batch == 1 { v.clone() } else { v.index((i..i + 1, .., .., ..)) };
                if config.rope_traditional {
                    qi = self.rope_traditional(&qi, cache.offset)?;
                    ki = self.rope_traditional(&ki, cache.offset)?;
                }
                let (keys, values) = cache.update(&ki, &vi)?;
                let mask = (length > 1).then_some(ScaledDotProductAttentionMask::Causal);
                outputs.push(fast::scaled_dot_product_attention(&qi, &keys, &values, scale, mask, None)?);
            }
            let attended = if outputs.len() == 1 { outputs.remove(0) } else { ops::concatenate(&outputs, 0)? };
            let attended = attended.transpose_axes(&[0, 2, 1, 3])?.reshape(&[batch, length, config.num_heads * config.head_dim])?;
            x = x.add(attention.o_proj.forward(&attended)?)?;
            let h = fast::rms_norm(&x, Some(&layer.post_attention_layernorm), config.rms_norm_eps)?;
            let gate_up = layer.mlp.gate_up.forward(&h)?;
            let activated = mlx_nn::silu(&gate_up[0])?.multiply(&gate_up[1])?;
            x = x.add(layer.mlp.down_proj.forward(&activated)?)?;
        }
        Ok(fast::rms_norm(&x, Some(&self.norm), config.rms_norm_eps)?)
    }

    /// One decode step for every row of `cache`: `tokens` is `[B, 1]`; returns `[B, vocab]`.
    /// Attention runs once per layer for the whole batch over the left-padded cache.
    pub fn decode_batched(&self, tokens: &Array, cache: &mut BatchCache) -> Result<Array> {
        let config = &self.config;
        let batch = tokens.dim(0);
        let mut x = self.embed_tokens.forward(tokens)?;
        let scale = 1.0 / (config.head_dim as f32).sqrt();
        let half = config.head_dim / 2;
        let positions = cache.positions();
        let limit = self.rope_cos.dim(0);
        if positions.iter().any(|p| *p >= limit) {
            return Err(super::EngineError::ContextOverflow { prompt: (positions.iter().max().copied().unwrap_or(0) + 1) as usize, limit: limit as usize });
        }
        let positions = Array::from_slice(&positions, &[batch, 1]);
        let table_shape = [batch, 1, 1, config.head_dim];
        let cos = self.rope_cos.take_axis(&positions, 0)?.reshape(&table_shape)?;
        let sin = self.rope_sin.take_axis(&positions, 0)?.reshape(&table_shape)?;
        let mask = cache.mask(x.dtype())?;
        for (layer_index, layer) in self.layers.iter().enumerate() {
            let h = fast::rms_norm(&x, Some(&layer.input_layernorm), config.rms_norm_eps)?;
            let heads = |y: &Array, count: i32| -> Result<Array> {
                Ok(y.reshape(&[batch, 1, count, config.head_dim])?.transpose_axes(&[0, 2, 1, 3])?)
            };
            let projected = layer.attention.qkv.forward(&h)?;
            let q = Self::rotate(&heads(&projected[0], config.num_heads)?, &cos, &sin, half)?;
            let k = Self::rotate(&heads(&projected[1], config.num_kv_heads)?, &cos, &sin, half)?;
            let v = heads(&projected[2], config.num_kv_heads)?;
            let (keys, values) = cache.update(layer_index, &k, &v)?;
            let attended = fast::scaled_dot_product_attention(&q, &keys, &values, scale, ScaledDotProductAttentionMask::Array(&mask), None)?;
            let attended = attended.transpose_axes(&[0, 2, 1, 3])?.reshape(&[batch, 1, config.num_heads * config.head_dim])?;
            x = x.add(layer.attention.o_proj.forward(&attended)?)?;
            let h = fast::rms_norm(&x, Some(&layer.post_attention_layernorm), config.rms_norm_eps)?;
            let gate_up = layer.mlp.gate_up.forward(&h)?;
            let activated = mlx_nn::silu(&gate_up[0])?.multiply(&gate_up[1])?;
            x = x.add(layer.mlp.down_proj.forward(&activated)?)?;
        }
        cache.advance();
        let hidden = fast::rms_norm(&x, Some(&self.norm), config.rms_norm_eps)?;
        self.logits(&hidden.index((.., 0, ..)))
    }

    /// Whether batched decoding applies (the interleaved RoPE layout goes one by one).
    pub fn batches_decode(&self) -> bool {
        !self.config.rope_traditional
    }

    /// Every array the model holds, to evaluate at load time and to measure.
    pub fn arrays(&self) -> Vec<&Array> {
        let mut arrays = self.embed_tokens.table.arrays();
        arrays.push(&self.norm);
        if let Some(head) = &self.lm_head {
            arrays.extend(head.arrays());
        }
        for layer in &self.layers {
            arrays.push(&layer.input_layernorm);
            arrays.push(&layer.post_attention_layernorm);
            arrays.extend(layer.attention.qkv.arrays());
            arrays.extend(layer.attention.o_proj.arrays());
            arrays.extend(layer.mlp.gate_up.arrays());
            arrays.extend(layer.mlp.down_proj.arrays());
        }
        arrays
    }
}
