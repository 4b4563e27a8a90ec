//! The HTTP API: one router per family (`openai`, `responses`, `anthropic`, `ollama`,
//! `native`, and `tokens` for tokenize/detokenize/rerank), each a translation over the
//! shared [`Backend`]; the server-wide routes (`/`, `/health`, `/api/version`, `/docs`,
//! `/openapi.json`); and the layers every request passes through, added in one place in
//! [`app`].

pub mod anthropic;
pub mod docs;
pub mod error;
pub mod native;
pub mod ollama;
pub mod ollama_types;
pub mod openai;
pub mod responses;
pub mod tokens;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Serialize;
use subtle::ConstantTimeEq;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use utoipa::ToSchema;

pub use error::{ApiError, ApiJson, Family};

use crate::answer::Backend;
use crate::config::Config;
use crate::engine::EngineError;
use crate::scheduler::SchedulerError;
use crate::service::{Service, ServiceError};
use crate::store::{Modelfile, StoreError};

/// What every handler can reach. Cheap to clone: everything inside is shared.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    /// Answers, embeddings, tokens: what the API families translate to and from.
    pub backend: Arc<dyn Backend>,
    /// The store, scheduler and engine, for model management and status routes.
    pub service: Service,
    /// Responses kept for `previous_response_id` and `GET /v1/responses/{id}`.
    pub responses: responses::ResponseStore,
    pub started_at: Instant,
}

impl AppState {
    /// Starts the engine and scheduler for `config` (needs a tokio runtime).
    pub fn new(config: Config) -> Self {
        let service = Service::start(config);
        let backend: Arc<dyn Backend> = Arc::new(service.clone());
        Self::assemble(service, backend)
    }

    /// Handlers over another backend (tests use scripted answers); model management still
    /// goes to a service over `config`'s store, whose engine stays idle.
    pub fn with_backend(config: Config, backend: Arc<dyn Backend>) -> Self {
        Self::assemble(Service::start(config), backend)
    }

    fn assemble(service: Service, backend: Arc<dyn Backend>) -> Self {
        let responses = responses::ResponseStore::new(responses::RESPONSES_KEPT);
        AppState { config: service.config.clone(), backend, service, responses, started_at: Instant::now() }
    }
}

