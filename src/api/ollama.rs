//! Ollama-compatible routes under `/api`: translation between Ollama's wire types and the
//! shared [`Service`](crate::service::Service). Streams are NDJSON; an error before the first
//! byte gets an HTTP status, after it an `{"error": ...}` line.

use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use futures::Stream;
use serde::Serialize;

use super::error::{json_response, stream_error, ApiError, ApiJson, Family};
use super::ollama_types::*;
use super::AppState;
use crate::answer::{self, Answer, AnswerEvent, ApiFamily, Finish, FinishReason, ServiceError};
use crate::config::KeepAlive;
use crate::engine::tools::{ToolCall, ToolChoice, ToolSpec};
use crate::engine::ModelKind;
use crate::service::{self, ChatMessage, Options as ServiceOptions, OutputFormat};
use crate::store::{self, Entry};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/generate", post(generate))
        .route("/api/chat", post(chat))
        .route("/api/embed", post(embed))
        .route("/api/embeddings", post(embeddings))
        .route("/api/tags", get(tags))
        .route("/api/show", post(show))
        .route("/api/ps", get(ps))
        .route("/api/copy", post(copy))
        .route("/api/delete", delete(remove))
        .route("/api/create", post(create))
        .route("/api/pull", post(pull))
}

pub fn rfc3339(time: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(time).to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

fn keep_alive(value: &Option<KeepAliveValue>) -> Result<Option<KeepAlive>, ApiError> {
    value.as_ref().map(|v| v.parse().map_err(|e| ApiError::invalid_param("keep_alive", e))).transpose()
}

fn options(value: &Option<Options>, format: &Option<FormatValue>, logprobs: Option<bool>, top_logprobs: Option<usize>) -> Result<ServiceOptions, ApiError> {
    let parameters = value.as_ref().map(Options::to_parameters).transpose().map_err(|e| ApiError::invalid_param("options", e))?;
    if top_logprobs.is_some_and(|n| n > 20) {
        return Err(ApiError::invalid_param("top_logprobs", "top_logprobs must be between 0 and 20"));
    }
    let logprobs = (logprobs == Some(true)).then(|| top_logprobs.unwrap_or(0));
    Ok(ServiceOptions { family: ApiFamily::Ollama, parameters: parameters.unwrap_or_default(), logprobs, format: output_format(format)? })
}

/// Ollama's `format`: "json", a JSON schema, or nothing.
fn output_format(format: &Option<FormatValue>) -> Result<Option<OutputFormat>, ApiError> {
    match format {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(text)) if text.is_empty() => Ok(None),
        Some(serde_json::Value::String(text)) if text == "json" => Ok(Some(OutputFormat::Json)),
        Some(schema @ serde_json::Value::Object(_)) => Ok(Some(OutputFormat::JsonSchema(schema.clone()))),
        Some(_) => Err(ApiError::invalid_param("format", "format must be \"json\" or a JSON schema object")),
    }
}

fn reject_unsupported(images: bool, suffix: Option<&str>) -> Result<(), ApiError> {
    if images {
        return Err(ApiError::invalid_param("images", "images are not supported: mlxserver serves text models"));
    }
    if suffix.is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid_param("suffix", "suffix (fill-in-the-middle) is not supported"));
    }
    Ok(())
}

fn logprob(logprob: &crate::answer::Logprob) -> Logprob {
    Logprob {
        bytes: Some(logprob.token.as_bytes().to_vec()),
        token: logprob.token.clone(),
        logprob: logprob.logprob,
        top_logprobs: logprob.top.iter().map(|(token, logprob)| TopLogprob { bytes: Some(token.as_bytes().to_vec()), token: token.clone(), logprob: *logprob }).collect(),
    }
}

fn metrics(started: std::time::Instant, load: Duration, finish: &Finish) -> Metrics {
    Metrics {
        total_duration: Some(nanos(started.elapsed())),
        load_duration: Some(nanos(load)),
        prompt_eval_count: Some(finish.usage.prompt_tokens),
        prompt_eval_duration: Some(nanos(finish.prompt_eval)),
        eval_count: Some(finish.usage.completion_tokens),
        eval_duration: Some(nanos(finish.eval)),
    }
}

