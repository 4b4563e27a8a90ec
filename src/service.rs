//! The core every front end shares (the three HTTP API families and the CLI's in-process
//! mode): resolve a model or personality name in the store, take a lease on it from the
//! scheduler, build the prompt (personality SYSTEM, MESSAGEs and parameters applied, the
//! model's chat template rendered), and start generation or embedding on the engine.
//!
//! API modules only translate their wire formats to [`ChatRequest`] / [`CompletionRequest`] /
//! [`Service::embed`] and the resulting [`Generation`] events back.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc::UnboundedReceiver;

use crate::config::{Config, KeepAlive};
use crate::engine::constrain::Grammar;
use crate::engine::template::TemplateMessage;
use crate::engine::tools::{self, ToolCall, ToolChoice, ToolFormat, ToolSpec};
use crate::engine::{
    self, ChatFrontend, Completion, EmbedFrontend, Engine, EngineError, EngineEvent, Frontend, GenerateRequest, ModelKind,
    SamplingParams, TokenLogprob,
};
use crate::i18n::Msg;
use crate::msg;
use crate::rag::{self, Rag, RagError, Source};
use crate::scheduler::{Lease, ModelKey, Scheduler, SchedulerConfig, SchedulerError};
use crate::store::{ModelName, Modelfile, Parameters, Resolved, Store, StoreError};

#[derive(Debug, thiserror::Error)]
#[error("{}", self.msg())]
pub enum ServiceError {
    Store(#[from] StoreError),
    Scheduler(#[from] SchedulerError),
    Engine(#[from] EngineError),
    Rag(#[from] RagError),
    BadRequest(String),
}

impl ServiceError {
    pub fn msg(&self) -> Msg {
        match self {
            ServiceError::Store(error) => error.msg(),
            ServiceError::Scheduler(SchedulerError::Load(error)) => error.msg(),
            ServiceError::Scheduler(SchedulerError::Busy { waiting }) => msg!("service.error.busy", waiting = waiting),
            ServiceError::Scheduler(SchedulerError::ShuttingDown) => msg!("service.error.shutting_down"),
            ServiceError::Engine(error) => error.msg(),
            ServiceError::Rag(error) => error.msg(),
            ServiceError::BadRequest(detail) => msg!("engine.error.bad_request", detail = detail),
        }
    }
}

pub type Result<T> = std::result::Result<T, ServiceError>;

/// One chat turn as the front ends pass it.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// Calls an assistant turn made.
    pub tool_calls: Vec<ToolCall>,
    /// The call a `tool` turn answers.
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into(), tool_calls: Vec::new(), tool_call_id: None }
    }

    fn to_template(&self) -> TemplateMessage {
        let tool_calls = (!self.tool_calls.is_empty()).then(|| {
            serde_json::Value::Array(
                self.tool_calls
                    .iter()
                    .map(|c| serde_json::json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
                    .collect(),
            )
        });
        TemplateMessage { tool_calls, tool_call_id: self.tool_call_id.clone(), ..TemplateMessage::new(&self.role, self.content.clone()) }
    }
}

/// What the answer must look like.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputFormat {
    /// Any JSON object.
    Json,
    /// JSON that validates against this schema.
    JsonSchema(serde_json::Value),
}

/// Request options on top of the personality's parameters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Options {
    /// Defaults of the API family (OpenAI's differ from Ollama's), below the personality's.
    pub defaults: Parameters,
    pub parameters: Parameters,
    /// Report log-probabilities with this many alternatives per token.
    pub logprobs: Option<usize>,
    /// Structured output, enforced by constrained decoding.
    pub format: Option<OutputFormat>,
}

/// Retrieval settings of a request; unset fields take the collection's model and the
/// configured defaults.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize, serde::Serialize, utoipa::ToSchema)]
pub struct RagOptions {
    /// Collection to search (default "default").
    pub collection: Option<String>,
    /// Chunks to retrieve.
    pub top_k: Option<usize>,
    /// Lowest cosine similarity kept.
    pub min_score: Option<f32>,
    /// Embedding model (default: the one the collection was built with).
    pub embedding_model: Option<String>,
}

