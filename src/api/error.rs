//! HTTP errors, rendered in the shape of the API family a request belongs to.
//!
//! Handlers and layers return [`ApiError`]; its `IntoResponse` only sets the status and stores
//! the error in the response's extensions. The [`shape_errors`] middleware, which knows the
//! request path, then writes the body: OpenAI's `{"error": {"message", "type", "param", "code"}}`
//! under `/v1`, and `{"error": "..."}` (Ollama's and the native API's form) elsewhere. Errors
//! that axum or tower-http produce themselves (404, 405, 408, 413, panics) get the same shapes.

use axum::body::Body;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;
use utoipa::ToSchema;

/// The API families differ in error shape; the enum is the core's.
pub use crate::answer::ApiFamily as Family;

/// A request's id: set on every request, sent back in `x-request-id`, and written beside
/// the details of a server error in the log (the caller's body names only the id).
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// An error answered over HTTP.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`.
    pub kind: &'static str,
    /// OpenAI's `code`.
    pub code: Option<&'static str>,
    /// OpenAI's `param`: the request field at fault.
    pub param: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), kind, code: None, param: None }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        ApiError::bad_request(message).with_param(param).with_code("invalid_value")
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, "authentication_error", message).with_code("invalid_api_key")
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", message).with_code("not_found")
    }

    pub fn model_not_found(model: &str) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", format!("model '{model}' not found"))
            .with_code("model_not_found")
            .with_param("model")
    }

    pub fn overloaded(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message).with_code("server_busy")
    }

    pub fn not_implemented(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_IMPLEMENTED, "invalid_request_error", message).with_code("not_implemented")
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message).with_code("internal_error")
    }

    /// A generic error for a status that carries no message of ours.
    pub fn from_status(status: StatusCode) -> Self {
        let message = match status {
            StatusCode::NOT_FOUND => "not found".to_string(),
            StatusCode::METHOD_NOT_ALLOWED => "method not allowed".to_string(),
            StatusCode::PAYLOAD_TOO_LARGE => "request body is too large".to_string(),
            StatusCode::REQUEST_TIMEOUT => "request timed out".to_string(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported media type".to_string(),
            StatusCode::INTERNAL_SERVER_ERROR => "internal server error".to_string(),
            other => other.canonical_reason().unwrap_or("error").to_ascii_lowercase(),
        };
        let kind = if status.is_server_error() { "server_error" } else { "invalid_request_error" };
        let code = match status {
            StatusCode::NOT_FOUND => Some("not_found"),
            StatusCode::METHOD_NOT_ALLOWED => Some("method_not_allowed"),
            StatusCode::PAYLOAD_TOO_LARGE => Some("payload_too_large"),
            StatusCode::REQUEST_TIMEOUT => Some("timeout"),
            StatusCode::INTERNAL_SERVER_ERROR => Some("internal_error"),
            _ => None,
        };
        ApiError { status, message, kind, code, param: None }
    }

    /// Anthropic's `error.type` for this status.
    fn anthropic_type(&self) -> &'static str {
        match self.status.as_u16() {
            400 | 405 | 408 | 415 | 422 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            503 | 529 => "overloaded_error",
            _ => "api_error",
        }
    }

    /// A server error keeps its details for the log; the caller learns only that it
    /// happened and the request id to quote.
    pub fn public(mut self, request_id: Option<&str>) -> ApiError {
        if self.status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(request_id = request_id.unwrap_or("-"), detail = %self.message, "internal error");
            self.message = match request_id {
                Some(id) => format!("internal server error (request id {id}; the details are in the server log)"),
                None => "internal server error (the details are in the server log)".to_string(),
            };
        }
        self
    }

    /// The JSON body of this error in `family`'s shape.
    pub fn body(&self, family: Family) -> serde_json::Value {
        match family {
            Family::Anthropic => serde_json::json!({
                "type": "error",
                "error": { "type": self.anthropic_type(), "message": self.message },
            }),
            Family::OpenAi => serde_json::json!({
                "error": {
                    "message": self.message,
                    "type": self.kind,
                    "param": self.param,
                    "code": self.code,
                }
            }),
            Family::Ollama | Family::Native => serde_json::json!({ "error": self.message }),
        }
    }

    pub fn render(&self, family: Family) -> Response {
        let mut response = (self.status, axum::Json(self.body(family))).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            // Every 503 here is momentary (a full queue, a shutdown, a model loading); clients
            // such as the OpenAI SDK wait this long before they retry.
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response.extensions_mut().insert(Rendered);
        response
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = Response::new(Body::empty());
        *response.status_mut() = self.status;
        response.extensions_mut().insert(self);
        response
    }
}

/// Marks a response whose error body is already in its final shape.
#[derive(Debug, Clone, Copy)]
struct Rendered;

