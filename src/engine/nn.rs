//! Building blocks shared by the models: linear layers (dense or MLX-quantized), embedding
//! tables, and the per-sequence key/value cache.

use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::{ops, Array, Dtype};

use super::device::WeightPolicy;
use super::EngineError;

pub type Result<T> = std::result::Result<T, EngineError>;

/// MLX affine quantization of a weight matrix.
#[derive(Clone)]
pub struct Quantized {
    pub weight: Array,
    pub scales: Array,
    pub biases: Array,
    pub group_size: i32,
    pub bits: i32,
}

impl Quantized {
    pub fn dequantize(&self) -> Result<Array> {
        Ok(ops::dequantize(&self.weight, &self.scales, &self.biases, self.group_size, self.bits)?)
    }

    pub fn nbytes(&self) -> usize {
        self.weight.nbytes() + self.scales.nbytes() + self.biases.nbytes()
    }
}

/// A weight matrix as held in memory.
#[derive(Clone)]
pub enum Weight {
    /// `[out, in]`, any float dtype.
    Dense(Array),
    Quantized(Quantized),
}

impl Weight {
    pub fn nbytes(&self) -> usize {
        match self {
            Weight::Dense(array) => array.nbytes(),
            Weight::Quantized(q) => q.nbytes(),
        }
    }

    /// Input columns of the matrix (`[out, in]`; packed quantized rows hold 32/bits each).
    pub fn in_features(&self) -> i32 {
        match self {
            Weight::Dense(array) => array.shape().last().copied().unwrap_or(0),
            Weight::Quantized(q) => q.weight.shape().last().copied().unwrap_or(0) * 32 / q.bits.max(1),
        }
    }

    /// The same weight as `policy` holds it: dequantized to its dtype where it asks for dense
    /// weights (see `WeightPolicy::dense_for`), else quantized with scales in its dtype; dense
    /// weights cast to its dtype.
    pub fn prepared(self, policy: WeightPolicy) -> Result<Weight> {
        let dense = policy.dense_for(self.in_features());
        let dtype = policy.dtype;
        Ok(match self {
            Weight::Quantized(q) if dense => Weight::Dense(q.dequantize()?.as_dtype(dtype)?),
            // Scales and biases in the activation dtype: a mix makes MLX promote the whole
            // quantized matmul to float32 (measured 1.5x slower at one row, 4x at 512).
            Weight::Quantized(q) if q.scales.dtype() != dtype => Weight::Quantized(Quantized {
                scales: q.scales.as_dtype(dtype)?,
                biases: q.biases.as_dtype(dtype)?,
                ..q
            }),
            Weight::Quantized(q) => Weight::Quantized(q),
            Weight::Dense(array) if array.dtype() != dtype => Weight::Dense(array.as_dtype(dtype)?),
            Weight::Dense(array) => Weight::Dense(array),
        })
    }

    pub fn arrays(&self) -> Vec<&Array> {
        match self {
            Weight::Dense(array) => vec![array],
            Weight::Quantized(q) => vec![&q.weight, &q.scales, &q.biases],
        }
    }

    pub fn out_features(&self) -> i32 {
        match self {
            Weight::Dense(array) => array.dim(0),
            Weight::Quantized(q) => q.weight.dim(0),
        }
    }
}

/// `y = x Wᵀ + b`.
#[derive(Clone)]
pub struct Linear {
    pub weight: Weight,
    pub bias: Option<Array>,
}

impl Linear {
    pub fn forward(&self, x: &Array) -> Result<Array> {
        let y = match &self.weight {
            // A dense layer with a bias is one addmm, as mlx's nn.Linear does: in bfloat16 or
            // float16 the product is rounded once with the bias added, where matmul-then-add
            // rounds twice (qwen2's q/k/v biases in bf16 moved logits by ~0.2 against mlx-lm,
            // tests/it/families.rs every_family_loads_sharded_bfloat16_like_mlx_lm).
            Weight::Dense(w) => {
                return Ok(match &self.bias {
                    Some(bias) => ops::addmm(bias, x, w.t(), None, None)?,
                    None => ops::matmul(x, w.t())?,
                });
            }
            // mlx's QuantizedLinear adds its bias after the quantized matmul, as here.
            Weight::Quantized(q) => {
                // Rows folded into one matrix: MLX's CUDA kernels take `[B, 1, K]` (a batched
                // decode step) as B products of one row each, reading the weights B times,
                // where `[B, K]` is one B-row product that reads them once. (A lone sequence
                // keeps its shape: two reshapes per layer cost host time on every step.)
                let product = |rows: &Array| ops::quantized_matmul(rows, &q.weight, &q.scales, &q.biases, true, q.group_size, q.bits);
                let shape = x.shape();
                let batched = shape.len() > 2 && shape[..shape.len() - 2].iter().product::<i32>() > 1;
                if batched {
                    let y = product(&x.reshape(&[-1, shape[shape.len() - 1]])?)?;
                    let mut out_shape = shape[..shape.len() - 1].to_vec();
                    out_shape.push(y.dim(-1));
                    y.reshape(&out_shape)?
                } else {
                    product(x)?
                }
            }
        };
        Ok(match &self.bias {
            Some(bias) => y.add(bias)?,
            None => y,
        })
    }

