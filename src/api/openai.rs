//! OpenAI-compatible routes under `/v1`, using async-openai's wire types so our JSON is the
//! SDKs' own. Streams are SSE `data:` chunks ending with `data: [DONE]`; an error after the
//! first chunk becomes an OpenAI-shaped error event.

use std::convert::Infallible;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_openai::types::chat::{
    ChatChoice, ChatChoiceLogprobs, ChatChoiceStream, ChatCompletionRequestAssistantMessageContent,
    ChatCompletionRequestAssistantMessageContentPart, ChatCompletionRequestDeveloperMessageContent,
    ChatCompletionRequestDeveloperMessageContentPart, ChatCompletionRequestMessage, ChatCompletionRequestSystemMessageContent,
    ChatCompletionRequestSystemMessageContentPart, ChatCompletionRequestToolMessageContent,
    ChatCompletionRequestUserMessageContent, ChatCompletionRequestUserMessageContentPart, ChatCompletionResponseMessage,
    ChatCompletionStreamResponseDelta, ChatCompletionTokenLogprob, CompletionUsage, CreateChatCompletionRequest,
    CreateChatCompletionResponse, CreateChatCompletionStreamResponse, FinishReason as OpenAiFinishReason, ResponseFormat,
    Role, StopConfiguration, TopLogprobs, ChatCompletionMessageToolCall, ChatCompletionMessageToolCallChunk,
    ChatCompletionMessageToolCalls, ChatCompletionToolChoiceOption, ChatCompletionTools, FunctionCallStream, FunctionType,
    ToolChoiceOptions,
};
use async_openai::types::chat::FunctionCall;
use async_openai::types::chat::{Choice, CompletionFinishReason, Logprobs, Prompt};
use async_openai::types::completions::{CreateCompletionRequest, CreateCompletionResponse};
use async_openai::types::embeddings::{
    CreateEmbeddingRequest, CreateEmbeddingResponse, Embedding, EmbeddingInput, EmbeddingUsage, EncodingFormat,
};
use async_openai::types::models::{ListModelResponse, Model};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use futures::Stream;
use serde::Deserialize;

use super::error::{check_range, json_response, stream_error, ApiError, ApiJson, Family};
use super::AppState;
use crate::answer::{
    Answer, AnswerEvent, ApiFamily, ChatMessage, ChatRequest, CompletionRequest, EmbedRequest, FinishReason, Logprob, Options, OutputFormat,
    ServiceError, Usage,
};
use crate::engine::tools::{ToolCall, ToolChoice, ToolSpec};
use crate::store::{Entry, Parameters};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{*id}", get(get_model))
}

fn unix_seconds(time: SystemTime) -> u32 {
    time.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as u32).unwrap_or(0)
}

/// A chat completion request with the extensions mlxserver accepts beside OpenAI's fields.
#[derive(Debug, Deserialize)]
pub struct ChatCompletionBody {
    #[serde(flatten)]
    pub request: CreateChatCompletionRequest,
    /// Ollama-style sampling extras some clients send.
    pub top_k: Option<usize>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    /// Ollama-style `keep_alive`.
    pub keep_alive: Option<super::ollama_types::KeepAliveValue>,
    /// Retrieval-augmented generation (mlxserver extension, via `extra_body`).
    pub rag: Option<serde_json::Value>,
}

fn text_of_parts<T>(parts: &[T], text: impl Fn(&T) -> Option<&str>) -> Result<String, ApiError> {
    let mut out = String::new();
    for part in parts {
        match text(part) {
            Some(piece) => out.push_str(piece),
            None => return Err(ApiError::invalid_param("messages", "only text content parts are supported")),
        }
    }
    Ok(out)
}