impl RagOptions {
    /// Reads the `rag` field of a request: `true`, or an object of options.
    pub fn from_value(value: &serde_json::Value) -> std::result::Result<Option<RagOptions>, String> {
        match value {
            serde_json::Value::Null | serde_json::Value::Bool(false) => Ok(None),
            serde_json::Value::Bool(true) => Ok(Some(RagOptions::default())),
            object @ serde_json::Value::Object(_) => serde_json::from_value(object.clone()).map(Some).map_err(|e| format!("invalid rag options: {e}")),
            _ => Err("rag must be true or an object".into()),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub options: Options,
    pub keep_alive: Option<KeepAlive>,
    pub rag: Option<RagOptions>,
    /// Functions the model may call.
    pub tools: Vec<ToolSpec>,
    pub tool_choice: ToolChoice,
}

#[derive(Debug, Clone, Default)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: String,
    /// Overrides the personality's SYSTEM.
    pub system: Option<String>,
    /// Overrides the prompt template (Ollama's `template`).
    pub template: Option<String>,
    /// Send the prompt as is, without any template (OpenAI completions, Ollama `raw`).
    pub raw: bool,
    /// Ollama's `context`: token ids of an earlier exchange to continue from.
    pub context: Vec<u32>,
    pub options: Options,
    pub keep_alive: Option<KeepAlive>,
}

/// A generation in progress. Holding it keeps the model loaded; dropping it cancels.
pub struct Generation {
    pub model: String,
    pub created: SystemTime,
    pub started: Instant,
    pub load_duration: Duration,
    pub prompt_tokens: Vec<u32>,
    /// Chunks retrieved for this answer (empty without RAG).
    pub sources: Vec<Source>,
    events: UnboundedReceiver<EngineEvent>,
    first: Option<EngineEvent>,
    first_token_at: Option<Instant>,
    metrics: crate::metrics::Metrics,
    _lease: Lease<Engine>,
}

/// A whole answer, for non-streaming responses.
#[derive(Debug, Clone)]
pub struct Collected {
    pub text: String,
    pub logprobs: Vec<(String, TokenLogprob)>,
    pub completion: Completion,
}

impl Generation {
    /// The next event; `None` once the engine is done with this sequence.
    pub async fn next(&mut self) -> Option<EngineEvent> {
        let event = match self.first.take() {
            Some(first) => Some(first),
            None => self.events.recv().await,
        };
        match &event {
            Some(EngineEvent::Token { .. }) if self.first_token_at.is_none() => self.first_token_at = Some(Instant::now()),
            Some(EngineEvent::Done(done)) => {
                let ttft = self.first_token_at.map(|at| at.duration_since(self.started));
                self.metrics.generation(done.prompt_tokens, done.completion_tokens, ttft, done.eval);
            }
            _ => {}
        }
        event
    }

    /// Waits for the first event, so errors that happen before any output (e.g. a failed
    /// prompt evaluation) can still become an HTTP status.
    pub async fn start(mut self) -> Result<Generation> {
        match self.events.recv().await {
            Some(EngineEvent::Error(error)) => Err(ServiceError::Engine(error)),
            Some(event) => {
                self.first = Some(event);
                Ok(self)
            }
            None => Err(ServiceError::Engine(EngineError::Stopped)),
        }
    }

    /// Runs to the end and gathers the answer.
    pub async fn collect(mut self, tokenizer: Option<&tokenizers::Tokenizer>) -> Result<Collected> {
        let mut text = String::new();
        let mut logprobs = Vec::new();
        while let Some(event) = self.next().await {
            match event {
                EngineEvent::Token { text: piece, token, logprob } => {
                    text.push_str(&piece);
                    if let Some(logprob) = logprob {
                        let token_text = tokenizer.and_then(|t| t.id_to_token(token)).unwrap_or_default();
                        logprobs.push((token_text, logprob));
                    }
                }
                EngineEvent::Done(completion) => return Ok(Collected { text, logprobs, completion }),
                EngineEvent::Error(error) => return Err(ServiceError::Engine(error)),
            }
        }
        Err(ServiceError::Engine(EngineError::Stopped))
    }
}

/// Embeddings with their token counts.
#[derive(Debug, Clone)]
pub struct Embeddings {
    pub model: String,
    pub vectors: Vec<Vec<f32>>,
    pub prompt_tokens: usize,
    pub load_duration: Duration,
    pub total_duration: Duration,
}

/// Shared by every request handler. Cheap to clone.
#[derive(Clone)]
pub struct Service {
    pub config: Arc<Config>,
    pub store: Store,
    pub engine: Engine,
    pub scheduler: Scheduler<Engine>,
    pub metrics: crate::metrics::Metrics,
    rag: Arc<tokio::sync::OnceCell<Rag>>,
}

impl Service {
    /// Starts the engine thread and the scheduler (needs a tokio runtime).
    pub fn start(config: Config) -> Service {
        let store = Store::new(config.models_dir.clone());
        store.clean_partials();
        let engine = Engine::start(config.engine.clone());
        let scheduler = Scheduler::new(
            engine.clone(),
            SchedulerConfig {
                default_keep_alive: config.keep_alive,
                max_loaded_models: config.max_loaded_models,
                memory_limit: config.memory_limit.bytes(),
                max_queue: config.max_queue,
            },
        );
        Service { config: Arc::new(config), store, engine, scheduler, metrics: Default::default(), rag: Arc::new(tokio::sync::OnceCell::new()) }
    }