    pub fn nbytes(&self) -> usize {
        self.weight.nbytes() + self.bias.as_ref().map_or(0, Array::nbytes)
    }

    pub fn arrays(&self) -> Vec<&Array> {
        let mut arrays = self.weight.arrays();
        if let Some(bias) = &self.bias {
            arrays.push(bias);
        }
        arrays
    }
}

/// Several linear layers reading the same input, run as one matmul when their weights can
/// be stacked (fewer, larger BLAS calls: on the CPU the per-call cost dominates small
/// decode steps). Outputs come back split in the original order.
pub enum Projections {
    Fused { linear: Linear, sizes: Vec<i32> },
    Separate(Vec<Linear>),
}

impl Projections {
    pub fn new(parts: Vec<Linear>) -> Result<Projections> {
        let sizes: Vec<i32> = parts.iter().map(|p| p.weight.out_features()).collect();
        let same_kind = match (&parts[0].weight, parts.iter().all(|p| p.bias.is_some()), parts.iter().all(|p| p.bias.is_none())) {
            (_, false, false) => false,
            (Weight::Dense(first), _, _) => parts.iter().all(|p| matches!(&p.weight, Weight::Dense(w) if w.dtype() == first.dtype())),
            (Weight::Quantized(first), _, _) => parts
                .iter()
                .all(|p| matches!(&p.weight, Weight::Quantized(q) if q.bits == first.bits && q.group_size == first.group_size)),
        };
        if !same_kind {
            return Ok(Projections::Separate(parts));
        }
        let bias = if parts[0].bias.is_some() {
            let biases: Vec<&Array> = parts.iter().filter_map(|p| p.bias.as_ref()).collect();
            Some(ops::concatenate(&biases, 0)?)
        } else {
            None
        };
        let weight = match &parts[0].weight {
            Weight::Dense(_) => {
                let weights: Vec<&Array> = parts.iter().filter_map(|p| if let Weight::Dense(w) = &p.weight { Some(w) } else { None }).collect();
                Weight::Dense(ops::concatenate(&weights, 0)?)
            }
            Weight::Quantized(first) => {
                let quantized: Vec<&Quantized> = parts.iter().filter_map(|p| if let Weight::Quantized(q) = &p.weight { Some(q) } else { None }).collect();
                Weight::Quantized(Quantized {
                    weight: ops::concatenate(&quantized.iter().map(|q| &q.weight).collect::<Vec<_>>(), 0)?,
                    scales: ops::concatenate(&quantized.iter().map(|q| &q.scales).collect::<Vec<_>>(), 0)?,
                    biases: ops::concatenate(&quantized.iter().map(|q| &q.biases).collect::<Vec<_>>(), 0)?,
                    group_size: first.group_size,
                    bits: first.bits,
                })
            }
        };
        Ok(Projections::Fused { linear: Linear { weight, bias }, sizes })
    }

    pub fn forward(&self, x: &Array) -> Result<Vec<Array>> {
        match self {
            Projections::Separate(parts) => parts.iter().map(|p| p.forward(x)).collect(),
            Projections::Fused { linear, sizes } => {
                let y = linear.forward(x)?;
                let mut out = Vec::with_capacity(sizes.len());
                let mut start = 0;
                for size in sizes {
                    out.push(y.index((.., .., start..start + size)));
                    start += size;
                }
                Ok(out)
            }
        }
    }

    pub fn arrays(&self) -> Vec<&Array> {
        match self {
            Projections::Fused { linear, .. } => linear.arrays(),
            Projections::Separate(parts) => parts.iter().flat_map(Linear::arrays).collect(),
        }
    }
}

/// A token embedding table, usable as the output projection when the model ties them.
#[derive(Clone)]
pub struct Embedding {
    pub table: Weight,
}

