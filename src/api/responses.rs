//! OpenAI's Responses API: `POST /v1/responses`, `GET` and `DELETE /v1/responses/{id}`, a
//! translation over the shared backend. Responses are kept in a bounded store (oldest out
//! first) for `previous_response_id`, unless the request says `store: false`. Streams are
//! SSE with named events from `response.created` to `response.completed`, each with a
//! rising `sequence_number`.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures::Stream;
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa::ToSchema;

use super::error::{check_range, json_response, stream_error, ApiError, ApiJson, Family};
use super::AppState;
use crate::answer::{Answer, AnswerEvent, ApiFamily, ChatMessage, ChatRequest, Collected, FinishReason, Options, OutputFormat};
use crate::engine::tools::{ToolCall, ToolChoice, ToolSpec};
use crate::store::Parameters;

/// Responses kept for `previous_response_id` before the oldest go.
pub const RESPONSES_KEPT: usize = 1000;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/responses", post(create)).route("/v1/responses/{id}", get(retrieve).delete(remove))
}

/// A stored response: its body, and the conversation it ended (its input and its output as
/// chat turns), which a follow-up continues.
#[derive(Debug, Clone)]
struct Stored {
    body: Value,
    conversation: Vec<ChatMessage>,
}

/// The bounded store of responses. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ResponseStore {
    capacity: usize,
    inner: Arc<Mutex<(HashMap<String, Stored>, VecDeque<String>)>>,
}

