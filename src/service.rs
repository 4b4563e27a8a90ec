//! The service behind every front end (the HTTP API families and the CLI's in-process
//! mode): it holds the store, the scheduler and the engine, resolves a model or personality
//! name, takes a lease on the model, has the prompt composed ([`crate::answer::prompt`]),
//! runs it on the engine and hands back an [`Answer`]. It implements the
//! [`Backend`](crate::answer::Backend) the handlers call and the
//! [`Embedder`](crate::rag::Embedder) that indexing uses.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc::Receiver;

pub use crate::answer::{
    ChatMessage, ChatRequest, CompletionRequest, EmbedRequest, Embeddings, Options, OutputFormat, RagOptions, Result, ServiceError,
};
use crate::answer::prompt;
use crate::answer::stream::{answer_events, prompt_opens_thinking, Shaping};
use crate::answer::{Answer, Backend, Relevance, TokenizeInput, Tokenized};
use crate::config::{Config, KeepAlive};
use crate::engine::constrain::Grammar;
use crate::engine::{self, ChatFrontend, EmbedFrontend, Engine, EngineError, EngineEvent, Frontend, GenerateRequest, ModelKind};
use crate::rag::{self, EmbedderError, EmbeddingSession, Rag, Source};
use crate::scheduler::{Lease, ModelKey, Scheduler, SchedulerConfig};
use crate::store::{ModelName, Parameters, Resolved, Store};

/// The engine's events of one generation. Holding it keeps the model loaded; dropping it
/// cancels the generation.
struct Generation {
    model: String,
    started: Instant,
    events: Receiver<EngineEvent>,
    first_token_at: Option<Instant>,
    metrics: crate::metrics::Metrics,
    _lease: Lease<Engine>,
    _admission: tokio::sync::OwnedSemaphorePermit,
}

impl Generation {
    async fn next(&mut self) -> Option<EngineEvent> {
        let event = self.events.recv().await;
        match &event {
            Some(EngineEvent::Token { .. }) if self.first_token_at.is_none() => self.first_token_at = Some(Instant::now()),
            Some(EngineEvent::Done(done)) => {
                let ttft = self.first_token_at.map(|at| at.duration_since(self.started));
                self.metrics.generation(&self.model, done.prompt_tokens, done.completion_tokens, ttft, done.eval);
            }
            _ => {}
        }
        event
    }

    /// The events as a stream, starting with one already taken.
    fn into_stream(self, first: EngineEvent) -> impl futures::Stream<Item = EngineEvent> + Send + 'static {
        futures::stream::once(async move { first }).chain(futures::stream::unfold(self, |mut generation| async move {
            generation.next().await.map(|event| (event, generation))
        }))
    }
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
    /// One permit per answer in flight: the engine's batch plus `max_queue` waiting.
    admissions: Arc<tokio::sync::Semaphore>,
}

