//! Where an all-MiniLM-L6-v2 batch spends its time on the CPU: the ops of one encoder layer
//! (the shapes of a 32-text batch of 163 tokens, random weights), each evaluated on its own
//! and timed; first as MLX ops with host softmax and GELU (the engine before 2026-11-29),
//! then as the engine runs it now. Run with `scripts/env.sh` sourced
//! (OpenBLAS core type).
//!
//! usage: cargo run --example encoder_profile [-- BATCH LENGTH REPEATS]
use std::time::Instant;

use mlx_rs::{fast, ops, random, Array};
use mlxserver::engine::host;

fn timed(label: &str, totals: &mut Vec<(String, f64)>, f: impl FnOnce() -> Array) -> Array {
    let started = Instant::now();
    let out = f();
    out.eval().unwrap();
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    match totals.iter_mut().find(|(l, _)| l == label) {
        Some((_, t)) => *t += ms,
        None => totals.push((label.to_string(), ms)),
    }
    out
}

fn main() {
    mlxserver::engine::device::reuse_large_host_buffers();
    let args: Vec<i32> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (batch, length, repeats) = (*args.first().unwrap_or(&32), *args.get(1).unwrap_or(&163), *args.get(2).unwrap_or(&6));
    let (hidden, heads, inner) = (384, 12, 1536);
    let head_dim = hidden / heads;
    let weight = |rows: i32, cols: i32| {
        let w = random::normal::<f32>(&[rows, cols], None, None, None).unwrap().multiply(Array::from_f32(0.05)).unwrap();
        w.eval().unwrap();
        w
    };
    let bias = |n: i32| {
        let b = random::normal::<f32>(&[n], None, None, None).unwrap();
        b.eval().unwrap();
        b
    };
    let (wq, wk, wv, wo, wi, wout) = (weight(hidden, hidden), weight(hidden, hidden), weight(hidden, hidden), weight(hidden, hidden), weight(inner, hidden), weight(hidden, inner));
    let (bq, bk, bv, bo, bi, bout) = (bias(hidden), bias(hidden), bias(hidden), bias(hidden), bias(inner), bias(hidden));
    let wqkv = ops::concatenate(&[&wq, &wk, &wv], 0).unwrap();
    let bqkv = ops::concatenate(&[&bq, &bk, &bv], 0).unwrap();
    wqkv.eval().unwrap();
    bqkv.eval().unwrap();
    let (norm_w, norm_b) = (bias(hidden), bias(hidden));
    let valid = vec![length as usize; batch as usize];
    let x0 = random::normal::<f32>(&[batch, length, hidden], None, None, None).unwrap();
    x0.eval().unwrap();

    let mut totals = Vec::new();
    let mut now = Vec::new();
    let mut x = x0.clone();
    for _ in 0..repeats {
        let heads_of = |y: &Array| y.reshape(&[batch, length, heads, head_dim]).unwrap().transpose_axes(&[0, 2, 1, 3]).unwrap();
        let q = timed("q/k/v addmm x3", &mut totals, || ops::addmm(&bq, &x, wq.t(), None, None).unwrap());
        let k = timed("q/k/v addmm x3", &mut totals, || ops::addmm(&bk, &x, wk.t(), None, None).unwrap());
        let v = timed("q/k/v addmm x3", &mut totals, || ops::addmm(&bv, &x, wv.t(), None, None).unwrap());
        let qs = timed("q*scale (+head copy)", &mut totals, || heads_of(&q).multiply(Array::from_f32(0.17)).unwrap());
        let kt = heads_of(&k).transpose_axes(&[0, 1, 3, 2]).unwrap();
        let scores = timed("scores matmul", &mut totals, || ops::matmul(&qs, &kt).unwrap());
        let probs = timed("host softmax", &mut totals, || host::masked_softmax(&scores, &valid).unwrap());
        let attended = timed("probs@v matmul", &mut totals, || ops::matmul(&probs, heads_of(&v)).unwrap());
        let merged = timed("merge heads copy", &mut totals, || attended.transpose_axes(&[0, 2, 1, 3]).unwrap().reshape(&[batch, length, hidden]).unwrap());
        let o = timed("out addmm", &mut totals, || ops::addmm(&bo, &merged, wo.t(), None, None).unwrap());
        let h = timed("add+layer_norm x2", &mut totals, || fast::layer_norm(&x.add(&o).unwrap(), Some(&norm_w), Some(&norm_b), 1e-12).unwrap());
        let i = timed("intermediate addmm", &mut totals, || ops::addmm(&bi, &h, wi.t(), None, None).unwrap());
        let g = timed("host gelu", &mut totals, || host::gelu(&i).unwrap());
        let out = timed("output addmm", &mut totals, || ops::addmm(&bout, &g, wout.t(), None, None).unwrap());
        x = timed("add+layer_norm x2", &mut totals, || fast::layer_norm(&h.add(&out).unwrap(), Some(&norm_w), Some(&norm_b), 1e-12).unwrap());

        // The layer as the engine runs it now (bert.rs `host_layer`): four bias-free sgemms,
        // the rest in host kernels.
        let rows = x.reshape(&[batch * length, hidden]).unwrap();
        let qkv = timed("now: stacked qkv matmul", &mut now, || ops::matmul(&rows, wqkv.t()).unwrap());
        let attended = timed("now: host attention", &mut now, || host::attention(&qkv, &bqkv, &valid, heads as usize, 0.17).unwrap());
        let projected = timed("now: out matmul", &mut now, || ops::matmul(&attended, wo.t()).unwrap());
        let joined = timed("now: host add+bias+layer_norm x2", &mut now, || host::add_layer_norm(&rows, &projected, &bo, &norm_w, &norm_b, 1e-12).unwrap());
        let inner = timed("now: intermediate matmul", &mut now, || ops::matmul(&joined, wi.t()).unwrap());
        let activated = timed("now: host bias+gelu", &mut now, || host::gelu_with_bias(&inner, &bi).unwrap());
        let out = timed("now: output matmul", &mut now, || ops::matmul(&activated, wout.t()).unwrap());
        timed("now: host add+bias+layer_norm x2", &mut now, || host::add_layer_norm(&joined, &out, &bout, &norm_w, &norm_b, 1e-12).unwrap());
    }
    let tokens = (batch * length) as f64;
    let layer_flops = 2.0 * tokens * (4.0 * (hidden * hidden) as f64 + 2.0 * (hidden * inner) as f64) + 4.0 * (batch * heads) as f64 * (length * length * head_dim) as f64;
    println!("batch {batch} x {length} tokens, {repeats} layers, {:.1} GFLOP per layer", layer_flops / 1e9);
    for (name, table) in [("before (MLX ops, host softmax and GELU)", &totals), ("now (bert.rs host_layer)", &now)] {
        println!("{name}:");
        for (label, ms) in table.iter() {
            println!("{label:>38}: {:7.1} ms per layer", ms / repeats as f64);
        }
        let layer_ms: f64 = table.iter().map(|(_, ms)| ms).sum::<f64>() / repeats as f64;
        println!("{:>38}: {:7.1} ms per layer, {:.0} GFLOP/s", "layer", layer_ms, layer_flops / layer_ms / 1e6);
    }
}
