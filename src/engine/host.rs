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

    /// The exact (erf) GELU of eight values.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn gelu8(v: __m256) -> __m256 {
        let e = erf(_mm256_mul_ps(v, _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2)));
        _mm256_mul_ps(_mm256_mul_ps(v, _mm256_set1_ps(0.5)), _mm256_add_ps(e, _mm256_set1_ps(1.0)))
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
            unsafe { _mm256_storeu_ps(base.wrapping_add(i), gelu8(v)) };
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

    /// `scores[i][j] = q[i] · kt[.][j]` for `i < keys`, `j < padded` (kt zero past `keys`):
    /// tiles of 4 queries by 16 keys (8 at the end of a row), then single queries.
    ///
    /// # Safety
    /// AVX2 and FMA; `q` holds `keys * d`, `kt` `d * padded`, `scores` `keys * padded` values;
    /// `padded` is a multiple of 8.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn scores(q: &[f32], kt: &[f32], scores: &mut [f32], keys: usize, padded: usize, d: usize) {
        debug_assert!(q.len() >= keys * d && kt.len() >= d * padded && scores.len() >= keys * padded && padded % 8 == 0);
        let (q, kt, s) = (q.as_ptr(), kt.as_ptr(), scores.as_mut_ptr());
        // SAFETY (all accesses): rows below `keys`, columns below `padded`, c below `d`.
        let mut i = 0;
        while i + 4 <= keys {
            let (q0, q1, q2, q3) = unsafe { (q.add(i * d), q.add((i + 1) * d), q.add((i + 2) * d), q.add((i + 3) * d)) };
            let out = unsafe { s.add(i * padded) };
            let mut j = 0;
            while j + 16 <= padded {
                let zero = _mm256_setzero_ps();
                let (mut a0, mut a1, mut a2, mut a3, mut b0, mut b1, mut b2, mut b3) = (zero, zero, zero, zero, zero, zero, zero, zero);
                let mut k = unsafe { kt.add(j) };
                let mut c = 0;
                while c < d {
                    let (k0, k1) = unsafe { (_mm256_loadu_ps(k), _mm256_loadu_ps(k.add(8))) };
                    let (w0, w1, w2, w3) = unsafe { (_mm256_broadcast_ss(&*q0.add(c)), _mm256_broadcast_ss(&*q1.add(c)), _mm256_broadcast_ss(&*q2.add(c)), _mm256_broadcast_ss(&*q3.add(c))) };
                    a0 = _mm256_fmadd_ps(w0, k0, a0);
                    b0 = _mm256_fmadd_ps(w0, k1, b0);
                    a1 = _mm256_fmadd_ps(w1, k0, a1);
                    b1 = _mm256_fmadd_ps(w1, k1, b1);
                    a2 = _mm256_fmadd_ps(w2, k0, a2);
                    b2 = _mm256_fmadd_ps(w2, k1, b2);
                    a3 = _mm256_fmadd_ps(w3, k0, a3);
                    b3 = _mm256_fmadd_ps(w3, k1, b3);
                    k = unsafe { k.add(padded) };
                    c += 1;
                }
                unsafe {
                    let o = out.add(j);
                    _mm256_storeu_ps(o, a0);
                    _mm256_storeu_ps(o.add(8), b0);
                    _mm256_storeu_ps(o.add(padded), a1);
                    _mm256_storeu_ps(o.add(padded + 8), b1);
                    _mm256_storeu_ps(o.add(2 * padded), a2);
                    _mm256_storeu_ps(o.add(2 * padded + 8), b2);
                    _mm256_storeu_ps(o.add(3 * padded), a3);
                    _mm256_storeu_ps(o.add(3 * padded + 8), b3);
                }
                j += 16;
            }
            if j < padded {
                let zero = _mm256_setzero_ps();
                let (mut a0, mut a1, mut a2, mut a3) = (zero, zero, zero, zero);
                let mut k = unsafe { kt.add(j) };
                let mut c = 0;
                while c < d {
                    let k0 = unsafe { _mm256_loadu_ps(k) };
                    unsafe {
                        a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(&*q0.add(c)), k0, a0);
                        a1 = _mm256_fmadd_ps(_mm256_broadcast_ss(&*q1.add(c)), k0, a1);
                        a2 = _mm256_fmadd_ps(_mm256_broadcast_ss(&*q2.add(c)), k0, a2);
                        a3 = _mm256_fmadd_ps(_mm256_broadcast_ss(&*q3.add(c)), k0, a3);
                        k = k.add(padded);
                    }
                    c += 1;
                }
                unsafe {
                    let o = out.add(j);
                    _mm256_storeu_ps(o, a0);
                    _mm256_storeu_ps(o.add(padded), a1);
                    _mm256_storeu_ps(o.add(2 * padded), a2);
                    _mm256_storeu_ps(o.add(3 * padded), a3);
                }
            }
            i += 4;
        }
        while i < keys {
            let row = unsafe { q.add(i * d) };
            let mut j = 0;
            while j < padded {
                let mut a = _mm256_setzero_ps();
                let mut k = unsafe { kt.add(j) };
                let mut c = 0;
                while c < d {
                    unsafe {
                        a = _mm256_fmadd_ps(_mm256_broadcast_ss(&*row.add(c)), _mm256_loadu_ps(k), a);
                        k = k.add(padded);
                    }
                    c += 1;
                }
                unsafe { _mm256_storeu_ps(s.add(i * padded + j), a) };
                j += 8;
            }
            i += 1;
        }
    }

    /// `out[i * stride..][..d] = Σ_j p[i][j] v[j]` for `i < keys` (the head's columns of merged
    /// output rows): two rows at a time, 32 values of `d` at once (four registers), then 8 at
    /// a time.
    ///
    /// # Safety
    /// AVX2 and FMA; `p` holds `keys * padded`, `v` `keys * d` values, `out` at least
    /// `(keys - 1) * stride + d`; `d` is a multiple of 8.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn weighted_values(p: &[f32], v: &[f32], out: &mut [f32], stride: usize, keys: usize, padded: usize, d: usize) {
        debug_assert!(p.len() >= keys * padded && v.len() >= keys * d && out.len() + stride >= keys * stride + d && d % 8 == 0);
        let (p, v, o) = (p.as_ptr(), v.as_ptr(), out.as_mut_ptr());
        // SAFETY (all accesses): rows below `keys`, value columns below `d`. A lone last row
        // reads its own weights twice and stores once.
        let mut i = 0;
        while i < keys {
            let second = if i + 1 < keys { i + 1 } else { i };
            let (pa, pb) = unsafe { (p.add(i * padded), p.add(second * padded)) };
            let mut column = 0;
            while column + 32 <= d {
                let zero = _mm256_setzero_ps();
                let (mut a0, mut a1, mut a2, mut a3, mut b0, mut b1, mut b2, mut b3) = (zero, zero, zero, zero, zero, zero, zero, zero);
                let mut row = unsafe { v.add(column) };
                let mut j = 0;
                while j < keys {
                    let (wa, wb) = unsafe { (_mm256_broadcast_ss(&*pa.add(j)), _mm256_broadcast_ss(&*pb.add(j))) };
                    let (v0, v1, v2, v3) = unsafe { (_mm256_loadu_ps(row), _mm256_loadu_ps(row.add(8)), _mm256_loadu_ps(row.add(16)), _mm256_loadu_ps(row.add(24))) };
                    a0 = _mm256_fmadd_ps(wa, v0, a0);
                    b0 = _mm256_fmadd_ps(wb, v0, b0);
                    a1 = _mm256_fmadd_ps(wa, v1, a1);
                    b1 = _mm256_fmadd_ps(wb, v1, b1);
                    a2 = _mm256_fmadd_ps(wa, v2, a2);
                    b2 = _mm256_fmadd_ps(wb, v2, b2);
                    a3 = _mm256_fmadd_ps(wa, v3, a3);
                    b3 = _mm256_fmadd_ps(wb, v3, b3);
                    row = unsafe { row.add(d) };
                    j += 1;
                }
                unsafe {
                    let (oa, ob) = (o.add(i * stride + column), o.add(second * stride + column));
                    _mm256_storeu_ps(ob, b0);
                    _mm256_storeu_ps(ob.add(8), b1);
                    _mm256_storeu_ps(ob.add(16), b2);
                    _mm256_storeu_ps(ob.add(24), b3);
                    _mm256_storeu_ps(oa, a0);
                    _mm256_storeu_ps(oa.add(8), a1);
                    _mm256_storeu_ps(oa.add(16), a2);
                    _mm256_storeu_ps(oa.add(24), a3);
                }
                column += 32;
            }
            while column < d {
                let (mut a, mut b) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                let mut row = unsafe { v.add(column) };
                let mut j = 0;
                while j < keys {
                    let value = unsafe { _mm256_loadu_ps(row) };
                    unsafe {
                        a = _mm256_fmadd_ps(_mm256_broadcast_ss(&*pa.add(j)), value, a);
                        b = _mm256_fmadd_ps(_mm256_broadcast_ss(&*pb.add(j)), value, b);
                        row = row.add(d);
                    }
                    j += 1;
                }
                unsafe {
                    _mm256_storeu_ps(o.add(second * stride + column), b);
                    _mm256_storeu_ps(o.add(i * stride + column), a);
                }
                column += 8;
            }
            i += 2;
        }
    }

    /// `out = gelu(input + bias)` over one row.
    ///
    /// # Safety
    /// AVX2 and FMA; `input` and `bias` hold at least `out.len()` values.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn bias_gelu_row(input: &[f32], bias: &[f32], out: &mut [f32]) {
        let n = out.len();
        debug_assert!(input.len() >= n && bias.len() >= n);
        let (x, b, o) = (input.as_ptr(), bias.as_ptr(), out.as_mut_ptr());
        let mut i = 0;
        // SAFETY (all accesses): i + 8 <= n for vectors, i < n for the tail.
        while i + 8 <= n {
            let v = unsafe { _mm256_add_ps(_mm256_loadu_ps(x.add(i)), _mm256_loadu_ps(b.add(i))) };
            unsafe { _mm256_storeu_ps(o.add(i), gelu8(v)) };
            i += 8;
        }
        while i < n {
            unsafe { *o.add(i) = super::gelu_scalar(*x.add(i) + *b.add(i)) };
            i += 1;
        }
    }

    /// `out = LayerNorm(x + y + y_bias) * weight + bias` over one row.
    ///
    /// # Safety
    /// AVX2 and FMA; every slice holds at least `out.len()` values.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn add_layer_norm_row(x: &[f32], y: &[f32], y_bias: &[f32], weight: &[f32], bias: &[f32], out: &mut [f32], eps: f32) {
        let n = out.len();
        debug_assert!(x.len() >= n && y.len() >= n && y_bias.len() >= n && weight.len() >= n && bias.len() >= n);
        let (x, y, yb, w, b, o) = (x.as_ptr(), y.as_ptr(), y_bias.as_ptr(), weight.as_ptr(), bias.as_ptr(), out.as_mut_ptr());
        let whole = n / 8 * 8;
        // SAFETY (all accesses): indices below `whole` (vectors) or `n` (scalars).
        let mut sum8 = _mm256_setzero_ps();
        let mut i = 0;
        while i < whole {
            let v = unsafe { _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(x.add(i)), _mm256_loadu_ps(y.add(i))), _mm256_loadu_ps(yb.add(i))) };
            unsafe { _mm256_storeu_ps(o.add(i), v) };
            sum8 = _mm256_add_ps(sum8, v);
            i += 8;
        }
        let mut sum = horizontal_sum(sum8);
        while i < n {
            let v = unsafe { *x.add(i) + *y.add(i) + *yb.add(i) };
            unsafe { *o.add(i) = v };
            sum += v;
            i += 1;
        }
        let mean = sum / n as f32;
        let mean8 = _mm256_set1_ps(mean);
        let mut squares8 = _mm256_setzero_ps();
        i = 0;
        while i < whole {
            let d = _mm256_sub_ps(unsafe { _mm256_loadu_ps(o.add(i)) }, mean8);
            squares8 = _mm256_fmadd_ps(d, d, squares8);
            i += 8;
        }
        let mut squares = horizontal_sum(squares8);
        while i < n {
            let d = unsafe { *o.add(i) } - mean;
            squares += d * d;
            i += 1;
        }
        let scale = 1.0 / (squares / n as f32 + eps).sqrt();
        let scale8 = _mm256_set1_ps(scale);
        i = 0;
        while i < whole {
            let normed = _mm256_mul_ps(_mm256_sub_ps(unsafe { _mm256_loadu_ps(o.add(i)) }, mean8), scale8);
            unsafe { _mm256_storeu_ps(o.add(i), _mm256_fmadd_ps(normed, _mm256_loadu_ps(w.add(i)), _mm256_loadu_ps(b.add(i)))) };
            i += 8;
        }
        while i < n {
            unsafe { *o.add(i) = (*o.add(i) - mean) * scale * *w.add(i) + *b.add(i) };
            i += 1;
        }
    }

    /// One head's tiles from the stacked projection rows (see `AttentionScratch`): q biased
    /// and scaled, k biased and transposed, v biased.
    ///
    /// # Safety
    /// AVX2 and FMA; `d` a multiple of 8; `input` holds `keys` rows of `width` values with
    /// `column + d <= hidden` and `width == 3 * hidden`; `q`, `v` hold `keys * d` and `kt`
    /// `d * padded` values, `padded >= keys`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn pack_head(input: &[f32], bias: &[f32], width: usize, hidden: usize, column: usize, d: usize, keys: usize, padded: usize, scale: f32, q: &mut [f32], kt: &mut [f32], v: &mut [f32]) {
        debug_assert!(d % 8 == 0 && input.len() >= keys * width && bias.len() >= width && q.len() >= keys * d && v.len() >= keys * d && kt.len() >= d * padded);
        let (x, b, qp, kp, vp) = (input.as_ptr(), bias.as_ptr(), q.as_mut_ptr(), kt.as_mut_ptr(), v.as_mut_ptr());
        let scale8 = _mm256_set1_ps(scale);
        let mut lanes = [0.0f32; 8];
        let mut j = 0;
        // SAFETY (all accesses): rows below `keys`, columns within the head, kt below d * padded.
        while j < keys {
            let row = unsafe { x.add(j * width) };
            let mut c = 0;
            while c < d {
                let (qc, kc, vc) = (column + c, hidden + column + c, 2 * hidden + column + c);
                unsafe {
                    _mm256_storeu_ps(qp.add(j * d + c), _mm256_mul_ps(_mm256_add_ps(_mm256_loadu_ps(row.add(qc)), _mm256_loadu_ps(b.add(qc))), scale8));
                    _mm256_storeu_ps(vp.add(j * d + c), _mm256_add_ps(_mm256_loadu_ps(row.add(vc)), _mm256_loadu_ps(b.add(vc))));
                    _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(_mm256_loadu_ps(row.add(kc)), _mm256_loadu_ps(b.add(kc))));
                }
                let mut l = 0;
                while l < 8 {
                    unsafe { *kp.add((c + l) * padded + j) = lanes[l] };
                    l += 1;
                }
                c += 8;
            }
            j += 1;
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