    /// Unloads every model and stops the engine.
    pub async fn shutdown(&self) {
        self.scheduler.shutdown().await;
        let engine = self.engine.clone();
        let _ = tokio::task::spawn_blocking(move || engine.shutdown()).await;
    }

    /// The document index, opened on first use.
    pub async fn rag(&self) -> Result<&Rag> {
        Ok(self.rag.get_or_try_init(|| Rag::open(&self.config.rag.uri)).await?)
    }

    /// Retrieves the chunks relevant to `question` from a collection.
    pub async fn retrieve(&self, options: &RagOptions, question: &str) -> Result<Vec<Source>> {
        let collection = options.collection.clone().unwrap_or_else(|| rag::DEFAULT_COLLECTION.to_string());
        rag::check_collection(&collection)?;
        let index = self.rag().await?;
        let model = match &options.embedding_model {
            Some(model) => model.clone(),
            None => index.model_of(&collection).await?,
        };
        let (lease, frontend) = self.embedding_model(&model).await?;
        let vector = self.embed_with(&lease, &frontend, &[question.to_string()]).await?.pop().unwrap_or_default();
        let top_k = options.top_k.unwrap_or(self.config.rag.top_k).clamp(1, 100);
        let min_score = options.min_score.unwrap_or(self.config.rag.min_score);
        Ok(index.search(&collection, &ModelName::parse(&model).map(|n| n.to_string()).unwrap_or(model), vector, top_k, min_score).await?)
    }

    pub fn resolve(&self, name: &str) -> Result<Resolved> {
        Ok(self.store.resolve(name)?)
    }

    fn key(resolved: &Resolved) -> ModelKey {
        ModelKey { name: resolved.base.manifest.name.clone(), path: resolved.base.entry_path() }
    }

    /// Loads a model (if needed) and returns its lease; `keep_alive` applies when it ends.
    pub async fn lease(&self, resolved: &Resolved, keep_alive: Option<KeepAlive>) -> Result<Lease<Engine>> {
        Ok(self.scheduler.acquire(&Self::key(resolved), keep_alive).await?)
    }

    /// Unloads a model now (Ollama's empty prompt with `keep_alive: 0`).
    pub async fn unload(&self, resolved: &Resolved) -> bool {
        self.scheduler.unload(&resolved.base.entry_path()).await
    }

    async fn chat_lease(&self, resolved: &Resolved, keep_alive: Option<KeepAlive>) -> Result<(Lease<Engine>, Arc<ChatFrontend>)> {
        if resolved.base.manifest.kind != ModelKind::Chat {
            return Err(EngineError::WrongKind { expected: ModelKind::Chat }.into());
        }
        let lease = self.lease(resolved, keep_alive).await?;
        let Frontend::Chat(frontend) = lease.model.frontend.clone() else {
            return Err(EngineError::WrongKind { expected: ModelKind::Chat }.into());
        };
        Ok((lease, frontend))
    }

    /// The messages a personality adds around a request's: its SYSTEM (unless the request
    /// brings one) and its MESSAGE few-shots.
    pub fn compose_messages(modelfile: &Modelfile, messages: &[ChatMessage]) -> Vec<TemplateMessage> {
        let mut composed = Vec::with_capacity(messages.len() + modelfile.messages.len() + 1);
        let request_system = messages.iter().any(|m| m.role == "system");
        if !request_system {
            if let Some(system) = &modelfile.system {
                composed.push(TemplateMessage::new("system", system.clone()));
            }
        }
        let mut rest = messages.iter().peekable();
        while let Some(message) = rest.next_if(|m| m.role == "system") {
            composed.push(message.to_template());
        }
        composed.extend(modelfile.messages.iter().map(|m| TemplateMessage::new(&m.role, m.content.clone())));
        composed.extend(rest.map(ChatMessage::to_template));
        composed
    }