impl ResponseStore {
    pub fn new(capacity: usize) -> ResponseStore {
        ResponseStore { capacity: capacity.max(1), inner: Arc::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (HashMap<String, Stored>, VecDeque<String>)> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn insert(&self, id: String, stored: Stored) {
        let mut inner = self.lock();
        let (map, order) = &mut *inner;
        if map.insert(id.clone(), stored).is_none() {
            order.push_back(id);
        }
        while order.len() > self.capacity {
            if let Some(oldest) = order.pop_front() {
                map.remove(&oldest);
            }
        }
    }

    fn get(&self, id: &str) -> Option<Stored> {
        self.lock().0.get(id).cloned()
    }

    fn remove(&self, id: &str) -> bool {
        let mut inner = self.lock();
        let (map, order) = &mut *inner;
        order.retain(|kept| kept != id);
        map.remove(id).is_some()
    }
}

/// A Responses request (the fields mlxserver reads; others are accepted and ignored).
#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateResponseRequest {
    #[schema(example = "SmolLM2-135M-Instruct")]
    pub model: String,
    /// A string, or a list of items (messages, `function_call`, `function_call_output`).
    #[schema(value_type = Object)]
    pub input: Value,
    /// A system message for this response (not carried to follow-ups).
    pub instructions: Option<String>,
    pub max_output_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Function tools: `[{"type": "function", "name", "description", "parameters"}]`.
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<Vec<Value>>,
    /// `"auto"`, `"none"`, `"required"` or `{"type": "function", "name"}`.
    #[schema(value_type = Option<Object>)]
    pub tool_choice: Option<Value>,
    /// `{"format": {"type": "text" | "json_object" | "json_schema", "schema"?}}`.
    #[schema(value_type = Option<Object>)]
    pub text: Option<Value>,
    pub stream: Option<bool>,
    /// Keep the response for `previous_response_id` and `GET` (default true).
    pub store: Option<bool>,
    pub previous_response_id: Option<String>,
    pub parallel_tool_calls: Option<bool>,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
    pub seed: Option<u64>,
    /// mlxserver's extension: `true` or `{"collection", "top_k", "min_score",
    /// "embedding_model", "hybrid"}` answers from indexed documents; the chunks used come back
    /// in the response's `rag.sources` (file, chunk position, score).
    #[schema(value_type = Option<Object>)]
    pub rag: Option<Value>,
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

fn text_of_content(content: &Value) -> Result<String, ApiError> {
    match content {
        Value::String(text) => Ok(text.clone()),
        Value::Array(parts) => {
            let mut text = String::new();
            for part in parts {
                match part["type"].as_str() {
                    Some("input_text" | "output_text" | "text") => text.push_str(part["text"].as_str().unwrap_or_default()),
                    Some("refusal") => text.push_str(part["refusal"].as_str().unwrap_or_default()),
                    _ => return Err(ApiError::invalid_param("input", "only text content parts are supported")),
                }
            }
            Ok(text)
        }
        _ => Err(ApiError::invalid_param("input", "content must be a string or a list of parts")),
    }
}

/// The input as chat turns. A `function_call` joins the assistant turn before it (or opens
/// one); a `function_call_output` is a `tool` turn.
fn input_messages(input: &Value) -> Result<Vec<ChatMessage>, ApiError> {
    let items = match input {
        Value::String(text) => return Ok(vec![ChatMessage::new("user", text.clone())]),
        Value::Array(items) => items,
        _ => return Err(ApiError::invalid_param("input", "input must be a string or a list of items")),
    };
    let mut out: Vec<ChatMessage> = Vec::with_capacity(items.len());
    for item in items {
        match item["type"].as_str() {
            None | Some("message") => {
                let role = match item["role"].as_str() {
                    Some("developer") | Some("system") => "system",
                    Some(role @ ("user" | "assistant")) => role,
                    other => return Err(ApiError::invalid_param("input", format!("unknown role '{}'", other.unwrap_or_default()))),
                };
                out.push(ChatMessage::new(role, text_of_content(&item["content"])?));
            }
            Some("function_call") => {
                let name = item["name"].as_str().ok_or_else(|| ApiError::invalid_param("input", "a function_call needs a name"))?;
                let arguments = match &item["arguments"] {
                    Value::String(text) => serde_json::from_str(text).unwrap_or(Value::String(text.clone())),
                    other => other.clone(),
                };
                let call = ToolCall { id: item["call_id"].as_str().unwrap_or_default().to_string(), name: name.to_string(), arguments };
                match out.last_mut() {
                    Some(last) if last.role == "assistant" => last.tool_calls.push(call),
                    _ => out.push(ChatMessage { tool_calls: vec![call], ..ChatMessage::new("assistant", "") }),
                }
            }
            Some("function_call_output") => {
                let output = match &item["output"] {
                    Value::String(text) => text.clone(),
                    other => text_of_content(other)?,
                };
                out.push(ChatMessage { tool_call_id: item["call_id"].as_str().map(str::to_string), ..ChatMessage::new("tool", output) });
            }
            // Reasoning from an earlier turn is not fed back.
            Some("reasoning") => {}
            Some(other) => return Err(ApiError::invalid_param("input", format!("input items of type {other} are not supported"))),
        }
    }
    Ok(out)
}

fn tool_specs(tools: &Option<Vec<Value>>) -> Result<Vec<ToolSpec>, ApiError> {
    tools
        .iter()
        .flatten()
        .map(|tool| {
            if tool["type"].as_str() != Some("function") {
                return Err(ApiError::invalid_param("tools", "only function tools are supported"));
            }
            let name = tool["name"].as_str().ok_or_else(|| ApiError::invalid_param("tools", "a function tool needs a name"))?;
            Ok(ToolSpec {
                name: name.to_string(),
                description: tool["description"].as_str().map(str::to_string),
                parameters: if tool["parameters"].is_object() { tool["parameters"].clone() } else { json!({"type": "object", "properties": {}}) },
            })
        })
        .collect()
}

fn tool_choice(value: &Option<Value>) -> Result<ToolChoice, ApiError> {
    match value {
        None => Ok(ToolChoice::Auto),
        Some(Value::String(mode)) => match mode.as_str() {
            "auto" => Ok(ToolChoice::Auto),
            "none" => Ok(ToolChoice::None),
            "required" => Ok(ToolChoice::Required),
            _ => Err(ApiError::invalid_param("tool_choice", "tool_choice must be auto, none, required or a function")),
        },
        Some(object) if object["type"] == "function" => object["name"]
            .as_str()
            .map(|name| ToolChoice::Named(name.to_string()))
            .ok_or_else(|| ApiError::invalid_param("tool_choice", "a function tool_choice needs a name")),
        Some(_) => Err(ApiError::invalid_param("tool_choice", "tool_choice must be auto, none, required or a function")),
    }
}

fn output_format(text: &Option<Value>) -> Result<Option<OutputFormat>, ApiError> {
    let format = text.as_ref().map(|t| &t["format"]).filter(|f| !f.is_null());
    match format.and_then(|f| f["type"].as_str()) {
        None | Some("text") => Ok(None),
        Some("json_object") => Ok(Some(OutputFormat::Json)),
        Some("json_schema") => match format.map(|f| &f["schema"]) {
            Some(schema) if schema.is_object() => Ok(Some(OutputFormat::JsonSchema(schema.clone()))),
            _ => Err(ApiError::invalid_param("text.format.schema", "a json_schema format needs a schema")),
        },
        Some(other) => Err(ApiError::invalid_param("text.format.type", format!("unknown format type {other}"))),
    }
}

/// What a response echoes of its request.
struct Echo {
    id: String,
    created_at: u64,
    model: String,
    request: Value,
    /// `{"sources": [...]}` when the request asked for retrieval.
    sources: Option<Value>,
}

impl Echo {
    fn body(&self, status: &str, output: Vec<Value>, usage: Option<Value>, incomplete: bool) -> Value {
        let request = &self.request;
        let mut body = json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": null,
            "incomplete_details": if incomplete { json!({"reason": "max_output_tokens"}) } else { Value::Null },
            "instructions": request["instructions"],
            "max_output_tokens": request["max_output_tokens"],
            "model": self.model,
            "output": output,
            "parallel_tool_calls": request["parallel_tool_calls"].as_bool().unwrap_or(true),
            "previous_response_id": request["previous_response_id"],
            "store": request["store"].as_bool().unwrap_or(true),
            "temperature": request["temperature"],
            "top_p": request["top_p"],
            "text": if request["text"].is_object() { request["text"].clone() } else { json!({"format": {"type": "text"}}) },
            "tool_choice": if request["tool_choice"].is_null() { json!("auto") } else { request["tool_choice"].clone() },
            "tools": if request["tools"].is_array() { request["tools"].clone() } else { json!([]) },
            "metadata": if request["metadata"].is_object() { request["metadata"].clone() } else { json!({}) },
            "truncation": "disabled",
            "usage": usage,
        });
        if let Some(sources) = &self.sources {
            body["rag"] = sources.clone();
        }
        body
    }
}

