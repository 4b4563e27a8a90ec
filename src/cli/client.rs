//! The CLI's client of a running server: one typed client over the server's own Ollama wire
//! types (`api::ollama_types`), so `run`, `ps` and `show` speak exactly what the server does.

use std::time::Duration;

use futures::{Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::api::ollama_types::{ChatRequest, ChatResponse, ProcessResponse, ShowRequest, ShowResponse};
use crate::config::Config;

/// What went wrong talking to the server: it could not be reached, or it answered an error.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Transport(String),
    #[error("{0}")]
    Server(String),
}

/// A line of a streamed `/api/chat` answer: a piece, or the error that ended it.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ChatLine {
    Error { error: String },
    Piece(Box<ChatResponse>),
}

#[derive(Clone)]
pub struct ServerClient {
    http: reqwest::Client,
    base: String,
    key: Option<String>,
}

impl ServerClient {
    /// A client of the server at the configured address, if one answers there.
    pub async fn connect(config: &Config) -> Option<ServerClient> {
        let http = reqwest::Client::builder().connect_timeout(Duration::from_millis(500)).build().ok()?;
        let client = ServerClient { http, base: config.server_url(), key: config.api_key.clone() };
        let response = client.http.get(format!("{}/health", client.base)).timeout(Duration::from_secs(2)).send().await.ok()?;
        response.status().is_success().then_some(client)
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.base));
        match &self.key {
            Some(key) => request.header("X-API-Key", key),
            None => request,
        }
    }

    async fn send(request: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let response = request.send().await.map_err(|e| ClientError::Transport(e.to_string()))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        let message = body["error"].as_str().or_else(|| body["error"]["message"].as_str()).map(str::to_string).unwrap_or_else(|| status.to_string());
        Err(ClientError::Server(message))
    }

    async fn json<T: DeserializeOwned>(request: reqwest::RequestBuilder) -> Result<T, ClientError> {
        Self::send(request).await?.json().await.map_err(|e| ClientError::Transport(e.to_string()))
    }

    pub async fn show(&self, model: &str) -> Result<ShowResponse, ClientError> {
        Self::json(self.request(reqwest::Method::POST, "/api/show").json(&ShowRequest { model: model.to_string(), ..Default::default() })).await
    }

    pub async fn ps(&self) -> Result<ProcessResponse, ClientError> {
        Self::json(self.request(reqwest::Method::GET, "/api/ps").timeout(Duration::from_secs(5))).await
    }

    /// Loads a model (a chat without messages, as Ollama's clients do).
    pub async fn load(&self, model: &str) -> Result<(), ClientError> {
        let request = ChatRequest { model: model.to_string(), ..Default::default() };
        Self::send(self.request(reqwest::Method::POST, "/api/chat").json(&request)).await.map(drop)
    }

    /// A streamed chat answer, line by line.
    pub async fn chat(&self, request: &ChatRequest) -> Result<impl Stream<Item = Result<ChatLine, ClientError>>, ClientError> {
        let response = Self::send(self.request(reqwest::Method::POST, "/api/chat").json(request)).await?;
        let bytes = response.bytes_stream();
        Ok(async_stream::stream! {
            futures::pin_mut!(bytes);
            let mut buffer = Vec::new();
            while let Some(chunk) = bytes.next().await {
                match chunk {
                    Ok(chunk) => buffer.extend_from_slice(&chunk),
                    Err(error) => {
                        yield Err(ClientError::Transport(error.to_string()));
                        return;
                    }
                }
                while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buffer.drain(..=end).collect();
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    yield serde_json::from_slice::<ChatLine>(&line).map_err(|e| ClientError::Transport(format!("unreadable answer line: {e}")));
                }
            }
        })
    }
}