// Whole pieces of an encoder layer, for the CPU backend. The encoder's four matmuls stay
// MLX's (one BLAS call each); everything between them runs here, reading the evaluated
// matmul outputs in place and handing results to MLX without a copy:
// - attention: per (input, head), scores, softmax and the weighted sum of values in one
//   pass over a few cache-resident tiles, reading q/k/v straight out of the stacked
//   projection (with its bias) and writing heads merged; MLX's way (head transposes, 384
//   small batched sgemms with OpenBLAS's per-call thread start-up, a 40 MB softmax copied
//   in and out, the merge copy) took 92 ms per 32x163 batch-layer on the CI VM;
// - residual add + bias + LayerNorm in one pass (MLX's CPU layer norm and add: 20 ms each);
// - bias + exact GELU in one pass.

/// Spare output buffers, handed back when MLX frees the arrays made from them: a fresh 30 MB
/// buffer per op would be zeroed or page-faulted before the kernel writes it.
static SPARE: std::sync::Mutex<Vec<Vec<f32>>> = std::sync::Mutex::new(Vec::new());
/// Most bytes kept in spare buffers.
const SPARE_BYTES: usize = 256 << 20;

/// A buffer of at least `len` values (MLX reads the first `len`; the rest is spare room).
/// Only buffers already that long are reused: growing one writes every new element through
/// `Vec::resize`, which at our crate's opt-level 1 is a call per element.
fn output_buffer(len: usize) -> Vec<f32> {
    let reused = SPARE.lock().ok().and_then(|mut spare| {
        let fitting = spare.iter().enumerate().filter(|(_, v)| v.len() >= len).min_by_key(|(_, v)| v.len())?.0;
        Some(spare.swap_remove(fitting))
    });
    reused.unwrap_or_else(|| vec![0.0; len])
}