/// Ollama reports a call as a normal stop.
fn done_reason(reason: FinishReason) -> String {
    match reason {
        FinishReason::Stop | FinishReason::ToolCalls => "stop".into(),
        FinishReason::Length => "length".into(),
    }
}

/// An NDJSON body from a stream of serializable objects.
fn ndjson<S, T>(stream: S) -> Response
where
    S: Stream<Item = T> + Send + 'static,
    T: Serialize,
{
    use futures::StreamExt;
    let lines = stream.map(|item| {
        let mut line = serde_json::to_vec(&item).unwrap_or_else(|_| b"{\"error\":\"encoding failed\"}".to_vec());
        line.push(b'\n');
        Ok::<_, std::convert::Infallible>(line)
    });
    let mut response = Response::new(Body::from_stream(lines));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
    response
}

/// Loads (or with `keep_alive: 0` unloads) a model for a request without a prompt.
async fn load_only(state: &AppState, model: &str, keep_alive: Option<KeepAlive>) -> Result<(String, &'static str), ApiError> {
    let resolved = state.service.resolve(model)?;
    if keep_alive == Some(KeepAlive::Immediately) {
        state.service.unload(&resolved).await;
        return Ok((resolved.name, "unload"));
    }
    drop(state.service.lease(&resolved, keep_alive).await?);
    Ok((resolved.name, "load"))
}

/// Generate a response for a prompt.
#[utoipa::path(post, path = "/api/generate", tag = "ollama", request_body = GenerateRequest,
    responses((status = 200, description = "NDJSON stream of GenerateResponse objects, or one when stream is false", body = GenerateResponse),
              (status = 400, body = super::error::SimpleErrorBody), (status = 404, body = super::error::SimpleErrorBody)))]
pub async fn generate(State(state): State<AppState>, ApiJson(request): ApiJson<GenerateRequest>) -> Result<Response, ApiError> {
    reject_unsupported(request.images.as_ref().is_some_and(|i| !i.is_empty()), request.suffix.as_deref())?;
    let keep_alive = keep_alive(&request.keep_alive)?;
    let options = options(&request.options, &request.format, request.logprobs, request.top_logprobs)?;
    if request.prompt.is_empty() && request.context.as_ref().is_none_or(Vec::is_empty) {
        let (model, reason) = load_only(&state, &request.model, keep_alive).await?;
        let response = GenerateResponse {
            model,
            created_at: rfc3339(SystemTime::now()),
            response: String::new(),
            thinking: None,
            done: true,
            done_reason: Some(reason.into()),
            context: None,
            logprobs: None,
            metrics: Metrics::default(),
            rag: None,
        };
        return Ok(json_response(StatusCode::OK, &response));
    }
    let rag = super::rag_options(&request.rag)?;
    if rag.is_some() && request.raw.unwrap_or(false) {
        return Err(ApiError::invalid_param("rag", "rag cannot be combined with raw"));
    }
    let stream = request.stream.unwrap_or(true);
    let answer = match rag {
        // With retrieval, a prompt is answered as a one-turn chat so the sources can be
        // placed in the system message.
        Some(rag) => {
            let mut messages = Vec::new();
            if let Some(system) = &request.system {
                messages.push(ChatMessage::new("system", system.clone()));
            }
            messages.push(ChatMessage::new("user", request.prompt.clone()));
            let request = service::ChatRequest { model: request.model.clone(), messages, options, keep_alive, rag: Some(rag), think: request.think, ..Default::default() };
            state.backend.chat(request).await?
        }
        None => {
            let request = service::CompletionRequest {
                model: request.model.clone(),
                prompt: request.prompt,
                system: request.system,
                template: request.template,
                raw: request.raw.unwrap_or(false),
                context: request.context.unwrap_or_default(),
                options,
                keep_alive,
            };
            state.backend.complete(request).await?
        }
    };
    if stream {
        return Ok(ndjson(generate_stream(answer)));
    }
    let model = answer.model.clone();
    let started = answer.started;
    let load = answer.load_duration;
    let rag = sources_value(answer.sources.as_deref());
    let mut context = answer.prompt_tokens.clone();
    let collected = answer.collect().await?;
    context.extend(&collected.finish.tokens);
    let response = GenerateResponse {
        model,
        created_at: rfc3339(SystemTime::now()),
        response: collected.text,
        thinking: (!collected.reasoning.is_empty()).then_some(collected.reasoning),
        done: true,
        done_reason: Some(done_reason(collected.finish.reason)),
        context: Some(context),
        logprobs: logprobs_of(&collected.logprobs),
        metrics: metrics(started, load, &collected.finish),
        rag,
    };
    Ok(json_response(StatusCode::OK, &response))
}

