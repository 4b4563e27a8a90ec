//! Host cost of building an MLX graph through mlx-rs: N elementwise ops on a small array,
//! not evaluated (what a decode step pays per op before any kernel runs).
use std::time::Instant;

use mlx_rs::{ops, Array};

fn main() {
    let n = 20_000;
    let x = Array::from_slice(&[1.0f32; 64], &[64]);
    for label in ["add", "add+scalar-free rms_norm"] {
        let started = Instant::now();
        let mut y = x.clone();
        for _ in 0..n {
            y = if label == "add" { y.add(&x).unwrap() } else { mlx_rs::fast::rms_norm(&y, Some(&x), 1e-5).unwrap() };
        }
        let per = started.elapsed().as_secs_f64() * 1e6 / n as f64;
        println!("{label}: {per:.2} us per op");
        drop(y);
    }
    let started = Instant::now();
    let mut y = x.reshape(&[1, 64]).unwrap();
    for _ in 0..n {
        y = ops::matmul(&y, x.reshape(&[64, 1]).unwrap()).unwrap().reshape(&[1, 1]).unwrap().add(&x).unwrap().reshape(&[1, 64]).unwrap();
    }
    println!("matmul chain: {:.2} us per op", started.elapsed().as_secs_f64() * 1e6 / (n as f64 * 5.0));

    // SwiGLU as three ops against one compiled (fused) call, as mlx-lm's `swiglu` is.
    let gate = Array::from_slice(&[0.5f32; 64], &[1, 64]);
    let started = Instant::now();
    let mut y = gate.clone();
    for _ in 0..n {
        y = mlx_rs::nn::silu(&y).unwrap().multiply(&gate).unwrap();
    }
    println!("swiglu as ops: {:.2} us per call", started.elapsed().as_secs_f64() * 1e6 / n as f64);
    drop(y);
    let mut fused = mlx_rs::transforms::compile::compile(|(g, u): (&Array, &Array)| mlx_rs::nn::silu(g)?.multiply(u), true);
    let started = Instant::now();
    let mut y = gate.clone();
    for _ in 0..n {
        y = fused((&y, &gate)).unwrap();
    }
    println!("swiglu compiled: {:.2} us per call", started.elapsed().as_secs_f64() * 1e6 / n as f64);
    y.eval().unwrap();
}