/// The one mapping from domain errors to HTTP statuses. Details that only matter to the
/// operator (paths, MLX messages) are logged; callers get a clear sentence.
impl From<ServiceError> for ApiError {
    fn from(error: ServiceError) -> Self {
        match error {
            ServiceError::Store(error) => error.into(),
            ServiceError::Scheduler(SchedulerError::Busy { .. }) => ApiError::overloaded(error.to_string()),
            ServiceError::Scheduler(SchedulerError::ShuttingDown) => ApiError::overloaded(error.to_string()),
            ServiceError::Overloaded { .. } => ApiError::overloaded(error.to_string()),
            ServiceError::Scheduler(SchedulerError::Load(error)) => {
                tracing::error!(%error, "model load failed");
                match error {
                    EngineError::Stopped => ApiError::overloaded(error.to_string()),
                    other => ApiError::internal(format!("the model could not be loaded: {other}")).with_code("model_load_failed"),
                }
            }
            ServiceError::Engine(error) => error.into(),
            ServiceError::Rag(error) => match &error {
                crate::rag::RagError::NoCollection { .. } => ApiError::not_found(error.to_string()).with_code("collection_not_found"),
                crate::rag::RagError::Database(_) => {
                    tracing::error!(%error, "document index error");
                    ApiError::internal(error.to_string())
                }
                _ => ApiError::bad_request(error.to_string()),
            },
            ServiceError::BadRequest(detail) => ApiError::bad_request(detail),
            ServiceError::NotFound(detail) => ApiError::not_found(detail),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> Self {
        match &error {
            EngineError::ContextOverflow { .. } => ApiError::bad_request(error.to_string()).with_code("context_length_exceeded"),
            EngineError::WrongKind { .. } | EngineError::BadRequest(_) | EngineError::Template(_) => {
                ApiError::bad_request(error.to_string())
            }
            EngineError::Stopped => ApiError::overloaded(error.to_string()),
            _ => {
                tracing::error!(%error, "engine error");
                ApiError::internal(error.to_string())
            }
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match &error {
            StoreError::NotFound { name } => ApiError::model_not_found(name),
            StoreError::InvalidName { .. } => ApiError::invalid_param("model", error.to_string()),
            StoreError::AlreadyExists { .. } | StoreError::InUse { .. } | StoreError::Taken { .. } => {
                ApiError::new(StatusCode::CONFLICT, "invalid_request_error", error.to_string()).with_code("conflict")
            }
            StoreError::Modelfile { .. } | StoreError::Cycle { .. } | StoreError::InvalidSource { .. } => ApiError::bad_request(error.to_string()),
            StoreError::Io { .. } | StoreError::Corrupt { .. } => {
                tracing::error!(%error, "store error");
                ApiError::internal(error.to_string())
            }
        }
    }
}

/// The Modelfile of an Ollama `/api/create` request: its `modelfile` text, or its fields.
pub fn create_modelfile(request: &ollama_types::CreateRequest) -> Result<Modelfile, ApiError> {
    if let Some(text) = &request.modelfile {
        return Ok(Modelfile::parse(text)?);
    }
    let from = request.from.clone().ok_or_else(|| ApiError::invalid_param("from", "from (the base model) is required"))?;
    let mut modelfile = Modelfile { from, system: request.system.clone(), template: request.template.clone(), ..Default::default() };
    if let Some(parameters) = request.parameters.as_ref().and_then(|p| p.as_object()) {
        for (name, value) in parameters {
            let values: Vec<String> = match value {
                serde_json::Value::Array(items) => items.iter().map(|i| i.as_str().map(str::to_string).unwrap_or_else(|| i.to_string())).collect(),
                serde_json::Value::String(text) => vec![text.clone()],
                other => vec![other.to_string()],
            };
            for value in values {
                modelfile.parameters.set(name, &value).map_err(|e| ApiError::invalid_param("parameters", e))?;
            }
        }
    }
    for message in request.messages.iter().flatten() {
        if !matches!(message.role.as_str(), "system" | "user" | "assistant") {
            return Err(ApiError::invalid_param("messages", format!("unknown role '{}'", message.role)));
        }
        modelfile.messages.push(crate::store::modelfile::Message { role: message.role.clone(), content: message.content.clone() });
    }
    match &request.license {
        Some(serde_json::Value::String(text)) => modelfile.license.push(text.clone()),
        Some(serde_json::Value::Array(items)) => modelfile.license.extend(items.iter().filter_map(|i| i.as_str().map(str::to_string))),
        _ => {}
    }
    Ok(modelfile)
}

/// Paths that answer without an API key.
const PUBLIC_PATHS: &[&str] = &["/", "/health", "/api/version", "/openapi.json"];

fn is_public(path: &str) -> bool {
    PUBLIC_PATHS.contains(&path) || path == "/docs" || path.starts_with("/docs/")
}

/// The key a request presents: `X-API-Key`, or `Authorization: Bearer` as OpenAI SDKs send.
fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(key) = headers.get("x-api-key").and_then(|value| value.to_str().ok()) {
        return Some(key.trim());
    }
    let authorization = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = authorization.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Checks the API key before routing, so unknown paths are not revealed to callers without
/// a key. CORS preflights pass: browsers send them without credentials.
async fn require_api_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(expected) = state.config.api_key.as_deref() else {
        return next.run(request).await;
    };
    if request.method() == Method::OPTIONS || is_public(request.uri().path()) {
        return next.run(request).await;
    }
    let accepted = presented_key(request.headers())
        .is_some_and(|key| bool::from(key.as_bytes().ct_eq(expected.as_bytes())));
    if accepted {
        return next.run(request).await;
    }
    let message = if presented_key(request.headers()).is_some() {
        "invalid API key"
    } else {
        "missing API key: send it in the X-API-Key header or as Authorization: Bearer"
    };
    let mut response = ApiError::unauthorized(message).into_response();
    response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

fn cors_layer(config: &Config) -> CorsLayer {
    let origins = &config.cors_origins;
    let allow_origin = if origins.iter().any(|origin| origin == "*") {
        AllowOrigin::any()
    } else if origins.is_empty() {
        // As Ollama does by default: pages served from this machine may call the API.
        AllowOrigin::predicate(|origin: &HeaderValue, _| {
            let origin = origin.to_str().unwrap_or_default();
            ["http://localhost", "https://localhost", "http://127.0.0.1", "https://127.0.0.1", "http://[::1]"]
                .iter()
                .any(|allowed| origin == *allowed || origin.strip_prefix(allowed).is_some_and(|rest| rest.starts_with(':')))
        })
    } else {
        AllowOrigin::list(origins.iter().filter_map(|origin| HeaderValue::from_str(origin).ok()))
    };
    CorsLayer::new()
        .allow_origin(allow_origin)
        .allow_methods([Method::GET, Method::POST, Method::DELETE, Method::HEAD, Method::OPTIONS])
        .allow_headers([
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
            "x-api-key".parse().expect("static header name"),
            "anthropic-version".parse().expect("static header name"),
            "x-request-id".parse().expect("static header name"),
        ])
        .max_age(Duration::from_secs(3600))
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked");
    ApiError::internal("internal server error").into_response()
}

async fn not_found(request: Request) -> ApiError {
    ApiError::not_found(format!("no route for {} {}", request.method(), request.uri().path()))
}

/// The whole application: routes plus layers.
pub fn app(state: AppState) -> Router {
    let routes = Router::new()
        .merge(base_routes())
        .merge(docs::router())
        .merge(openai::router())
        .merge(responses::router())
        .merge(anthropic::router())
        .merge(tokens::router())
        .merge(ollama::router())
        .merge(native::router())
        .fallback(not_found)
        .with_state(state.clone());
    with_layers(routes, state)
}

/// Wraps routes in the layers every request passes through (tests reuse this on routes of
/// their own). Layers run outside-in in the order listed.
pub fn with_layers(routes: Router, state: AppState) -> Router {
    let config = state.config.clone();
    let body_limit = usize::try_from(config.max_body_bytes).unwrap_or(usize::MAX);
    // Each `layer` wraps everything added before it, so the last one runs first. axum
    // converts bodies between layers, which a single tower stack would not.
    routes
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(RequestBodyLimitLayer::new(body_limit))
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, config.request_timeout))
        .layer(middleware::from_fn_with_state(state.clone(), require_api_key))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(middleware::from_fn_with_state(state, count_requests))
        .layer(middleware::from_fn(error::shape_errors))
        .layer(cors_layer(&config))
        .layer(TraceLayer::new_for_http().make_span_with(|request: &Request| {
            let id = request.extensions().get::<error::RequestId>().map(|id| id.0.as_str()).unwrap_or("-");
            tracing::info_span!("request", method = %request.method(), uri = %request.uri().path(), request_id = %id)
        })
        .on_failure(log_failure))
        .layer(middleware::from_fn(error::assign_request_id))
}

/// A 503 is the server asking a client to come back shortly (a full queue, a shutdown), not a
/// fault: under load it would flood the log at error level.
fn log_failure(class: tower_http::classify::ServerErrorsFailureClass, latency: Duration, _span: &tracing::Span) {
    match class {
        tower_http::classify::ServerErrorsFailureClass::StatusCode(StatusCode::SERVICE_UNAVAILABLE) => tracing::debug!(?latency, "answered 503: busy"),
        class => tracing::error!(%class, ?latency, "response failed"),
    }
}

fn base_routes() -> Router<AppState> {
    Router::new()
        .route("/", get(root).head(root))
        .route("/health", get(health))
        .route("/api/version", get(version))
        .route("/metrics", get(metrics))
}

/// Counts every request by its route (the matched pattern, so ids do not explode the
/// label set) and status.
async fn count_requests(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let method = request.method().to_string();
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|path| path.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let response = next.run(request).await;
    state.service.metrics.request(&method, &route, response.status().as_u16());
    response
}

/// Prometheus metrics in the text exposition format (when `metrics` is on).
#[utoipa::path(get, path = "/metrics", tag = "server", responses((status = 200, description = "Prometheus text format", body = String), (status = 404, body = error::SimpleErrorBody)))]
pub async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    if !state.config.metrics {
        return Err(ApiError::not_found("metrics are off: set metrics = true in the config"));
    }
    let stats = state.service.engine.stats().await;
    let loaded = state.service.scheduler.loaded();
    let gauges = crate::metrics::Gauges {
        loaded_models: loaded.len(),
        queue_depth: state.service.scheduler.queue_depth(),
        answers_in_flight: state.service.in_flight(),
        memory_bytes: stats.active_memory.max(loaded.iter().map(|m| m.bytes).sum()),
        peak_memory_bytes: stats.peak_memory,
        cache_memory_bytes: stats.cache_memory,
        resident_bytes: crate::metrics::resident_bytes(),
        prefix_hits: stats.prefix.hits,
        prefix_misses: stats.prefix.misses,
        prefix_reused_tokens: stats.prefix.reused_tokens,
        prefix_bytes: stats.prefix.bytes,
    };
    let mut response = state.service.metrics.render(&gauges).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    Ok(response)
}

