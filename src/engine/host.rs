//! Element-wise kernels run on the host for the encoder when MLX runs on the CPU.
//!
//! MLX's CPU backend evaluates `erf` and `exp` one element at a time through the C library
//! (about 40 ns per element on the CI VM; its JIT-compiled fusions do not vectorise them
//! either), so in an all-MiniLM batch the exact GELU and the attention softmax took four
//! times as long as all the matmuls together. Here they are short polynomial loops over the
//! evaluated buffer, split across the cores. On a GPU the encoder keeps MLX's own ops.
//!
//! Accuracy: `erf` is Eigen's rational approximation for float (|error| < 1e-6 over the line);
//! `exp` is a degree-6 polynomial after range reduction (relative error < 2e-7).

use mlx_rs::Array;

use super::nn::Result;
use super::EngineError;

/// Below this many values a second thread costs more than it saves.
const PARALLEL_MIN: usize = 1 << 16;

fn threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).clamp(1, 16))
}

/// Runs `work` over `values` in whole rows of `row` values, one slice per core.
fn par_rows(values: &mut [f32], row: usize, work: &(dyn Fn(usize, &mut [f32]) + Sync)) {
    let rows = values.len() / row.max(1);
    let threads = threads();
    if threads == 1 || values.len() < PARALLEL_MIN || rows < 2 {
        work(0, values);
        return;
    }
    let rows_per_part = rows.div_ceil(threads);
    std::thread::scope(|scope| {
        for (part, slice) in values.chunks_mut(rows_per_part * row).enumerate() {
            scope.spawn(move || work(part * rows_per_part, slice));
        }
    });
}

/// erf(x) for float: Eigen's `generic_fast_erf_float` (a rational function on [-4, 4]).
#[inline]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10_f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 - 2.101_024e-6;
    p = p * x2 - 5.692_506_4e-5;
    p = p * x2 - 7.349_906_3e-4;
    p = p * x2 - 2.954_600e-3;
    p = p * x2 - 1.609_603_3e-2;
    p *= x;
    let mut q = -1.456_607_2e-5_f32;
    q = q * x2 - 2.133_740_6e-4;
    q = q * x2 - 1.682_827e-3;
    q = q * x2 - 7.373_329_2e-3;
    q = q * x2 - 1.426_474e-2;
    p / q
}

/// e^x for float; inputs below -87 give 0's neighbour 2^-126 (a softmax weight that rounds away).
#[inline]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    // ln 2 split in two so r keeps its low bits.
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let mut p = 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[inline]
fn gelu_scalar(v: f32) -> f32 {
    0.5 * v * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2))
}

/// The exact (erf) GELU, in place.
pub fn gelu_in_place(values: &mut [f32]) {
    par_rows(values, 1, &|_, part| {
        #[cfg(target_arch = "x86_64")]
        if simd::available() {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            unsafe { simd::gelu(part) };
            return;
        }
        for v in part.iter_mut() {
            *v = gelu_scalar(*v);
        }
    });
}

/// One row's softmax over its first `keys` values; the rest are padding and get 0.
fn softmax_row(scores: &mut [f32], keys: usize) {
    let (real, padding) = scores.split_at_mut(keys);
    let max = real.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in real.iter_mut() {
        *v = exp(*v - max);
        sum += *v;
    }
    let inverse = 1.0 / sum;
    for v in real.iter_mut() {
        *v *= inverse;
    }
    padding.fill(0.0);
}

