//! Every API family's handlers over a scripted backend: the translation from answer events
//! to wire frames (JSON, SSE, NDJSON, plain text), errors before and after a stream starts,
//! and the stored responses of the Responses API. No model is loaded and no MLX op runs.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use futures::future::BoxFuture;
use futures::FutureExt;
use mlxserver::answer::stream::scripted;
use mlxserver::answer::{
    Answer, AnswerEvent, Backend, ChatRequest, CompletionRequest, EmbedRequest, Embeddings, Finish, FinishReason, Relevance, Result, ServiceError,
    TokenizeInput, Tokenized, Usage,
};
use mlxserver::api::{app, AppState};
use mlxserver::config::Config;
use mlxserver::engine::tools::ToolCall;
use mlxserver::engine::EngineError;
use serde_json::{json, Value};
use tower::ServiceExt;

type Script = Box<dyn Fn(&ChatRequest) -> Result<Vec<AnswerEvent>> + Send + Sync>;

/// A backend whose answers are scripted per request; it records the chat requests it got.
struct Scripted {
    script: Script,
    requests: Mutex<Vec<ChatRequest>>,
}

impl Backend for Scripted {
    fn chat(&self, request: ChatRequest) -> BoxFuture<'_, Result<Answer>> {
        let events = (self.script)(&request);
        self.requests.lock().unwrap().push(request.clone());
        async move {
            let mut answer = scripted(&request.model, events?);
            answer.prompt_tokens = vec![1; 7];
            Ok(answer)
        }
        .boxed()
    }
    fn complete(&self, request: CompletionRequest) -> BoxFuture<'_, Result<Answer>> {
        let chat = ChatRequest { model: request.model.clone(), ..Default::default() };
        let events = (self.script)(&chat);
        async move { Ok(scripted(&request.model, events?)) }.boxed()
    }
    fn embed(&self, request: EmbedRequest) -> BoxFuture<'_, Result<Embeddings>> {
        async move { Ok(Embeddings { model: request.model, vectors: vec![vec![0.0; 4]; request.inputs.len()], ..Default::default() }) }.boxed()
    }
    fn tokenize(&self, model: String, _: TokenizeInput) -> BoxFuture<'_, Result<Tokenized>> {
        async move { Ok(Tokenized { model, tokens: vec![5, 6, 7], pieces: vec!["a".into(), "b".into(), "c".into()], max_context: 2048 }) }.boxed()
    }
    fn detokenize(&self, _: String, tokens: Vec<u32>) -> BoxFuture<'_, Result<String>> {
        async move { Ok(format!("{} tokens", tokens.len())) }.boxed()
    }
    fn rerank(&self, model: String, _: String, documents: Vec<String>) -> BoxFuture<'_, Result<Relevance>> {
        async move { Ok(Relevance { model, scores: documents.iter().map(|d| d.len() as f32).collect(), tokens: 9 }) }.boxed()
    }
}

fn finish(reason: FinishReason, completion: usize) -> AnswerEvent {
    AnswerEvent::Done(Finish {
        reason,
        stop_sequence: None,
        usage: Usage { prompt_tokens: 7, completion_tokens: completion, cached_tokens: 0 },
        prompt_eval: Duration::from_millis(3),
        eval: Duration::from_millis(9),
        tokens: vec![11, 12],
    })
}

fn text(piece: &str) -> AnswerEvent {
    AnswerEvent::Text { text: piece.to_string(), logprob: None }
}

fn weather_call() -> ToolCall {
    ToolCall { id: "call_abc".into(), name: "get_weather".into(), arguments: json!({"location": "Paris"}) }
}

struct Harness {
    _home: tempfile::TempDir,
    app: axum::Router,
    backend: Arc<Scripted>,
}

fn harness(script: impl Fn(&ChatRequest) -> Result<Vec<AnswerEvent>> + Send + Sync + 'static) -> Harness {
    let home = tempfile::tempdir().unwrap();
    let config = Config::defaults(home.path());
    let backend = Arc::new(Scripted { script: Box::new(script), requests: Mutex::new(Vec::new()) });
    let state = AppState::with_backend(config, backend.clone());
    Harness { _home: home, app: app(state), backend }
}

