//! The real server with the real small models over real HTTP: keep-alive unloading, LRU
//! eviction under a memory limit, concurrent streams batched together, cancellation when a
//! client goes away, `/api/ps`, and a stop that lets in-flight answers finish.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};

use crate::common::{stderr, wait_for, Home, ServerProcess};
use crate::engine_reference::models_dir;

pub const CHAT: &str = "SmolLM2-135M-Instruct";
pub const EMBED: &str = "all-MiniLM-L6-v2";

/// A home with both small models registered.
pub fn home_with_models() -> Home {
    let home = Home::new();
    let dir = models_dir();
    for (name, source) in [(CHAT, dir.join("SmolLM2-135M-Instruct.Q4_1.gguf")), (EMBED, dir.join("all-MiniLM-L6-v2"))] {
        let output = home.run(&["pull", source.to_str().unwrap(), "--name", name]);
        assert!(output.status.success(), "pull {name}: {}", stderr(&output));
    }
    home
}

pub fn start(home: &Home, env: &[(&str, &str)], args: &[&str]) -> ServerProcess {
    let port = crate::common::free_port();
    let mut command = home.command();
    command.arg("serve").arg("--port").arg(port.to_string()).args(args).stdin(std::process::Stdio::null());
    for (key, value) in env {
        command.env(key, value);
    }
    let child = command.spawn().expect("spawn serve");
    let server = ServerProcess { child, port };
    wait_for("the server", Duration::from_secs(30), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    server
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(300)).build().unwrap()
}

async fn ps(server: &ServerProcess) -> Vec<Value> {
    let body: Value = client().get(server.url("/api/ps")).send().await.unwrap().json().await.unwrap();
    body["models"].as_array().unwrap().clone()
}

async fn chat(server: &ServerProcess, model: &str, prompt: &str, extra: Value) -> Value {
    let mut body = json!({"model": model, "messages": [{"role": "user", "content": prompt}], "stream": false, "options": {"temperature": 0, "num_predict": 8}});
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            body.insert(k.clone(), v.clone());
        }
    }
    let response = client().post(server.url("/api/chat")).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

#[tokio::test]
async fn idle_models_unload_after_their_keep_alive() {
    let _guard = crate::engine_reference::mlx_lock();
    let home = home_with_models();
    let server = start(&home, &[("MLXSERVER_KEEP_ALIVE", "2s")], &[]);
    chat(&server, CHAT, "Hi", json!({})).await;
    let loaded = ps(&server).await;
    assert_eq!(loaded.len(), 1, "{loaded:?}");
    assert_eq!(loaded[0]["name"], format!("{CHAT}:latest"));
    assert!(loaded[0]["size"].as_u64().unwrap() > 100_000_000, "f32 weights are held: {loaded:?}");
    assert_eq!(loaded[0]["busy"], false);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(ps(&server).await.is_empty(), "unloaded after keep_alive");
    // keep_alive 0 on a request unloads right after it; -1 keeps it.
    chat(&server, CHAT, "Hi", json!({"keep_alive": 0})).await;
    assert!(ps(&server).await.is_empty());
    chat(&server, CHAT, "Hi", json!({"keep_alive": -1})).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(ps(&server).await.len(), 1);
    // An empty prompt with keep_alive 0 unloads (as in Ollama).
    let response: Value = client().post(server.url("/api/generate")).json(&json!({"model": CHAT, "keep_alive": 0})).send().await.unwrap().json().await.unwrap();
    assert_eq!(response["done_reason"], "unload");
    assert!(ps(&server).await.is_empty());
}