fn messages_of(messages: &[ChatCompletionRequestMessage]) -> Result<Vec<ChatMessage>, ApiError> {
    let mut out = Vec::with_capacity(messages.len());
    for message in messages {
        let converted = match message {
            ChatCompletionRequestMessage::System(m) => ChatMessage::new(
                "system",
                match &m.content {
                    ChatCompletionRequestSystemMessageContent::Text(text) => text.clone(),
                    ChatCompletionRequestSystemMessageContent::Array(parts) => text_of_parts(parts, |p| match p {
                        ChatCompletionRequestSystemMessageContentPart::Text(t) => Some(t.text.as_str()),
                    })?,
                },
            ),
            ChatCompletionRequestMessage::Developer(m) => ChatMessage::new(
                "system",
                match &m.content {
                    ChatCompletionRequestDeveloperMessageContent::Text(text) => text.clone(),
                    ChatCompletionRequestDeveloperMessageContent::Array(parts) => text_of_parts(parts, |p| match p {
                        ChatCompletionRequestDeveloperMessageContentPart::Text(t) => Some(t.text.as_str()),
                    })?,
                },
            ),
            ChatCompletionRequestMessage::User(m) => ChatMessage::new(
                "user",
                match &m.content {
                    ChatCompletionRequestUserMessageContent::Text(text) => text.clone(),
                    ChatCompletionRequestUserMessageContent::Array(parts) => text_of_parts(parts, |p| match p {
                        ChatCompletionRequestUserMessageContentPart::Text(t) => Some(t.text.as_str()),
                        _ => None,
                    })?,
                },
            ),
            ChatCompletionRequestMessage::Assistant(m) => {
                let mut converted = ChatMessage::new(
                "assistant",
                match &m.content {
                    Some(ChatCompletionRequestAssistantMessageContent::Text(text)) => text.clone(),
                    Some(ChatCompletionRequestAssistantMessageContent::Array(parts)) => text_of_parts(parts, |p| match p {
                        ChatCompletionRequestAssistantMessageContentPart::Text(t) => Some(t.text.as_str()),
                        _ => None,
                    })?,
                    None => String::new(),
                },
            );
                for call in m.tool_calls.iter().flatten() {
                    if let ChatCompletionMessageToolCalls::Function(call) = call {
                        let arguments = serde_json::from_str(&call.function.arguments).unwrap_or(serde_json::Value::String(call.function.arguments.clone()));
                        converted.tool_calls.push(ToolCall { id: call.id.clone(), name: call.function.name.clone(), arguments });
                    }
                }
                converted
            }
            ChatCompletionRequestMessage::Tool(m) => ChatMessage {
                tool_call_id: Some(m.tool_call_id.clone()),
                ..ChatMessage::new(
                    "tool",
                    match &m.content {
                        ChatCompletionRequestToolMessageContent::Text(text) => text.clone(),
                        ChatCompletionRequestToolMessageContent::Array(parts) => parts.iter().map(|p| serde_json::to_string(p).unwrap_or_default()).collect(),
                    },
                )
            },
            ChatCompletionRequestMessage::Function(m) => ChatMessage::new("tool", m.content.clone().unwrap_or_default()),
        };
        out.push(converted);
    }
    Ok(out)
}

fn stops(stop: &Option<StopConfiguration>) -> Vec<String> {
    match stop {
        Some(StopConfiguration::String(text)) => vec![text.clone()],
        Some(StopConfiguration::StringArray(list)) => list.clone(),
        None => Vec::new(),
    }
}