unsafe extern "C" fn return_buffer(payload: *mut std::ffi::c_void) {
    // SAFETY: `payload` is the Box<Vec<f32>> that `array_from_values` leaked; MLX calls this
    // once, when the array's data is freed.
    let values = unsafe { Box::from_raw(payload.cast::<Vec<f32>>()) };
    if let Ok(mut spare) = SPARE.lock() {
        let kept: usize = spare.iter().map(|v| v.len() * 4).sum();
        if kept + values.len() * 4 <= SPARE_BYTES {
            spare.push(*values);
        }
    }
}

/// A float32 array of `shape` over the first values of `values`, which it owns (no copy).
fn array_from_values(values: Vec<f32>, shape: &[i32]) -> Result<Array> {
    if values.len() < shape.iter().map(|&d| d.max(0) as usize).product::<usize>() {
        return Err(EngineError::Mlx(format!("{} values for shape {shape:?}", values.len())));
    }
    let mut boxed = Box::new(values);
    let data = boxed.as_mut_ptr().cast::<std::ffi::c_void>();
    let payload = Box::into_raw(boxed).cast::<std::ffi::c_void>();
    // SAFETY: `data` holds the shape's element count of float32 values and stays valid until
    // MLX hands `payload` to `return_buffer`, which frees it.
    Ok(unsafe { Array::from_ptr(mlx_sys::mlx_array_new_data_managed_payload(data, shape.as_ptr(), shape.len() as i32, mlx_sys::mlx_dtype__MLX_FLOAT32, payload, Some(return_buffer))) })
}