impl Harness {
    async fn post(&self, path: &str, body: Value) -> (StatusCode, String) {
        let request = Request::post(path).header("content-type", "application/json").body(Body::from(body.to_string())).unwrap();
        let response = self.app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    async fn json(&self, path: &str, body: Value) -> Value {
        let (status, text) = self.post(path, body).await;
        assert_eq!(status, StatusCode::OK, "{text}");
        serde_json::from_str(&text).unwrap()
    }
}

/// The `data:` payloads of an SSE body, with their event names.
fn sse(body: &str) -> Vec<(Option<String>, String)> {
    body.split("\n\n")
        .filter(|frame| !frame.trim().is_empty())
        .map(|frame| {
            let name = frame.lines().find_map(|l| l.strip_prefix("event: ").or_else(|| l.strip_prefix("event:"))).map(str::to_string);
            let data = frame.lines().filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:"))).collect::<Vec<_>>().join("\n");
            (name, data)
        })
        .collect()
}

fn talk() -> Vec<AnswerEvent> {
    vec![AnswerEvent::Reasoning("think first".into()), text("Hel"), text("lo"), finish(FinishReason::Stop, 2)]
}

#[tokio::test]
async fn openai_chat_folds_text_reasoning_and_usage() {
    let harness = harness(|_| Ok(talk()));
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let response = harness.json("/v1/chat/completions", body.clone()).await;
    assert_eq!(response["choices"][0]["message"]["content"], "Hello");
    assert_eq!(response["choices"][0]["message"]["reasoning_content"], "think first");
    assert_eq!(response["choices"][0]["finish_reason"], "stop");
    assert_eq!(response["usage"]["total_tokens"], 9);
    // OpenAI's defaults reached the core, below anything the request set.
    assert_eq!(harness.backend.requests.lock().unwrap()[0].options.family, mlxserver::answer::ApiFamily::OpenAi);

    let (_, stream) = harness.post("/v1/chat/completions", json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true, "stream_options": {"include_usage": true}})).await;
    let frames = sse(&stream);
    assert_eq!(frames.last().unwrap().1, "[DONE]");
    let chunks: Vec<Value> = frames.iter().filter(|f| f.1 != "[DONE]").map(|f| serde_json::from_str(&f.1).unwrap()).collect();
    let content: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(content, "Hello");
    assert!(chunks.iter().any(|c| c["choices"][0]["delta"]["reasoning_content"] == "think first"));
    assert_eq!(chunks.iter().filter_map(|c| c["choices"][0]["finish_reason"].as_str()).collect::<Vec<_>>(), ["stop"]);
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 2);
}

