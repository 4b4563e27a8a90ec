//! The server shell through the real binary and real HTTP: serve/stop and the pid file,
//! detached mode, a busy port, API keys on every route family, JSON errors (401, 404, 405,
//! 413, 500), the OpenAPI document, and Swagger UI rendered offline in headless Chromium.

use std::process::Command;
use std::time::Duration;

use crate::common::{stderr, stdout, wait_for, Home, ServerProcess};

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap()
}

#[test]
fn serve_writes_a_pid_file_and_stop_removes_it() {
    let home = Home::new();
    let mut server = ServerProcess::start(&home, &[]);
    let pid_path = home.path().join("server.pid");
    wait_for("the pid file", Duration::from_secs(10), || pid_path.exists());
    let record: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&pid_path).unwrap()).unwrap();
    assert_eq!(record["pid"].as_u64(), Some(u64::from(server.child.id())));

    // A second server on the same home refuses to start.
    let second = home.run(&["serve", "--port", &crate::common::free_port().to_string()]);
    assert!(!second.status.success());
    assert!(stderr(&second).contains("already running"), "{}", stderr(&second));

    let stop = home.run(&["stop"]);
    assert!(stop.status.success(), "{}", stderr(&stop));
    assert!(stdout(&stop).contains("mlxserver stopped."), "{}", stdout(&stop));
    let status = server.child.wait().unwrap();
    assert!(status.success(), "the server exits cleanly on SIGTERM: {status:?}");
    assert!(!pid_path.exists());

    let again = home.run(&["stop"]);
    assert!(again.status.success());
    assert!(stdout(&again).contains("No mlxserver is running."), "{}", stdout(&again));
}

#[test]
fn stop_cleans_a_stale_pid_file() {
    let home = Home::new();
    // A pid that cannot be alive: beyond the kernel's pid_max.
    std::fs::write(home.path().join("server.pid"), r#"{"pid": 99999999, "address": "x", "url": "y"}"#).unwrap();
    let output = home.run(&["--lang", "ja", "stop"]);
    assert!(output.status.success());
    assert!(stdout(&output).contains("古い pid ファイル"), "{}", stdout(&output));
    assert!(!home.path().join("server.pid").exists());
}

#[test]
fn a_busy_port_is_a_clear_error() {
    let home = Home::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let output = home.run(&["serve", "--port", &port]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(message.contains("is already in use"), "{message}");
    assert_eq!(message.lines().filter(|line| line.starts_with("Error:")).count(), 1, "{message}");
}

#[test]
fn detach_returns_once_the_server_answers() {
    let home = Home::new();
    let port = crate::common::free_port().to_string();
    let output = home.run(&["serve", "--detach", "--port", &port]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("running in the background"), "{}", stdout(&output));
    let body = reqwest::blocking_get(&format!("http://127.0.0.1:{port}/"));
    assert_eq!(body, "mlxserver is running");
    let stop = home.run(&["stop"]);
    assert!(stop.status.success(), "{}", stderr(&stop));
    assert!(std::net::TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap())).is_err());
}

/// A tiny blocking GET for tests that run outside a runtime.
mod reqwest {
    pub use ::reqwest::*;
    pub fn blocking_get(url: &str) -> String {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async { ::reqwest::get(url).await.unwrap().text().await.unwrap() })
    }
}

#[tokio::test]
async fn api_key_guards_every_route_family() {
    let home = Home::new();
    let server = ServerProcess::start(&home, &["--api-key", "test-key-123"]);
    let http = client();

    // Public routes answer without a key.
    for path in ["/", "/health", "/api/version", "/openapi.json", "/docs"] {
        let response = http.get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }

    // Every documented route, and unknown paths of each family, need the key.
    let spec: serde_json::Value = http.get(server.url("/openapi.json")).send().await.unwrap().json().await.unwrap();
    let mut guarded: Vec<(String, String)> = Vec::new();
    for (path, item) in spec["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if !["/", "/health", "/api/version"].contains(&path.as_str()) {
                guarded.push((method.to_uppercase(), path.replace("{id}", "x").replace("{name}", "x").replace("{collection}", "x")));
            }
        }
    }
    for unknown in ["/v1/nope", "/api/nope", "/nope", "/v1/chat/completions", "/api/chat", "/generate"] {
        guarded.push(("POST".into(), unknown.to_string()));
    }
    for (method, path) in &guarded {
        let method = ::reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let response = http.request(method.clone(), server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 401, "{method} {path} without a key");
        let body: serde_json::Value = response.json().await.unwrap();
        if path.starts_with("/v1/messages") {
            // Anthropic's shape.
            assert_eq!((body["type"].as_str(), body["error"]["type"].as_str()), (Some("error"), Some("authentication_error")), "{path}: {body}");
        } else if path.starts_with("/v1/") || path == "/tokenize" || path == "/detokenize" {
            assert_eq!(body["error"]["type"], "authentication_error", "{path}: {body}");
            assert_eq!(body["error"]["code"], "invalid_api_key", "{path}: {body}");
        } else {
            assert!(body["error"].as_str().unwrap().contains("API key"), "{path}: {body}");
        }
        let wrong = http.request(method.clone(), server.url(path)).header("X-API-Key", "wrong-key-000").send().await.unwrap();
        assert_eq!(wrong.status(), 401, "{method} {path} with a wrong key");
        let right = http.request(method.clone(), server.url(path)).header("X-API-Key", "test-key-123").send().await.unwrap();
        assert_ne!(right.status(), 401, "{method} {path} with X-API-Key");
        let bearer = http.request(method.clone(), server.url(path)).bearer_auth("test-key-123").send().await.unwrap();
        assert_ne!(bearer.status(), 401, "{method} {path} with a bearer token");
    }
}