impl Embedding {
    /// `ids`: integer array of any shape; returns `[..., dim]`.
    pub fn forward(&self, ids: &Array) -> Result<Array> {
        Ok(match &self.table {
            Weight::Dense(table) => table.take_axis(ids, 0)?,
            Weight::Quantized(q) => {
                let weight = q.weight.take_axis(ids, 0)?;
                let scales = q.scales.take_axis(ids, 0)?;
                let biases = q.biases.take_axis(ids, 0)?;
                ops::dequantize(&weight, &scales, &biases, q.group_size, q.bits)?
            }
        })
    }

    /// Logits against the table: `x Eᵀ`.
    pub fn as_linear(&self, x: &Array) -> Result<Array> {
        Linear { weight: self.table.clone(), bias: None }.forward(x)
    }
}

/// Keys and values of one layer for one sequence, grown in steps so appending a token does
/// not copy the whole history. Cloning shares the buffers (MLX arrays are values).
#[derive(Clone)]
pub struct KvCache {
    keys: Option<Array>,
    values: Option<Array>,
    pub offset: i32,
}

const CACHE_STEP: i32 = 256;

impl KvCache {
    pub fn new() -> Self {
        KvCache { keys: None, values: None, offset: 0 }
    }

    /// Appends `keys`/`values` (`[1, kv_heads, L, head_dim]`) and returns the whole history.
    pub fn update(&mut self, keys: &Array, values: &Array) -> Result<(Array, Array)> {
        let length = keys.dim(2);
        let needed = self.offset + length;
        let capacity = self.keys.as_ref().map_or(0, |k| k.dim(2));
        if needed > capacity {
            let grow = ((needed - capacity + CACHE_STEP - 1) / CACHE_STEP) * CACHE_STEP;
            let shape = |a: &Array| [a.dim(0), a.dim(1), grow, a.dim(3)];
            let new_keys = ops::zeros_dtype(&shape(keys), keys.dtype())?;
            let new_values = ops::zeros_dtype(&shape(values), values.dtype())?;
            self.keys = Some(match self.keys.take() {
                Some(old) => ops::concatenate(&[old.index((.., .., ..self.offset, ..)), new_keys], 2)?,
                None => new_keys,
            });
            self.values = Some(match self.values.take() {
                Some(old) => ops::concatenate(&[old.index((.., .., ..self.offset, ..)), new_values], 2)?,
                None => new_values,
            });
        }
        let (Some(cache_keys), Some(cache_values)) = (self.keys.as_mut(), self.values.as_mut()) else {
            return Err(EngineError::Mlx("key/value cache was not allocated".into()));
        };
        *cache_keys = write_positions(cache_keys, keys, self.offset)?;
        *cache_values = write_positions(cache_values, values, self.offset)?;
        self.offset = needed;
        Ok((cache_keys.index((.., .., ..needed, ..)), cache_values.index((.., .., ..needed, ..))))
    }

    pub fn nbytes(&self) -> usize {
        self.keys.as_ref().map_or(0, Array::nbytes) + self.values.as_ref().map_or(0, Array::nbytes)
    }

    /// Forgets everything after the first `length` positions.
    pub fn truncate(&mut self, length: i32) {
        self.offset = self.offset.min(length);
    }

    /// A cache holding exactly these keys and values (`[1, kv_heads, T, head_dim]`).
    pub fn from_arrays(keys: Array, values: Array) -> Self {
        let offset = keys.dim(2);
        KvCache { keys: Some(keys), values: Some(values), offset }
    }

    /// The filled part: `[1, kv_heads, offset, head_dim]` keys and values.
    pub fn filled(&self) -> Option<(Array, Array)> {
        let (keys, values) = (self.keys.as_ref()?, self.values.as_ref()?);
        Some((keys.index((.., .., ..self.offset, ..)), values.index((.., .., ..self.offset, ..))))
    }

    /// The evaluated buffers, so a step can realize them together with its outputs.
    pub fn arrays(&self) -> impl Iterator<Item = &Array> {
        self.keys.iter().chain(self.values.iter())
    }
}

impl Default for KvCache {
    fn default() -> Self {
        Self::new()
    }
}

/// The key/value caches of every running sequence of a model, one row each, so a decode step
/// attends for the whole batch in one call per layer. Rows are left-padded to a common width:
/// row `i` holds its tokens in columns `lefts[i]..offset`, and a mask hides the padding.
#[derive(Default)]
pub struct BatchCache {
    keys: Vec<Array>,
    values: Vec<Array>,
    /// Width in use (the next token goes to this column).
    pub offset: i32,
    /// Padding columns at the start of each row.
    pub lefts: Vec<i32>,
}

