//! BERT encoders for embeddings (all-MiniLM, bge, e5): token + position + type embeddings,
//! post-norm transformer layers with GELU, then sentence-transformers pooling (mean or CLS)
//! and optional L2 normalisation.
//!
//! The same encoder with a sequence-classification head (`BertForSequenceClassification`:
//! pooler = dense + tanh on the [CLS] token, then a linear classifier) is a cross-encoder
//! (reranker, e.g. ms-marco-MiniLM, bge-reranker): it reads a (query, document) pair as one
//! input, with token type 0 for the query segment and 1 for the document, and scores it.

use mlx_rs::fast::{self, ScaledDotProductAttentionMask};
use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::{ops, Array, Dtype};

use super::nn::{Linear, Projections, Result, Weight};
use super::{host, EngineError};

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
    /// Query, key and value, stacked into one product when their weights allow.
    pub qkv: Projections,
    pub attention_output: Linear,
    pub attention_norm: LayerNorm,
    pub intermediate: Linear,
    pub output: Linear,
    pub output_norm: LayerNorm,
}

/// The head of `BertForSequenceClassification`: `classifier(tanh(pooler(h[CLS])))`.
pub struct ClassifierHead {
    pub pooler: Linear,
    pub classifier: Linear,
    pub num_labels: usize,
}

impl ClassifierHead {
    /// The label whose logit is the relevance score: the only one of a one-label model
    /// (ms-marco, bge-reranker), else label 1 (the "relevant" class of a two-label model).
    pub fn score_label(&self) -> usize {
        if self.num_labels > 1 {
            1
        } else {
            0
        }
    }
}

/// A tokenized (query, document) pair for a cross-encoder: `[CLS] query [SEP] document [SEP]`
/// with `type_ids` 0 for `[CLS] query [SEP]` and 1 for `document [SEP]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairInput {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
}

/// Tokenizes a (query, document) pair as the model's tokenizer does for pairs (its
/// post-processor adds the special tokens and the segment ids). The pair is cut to at most
/// `max_tokens` tokens, special tokens included (and to the tokenizer's own truncation
/// length, when it has one), longest first as Hugging Face tokenizers do: tokens come off the
/// end of the longer segment, which is the document for any usual query.
pub fn encode_pair(tokenizer: &tokenizers::Tokenizer, query: &str, document: &str, max_tokens: usize) -> std::result::Result<PairInput, EngineError> {
    use tokenizers::utils::truncation::{truncate_encodings, TruncationParams, TruncationStrategy};
    use tokenizers::PostProcessor;
    let error = |e: tokenizers::Error| EngineError::Tokenizer(e.to_string());
    let query = tokenizer.encode(query, false).map_err(error)?;
    let document = tokenizer.encode(document, false).map_err(error)?;
    let added = tokenizer.get_post_processor().map_or(0, |p| p.added_tokens(true));
    let budget = max_tokens.saturating_sub(added).max(2);
    let params = TruncationParams { max_length: budget, strategy: TruncationStrategy::LongestFirst, stride: 0, ..Default::default() };
    let (mut query, document) = truncate_encodings(query, Some(document), &params).map_err(error)?;
    let mut document = document.unwrap_or_default();
    // What truncation cut off is not needed (no sliding windows over long documents).
    query.take_overflowing();
    document.take_overflowing();
    let encoding = tokenizer.post_process(query, Some(document), true).map_err(error)?;
    Ok(PairInput { ids: encoding.get_ids().to_vec(), type_ids: encoding.get_type_ids().to_vec() })
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
    /// Present for `BertForSequenceClassification` checkpoints (cross-encoders).
    pub head: Option<ClassifierHead>,
    /// GELU and the attention softmax run as host loops ([`super::host`]): MLX is on the CPU.
    pub host_kernels: bool,
}

fn gelu(x: &Array) -> Result<Array> {
    // The exact (erf) GELU that BERT uses.
    let half = Array::from_f32(0.5);
    let scaled = x.multiply(Array::from_f32(std::f32::consts::FRAC_1_SQRT_2))?;
    Ok(x.multiply(&half)?.multiply(ops::erf(&scaled)?.add(Array::from_f32(1.0))?)?)
}

/// A layer's dense float32 weights, as the host path reads them: (weight, bias) per product.
struct HostWeights<'a> {
    qkv: (&'a Array, &'a Array),
    attention_output: (&'a Array, &'a Array),
    intermediate: (&'a Array, &'a Array),
    output: (&'a Array, &'a Array),
}

fn dense_f32(linear: &Linear) -> Option<(&Array, &Array)> {
    match (&linear.weight, &linear.bias) {
        (Weight::Dense(weight), Some(bias)) if weight.dtype() == Dtype::Float32 && bias.dtype() == Dtype::Float32 => Some((weight, bias)),
        _ => None,
    }
}