fn logprobs_of(collected: &[crate::answer::Logprob]) -> Option<Vec<Logprob>> {
    (!collected.is_empty()).then(|| collected.iter().map(logprob).collect())
}

/// The error line that ends an NDJSON stream.
fn error_line(error: ServiceError) -> serde_json::Value {
    stream_error(Family::Ollama, error)
}

fn generate_stream(mut answer: Answer) -> impl Stream<Item = serde_json::Value> + Send + 'static {
    async_stream::stream! {
        let model = answer.model.clone();
        let mut context = answer.prompt_tokens.clone();
        while let Some(event) = answer.next().await {
            match event {
                AnswerEvent::Text { text, logprob: token_logprob } => {
                    let mut chunk = serde_json::json!({"model": model, "created_at": rfc3339(SystemTime::now()), "response": text, "done": false});
                    if let Some(lp) = &token_logprob {
                        chunk["logprobs"] = serde_json::json!([logprob(lp)]);
                    }
                    yield chunk;
                }
                AnswerEvent::Reasoning(thinking) => {
                    yield serde_json::json!({"model": model, "created_at": rfc3339(SystemTime::now()), "response": "", "thinking": thinking, "done": false});
                }
                AnswerEvent::ToolCalls(_) => {}
                AnswerEvent::Done(finish) => {
                    context.extend(&finish.tokens);
                    let response = GenerateResponse {
                        model: model.clone(),
                        created_at: rfc3339(SystemTime::now()),
                        response: String::new(),
                        thinking: None,
                        done: true,
                        done_reason: Some(done_reason(finish.reason)),
                        context: Some(std::mem::take(&mut context)),
                        logprobs: None,
                        metrics: metrics(answer.started, answer.load_duration, &finish),
                        rag: sources_value(answer.sources.as_deref()),
                    };
                    yield serde_json::to_value(response).unwrap_or_default();
                    break;
                }
                AnswerEvent::Error(error) => {
                    yield error_line(error);
                    break;
                }
            }
        }
    }
}

fn chat_messages(messages: &[Message]) -> Result<Vec<ChatMessage>, ApiError> {
    messages
        .iter()
        .map(|message| {
            if message.images.as_ref().is_some_and(|i| !i.is_empty()) {
                return Err(ApiError::invalid_param("messages", "images are not supported: mlxserver serves text models"));
            }
            if !matches!(message.role.as_str(), "system" | "user" | "assistant" | "tool") {
                return Err(ApiError::invalid_param("messages", format!("unknown role '{}'", message.role)));
            }
            let mut converted = ChatMessage::new(&message.role, &message.content);
            for call in message.tool_calls.iter().flatten() {
                let name = call["function"]["name"].as_str().ok_or_else(|| ApiError::invalid_param("messages", "a tool call needs function.name"))?;
                let arguments = match &call["function"]["arguments"] {
                    serde_json::Value::String(text) => serde_json::from_str(text).unwrap_or(serde_json::Value::String(text.clone())),
                    serde_json::Value::Null => serde_json::json!({}),
                    other => other.clone(),
                };
                converted.tool_calls.push(ToolCall::new(name, arguments));
            }
            converted.tool_call_id = message.tool_name.clone();
            Ok(converted)
        })
        .collect()
}

