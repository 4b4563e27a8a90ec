//! The engine against references produced by other implementations (transformers,
//! sentence-transformers) and stored under tests/fixtures/reference by
//! scripts/reference/make_references.py: tokenization, chat templates, greedy tokens, logits
//! and embeddings of the real SmolLM2 and all-MiniLM-L6-v2 models.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use mlxserver::config::EngineConfig;
use mlxserver::engine::template::TemplateMessage;
use mlxserver::engine::{Engine, EngineEvent, FinishReason, Frontend, GenerateRequest, ModelInfo, SamplingParams};
use serde_json::Value;

pub fn models_dir() -> PathBuf {
    let dir = std::env::var_os("MLXSERVER_TEST_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| dirs::home_dir().expect("home").join(".cache/mlxserver/models"));
    assert!(dir.join("SmolLM2-135M-Instruct.Q4_1.gguf").is_file(), "test models missing in {}: run scripts/fetch-models.sh", dir.display());
    dir
}

pub fn reference(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// MLX work in this test binary is serialized: one engine, one test at a time.
pub fn mlx_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct Loaded {
    pub engine: Engine,
    pub smol: ModelInfo,
    pub minilm: ModelInfo,
    pub runtime: tokio::runtime::Runtime,
}

pub const SMOL: u64 = 1;
pub const MINILM: u64 = 2;

pub fn loaded() -> &'static Loaded {
    static LOADED: OnceLock<Loaded> = OnceLock::new();
    LOADED.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let engine = Engine::start(EngineConfig { cpu_dtype: Default::default(), prefill_chunk: 512, max_batch: 16, prefix_cache_bytes: 0, ..Default::default() });
        let dir = models_dir();
        let smol = runtime.block_on(engine.load(SMOL, &dir.join("SmolLM2-135M-Instruct.Q4_1.gguf"))).expect("load SmolLM2");
        let minilm = runtime.block_on(engine.load(MINILM, &dir.join("all-MiniLM-L6-v2"))).expect("load all-MiniLM");
        Loaded { engine, smol, minilm, runtime }
    })
}

pub fn chat_frontend(info: &ModelInfo) -> Arc<mlxserver::engine::ChatFrontend> {
    match &info.frontend {
        Frontend::Chat(frontend) => frontend.clone(),
        Frontend::Embedding(_) => panic!("expected a chat model"),
    }
}