#[tokio::test]
async fn errors_are_json_in_each_family_shape() {
    let home = Home::new();
    let server = {
        let port = crate::common::free_port();
        let child = home
            .command()
            .args(["serve", "--port", &port.to_string()])
            .env("MLXSERVER_MAX_BODY_SIZE", "1KiB")
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let server = ServerProcess { child, port };
        wait_for("the server", Duration::from_secs(30), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        server
    };
    let http = client();

    let response = http.get(server.url("/v1/does-not-exist")).send().await.unwrap();
    assert_eq!(response.status(), 404);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("/v1/does-not-exist"));

    let response = http.get(server.url("/api/does-not-exist")).send().await.unwrap();
    assert_eq!(response.status(), 404);
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(body["error"].is_string(), "{body}");

    let response = http.delete(server.url("/api/version")).send().await.unwrap();
    assert_eq!(response.status(), 405);
    assert!(response.headers().get("allow").is_some());
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"], "method not allowed");

    let response = http.post(server.url("/v1/models")).body(vec![b'x'; 4096]).send().await.unwrap();
    assert_eq!(response.status(), 413);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "payload_too_large", "{body}");
}

#[tokio::test]
async fn a_panicking_handler_becomes_a_500_and_the_server_stays_up() {
    use axum::routing::get;
    let config = mlxserver::config::Config::defaults(std::path::Path::new("/nonexistent"));
    let state = mlxserver::api::AppState::new(config);
    let routes = axum::Router::new()
        .route("/v1/boom", get(|| async { panic!("boom") as &'static str }))
        .route("/api/boom", get(|| async { panic!("boom") as &'static str }))
        .route("/ok", get(|| async { "fine" }));
    let app = mlxserver::api::with_layers(routes, state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let http = client();
    let response = http.get(format!("http://{address}/v1/boom")).send().await.unwrap();
    assert_eq!(response.status(), 500);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "server_error");
    assert!(!body.to_string().contains("boom"), "panic details are not leaked: {body}");
    let response = http.get(format!("http://{address}/api/boom")).send().await.unwrap();
    assert_eq!(response.status(), 500);
    let request_id = response.headers()["x-request-id"].to_str().unwrap().to_string();
    let body: serde_json::Value = response.json().await.unwrap();
    let message = body["error"].as_str().unwrap();
    assert!(message.starts_with("internal server error") && message.contains(&request_id) && !message.contains("boom"), "{body}");
    assert_eq!(http.get(format!("http://{address}/ok")).send().await.unwrap().text().await.unwrap(), "fine");
}

#[tokio::test]
async fn openapi_document_matches_the_checked_in_spec() {
    let home = Home::new();
    let server = ServerProcess::start(&home, &[]);
    let served: serde_json::Value = client().get(server.url("/openapi.json")).send().await.unwrap().json().await.unwrap();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json");
    let checked_in: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).expect("openapi/openapi.json exists")).unwrap();
    assert!(served == checked_in, "openapi/openapi.json is out of date: run scripts/update-openapi.sh");
    assert!(served["components"]["securitySchemes"]["api_key"].is_object());
    assert!(served["components"]["securitySchemes"]["bearer"].is_object());
}

fn chromium() -> Option<String> {
    ["chromium", "chromium-browser", "google-chrome"].iter().map(|name| name.to_string()).find(|name| {
        Command::new(name).arg("--version").output().map(|o| o.status.success()).unwrap_or(false)
    })
}

#[test]
fn swagger_ui_renders_offline_in_headless_chromium() {
    let browser = chromium().expect("chromium is installed by scripts/setup.sh --test");
    let home = Home::new();
    let server = ServerProcess::start(&home, &["--api-key", "doc-key-123"]);
    let html = reqwest::blocking_get(&server.url("/docs"));
    for line in html.lines() {
        assert!(!(line.contains("src=\"http") || line.contains("href=\"http")), "no external asset: {line}");
    }
    let profile = tempfile::tempdir().unwrap();
    let screenshot = crate::common::target_dir().join("swagger-ui.png");
    let _ = std::fs::remove_file(&screenshot);
    let common_flags = [
        "--headless".to_string(),
        "--no-sandbox".into(),
        "--disable-gpu".into(),
        "--disable-quic".into(),
        "--no-first-run".into(),
        "--disable-background-networking".into(),
        "--disable-component-update".into(),
        "--disable-sync".into(),
        format!("--user-data-dir={}", profile.path().display()),
        "--virtual-time-budget=15000".into(),
        "--window-size=1280,1400".into(),
    ];
    let dom = Command::new(&browser).args(&common_flags).arg("--dump-dom").arg(server.url("/docs")).output().unwrap();
    let dom = String::from_utf8_lossy(&dom.stdout);
    // Rendered by swagger-ui-bundle.js from our own server: the spec's title and an operation.
    assert!(dom.contains("swagger-ui"), "swagger UI did not render");
    assert!(dom.contains("mlxserver"), "the spec's title is shown");
    assert!(dom.contains("/api/version"), "operations are listed");
    assert!(dom.contains("Authorize"), "a person can enter the API key");
    let shot = Command::new(&browser).args(&common_flags).arg(format!("--screenshot={}", screenshot.display())).arg(server.url("/docs")).output().unwrap();
    assert!(shot.status.success(), "{}", String::from_utf8_lossy(&shot.stderr));
    let size = std::fs::metadata(&screenshot).map(|m| m.len()).unwrap_or(0);
    assert!(size > 20_000, "screenshot {} has content ({size} bytes)", screenshot.display());
}
