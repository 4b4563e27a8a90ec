//! The OpenAPI document (built by utoipa from the handlers' annotations) at `/openapi.json`,
//! and Swagger UI at `/docs`, served from assets compiled into the binary so it works offline.

use axum::http::{header, HeaderValue};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::AppState;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "mlxserver",
        description = "A local AI model server on MLX with OpenAI- and Ollama-compatible APIs.",
        license(name = "MIT")
    ),
    paths(
        super::root,
        super::health,
        super::version,
        super::metrics,
        super::openai::chat_completions,
        super::openai::completions,
        super::openai::embeddings,
        super::openai::list_models,
        super::openai::get_model,
        super::responses::create,
        super::responses::retrieve,
        super::responses::remove,
        super::anthropic::messages,
        super::anthropic::count_tokens,
        super::tokens::tokenize,
        super::tokens::detokenize,
        super::tokens::rerank,
        super::ollama::generate,
        super::ollama::chat,
        super::ollama::embed,
        super::ollama::embeddings,
        super::ollama::tags,
        super::ollama::show,
        super::ollama::ps,
        super::ollama::copy,
        super::ollama::remove,
        super::ollama::create,
        super::ollama::pull,
        super::native::generate,
        super::native::embeddings,
        super::native::add_documents,
        super::native::rag_status,
        super::native::clear_collection
    ),
    components(schemas(
        super::Health,
        super::Version,
        super::error::OpenAiErrorBody,
        super::error::OpenAiErrorDetail,
        super::error::SimpleErrorBody,
        AnthropicErrorBody
    )),
    modifiers(&Security, &ErrorResponses),
    security(("api_key" = []), ("bearer" = [])),
    tags(
        (name = "server", description = "Server status"),
        (name = "openai", description = "OpenAI-compatible API (chat, completions, responses, embeddings, models)"),
        (name = "anthropic", description = "Anthropic-compatible Messages API"),
        (name = "tokens", description = "Tokenize, detokenize and rerank"),
        (name = "ollama", description = "Ollama-compatible API"),
        (name = "native", description = "mlxserver's own API")
    )
)]
pub struct ApiDoc;

/// Anthropic's error object, for the OpenAPI document.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
struct AnthropicErrorBody {
    /// Always `error`.
    #[schema(example = "error")]
    r#type: String,
    /// `{"type": "not_found_error", "message": "..."}`.
    #[schema(value_type = Object)]
    error: serde_json::Value,
}

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("api_key", SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))));
        components.add_security_scheme("bearer", SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()));
    }
}

/// Documents on every operation the error answers any request may get (the family's error
/// shape: OpenAI's under /v1, `{"error"}` elsewhere), so clients and checkers know them.
struct ErrorResponses;

impl Modify for ErrorResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        const ERRORS: &[(&str, &str)] = &[
            ("400", "Invalid request (malformed JSON, bad parameter, bad name)"),
            ("401", "Missing or wrong API key"),
            ("404", "Unknown model, personality or collection"),
            ("409", "The name is taken, or the model is in use"),
            ("413", "Request body too large"),
            ("500", "The server failed (e.g. a model could not be loaded)"),
            ("503", "Server busy or shutting down"),
        ];
        for (path, item) in openapi.paths.paths.iter_mut() {
            let schema = match super::error::Family::of_path(path) {
                super::error::Family::OpenAi => "OpenAiErrorBody",
                super::error::Family::Anthropic => "AnthropicErrorBody",
                super::error::Family::Ollama | super::error::Family::Native => "SimpleErrorBody",
            };
            let operations = [&mut item.get, &mut item.post, &mut item.delete, &mut item.put, &mut item.head];
            for operation in operations.into_iter().flatten() {
                if path == "/" || path == "/health" || path == "/api/version" {
                    continue;
                }
                for (status, description) in ERRORS {
                    if operation.responses.responses.contains_key(*status) {
                        continue;
                    }
                    let response = ResponseBuilder::new()
                        .description(*description)
                        .content("application/json", ContentBuilder::new().schema(Some(Ref::from_schema_name(schema))).build())
                        .build();
                    operation.responses.responses.insert(status.to_string(), response.into());
                }
            }
        }
    }
}

/// The OpenAPI document as pretty JSON (what `openapi/openapi.json` holds).
pub fn openapi_json() -> String {
    let mut document = ApiDoc::openapi();
    document.info.version = env!("CARGO_PKG_VERSION").to_string();
    document.to_pretty_json().unwrap_or_else(|error| format!("{{\"error\": \"{error}\"}}"))
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/openapi.json", get(openapi))
        .route("/docs", get(swagger_page))
        .route("/docs/", get(swagger_page))
        .route("/docs/swagger-ui.css", get(|| asset("text/css", SWAGGER_CSS)))
        .route("/docs/swagger-ui-bundle.js", get(|| asset("application/javascript", SWAGGER_JS)))
        .route("/docs/favicon-32x32.png", get(|| asset("image/png", FAVICON)))
}

const SWAGGER_CSS: &[u8] = include_bytes!("../../assets/swagger-ui/swagger-ui.css");
const SWAGGER_JS: &[u8] = include_bytes!("../../assets/swagger-ui/swagger-ui-bundle.js");
const FAVICON: &[u8] = include_bytes!("../../assets/swagger-ui/favicon-32x32.png");

async fn openapi() -> Response {
    let mut response = openapi_json().into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

async fn asset(content_type: &'static str, bytes: &'static [u8]) -> Response {
    let mut response = bytes.into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=86400"));
    response
}

async fn swagger_page() -> Html<&'static str> {
    Html(SWAGGER_PAGE)
}

const SWAGGER_PAGE: &str = r##"<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>mlxserver API</title>
  <link rel="icon" type="image/png" href="/docs/favicon-32x32.png">
  <link rel="stylesheet" href="/docs/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({
      url: "/openapi.json",
      dom_id: "#swagger-ui",
      deepLinking: true,
      persistAuthorization: true,
      validatorUrl: null
    });
  </script>
</body>
</html>
"##;