    /// Renders messages with the personality's TEMPLATE when it has one, else the model's.
    fn render_chat(frontend: &ChatFrontend, modelfile: &Modelfile, messages: &[TemplateMessage], tools: Option<&serde_json::Value>) -> Result<String> {
        match &modelfile.template {
            Some(template) if !template.trim().is_empty() => Ok(render_custom_template(frontend, template, messages)?),
            _ => Ok(frontend.template.render(messages, true, tools)?),
        }
    }

    /// Puts the offered tools and earlier calls into the conversation the way the template
    /// can take them, and returns the `tools` value for the template (None when the template
    /// knows no tools and they went into the system prompt) and the call format to expect.
    fn prepare_tools(frontend: &ChatFrontend, modelfile: &Modelfile, messages: &mut Vec<TemplateMessage>, offered: &[ToolSpec]) -> (Option<serde_json::Value>, ToolFormat) {
        let own_template = modelfile.template.as_ref().is_none_or(|t| t.trim().is_empty());
        let source = &frontend.template.source;
        if own_template && !frontend.template.is_fallback && source.contains("tools") {
            let value = (!offered.is_empty()).then(|| tools::template_tools(offered));
            (value, ToolFormat::of_template(source))
        } else {
            tools::inline_for_plain_template(messages, offered);
            (None, ToolFormat::Hermes)
        }
    }

    /// The grammar the answer must follow: a forced tool call, else the output format.
    fn grammar_for(request: &ChatRequest, offered: &[ToolSpec], format: ToolFormat) -> Result<Option<Grammar>> {
        match &request.tool_choice {
            ToolChoice::Required if !offered.is_empty() => Ok(Some(format.forced_call(offered))),
            ToolChoice::Required => Err(ServiceError::BadRequest("tool_choice is required but no tools were given".into())),
            ToolChoice::Named(name) => match offered.iter().find(|t| &t.name == name) {
                Some(tool) => Ok(Some(format.forced_call(std::slice::from_ref(tool)))),
                None => Err(ServiceError::BadRequest(format!("tool_choice names '{name}', which is not among the tools"))),
            },
            _ => Ok(output_grammar(&request.options.format)),
        }
    }

    fn sampling(parameters: &Parameters) -> SamplingParams {
        let defaults = SamplingParams::default();
        SamplingParams {
            temperature: parameters.temperature.unwrap_or(defaults.temperature),
            top_k: parameters.top_k.unwrap_or(defaults.top_k),
            top_p: parameters.top_p.unwrap_or(defaults.top_p),
            min_p: parameters.min_p.unwrap_or(defaults.min_p),
            repeat_penalty: parameters.repeat_penalty.unwrap_or(defaults.repeat_penalty),
            repeat_last_n: match parameters.repeat_last_n {
                Some(n) if n < 0 => usize::MAX,
                Some(n) => n as usize,
                None => defaults.repeat_last_n,
            },
            presence_penalty: parameters.presence_penalty.unwrap_or(defaults.presence_penalty),
            frequency_penalty: parameters.frequency_penalty.unwrap_or(defaults.frequency_penalty),
            seed: parameters.seed,
        }
    }

    /// The parameters in force: the personality's, then the request's on top.
    fn effective_parameters(modelfile: &Modelfile, options: &Options) -> Parameters {
        let mut parameters = options.defaults.clone();
        parameters.overlay(&modelfile.parameters);
        parameters.overlay(&options.parameters);
        parameters
    }

    fn engine_request(&self, prompt_tokens: Vec<u32>, frontend: &ChatFrontend, parameters: &Parameters, logprobs: Option<usize>, grammar: Option<Grammar>) -> Result<GenerateRequest> {
        // As in Ollama, a request that sets no num_ctx gets a bounded window rather than the
        // model's whole context (which also bounds a small model that never stops).
        let context = parameters.num_ctx.unwrap_or(self.config.context_length).min(frontend.context_length);
        if prompt_tokens.len() >= context {
            return Err(EngineError::ContextOverflow { prompt: prompt_tokens.len(), limit: context }.into());
        }
        let max_tokens = match parameters.num_predict {
            Some(n) if n >= 0 => Some(n as usize),
            _ => None,
        };
        Ok(GenerateRequest {
            prompt_tokens,
            sampling: Self::sampling(parameters),
            max_tokens,
            context_length: Some(context),
            stop: parameters.stop.clone(),
            logprobs,
            grammar,
        })
    }