#[allow(deprecated)]
fn chat_options(body: &ChatCompletionBody) -> Result<Options, ApiError> {
    let request = &body.request;
    if request.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid_param("n", "only n = 1 is supported"));
    }
    check_range("temperature", request.temperature, 0.0..=2.0)?;
    check_range("top_p", request.top_p, 0.0..=1.0)?;
    check_range("presence_penalty", request.presence_penalty, -2.0..=2.0)?;
    check_range("frequency_penalty", request.frequency_penalty, -2.0..=2.0)?;
    let format = match &request.response_format {
        None | Some(ResponseFormat::Text) => None,
        Some(ResponseFormat::JsonObject) => Some(OutputFormat::Json),
        Some(ResponseFormat::JsonSchema { json_schema }) => Some(OutputFormat::JsonSchema(json_schema.schema.clone())),
    };
    let top_logprobs = request.top_logprobs.map(usize::from);
    if top_logprobs.is_some_and(|n| n > 20) {
        return Err(ApiError::invalid_param("top_logprobs", "top_logprobs must be between 0 and 20"));
    }
    if top_logprobs.is_some() && request.logprobs != Some(true) {
        return Err(ApiError::invalid_param("top_logprobs", "top_logprobs needs logprobs: true"));
    }
    let max_tokens = request.max_completion_tokens.or(request.max_tokens);
    let parameters = Parameters {
        temperature: request.temperature,
        top_p: request.top_p,
        top_k: body.top_k,
        min_p: body.min_p,
        repeat_penalty: body.repeat_penalty,
        presence_penalty: request.presence_penalty,
        frequency_penalty: request.frequency_penalty,
        seed: request.seed.map(|s| s as u64),
        num_predict: max_tokens.map(i64::from),
        stop: stops(&request.stop),
        ..Default::default()
    };
    let logprobs = (request.logprobs == Some(true)).then(|| top_logprobs.unwrap_or(0));
    Ok(Options { family: ApiFamily::OpenAi, parameters, logprobs, format })
}

fn tools_of(request: &CreateChatCompletionRequest) -> Result<(Vec<ToolSpec>, ToolChoice), ApiError> {
    let mut specs = Vec::new();
    for tool in request.tools.iter().flatten() {
        match tool {
            ChatCompletionTools::Function(tool) => specs.push(ToolSpec {
                name: tool.function.name.clone(),
                description: tool.function.description.clone(),
                parameters: tool.function.parameters.clone().unwrap_or_else(|| serde_json::json!({"type": "object", "properties": {}})),
            }),
            ChatCompletionTools::Custom(_) => return Err(ApiError::invalid_param("tools", "only function tools are supported")),
        }
    }
    let choice = match &request.tool_choice {
        None | Some(ChatCompletionToolChoiceOption::Mode(ToolChoiceOptions::Auto)) => ToolChoice::Auto,
        Some(ChatCompletionToolChoiceOption::Mode(ToolChoiceOptions::None)) => ToolChoice::None,
        Some(ChatCompletionToolChoiceOption::Mode(ToolChoiceOptions::Required)) => ToolChoice::Required,
        Some(ChatCompletionToolChoiceOption::Function(named)) => ToolChoice::Named(named.function.name.clone()),
        Some(_) => return Err(ApiError::invalid_param("tool_choice", "tool_choice must be none, auto, required or a named function")),
    };
    Ok((specs, choice))
}

fn openai_tool_calls(calls: &[ToolCall]) -> Vec<ChatCompletionMessageToolCalls> {
    calls
        .iter()
        .map(|call| {
            ChatCompletionMessageToolCalls::Function(ChatCompletionMessageToolCall {
                id: call.id.clone(),
                function: FunctionCall { name: call.name.clone(), arguments: call.arguments.to_string() },
            })
        })
        .collect()
}

fn tool_call_chunks(calls: &[ToolCall]) -> Vec<ChatCompletionMessageToolCallChunk> {
    calls
        .iter()
        .enumerate()
        .map(|(index, call)| ChatCompletionMessageToolCallChunk {
            index: index as u32,
            id: Some(call.id.clone()),
            r#type: Some(FunctionType::Function),
            function: Some(FunctionCallStream { name: Some(call.name.clone()), arguments: Some(call.arguments.to_string()) }),
        })
        .collect()
}

fn finish_reason(reason: FinishReason) -> OpenAiFinishReason {
    match reason {
        FinishReason::Stop => OpenAiFinishReason::Stop,
        FinishReason::Length => OpenAiFinishReason::Length,
        FinishReason::ToolCalls => OpenAiFinishReason::ToolCalls,
    }
}