fn zeros_like_shape(like: &Array, shape: &[i32]) -> Result<Array> {
    Ok(ops::zeros_dtype(shape, like.dtype())?)
}

impl BatchCache {
    pub fn rows(&self) -> usize {
        self.lefts.len()
    }

    pub fn nbytes(&self) -> usize {
        self.keys.iter().chain(self.values.iter()).map(Array::nbytes).sum()
    }

    /// Logical position of each row's next token.
    pub fn positions(&self) -> Vec<i32> {
        self.lefts.iter().map(|left| self.offset - left).collect()
    }

    /// Adds a sequence (its per-layer caches after prefill) as a new last row.
    pub fn push(&mut self, caches: &[KvCache]) -> Result<()> {
        let length = caches.first().map_or(0, |c| c.offset);
        let filled: Vec<(Array, Array)> = caches
            .iter()
            .map(|c| c.filled().ok_or_else(|| EngineError::Mlx("an empty cache cannot join a batch".into())))
            .collect::<Result<_>>()?;
        if self.rows() == 0 {
            self.keys = filled.iter().map(|(k, _)| k.clone()).collect();
            self.values = filled.into_iter().map(|(_, v)| v).collect();
            self.offset = length;
            self.lefts = vec![0];
            return Ok(());
        }
        if length > self.offset {
            // Widen every existing row on the left.
            let grow = length - self.offset;
            for array in self.keys.iter_mut().chain(self.values.iter_mut()) {
                let used = array.index((.., .., ..self.offset, ..));
                let pad = zeros_like_shape(&used, &[used.dim(0), used.dim(1), grow, used.dim(3)])?;
                *array = ops::concatenate(&[pad, used], 2)?;
            }
            self.lefts.iter_mut().for_each(|left| *left += grow);
            self.offset = length;
        }
        let pad = self.offset - length;
        for (layer, (key, value)) in filled.into_iter().enumerate() {
            for (batch, row) in [(&mut self.keys[layer], key), (&mut self.values[layer], value)] {
                let row = if pad > 0 {
                    let zeros = zeros_like_shape(&row, &[1, row.dim(1), pad, row.dim(3)])?;
                    ops::concatenate(&[zeros, row], 2)?
                } else {
                    row
                };
                let used = batch.index((.., .., ..self.offset, ..));
                *batch = ops::concatenate(&[used, row], 0)?;
            }
        }
        self.lefts.push(pad);
        Ok(())
    }

    /// Takes row `row` out of the batch and returns its caches.
    pub fn remove(&mut self, row: usize) -> Result<Vec<KvCache>> {
        let left = self.lefts[row];
        let r = row as i32;
        // Gathered, not sliced: a slice would share the whole batch's buffers, so a finished
        // sequence kept by the prefix cache would pin every row of every layer (gigabytes
        // under load while the cache counted only the row's bytes).
        let row_index = Array::from_slice(&[r], &[1]);
        let columns: Vec<i32> = (left..self.offset).collect();
        let columns = Array::from_slice(&columns, &[columns.len() as i32]);
        let own = |array: &Array| -> Result<Array> { Ok(array.take_axis(&row_index, 0)?.take_axis(&columns, 2)?) };
        let taken: Vec<KvCache> = self.keys.iter().zip(&self.values).map(|(k, v)| Ok(KvCache::from_arrays(own(k)?, own(v)?))).collect::<Result<_>>()?;
        // Unevaluated, the gathers would still hold the batch's buffers as their inputs.
        mlx_rs::transforms::eval(taken.iter().flat_map(KvCache::arrays))?;
        self.lefts.remove(row);
        if self.lefts.is_empty() {
            *self = BatchCache::default();
            return Ok(taken);
        }
        let keep: Vec<i32> = (0..self.lefts.len() as i32 + 1).filter(|i| *i != r).collect();
        let keep = Array::from_slice(&keep, &[keep.len() as i32]);
        // Columns that every remaining row pads can go.
        let trim = self.lefts.iter().copied().min().unwrap_or(0);
        for array in self.keys.iter_mut().chain(self.values.iter_mut()) {
            *array = array.take_axis(&keep, 0)?.index((.., .., trim..self.offset, ..));
        }
        self.lefts.iter_mut().for_each(|left| *left -= trim);
        self.offset -= trim;
        Ok(taken)
    }

