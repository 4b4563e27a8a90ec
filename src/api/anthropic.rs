//! Anthropic's Messages API: `POST /v1/messages` and `POST /v1/messages/count_tokens`, a
//! translation over the shared backend. Streams are SSE with named events (`message_start`,
//! `content_block_start`, `content_block_delta`, `content_block_stop`, `message_delta`,
//! `message_stop`); an error after the start is an `error` event in Anthropic's shape.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use futures::Stream;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;

use super::error::{check_range, json_response, stream_error, ApiError, ApiJson, Family};
use super::AppState;
use crate::answer::{Answer, AnswerEvent, ApiFamily, ChatMessage, ChatRequest, Finish, FinishReason, Options, TokenizeInput};
use crate::engine::tools::{ToolCall, ToolChoice, ToolSpec};
use crate::store::Parameters;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/messages", post(messages)).route("/v1/messages/count_tokens", post(count_tokens))
}

/// A Messages request. Content fields take Anthropic's forms: a string or a list of blocks.
#[derive(Debug, Deserialize, ToSchema)]
pub struct MessagesRequest {
    #[schema(example = "SmolLM2-135M-Instruct")]
    pub model: String,
    /// Required: tokens to generate at most.
    pub max_tokens: Option<u32>,
    /// `[{"role": "user" | "assistant", "content": "..." | [blocks]}]`.
    #[schema(value_type = Vec<Object>)]
    pub messages: Vec<Value>,
    /// A string or a list of text blocks.
    #[schema(value_type = Option<Object>)]
    pub system: Option<Value>,
    pub stop_sequences: Option<Vec<String>>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub stream: Option<bool>,
    /// `[{"name", "description", "input_schema"}]`.
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<Vec<Value>>,
    /// `{"type": "auto" | "any" | "tool" | "none", "name"?}`.
    #[schema(value_type = Option<Object>)]
    pub tool_choice: Option<Value>,
    /// `{"type": "enabled" | "disabled"}`: a reasoning model's thinking on or off.
    #[schema(value_type = Option<Object>)]
    pub thinking: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
    /// mlxserver's extension: `true` or `{"collection", "top_k", "min_score",
    /// "embedding_model", "hybrid"}` answers from indexed documents; the chunks used come back
    /// in `rag.sources` (file, chunk position, score) of the message (`message_start` when
    /// streaming).
    #[schema(value_type = Option<Object>)]
    pub rag: Option<Value>,
}