fn usage(usage: &Usage) -> CompletionUsage {
    CompletionUsage {
        prompt_tokens: usage.prompt_tokens as u32,
        completion_tokens: usage.completion_tokens as u32,
        total_tokens: (usage.prompt_tokens + usage.completion_tokens) as u32,
        ..Default::default()
    }
}

fn token_logprob(logprob: &Logprob) -> ChatCompletionTokenLogprob {
    ChatCompletionTokenLogprob {
        bytes: Some(logprob.token.as_bytes().to_vec()),
        token: logprob.token.clone(),
        logprob: logprob.logprob,
        top_logprobs: logprob.top.iter().map(|(token, logprob)| TopLogprobs { bytes: Some(token.as_bytes().to_vec()), token: token.clone(), logprob: *logprob }).collect(),
    }
}

/// An OpenAI error as an SSE event (after the stream has started).
fn error_event(error: ServiceError) -> Event {
    Event::default().data(stream_error(Family::OpenAi, error).to_string())
}

fn sse<S>(stream: S) -> Response
where
    S: Stream<Item = Event> + Send + 'static,
{
    use futures::StreamExt;
    Sse::new(stream.map(Ok::<_, Infallible>)).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
}

/// Create a chat completion.
#[utoipa::path(post, path = "/v1/chat/completions", tag = "openai", request_body = CreateChatCompletionRequest,
    responses((status = 200, description = "A completion, or an SSE stream of chunks when stream is true", body = CreateChatCompletionResponse),
              (status = 400, body = super::error::OpenAiErrorBody), (status = 401, body = super::error::OpenAiErrorBody),
              (status = 404, body = super::error::OpenAiErrorBody), (status = 503, body = super::error::OpenAiErrorBody)))]
pub async fn chat_completions(State(state): State<AppState>, ApiJson(body): ApiJson<ChatCompletionBody>) -> Result<Response, ApiError> {
    let options = chat_options(&body)?;
    let request = &body.request;
    let (tools, tool_choice) = tools_of(request)?;
    let messages = messages_of(&request.messages)?;
    if messages.is_empty() {
        return Err(ApiError::invalid_param("messages", "messages must not be empty"));
    }
    let keep_alive = body.keep_alive.as_ref().map(|k| k.parse().map_err(|e| ApiError::invalid_param("keep_alive", e))).transpose()?;
    let stream = request.stream.unwrap_or(false);
    let include_usage = request.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false);
    let rag = super::rag_options(&body.rag)?;
    let answer = state
        .backend
        .chat(ChatRequest { model: request.model.clone(), messages, options, keep_alive, rag, tools, tool_choice, think: None })
        .await?;
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    if stream {
        return Ok(sse(chat_stream(answer, id, include_usage)));
    }
    let rag_value = answer.sources.as_ref().map(|sources| serde_json::json!({ "sources": sources }));
    let model = answer.model.clone();
    let created = unix_seconds(answer.created);
    let collected = answer.collect().await?;
    let logprobs = (!collected.logprobs.is_empty()).then(|| ChatChoiceLogprobs { content: Some(collected.logprobs.iter().map(token_logprob).collect()), refusal: None });
    let calls = !collected.tool_calls.is_empty();
    let message = ChatCompletionResponseMessage {
        content: (!calls || !collected.text.is_empty()).then(|| collected.text.clone()),
        tool_calls: calls.then(|| openai_tool_calls(&collected.tool_calls)),
        role: Role::Assistant,
        ..Default::default()
    };
    let response = CreateChatCompletionResponse {
        id,
        object: "chat.completion".into(),
        created,
        model,
        choices: vec![ChatChoice { index: 0, message, finish_reason: Some(finish_reason(collected.finish.reason)), logprobs }],
        usage: Some(usage(&collected.finish.usage)),
        ..Default::default()
    };
    let mut value = serde_json::to_value(&response).map_err(|e| ApiError::internal(e.to_string()))?;
    if !collected.reasoning.is_empty() {
        // The field reasoning servers (vLLM, DeepSeek) use; SDKs keep it in `model_extra`.
        value["choices"][0]["message"]["reasoning_content"] = collected.reasoning.into();
    }
    // The sources travel in an extra field that OpenAI SDKs keep (`model_extra`).
    if let Some(rag) = rag_value {
        value["rag"] = rag;
    }
    Ok(json_response(StatusCode::OK, &value))
}