/// AVX2 + FMA versions, eight floats at a time, of the same polynomials.
///
/// Written with raw pointers and no iterators: our crate builds at opt-level 1, where
/// generic code from the standard library (slice iterators, `chunks_exact`) is shared rather
/// than inlined, so an iterator costs a function call per element (measured: 130 ms instead
/// of 8 ms for one batch's softmax).
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn fma(a: __m256, b: __m256, c: f32) -> __m256 {
        _mm256_fmadd_ps(a, b, _mm256_set1_ps(c))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn erf(x: __m256) -> __m256 {
        let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-4.0)), _mm256_set1_ps(4.0));
        let x2 = _mm256_mul_ps(x, x);
        let mut p = _mm256_set1_ps(-2.726_142_3e-10);
        p = fma(p, x2, 2.770_681_4e-8);
        p = fma(p, x2, -2.101_024e-6);
        p = fma(p, x2, -5.692_506_4e-5);
        p = fma(p, x2, -7.349_906_3e-4);
        p = fma(p, x2, -2.954_600e-3);
        p = fma(p, x2, -1.609_603_3e-2);
        p = _mm256_mul_ps(p, x);
        let mut q = _mm256_set1_ps(-1.456_607_2e-5);
        q = fma(q, x2, -2.133_740_6e-4);
        q = fma(q, x2, -1.682_827e-3);
        q = fma(q, x2, -7.373_329_2e-3);
        q = fma(q, x2, -1.426_474e-2);
        _mm256_div_ps(p, q)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp(x: __m256) -> __m256 {
        let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0)), _mm256_set1_ps(88.0));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm256_set1_ps(1.0 / 720.0);
        p = fma(p, r, 1.0 / 120.0);
        p = fma(p, r, 1.0 / 24.0);
        p = fma(p, r, 1.0 / 6.0);
        p = fma(p, r, 0.5);
        p = fma(p, r, 1.0);
        p = fma(p, r, 1.0);
        let scale = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127))));
        _mm256_mul_ps(p, scale)
    }

    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gelu(values: &mut [f32]) {
        let (n, base) = (values.len(), values.as_mut_ptr());
        let mut i = 0;
        // SAFETY (all accesses): i + 8 <= n for vectors, i < n for the tail.
        while i + 8 <= n {
            let v = unsafe { _mm256_loadu_ps(base.wrapping_add(i)) };
            let e = erf(_mm256_mul_ps(v, _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2)));
            let g = _mm256_mul_ps(_mm256_mul_ps(v, _mm256_set1_ps(0.5)), _mm256_add_ps(e, _mm256_set1_ps(1.0)));
            unsafe { _mm256_storeu_ps(base.wrapping_add(i), g) };
            i += 8;
        }
        while i < n {
            unsafe { *base.wrapping_add(i) = super::gelu_scalar(*base.wrapping_add(i)) };
            i += 1;
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn horizontal_max(v: __m256) -> f32 {
        let halves = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let pairs = _mm_max_ps(halves, _mm_movehl_ps(halves, halves));
        _mm_cvtss_f32(_mm_max_ps(pairs, _mm_shuffle_ps::<1>(pairs, pairs)))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn horizontal_sum(v: __m256) -> f32 {
        let halves = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let pairs = _mm_add_ps(halves, _mm_movehl_ps(halves, halves));
        _mm_cvtss_f32(_mm_add_ps(pairs, _mm_shuffle_ps::<1>(pairs, pairs)))
    }

    /// # Safety
    /// The CPU must have AVX2 and FMA; `keys <= scores.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn softmax_row(scores: &mut [f32], keys: usize) {
        let (n, base) = (scores.len(), scores.as_mut_ptr());
        let keys = keys.min(n);
        let whole = keys / 8 * 8;
        // SAFETY (all accesses): indices below `whole` (vectors) or `keys`/`n` (scalars).
        let mut max8 = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i < whole {
            max8 = _mm256_max_ps(max8, unsafe { _mm256_loadu_ps(base.wrapping_add(i)) });
            i += 8;
        }
        let mut max = horizontal_max(max8);
        while i < keys {
            max = max.max(unsafe { *base.wrapping_add(i) });
            i += 1;
        }
        let max8 = _mm256_set1_ps(max);
        let mut sum8 = _mm256_setzero_ps();
        i = 0;
        while i < whole {
            let e = exp(_mm256_sub_ps(unsafe { _mm256_loadu_ps(base.wrapping_add(i)) }, max8));
            sum8 = _mm256_add_ps(sum8, e);
            unsafe { _mm256_storeu_ps(base.wrapping_add(i), e) };
            i += 8;
        }
        let mut sum = horizontal_sum(sum8);
        while i < keys {
            let e = super::exp(unsafe { *base.wrapping_add(i) } - max);
            unsafe { *base.wrapping_add(i) = e };
            sum += e;
            i += 1;
        }
        let inverse = 1.0 / sum;
        let inverse8 = _mm256_set1_ps(inverse);
        i = 0;
        while i < whole {
            unsafe { _mm256_storeu_ps(base.wrapping_add(i), _mm256_mul_ps(_mm256_loadu_ps(base.wrapping_add(i)), inverse8)) };
            i += 8;
        }
        while i < n {
            unsafe { *base.wrapping_add(i) = if i < keys { *base.wrapping_add(i) * inverse } else { 0.0 } };
            i += 1;
        }
    }
}

/// Softmax over rows of `row` values, in place. Row `r` belongs to input `r / rows_per_input`,
/// whose first `valid[input]` keys are real and the rest padding (weight 0).
pub fn masked_softmax_in_place(values: &mut [f32], row: usize, rows_per_input: usize, valid: &[usize]) {
    par_rows(values, row, &|first_row, part| {
        for (offset, scores) in part.chunks_mut(row).enumerate() {
            let input = (first_row + offset) / rows_per_input.max(1);
            let keys = valid.get(input).copied().unwrap_or(row).clamp(1, row);
            #[cfg(target_arch = "x86_64")]
            if simd::available() {
                // SAFETY: the CPU has AVX2 and FMA (checked just above).
                unsafe { simd::softmax_row(scores, keys) };
                continue;
            }
            softmax_row(scores, keys);
        }
    });
}