/// `count_tokens` takes the prompt part of a Messages request.
#[derive(Debug, Deserialize, ToSchema)]
pub struct CountTokensRequest {
    pub model: String,
    #[schema(value_type = Vec<Object>)]
    pub messages: Vec<Value>,
    #[schema(value_type = Option<Object>)]
    pub system: Option<Value>,
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<Vec<Value>>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CountTokensResponse {
    pub input_tokens: usize,
}

/// The Messages response, for the OpenAPI document.
#[derive(Debug, Serialize, ToSchema)]
pub struct MessageSchema {
    #[schema(example = "msg_0123")]
    pub id: String,
    #[schema(example = "message")]
    pub r#type: String,
    #[schema(example = "assistant")]
    pub role: String,
    pub model: String,
    /// Text, thinking and tool_use blocks.
    #[schema(value_type = Vec<Object>)]
    pub content: Vec<Value>,
    /// `end_turn`, `max_tokens`, `stop_sequence` or `tool_use`.
    pub stop_reason: Option<String>,
    pub stop_sequence: Option<String>,
    #[schema(value_type = Object)]
    pub usage: Value,
}

/// The text of a string or of a list of text blocks.
fn text_of(value: &Value, field: &str) -> Result<String, ApiError> {
    match value {
        Value::String(text) => Ok(text.clone()),
        Value::Array(blocks) => {
            let mut text = String::new();
            for block in blocks {
                match block["type"].as_str() {
                    Some("text") => text.push_str(block["text"].as_str().unwrap_or_default()),
                    _ => return Err(ApiError::invalid_param(field, "only text blocks are supported here")),
                }
            }
            Ok(text)
        }
        Value::Null => Ok(String::new()),
        _ => Err(ApiError::invalid_param(field, format!("{field} must be a string or a list of blocks"))),
    }
}

/// Anthropic's turns as the core's: text blocks join, `tool_use` blocks become an assistant
/// turn's calls, `tool_result` blocks become `tool` turns (before the user's own text).
fn chat_messages(system: &Option<Value>, messages: &[Value]) -> Result<Vec<ChatMessage>, ApiError> {
    let mut out = Vec::with_capacity(messages.len() + 1);
    if let Some(system) = system {
        let text = text_of(system, "system")?;
        if !text.is_empty() {
            out.push(ChatMessage::new("system", text));
        }
    }
    for message in messages {
        let role = message["role"].as_str().unwrap_or_default();
        if role != "user" && role != "assistant" {
            return Err(ApiError::invalid_param("messages", format!("unknown role '{role}': use user or assistant")));
        }
        let blocks = match &message["content"] {
            Value::String(text) => vec![json!({"type": "text", "text": text})],
            Value::Array(blocks) => blocks.clone(),
            _ => return Err(ApiError::invalid_param("messages", "content must be a string or a list of blocks")),
        };
        let mut turn = ChatMessage::new(role, "");
        for block in &blocks {
            match block["type"].as_str() {
                Some("text") => turn.content.push_str(block["text"].as_str().unwrap_or_default()),
                // Earlier thinking is not fed back, as Anthropic's own models ignore it.
                Some("thinking") | Some("redacted_thinking") => {}
                Some("tool_use") if role == "assistant" => {
                    let id = block["id"].as_str().unwrap_or_default().to_string();
                    let name = block["name"].as_str().ok_or_else(|| ApiError::invalid_param("messages", "a tool_use block needs a name"))?;
                    turn.tool_calls.push(ToolCall { id, name: name.to_string(), arguments: block["input"].clone() });
                }
                Some("tool_result") if role == "user" => {
                    let content = text_of(&block["content"], "messages")?;
                    out.push(ChatMessage { tool_call_id: block["tool_use_id"].as_str().map(str::to_string), ..ChatMessage::new("tool", content) });
                }
                Some("image") | Some("document") => return Err(ApiError::invalid_param("messages", "images and documents are not supported: mlxserver serves text models")),
                other => return Err(ApiError::invalid_param("messages", format!("unsupported content block {}", other.unwrap_or("without a type")))),
            }
        }
        if !turn.content.is_empty() || !turn.tool_calls.is_empty() || role == "assistant" {
            out.push(turn);
        }
    }
    Ok(out)
}

fn tool_specs(tools: &Option<Vec<Value>>) -> Result<Vec<ToolSpec>, ApiError> {
    tools
        .iter()
        .flatten()
        .map(|tool| {
            let name = tool["name"].as_str().ok_or_else(|| ApiError::invalid_param("tools", "a tool needs a name"))?;
            Ok(ToolSpec {
                name: name.to_string(),
                description: tool["description"].as_str().map(str::to_string),
                parameters: if tool["input_schema"].is_object() { tool["input_schema"].clone() } else { json!({"type": "object", "properties": {}}) },
            })
        })
        .collect()
}

fn tool_choice(value: &Option<Value>) -> Result<ToolChoice, ApiError> {
    let Some(value) = value else { return Ok(ToolChoice::Auto) };
    match value["type"].as_str() {
        Some("auto") => Ok(ToolChoice::Auto),
        Some("any") => Ok(ToolChoice::Required),
        Some("none") => Ok(ToolChoice::None),
        Some("tool") => value["name"].as_str().map(|name| ToolChoice::Named(name.to_string())).ok_or_else(|| ApiError::invalid_param("tool_choice", "tool_choice of type tool needs a name")),
        _ => Err(ApiError::invalid_param("tool_choice", "tool_choice type must be auto, any, tool or none")),
    }
}


/// Anthropic's ids: `msg_`/`toolu_` and 24 characters.
fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", &uuid::Uuid::new_v4().simple().to_string()[..24])
}