/// The values of a float32 array, evaluated (row-major: matmul outputs and loaded weights).
fn evaluated(array: &Array) -> Result<&[f32]> {
    if array.dtype() != mlx_rs::Dtype::Float32 {
        return Err(EngineError::Mlx(format!("host kernel on a {:?} array", array.dtype())));
    }
    array.eval()?;
    array.try_as_slice::<f32>().map_err(|e| EngineError::Mlx(e.to_string()))
}

/// Runs `work(first_row, input_rows, output_rows)` over matching row ranges of `input` (rows
/// of `in_row` values) and `output` (rows of `out_row`), one range per core.
fn par_rows_into(input: &[f32], in_row: usize, output: &mut [f32], out_row: usize, work: &(dyn Fn(usize, &[f32], &mut [f32]) + Sync)) {
    let rows = output.len() / out_row.max(1);
    let threads = threads();
    if threads == 1 || output.len() < PARALLEL_MIN / 4 || rows < 2 {
        work(0, input, output);
        return;
    }
    let rows_per_part = rows.div_ceil(threads);
    std::thread::scope(|scope| {
        for (part, (out, inp)) in output.chunks_mut(rows_per_part * out_row).zip(input.chunks(rows_per_part * in_row)).enumerate() {
            scope.spawn(move || work(part * rows_per_part, inp, out));
        }
    });
}