/// Ollama's `tools`: `[{"type": "function", "function": {name, description, parameters}}]`.
pub(super) fn tool_specs(tools: &Option<Vec<serde_json::Value>>) -> Result<Vec<ToolSpec>, ApiError> {
    tools
        .iter()
        .flatten()
        .map(|tool| {
            let function = tool.get("function").unwrap_or(tool);
            serde_json::from_value::<ToolSpec>(function.clone()).map_err(|e| ApiError::invalid_param("tools", format!("invalid tool: {e}")))
        })
        .collect()
}

fn ollama_tool_calls(calls: &[ToolCall]) -> Vec<serde_json::Value> {
    calls.iter().map(|c| serde_json::json!({"id": c.id, "function": {"name": c.name, "arguments": c.arguments}})).collect()
}


/// Generate the next message of a chat.
#[utoipa::path(post, path = "/api/chat", tag = "ollama", request_body = ChatRequest,
    responses((status = 200, description = "NDJSON stream of ChatResponse objects, or one when stream is false", body = ChatResponse),
              (status = 400, body = super::error::SimpleErrorBody), (status = 404, body = super::error::SimpleErrorBody)))]
pub async fn chat(State(state): State<AppState>, ApiJson(request): ApiJson<ChatRequest>) -> Result<Response, ApiError> {
    let options = options(&request.options, &request.format, request.logprobs, request.top_logprobs)?;
    let tools = tool_specs(&request.tools)?;
    let keep_alive = keep_alive(&request.keep_alive)?;
    let messages = chat_messages(&request.messages)?;
    if messages.is_empty() {
        let (model, reason) = load_only(&state, &request.model, keep_alive).await?;
        let response = ChatResponse {
            model,
            created_at: rfc3339(SystemTime::now()),
            message: Message::assistant(String::new()),
            done: true,
            done_reason: Some(reason.into()),
            logprobs: None,
            metrics: Metrics::default(),
            rag: None,
        };
        return Ok(json_response(StatusCode::OK, &response));
    }
    let rag = super::rag_options(&request.rag)?;
    let answer = state
        .backend
        .chat(service::ChatRequest { model: request.model.clone(), messages, options, keep_alive, rag, tools, tool_choice: ToolChoice::Auto, think: request.think })
        .await?;
    let show_thinking = request.think != Some(false);
    if request.stream.unwrap_or(true) {
        return Ok(ndjson(chat_stream(answer, show_thinking)));
    }
    let model = answer.model.clone();
    let started = answer.started;
    let load = answer.load_duration;
    let rag = sources_value(answer.sources.as_deref());
    let collected = answer.collect().await?;
    let mut message = Message::assistant(collected.text);
    if !collected.tool_calls.is_empty() {
        message.tool_calls = Some(ollama_tool_calls(&collected.tool_calls));
    }
    if show_thinking && !collected.reasoning.is_empty() {
        message.thinking = Some(collected.reasoning);
    }
    let response = ChatResponse {
        model,
        created_at: rfc3339(SystemTime::now()),
        message,
        done: true,
        done_reason: Some(done_reason(collected.finish.reason)),
        logprobs: logprobs_of(&collected.logprobs),
        metrics: metrics(started, load, &collected.finish),
        rag,
    };
    Ok(json_response(StatusCode::OK, &response))
}

/// The `rag` field of a final response: the sources the answer could cite, when asked.
pub fn sources_value(sources: Option<&[crate::rag::Source]>) -> Option<serde_json::Value> {
    sources.map(|sources| serde_json::json!({ "sources": sources }))
}