/// Answers allowed in flight: the engine's batch plus `max_queue` waiting for a place in it.
fn admission_capacity(config: &Config) -> usize {
    config.engine.max_batch.max(1) + config.max_queue
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
        let admissions = Arc::new(tokio::sync::Semaphore::new(admission_capacity(&config)));
        Service { config: Arc::new(config), store, engine, scheduler, metrics: Default::default(), rag: Arc::new(tokio::sync::OnceCell::new()), admissions }
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
        let model = ModelName::parse(&model).map(|n| n.to_string()).unwrap_or(model);
        let words = options.hybrid.unwrap_or(self.config.rag.hybrid).then_some(question);
        let Some(reranker) = &self.config.rag.rerank_model else {
            return Ok(index.search(&collection, &model, vector, words, top_k, min_score).await?);
        };
        // A reranker sees more candidates than will be kept, and decides which stay.
        let candidates = index.search(&collection, &model, vector, words, (top_k * 4).min(100), min_score).await?;
        if candidates.is_empty() {
            return Ok(candidates);
        }
        let texts: Vec<String> = candidates.iter().map(|c| c.text.clone()).collect();
        let relevance = self.rerank(reranker, question, &texts).await?;
        let mut ranked: Vec<(f32, Source)> = relevance.scores.into_iter().zip(candidates).collect();
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
        Ok(ranked
            .into_iter()
            .take(top_k)
            .enumerate()
            .map(|(position, (score, source))| Source { index: position + 1, score, ..source })
            .collect())
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

    fn engine_request(&self, prompt_tokens: Vec<u32>, frontend: &ChatFrontend, parameters: &Parameters, logprobs: Option<usize>, grammar: Option<Grammar>) -> Result<GenerateRequest> {
        let context = prompt::context_window(parameters, self.config.context_length, frontend.context_length);
        if prompt_tokens.len() >= context {
            return Err(EngineError::ContextOverflow { prompt: prompt_tokens.len(), limit: context }.into());
        }
        let max_tokens = match parameters.num_predict {
            Some(n) if n >= 0 => Some(n as usize),
            _ => None,
        };
        Ok(GenerateRequest {
            prompt_tokens,
            sampling: prompt::sampling(parameters),
            max_tokens,
            context_length: Some(context),
            stop: parameters.stop.clone(),
            logprobs,
            grammar,
        })
    }

    /// Answers being generated or waiting for a place in the engine's batch.
    pub fn in_flight(&self) -> usize {
        admission_capacity(&self.config) - self.admissions.available_permits()
    }

    /// Starts generating and waits for the first event, so errors that happen before any
    /// output (a failed prompt evaluation, say) still become an HTTP status.
    async fn run(&self, resolved: &Resolved, lease: Lease<Engine>, request: GenerateRequest, started: Instant, sources: Option<Vec<Source>>, shaping: Shaping) -> Result<Answer> {
        let prompt_tokens = request.prompt_tokens.clone();
        let load_duration = lease.load_duration;
        let admission = self.admissions.clone().try_acquire_owned().map_err(|_| ServiceError::Overloaded { in_flight: self.in_flight() })?;
        let events = self.engine.generate(lease.id, request)?;
        let mut generation = Generation { model: resolved.name.clone(), started, events, first_token_at: None, metrics: self.metrics.clone(), _lease: lease, _admission: admission };
        let first = match generation.next().await {
            Some(EngineEvent::Error(error)) => return Err(ServiceError::Engine(error)),
            Some(event) => event,
            None => return Err(ServiceError::Engine(EngineError::Stopped)),
        };
        let events = answer_events(generation.into_stream(first), shaping);
        Ok(Answer::new(resolved.name.clone(), load_duration, prompt_tokens, sources, Box::pin(events)).started_at(started))
    }

    /// Starts a chat answer.
    pub async fn chat(&self, request: ChatRequest) -> Result<Answer> {
        let started = Instant::now();
        let resolved = self.resolve(&request.model)?;
        if request.messages.is_empty() {
            return Err(ServiceError::BadRequest("messages must not be empty".into()));
        }
        let modelfile = resolved.effective();
        let sources = match &request.rag {
            Some(options) => {
                let question = request.messages.iter().rev().find(|m| m.role == "user").map(|m| m.content.clone()).unwrap_or_default();
                Some(self.retrieve(options, &question).await?)
            }
            None => None,
        };
        let (lease, frontend) = self.chat_lease(&resolved, request.keep_alive).await?;
        let mut messages = prompt::compose_messages(&modelfile, &request.messages);
        if let Some(sources) = &sources {
            prompt::inject_sources(&mut messages, sources);
        }
        let offered = prompt::offered_tools(&request).to_vec();
        let (template_tools, tool_format) = prompt::prepare_tools(&frontend, &modelfile, &mut messages, &offered);
        let grammar = prompt::grammar_for(&request, &offered, tool_format)?;
        let text = prompt::render_chat(&frontend, &modelfile, &messages, template_tools.as_ref(), request.think)?;
        let tokens = frontend.encode_prompt(&text)?;
        let parameters = prompt::effective_parameters(&modelfile, &request.options);
        let engine_request = self.engine_request(tokens, &frontend, &parameters, request.options.logprobs, grammar)?;
        let reasoning = modelfile.template.as_ref().is_none_or(|t| t.trim().is_empty()) && frontend.template.source.contains("<think>");
        let shaping = Shaping { tokenizer: Some(frontend.tokenizer.clone()), tools: offered, reasoning, starts_thinking: reasoning && prompt_opens_thinking(&text) };
        self.run(&resolved, lease, engine_request, started, sources, shaping).await
    }

    /// Starts a completion of a prompt (templated unless `raw`).
    pub async fn complete(&self, request: CompletionRequest) -> Result<Answer> {
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
            let messages = prompt::compose_messages(&modelfile, &[ChatMessage::new("user", request.prompt.clone())]);
            let prompt = prompt::render_chat(&frontend, &modelfile, &messages, None, None)?;
            if request.context.is_empty() {
                tokens = frontend.encode_prompt(&prompt)?;
            } else {
                tokens.extend(engine::tokenizer::encode(&frontend.tokenizer, &prompt)?);
            }
        }
        let mut parameters = prompt::effective_parameters(&modelfile, &request.options);
        if parameters.num_predict.is_none() {
            parameters.num_predict = request.options.family.completion_max_tokens();
        }
        let grammar = prompt::output_grammar(&request.options.format);
        let engine_request = self.engine_request(tokens, &frontend, &parameters, request.options.logprobs, grammar)?;
        let shaping = Shaping { tokenizer: Some(frontend.tokenizer.clone()), tools: Vec::new(), reasoning: false, starts_thinking: false };
        self.run(&resolved, lease, engine_request, started, None, shaping).await
    }

    /// Loads an embedding model and returns its lease and frontend (the lease keeps it
    /// loaded for a whole batch job such as indexing documents).
    pub async fn embedding_model(&self, model: &str) -> Result<(Lease<Engine>, Arc<EmbedFrontend>)> {
        let (_, lease, frontend) = self.leased_embedder(model, None).await?;
        Ok((lease, frontend))
    }

    /// The resolved name, lease and frontend of an embedding model.
    async fn leased_embedder(&self, model: &str, keep_alive: Option<KeepAlive>) -> Result<(String, Lease<Engine>, Arc<EmbedFrontend>)> {
        let resolved = self.resolve(model)?;
        if resolved.base.manifest.kind != ModelKind::Embedding {
            return Err(EngineError::WrongKind { expected: ModelKind::Embedding }.into());
        }
        let lease = self.lease(&resolved, keep_alive).await?;
        let Frontend::Embedding(frontend) = lease.model.frontend.clone() else {
            return Err(EngineError::WrongKind { expected: ModelKind::Embedding }.into());
        };
        Ok((resolved.name, lease, frontend))
    }

    /// Embeds texts with a model already leased (inputs are truncated to its window).
    pub async fn embed_with(&self, lease: &Lease<Engine>, frontend: &EmbedFrontend, inputs: &[String]) -> Result<Vec<Vec<f32>>> {
        let tokenized = tokenize_for_embedding(frontend, inputs, true)?;
        Ok(self.engine.embed(lease.id, tokenized).await?)
    }

    /// Embeds `inputs` with an embedding model. Without `truncate`, an input longer than the
    /// model's window is an error instead of being cut.
    pub async fn embed(&self, request: EmbedRequest) -> Result<Embeddings> {
        let started = Instant::now();
        let (name, lease, frontend) = self.leased_embedder(&request.model, request.keep_alive).await?;
        let tokenized = tokenize_for_embedding(&frontend, &request.inputs, request.truncate)?;
        let prompt_tokens = tokenized.iter().map(Vec::len).sum();
        let vectors = self.engine.embed(lease.id, tokenized).await?;
        Ok(Embeddings { model: name, vectors, prompt_tokens, load_duration: lease.load_duration, total_duration: started.elapsed() })
    }

    /// Token ids of a text or of a rendered chat, with each token's text.
    pub async fn tokenize(&self, model: &str, input: TokenizeInput) -> Result<Tokenized> {
        let resolved = self.resolve(model)?;
        let lease = self.lease(&resolved, None).await?;
        let (tokenizer, max_context, tokens) = match (&lease.model.frontend, input) {
            (Frontend::Chat(frontend), TokenizeInput::Text { text, add_special_tokens }) => {
                let mut tokens = engine::tokenizer::encode(&frontend.tokenizer, &text)?;
                if add_special_tokens && frontend.add_bos {
                    if let Some((bos, _)) = &frontend.bos_token {
                        tokens.insert(0, *bos);
                    }
                }
                (frontend.tokenizer.clone(), frontend.context_length, tokens)
            }
            (Frontend::Chat(frontend), TokenizeInput::Chat { messages, tools, add_generation_prompt }) => {
                let modelfile = resolved.effective();
                let mut composed = prompt::compose_messages(&modelfile, &messages);
                let (template_tools, _) = prompt::prepare_tools(frontend, &modelfile, &mut composed, &tools);
                let text = match &modelfile.template {
                    Some(template) if !template.trim().is_empty() => prompt::render_chat(frontend, &modelfile, &composed, None, None)?,
                    _ => frontend.template.render(&composed, add_generation_prompt, template_tools.as_ref())?,
                };
                (frontend.tokenizer.clone(), frontend.context_length, frontend.encode_prompt(&text)?)
            }
            (Frontend::Embedding(frontend), TokenizeInput::Text { text, add_special_tokens }) => {
                let encoding = frontend.tokenizer.encode(text.as_str(), add_special_tokens).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
                (frontend.tokenizer.clone(), frontend.max_tokens, encoding.get_ids().to_vec())
            }
            (Frontend::Embedding(_), TokenizeInput::Chat { .. }) => {
                return Err(ServiceError::BadRequest("an embedding model has no chat template; send a prompt".into()));
            }
        };
        let pieces = tokens.iter().map(|&id| tokenizer.decode(&[id], false).unwrap_or_default()).collect();
        Ok(Tokenized { model: resolved.name.clone(), tokens, pieces, max_context })
    }

    /// The text of token ids (special tokens kept, so a tokenize round trip is exact).
    pub async fn detokenize(&self, model: &str, tokens: &[u32]) -> Result<String> {
        let resolved = self.resolve(model)?;
        let lease = self.lease(&resolved, None).await?;
        let tokenizer = match &lease.model.frontend {
            Frontend::Chat(frontend) => frontend.tokenizer.clone(),
            Frontend::Embedding(frontend) => frontend.tokenizer.clone(),
        };
        if let Some(bad) = tokens.iter().find(|&&id| tokenizer.id_to_token(id).is_none()) {
            return Err(ServiceError::BadRequest(format!("token id {bad} is not in the model's vocabulary")));
        }
        tokenizer.decode(tokens, false).map_err(|e| EngineError::Tokenizer(e.to_string()).into())
    }

    /// Relevance of each document to the query: a cross-encoder's score (its logit through
    /// a sigmoid, as sentence-transformers' CrossEncoder reports it), or the cosine
    /// similarity of an embedding model's vectors.
    pub async fn rerank(&self, model: &str, query: &str, documents: &[String]) -> Result<Relevance> {
        if documents.is_empty() {
            return Err(ServiceError::BadRequest("documents must not be empty".into()));
        }
        let (name, lease, frontend) = self.leased_embedder(model, None).await?;
        if frontend.cross_encoder {
            let pairs = documents.iter().map(|document| frontend.encode_pair(query, document)).collect::<std::result::Result<Vec<_>, _>>()?;
            let tokens = pairs.iter().map(|pair| pair.ids.len()).sum();
            let logits = self.engine.score_pairs(lease.id, pairs).await?;
            let scores = logits.into_iter().map(|logit| 1.0 / (1.0 + (-logit).exp())).collect();
            return Ok(Relevance { model: name, scores, tokens });
        }
        let mut inputs = Vec::with_capacity(documents.len() + 1);
        inputs.push(query.to_string());
        inputs.extend(documents.iter().cloned());
        let tokenized = tokenize_for_embedding(&frontend, &inputs, true)?;
        let tokens = tokenized.iter().map(Vec::len).sum();
        let vectors = self.engine.embed(lease.id, tokenized).await?;
        let (query, documents) = vectors.split_first().ok_or(ServiceError::Engine(EngineError::Stopped))?;
        let scores = documents.iter().map(|document| cosine(query, document)).collect();
        Ok(Relevance { model: name, scores, tokens })
    }

    /// The models directory, for handlers that write into the store.
    pub fn models_dir(&self) -> PathBuf {
        self.config.models_dir.clone()
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let denominator = norm(a) * norm(b);
    if denominator > 0.0 {
        dot / denominator
    } else {
        0.0
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

impl Backend for Service {
    fn chat(&self, request: ChatRequest) -> BoxFuture<'_, Result<Answer>> {
        Service::chat(self, request).boxed()
    }

    fn complete(&self, request: CompletionRequest) -> BoxFuture<'_, Result<Answer>> {
        Service::complete(self, request).boxed()
    }

    fn embed(&self, request: EmbedRequest) -> BoxFuture<'_, Result<Embeddings>> {
        Service::embed(self, request).boxed()
    }

    fn tokenize(&self, model: String, input: TokenizeInput) -> BoxFuture<'_, Result<Tokenized>> {
        async move { Service::tokenize(self, &model, input).await }.boxed()
    }

    fn detokenize(&self, model: String, tokens: Vec<u32>) -> BoxFuture<'_, Result<String>> {
        async move { Service::detokenize(self, &model, &tokens).await }.boxed()
    }

    fn rerank(&self, model: String, query: String, documents: Vec<String>) -> BoxFuture<'_, Result<Relevance>> {
        async move { Service::rerank(self, &model, &query, &documents).await }.boxed()
    }
}

/// An embedding model leased for indexing.
struct LeasedEmbedder {
    service: Service,
    lease: Lease<Engine>,
    frontend: Arc<EmbedFrontend>,
}

impl EmbeddingSession for LeasedEmbedder {
    fn tokenizer(&self) -> &tokenizers::Tokenizer {
        &self.frontend.tokenizer
    }

    fn dimensions(&self) -> usize {
        self.frontend.dimensions
    }

    fn embed<'a>(&'a self, texts: &'a [String]) -> BoxFuture<'a, std::result::Result<Vec<Vec<f32>>, EmbedderError>> {
        async move { self.service.embed_with(&self.lease, &self.frontend, texts).await.map_err(|e| Box::new(e) as EmbedderError) }.boxed()
    }
}

impl rag::Embedder for Service {
    fn open<'a>(&'a self, model: &'a str) -> BoxFuture<'a, std::result::Result<Box<dyn EmbeddingSession>, EmbedderError>> {
        async move {
            let (lease, frontend) = self.embedding_model(model).await.map_err(|e| Box::new(e) as EmbedderError)?;
            Ok(Box::new(LeasedEmbedder { service: self.clone(), lease, frontend }) as Box<dyn EmbeddingSession>)
        }
        .boxed()
    }
}