/// One post-norm layer on the CPU: MLX's BLAS for the four products (bias-free, so each is a
/// single sgemm), the host kernels for what lies between them (biases folded in there).
/// `rows` is `[tokens, hidden]`: each input's `lengths[b]` real tokens, input after input.
fn host_layer(layer: &BertLayer, weights: &HostWeights, rows: &Array, lengths: &[usize], heads: usize, scale: f32, eps: f32) -> Result<Array> {
    let qkv = ops::matmul(rows, weights.qkv.0.t())?;
    let attended = host::attention(&qkv, weights.qkv.1, lengths, heads, scale)?;
    let projected = ops::matmul(&attended, weights.attention_output.0.t())?;
    let joined = host::add_layer_norm(rows, &projected, weights.attention_output.1, &layer.attention_norm.weight, &layer.attention_norm.bias, eps)?;
    let inner = host::gelu_with_bias(&ops::matmul(&joined, weights.intermediate.0.t())?, weights.intermediate.1)?;
    let out = ops::matmul(&inner, weights.output.0.t())?;
    host::add_layer_norm(&joined, &out, weights.output.1, &layer.output_norm.weight, &layer.output_norm.bias, eps)
}

impl BertModel {
    /// Every layer's weights for the host path, when MLX is on the CPU and they are all dense
    /// float32 with biases (else None: MLX's ops run the layers).
    fn host_weights(&self) -> Option<Vec<HostWeights<'_>>> {
        if !self.host_kernels {
            return None;
        }
        let norms_f32 = |norm: &LayerNorm| norm.weight.dtype() == Dtype::Float32 && norm.bias.dtype() == Dtype::Float32;
        self.layers
            .iter()
            .map(|layer| {
                let Projections::Fused { linear, .. } = &layer.qkv else { return None };
                if !norms_f32(&layer.attention_norm) || !norms_f32(&layer.output_norm) {
                    return None;
                }
                Some(HostWeights { qkv: dense_f32(linear)?, attention_output: dense_f32(&layer.attention_output)?, intermediate: dense_f32(&layer.intermediate)?, output: dense_f32(&layer.output)? })
            })
            .collect()
    }

    /// The encoder's last hidden states `[B, L, hidden]` for `ids` and `mask` (`[B, L]`, mask
    /// 1 for real tokens, 0 for padding); `type_ids` (`[B, L]`) picks each token's
    /// token-type embedding (all type 0 when None, as for single texts).
    pub fn encode(&self, ids: &Array, type_ids: Option<&Array>, mask: &Array) -> Result<Array> {
        let config = &self.config;
        let batch = ids.dim(0);
        let length = ids.dim(1);
        let positions = ops::arange::<_, i32>(0, length, None)?;
        let types = match type_ids {
            Some(type_ids) => self.token_type_embeddings.take_axis(type_ids, 0)?,
            None => self.token_type_embeddings.index((0..1, ..)),
        };
        let mut x = self.word_embeddings.take_axis(ids, 0)?.add(self.position_embeddings.take_axis(&positions, 0)?)?.add(types)?;
        x = self.embeddings_norm.forward(&x, config.layer_norm_eps)?;
        let head_dim = config.hidden_size / config.num_heads;
        let scale = 1.0 / (head_dim as f32).sqrt();
        // Padding keys get -inf before the softmax: [B, 1, 1, L].
        let mask_f = mask.as_dtype(Dtype::Float32)?;
        let additive = Array::from_f32(1.0).subtract(&mask_f)?.multiply(Array::from_f32(-1e9))?.reshape(&[batch, 1, 1, length])?;
        // Real tokens per input (padding is at the end), for the host softmax.
        let valid: Vec<usize> = if self.host_kernels {
            let counts = mask.as_dtype(Dtype::Int32)?.sum_axis(1, false)?;
            counts.eval()?;
            counts.try_as_slice::<i32>().map_err(|e| EngineError::Mlx(e.to_string()))?.iter().map(|&n| n.max(0) as usize).collect()
        } else {
            Vec::new()
        };
        if let Some(weights) = self.host_weights() {
            // Only the real tokens, input after input: no product, norm or attention works on
            // padding (a batch of texts of 110-150 tokens is ~13 % padding).
            let lengths: Vec<usize> = valid.iter().map(|&n| n.clamp(1, length as usize)).collect();
            let real: Vec<i32> = lengths.iter().enumerate().flat_map(|(b, &n)| (0..n as i32).map(move |t| b as i32 * length + t)).collect();
            let mut rows = x.reshape(&[batch * length, config.hidden_size])?.take_axis(&Array::from_slice(&real, &[real.len() as i32]), 0)?;
            for (layer, weights) in self.layers.iter().zip(&weights) {
                rows = host_layer(layer, weights, &rows, &lengths, config.num_heads as usize, scale, config.layer_norm_eps)?;
            }
            return host::unpack_rows(&rows, &lengths, length as usize);
        }
        for layer in &self.layers {
            let heads = |y: &Array| -> Result<Array> {
                Ok(y.reshape(&[batch, length, config.num_heads, head_dim])?.transpose_axes(&[0, 2, 1, 3])?)
            };
            let [q, k, v] = <[Array; 3]>::try_from(layer.qkv.forward(&x)?).map_err(|parts| EngineError::Mlx(format!("{} attention projections", parts.len())))?;
            let (q, k, v) = (heads(&q)?, heads(&k)?, heads(&v)?);
            let attended = if self.host_kernels {
                let scores = ops::matmul(&q.multiply(Array::from_f32(scale))?, &k.transpose_axes(&[0, 1, 3, 2])?)?;
                ops::matmul(&host::masked_softmax(&scores, &valid)?, &v)?
            } else {
                fast::scaled_dot_product_attention(&q, &k, &v, scale, ScaledDotProductAttentionMask::Array(&additive), None)?
            };
            let attended = attended.transpose_axes(&[0, 2, 1, 3])?.reshape(&[batch, length, config.hidden_size])?;
            x = layer.attention_norm.forward(&x.add(layer.attention_output.forward(&attended)?)?, config.layer_norm_eps)?;
            let intermediate = layer.intermediate.forward(&x)?;
            let inner = if self.host_kernels { host::gelu(&intermediate)? } else { gelu(&intermediate)? };
            x = layer.output_norm.forward(&x.add(layer.output.forward(&inner)?)?, config.layer_norm_eps)?;
        }
        Ok(x)
    }

    /// Embeds a batch: `ids` and `mask` are `[B, L]` (mask 1 for real tokens, 0 for padding).
    /// Returns `[B, hidden]` sentence embeddings.
    pub fn embed(&self, ids: &Array, mask: &Array) -> Result<Array> {
        let batch = ids.dim(0);
        let length = ids.dim(1);
        let x = self.encode(ids, None, mask)?;
        let mask_f = mask.as_dtype(Dtype::Float32)?;
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

    /// Classification logits `[B, num_labels]` of a cross-encoder for a batch of pairs
    /// (`ids`, `type_ids`, `mask` all `[B, L]`). Fails for a model without a head.
    pub fn classify(&self, ids: &Array, type_ids: &Array, mask: &Array) -> Result<Array> {
        let head = self.head.as_ref().ok_or_else(|| EngineError::BadRequest("this model has no classification head (it is not a cross-encoder)".into()))?;
        let x = self.encode(ids, Some(type_ids), mask)?;
        let cls = x.index((.., 0, ..));
        let pooled = ops::tanh(&head.pooler.forward(&cls)?)?;
        head.classifier.forward(&pooled)
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
            arrays.extend(layer.qkv.arrays());
            for linear in [&layer.attention_output, &layer.intermediate, &layer.output] {
                arrays.extend(linear.arrays());
            }
            arrays.extend([&layer.attention_norm.weight, &layer.attention_norm.bias, &layer.output_norm.weight, &layer.output_norm.bias]);
        }
        if let Some(head) = &self.head {
            arrays.extend(head.pooler.arrays());
            arrays.extend(head.classifier.arrays());
        }
        arrays
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A word-level tokenizer with BERT's pair template: `[CLS] A [SEP] B [SEP]`, types 0/1.
    fn tokenizer() -> tokenizers::Tokenizer {
        let mut vocab = serde_json::Map::new();
        for (i, word) in ["[UNK]", "[CLS]", "[SEP]", "q1", "q2", "q3", "d1", "d2", "d3", "d4", "d5", "d6"].iter().enumerate() {
            vocab.insert(word.to_string(), i.into());
        }
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}, {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
                "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [1], "tokens": ["[CLS]"]}, "[SEP]": {"id": "[SEP]", "ids": [2], "tokens": ["[SEP]"]}}
            },
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
        });
        json.to_string().parse().unwrap()
    }

    #[test]
    fn pairs_get_segments_and_lose_document_tokens_first() {
        let tokenizer = tokenizer();
        let pair = encode_pair(&tokenizer, "q1 q2", "d1 d2 d3", 64).unwrap();
        assert_eq!(pair.ids, vec![1, 3, 4, 2, 6, 7, 8, 2]);
        assert_eq!(pair.type_ids, vec![0, 0, 0, 0, 1, 1, 1, 1]);
        // 8 tokens: 3 special, 2 query, 3 of the 6 document tokens (longest first).
        let cut = encode_pair(&tokenizer, "q1 q2", "d1 d2 d3 d4 d5 d6", 8).unwrap();
        assert_eq!(cut.ids, vec![1, 3, 4, 2, 6, 7, 8, 2]);
        assert_eq!(cut.type_ids, vec![0, 0, 0, 0, 1, 1, 1, 1]);
        // A query as long as the document is cut too, one token each.
        let both = encode_pair(&tokenizer, "q1 q2 q3", "d1 d2 d3", 7).unwrap();
        assert_eq!(both.ids, vec![1, 3, 4, 2, 6, 7, 2]);
    }
}