fn chat_stream(mut answer: Answer, show_thinking: bool) -> impl Stream<Item = serde_json::Value> + Send + 'static {
    async_stream::stream! {
        let model = answer.model.clone();
        let piece = |message: serde_json::Value| serde_json::json!({"model": model, "created_at": rfc3339(SystemTime::now()), "message": message, "done": false});
        while let Some(event) = answer.next().await {
            match event {
                AnswerEvent::Text { text, logprob: token_logprob } => {
                    let mut chunk = piece(serde_json::json!({"role": "assistant", "content": text}));
                    if let Some(lp) = &token_logprob {
                        chunk["logprobs"] = serde_json::json!([logprob(lp)]);
                    }
                    yield chunk;
                }
                AnswerEvent::Reasoning(thinking) => {
                    if show_thinking {
                        yield piece(serde_json::json!({"role": "assistant", "content": "", "thinking": thinking}));
                    }
                }
                // A call is sent whole, as Ollama does.
                AnswerEvent::ToolCalls(calls) => {
                    yield piece(serde_json::json!({"role": "assistant", "content": "", "tool_calls": ollama_tool_calls(&calls)}));
                }
                AnswerEvent::Done(finish) => {
                    let response = ChatResponse {
                        model: model.clone(),
                        created_at: rfc3339(SystemTime::now()),
                        message: Message::assistant(String::new()),
                        done: true,
                        done_reason: Some(done_reason(finish.reason)),
                        logprobs: None,
                        metrics: metrics(answer.started, answer.load_duration, &finish),
                        rag: sources_value(answer.sources.as_deref()),
                    };
                    yield serde_json::to_value(response).unwrap_or_default();
                    break;
                }
                AnswerEvent::Error(error) => {
                    yield error_line(error);
                    break;
                }
            }
        }
    }
}

/// Embed one or more texts.
#[utoipa::path(post, path = "/api/embed", tag = "ollama", request_body = EmbedRequest,
    responses((status = 200, body = EmbedResponse), (status = 400, body = super::error::SimpleErrorBody), (status = 404, body = super::error::SimpleErrorBody)))]
pub async fn embed(State(state): State<AppState>, ApiJson(request): ApiJson<EmbedRequest>) -> Result<Response, ApiError> {
    let keep_alive = keep_alive(&request.keep_alive)?;
    let inputs = request.input.into_vec();
    if inputs.is_empty() {
        return Err(ApiError::invalid_param("input", "input must not be empty"));
    }
    let embeddings = state.backend.embed(answer::EmbedRequest { model: request.model.clone(), inputs, truncate: request.truncate.unwrap_or(true), keep_alive }).await?;
    if let Some(dimensions) = request.dimensions {
        let native = embeddings.vectors.first().map_or(0, Vec::len);
        if dimensions != native {
            return Err(ApiError::invalid_param("dimensions", format!("this model produces {native} dimensions; other sizes are not supported")));
        }
    }
    Ok(json_response(
        StatusCode::OK,
        &EmbedResponse {
            model: embeddings.model,
            embeddings: embeddings.vectors,
            total_duration: nanos(embeddings.total_duration),
            load_duration: nanos(embeddings.load_duration),
            prompt_eval_count: embeddings.prompt_tokens,
        },
    ))
}

/// Embed one text (the older endpoint).
#[utoipa::path(post, path = "/api/embeddings", tag = "ollama", request_body = EmbeddingsRequest,
    responses((status = 200, body = EmbeddingsResponse), (status = 404, body = super::error::SimpleErrorBody)))]
pub async fn embeddings(State(state): State<AppState>, ApiJson(request): ApiJson<EmbeddingsRequest>) -> Result<Response, ApiError> {
    let keep_alive = keep_alive(&request.keep_alive)?;
    let mut result = state.backend.embed(answer::EmbedRequest { model: request.model.clone(), inputs: vec![request.prompt], truncate: true, keep_alive }).await?;
    let embedding = result.vectors.pop().unwrap_or_default();
    Ok(json_response(StatusCode::OK, &EmbeddingsResponse { embedding }))
}