    async fn run(&self, resolved: &Resolved, lease: Lease<Engine>, request: GenerateRequest, started: Instant, sources: Vec<Source>) -> Result<Generation> {
        let prompt_tokens = request.prompt_tokens.clone();
        let events = self.engine.generate(lease.id, request)?;
        Generation {
            model: resolved.name.clone(),
            created: SystemTime::now(),
            started,
            load_duration: lease.load_duration,
            prompt_tokens,
            sources,
            events,
            first: None,
            first_token_at: None,
            metrics: self.metrics.clone(),
            _lease: lease,
        }
        .start()
        .await
    }

    /// Starts a chat answer.
    pub async fn chat(&self, request: ChatRequest) -> Result<(Generation, Arc<ChatFrontend>)> {
        let started = Instant::now();
        let resolved = self.resolve(&request.model)?;
        if request.messages.is_empty() {
            return Err(ServiceError::BadRequest("messages must not be empty".into()));
        }
        let modelfile = resolved.effective();
        let sources = match &request.rag {
            Some(options) => {
                let question = request.messages.iter().rev().find(|m| m.role == "user").map(|m| m.content.clone()).unwrap_or_default();
                self.retrieve(options, &question).await?
            }
            None => Vec::new(),
        };
        let (lease, frontend) = self.chat_lease(&resolved, request.keep_alive).await?;
        let mut messages = Self::compose_messages(&modelfile, &request.messages);
        if request.rag.is_some() {
            inject_sources(&mut messages, &sources);
        }
        let offered: &[ToolSpec] = if request.tool_choice == ToolChoice::None { &[] } else { &request.tools };
        let (template_tools, tool_format) = Self::prepare_tools(&frontend, &modelfile, &mut messages, offered);
        let grammar = Self::grammar_for(&request, offered, tool_format)?;
        let prompt = Self::render_chat(&frontend, &modelfile, &messages, template_tools.as_ref())?;
        let tokens = frontend.encode_prompt(&prompt)?;
        let parameters = Self::effective_parameters(&modelfile, &request.options);
        let engine_request = self.engine_request(tokens, &frontend, &parameters, request.options.logprobs, grammar)?;
        let generation = self.run(&resolved, lease, engine_request, started, sources).await?;
        Ok((generation, frontend))
    }

    /// Starts a completion of a prompt (templated unless `raw`).
    pub async fn complete(&self, request: CompletionRequest) -> Result<(Generation, Arc<ChatFrontend>)> {
        let started = Instant::now();
        let resolved = self.resolve(&request.model)?;
        let mut modelfile = resolved.effective();
        if let Some(system) = &request.system {
            modelfile.system = Some(system.clone());
        }
        if let Some(template) = &request.template {
            modelfile.template = Some(template.clone());
        }
        let (lease, frontend) = self.chat_lease(&resolved, request.keep_alive).await?;
        let mut tokens = request.context.clone();
        if request.raw {
            tokens.extend(engine::tokenizer::encode(&frontend.tokenizer, &request.prompt)?);
            if tokens.is_empty() {
                return Err(ServiceError::BadRequest("the prompt is empty".into()));
            }
            if request.context.is_empty() && frontend.add_bos {
                if let Some((bos, _)) = &frontend.bos_token {
                    tokens.insert(0, *bos);
                }
            }
        } else {
            let messages = Self::compose_messages(&modelfile, &[ChatMessage::new("user", request.prompt.clone())]);
            let prompt = Self::render_chat(&frontend, &modelfile, &messages, None)?;
            if request.context.is_empty() {
                tokens = frontend.encode_prompt(&prompt)?;
            } else {
                tokens.extend(engine::tokenizer::encode(&frontend.tokenizer, &prompt)?);
            }
        }
        let parameters = Self::effective_parameters(&modelfile, &request.options);
        let grammar = output_grammar(&request.options.format);
        let engine_request = self.engine_request(tokens, &frontend, &parameters, request.options.logprobs, grammar)?;
        let generation = self.run(&resolved, lease, engine_request, started, Vec::new()).await?;
        Ok((generation, frontend))
    }

