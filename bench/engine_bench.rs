//! Engine throughput on one model: prompt processing (tok/s) over a prompt of N tokens and
//! decode (tok/s) over M greedy tokens, best of R runs. Run by bench/run.sh beside mlx-lm and
//! llama.cpp; prints one JSON line.
//!
//! usage: engine_bench MODEL_PATH [--prompt-tokens 512] [--decode-tokens 128] [--runs 3]
//!        [--batch 1] [--cpu-dtype float32]
//!        engine_bench GGUF_PATH --write-dense OUT_DIR   (f32 safetensors folder for other engines)

use std::path::PathBuf;
use std::time::Instant;

use mlxserver::config::EngineConfig;
use mlxserver::engine::{Engine, EngineEvent, GenerateRequest, SamplingParams};

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    if std::env::var_os("MLXSERVER_PROFILE").is_some() {
        // The engine logs where decode time goes.
        tracing_subscriber::fmt().with_env_filter("warn,mlxserver::engine=info").with_writer(std::io::stderr).init();
    }
    let args: Vec<String> = std::env::args().collect();
    let Some(model) = args.get(1).map(PathBuf::from) else {
        eprintln!("usage: engine_bench MODEL_PATH [--prompt-tokens N] [--decode-tokens M] [--runs R] [--batch B]");
        std::process::exit(2);
    };
    let prompt_tokens = arg(&args, "--prompt-tokens", 512);
    let decode_tokens = arg(&args, "--decode-tokens", 128);
    let runs = arg(&args, "--runs", 3);
    let batch = arg(&args, "--batch", 1);
    let cpu_dtype = args
        .iter()
        .position(|a| a == "--cpu-dtype")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_default();
    if let Some(out) = args.iter().position(|a| a == "--write-dense").and_then(|i| args.get(i + 1)) {
        // The same weights as f32 Hugging Face safetensors, for engines that cannot read GGUF.
        let report = mlxserver::engine::convert::gguf_to_folder(&model, std::path::Path::new(out), mlxserver::engine::convert::WeightFormat::Dense(mlx_rs::Dtype::Float32))
            .expect("convert");
        eprintln!("wrote {} tensors ({} bytes) to {out}", report.tensors, report.weight_bytes);
        return;
    }
    // `--quantize BITS`: bench an MLX-quantized copy (group 64, as `pull --quantize` makes),
    // written once beside the source folder.
    let model = match args.iter().position(|a| a == "--quantize").and_then(|i| args.get(i + 1)).and_then(|b| b.parse::<i32>().ok()) {
        Some(bits) => {
            let out = PathBuf::from(format!("{}-{bits}bit", model.display()));
            if !out.join("config.json").exists() {
                let partial = PathBuf::from(format!("{}.partial", out.display()));
                let _ = std::fs::remove_dir_all(&partial);
                std::fs::create_dir_all(&partial).expect("create folder");
                let started = Instant::now();
                mlxserver::engine::convert::quantize_folder(&model, &partial, bits, 64).expect("quantize");
                std::fs::rename(&partial, &out).expect("rename");
                eprintln!("quantized to {} in {:.1} s", out.display(), started.elapsed().as_secs_f64());
            }
            out
        }
        None => model,
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    // MLX's buffer cache bound (bytes); the server's default when not given.
    let cache_limit = args.iter().position(|a| a == "--cache-limit").and_then(|i| args.get(i + 1)).and_then(|v| v.parse::<u64>().ok());
    let mut config = EngineConfig { cpu_dtype, prefill_chunk: 512, max_batch: batch.max(1), prefix_cache_bytes: 0, ..Default::default() };
    if let Some(bytes) = cache_limit {
        config.cache_limit_bytes = bytes;
    }
    let engine = Engine::start(config);
    let started = Instant::now();
    let info = runtime.block_on(engine.load(1, &model)).expect("load");
    let load_seconds = started.elapsed().as_secs_f64();
    // Loading holds the file's arrays beside their converted copies for a moment; serving's
    // own peak is measured from here (MLX's counter is process-wide).
    let load_peak = runtime.block_on(engine.stats()).peak_memory;
    runtime.block_on(engine.run(|| mlx_rs::memory::reset_peak_memory())).expect("engine").expect("reset peak");
    // A deterministic prompt of ordinary token ids (no EOS) so every engine reads the same.
    let prompt: Vec<u32> = (0..prompt_tokens).map(|i| 1000 + (i as u32 * 7919) % 20000).collect();
    let (mut best_prefill, mut best_decode, mut best_all_rows) = (0.0f64, 0.0f64, 0.0f64);
    for _ in 0..runs {
        let (prefill, decode, all_rows) = runtime.block_on(async {
            let mut streams = Vec::new();
            for _ in 0..batch {
                let request = GenerateRequest {
                    prompt_tokens: prompt.clone(),
                    sampling: SamplingParams::greedy(),
                    max_tokens: Some(decode_tokens),
                    context_length: None,
                    stop: vec![],
                    logprobs: None,
                    grammar: None,
                };
                streams.push(engine.generate(1, request).expect("generate"));
            }
            // Every stream is read at once, so the time of each first token and of each end
            // is the time it happened.
            let started = Instant::now();
            let timings = futures::future::join_all(streams.into_iter().map(|mut stream| async move {
                let mut token_times = Vec::new();
                while let Some(event) = stream.recv().await {
                    match event {
                        EngineEvent::Token { .. } => token_times.push(started.elapsed().as_secs_f64()),
                        EngineEvent::Done(done) => return (token_times.first().copied().unwrap_or_default(), started.elapsed().as_secs_f64(), done, token_times),
                        EngineEvent::Error(error) => panic!("{error}"),
                    }
                }
                panic!("stream ended without Done")
            }))
            .await;
            if batch == 1 {
                let (_, _, done, _) = &timings[0];
                // The first token comes from the prompt pass; the rest are decode steps.
                let decode = done.completion_tokens.saturating_sub(1) as f64 / done.eval.as_secs_f64();
                (done.prompt_tokens as f64 / done.prompt_eval.as_secs_f64(), decode, decode)
            } else {
                // Aggregate rates of the whole batch: every prompt read by the time the last
                // first token appeared, and every token generated by the time the last stream
                // ended (prefills of later sequences interleave with decode steps of earlier ones).
                let last_first = timings.iter().map(|t| t.0).fold(0.0, f64::max);
                let last_done = timings.iter().map(|t| t.1).fold(0.0, f64::max);
                let prompt: usize = timings.iter().map(|t| t.2.prompt_tokens).sum();
                let generated: usize = timings.iter().map(|t| t.2.completion_tokens).sum();
                // Decode with every row in the batch, as mlx-lm's `benchmark -b` and
                // llama-batched-bench report it: tokens after the last prompt was read,
                // over the time from then to the last end (prefill excluded).
                let after: usize = timings.iter().map(|t| t.3.iter().filter(|&&time| time > last_first).count()).sum();
                (prompt as f64 / last_first, generated as f64 / last_done, after as f64 / (last_done - last_first))
            }
        });
        best_prefill = best_prefill.max(prefill);
        best_decode = best_decode.max(decode);
        best_all_rows = best_all_rows.max(all_rows);
    }
    let stats = runtime.block_on(engine.stats());
    engine.shutdown();
    println!(
        "{}",
        serde_json::json!({
            "engine": "mlxserver",
            "model": model.display().to_string(),
            "backend": engine.backend().name(),
            "weight_bytes": info.weight_bytes,
            "load_seconds": load_seconds,
            "prompt_tokens": prompt_tokens,
            "decode_tokens": decode_tokens,
            "batch": batch,
            "prompt_tok_per_s": best_prefill,
            "decode_tok_per_s": best_decode,
            "decode_all_rows_tok_per_s": best_all_rows,
            "peak_memory_bytes": stats.peak_memory.max(load_peak),
            "load_peak_memory_bytes": load_peak,
            "serving_peak_memory_bytes": stats.peak_memory,
            "active_memory_bytes": stats.active_memory,
        })
    );
}