/// Ollama's way of writing a parameter count: "135.0M", "8.0B".
pub fn parameter_size(count: u64) -> String {
    let count = count as f64;
    if count >= 1e9 {
        format!("{:.1}B", count / 1e9)
    } else if count >= 1e6 {
        format!("{:.1}M", count / 1e6)
    } else {
        format!("{:.1}K", count / 1e3)
    }
}

pub fn details_of(base: &store::BaseModel) -> ModelDetails {
    ModelDetails {
        parent_model: String::new(),
        format: base.manifest.format.as_str().to_string(),
        family: base.family().unwrap_or_else(|| if base.manifest.kind == ModelKind::Embedding { "bert".into() } else { "llama".into() }),
        families: None,
        parameter_size: base.parameter_count().map(parameter_size).unwrap_or_default(),
        quantization_level: base.manifest.quantization.clone().unwrap_or_else(|| "F32".into()),
    }
}

fn list_model(name: &str, base: &store::BaseModel, modified: chrono::DateTime<chrono::Utc>, parent: Option<&str>) -> ListModel {
    let mut details = details_of(base);
    details.parent_model = parent.unwrap_or_default().to_string();
    ListModel {
        name: format!("{name}:latest"),
        model: format!("{name}:latest"),
        modified_at: modified.to_rfc3339(),
        size: base.manifest.size,
        digest: base.manifest.digest.trim_start_matches("sha256:").to_string(),
        details,
    }
}

/// List local models and personalities.
#[utoipa::path(get, path = "/api/tags", tag = "ollama", responses((status = 200, body = ListResponse)))]
pub async fn tags(State(state): State<AppState>) -> Result<Response, ApiError> {
    let mut models = Vec::new();
    for entry in state.service.store.list()? {
        match entry {
            Entry::Base(base) => models.push(list_model(&base.manifest.name.clone(), &base, base.manifest.created_at, None)),
            Entry::Personality(personality) => {
                if let Ok(resolved) = state.service.store.resolve(&personality.name) {
                    models.push(list_model(&personality.name, &resolved.base, personality.created_at, Some(&personality.modelfile.from)));
                }
            }
        }
    }
    Ok(json_response(StatusCode::OK, &ListResponse { models }))
}

/// Show a model's Modelfile, parameters, template and details.
#[utoipa::path(post, path = "/api/show", tag = "ollama", request_body = ShowRequest,
    responses((status = 200, body = ShowResponse), (status = 404, body = super::error::SimpleErrorBody)))]
pub async fn show(State(state): State<AppState>, ApiJson(request): ApiJson<ShowRequest>) -> Result<Response, ApiError> {
    let resolved = state.service.resolve(&request.model)?;
    let modelfile = resolved.effective();
    let manifest = &resolved.base.manifest;
    let template = modelfile.template.clone().unwrap_or_default();
    let parameters = modelfile.parameters.pairs().into_iter().map(|(name, value)| format!("{name} {value}")).collect::<Vec<_>>().join("\n");
    let capabilities = match manifest.kind {
        ModelKind::Chat => vec!["completion".to_string()],
        ModelKind::Embedding => vec!["embedding".to_string()],
    };
    let modified = resolved.layers.last().map(|p| p.created_at).unwrap_or(manifest.created_at);
    let response = ShowResponse {
        modelfile: modelfile.render(),
        parameters,
        template,
        system: modelfile.system.clone(),
        license: (!modelfile.license.is_empty()).then(|| modelfile.license.join("\n")),
        details: details_of(&resolved.base),
        model_info: serde_json::json!({
            "general.source": manifest.source,
            "general.format": manifest.format.as_str(),
            "general.source_format": manifest.source_format.as_str(),
            "general.size": manifest.size,
            "general.digest": manifest.digest,
            "mlxserver.base_model": manifest.name,
            "context_length": resolved.base.context_length(),
            "general.architecture": resolved.base.family(),
            "general.parameter_count": resolved.base.parameter_count(),
        }),
        capabilities,
        modified_at: modified.to_rfc3339(),
    };
    Ok(json_response(StatusCode::OK, &response))
}