/// `gelu(x + bias)` for `x` of `[rows, bias.len()]` (the intermediate projection without its
/// bias).
pub fn gelu_with_bias(x: &Array, bias: &Array) -> Result<Array> {
    let (input, bias_values) = (evaluated(x)?, evaluated(bias)?);
    let width = bias_values.len();
    if width == 0 || input.len() % width != 0 {
        return Err(EngineError::Mlx(format!("GELU bias of {width} for {} values", input.len())));
    }
    let mut out = output_buffer(input.len());
    par_rows_into(input, width, &mut out[..input.len()], width, &|_, rows_in, rows_out| {
        let mut start = 0;
        while start < rows_out.len() {
            let (row_in, row_out) = (&rows_in[start..start + width], &mut rows_out[start..start + width]);
            start += width;
            #[cfg(target_arch = "x86_64")]
            if simd::available() {
                // SAFETY: the CPU has AVX2 and FMA (checked just above); all three hold `width`.
                unsafe { simd::bias_gelu_row(row_in, bias_values, row_out) };
                continue;
            }
            let mut i = 0;
            while i < width {
                row_out[i] = gelu_scalar(row_in[i] + bias_values[i]);
                i += 1;
            }
        }
    });
    array_from_values(out, x.shape())
}

/// `LayerNorm(x + y + y_bias)` with `weight` and `bias`, row by row (`x`, `y`: `[rows, width]`):
/// a post-norm transformer's residual join.
pub fn add_layer_norm(x: &Array, y: &Array, y_bias: &Array, weight: &Array, bias: &Array, eps: f32) -> Result<Array> {
    let (x_values, y_values) = (evaluated(x)?, evaluated(y)?);
    let (y_bias, weight, bias) = (evaluated(y_bias)?, evaluated(weight)?, evaluated(bias)?);
    let width = weight.len();
    if width == 0 || x_values.len() != y_values.len() || x_values.len() % width != 0 || y_bias.len() != width || bias.len() != width {
        return Err(EngineError::Mlx(format!("layer norm of {} + {} values over {width}", x_values.len(), y_values.len())));
    }
    let mut out = output_buffer(x_values.len());
    par_rows_into(x_values, width, &mut out[..x_values.len()], width, &|first_row, rows_x, rows_out| {
        let offset = first_row * width;
        let rows_y = &y_values[offset..offset + rows_out.len()];
        let mut start = 0;
        while start < rows_out.len() {
            let row = &mut rows_out[start..start + width];
            let (row_x, row_y) = (&rows_x[start..start + width], &rows_y[start..start + width]);
            start += width;
            #[cfg(target_arch = "x86_64")]
            if simd::available() {
                // SAFETY: the CPU has AVX2 and FMA (checked just above); every slice holds `width`.
                unsafe { simd::add_layer_norm_row(row_x, row_y, y_bias, weight, bias, row, eps) };
                continue;
            }
            let mut sum = 0.0f32;
            let mut i = 0;
            while i < width {
                let v = row_x[i] + row_y[i] + y_bias[i];
                row[i] = v;
                sum += v;
                i += 1;
            }
            let mean = sum / width as f32;
            let mut squares = 0.0f32;
            i = 0;
            while i < width {
                let d = row[i] - mean;
                squares += d * d;
                i += 1;
            }
            let scale = 1.0 / (squares / width as f32 + eps).sqrt();
            i = 0;
            while i < width {
                row[i] = (row[i] - mean) * scale * weight[i] + bias[i];
                i += 1;
            }
        }
    });
    array_from_values(out, x.shape())
}