/// OpenAI's error object, for the OpenAPI document.
#[derive(Debug, Serialize, ToSchema)]
pub struct OpenAiErrorBody {
    pub error: OpenAiErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OpenAiErrorDetail {
    /// What went wrong, for people.
    pub message: String,
    /// `invalid_request_error`, `authentication_error` or `server_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// A machine-readable code such as `model_not_found`.
    pub code: Option<String>,
}

/// The error object of the Ollama and native routes, for the OpenAPI document.
#[derive(Debug, Serialize, ToSchema)]
pub struct SimpleErrorBody {
    /// What went wrong.
    #[schema(example = "model 'nope' not found")]
    pub error: String,
}

/// Writes error bodies in the shape of the request's API family.
pub async fn shape_errors(request: Request, next: Next) -> Response {
    let family = Family::of_path(request.uri().path());
    let request_id = request.extensions().get::<RequestId>().map(|id| id.0.clone());
    let mut response = next.run(request).await;
    if let Some(error) = response.extensions_mut().remove::<ApiError>() {
        let mut shaped = error.public(request_id.as_deref()).render(family);
        copy_cors_headers(&response, &mut shaped);
        return shaped;
    }
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json"));
    if (status.is_client_error() || status.is_server_error()) && !is_json && response.extensions().get::<Rendered>().is_none() {
        let mut shaped = ApiError::from_status(status).render(family);
        for (name, value) in response.headers() {
            if name == header::ALLOW || name == header::WWW_AUTHENTICATE || name.as_str().starts_with("access-control-") {
                shaped.headers_mut().insert(name.clone(), value.clone());
            }
        }
        return shaped;
    }
    response
}

fn copy_cors_headers(from: &Response, to: &mut Response) {
    for (name, value) in from.headers() {
        if name.as_str().starts_with("access-control-") || name == header::WWW_AUTHENTICATE {
            to.headers_mut().insert(name.clone(), value.clone());
        }
    }
}

/// A JSON body that is read whatever the Content-Type (Ollama's clients and `curl -d` often
/// send none or a form type) and whose errors are [`ApiError`]s.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(request, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::from_status(StatusCode::PAYLOAD_TOO_LARGE)
            } else {
                ApiError::bad_request(format!("could not read the request body: {}", rejection.body_text()))
            }
        })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::bad_request("the request body is empty; expected a JSON object"));
        }
        serde_json::from_slice(&bytes)
            .map(ApiJson)
            .map_err(|error| ApiError::bad_request(format!("invalid JSON body: {error}")))
    }
}

/// A sampling parameter outside its range is the request's fault, named by its field.
pub fn check_range(param: &str, value: Option<f32>, range: std::ops::RangeInclusive<f32>) -> Result<(), ApiError> {
    match value {
        Some(v) if !range.contains(&v) || v.is_nan() => {
            Err(ApiError::invalid_param(param, format!("{param} must be between {} and {}", range.start(), range.end())))
        }
        _ => Ok(()),
    }
}

/// JSON response with the content type clients expect.
pub fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(bytes) => {
            let mut response = Response::new(Body::from(bytes));
            *response.status_mut() = status;
            response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        Err(error) => ApiError::internal(format!("could not encode the response: {error}")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_by_path() {
        assert_eq!(Family::of_path("/v1/chat/completions"), Family::OpenAi);
        assert_eq!(Family::of_path("/v1"), Family::OpenAi);
        assert_eq!(Family::of_path("/v10"), Family::Ollama);
        assert_eq!(Family::of_path("/api/chat"), Family::Ollama);
        assert_eq!(Family::of_path("/generate"), Family::Ollama);
        assert_eq!(Family::of_path("/v1/messages"), Family::Anthropic);
        assert_eq!(Family::of_path("/v1/messages/count_tokens"), Family::Anthropic);
    }

    #[test]
    fn anthropic_shape_and_no_internal_text() {
        let body = ApiError::model_not_found("x").body(Family::Anthropic);
        assert_eq!(body["type"], "error");
        assert_eq!(body["error"]["type"], "not_found_error");
        let error = ApiError::internal("/secret/path: mlx failure").public(Some("abc"));
        assert!(!error.message.contains("secret") && error.message.contains("abc"), "{}", error.message);
        assert_eq!(ApiError::bad_request("bad").public(None).message, "bad");
    }

    #[test]
    fn openai_shape_has_all_fields() {
        let body = ApiError::model_not_found("x").body(Family::OpenAi);
        assert_eq!(body["error"]["code"], "model_not_found");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["param"], "model");
        assert!(body["error"]["message"].as_str().unwrap().contains("'x'"));
        let body = ApiError::model_not_found("x").body(Family::Ollama);
        assert_eq!(body, serde_json::json!({"error": "model 'x' not found"}));
    }
}

/// Gives every request an id (the caller's `x-request-id` when it sends a sane one) and
/// returns it in the response's `x-request-id`.
pub async fn assign_request_id(mut request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get("x-request-id")
        .and_then(|value| value.to_str().ok())
        .filter(|value| !value.is_empty() && value.len() <= 64 && value.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    request.extensions_mut().insert(RequestId(id.clone()));
    let mut response = next.run(request).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

/// The body of an error that happens after a stream has started, in the family's shape
/// (each family frames it: an SSE event, an NDJSON line, a plain-text line).
pub fn stream_error(family: Family, error: crate::answer::ServiceError) -> serde_json::Value {
    ApiError::from(error).public(None).body(family)
}