fn usage_of(collected_usage: &crate::answer::Usage) -> Value {
    json!({
        "input_tokens": collected_usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": collected_usage.cached_tokens},
        "output_tokens": collected_usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": collected_usage.prompt_tokens + collected_usage.completion_tokens,
    })
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({"type": "message", "id": id, "status": status, "role": "assistant", "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]})
}

fn call_item(call: &ToolCall) -> Value {
    json!({"type": "function_call", "id": new_id("fc_"), "call_id": call.id, "name": call.name, "arguments": call.arguments.to_string(), "status": "completed"})
}

fn reasoning_item(text: &str) -> Value {
    json!({"type": "reasoning", "id": new_id("rs_"), "summary": [], "content": [{"type": "reasoning_text", "text": text}]})
}

/// The assistant's turn as the conversation continues it.
fn answer_turn(text: &str, calls: &[ToolCall]) -> ChatMessage {
    ChatMessage { tool_calls: calls.to_vec(), ..ChatMessage::new("assistant", text) }
}

/// Create a response.
#[utoipa::path(post, path = "/v1/responses", tag = "openai", request_body = CreateResponseRequest,
    responses((status = 200, description = "A response, or an SSE stream of events when stream is true", body = Object),
              (status = 400, body = super::error::OpenAiErrorBody), (status = 404, body = super::error::OpenAiErrorBody)))]
pub async fn create(State(state): State<AppState>, ApiJson(raw): ApiJson<Value>) -> Result<Response, ApiError> {
    let request: CreateResponseRequest = serde_json::from_value(raw.clone()).map_err(|e| ApiError::bad_request(format!("invalid request: {e}")))?;
    check_range("temperature", request.temperature, 0.0..=2.0)?;
    check_range("top_p", request.top_p, 0.0..=1.0)?;
    let mut conversation = match &request.previous_response_id {
        Some(previous) => {
            state.responses.get(previous).ok_or_else(|| ApiError::not_found(format!("previous response '{previous}' not found")).with_param("previous_response_id"))?.conversation
        }
        None => Vec::new(),
    };
    conversation.extend(input_messages(&request.input)?);
    if conversation.is_empty() {
        return Err(ApiError::invalid_param("input", "input must not be empty"));
    }
    let mut messages = Vec::with_capacity(conversation.len() + 1);
    if let Some(instructions) = request.instructions.as_ref().filter(|i| !i.is_empty()) {
        messages.push(ChatMessage::new("system", instructions.clone()));
    }
    messages.extend(conversation.iter().cloned());
    let parameters = Parameters {
        temperature: request.temperature,
        top_p: request.top_p,
        num_predict: request.max_output_tokens.map(i64::from),
        seed: request.seed,
        ..Default::default()
    };
    let options = Options { family: ApiFamily::OpenAi, parameters, logprobs: None, format: output_format(&request.text)? };
    let answer = state
        .backend
        .chat(ChatRequest {
            model: request.model.clone(),
            messages,
            options,
            tools: tool_specs(&request.tools)?,
            tool_choice: tool_choice(&request.tool_choice)?,
            rag: super::rag_options(&request.rag)?,
            ..Default::default()
        })
        .await?;
    let sources = answer.sources.as_ref().map(|sources| json!({ "sources": sources }));
    let echo = Echo { id: new_id("resp_"), created_at: answer.created.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0), model: request.model.clone(), request: raw, sources };
    let store = request.store.unwrap_or(true).then(|| state.responses.clone());
    if request.stream.unwrap_or(false) {
        let stream = response_stream(answer, echo, conversation, store);
        return Ok(Sse::new(futures::StreamExt::map(stream, Ok::<_, Infallible>)).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response());
    }
    let collected = answer.collect().await?;
    let body = finished_body(&echo, &collected);
    if let Some(store) = store {
        conversation.push(answer_turn(&collected.text, &collected.tool_calls));
        store.insert(echo.id.clone(), Stored { body: body.clone(), conversation });
    }
    Ok(json_response(StatusCode::OK, &body))
}