fn chat_chunk(id: &str, model: &str, created: u32, delta: ChatCompletionStreamResponseDelta, finish: Option<OpenAiFinishReason>, logprobs: Option<ChatChoiceLogprobs>) -> serde_json::Value {
    let chunk = CreateChatCompletionStreamResponse {
        id: id.to_string(),
        object: "chat.completion.chunk".into(),
        created,
        model: model.to_string(),
        choices: vec![ChatChoiceStream { index: 0, delta, finish_reason: finish, logprobs }],
        ..Default::default()
    };
    serde_json::to_value(&chunk).unwrap_or_default()
}

fn data(value: serde_json::Value) -> Event {
    Event::default().data(value.to_string())
}

/// Chat completion chunks: a role chunk, content deltas (reasoning as `reasoning_content`),
/// whole tool calls, a finish chunk (with `rag` sources when asked), optional usage, `[DONE]`.
fn chat_stream(mut answer: Answer, id: String, include_usage: bool) -> impl Stream<Item = Event> + Send + 'static {
    async_stream::stream! {
        let model = answer.model.clone();
        let created = unix_seconds(answer.created);
        let role = ChatCompletionStreamResponseDelta { role: Some(Role::Assistant), content: Some(String::new()), ..Default::default() };
        yield data(chat_chunk(&id, &model, created, role, None, None));
        while let Some(event) = answer.next().await {
            match event {
                AnswerEvent::Text { text, logprob } => {
                    let logprobs = logprob.as_ref().map(|lp| ChatChoiceLogprobs { content: Some(vec![token_logprob(lp)]), refusal: None });
                    let delta = ChatCompletionStreamResponseDelta { content: Some(text), ..Default::default() };
                    yield data(chat_chunk(&id, &model, created, delta, None, logprobs));
                }
                AnswerEvent::Reasoning(text) => {
                    let mut chunk = chat_chunk(&id, &model, created, ChatCompletionStreamResponseDelta::default(), None, None);
                    chunk["choices"][0]["delta"]["reasoning_content"] = text.into();
                    yield data(chunk);
                }
                AnswerEvent::ToolCalls(calls) => {
                    let delta = ChatCompletionStreamResponseDelta { tool_calls: Some(tool_call_chunks(&calls)), ..Default::default() };
                    yield data(chat_chunk(&id, &model, created, delta, None, None));
                }
                AnswerEvent::Done(finish) => {
                    let mut last = chat_chunk(&id, &model, created, ChatCompletionStreamResponseDelta::default(), Some(finish_reason(finish.reason)), None);
                    if let Some(sources) = &answer.sources {
                        last["rag"] = serde_json::json!({ "sources": sources });
                    }
                    yield data(last);
                    if include_usage {
                        let chunk = CreateChatCompletionStreamResponse {
                            id: id.clone(),
                            object: "chat.completion.chunk".into(),
                            created,
                            model: model.clone(),
                            choices: Vec::new(),
                            usage: Some(usage(&finish.usage)),
                            ..Default::default()
                        };
                        yield data(serde_json::to_value(&chunk).unwrap_or_default());
                    }
                    break;
                }
                AnswerEvent::Error(error) => {
                    yield error_event(error);
                    break;
                }
            }
        }
        yield Event::default().data("[DONE]");
    }
}