/// Self-attention of an encoder batch from its stacked projection, without padding: `qkv` is
/// `[tokens, 3 * hidden]` (q, k, v side by side, heads of `hidden / heads` values each, without
/// `qkv_bias`), the rows of input `b` following those of the inputs before it, `lengths[b]`
/// of them. Returns `[tokens, hidden]`, heads merged, in the same row order.
pub fn attention(qkv: &Array, qkv_bias: &Array, lengths: &[usize], heads: usize, scale: f32) -> Result<Array> {
    let (values, bias) = (evaluated(qkv)?, evaluated(qkv_bias)?);
    let width = bias.len();
    let hidden = width / 3;
    let head_dim = hidden / heads.max(1);
    let tokens: usize = lengths.iter().sum();
    if width == 0 || width % 3 != 0 || heads == 0 || hidden % heads != 0 || lengths.contains(&0) || values.len() != tokens * width {
        return Err(EngineError::Mlx(format!("attention over {} values of width {width}, {heads} heads, inputs of {lengths:?} tokens", values.len())));
    }
    let mut out = output_buffer(tokens * hidden);
    // Inputs in contiguous groups of about equal work (keys² per input), one group per core.
    let threads = threads().min(lengths.len()).max(1);
    let total_work: usize = lengths.iter().map(|n| n * n).sum();
    let mut groups: Vec<std::ops::Range<usize>> = Vec::with_capacity(threads);
    let (mut first, mut work) = (0, 0);
    for (b, n) in lengths.iter().enumerate() {
        work += n * n;
        if work * threads >= total_work * (groups.len() + 1) || b + 1 == lengths.len() {
            groups.push(first..b + 1);
            first = b + 1;
        }
    }
    let run = |inputs: std::ops::Range<usize>, rows_in: &[f32], rows_out: &mut [f32]| {
        let mut scratch = AttentionScratch::default();
        let mut row = 0;
        for b in inputs {
            let keys = lengths[b];
            let input = &rows_in[row * width..(row + keys) * width];
            let output = &mut rows_out[row * hidden..(row + keys) * hidden];
            let mut h = 0;
            while h < heads {
                scratch.head(input, bias, output, width, hidden, h * head_dim, head_dim, keys, scale);
                h += 1;
            }
            row += keys;
        }
    };
    if groups.len() == 1 || tokens * hidden < PARALLEL_MIN / 4 {
        run(0..lengths.len(), values, &mut out[..tokens * hidden]);
    } else {
        std::thread::scope(|scope| {
            let (mut rows_in, mut rows_out) = (values, &mut out[..tokens * hidden]);
            for group in groups {
                let rows: usize = lengths[group.clone()].iter().sum();
                let (mine_in, rest_in) = rows_in.split_at(rows * width);
                let (mine_out, rest_out) = std::mem::take(&mut rows_out).split_at_mut(rows * hidden);
                (rows_in, rows_out) = (rest_in, rest_out);
                let run = &run;
                scope.spawn(move || run(group, mine_in, mine_out));
            }
        });
    }
    array_from_values(out, &[tokens as i32, hidden as i32])
}

/// `[batch, length, width]` from rows packed without padding (input `b`'s `lengths[b]` rows
/// after those of the inputs before it); the padding rows are zero.
pub fn unpack_rows(rows: &Array, lengths: &[usize], length: usize) -> Result<Array> {
    let values = evaluated(rows)?;
    let tokens: usize = lengths.iter().sum();
    let width = if tokens == 0 { 0 } else { values.len() / tokens };
    if tokens == 0 || values.len() != tokens * width || lengths.iter().any(|&n| n > length) {
        return Err(EngineError::Mlx(format!("unpacking {} values into inputs of {lengths:?} tokens", values.len())));
    }
    let mut out = vec![0.0f32; lengths.len() * length * width];
    let mut row = 0;
    for (b, &n) in lengths.iter().enumerate() {
        out[b * length * width..(b * length + n) * width].copy_from_slice(&values[row * width..(row + n) * width]);
        row += n;
    }
    array_from_values(out, &[lengths.len() as i32, length as i32, width as i32])
}

/// One head's tiles: queries (scaled, biased) `[keys, d]`, keys transposed `[d, padded]`,
/// values `[keys, d]`, scores `[keys, padded]` (`padded`: `keys` rounded up to whole vectors).
#[derive(Default)]
struct AttentionScratch {
    q: Vec<f32>,
    kt: Vec<f32>,
    v: Vec<f32>,
    scores: Vec<f32>,
}