thread_local! {
    /// The buffer kernels work in, kept between calls: a fresh 40 MB allocation per call
    /// spends as long in page faults as the kernel takes.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `kernel` over a copy of a float32 array's values (evaluated, row-major) and returns
/// the result as a new array of the same shape.
fn map_values(array: &Array, kernel: impl FnOnce(&mut [f32])) -> Result<Array> {
    let array = if array.dtype() == mlx_rs::Dtype::Float32 { array.clone() } else { array.as_dtype(mlx_rs::Dtype::Float32)? };
    array.eval()?;
    let values = array.try_as_slice::<f32>().map_err(|e| EngineError::Mlx(e.to_string()))?;
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        scratch.clear();
        scratch.extend_from_slice(values);
        kernel(&mut scratch);
        Ok(Array::from_slice(&scratch, array.shape()))
    })
}

/// GELU of an array, computed on the host.
pub fn gelu(x: &Array) -> Result<Array> {
    map_values(x, gelu_in_place)
}

/// Softmax over the last axis of attention scores `[B, heads, L, L]`, where input `b` has
/// `valid[b]` real keys.
pub fn masked_softmax(scores: &Array, valid: &[usize]) -> Result<Array> {
    let shape = scores.shape();
    let [_, heads, queries, keys] = shape else {
        return Err(EngineError::Mlx(format!("attention scores of shape {shape:?}")));
    };
    let (keys, rows_per_input) = (*keys as usize, (*heads * *queries) as usize);
    map_values(scores, |values| masked_softmax_in_place(values, keys, rows_per_input, valid))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// erf by its Taylor series in f64 (|x| ≤ 3) or the continued fraction's complement.
    fn erf_reference(x: f64) -> f64 {
        if x.abs() > 3.0 {
            return x.signum() * (1.0 - (-(x * x)).exp() / (x.abs() * std::f64::consts::PI.sqrt()) * (1.0 - 0.5 / (x * x)));
        }
        let mut term = x;
        let mut sum = x;
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn erf_is_within_a_millionth() {
        for i in -6000..=6000 {
            let x = i as f32 / 1000.0;
            let error = (erf(x) as f64 - erf_reference(x as f64)).abs();
            assert!(error < 1e-6, "erf({x}) off by {error}");
        }
    }

    #[test]
    fn exp_is_within_float_precision() {
        for i in -8700..=8800 {
            let x = i as f32 / 100.0;
            let want = (x as f64).exp();
            let relative = ((exp(x) as f64 - want) / want).abs();
            assert!(relative < 3e-7, "exp({x}) off by {relative}");
        }
    }

    #[test]
    fn softmax_ignores_padding_keys() {
        // Two inputs, one head, 3 queries, 4 keys; the second input has 2 real keys.
        let mut scores: Vec<f32> = (0..24).map(|i| (i % 5) as f32 * 0.7 - 1.0).collect();
        let original = scores.clone();
        masked_softmax_in_place(&mut scores, 4, 3, &[4, 2]);
        for (r, row) in scores.chunks(4).enumerate() {
            let keys = if r < 3 { 4 } else { 2 };
            let source = &original[r * 4..r * 4 + keys];
            let max = source.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let total: f64 = source.iter().map(|v| ((v - max) as f64).exp()).sum();
            for k in 0..4 {
                let want = if k < keys { ((source[k] - max) as f64).exp() / total } else { 0.0 };
                assert!((row[k] as f64 - want).abs() < 1e-6, "row {r} key {k}: {} vs {want}", row[k]);
            }
        }
    }

    #[test]
    fn vector_kernels_match_the_scalar_ones() {
        let inputs: Vec<f32> = (0..1003).map(|i| (i as f32 * 0.37).sin() * 9.0 - 0.5).collect();
        let mut gelu = inputs.clone();
        gelu_in_place(&mut gelu);
        for (x, g) in inputs.iter().zip(&gelu) {
            assert!((g - gelu_scalar(*x)).abs() < 1e-6, "gelu({x}) = {g}");
        }
        for keys in [1, 7, 8, 9, 100, 1003] {
            let mut vector = inputs.clone();
            masked_softmax_in_place(&mut vector, 1003, 1, &[keys]);
            let mut scalar = inputs.clone();
            softmax_row(&mut scalar, keys);
            for (a, b) in vector.iter().zip(&scalar) {
                assert!((a - b).abs() < 1e-7, "{keys} keys: {a} vs {b}");
            }
        }
    }

    #[test]
    fn parallel_split_covers_every_row() {
        let mut values = vec![1.0f32; PARALLEL_MIN * 2 + 12];
        masked_softmax_in_place(&mut values, 4, 1, &[]);
        assert!(values.iter().all(|v| (*v - 0.25).abs() < 1e-7));
    }
}