/// A completion request with mlxserver's extensions.
#[derive(Debug, Deserialize)]
pub struct CompletionBody {
    #[serde(flatten)]
    pub request: CreateCompletionRequest,
    pub top_k: Option<usize>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub keep_alive: Option<super::ollama_types::KeepAliveValue>,
}

/// Create a completion of a prompt (no chat template).
#[utoipa::path(post, path = "/v1/completions", tag = "openai", request_body = CreateCompletionRequest,
    responses((status = 200, description = "A completion, or an SSE stream when stream is true", body = CreateCompletionResponse),
              (status = 400, body = super::error::OpenAiErrorBody), (status = 404, body = super::error::OpenAiErrorBody)))]
pub async fn completions(State(state): State<AppState>, ApiJson(body): ApiJson<CompletionBody>) -> Result<Response, ApiError> {
    let request = &body.request;
    let prompt = match &request.prompt {
        Prompt::String(text) => text.clone(),
        Prompt::StringArray(list) if list.len() == 1 => list[0].clone(),
        _ => return Err(ApiError::invalid_param("prompt", "prompt must be one string")),
    };
    if request.n.is_some_and(|n| n != 1) || request.best_of.is_some_and(|n| n > 1) {
        return Err(ApiError::invalid_param("n", "only n = 1 is supported"));
    }
    if request.echo == Some(true) {
        return Err(ApiError::invalid_param("echo", "echo is not supported"));
    }
    if request.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid_param("suffix", "suffix is not supported"));
    }
    check_range("temperature", request.temperature, 0.0..=2.0)?;
    check_range("top_p", request.top_p, 0.0..=1.0)?;
    if request.logprobs.is_some_and(|n| n > 20) {
        return Err(ApiError::invalid_param("logprobs", "logprobs must be between 0 and 20"));
    }
    let logprobs = request.logprobs.map(usize::from);
    let parameters = Parameters {
        temperature: request.temperature,
        top_p: request.top_p,
        top_k: body.top_k,
        min_p: body.min_p,
        repeat_penalty: body.repeat_penalty,
        presence_penalty: request.presence_penalty,
        frequency_penalty: request.frequency_penalty,
        seed: request.seed.map(|s| s as u64),
        num_predict: request.max_tokens.map(i64::from),
        stop: stops(&request.stop),
        ..Default::default()
    };
    let keep_alive = body.keep_alive.as_ref().map(|k| k.parse().map_err(|e| ApiError::invalid_param("keep_alive", e))).transpose()?;
    let answer = state
        .backend
        .complete(CompletionRequest {
            model: request.model.clone(),
            prompt,
            raw: true,
            options: Options { family: ApiFamily::OpenAi, parameters, logprobs, format: None },
            keep_alive,
            ..Default::default()
        })
        .await?;
    let id = format!("cmpl-{}", uuid::Uuid::new_v4().simple());
    let include_usage = request.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false);
    if request.stream.unwrap_or(false) {
        return Ok(sse(completion_stream(answer, id, include_usage)));
    }
    let model = answer.model.clone();
    let created = unix_seconds(answer.created);
    let collected = answer.collect().await?;
    #[allow(deprecated)]
    let response = CreateCompletionResponse {
        id,
        object: "text_completion".into(),
        created,
        model,
        choices: vec![Choice {
            logprobs: (!collected.logprobs.is_empty()).then(|| legacy_logprobs(&collected.logprobs, 0)),
            text: collected.text,
            index: 0,
            finish_reason: Some(completion_finish(collected.finish.reason)),
        }],
        usage: Some(usage(&collected.finish.usage)),
        system_fingerprint: None,
    };
    Ok(json_response(StatusCode::OK, &response))
}

fn completion_finish(reason: FinishReason) -> CompletionFinishReason {
    match reason {
        FinishReason::Length => CompletionFinishReason::Length,
        FinishReason::Stop | FinishReason::ToolCalls => CompletionFinishReason::Stop,
    }
}