#[tokio::test]
async fn least_recently_used_model_is_evicted_under_the_memory_limit() {
    let _guard = crate::engine_reference::mlx_lock();
    let home = home_with_models();
    // SmolLM2 holds 538 MB in f32 and MiniLM 91 MB: 580 MiB (608 MB) fits one, not both.
    let server = start(&home, &[("MLXSERVER_MEMORY_LIMIT", "580MiB")], &[]);
    chat(&server, CHAT, "Hi", json!({})).await;
    let response = client().post(server.url("/api/embed")).json(&json!({"model": EMBED, "input": "hello"})).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let names: Vec<String> = ps(&server).await.iter().map(|m| m["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(names, vec![format!("{EMBED}:latest")], "the chat model was evicted");
    chat(&server, CHAT, "Hi", json!({})).await;
    let names: Vec<String> = ps(&server).await.iter().map(|m| m["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(names, vec![format!("{CHAT}:latest")]);
}

async fn stream_chat(server: &ServerProcess, prompt: String, tokens: usize) -> (String, Duration, usize) {
    let started = Instant::now();
    let body = json!({"model": CHAT, "messages": [{"role": "user", "content": prompt}], "options": {"temperature": 0, "num_predict": tokens}});
    let response = client().post(server.url("/api/chat")).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut buffer = Vec::new();
    let mut text = String::new();
    let mut first = None;
    let mut eval_count = 0;
    while let Some(chunk) = stream.next().await {
        buffer.extend_from_slice(&chunk.unwrap());
        while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            let value: Value = serde_json::from_slice(&line).unwrap();
            assert!(value.get("error").is_none(), "{value}");
            if first.is_none() {
                first = Some(started.elapsed());
            }
            text.push_str(value["message"]["content"].as_str().unwrap_or_default());
            if value["done"] == true {
                eval_count = value["eval_count"].as_u64().unwrap() as usize;
            }
        }
    }
    (text, first.unwrap(), eval_count)
}

#[tokio::test]
async fn sixteen_concurrent_streams_complete_and_batching_beats_one_stream() {
    let _guard = crate::engine_reference::mlx_lock();
    let home = home_with_models();
    let server = start(&home, &[], &[]);
    let prompts: Vec<String> = (0..16).map(|i| format!("Count from {i} to {}.", i + 20)).collect();
    // Warm up, and the single-stream baseline.
    stream_chat(&server, prompts[0].clone(), 4).await;
    let started = Instant::now();
    // Answers long enough that decode steps, which batching shares, outweigh the prompts,
    // which are read one after another.
    let (alone_text, _, alone_count) = stream_chat(&server, prompts[0].clone(), 48).await;
    let one_stream_rate = alone_count as f64 / started.elapsed().as_secs_f64();

    let started = Instant::now();
    let results = futures::future::join_all(prompts.iter().map(|p| stream_chat(&server, p.clone(), 48))).await;
    let elapsed = started.elapsed().as_secs_f64();
    let total: usize = results.iter().map(|r| r.2).sum();
    for (text, _, count) in &results {
        assert!(!text.is_empty() && *count > 0);
    }
    // Greedy answers do not depend on what else is in the batch.
    assert_eq!(results[0].0, alone_text);
    let aggregate = total as f64 / elapsed;
    eprintln!("one stream: {one_stream_rate:.1} tok/s; 16 streams: {aggregate:.1} tok/s aggregate");
    assert!(aggregate > 2.0 * one_stream_rate, "batched aggregate {aggregate:.1} tok/s vs one stream {one_stream_rate:.1} tok/s");
}

#[tokio::test]
async fn a_client_that_disconnects_cancels_its_generation() {
    let _guard = crate::engine_reference::mlx_lock();
    let home = home_with_models();
    let server = start(&home, &[], &[]);
    let body = json!({"model": CHAT, "messages": [{"role": "user", "content": "Write a very long story."}], "options": {"num_predict": 100000, "num_ctx": 8192}});
    let response = client().post(server.url("/api/chat")).json(&body).send().await.unwrap();
    let mut stream = response.bytes_stream();
    let _ = stream.next().await;
    assert_eq!(ps(&server).await[0]["busy"], true);
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if ps(&server).await.first().is_some_and(|m| m["busy"] == false) {
            break;
        }
        assert!(Instant::now() < deadline, "the generation was not cancelled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn stop_waits_for_an_in_flight_answer() {
    let _guard = crate::engine_reference::mlx_lock();
    let home = home_with_models();
    let mut server = start(&home, &[], &[]);
    chat(&server, CHAT, "Hi", json!({})).await;
    let url = server.url("/api/chat");
    let answer = tokio::spawn(async move {
        let body = json!({"model": CHAT, "messages": [{"role": "user", "content": "Count to fifty."}], "stream": false, "options": {"temperature": 0, "num_predict": 48}});
        let response = client().post(url).json(&body).send().await.unwrap();
        (response.status(), response.json::<Value>().await.unwrap())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stop = tokio::task::spawn_blocking({
        let home_path = home.path().to_path_buf();
        move || {
            std::process::Command::new(crate::common::BIN).arg("stop").env("MLXSERVER_HOME", home_path).output().unwrap()
        }
    })
    .await
    .unwrap();
    assert!(stop.status.success());
    let (status, body) = answer.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body["eval_count"], 48, "the answer finished: {body}");
    assert!(server.child.wait().unwrap().success());
}

fn in_flight(metrics: &str) -> u64 {
    metrics.lines().find_map(|line| line.strip_prefix("mlxserver_answers_in_flight ")).and_then(|v| v.trim().parse().ok()).expect("mlxserver_answers_in_flight in /metrics")
}

#[tokio::test]
async fn a_full_queue_answers_503_with_retry_after_and_a_gone_client_frees_its_place() {
    let _guard = crate::engine_reference::mlx_lock();
    let home = home_with_models();
    // One answer at a time and no queue: a second request is refused at once.
    let server = start(&home, &[("MLXSERVER_ENGINE_MAX_BATCH", "1"), ("MLXSERVER_MAX_QUEUE", "0"), ("MLXSERVER_METRICS", "true")], &[]);
    chat(&server, CHAT, "Hi", json!({})).await;
    let long = json!({"model": CHAT, "messages": [{"role": "user", "content": "Write a very long story."}], "options": {"num_predict": 100000, "num_ctx": 8192}});
    let response = client().post(server.url("/api/chat")).json(&long).send().await.unwrap();
    let mut stream = response.bytes_stream();
    let _ = stream.next().await;
    let metrics = client().get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert_eq!(in_flight(&metrics), 1, "{metrics}");

    let refused = client().post(server.url("/api/chat")).json(&long).send().await.unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    let body: Value = refused.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("busy"), "{body}");
    let openai = json!({"model": CHAT, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4});
    let refused = client().post(server.url("/v1/chat/completions")).json(&openai).send().await.unwrap();
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "server_busy", "{body}");

    // The client goes away mid-stream: its place is free again within moments (one decode
    // step, plus the time to notice the closed connection).
    drop(stream);
    let gone = Instant::now();
    loop {
        let metrics = client().get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
        if in_flight(&metrics) == 0 {
            break;
        }
        assert!(gone.elapsed() < Duration::from_secs(5), "the place was not freed: {metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("a gone client's place was free after {:?}", gone.elapsed());
    let answer = chat(&server, CHAT, "Hi", json!({})).await;
    assert_eq!(answer["done"], true, "{answer}");
}