#[tokio::test]
async fn tool_calls_in_every_family() {
    let harness = harness(|_| Ok(vec![AnswerEvent::ToolCalls(vec![weather_call()]), finish(FinishReason::ToolCalls, 12)]));
    let tools_openai = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]);
    let chat = harness.json("/v1/chat/completions", json!({"model": "m", "messages": [{"role": "user", "content": "w?"}], "tools": tools_openai})).await;
    assert_eq!(chat["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(chat["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"], "{\"location\":\"Paris\"}");

    let ollama = harness.json("/api/chat", json!({"model": "m", "stream": false, "messages": [{"role": "user", "content": "w?"}], "tools": tools_openai})).await;
    assert_eq!(ollama["message"]["tool_calls"][0]["function"]["arguments"]["location"], "Paris");
    assert_eq!(ollama["done_reason"], "stop");

    let tools_anthropic = json!([{"name": "get_weather", "input_schema": {"type": "object"}}]);
    let message = harness.json("/v1/messages", json!({"model": "m", "max_tokens": 50, "messages": [{"role": "user", "content": "w?"}], "tools": tools_anthropic})).await;
    assert_eq!(message["stop_reason"], "tool_use");
    let block = message["content"].as_array().unwrap().iter().find(|b| b["type"] == "tool_use").unwrap().clone();
    assert!(block["id"].as_str().unwrap().starts_with("toolu_"));
    assert_eq!(block["input"]["location"], "Paris");

    let (_, stream) = harness.post("/v1/messages", json!({"model": "m", "max_tokens": 50, "stream": true, "messages": [{"role": "user", "content": "w?"}], "tools": tools_anthropic})).await;
    let names: Vec<String> = sse(&stream).into_iter().filter_map(|f| f.0).collect();
    assert_eq!(names, ["message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta", "message_stop"]);
    assert!(stream.contains("input_json_delta"));

    let response = harness.json("/v1/responses", json!({"model": "m", "input": "w?", "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]})).await;
    let call = response["output"].as_array().unwrap().iter().find(|i| i["type"] == "function_call").unwrap().clone();
    assert_eq!((call["call_id"].as_str(), call["name"].as_str()), (Some("call_abc"), Some("get_weather")));
    assert_eq!(serde_json::from_str::<Value>(call["arguments"].as_str().unwrap()).unwrap()["location"], "Paris");
}

#[tokio::test]
async fn anthropic_messages_translate_turns_and_stream_in_order() {
    let harness = harness(|_| Ok(talk()));
    let body = json!({
        "model": "m", "max_tokens": 20, "system": [{"type": "text", "text": "be brief"}],
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"location": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}, {"type": "text", "text": "so?"}]},
        ],
    });
    let message = harness.json("/v1/messages", body.clone()).await;
    assert_eq!(message["type"], "message");
    assert_eq!(message["stop_reason"], "end_turn");
    assert_eq!(message["content"][0]["type"], "thinking");
    assert_eq!(message["content"][1], json!({"type": "text", "text": "Hello"}));
    assert_eq!(message["usage"]["input_tokens"], 7);
    let request = harness.backend.requests.lock().unwrap()[0].clone();
    let roles: Vec<&str> = request.messages.iter().map(|m| m.role.as_str()).collect();
    assert_eq!(roles, ["system", "user", "assistant", "tool", "user"]);
    assert_eq!(request.messages[2].tool_calls[0].arguments["location"], "Paris");
    assert_eq!(request.messages[3].tool_call_id.as_deref(), Some("toolu_1"));
    assert_eq!(request.options.parameters.num_predict, Some(20));

    let mut streamed = body;
    streamed["stream"] = json!(true);
    let (_, stream) = harness.post("/v1/messages", streamed).await;
    let frames = sse(&stream);
    let names: Vec<&str> = frames.iter().filter_map(|f| f.0.as_deref()).collect();
    assert_eq!(
        names,
        ["message_start", "content_block_start", "content_block_delta", "content_block_stop", "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    );
    for (name, data) in &frames {
        assert_eq!(serde_json::from_str::<Value>(data).unwrap()["type"].as_str(), name.as_deref());
    }
    let (status, missing) = harness.post("/v1/messages", json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let missing: Value = serde_json::from_str(&missing).unwrap();
    assert_eq!(missing["error"]["type"], "invalid_request_error");
    assert!(missing["error"]["message"].as_str().unwrap().contains("max_tokens"));
}

#[tokio::test]
async fn responses_are_stored_chained_and_deleted() {
    let harness = harness(|_| Ok(vec![text("Hi Ana"), finish(FinishReason::Length, 3)]));
    let first = harness.json("/v1/responses", json!({"model": "m", "input": "I am Ana", "instructions": "be kind", "max_output_tokens": 3})).await;
    assert_eq!(first["status"], "incomplete");
    assert_eq!(first["incomplete_details"]["reason"], "max_output_tokens");
    assert_eq!(first["output"][0]["content"][0]["text"], "Hi Ana");
    let id = first["id"].as_str().unwrap().to_string();
    let second = harness.json("/v1/responses", json!({"model": "m", "input": "Who am I?", "previous_response_id": id})).await;
    assert_eq!(second["previous_response_id"], id.as_str());
    let chained = harness.backend.requests.lock().unwrap()[1].clone();
    let turns: Vec<(&str, &str)> = chained.messages.iter().map(|m| (m.role.as_str(), m.content.as_str())).collect();
    // Instructions are not carried over; the earlier input and answer are.
    assert_eq!(turns, [("user", "I am Ana"), ("assistant", "Hi Ana"), ("user", "Who am I?")]);

    let (status, _) = harness.post("/v1/responses", json!({"model": "m", "input": "x", "previous_response_id": "resp_nope"})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let unstored = harness.json("/v1/responses", json!({"model": "m", "input": "x", "store": false})).await;
    let get = |id: String| {
        let app = harness.app.clone();
        async move { app.oneshot(Request::get(format!("/v1/responses/{id}")).body(Body::empty()).unwrap()).await.unwrap().status() }
    };
    assert_eq!(get(unstored["id"].as_str().unwrap().to_string()).await, StatusCode::NOT_FOUND);
    assert_eq!(get(id.clone()).await, StatusCode::OK);
    let delete = harness.app.clone().oneshot(Request::delete(format!("/v1/responses/{id}")).body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(delete.status(), StatusCode::OK);
    assert_eq!(get(id).await, StatusCode::NOT_FOUND);

    let (_, stream) = harness.post("/v1/responses", json!({"model": "m", "input": "hi", "stream": true})).await;
    let frames = sse(&stream);
    let names: Vec<&str> = frames.iter().filter_map(|f| f.0.as_deref()).collect();
    assert_eq!(names.first(), Some(&"response.created"));
    assert_eq!(names.last(), Some(&"response.incomplete"));
    let numbers: Vec<u64> = frames.iter().map(|f| serde_json::from_str::<Value>(&f.1).unwrap()["sequence_number"].as_u64().unwrap()).collect();
    assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1));
}

#[tokio::test]
async fn a_mid_stream_error_has_each_familys_shape_and_no_internal_text() {
    let harness = harness(|_| Ok(vec![text("a"), AnswerEvent::Error(ServiceError::Engine(EngineError::Mlx("/secret/path failed".into())))]));
    let chat = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true});
    let (_, openai) = harness.post("/v1/chat/completions", chat.clone()).await;
    let (_, ollama) = harness.post("/api/chat", chat.clone()).await;
    let (_, native) = harness.post("/generate", json!({"personality_name": "m", "prompt": "hi", "stream": true})).await;
    let (_, anthropic) = harness.post("/v1/messages", json!({"model": "m", "max_tokens": 5, "stream": true, "messages": [{"role": "user", "content": "hi"}]})).await;
    let (_, responses) = harness.post("/v1/responses", json!({"model": "m", "input": "hi", "stream": true})).await;
    for body in [&openai, &ollama, &native, &anthropic, &responses] {
        assert!(!body.contains("secret"), "internal text leaked: {body}");
        assert!(body.contains("internal server error"), "{body}");
    }
    let error = sse(&openai).into_iter().map(|f| f.1).find(|d| d.contains("\"error\"")).unwrap();
    assert_eq!(serde_json::from_str::<Value>(&error).unwrap()["error"]["type"], "server_error");
    let last_line: Value = serde_json::from_str(ollama.lines().last().unwrap()).unwrap();
    assert!(last_line["error"].is_string());
    assert!(native.contains("[error] internal server error"));
    assert!(sse(&anthropic).iter().any(|f| f.0.as_deref() == Some("error")));
}

#[tokio::test]
async fn errors_before_the_answer_get_a_status_and_a_request_id() {
    let harness = harness(|request| match request.model.as_str() {
        "missing" => Err(ServiceError::Store(mlxserver::store::StoreError::NotFound { name: "missing".into() })),
        _ => Err(ServiceError::Engine(EngineError::Mlx("/secret/path".into()))),
    });
    let (status, body) = harness.post("/v1/messages", json!({"model": "missing", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((body["type"].as_str(), body["error"]["type"].as_str()), (Some("error"), Some("not_found_error")));
    let request = Request::post("/api/chat").header("x-request-id", "req-42").body(Body::from(json!({"model": "broken", "messages": [{"role": "user", "content": "hi"}]}).to_string())).unwrap();
    let response = harness.app.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(response.headers()["x-request-id"], "req-42");
    let text = String::from_utf8(axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap().to_vec()).unwrap();
    assert!(text.contains("req-42") && !text.contains("secret"), "{text}");
}

#[tokio::test]
async fn tokenize_detokenize_and_rerank_translate() {
    let harness = harness(|_| Ok(Vec::new()));
    let tokens = harness.json("/tokenize", json!({"model": "m", "prompt": "abc", "with_pieces": true})).await;
    assert_eq!(tokens, json!({"model": "m", "tokens": [5, 6, 7], "count": 3, "max_model_len": 2048, "pieces": ["a", "b", "c"]}));
    assert_eq!(harness.json("/detokenize", json!({"model": "m", "tokens": [1, 2]})).await["prompt"], "2 tokens");
    let ranked = harness.json("/v1/rerank", json!({"model": "m", "query": "q", "documents": ["aa", {"text": "aaaa"}, "a"], "top_n": 2, "return_documents": true})).await;
    let order: Vec<u64> = ranked["results"].as_array().unwrap().iter().map(|r| r["index"].as_u64().unwrap()).collect();
    assert_eq!(order, [1, 0]);
    assert_eq!(ranked["results"][0]["document"]["text"], "aaaa");
    let (status, body) = harness.post("/v1/rerank", json!({"model": "m", "query": "q", "documents": []})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["error"]["type"], "invalid_request_error");
}