/// The legacy completions shape: parallel lists, alternatives as `{token: logprob}` maps, and
/// each token's character offset in the answer (counted from `offset`).
fn legacy_logprobs(entries: &[Logprob], mut offset: u32) -> Logprobs {
    let mut logprobs = Logprobs { tokens: Vec::new(), token_logprobs: Vec::new(), top_logprobs: Vec::new(), text_offset: Vec::new() };
    for entry in entries {
        logprobs.text_offset.push(offset);
        offset += entry.token.chars().count() as u32;
        let top: serde_json::Map<String, serde_json::Value> = entry.top.iter().map(|(token, logprob)| (token.clone(), serde_json::json!(logprob))).collect();
        logprobs.top_logprobs.push(serde_json::Value::Object(top));
        logprobs.tokens.push(entry.token.clone());
        logprobs.token_logprobs.push(Some(entry.logprob));
    }
    logprobs
}

fn completion_stream(mut answer: Answer, id: String, include_usage: bool) -> impl Stream<Item = Event> + Send + 'static {
    async_stream::stream! {
        let model = answer.model.clone();
        let created = unix_seconds(answer.created);
        let chunk = |text: String, logprobs: Option<Logprobs>, finish: Option<CompletionFinishReason>, usage: Option<CompletionUsage>, choices: bool| {
            let value = serde_json::json!({
                "id": id, "object": "text_completion", "created": created, "model": model,
                "choices": if choices { serde_json::json!([{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}]) } else { serde_json::json!([]) },
                "usage": usage,
            });
            Event::default().data(value.to_string())
        };
        let mut offset = 0u32;
        while let Some(event) = answer.next().await {
            match event {
                AnswerEvent::Text { text, logprob } => {
                    let logprobs = logprob.map(|lp| legacy_logprobs(std::slice::from_ref(&lp), offset));
                    offset += text.chars().count() as u32;
                    yield chunk(text, logprobs, None, None, true);
                }
                AnswerEvent::Reasoning(_) | AnswerEvent::ToolCalls(_) => {}
                AnswerEvent::Done(finish) => {
                    yield chunk(String::new(), None, Some(completion_finish(finish.reason)), None, true);
                    if include_usage {
                        yield chunk(String::new(), None, None, Some(usage(&finish.usage)), false);
                    }
                    break;
                }
                AnswerEvent::Error(error) => {
                    yield error_event(error);
                    break;
                }
            }
        }
        yield Event::default().data("[DONE]");
    }
}

/// OpenAI's embedding request, for the OpenAPI document (async-openai's type has no schema).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct EmbeddingRequestSchema {
    #[schema(example = "all-MiniLM-L6-v2")]
    model: String,
    /// A string or a list of strings.
    #[schema(value_type = Object)]
    input: serde_json::Value,
    /// `float` (default) or `base64`.
    encoding_format: Option<String>,
    /// Must equal the model's dimension when given.
    dimensions: Option<u32>,
    user: Option<String>,
}

/// OpenAI's embedding response, for the OpenAPI document.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct EmbeddingResponseSchema {
    #[schema(example = "list")]
    object: String,
    model: String,
    /// `{"object": "embedding", "index": 0, "embedding": [...]}` per input.
    #[schema(value_type = Vec<Object>)]
    data: Vec<serde_json::Value>,
    #[schema(value_type = Object)]
    usage: serde_json::Value,
}

/// Create embeddings.
#[utoipa::path(post, path = "/v1/embeddings", tag = "openai", request_body = EmbeddingRequestSchema,
    responses((status = 200, body = EmbeddingResponseSchema), (status = 400, body = super::error::OpenAiErrorBody), (status = 404, body = super::error::OpenAiErrorBody)))]