    /// Loads an embedding model and returns its lease and frontend (the lease keeps it
    /// loaded for a whole batch job such as indexing documents).
    pub async fn embedding_model(&self, model: &str) -> Result<(Lease<Engine>, Arc<EmbedFrontend>)> {
        let resolved = self.resolve(model)?;
        if resolved.base.manifest.kind != ModelKind::Embedding {
            return Err(EngineError::WrongKind { expected: ModelKind::Embedding }.into());
        }
        let lease = self.lease(&resolved, None).await?;
        let Frontend::Embedding(frontend) = lease.model.frontend.clone() else {
            return Err(EngineError::WrongKind { expected: ModelKind::Embedding }.into());
        };
        Ok((lease, frontend))
    }

    /// Embeds texts with a model already leased (inputs are truncated to its window).
    pub async fn embed_with(&self, lease: &Lease<Engine>, frontend: &EmbedFrontend, inputs: &[String]) -> Result<Vec<Vec<f32>>> {
        let tokenized = tokenize_for_embedding(frontend, inputs, true)?;
        Ok(self.engine.embed(lease.id, tokenized).await?)
    }

    /// Embeds `inputs` with an embedding model. Without `truncate`, an input longer than the
    /// model's window is an error instead of being cut.
    pub async fn embed(&self, model: &str, inputs: &[String], truncate: bool, keep_alive: Option<KeepAlive>) -> Result<Embeddings> {
        let started = Instant::now();
        let resolved = self.resolve(model)?;
        if resolved.base.manifest.kind != ModelKind::Embedding {
            return Err(EngineError::WrongKind { expected: ModelKind::Embedding }.into());
        }
        let lease = self.lease(&resolved, keep_alive).await?;
        let Frontend::Embedding(frontend) = lease.model.frontend.clone() else {
            return Err(EngineError::WrongKind { expected: ModelKind::Embedding }.into());
        };
        let tokenized = tokenize_for_embedding(&frontend, inputs, truncate)?;
        let prompt_tokens = tokenized.iter().map(Vec::len).sum();
        let vectors = self.engine.embed(lease.id, tokenized).await?;
        Ok(Embeddings { model: resolved.name.clone(), vectors, prompt_tokens, load_duration: lease.load_duration, total_duration: started.elapsed() })
    }