/// `mlxserver is running`, as Ollama's root answers.
#[utoipa::path(get, path = "/", tag = "server", responses((status = 200, description = "The server is up", body = String, example = "mlxserver is running")))]
pub async fn root() -> &'static str {
    "mlxserver is running"
}

/// Liveness and readiness for probes.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    #[schema(example = "ok")]
    pub status: &'static str,
    /// Seconds since the server started.
    pub uptime_seconds: u64,
}

#[utoipa::path(get, path = "/health", tag = "server", responses((status = 200, body = Health)))]
pub async fn health(State(state): State<AppState>) -> axum::Json<Health> {
    axum::Json(Health { status: "ok", uptime_seconds: state.started_at.elapsed().as_secs() })
}

/// The server's version.
#[derive(Debug, Serialize, ToSchema)]
pub struct Version {
    #[schema(example = "0.1.0")]
    pub version: &'static str,
}

#[utoipa::path(get, path = "/api/version", tag = "ollama", responses((status = 200, body = Version)))]
pub async fn version() -> axum::Json<Version> {
    axum::Json(Version { version: env!("CARGO_PKG_VERSION") })
}

/// The `rag` field of a request, read the same way by every API family: `true`, an object of
/// options, or `false`/absent for none.
pub(crate) fn rag_options(value: &Option<serde_json::Value>) -> Result<Option<crate::answer::RagOptions>, error::ApiError> {
    Ok(value.as_ref().map(crate::answer::RagOptions::from_value).transpose().map_err(|e| error::ApiError::invalid_param("rag", e))?.flatten())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_from_either_header() {
        let mut headers = HeaderMap::new();
        headers.insert("x-api-key", "abc".parse().unwrap());
        assert_eq!(presented_key(&headers), Some("abc"));
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, "Bearer xyz".parse().unwrap());
        assert_eq!(presented_key(&headers), Some("xyz"));
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, "Basic xyz".parse().unwrap());
        assert_eq!(presented_key(&headers), None);
    }

    #[test]
    fn public_paths() {
        assert!(is_public("/"));
        assert!(is_public("/docs/swagger-ui.css"));
        assert!(!is_public("/api/tags"));
        assert!(!is_public("/docsx"));
    }
}