fn finished_body(echo: &Echo, collected: &Collected) -> Value {
    let mut output = Vec::new();
    if !collected.reasoning.is_empty() {
        output.push(reasoning_item(&collected.reasoning));
    }
    if !collected.text.is_empty() || collected.tool_calls.is_empty() {
        output.push(message_item(&new_id("msg_"), &collected.text, "completed"));
    }
    output.extend(collected.tool_calls.iter().map(call_item));
    let incomplete = collected.finish.reason == FinishReason::Length;
    echo.body(if incomplete { "incomplete" } else { "completed" }, output, Some(usage_of(&collected.finish.usage)), incomplete)
}

fn event(sequence: &mut u64, mut value: Value) -> Event {
    value["sequence_number"] = json!(*sequence);
    *sequence += 1;
    let name = value["type"].as_str().unwrap_or("message").to_string();
    Event::default().event(name).data(value.to_string())
}

fn response_stream(mut answer: Answer, echo: Echo, mut conversation: Vec<ChatMessage>, store: Option<ResponseStore>) -> impl Stream<Item = Event> + Send + 'static {
    async_stream::stream! {
        let mut sequence = 0u64;
        let started = echo.body("in_progress", Vec::new(), None, false);
        yield event(&mut sequence, json!({"type": "response.created", "response": started}));
        yield event(&mut sequence, json!({"type": "response.in_progress", "response": started}));
        let message_id = new_id("msg_");
        let mut output: Vec<Value> = Vec::new();
        let (mut text, mut reasoning, mut calls) = (String::new(), String::new(), Vec::new());
        let mut message_index: Option<usize> = None;
        while let Some(answer_event) = answer.next().await {
            match answer_event {
                AnswerEvent::Reasoning(piece) => reasoning.push_str(&piece),
                AnswerEvent::Text { text: piece, .. } => {
                    if piece.is_empty() { continue; }
                    if message_index.is_none() {
                        for value in flush_reasoning(&mut reasoning, &mut output) {
                            yield event(&mut sequence, value);
                        }
                        message_index = Some(output.len());
                        for value in open_message(&message_id, &mut output) {
                            yield event(&mut sequence, value);
                        }
                    }
                    text.push_str(&piece);
                    yield event(&mut sequence, json!({"type": "response.output_text.delta", "item_id": message_id, "output_index": message_index, "content_index": 0, "delta": piece, "logprobs": []}));
                }
                AnswerEvent::ToolCalls(new_calls) => calls.extend(new_calls),
                AnswerEvent::Done(finish) => {
                    for value in flush_reasoning(&mut reasoning, &mut output) {
                        yield event(&mut sequence, value);
                    }
                    if message_index.is_none() && calls.is_empty() {
                        message_index = Some(output.len());
                        for value in open_message(&message_id, &mut output) {
                            yield event(&mut sequence, value);
                        }
                    }
                    if let Some(index) = message_index {
                        let part = json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []});
                        yield event(&mut sequence, json!({"type": "response.output_text.done", "item_id": message_id, "output_index": index, "content_index": 0, "text": text, "logprobs": []}));
                        yield event(&mut sequence, json!({"type": "response.content_part.done", "item_id": message_id, "output_index": index, "content_index": 0, "part": part}));
                        let item = message_item(&message_id, &text, "completed");
                        output[index] = item.clone();
                        yield event(&mut sequence, json!({"type": "response.output_item.done", "output_index": index, "item": item}));
                    }
                    for call in &calls {
                        let item = call_item(call);
                        let index = output.len();
                        let id = item["id"].clone();
                        let arguments = item["arguments"].clone();
                        let mut added = item.clone();
                        added["arguments"] = json!("");
                        added["status"] = json!("in_progress");
                        yield event(&mut sequence, json!({"type": "response.output_item.added", "output_index": index, "item": added}));
                        yield event(&mut sequence, json!({"type": "response.function_call_arguments.delta", "item_id": id, "output_index": index, "delta": arguments}));
                        yield event(&mut sequence, json!({"type": "response.function_call_arguments.done", "item_id": id, "output_index": index, "name": call.name, "arguments": arguments}));
                        yield event(&mut sequence, json!({"type": "response.output_item.done", "output_index": index, "item": item}));
                        output.push(item);
                    }
                    let incomplete = finish.reason == FinishReason::Length;
                    let body = echo.body(if incomplete { "incomplete" } else { "completed" }, output, Some(usage_of(&finish.usage)), incomplete);
                    if let Some(store) = &store {
                        conversation.push(answer_turn(&text, &calls));
                        store.insert(echo.id.clone(), Stored { body: body.clone(), conversation: std::mem::take(&mut conversation) });
                    }
                    let kind = if incomplete { "response.incomplete" } else { "response.completed" };
                    yield event(&mut sequence, json!({"type": kind, "response": body}));
                    break;
                }
                AnswerEvent::Error(error) => {
                    let body = stream_error(Family::OpenAi, error);
                    yield event(&mut sequence, json!({"type": "error", "code": body["error"]["code"], "message": body["error"]["message"], "param": body["error"]["param"]}));
                    break;
                }
            }
        }
    }
}