    /// The models directory, for handlers that write into the store.
    pub fn models_dir(&self) -> PathBuf {
        self.config.models_dir.clone()
    }
}

/// Puts retrieved chunks into the conversation: appended to the system message, or as one.
fn output_grammar(format: &Option<OutputFormat>) -> Option<Grammar> {
    match format {
        Some(OutputFormat::Json) => Some(Grammar::JsonObject),
        Some(OutputFormat::JsonSchema(schema)) => Some(Grammar::JsonSchema(schema.clone())),
        None => None,
    }
}

fn inject_sources(messages: &mut Vec<TemplateMessage>, sources: &[Source]) {
    let context = if sources.is_empty() {
        "No document in the index matched this question; say that the documents do not cover it if you cannot answer from general knowledge.".to_string()
    } else {
        rag::context_message(sources)
    };
    match messages.iter_mut().find(|m| m.role == "system") {
        Some(system) => {
            system.content.push_str("\n\n");
            system.content.push_str(&context);
        }
        None => messages.insert(0, TemplateMessage::new("system", context)),
    }
}

fn tokenize_for_embedding(frontend: &EmbedFrontend, inputs: &[String], truncate: bool) -> Result<Vec<Vec<u32>>> {
    let mut all = Vec::with_capacity(inputs.len());
    for input in inputs {
        let encoding = frontend.tokenizer.encode(input.as_str(), true).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        if !truncate && !encoding.get_overflowing().is_empty() {
            return Err(ServiceError::BadRequest(format!(
                "an input is longer than the model's {} tokens and truncate is false",
                frontend.max_tokens
            )));
        }
        all.push(encoding.get_ids().to_vec());
    }
    Ok(all)
}

/// Ollama-style TEMPLATE of a personality: either Jinja (used as the chat template) or a
/// Go-template subset: `{{ .System }}`, `{{ .Prompt }}`, `{{ .Response }}` and
/// `{{ if .System }}…{{ end }}`. Earlier turns are rendered in sequence, as Ollama does for
/// templates without a `.Messages` loop.
fn render_custom_template(frontend: &ChatFrontend, template: &str, messages: &[TemplateMessage]) -> Result<String> {
    if template.contains("{%") || template.contains("messages") {
        let custom = engine::template::ChatTemplate::new(Some(template.to_string()), frontend.bos_token.as_ref().map(|b| b.1.as_str()).unwrap_or(""), "")?;
        return Ok(custom.render(messages, true, None)?);
    }
    let system = messages.iter().filter(|m| m.role == "system").map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n");
    let mut out = String::new();
    let mut pending_prompt: Option<&str> = None;
    let turns: Vec<&TemplateMessage> = messages.iter().filter(|m| m.role != "system").collect();
    let mut first = true;
    for message in &turns {
        match message.role.as_str() {
            "assistant" => {
                out.push_str(&fill_go_template(template, if first { &system } else { "" }, pending_prompt.unwrap_or(""), &message.content));
                pending_prompt = None;
                first = false;
            }
            _ => {
                if let Some(prompt) = pending_prompt {
                    out.push_str(&fill_go_template(template, if first { &system } else { "" }, prompt, ""));
                    first = false;
                }
                pending_prompt = Some(message.content.as_str());
            }
        }
    }
    if let Some(prompt) = pending_prompt {
        out.push_str(&fill_go_template(template, if first { &system } else { "" }, prompt, ""));
    }
    Ok(out)
}

fn fill_go_template(template: &str, system: &str, prompt: &str, response: &str) -> String {
    let mut text = template.to_string();
    for (field, value) in [("System", system), ("Prompt", prompt), ("Response", response)] {
        // {{ if .Field }}...{{ end }}
        loop {
            let Some(start) = find_tag(&text, &format!("if .{field}")) else { break };
            let (open_start, open_end) = start;
            let Some((end_start, end_end)) = find_tag(&text[open_end..], "end").map(|(s, e)| (s + open_end, e + open_end)) else { break };
            let inner = text[open_end..end_start].to_string();
            let replacement = if value.is_empty() { String::new() } else { inner };
            text.replace_range(open_start..end_end, &replacement);
        }
        for spelling in [format!("{{{{ .{field} }}}}"), format!("{{{{.{field}}}}}")] {
            text = text.replace(&spelling, value);
        }
    }
    text
}

/// Finds `{{ body }}` (any spacing, `{{-` trims too) and returns its byte range.
fn find_tag(text: &str, body: &str) -> Option<(usize, usize)> {
    let mut from = 0;
    while let Some(offset) = text[from..].find("{{") {
        let start = from + offset;
        let end = text[start..].find("}}")? + start + 2;
        let inner = text[start + 2..end - 2].trim_matches(|c: char| c == '-' || c.is_whitespace());
        if inner == body {
            return Some((start, end));
        }
        from = end;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn personality_system_and_few_shots_are_placed_around_the_request() {
        let modelfile = Modelfile {
            from: "base".into(),
            system: Some("be a cat".into()),
            messages: vec![crate::store::modelfile::Message { role: "user".into(), content: "hi".into() }, crate::store::modelfile::Message { role: "assistant".into(), content: "nyan".into() }],
            ..Default::default()
        };
        let composed = Service::compose_messages(&modelfile, &[ChatMessage::new("user", "hello")]);
        let roles: Vec<&str> = composed.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user"]);
        assert_eq!(composed[0].content, "be a cat");
        // A request's own system message wins.
        let composed = Service::compose_messages(&modelfile, &[ChatMessage::new("system", "be a dog"), ChatMessage::new("user", "hello")]);
        assert_eq!(composed[0].content, "be a dog");
        assert_eq!(composed.iter().filter(|m| m.role == "system").count(), 1);
    }

    #[test]
    fn go_template_subset() {
        let template = "{{ if .System }}<<SYS>>{{ .System }}<</SYS>>{{ end }}[INST] {{ .Prompt }} [/INST]{{ .Response }}";
        assert_eq!(fill_go_template(template, "sys", "hi", ""), "<<SYS>>sys<</SYS>>[INST] hi [/INST]");
        assert_eq!(fill_go_template(template, "", "hi", "yo"), "[INST] hi [/INST]yo");
    }
}