/// List the models loaded now.
#[utoipa::path(get, path = "/api/ps", tag = "ollama", responses((status = 200, body = ProcessResponse)))]
pub async fn ps(State(state): State<AppState>) -> Result<Response, ApiError> {
    let stats = state.service.engine.stats().await;
    let gpu = state.service.engine.backend() != crate::engine::Backend::Cpu;
    let models = state
        .service
        .scheduler
        .loaded()
        .into_iter()
        .map(|loaded| {
            let base = state.service.store.resolve(&loaded.name).ok().map(|r| r.base);
            let size = loaded.bytes + stats.cache_bytes.get(&loaded.id).copied().unwrap_or(0);
            ProcessModel {
                name: format!("{}:latest", loaded.name),
                model: format!("{}:latest", loaded.name),
                size,
                digest: base.as_ref().map(|b| b.manifest.digest.trim_start_matches("sha256:").to_string()).unwrap_or_default(),
                details: base.as_ref().map(details_of).unwrap_or_default(),
                expires_at: rfc3339(loaded.expires_at.unwrap_or(SystemTime::now() + Duration::from_secs(100 * 365 * 24 * 3600))),
                size_vram: if gpu { size } else { 0 },
                busy: loaded.busy,
            }
        })
        .collect();
    let memory = ProcessMemory {
        active: stats.active_memory,
        peak: stats.peak_memory,
        cache: stats.cache_memory,
        limit: stats.memory_limit,
        resident: crate::metrics::resident_bytes(),
    };
    Ok(json_response(StatusCode::OK, &ProcessResponse { models, memory: Some(memory) }))
}

/// Copy a model or personality.
#[utoipa::path(post, path = "/api/copy", tag = "ollama", request_body = CopyRequest,
    responses((status = 200, description = "Copied"), (status = 404, body = super::error::SimpleErrorBody)))]
pub async fn copy(State(state): State<AppState>, ApiJson(request): ApiJson<CopyRequest>) -> Result<Response, ApiError> {
    let store = state.service.store.clone();
    tokio::task::spawn_blocking(move || store.copy(&request.source, &request.destination))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok(StatusCode::OK.into_response())
}

/// Delete a model or personality.
#[utoipa::path(delete, path = "/api/delete", tag = "ollama", request_body = DeleteRequest,
    responses((status = 200, description = "Deleted"), (status = 404, body = super::error::SimpleErrorBody)))]
pub async fn remove(State(state): State<AppState>, ApiJson(request): ApiJson<DeleteRequest>) -> Result<Response, ApiError> {
    if let Ok(resolved) = state.service.resolve(&request.model) {
        if resolved.layers.is_empty() {
            state.service.unload(&resolved).await;
        }
    }
    let store = state.service.store.clone();
    tokio::task::spawn_blocking(move || store.remove(&request.model, false))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok(StatusCode::OK.into_response())
}

/// Create a personality from a base model (JSON fields or a Modelfile).
#[utoipa::path(post, path = "/api/create", tag = "ollama", request_body = CreateRequest,
    responses((status = 200, description = "Progress objects", body = ProgressResponse), (status = 400, body = super::error::SimpleErrorBody)))]
pub async fn create(State(state): State<AppState>, ApiJson(request): ApiJson<CreateRequest>) -> Result<Response, ApiError> {
    if request.quantize.is_some() {
        return Err(ApiError::invalid_param("quantize", "quantize while creating is not supported; use mlxserver quantize"));
    }
    let modelfile = super::create_modelfile(&request)?;
    let store = state.service.store.clone();
    let name = request.model.clone();
    tokio::task::spawn_blocking(move || store.create_personality(&name, modelfile))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    let statuses = vec![
        ProgressResponse { status: "using existing layers".into(), ..Default::default() },
        ProgressResponse { status: "writing manifest".into(), ..Default::default() },
        ProgressResponse { status: "success".into(), ..Default::default() },
    ];
    if request.stream.unwrap_or(true) {
        Ok(ndjson(futures::stream::iter(statuses)))
    } else {
        Ok(json_response(StatusCode::OK, &ProgressResponse { status: "success".into(), ..Default::default() }))
    }
}