fn stop_reason(finish: &Finish) -> &'static str {
    match finish.reason {
        FinishReason::Stop if finish.stop_sequence.is_some() => "stop_sequence",
        FinishReason::Stop => "end_turn",
        FinishReason::Length => "max_tokens",
        FinishReason::ToolCalls => "tool_use",
    }
}

fn tool_use_block(call: &ToolCall) -> Value {
    json!({"type": "tool_use", "id": new_id("toolu_"), "name": call.name, "input": call.arguments})
}

fn usage(finish: &Finish) -> Value {
    json!({
        "input_tokens": finish.usage.prompt_tokens,
        "output_tokens": finish.usage.completion_tokens,
        "cache_read_input_tokens": finish.usage.cached_tokens,
        "cache_creation_input_tokens": 0,
    })
}

/// Create a message.
#[utoipa::path(post, path = "/v1/messages", tag = "anthropic", request_body = MessagesRequest,
    responses((status = 200, description = "A message, or an SSE stream of events when stream is true", body = MessageSchema),
              (status = 400, body = Object), (status = 401, body = Object), (status = 404, body = Object)))]
pub async fn messages(State(state): State<AppState>, ApiJson(request): ApiJson<MessagesRequest>) -> Result<Response, ApiError> {
    let max_tokens = request.max_tokens.ok_or_else(|| ApiError::invalid_param("max_tokens", "max_tokens: field required"))?;
    if max_tokens == 0 {
        return Err(ApiError::invalid_param("max_tokens", "max_tokens must be at least 1"));
    }
    check_range("temperature", request.temperature, 0.0..=1.0)?;
    check_range("top_p", request.top_p, 0.0..=1.0)?;
    let messages = chat_messages(&request.system, &request.messages)?;
    if !messages.iter().any(|m| m.role != "system") {
        return Err(ApiError::invalid_param("messages", "messages must not be empty"));
    }
    let parameters = Parameters {
        temperature: request.temperature,
        top_p: request.top_p,
        top_k: request.top_k,
        num_predict: Some(i64::from(max_tokens)),
        stop: request.stop_sequences.clone().unwrap_or_default(),
        ..Default::default()
    };
    let think = request.thinking.as_ref().and_then(|t| t["type"].as_str()).map(|kind| kind == "enabled");
    let answer = state
        .backend
        .chat(ChatRequest {
            model: request.model.clone(),
            messages,
            options: Options::new(ApiFamily::Anthropic, parameters),
            tools: tool_specs(&request.tools)?,
            tool_choice: tool_choice(&request.tool_choice)?,
            think,
            rag: super::rag_options(&request.rag)?,
            ..Default::default()
        })
        .await?;
    let id = new_id("msg_");
    if request.stream.unwrap_or(false) {
        let stream = message_stream(answer, id, request.model);
        return Ok(Sse::new(futures::StreamExt::map(stream, Ok::<_, Infallible>)).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)).event(Event::default().event("ping").data(r#"{"type": "ping"}"#))).into_response());
    }
    let answer_sources = answer.sources.clone();
    let collected = answer.collect().await?;
    let mut content = Vec::new();
    if !collected.reasoning.is_empty() {
        content.push(json!({"type": "thinking", "thinking": collected.reasoning, "signature": ""}));
    }
    if !collected.text.is_empty() || collected.tool_calls.is_empty() {
        content.push(json!({"type": "text", "text": collected.text}));
    }
    content.extend(collected.tool_calls.iter().map(tool_use_block));
    let mut body = json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": request.model,
        "content": content,
        "stop_reason": stop_reason(&collected.finish),
        "stop_sequence": collected.finish.stop_sequence,
        "usage": usage(&collected.finish),
    });
    if let Some(sources) = &answer_sources {
        body["rag"] = json!({ "sources": sources });
    }
    Ok(json_response(StatusCode::OK, &body))
}

fn event(value: Value) -> Event {
    let name = value["type"].as_str().unwrap_or("message").to_string();
    Event::default().event(name).data(value.to_string())
}