fn ids(value: &Value) -> Vec<u32> {
    value.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

/// Greedy generation through the engine; returns (tokens, text, finish).
pub fn greedy(engine: &Engine, runtime: &tokio::runtime::Runtime, model: u64, prompt: Vec<u32>, max_tokens: usize) -> (Vec<u32>, String, FinishReason) {
    runtime.block_on(async {
        let request = GenerateRequest {
            prompt_tokens: prompt,
            sampling: SamplingParams::greedy(),
            max_tokens: Some(max_tokens),
            context_length: None,
            stop: vec![],
            logprobs: None,
            grammar: None,
        };
        let mut events = engine.generate(model, request).unwrap();
        let mut text = String::new();
        while let Some(event) = events.recv().await {
            match event {
                EngineEvent::Token { text: piece, .. } => text.push_str(&piece),
                EngineEvent::Done(done) => return (done.tokens, text, done.finish_reason),
                EngineEvent::Error(error) => panic!("generation failed: {error}"),
            }
        }
        panic!("the engine closed the stream");
    })
}

#[test]
fn tokenizer_from_gguf_matches_transformers() {
    let _guard = mlx_lock();
    let frontend = chat_frontend(&loaded().smol);
    let reference = reference("smollm2_tokenizer.json");
    for case in reference["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let expected = ids(&case["ids"]);
        let ours = mlxserver::engine::tokenizer::encode(&frontend.tokenizer, text).unwrap();
        assert_eq!(ours, expected, "token ids of case {}: {text:?}", case["name"]);
        let decoded = frontend.tokenizer.decode(&expected, false).unwrap();
        assert_eq!(decoded, case["decoded"].as_str().unwrap(), "decoding of case {}", case["name"]);
    }
    assert_eq!(frontend.eos_token_ids, vec![reference["eos_token_id"].as_u64().unwrap() as u32]);
}

#[test]
fn chat_template_matches_apply_chat_template() {
    let _guard = mlx_lock();
    let frontend = chat_frontend(&loaded().smol);
    assert!(!frontend.template.is_fallback);
    let reference = reference("smollm2_chat_template.json");
    for case in reference["cases"].as_array().unwrap() {
        let messages: Vec<TemplateMessage> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| TemplateMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let add = case["add_generation_prompt"].as_bool().unwrap();
        let rendered = frontend.template.render(&messages, add, None).unwrap();
        assert_eq!(rendered, case["rendered"].as_str().unwrap(), "case {}", case["name"]);
        if case.get("ids").is_some() {
            assert_eq!(frontend.encode_prompt(&rendered).unwrap(), ids(&case["ids"]), "prompt ids of case {}", case["name"]);
        }
    }
}

#[test]
fn greedy_tokens_match_transformers() {
    let _guard = mlx_lock();
    let loaded = loaded();
    let reference = reference("smollm2_greedy.json");
    let eos = reference["meta"]["eos_token_id"].as_u64().unwrap() as u32;
    for prompt in reference["prompts"].as_array().unwrap() {
        let name = prompt["name"].as_str().unwrap();
        let expected = ids(&prompt["generated_ids"]);
        let margins: Vec<f64> = prompt["margins_top1_top2_all_steps"].as_array().unwrap().iter().map(|m| m.as_f64().unwrap()).collect();
        let (ours, text, finish) = greedy(&loaded.engine, &loaded.runtime, SMOL, ids(&prompt["prompt_ids"]), 32);
        // Our engine stops at EOS; the reference ran on past it.
        let until_eos: Vec<u32> = expected.iter().copied().take_while(|t| *t != eos).collect();
        for (step, want) in until_eos.iter().enumerate() {
            let got = ours.get(step).copied();
            if got != Some(*want) {
                // A near-tie in the reference may legitimately flip; everything after it differs.
                assert!(margins[step] < 0.01, "{name}: step {step}: got {got:?}, want {want} (reference margin {})", margins[step]);
                break;
            }
        }
        if until_eos.len() < expected.len() {
            assert_eq!(finish, FinishReason::Stop, "{name} ends at EOS");
            assert_eq!(ours.len(), until_eos.len(), "{name}");
        } else {
            assert_eq!(finish, FinishReason::Length, "{name}");
        }
        assert!(!text.is_empty(), "{name}");
    }
}

#[test]
fn first_step_logits_are_close_to_transformers() {
    let _guard = mlx_lock();
    let loaded = loaded();
    let reference = reference("smollm2_greedy.json");
    for prompt in reference["prompts"].as_array().unwrap() {
        let stats = &prompt["first_step_logits"];
        let fixed = ids(&stats["fixed_ids"]);
        let (logprobs, argmax) = loaded.runtime.block_on(async {
            let request = GenerateRequest {
                prompt_tokens: ids(&prompt["prompt_ids"]),
                sampling: SamplingParams::greedy(),
                max_tokens: Some(1),
                context_length: None,
                stop: vec![],
                logprobs: Some(20),
                grammar: None,
            };
            let mut events = loaded.engine.generate(SMOL, request).unwrap();
            while let Some(event) = events.recv().await {
                if let EngineEvent::Token { logprob: Some(lp), token, .. } = event {
                    return (lp, token);
                }
            }
            panic!("no token");
        });
        assert_eq!(argmax as u64, stats["argmax"].as_u64().unwrap());
        // Log-probabilities differ from logits by one constant: compare differences to the top.
        let top_logit = stats["max"].as_f64().unwrap();
        let ours_top = logprobs.top[0].logprob as f64;
        let fixed_logits: Vec<f64> = stats["fixed_logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let mut compared = 0;
        for (id, logit) in fixed.iter().zip(&fixed_logits) {
            if let Some(top) = logprobs.top.iter().find(|t| t.token == *id) {
                let want = logit - top_logit;
                let got = top.logprob as f64 - ours_top;
                assert!((want - got).abs() < 0.05, "{}: token {id}: logit gap {got} vs {want}", prompt["name"]);
                compared += 1;
            }
        }
        // Among the top 20, the reference's top-5 all appear with matching gaps.
        for pair in prompt["steps"][0]["top5"].as_array().unwrap() {
            let id = pair[0].as_u64().unwrap() as u32;
            let want = pair[1].as_f64().unwrap() - top_logit;
            let ours = logprobs.top.iter().find(|t| t.token == id).unwrap_or_else(|| panic!("{}: token {id} not in our top 20", prompt["name"]));
            assert!((ours.logprob as f64 - ours_top - want).abs() < 0.05, "{}: top-5 token {id}", prompt["name"]);
            compared += 1;
        }
        assert!(compared >= 5);
    }
}

#[test]
fn embeddings_match_sentence_transformers() {
    let _guard = mlx_lock();
    let loaded = loaded();
    let Frontend::Embedding(frontend) = &loaded.minilm.frontend else { panic!("expected an embedding model") };
    assert_eq!(frontend.dimensions, 384);
    let reference = reference("minilm_embeddings.json");
    let cases = reference["cases"].as_array().unwrap();
    let mut inputs = Vec::new();
    for case in cases {
        let encoding = frontend.tokenizer.encode(case["text"].as_str().unwrap(), true).unwrap();
        assert_eq!(encoding.get_ids().to_vec(), ids(&case["token_ids"]), "tokens of {}", case["name"]);
        inputs.push(encoding.get_ids().to_vec());
    }
    let vectors = loaded.runtime.block_on(loaded.engine.embed(MINILM, inputs)).unwrap();
    for (case, ours) in cases.iter().zip(vectors) {
        let want: Vec<f64> = case["embedding"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let dot: f64 = want.iter().zip(&ours).map(|(a, b)| a * *b as f64).sum();
        let norm_a: f64 = want.iter().map(|a| a * a).sum::<f64>().sqrt();
        let norm_b: f64 = ours.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().sqrt();
        let cosine = dot / (norm_a * norm_b);
        assert!(cosine >= 0.999, "{}: cosine {cosine}", case["name"]);
        assert!((norm_b - 1.0).abs() < 1e-3, "normalized");
    }
}

#[test]
fn batched_decoding_matches_one_at_a_time() {
    let _guard = mlx_lock();
    let loaded = loaded();
    let reference = reference("smollm2_greedy.json");
    let prompts: Vec<Vec<u32>> = reference["prompts"].as_array().unwrap().iter().take(4).map(|p| ids(&p["prompt_ids"])).collect();
    let alone: Vec<Vec<u32>> = prompts.iter().map(|p| greedy(&loaded.engine, &loaded.runtime, SMOL, p.clone(), 12).0).collect();
    let together = loaded.runtime.block_on(async {
        let mut streams = Vec::new();
        for prompt in &prompts {
            let request = GenerateRequest { prompt_tokens: prompt.clone(), sampling: SamplingParams::greedy(), max_tokens: Some(12), context_length: None, stop: vec![], logprobs: None, grammar: None };
            streams.push(loaded.engine.generate(SMOL, request).unwrap());
        }
        let mut results = Vec::new();
        for mut stream in streams {
            loop {
                match stream.recv().await {
                    Some(EngineEvent::Done(done)) => {
                        results.push(done.tokens);
                        break;
                    }
                    Some(EngineEvent::Error(error)) => panic!("{error}"),
                    Some(_) => {}
                    None => panic!("closed"),
                }
            }
        }
        results
    });
    assert_eq!(alone, together);
}

#[test]
fn chunked_prefill_matches_one_pass() {
    let _guard = mlx_lock();
    let loaded = loaded();
    let reference = reference("smollm2_greedy.json");
    let long = reference["prompts"].as_array().unwrap().iter().find(|p| p["name"] == "long_summary").unwrap();
    let prompt = ids(&long["prompt_ids"]);
    let (one_pass, _, _) = greedy(&loaded.engine, &loaded.runtime, SMOL, prompt.clone(), 8);
    let chunked_engine = Engine::start(EngineConfig { cpu_dtype: Default::default(), prefill_chunk: 64, max_batch: 4, prefix_cache_bytes: 0, ..Default::default() });
    loaded.runtime.block_on(chunked_engine.load(9, &models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf"))).unwrap();
    let (chunked, _, _) = greedy(&chunked_engine, &loaded.runtime, 9, prompt, 8);
    chunked_engine.shutdown();
    assert_eq!(one_pass, chunked);
}

#[test]
fn stop_strings_and_cancellation() {
    let _guard = mlx_lock();
    let loaded = loaded();
    let frontend = chat_frontend(&loaded.smol);
    let prompt = frontend
        .encode_prompt(&frontend.template.render(&[TemplateMessage::new("user", "What is the capital of France? Answer in one word.")], true, None).unwrap())
        .unwrap();
    let (text, finish) = loaded.runtime.block_on(async {
        let request = GenerateRequest { prompt_tokens: prompt.clone(), sampling: SamplingParams::greedy(), max_tokens: Some(32), context_length: None, stop: vec!["France".into()], logprobs: None, grammar: None };
        let mut events = loaded.engine.generate(SMOL, request).unwrap();
        let mut text = String::new();
        loop {
            match events.recv().await.unwrap() {
                EngineEvent::Token { text: piece, .. } => text.push_str(&piece),
                EngineEvent::Done(done) => return (text, done.finish_reason),
                EngineEvent::Error(error) => panic!("{error}"),
            }
        }
    });
    assert_eq!(text, "The capital of ");
    assert_eq!(finish, FinishReason::Stop);

    // Dropping the receiver cancels; the engine keeps serving.
    loaded.runtime.block_on(async {
        let request = GenerateRequest { prompt_tokens: prompt.clone(), sampling: SamplingParams::greedy(), max_tokens: Some(10_000), context_length: None, stop: vec![], logprobs: None, grammar: None };
        let mut events = loaded.engine.generate(SMOL, request).unwrap();
        let _first = events.recv().await;
        drop(events);
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let stats = loaded.engine.stats().await;
        assert_eq!(stats.sequences.get(&SMOL).copied().unwrap_or(0), 0, "the cancelled sequence is gone");
    });
    let (tokens, _, _) = greedy(&loaded.engine, &loaded.runtime, SMOL, prompt, 3);
    assert_eq!(tokens.len(), 3);
}

#[test]
fn context_overflow_is_a_clear_error() {
    let _guard = mlx_lock();
    let loaded = loaded();
    let error = loaded.runtime.block_on(async {
        let request = GenerateRequest { prompt_tokens: vec![1; 100], sampling: SamplingParams::greedy(), max_tokens: Some(4), context_length: Some(50), stop: vec![], logprobs: None, grammar: None };
        let mut events = loaded.engine.generate(SMOL, request).unwrap();
        match events.recv().await {
            Some(EngineEvent::Error(error)) => error,
            other => panic!("expected an error, got {other:?}"),
        }
    });
    assert_eq!(error.to_string(), "the prompt has 100 tokens but the context holds 50");
}

#[test]
fn prefix_cache_hits_give_the_same_tokens_as_a_cold_run() {
    let _guard = mlx_lock();
    let loaded = loaded();
    let cached_engine = Engine::start(EngineConfig { cpu_dtype: Default::default(), prefill_chunk: 512, max_batch: 4, prefix_cache_bytes: 1 << 30, ..Default::default() });
    loaded.runtime.block_on(cached_engine.load(7, &models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf"))).unwrap();
    let frontend = chat_frontend(&loaded.smol);
    let render = |turns: &[(&str, &str)]| {
        let messages: Vec<TemplateMessage> = turns.iter().map(|(role, text)| TemplateMessage::new(*role, *text)).collect();
        frontend.encode_prompt(&frontend.template.render(&messages, true, None).unwrap()).unwrap()
    };
    let first = render(&[("user", "Name a fruit.")]);
    let (answer, text, _) = greedy(&cached_engine, &loaded.runtime, 7, first.clone(), 12);
    assert!(!answer.is_empty());
    let second = render(&[("user", "Name a fruit."), ("assistant", text.trim()), ("user", "And a vegetable?")]);
    let (warm, _, _) = greedy(&cached_engine, &loaded.runtime, 7, second.clone(), 12);
    let stats = loaded.runtime.block_on(cached_engine.stats());
    assert_eq!(stats.prefix.hits, 1, "{:?}", stats.prefix);
    assert!(stats.prefix.reused_tokens as usize >= first.len() - 1, "{:?}", stats.prefix);
    cached_engine.shutdown();
    let (cold, _, _) = greedy(&loaded.engine, &loaded.runtime, SMOL, second, 12);
    assert_eq!(warm, cold);
}

/// Greedy ids of `prompt` up to the reference's first EOS must equal the reference.
fn assert_matches_reference(engine: &Engine, runtime: &tokio::runtime::Runtime, model: u64, prompt: &Value, label: &str) {
    let reference = reference("smollm2_greedy.json");
    let eos = reference["meta"]["eos_token_id"].as_u64().unwrap() as u32;
    let expected: Vec<u32> = ids(&prompt["generated_ids"]).into_iter().take_while(|t| *t != eos).collect();
    let margins: Vec<f64> = prompt["margins_top1_top2_all_steps"].as_array().unwrap().iter().map(|m| m.as_f64().unwrap()).collect();
    let (ours, _, _) = greedy(engine, runtime, model, ids(&prompt["prompt_ids"]), 32);
    for (step, want) in expected.iter().enumerate() {
        if ours.get(step) != Some(want) {
            assert!(margins[step] < 0.01, "{label} {}: step {step}: {:?} vs {want}", prompt["name"], ours.get(step));
            return;
        }
    }
}

#[test]
fn converted_hf_and_mlx_folders_match_the_reference() {
    use mlxserver::engine::convert::{gguf_to_folder, WeightFormat};
    let _guard = mlx_lock();
    let loaded = loaded();
    let work = tempfile::tempdir().unwrap();
    let dense = work.path().join("hf-f32");
    let quantized = work.path().join("mlx-q4_1");
    std::fs::create_dir_all(&dense).unwrap();
    std::fs::create_dir_all(&quantized).unwrap();
    let gguf = models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let (g1, d1, g2, q2) = (gguf.clone(), dense.clone(), gguf, quantized.clone());
    loaded.runtime.block_on(async {
        loaded.engine.run(move || gguf_to_folder(&g1, &d1, WeightFormat::Dense(mlx_rs::Dtype::Float32))).await.unwrap().unwrap();
        let report = loaded.engine.run(move || gguf_to_folder(&g2, &q2, WeightFormat::KeepQuantized)).await.unwrap().unwrap();
        assert_eq!(report.quantization.as_deref(), Some("Q4_1"));
    });
    // (b): a Hugging Face folder (config.json, f32 safetensors in HF naming, tokenizer.json).
    let config: Value = serde_json::from_str(&std::fs::read_to_string(dense.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "llama");
    assert!(config.get("quantization").is_none());
    // (c): an MLX folder whose config.json carries a quantization block.
    let config: Value = serde_json::from_str(&std::fs::read_to_string(quantized.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["quantization"]["group_size"], 32);
    let reference = reference("smollm2_greedy.json");
    for (id, folder, label) in [(20u64, &dense, "hf folder"), (21, &quantized, "mlx folder")] {
        let info = loaded.runtime.block_on(loaded.engine.load(id, folder)).unwrap();
        let frontend = chat_frontend(&info);
        assert_eq!(frontend.eos_token_ids, vec![2], "{label}");
        assert!(!frontend.template.is_fallback, "{label} keeps the chat template");
        for prompt in reference["prompts"].as_array().unwrap().iter().filter(|p| p["name"] == "france" || p["name"] == "count") {
            assert_matches_reference(&loaded.engine, &loaded.runtime, id, prompt, label);
        }
        loaded.runtime.block_on(loaded.engine.unload(id));
    }
}

/// Reads a generation to its end: its token ids and its text as the events carried it.
async fn read_to_end(mut events: tokio::sync::mpsc::Receiver<EngineEvent>) -> (Vec<u32>, String) {
    let mut text = String::new();
    while let Some(event) = events.recv().await {
        match event {
            EngineEvent::Token { text: piece, .. } => text.push_str(&piece),
            EngineEvent::Done(done) => return (done.tokens, text),
            EngineEvent::Error(error) => panic!("generation failed: {error}"),
        }
    }
    panic!("the engine closed the stream");
}

#[test]
fn a_client_that_stops_reading_pauses_its_own_sequence_not_the_batch() {
    let _guard = mlx_lock();
    let loaded = loaded();
    let frontend = chat_frontend(&loaded.smol);
    let prompt = frontend.encode_prompt("1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,").unwrap();
    let (tokens, text, _) = greedy(&loaded.engine, &loaded.runtime, SMOL, prompt.clone(), 200);
    assert!(tokens.len() > 2 * mlxserver::engine::EVENT_CAPACITY, "the answer must outgrow the event channel: {} tokens", tokens.len());
    loaded.runtime.block_on(async {
        let request = || GenerateRequest { prompt_tokens: prompt.clone(), sampling: SamplingParams::greedy(), max_tokens: Some(200), context_length: None, stop: vec![], logprobs: None, grammar: None };
        let unread = loaded.engine.generate(SMOL, request()).unwrap();
        let read = loaded.engine.generate(SMOL, request()).unwrap();
        // Nobody reads the first: the second still runs to its end (the batch is not held up).
        let second = tokio::time::timeout(std::time::Duration::from_secs(300), read_to_end(read)).await.expect("the batch kept decoding");
        assert_eq!(second, (tokens.clone(), text.clone()));
        // The paused one resumes when read, and nothing it said was lost or changed.
        let first = read_to_end(unread).await;
        assert_eq!(first, (tokens.clone(), text.clone()));
    });
}