/// Sends pull progress as Ollama's progress objects.
struct ProgressSender(tokio::sync::mpsc::UnboundedSender<ProgressResponse>, std::sync::Mutex<std::collections::HashMap<String, u64>>);

impl ProgressSender {
    fn digest(file: &str) -> String {
        use sha2::Digest;
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(file.as_bytes())))
    }
}

impl crate::store::pull::PullProgress for ProgressSender {
    fn status(&self, status: &str) {
        let _ = self.0.send(ProgressResponse { status: status.to_string(), ..Default::default() });
    }
    fn file_started(&self, file: &str, total: u64) {
        if let Ok(mut totals) = self.1.lock() {
            totals.insert(file.to_string(), total);
        }
        let _ = self.0.send(ProgressResponse { status: format!("pulling {file}"), digest: Some(Self::digest(file)), total: Some(total), completed: Some(0) });
    }
    fn file_progress(&self, file: &str, completed: u64) {
        let total = self.1.lock().ok().and_then(|t| t.get(file).copied());
        let _ = self.0.send(ProgressResponse { status: format!("pulling {file}"), digest: Some(Self::digest(file)), total, completed: Some(completed) });
    }
}

/// Download a model from Hugging Face (`owner/repo[:revision]`) into the store.
#[utoipa::path(post, path = "/api/pull", tag = "ollama", request_body = PullRequest,
    responses((status = 200, description = "Progress objects (NDJSON), or the final one when stream is false", body = ProgressResponse),
              (status = 400, body = super::error::SimpleErrorBody), (status = 404, body = super::error::SimpleErrorBody)))]
pub async fn pull(State(state): State<AppState>, ApiJson(request): ApiJson<PullRequest>) -> Result<Response, ApiError> {
    // Local paths are for the CLI: the API only pulls from the Hub.
    let spec = crate::store::pull::RepoSpec::parse(&request.model)?;
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
    let service = state.service.clone();
    let task = tokio::spawn(async move {
        let progress = ProgressSender(sender, Default::default());
        let options = crate::store::pull::PullOptions::default();
        crate::store::pull::pull(&service.store, &service.engine, &format!("{}:{}", spec.id, spec.revision), &options, &progress).await
    });
    if request.stream.unwrap_or(true) {
        let stream = async_stream::stream! {
            while let Some(progress) = receiver.recv().await {
                yield serde_json::to_value(progress).unwrap_or_default();
            }
            match task.await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => yield serde_json::json!({"error": error.to_string()}),
                Err(error) => yield serde_json::json!({"error": error.to_string()}),
            }
        };
        return Ok(ndjson(stream));
    }
    while receiver.recv().await.is_some() {}
    match task.await {
        Ok(Ok(_)) => Ok(json_response(StatusCode::OK, &ProgressResponse { status: "success".into(), ..Default::default() })),
        Ok(Err(error)) => Err(pull_error(error)),
        Err(error) => Err(ApiError::internal(error.to_string())),
    }
}

fn pull_error(error: crate::store::pull::PullError) -> ApiError {
    use crate::store::pull::PullError;
    match error {
        PullError::Store(error) => error.into(),
        PullError::NotFound(_) => ApiError::not_found(error.to_string()),
        PullError::Gated(_) => ApiError::new(StatusCode::FORBIDDEN, "invalid_request_error", error.to_string()),
        PullError::Unsupported { .. } => ApiError::bad_request(error.to_string()),
        PullError::Download { .. } | PullError::Digest { .. } => ApiError::new(StatusCode::BAD_GATEWAY, "server_error", error.to_string()),
        PullError::Convert(_) => ApiError::internal(error.to_string()),
    }
}