    /// Writes one new token per row into `layer` at the current column and returns the
    /// keys and values to attend over.
    pub fn update(&mut self, layer: usize, keys: &Array, values: &Array) -> Result<(Array, Array)> {
        let column = self.offset;
        for (cache, new) in [(&mut self.keys[layer], keys), (&mut self.values[layer], values)] {
            if cache.dim(2) <= column {
                let used = cache.index((.., .., ..column, ..));
                // Room for about CACHE_STEP tokens in all, not per row: sixteen rows grown by
                // 256 columns each would hold up to 4,095 unused positions (0.5 GB at 8B shapes).
                let rows = used.dim(0).max(1);
                let step = ((CACHE_STEP / rows + 15) / 16 * 16).max(16);
                let room = zeros_like_shape(&used, &[used.dim(0), used.dim(1), step, used.dim(3)])?;
                *cache = ops::concatenate(&[used, room], 2)?;
            }
            *cache = write_positions(cache, new, column)?;
        }
        let width = column + 1;
        Ok((self.keys[layer].index((.., .., ..width, ..)), self.values[layer].index((.., .., ..width, ..))))
    }

    /// After every layer has been updated for a step.
    pub fn advance(&mut self) {
        self.offset += 1;
    }

    /// Additive mask `[B, 1, 1, offset + 1]` hiding each row's padding for this step, and
    /// with a `window`, every column but the last `window` ones.
    pub fn mask(&self, dtype: Dtype, window: Option<i32>) -> Result<Array> {
        let width = self.offset + 1;
        let first_in_window = window.map_or(0, |w| self.offset + 1 - w);
        let mut values = Vec::with_capacity(self.rows() * width as usize);
        for left in &self.lefts {
            values.extend((0..width).map(|column| if column < *left || column < first_in_window { f32::NEG_INFINITY } else { 0.0 }));
        }
        Ok(Array::from_slice(&values, &[self.rows() as i32, 1, 1, width]).as_dtype(dtype)?)
    }

    pub fn arrays(&self) -> impl Iterator<Item = &Array> {
        self.keys.iter().chain(self.values.iter())
    }
}

/// `cache[:, :, start:start+n, :] = update` (`[B, heads, n, dim]`) as one MLX op: mlx-rs's
/// `IndexMut` wraps the update in two reshapes, two more nodes per cache write for the GPU
/// to encode on every decode step.
fn write_positions(cache: &Array, update: &Array, start: i32) -> Result<Array> {
    let shape = cache.shape();
    if shape.len() != 4 || update.ndim() != 4 {
        return Err(EngineError::Mlx("key/value cache writes take [batch, heads, positions, dim] arrays".into()));
    }
    let starts = [0, 0, start, 0];
    let stops = [shape[0], shape[1], start + update.dim(2), shape[3]];
    let strides = [1i32; 4];
    let stream = mlx_rs::Stream::thread_local_or_default();
    // SAFETY: every pointer is valid for the call; on success MLX hands back a new array that
    // `from_ptr` takes ownership of, on failure the placeholder is freed here.
    unsafe {
        let mut result = mlx_sys::mlx_array_new();
        let status = mlx_sys::mlx_slice_update(
            &mut result,
            cache.as_ptr(),
            update.as_ptr(),
            starts.as_ptr(),
            4,
            stops.as_ptr(),
            4,
            strides.as_ptr(),
            4,
            stream.as_ptr(),
        );
        if status != 0 {
            mlx_sys::mlx_array_free(result);
            return Err(EngineError::Mlx(format!("writing the key/value cache failed at position {start}")));
        }
        Ok(Array::from_ptr(result))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batched decode step's `[B, 1, K]` rows folded into one product give each row's own
    /// result (the fold exists for MLX's CUDA kernels; the numbers must not change).
    #[test]
    fn quantized_linear_gives_each_row_of_a_batch_its_own_result() {
        mlx_rs::random::seed(7).unwrap();
        let dense = mlx_rs::random::normal::<f32>(&[96, 128], None, None, None).unwrap();
        let (weight, scales, biases) = ops::quantize(&dense, 64, 4).unwrap();
        let linear = Linear { weight: Weight::Quantized(Quantized { weight, scales, biases, group_size: 64, bits: 4 }), bias: None };
        let x = mlx_rs::random::normal::<f32>(&[3, 1, 128], None, None, None).unwrap();
        let batched = linear.forward(&x).unwrap();
        assert_eq!(batched.shape(), &[3, 1, 96]);
        for row in 0..3 {
            let alone = linear.forward(&x.index(row..row + 1)).unwrap();
            let difference = batched.index(row..row + 1).subtract(&alone).unwrap().abs().unwrap().max(None).unwrap().item_exact::<f32>();
            assert!(difference < 1e-4, "row {row} differs by {difference}");
        }
    }
}