/// The block being written in a stream.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Block {
    None,
    Thinking,
    Text,
}

fn message_stream(mut answer: Answer, id: String, model: String) -> impl Stream<Item = Event> + Send + 'static {
    async_stream::stream! {
        let input_tokens = answer.prompt_tokens.len();
        let mut start = json!({
            "type": "message_start",
            "message": {"id": id, "type": "message", "role": "assistant", "model": model, "content": [], "stop_reason": null, "stop_sequence": null,
                        "usage": {"input_tokens": input_tokens, "output_tokens": 0}},
        });
        if let Some(sources) = &answer.sources {
            start["message"]["rag"] = json!({ "sources": sources });
        }
        yield event(start);
        let mut open = Block::None;
        let mut index = 0usize;
        let mut blocks = 0usize;
        while let Some(answer_event) = answer.next().await {
            let (wanted, delta) = match answer_event {
                AnswerEvent::Text { text, .. } if !text.is_empty() => (Block::Text, json!({"type": "text_delta", "text": text})),
                AnswerEvent::Text { .. } => continue,
                AnswerEvent::Reasoning(thinking) => (Block::Thinking, json!({"type": "thinking_delta", "thinking": thinking})),
                AnswerEvent::ToolCalls(calls) => {
                    if open != Block::None {
                        yield event(json!({"type": "content_block_stop", "index": index}));
                        index += 1;
                        open = Block::None;
                    }
                    for call in &calls {
                        let mut block = tool_use_block(call);
                        let input = std::mem::replace(&mut block["input"], json!({}));
                        yield event(json!({"type": "content_block_start", "index": index, "content_block": block}));
                        yield event(json!({"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": input.to_string()}}));
                        yield event(json!({"type": "content_block_stop", "index": index}));
                        index += 1;
                        blocks += 1;
                    }
                    continue;
                }
                AnswerEvent::Done(finish) => {
                    if open == Block::None && blocks == 0 {
                        // Every message has a content block, if only an empty text.
                        yield event(json!({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}));
                        open = Block::Text;
                    }
                    if open != Block::None {
                        yield event(json!({"type": "content_block_stop", "index": index}));
                    }
                    yield event(json!({
                        "type": "message_delta",
                        "delta": {"stop_reason": stop_reason(&finish), "stop_sequence": finish.stop_sequence},
                        "usage": {"output_tokens": finish.usage.completion_tokens, "input_tokens": finish.usage.prompt_tokens},
                    }));
                    yield event(json!({"type": "message_stop"}));
                    break;
                }
                AnswerEvent::Error(error) => {
                    yield event(stream_error(Family::Anthropic, error));
                    break;
                }
            };
            if open != wanted {
                if open != Block::None {
                    yield event(json!({"type": "content_block_stop", "index": index}));
                    index += 1;
                }
                let start = match wanted {
                    Block::Thinking => json!({"type": "thinking", "thinking": "", "signature": ""}),
                    _ => json!({"type": "text", "text": ""}),
                };
                yield event(json!({"type": "content_block_start", "index": index, "content_block": start}));
                open = wanted;
                blocks += 1;
            }
            yield event(json!({"type": "content_block_delta", "index": index, "delta": delta}));
        }
    }
}

/// Count the tokens of a message's prompt.
#[utoipa::path(post, path = "/v1/messages/count_tokens", tag = "anthropic", request_body = CountTokensRequest,
    responses((status = 200, body = CountTokensResponse), (status = 400, body = Object), (status = 404, body = Object)))]
pub async fn count_tokens(State(state): State<AppState>, ApiJson(request): ApiJson<CountTokensRequest>) -> Result<Response, ApiError> {
    let messages = chat_messages(&request.system, &request.messages)?;
    let tools = tool_specs(&request.tools)?;
    let tokenized = state.backend.tokenize(request.model, TokenizeInput::Chat { messages, tools, add_generation_prompt: true }).await?;
    Ok(json_response(StatusCode::OK, &CountTokensResponse { input_tokens: tokenized.tokens.len() }))
}