impl AttentionScratch {
    /// Writes the head's columns (`column..column + d`) of the input's merged output rows
    /// (`output`: `keys` rows of `hidden`).
    #[allow(clippy::too_many_arguments)]
    fn head(&mut self, input: &[f32], bias: &[f32], output: &mut [f32], width: usize, hidden: usize, column: usize, d: usize, keys: usize, scale: f32) {
        let padded = keys.div_ceil(8) * 8;
        // Grown only when a longer input comes (a resize writes element by element here).
        for (buffer, len) in [(&mut self.q, keys * d), (&mut self.v, keys * d), (&mut self.kt, d * padded), (&mut self.scores, keys * padded)] {
            if buffer.len() < len {
                buffer.resize(len, 0.0);
            }
        }
        // Keys past the real ones score 0 (the softmax then ignores them).
        let mut c = 0;
        while c < d {
            let mut j = keys;
            while j < padded {
                self.kt[c * padded + j] = 0.0;
                j += 1;
            }
            c += 1;
        }
        #[cfg(target_arch = "x86_64")]
        if simd::available() && d % 8 == 0 {
            // SAFETY: the CPU has AVX2 and FMA; the tiles have the sizes set above.
            unsafe {
                simd::pack_head(input, bias, width, hidden, column, d, keys, padded, scale, &mut self.q, &mut self.kt, &mut self.v);
                simd::scores(&self.q, &self.kt, &mut self.scores, keys, padded, d);
                let mut i = 0;
                while i < keys {
                    simd::softmax_row(&mut self.scores[i * padded..(i + 1) * padded], keys);
                    i += 1;
                }
                simd::weighted_values(&self.scores, &self.v, &mut output[column..], hidden, keys, padded, d);
            }
            return;
        }
        let mut j = 0;
        while j < keys {
            let row = &input[j * width..(j + 1) * width];
            let mut c = 0;
            while c < d {
                self.q[j * d + c] = (row[column + c] + bias[column + c]) * scale;
                self.kt[c * padded + j] = row[hidden + column + c] + bias[hidden + column + c];
                self.v[j * d + c] = row[2 * hidden + column + c] + bias[2 * hidden + column + c];
                c += 1;
            }
            j += 1;
        }
        let mut i = 0;
        while i < keys {
            let mut j = 0;
            while j < keys {
                let mut dot = 0.0;
                let mut c = 0;
                while c < d {
                    dot += self.q[i * d + c] * self.kt[c * padded + j];
                    c += 1;
                }
                self.scores[i * padded + j] = dot;
                j += 1;
            }
            softmax_row(&mut self.scores[i * padded..(i + 1) * padded], keys);
            let mut c = 0;
            while c < d {
                let mut sum = 0.0;
                j = 0;
                while j < keys {
                    sum += self.scores[i * padded + j] * self.v[j * d + c];
                    j += 1;
                }
                output[i * hidden + column + c] = sum;
                c += 1;
            }
            i += 1;
        }
    }
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

    fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state % 20_001) as f32 / 10_000.0 - 1.0
            })
            .collect()
    }

    /// The attention of `host::attention`, in f64 and the plainest loops.
    fn attention_reference(qkv: &[f32], bias: &[f32], lengths: &[usize], heads: usize, scale: f64) -> Vec<f64> {
        let width = bias.len();
        let hidden = width / 3;
        let d = hidden / heads;
        let at = |t: usize, column: usize| (qkv[t * width + column] + bias[column]) as f64;
        let tokens: usize = lengths.iter().sum();
        let mut out = vec![0.0; tokens * hidden];
        let mut first = 0;
        for &keys in lengths {
            for h in 0..heads {
                for i in first..first + keys {
                    let scores: Vec<f64> = (first..first + keys).map(|j| (0..d).map(|c| at(i, h * d + c) * scale * at(j, hidden + h * d + c)).sum()).collect();
                    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                    for c in 0..d {
                        out[i * hidden + h * d + c] = (0..keys).map(|j| (scores[j] - max).exp() / total * at(first + j, 2 * hidden + h * d + c)).sum();
                    }
                }
            }
            first += keys;
        }
        out
    }

    #[test]
    fn attention_matches_a_plain_computation() {
        // Head sizes on the vector path (32, 40: a 32 block and an 8 block) and off it (12);
        // inputs of different lengths, odd ones (single-row tails), one of a single token, more
        // inputs than cores.
        for (heads, d, lengths) in [(2usize, 32usize, vec![11usize, 5, 1]), (3, 40, vec![7, 9, 2, 9]), (2, 12, vec![6, 3])] {
            let width = 3 * heads * d;
            let tokens: usize = lengths.iter().sum();
            let qkv = pseudo_random(tokens * width, (heads * d) as u32);
            let bias = pseudo_random(width, 7);
            let scale = 1.0 / (d as f32).sqrt();
            let got = attention(&Array::from_slice(&qkv, &[tokens as i32, width as i32]), &Array::from_slice(&bias, &[width as i32]), &lengths, heads, scale).unwrap();
            assert_eq!(got.shape(), &[tokens as i32, (heads * d) as i32]);
            let want = attention_reference(&qkv, &bias, &lengths, heads, scale as f64);
            for (index, (g, w)) in got.as_slice::<f32>().iter().zip(&want).enumerate() {
                assert!((*g as f64 - w).abs() < 2e-5, "heads {heads} x {d}: value {index}: {g} vs {w}");
            }
        }
        // Enough work for both cores: the split between them changes nothing.
        let lengths = vec![40usize, 3, 33, 40, 17, 40, 1, 29];
        let (heads, d) = (4, 32);
        let width = 3 * heads * d;
        let tokens: usize = lengths.iter().sum();
        let qkv = pseudo_random(tokens * width, 3);
        let bias = pseudo_random(width, 4);
        let got = attention(&Array::from_slice(&qkv, &[tokens as i32, width as i32]), &Array::from_slice(&bias, &[width as i32]), &lengths, heads, 0.2).unwrap();
        let want = attention_reference(&qkv, &bias, &lengths, heads, 0.2);
        for (index, (g, w)) in got.as_slice::<f32>().iter().zip(&want).enumerate() {
            assert!((*g as f64 - w).abs() < 2e-5, "split: value {index}: {g} vs {w}");
        }
    }

    #[test]
    fn packed_rows_unpack_with_zero_padding() {
        let rows = Array::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], &[3, 2]);
        let unpacked = unpack_rows(&rows, &[2, 1], 3).unwrap();
        assert_eq!(unpacked.shape(), &[2, 3, 2]);
        assert_eq!(unpacked.as_slice::<f32>(), &[1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 5.0, 6.0, 0.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn layer_norm_and_gelu_with_bias_match_plain_computations() {
        for width in [384usize, 20] {
            let rows = 70;
            let (x, y) = (pseudo_random(rows * width, 1), pseudo_random(rows * width, 2));
            let (y_bias, weight, bias) = (pseudo_random(width, 3), pseudo_random(width, 4), pseudo_random(width, 5));
            let array = |values: &[f32], shape: &[i32]| Array::from_slice(values, shape);
            let shape = [rows as i32, width as i32];
            let normed = add_layer_norm(&array(&x, &shape), &array(&y, &shape), &array(&y_bias, &[width as i32]), &array(&weight, &[width as i32]), &array(&bias, &[width as i32]), 1e-12).unwrap();
            for (r, got) in normed.as_slice::<f32>().chunks(width).enumerate() {
                let sums: Vec<f64> = (0..width).map(|c| (x[r * width + c] + y[r * width + c] + y_bias[c]) as f64).collect();
                let mean = sums.iter().sum::<f64>() / width as f64;
                let variance = sums.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / width as f64;
                for c in 0..width {
                    let want = (sums[c] - mean) / (variance + 1e-12).sqrt() * weight[c] as f64 + bias[c] as f64;
                    assert!((got[c] as f64 - want).abs() < 1e-5, "width {width} row {r} col {c}: {} vs {want}", got[c]);
                }
            }
            let activated = gelu_with_bias(&array(&x, &shape), &array(&bias, &[width as i32])).unwrap();
            for (index, got) in activated.as_slice::<f32>().iter().enumerate() {
                let v = (x[index] + bias[index % width]) as f64;
                let want = 0.5 * v * (1.0 + erf_reference(v / std::f64::consts::SQRT_2));
                assert!((*got as f64 - want).abs() < 2e-6, "gelu({v}) = {got}, want {want}");
            }
        }
    }

    #[test]
    fn host_outputs_live_as_long_as_their_arrays() {
        // The buffers go back to the spare list when MLX frees an array; one still referenced
        // (here through a lazy op built on it) keeps its values.
        let width = 16;
        let x = Array::from_slice(&pseudo_random(64 * width, 9), &[64, width as i32]);
        let bias = Array::from_slice(&vec![0.5f32; width], &[width as i32]);
        let first = gelu_with_bias(&x, &bias).unwrap();
        let doubled = first.multiply(Array::from_f32(2.0)).unwrap();
        let kept: Vec<f32> = first.as_slice::<f32>().to_vec();
        drop(first);
        for _ in 0..4 {
            let other = gelu_with_bias(&Array::from_slice(&pseudo_random(64 * width, 10), &[64, width as i32]), &bias).unwrap();
            other.eval().unwrap();
        }
        doubled.eval().unwrap();
        for (d, k) in doubled.as_slice::<f32>().iter().zip(&kept) {
            assert_eq!(*d, 2.0 * k);
        }
    }

    #[test]
    fn parallel_split_covers_every_row() {
        let mut values = vec![1.0f32; PARALLEL_MIN * 2 + 12];
        masked_softmax_in_place(&mut values, 4, 1, &[]);
        assert!(values.iter().all(|v| (*v - 0.25).abs() < 1e-7));
    }
}
