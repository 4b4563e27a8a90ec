//! BERT encoders for embeddings (all-MiniLM, bge, e5): token + position + type embeddings,
//! post-norm transformer layers with GELU, then sentence-transformers pooling (mean or CLS)
//! and optional L2 normalisation.

use mlx_rs::fast::{self, ScaledDotProductAttentionMask};
use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::{ops, Array, Dtype};

use super::nn::{Linear, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct BertConfig {
    pub hidden_size: i32,
    pub num_layers: usize,
    pub num_heads: i32,
    pub intermediate_size: i32,
    pub max_position_embeddings: i32,
    pub layer_norm_eps: f32,
    /// Tokens per input after truncation (sentence-transformers' `max_seq_length`).
    pub max_tokens: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Mean,
    Cls,
}

pub struct LayerNorm {
    pub weight: Array,
    pub bias: Array,
}

impl LayerNorm {
    fn forward(&self, x: &Array, eps: f32) -> Result<Array> {
        Ok(fast::layer_norm(x, Some(&self.weight), Some(&self.bias), eps)?)
    }
}

pub struct BertLayer {
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    pub attention_output: Linear,
    pub attention_norm: LayerNorm,
    pub intermediate: Linear,
    pub output: Linear,
    pub output_norm: LayerNorm,
}

pub struct BertModel {
    pub config: BertConfig,
    pub word_embeddings: Array,
    pub position_embeddings: Array,
    pub token_type_embeddings: Array,
    pub embeddings_norm: LayerNorm,
    pub layers: Vec<BertLayer>,
    pub pooling: Pooling,
    pub normalize: bool,
}

fn gelu(x: &Array) -> Result<Array> {
    // The exact (erf) GELU that BERT uses.
    let half = Array::from_f32(0.5);
    let scaled = x.multiply(Array::from_f32(std::f32::consts::FRAC_1_SQRT_2))?;
    Ok(x.multiply(&half)?.multiply(ops::erf(&scaled)?.add(Array::from_f32(1.0))?)?)
}

impl BertModel {
    /// Embeds a batch: `ids` and `mask` are `[B, L]` (mask 1 for real tokens, 0 for padding).
    /// Returns `[B, hidden]` sentence embeddings.
    pub fn embed(&self, ids: &Array, mask: &Array) -> Result<Array> {
        let config = &self.config;
        let batch = ids.dim(0);
        let length = ids.dim(1);
        let positions = ops::arange::<_, i32>(0, length, None)?;
        let mut x = self
            .word_embeddings
            .take_axis(ids, 0)?
            .add(self.position_embeddings.take_axis(&positions, 0)?)?
            .add(self.token_type_embeddings.index((0..1, ..)))?;
        x = self.embeddings_norm.forward(&x, config.layer_norm_eps)?;
        let head_dim = config.hidden_size / config.num_heads;
        let scale = 1.0 / (head_dim as f32).sqrt();
        // Padding keys get -inf before the softmax: [B, 1, 1, L].
        let mask_f = mask.as_dtype(Dtype::Float32)?;
        let additive = Array::from_f32(1.0).subtract(&mask_f)?.multiply(Array::from_f32(-1e9))?.reshape(&[batch, 1, 1, length])?;
        for layer in &self.layers {
            let heads = |y: Array| -> Result<Array> {
                Ok(y.reshape(&[batch, length, config.num_heads, head_dim])?.transpose_axes(&[0, 2, 1, 3])?)
            };
            let q = heads(layer.query.forward(&x)?)?;
            let k = heads(layer.key.forward(&x)?)?;
            let v = heads(layer.value.forward(&x)?)?;
            let attended = fast::scaled_dot_product_attention(&q, &k, &v, scale, ScaledDotProductAttentionMask::Array(&additive), None)?;
            let attended = attended.transpose_axes(&[0, 2, 1, 3])?.reshape(&[batch, length, config.hidden_size])?;
            x = layer.attention_norm.forward(&x.add(layer.attention_output.forward(&attended)?)?, config.layer_norm_eps)?;
            let inner = gelu(&layer.intermediate.forward(&x)?)?;
            x = layer.output_norm.forward(&x.add(layer.output.forward(&inner)?)?, config.layer_norm_eps)?;
        }
        let pooled = match self.pooling {
            Pooling::Cls => x.index((.., 0, ..)),
            Pooling::Mean => {
                let weights = mask_f.reshape(&[batch, length, 1])?;
                let summed = x.multiply(&weights)?.sum_axis(1, false)?;
                let counts = ops::maximum(weights.sum_axis(1, false)?, Array::from_f32(1e-9))?;
                summed.divide(&counts)?
            }
        };
        if self.normalize {
            let norm = ops::maximum(pooled.square()?.sum_axis(-1, true)?.sqrt()?, Array::from_f32(1e-12))?;
            Ok(pooled.divide(&norm)?)
        } else {
            Ok(pooled)
        }
    }

    pub fn arrays(&self) -> Vec<&Array> {
        let mut arrays = vec![
            &self.word_embeddings,
            &self.position_embeddings,
            &self.token_type_embeddings,
            &self.embeddings_norm.weight,
            &self.embeddings_norm.bias,
        ];
        for layer in &self.layers {
            for linear in [&layer.query, &layer.key, &layer.value, &layer.attention_output, &layer.intermediate, &layer.output] {
                arrays.extend(linear.arrays());
            }
            arrays.extend([&layer.attention_norm.weight, &layer.attention_norm.bias, &layer.output_norm.weight, &layer.output_norm.bias]);
        }
        arrays
    }
}