pub async fn embeddings(State(state): State<AppState>, ApiJson(request): ApiJson<CreateEmbeddingRequest>) -> Result<Response, ApiError> {
    let inputs = match request.input {
        EmbeddingInput::String(text) => vec![text],
        EmbeddingInput::StringArray(list) => list,
        _ => return Err(ApiError::invalid_param("input", "token-id inputs are not supported; send text")),
    };
    if inputs.is_empty() {
        return Err(ApiError::invalid_param("input", "input must not be empty"));
    }
    let result = state.backend.embed(EmbedRequest { model: request.model.clone(), inputs, truncate: true, keep_alive: None }).await?;
    let native = result.vectors.first().map_or(0, Vec::len);
    if let Some(dimensions) = request.dimensions {
        if dimensions as usize != native {
            return Err(ApiError::invalid_param("dimensions", format!("this model produces {native} dimensions; other sizes are not supported")));
        }
    }
    let usage = EmbeddingUsage { prompt_tokens: result.prompt_tokens as u32, total_tokens: result.prompt_tokens as u32 };
    if matches!(request.encoding_format, Some(EncodingFormat::Base64)) {
        let data: Vec<serde_json::Value> = result
            .vectors
            .iter()
            .enumerate()
            .map(|(index, vector)| {
                let bytes: Vec<u8> = vector.iter().flat_map(|v| v.to_le_bytes()).collect();
                serde_json::json!({"object": "embedding", "index": index, "embedding": base64::engine::general_purpose::STANDARD.encode(bytes)})
            })
            .collect();
        let body = serde_json::json!({"object": "list", "model": result.model, "data": data, "usage": usage});
        return Ok(json_response(StatusCode::OK, &body));
    }
    let response = CreateEmbeddingResponse {
        object: "list".into(),
        model: result.model,
        data: result.vectors.into_iter().enumerate().map(|(index, embedding)| Embedding { index: index as u32, object: "embedding".into(), embedding }).collect(),
        usage,
    };
    Ok(json_response(StatusCode::OK, &response))
}

/// OpenAI's model object, for the OpenAPI document (async-openai's type has no schema).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct ModelSchema {
    #[schema(example = "SmolLM2-135M-Instruct")]
    id: String,
    #[schema(example = "model")]
    object: String,
    /// Unix seconds.
    created: u32,
    #[schema(example = "mlxserver")]
    owned_by: String,
}

/// OpenAI's model list, for the OpenAPI document.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct ModelListSchema {
    #[schema(example = "list")]
    object: String,
    data: Vec<ModelSchema>,
}

fn model_object(id: String, created: chrono::DateTime<chrono::Utc>) -> Model {
    Model { id, object: "model".into(), created: created.timestamp().max(0) as u32, owned_by: "mlxserver".into(), ..Default::default() }
}

/// List models and personalities.
#[utoipa::path(get, path = "/v1/models", tag = "openai", responses((status = 200, body = ModelListSchema)))]
pub async fn list_models(State(state): State<AppState>) -> Result<Response, ApiError> {
    let data = state
        .service
        .store
        .list()?
        .into_iter()
        .map(|entry| match entry {
            Entry::Base(base) => model_object(base.manifest.name, base.manifest.created_at),
            Entry::Personality(personality) => model_object(personality.name, personality.created_at),
        })
        .collect();
    Ok(json_response(StatusCode::OK, &ListModelResponse { object: "list".into(), data }))
}

/// Retrieve one model.
#[utoipa::path(get, path = "/v1/models/{id}", tag = "openai", params(("id" = String, Path, description = "Model or personality name")),
    responses((status = 200, body = ModelSchema), (status = 404, body = super::error::OpenAiErrorBody)))]
pub async fn get_model(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let resolved = state.service.resolve(&id)?;
    let created = resolved.layers.last().map(|p| p.created_at).unwrap_or(resolved.base.manifest.created_at);
    Ok(json_response(StatusCode::OK, &model_object(resolved.name, created)))
}