/// The events that open the answer's message item (its place in `output` is kept for it).
fn open_message(id: &str, output: &mut Vec<Value>) -> [Value; 2] {
    let index = output.len();
    output.push(Value::Null);
    let item = json!({"type": "message", "id": id, "status": "in_progress", "role": "assistant", "content": []});
    [
        json!({"type": "response.output_item.added", "output_index": index, "item": item}),
        json!({"type": "response.content_part.added", "item_id": id, "output_index": index, "content_index": 0,
               "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}),
    ]
}

/// Reasoning gathered so far becomes one output item (added and done at once).
fn flush_reasoning(reasoning: &mut String, output: &mut Vec<Value>) -> Vec<Value> {
    if reasoning.is_empty() {
        return Vec::new();
    }
    let item = reasoning_item(&std::mem::take(reasoning));
    let index = output.len();
    output.push(item.clone());
    vec![
        json!({"type": "response.output_item.added", "output_index": index, "item": item}),
        json!({"type": "response.output_item.done", "output_index": index, "item": item}),
    ]
}

/// Retrieve a stored response.
#[utoipa::path(get, path = "/v1/responses/{id}", tag = "openai", params(("id" = String, Path, description = "Response id")),
    responses((status = 200, body = Object), (status = 404, body = super::error::OpenAiErrorBody)))]
pub async fn retrieve(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let stored = state.responses.get(&id).ok_or_else(|| ApiError::not_found(format!("response '{id}' not found")))?;
    Ok(json_response(StatusCode::OK, &stored.body))
}

/// Delete a stored response.
#[utoipa::path(delete, path = "/v1/responses/{id}", tag = "openai", params(("id" = String, Path, description = "Response id")),
    responses((status = 200, body = Object), (status = 404, body = super::error::OpenAiErrorBody)))]
pub async fn remove(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    if !state.responses.remove(&id) {
        return Err(ApiError::not_found(format!("response '{id}' not found")));
    }
    Ok(json_response(StatusCode::OK, &json!({"id": id, "object": "response.deleted", "deleted": true})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_keeps_the_newest() {
        let store = ResponseStore::new(2);
        for id in ["a", "b", "c"] {
            store.insert(id.into(), Stored { body: json!({}), conversation: Vec::new() });
        }
        assert!(store.get("a").is_none() && store.get("b").is_some() && store.get("c").is_some());
        assert!(store.remove("b") && !store.remove("b"));
    }

    #[test]
    fn items_become_turns() {
        let input = json!([
            {"role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"location\": \"Paris\"}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        ]);
        let turns = input_messages(&input).unwrap();
        assert_eq!(turns.iter().map(|t| t.role.as_str()).collect::<Vec<_>>(), ["user", "assistant", "tool"]);
        assert_eq!(turns[1].tool_calls[0].arguments, json!({"location": "Paris"}));
        assert_eq!(turns[2].tool_call_id.as_deref(), Some("call_1"));
    }
}
