//! The MLX engine: the only module that touches mlx-rs.
//!
//! One worker thread owns every MLX array (MLX graphs are not meant to be built from several
//! threads at once, and a 2-core CPU gains nothing from it). The rest of the server talks to
//! it through [`Engine`], a cheap handle that sends commands over a channel:
//! load/unload a model, embed texts, or start a generation whose tokens come back as
//! [`EngineEvent`]s. Each step the worker reads one chunk of a waiting prompt, then decodes
//! one token for every running sequence of a model in a single batched forward pass
//! (continuous batching). A sequence whose receiver is dropped is cancelled on the next step.
//!
//! Tokenizers and chat templates live in frontends ([`ChatFrontend`], [`EmbedFrontend`]) that
//! any thread may use, so prompt formatting never waits for the worker.

pub mod bert;
pub mod constrain;
pub mod convert;
pub mod decoder;
pub mod device;
mod generate;
pub mod gguf;
pub mod host;
pub mod loader;
pub mod nn;
pub mod prefix;
pub mod sampling;
pub mod template;
pub mod tokenizer;
pub mod tools;
pub mod validate;

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mlx_rs::{ops, Array, Dtype};
use tokio::sync::{mpsc as tokio_mpsc, oneshot};

pub use device::Backend;
pub use generate::StopMatcher;
pub use bert::{encode_pair, PairInput};
pub use loader::{ChatFrontend, EmbedFrontend};
pub use sampling::SamplingParams;

use crate::config::EngineConfig;
use crate::i18n::Msg;
use crate::msg;
use generate::{Progress, Sequence};
use decoder::{DecoderModel, SequenceSlot};
use loader::LoadedModel;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}", self.msg())]
pub enum EngineError {
    Io { path: PathBuf, reason: String },
    UnsupportedArchitecture(String),
    InvalidModel(String),
    Tokenizer(String),
    Template(String),
    ContextOverflow { prompt: usize, limit: usize },
    Mlx(String),
    NotLoaded,
    WrongKind { expected: ModelKind },
    BadRequest(String),
    Grammar(String),
    Stopped,
}

impl EngineError {
    pub fn msg(&self) -> Msg {
        match self {
            EngineError::Io { path, reason } => msg!("engine.error.io", path = path.display(), reason = reason),
            EngineError::UnsupportedArchitecture(name) => msg!("engine.error.architecture", name = name),
            EngineError::InvalidModel(detail) => msg!("engine.error.invalid_model", detail = detail),
            EngineError::Tokenizer(detail) => msg!("engine.error.tokenizer", detail = detail),
            EngineError::Template(detail) => msg!("engine.error.template", detail = detail),
            EngineError::ContextOverflow { prompt, limit } => msg!("engine.error.context", prompt = prompt, limit = limit),
            EngineError::Mlx(detail) => msg!("engine.error.mlx", detail = detail),
            EngineError::NotLoaded => msg!("engine.error.not_loaded"),
            EngineError::WrongKind { expected: ModelKind::Chat } => msg!("engine.error.not_chat"),
            EngineError::WrongKind { expected: ModelKind::Embedding } => msg!("engine.error.not_embedding"),
            EngineError::BadRequest(detail) => msg!("engine.error.bad_request", detail = detail),
            EngineError::Grammar(detail) => msg!("engine.error.grammar", detail = detail),
            EngineError::Stopped => msg!("engine.error.stopped"),
        }
    }
}

impl From<mlx_rs::error::Exception> for EngineError {
    fn from(error: mlx_rs::error::Exception) -> Self {
        EngineError::Mlx(error.to_string())
    }
}

pub type Result<T> = std::result::Result<T, EngineError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    Chat,
    Embedding,
}

/// Identifies one load of a model (the scheduler hands these out).
pub type ModelId = u64;

/// The thread-safe side of a loaded model.
#[derive(Clone)]
pub enum Frontend {
    Chat(Arc<ChatFrontend>),
    Embedding(Arc<EmbedFrontend>),
}

/// What a load reports.
#[derive(Clone)]
pub struct ModelInfo {
    pub kind: ModelKind,
    pub frontend: Frontend,
    /// Bytes of weights held in memory (after the device policy's conversions).
    pub weight_bytes: u64,
    pub load_duration: Duration,
}

/// A request to generate from a prompt.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt_tokens: Vec<u32>,
    pub sampling: SamplingParams,
    /// At most this many new tokens (None: until EOS or the context is full).
    pub max_tokens: Option<usize>,
    /// A smaller context than the model's (Ollama's `num_ctx`).
    pub context_length: Option<usize>,
    /// Generation ends before any of these strings; they are not emitted.
    pub stop: Vec<String>,
    /// Report log-probabilities with this many alternatives per token.
    pub logprobs: Option<usize>,
    /// Only output this grammar accepts (structured output, forced tool calls).
    pub grammar: Option<constrain::Grammar>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TopLogprob {
    pub token: u32,
    pub logprob: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<TopLogprob>,
}

/// The end of a generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub prompt_eval: Duration,
    pub eval: Duration,
    /// The generated token ids.
    pub tokens: Vec<u32>,
    /// Prompt tokens read from the prefix cache instead of computed.
    pub cached_tokens: usize,
    /// The stop string that ended the answer.
    pub stop_sequence: Option<String>,
}

/// Events a generation's channel holds before its sequence pauses for the client to read.
pub const EVENT_CAPACITY: usize = 64;

#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    /// A token; `text` is what it adds to the answer (empty while a character or a possible
    /// stop string is incomplete). `token` is `u32::MAX` for text released at the end.
    Token { text: String, token: u32, logprob: Option<TokenLogprob> },
    Done(Completion),
    Error(EngineError),
}

enum Command {
    Load { id: ModelId, path: PathBuf, reply: oneshot::Sender<Result<ModelInfo>> },
    Unload { id: ModelId, reply: Option<oneshot::Sender<()>> },
    Generate { id: ModelId, request: GenerateRequest, events: tokio_mpsc::Sender<EngineEvent> },
    Embed { id: ModelId, inputs: Vec<Vec<u32>>, reply: oneshot::Sender<Result<Vec<Vec<f32>>>> },
    Score { id: ModelId, inputs: Vec<PairInput>, reply: oneshot::Sender<Result<Vec<f32>>> },
    Stats { reply: oneshot::Sender<EngineStats> },
    /// Other MLX work (conversion, quantization) run on the engine thread.
    Task(Box<dyn FnOnce() + Send>),
    Shutdown,
}

/// Counters for `/api/ps` and metrics.
#[derive(Debug, Clone, Default)]
pub struct EngineStats {
    /// Sequences running or waiting, by model.
    pub sequences: HashMap<ModelId, usize>,
    /// Bytes of key/value caches, by model.
    pub cache_bytes: HashMap<ModelId, u64>,
    pub prefix: prefix::PrefixStats,
    /// Bytes MLX holds (arrays and caches).
    pub active_memory: u64,
    /// The most MLX has held at once since the engine started.
    pub peak_memory: u64,
    /// Freed buffers MLX keeps for reuse.
    pub cache_memory: u64,
    /// MLX's memory limit (0 when none is set).
    pub memory_limit: u64,
}

/// A handle to the engine thread.
#[derive(Clone)]
pub struct Engine {
    commands: Sender<Command>,
    backend: Backend,
    thread: Arc<std::sync::Mutex<Option<JoinHandle<()>>>>,
}

impl Engine {
    /// Starts the worker thread.
    pub fn start(config: EngineConfig) -> Engine {
        let (commands, receiver) = mpsc::channel();
        device::prepare_kernel_cache();
        let backend = device::detect();
        if backend == Backend::Cpu {
            device::reuse_large_host_buffers();
        }
        let thread = std::thread::Builder::new()
            .name("mlx-engine".into())
            .spawn(move || Worker::new(config, backend).run(receiver))
            .expect("the engine thread starts");
        Engine { commands, backend, thread: Arc::new(std::sync::Mutex::new(Some(thread))) }
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    fn send(&self, command: Command) -> Result<()> {
        self.commands.send(command).map_err(|_| EngineError::Stopped)
    }

    /// Loads the model at `path` (a .gguf file or a model folder) under `id`.
    pub async fn load(&self, id: ModelId, path: &Path) -> Result<ModelInfo> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Load { id, path: path.to_path_buf(), reply })?;
        answer.await.map_err(|_| EngineError::Stopped)?
    }

    /// Frees a model; returns once its memory is released.
    pub async fn unload(&self, id: ModelId) {
        let (reply, answer) = oneshot::channel();
        if self.send(Command::Unload { id, reply: Some(reply) }).is_ok() {
            let _ = answer.await;
        }
    }

    /// Starts generating; events arrive on the returned receiver. Dropping it cancels.
    pub fn generate(&self, id: ModelId, request: GenerateRequest) -> Result<tokio_mpsc::Receiver<EngineEvent>> {
        // Bounded: a client that stops reading pauses its own sequence (see `park`).
        let (events, receiver) = tokio_mpsc::channel(EVENT_CAPACITY);
        self.send(Command::Generate { id, request, events })?;
        Ok(receiver)
    }

    /// Embeds already tokenized inputs.
    pub async fn embed(&self, id: ModelId, inputs: Vec<Vec<u32>>) -> Result<Vec<Vec<f32>>> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Embed { id, inputs, reply })?;
        answer.await.map_err(|_| EngineError::Stopped)?
    }

    /// Scores tokenized (query, document) pairs with a cross-encoder (see [`encode_pair`]):
    /// one raw logit per pair, in input order (label 0 of a one-label model, label 1 of a
    /// model with more labels). Higher means more relevant; no sigmoid is applied.
    pub async fn score_pairs(&self, id: ModelId, inputs: Vec<PairInput>) -> Result<Vec<f32>> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Score { id, inputs, reply })?;
        answer.await.map_err(|_| EngineError::Stopped)?
    }

    /// Runs MLX work (e.g. converting or quantizing a model) on the engine thread, between
    /// generation steps, and returns its result.
    pub async fn run<T: Send + 'static>(&self, job: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Task(Box::new(move || {
            let _ = reply.send(job());
        })))?;
        answer.await.map_err(|_| EngineError::Stopped)
    }

    pub async fn stats(&self) -> EngineStats {
        let (reply, answer) = oneshot::channel();
        if self.send(Command::Stats { reply }).is_err() {
            return EngineStats::default();
        }
        answer.await.unwrap_or_default()
    }

    /// Stops the worker after freeing every model.
    pub fn shutdown(&self) {
        let _ = self.commands.send(Command::Shutdown);
        if let Ok(mut thread) = self.thread.lock() {
            if let Some(handle) = thread.take() {
                let _ = handle.join();
            }
        }
    }
}

struct WorkerModel {
    loaded: LoadedModel,
    waiting: VecDeque<Sequence>,
    /// Sequences decoding; with batched decoding row `i` of `batch` is `running[i]`'s cache.
    running: Vec<Sequence>,
    /// Sequences whose clients have not read their events: out of the batch, with their
    /// caches, until the client catches up (the rest of the batch goes on).
    parked: Vec<Sequence>,
    batch: nn::BatchCache,
    /// Tokens of a decode step queued on the device and not yet read (`[rows]`, int32), one
    /// per row of `running`: greedy rows pipeline (see `decode_pipelined_step`).
    in_flight: Option<InFlight>,
    /// Built on the first request with an output format (it indexes the whole vocabulary).
    grammars: Option<Arc<constrain::GrammarCompiler>>,
}

/// Where decode time goes, per step, when `MLXSERVER_PROFILE` is set: building the step's
/// graph on the host, handing it to MLX, waiting for the device, and the host's bookkeeping
/// (detokenizing, stop strings, events). Logged (info) every 256 steps.
#[derive(Default)]
struct DecodeProfile {
    enabled: bool,
    steps: u64,
    rows: u64,
    build: Duration,
    launch: Duration,
    wait: Duration,
    host: Duration,
    /// The slowest step's host bookkeeping and its row count (outliers hide in averages).
    slowest_host: (Duration, usize),
    /// MLX's peak memory within prompt chunks and within decode steps (the peak counter is
    /// reset before each), to tell which one sets the process's peak.
    prefill_peak: usize,
    decode_peak: usize,
    since: Option<Instant>,
}

impl DecodeProfile {
    fn new() -> Self {
        DecodeProfile { enabled: std::env::var_os("MLXSERVER_PROFILE").is_some(), ..Default::default() }
    }

    /// Starts measuring a phase's peak memory.
    fn phase_start(&self) {
        if self.enabled {
            let _ = mlx_rs::memory::reset_peak_memory();
        }
    }

    fn prefill_done(&mut self) {
        if self.enabled {
            self.prefill_peak = self.prefill_peak.max(mlx_rs::memory::peak_memory().unwrap_or(0));
        }
    }

    fn decode_done(&mut self) {
        if self.enabled {
            self.decode_peak = self.decode_peak.max(mlx_rs::memory::peak_memory().unwrap_or(0));
        }
    }

    fn step(&mut self, rows: usize, build: Duration, launch: Duration, wait: Duration, host: Duration) {
        if !self.enabled {
            return;
        }
        let since = *self.since.get_or_insert_with(Instant::now);
        self.steps += 1;
        self.rows += rows as u64;
        self.build += build;
        self.launch += launch;
        self.wait += wait;
        self.host += host;
        if host > self.slowest_host.0 {
            self.slowest_host = (host, rows);
        }
        if self.steps == 256 {
            let per = |d: Duration| d.as_secs_f64() * 1e6 / self.steps as f64;
            let wall = since.elapsed().as_secs_f64() * 1e6 / self.steps as f64;
            tracing::info!(
                steps = self.steps,
                rows_per_step = format!("{:.1}", self.rows as f64 / self.steps as f64),
                wall_us = format!("{wall:.0}"),
                build_us = format!("{:.0}", per(self.build)),
                launch_us = format!("{:.0}", per(self.launch)),
                wait_us = format!("{:.0}", per(self.wait)),
                host_us = format!("{:.0}", per(self.host)),
                slowest_host_us = self.slowest_host.0.as_micros() as u64,
                slowest_host_rows = self.slowest_host.1,
                prefill_peak_mb = self.prefill_peak >> 20,
                decode_peak_mb = self.decode_peak >> 20,
                active_mb = mlx_rs::memory::active_memory().unwrap_or(0) >> 20,
                "decode profile"
            );
            *self = DecodeProfile { enabled: true, ..Default::default() };
        }
    }
}

/// Queued tokens of a pipelined decode step.
struct InFlight {
    /// `[rows]` uint32 (argmax's own type, fed back as mlx-lm feeds it: no cast per step), on
    /// the device.
    tokens: Array,
    /// Rows whose token the host already took (a sequence that joined with the first token
    /// of its prefill): they feed the next step but are not reported again.
    known: Vec<bool>,
}

impl InFlight {
    /// Tokens derived from a queued step (some rows dropped, or a joining row's token added)
    /// are queued as a graph of their own. MLX marks every array of one `async_eval` with one
    /// event, signalled when that whole graph is done: a derived array left lazy would become
    /// part of the next step's graph, and reading it would wait for that step as well, which
    /// undoes the pipelining.
    fn derived(tokens: Array, known: Vec<bool>) -> Result<InFlight> {
        mlx_rs::transforms::async_eval(std::iter::once(&tokens))?;
        Ok(InFlight { tokens, known })
    }

    fn keep(self, rows: &[i32]) -> Result<Option<InFlight>> {
        if rows.is_empty() {
            return Ok(None);
        }
        let unchanged = rows.len() == self.known.len() && rows.iter().enumerate().all(|(index, &row)| row as usize == index);
        if unchanged {
            return Ok(Some(self));
        }
        let tokens = self.tokens.take_axis(&Array::from_slice(rows, &[rows.len() as i32]), 0)?;
        let known = rows.iter().map(|&r| self.known[r as usize]).collect();
        InFlight::derived(tokens, known).map(Some)
    }

    /// A row that joins the batch with its first token already known to the host.
    fn join(mut self, token: u32) -> Result<InFlight> {
        let tokens = ops::concatenate(&[self.tokens, Array::from_slice(&[token], &[1])], 0)?;
        self.known.push(true);
        InFlight::derived(tokens, self.known)
    }
}

struct Worker {
    profile: DecodeProfile,
    config: EngineConfig,
    backend: Backend,
    models: HashMap<ModelId, WorkerModel>,
    prefix: prefix::PrefixCache,
}

impl Worker {
    fn new(config: EngineConfig, backend: Backend) -> Worker {
        device::activate(backend);
        let _ = mlx_rs::memory::set_cache_limit(usize::try_from(config.cache_limit_bytes).unwrap_or(usize::MAX));
        if backend != Backend::Cpu {
            // MLX's default limit is what the device can hold; keep a share of it free for
            // the rest of the machine (other processes, the display on a Mac).
            let device_limit = mlx_rs::memory::memory_limit().unwrap_or(0);
            if device_limit > 0 {
                let limit = (device_limit as f64 * f64::from(config.gpu_memory_fraction.clamp(0.05, 1.0))) as usize;
                let _ = mlx_rs::memory::set_memory_limit(limit);
            }
        }
        tracing::info!(
            backend = backend.name(),
            memory_limit = mlx_rs::memory::memory_limit().unwrap_or(0),
            cache_limit = config.cache_limit_bytes,
            "engine started"
        );
        let prefix = prefix::PrefixCache::new(config.prefix_cache_bytes);
        Worker { profile: DecodeProfile::new(), config, backend, models: HashMap::new(), prefix }
    }

    fn busy(&self) -> bool {
        self.models.values().any(|m| !m.waiting.is_empty() || !m.running.is_empty())
    }

    fn paused(&self) -> bool {
        self.models.values().any(|m| !m.parked.is_empty())
    }

    fn run(mut self, commands: Receiver<Command>) {
        loop {
            let first = if !self.busy() && self.paused() {
                // Only paused sequences: look again soon whether their clients read.
                match commands.recv_timeout(Duration::from_millis(5)) {
                    Ok(command) => Some(command),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                }
            } else if self.busy() {
                match commands.try_recv() {
                    Ok(command) => Some(command),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => return,
                }
            } else {
                // Idle: hand freed buffers back instead of holding the peak of the last burst.
                let _ = mlx_rs::memory::clear_cache();
                match commands.recv() {
                    Ok(command) => Some(command),
                    Err(_) => return,
                }
            };
            let mut pending: Vec<Command> = first.into_iter().collect();
            while let Ok(command) = commands.try_recv() {
                pending.push(command);
            }
            for command in pending {
                if !self.handle(command) {
                    self.models.clear();
                    return;
                }
            }
            let ids: Vec<ModelId> = self.models.keys().copied().collect();
            for id in ids {
                self.step(id);
            }
        }
    }

    /// Returns false on shutdown.
    fn handle(&mut self, command: Command) -> bool {
        match command {
            Command::Load { id, path, reply } => {
                let _ = reply.send(self.load(id, &path));
            }
            Command::Unload { id, reply } => {
                self.prefix.remove_model(id);
                if let Some(model) = self.models.remove(&id) {
                    for sequence in model.waiting.iter().chain(model.running.iter()) {
                        sequence.fail(EngineError::NotLoaded);
                    }
                }
                let _ = mlx_rs::memory::clear_cache();
                if let Some(reply) = reply {
                    let _ = reply.send(());
                }
            }
            Command::Generate { id, request, events } => self.enqueue(id, request, events),
            Command::Embed { id, inputs, reply } => {
                let _ = reply.send(self.embed(id, inputs));
            }
            Command::Score { id, inputs, reply } => {
                let _ = reply.send(self.score(id, inputs));
            }
            Command::Stats { reply } => {
                let mut stats = EngineStats::default();
                for (id, model) in &self.models {
                    stats.sequences.insert(*id, model.waiting.len() + model.running.len());
                    let bytes = model.waiting.iter().chain(model.running.iter()).flat_map(|s| s.cache.iter()).map(|c| c.nbytes() as u64).sum::<u64>()
                        + model.batch.nbytes() as u64;
                    stats.cache_bytes.insert(*id, bytes);
                }
                stats.prefix = self.prefix.stats();
                stats.active_memory = mlx_rs::memory::active_memory().unwrap_or(0) as u64;
                stats.peak_memory = mlx_rs::memory::peak_memory().unwrap_or(0) as u64;
                stats.cache_memory = mlx_rs::memory::cache_memory().unwrap_or(0) as u64;
                stats.memory_limit = if self.backend == Backend::Cpu { 0 } else { mlx_rs::memory::memory_limit().unwrap_or(0) as u64 };
                let _ = reply.send(stats);
            }
            Command::Task(job) => {
                job();
                let _ = mlx_rs::memory::clear_cache();
            }
            Command::Shutdown => return false,
        }
        true
    }

    fn load(&mut self, id: ModelId, path: &Path) -> Result<ModelInfo> {
        let started = Instant::now();
        let policy = device::DevicePolicy::new(self.backend, self.config.cpu_dtype);
        let loaded = loader::load(path, policy)?;
        // Realize every conversion now, so the first request does not pay for it and the
        // source arrays (e.g. the quantized originals) are freed.
        mlx_rs::transforms::eval(loaded.arrays())?;
        if let (LoadedModel::Chat { model, .. }, true) = (&loaded, self.backend != Backend::Cpu) {
            // GPU kernels are compiled on first use: pay for it at load, not in a request.
            let warm = Instant::now();
            warm_up(model)?;
            tracing::info!(model = id, seconds = warm.elapsed().as_secs_f32(), "kernels warmed up");
        }
        let _ = mlx_rs::memory::clear_cache();
        let info = ModelInfo {
            kind: loaded.kind(),
            frontend: match &loaded {
                LoadedModel::Chat { frontend, .. } => Frontend::Chat(frontend.clone()),
                LoadedModel::Embedding { frontend, .. } => Frontend::Embedding(frontend.clone()),
            },
            weight_bytes: loaded.weight_bytes(),
            load_duration: started.elapsed(),
        };
        tracing::info!(model = id, path = %path.display(), bytes = info.weight_bytes, backend = self.backend.name(), seconds = info.load_duration.as_secs_f32(), "model loaded");
        self.models.insert(id, WorkerModel { loaded, waiting: VecDeque::new(), running: Vec::new(), parked: Vec::new(), batch: nn::BatchCache::default(), in_flight: None, grammars: None });
        Ok(info)
    }

    fn enqueue(&mut self, id: ModelId, request: GenerateRequest, events: tokio_mpsc::Sender<EngineEvent>) {
        let Some(model) = self.models.get_mut(&id) else {
            let _ = events.try_send(EngineEvent::Error(EngineError::NotLoaded));
            return;
        };
        let LoadedModel::Chat { model: llama, frontend } = &model.loaded else {
            let _ = events.try_send(EngineEvent::Error(EngineError::WrongKind { expected: ModelKind::Chat }));
            return;
        };
        let constraint = match &request.grammar {
            Some(grammar) => {
                let compiler = match &model.grammars {
                    Some(compiler) => Ok(compiler.clone()),
                    None => constrain::GrammarCompiler::new(frontend.tokenizer.clone(), &frontend.eos_token_ids, llama.config.vocab_size.max(0) as usize)
                        .map(Arc::new)
                        .inspect(|compiler| model.grammars = Some(compiler.clone())),
                };
                match compiler.and_then(|compiler| compiler.constraint(grammar)) {
                    Ok(constraint) => Some(constraint),
                    Err(error) => {
                        let _ = events.try_send(EngineEvent::Error(error));
                        return;
                    }
                }
            }
            None => None,
        };
        let decoder = tokenizer::IncrementalDecoder::new(frontend.tokenizer.clone());
        let eos = Arc::new(frontend.eos_token_ids.clone());
        match Sequence::new(request, llama.new_cache(), decoder, eos, frontend.context_length, events) {
            Ok(mut sequence) => {
                sequence.constraint = constraint;
                if let Some((cache, length)) = self.prefix.lookup(id, &sequence.prompt) {
                    sequence.reuse_prefix(cache, length);
                }
                model.waiting.push_back(sequence)
            }
            Err((error, events)) => {
                let _ = events.try_send(EngineEvent::Error(error));
            }
        }
    }

    /// One round of work for a model: a prompt chunk of the first waiting sequence, then one
    /// batched decode step for every running sequence.
    fn step(&mut self, id: ModelId) {
        let prefill_chunk = self.config.prefill_chunk.max(16);
        let max_batch = self.config.max_batch.max(1);
        let Some(model) = self.models.get_mut(&id) else { return };
        let LoadedModel::Chat { model: llama, .. } = &model.loaded else { return };
        model.waiting.retain(|s| !s.cancelled());
        let rows = model.running.len();
        let cancelled: Vec<usize> = (0..rows).filter(|&row| model.running[row].cancelled()).collect();
        for &row in cancelled.iter().rev() {
            let _ = model.batch.remove(row);
            model.running.remove(row);
        }
        if !cancelled.is_empty() {
            if let Some(queued) = model.in_flight.take() {
                let keep: Vec<i32> = (0..rows).filter(|row| !cancelled.contains(row)).map(|row| row as i32).collect();
                model.in_flight = queued.keep(&keep).ok().flatten();
            }
        }

        let mut finished = Vec::new();
        model.parked.retain(|s| !s.cancelled());
        if let Err(error) = resume_parked(&mut model.parked, &mut model.running, &mut model.batch, &mut model.in_flight)
            .and_then(|()| park_backlogged(&mut model.parked, &mut model.running, &mut model.batch, &mut model.in_flight, &mut finished))
        {
            fail_batch(&mut model.running, &mut model.batch, &mut model.in_flight, error);
        }
        if model.running.len() < max_batch && admits(self.backend, llama, model.waiting.front(), model.running.is_empty()) {
            if let Some(mut sequence) = model.waiting.pop_front() {
                self.profile.phase_start();
                let prefilled = prefill_step(llama, &mut sequence, prefill_chunk);
                self.profile.prefill_done();
                match prefilled {
                    Ok(Some(mut logits)) => match sequence.accept_logits(&mut logits) {
                        Progress::Running => match model.batch.push(&sequence.cache) {
                            Ok(()) => {
                                // The batch holds the cache now.
                                sequence.cache = Vec::new();
                                if let Some(queued) = model.in_flight.take() {
                                    // Its first token (already reported) joins the queued ones.
                                    model.in_flight = queued.join(sequence.next_input.unwrap_or(0)).ok();
                                }
                                model.running.push(sequence);
                            }
                            Err(error) => sequence.fail(error),
                        },
                        Progress::Finished => finished.push(sequence),
                    },
                    Ok(None) => model.waiting.push_front(sequence),
                    Err(error) => sequence.fail(error),
                }
            }
        }

        if !model.running.is_empty() {
            // Every backend pipelines greedy rows (on the CPU it gains little, but the path is
            // then the one the reference tests check).
            let pipelined = pipelining() && model.running.iter().all(Sequence::greedy_on_device);
            self.profile.phase_start();
            let outcome = if pipelined {
                decode_pipelined_step(llama, &mut model.batch, &mut model.running, &mut model.in_flight, &mut finished, &mut self.profile)
            } else {
                drain_in_flight(&mut model.batch, &mut model.running, &mut model.in_flight, &mut finished)
                    .and_then(|()| if model.running.is_empty() { Ok(()) } else { decode_batched_step(llama, &mut model.batch, &mut model.running, &mut finished) })
            };
            self.profile.decode_done();
            if let Err(error) = outcome {
                fail_batch(&mut model.running, &mut model.batch, &mut model.in_flight, error);
            }
        }
        for sequence in finished {
            let tokens = sequence.cached_sequence();
            self.prefix.insert(id, tokens, sequence.cache);
        }
    }

    fn embed(&mut self, id: ModelId, inputs: Vec<Vec<u32>>) -> Result<Vec<Vec<f32>>> {
        let model = self.models.get(&id).ok_or(EngineError::NotLoaded)?;
        let LoadedModel::Embedding { model: bert, .. } = &model.loaded else {
            return Err(EngineError::WrongKind { expected: ModelKind::Embedding });
        };
        if bert.head.is_some() {
            return Err(EngineError::BadRequest(
                "this is a cross-encoder (reranker) model: it scores query/document pairs and does not embed texts; use an embedding model".into(),
            ));
        }
        let mut output = Vec::with_capacity(inputs.len());
        // Similar lengths together keep padding small.
        let mut order: Vec<usize> = (0..inputs.len()).collect();
        order.sort_by_key(|&i| inputs[i].len());
        let mut results: Vec<Option<Vec<f32>>> = vec![None; inputs.len()];
        for chunk in order.chunks(32) {
            let (ids, mask, shape) = padded(chunk.iter().map(|&i| inputs[i].as_slice()));
            let embeddings = bert.embed(&Array::from_slice(&ids, &shape), &Array::from_slice(&mask, &shape))?;
            let embeddings = embeddings.as_dtype(Dtype::Float32)?;
            embeddings.eval()?;
            let values = embeddings.try_as_slice::<f32>().map_err(|e| EngineError::Mlx(e.to_string()))?;
            let dims = embeddings.dim(1) as usize;
            for (row, &i) in chunk.iter().enumerate() {
                results[i] = Some(values[row * dims..(row + 1) * dims].to_vec());
            }
        }
        for result in results {
            output.push(result.unwrap_or_default());
        }
        Ok(output)
    }
}

/// A batch of rows padded to its longest: `[rows, length]` int32 ids and mask (1 for real
/// tokens, 0 for padding).
fn padded<'a>(rows: impl Iterator<Item = &'a [u32]> + Clone) -> (Vec<i32>, Vec<i32>, [i32; 2]) {
    let length = rows.clone().map(<[u32]>::len).max().unwrap_or(1).max(1);
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    let mut count = 0;
    for tokens in rows {
        ids.extend(tokens.iter().map(|&t| t as i32));
        ids.extend(std::iter::repeat_n(0, length - tokens.len()));
        mask.extend(std::iter::repeat_n(1i32, tokens.len()));
        mask.extend(std::iter::repeat_n(0i32, length - tokens.len()));
        count += 1;
    }
    (ids, mask, [count, length as i32])
}

impl Worker {
    fn score(&mut self, id: ModelId, inputs: Vec<PairInput>) -> Result<Vec<f32>> {
        let model = self.models.get(&id).ok_or(EngineError::NotLoaded)?;
        let LoadedModel::Embedding { model: bert, .. } = &model.loaded else {
            return Err(EngineError::WrongKind { expected: ModelKind::Embedding });
        };
        let Some(head) = &bert.head else {
            return Err(EngineError::BadRequest("this embedding model has no classification head: it is not a cross-encoder (reranker)".into()));
        };
        let limit = bert.config.max_position_embeddings.max(1) as usize;
        for (index, pair) in inputs.iter().enumerate() {
            if pair.ids.is_empty() {
                return Err(EngineError::BadRequest(format!("pair {index} has no tokens")));
            }
            if pair.ids.len() != pair.type_ids.len() {
                return Err(EngineError::BadRequest(format!("pair {index}: {} token ids but {} token type ids", pair.ids.len(), pair.type_ids.len())));
            }
            if pair.ids.len() > limit {
                return Err(EngineError::ContextOverflow { prompt: pair.ids.len(), limit });
            }
            if pair.type_ids.iter().any(|&t| t as i32 >= bert.token_type_embeddings.dim(0)) {
                return Err(EngineError::BadRequest(format!("pair {index}: a token type id is past the model's {} types", bert.token_type_embeddings.dim(0))));
            }
        }
        let label = head.score_label();
        let mut order: Vec<usize> = (0..inputs.len()).collect();
        order.sort_by_key(|&i| inputs[i].ids.len());
        let mut scores = vec![0.0f32; inputs.len()];
        for chunk in order.chunks(32) {
            let (ids, mask, shape) = padded(chunk.iter().map(|&i| inputs[i].ids.as_slice()));
            let (types, _, _) = padded(chunk.iter().map(|&i| inputs[i].type_ids.as_slice()));
            let logits = bert.classify(&Array::from_slice(&ids, &shape), &Array::from_slice(&types, &shape), &Array::from_slice(&mask, &shape))?;
            let logits = logits.as_dtype(Dtype::Float32)?;
            logits.eval()?;
            let values = logits.try_as_slice::<f32>().map_err(|e| EngineError::Mlx(e.to_string()))?;
            let labels = logits.dim(1) as usize;
            for (row, &i) in chunk.iter().enumerate() {
                scores[i] = values[row * labels + label];
            }
        }
        Ok(scores)
    }
}

/// Runs a short prompt and two batched decode steps through `model` and discards them, so
/// the kernels of both paths exist before the first request.
fn warm_up(model: &DecoderModel) -> Result<()> {
    let mut cache = model.new_cache();
    let prompt = Array::from_slice(&[0i32; 8], &[1, 8]);
    let logits = model.forward(&prompt, &mut SequenceSlot { cache: &mut cache })?;
    mlx_rs::transforms::eval(std::iter::once(&logits).chain(cache.iter().flat_map(|c| c.arrays())))?;
    logits_rows(&logits)?;
    let mut batch = nn::BatchCache::default();
    batch.push(&cache)?;
    batch.push(&cache)?;
    for _ in 0..2 {
        let logits = model.decode_batched(&Array::from_slice(&[0u32, 0], &[2, 1]), &mut batch)?;
        mlx_rs::transforms::eval(std::iter::once(&logits).chain(batch.arrays()))?;
        logits_rows(&logits)?;
    }
    Ok(())
}

fn dtype_bytes(dtype: Dtype) -> u64 {
    match dtype {
        Dtype::Float16 | Dtype::Bfloat16 => 2,
        _ => 4,
    }
}

/// Whether a waiting sequence may start now: on a GPU its key/value cache (prompt plus
/// answer) must fit under MLX's memory limit beside what is held, unless nothing else runs
/// (then it starts anyway, and a real shortage is MLX's error to report).
fn admits(backend: Backend, model: &DecoderModel, next: Option<&Sequence>, alone: bool) -> bool {
    let Some(next) = next else { return false };
    if backend == Backend::Cpu || alone || next.prefilled > 0 {
        return true;
    }
    let config = &model.config;
    let bytes_per_token = 2 * config.num_layers as u64 * config.num_kv_heads as u64 * config.head_dim as u64 * dtype_bytes(model.dtype);
    let tokens = (next.prompt.len() + next.max_new_tokens()) as u64;
    let held = mlx_rs::memory::active_memory().unwrap_or(0) as u64;
    let limit = mlx_rs::memory::memory_limit().unwrap_or(usize::MAX) as u64;
    held.saturating_add(tokens * bytes_per_token) <= limit
}

/// Host copy of `[B, vocab]` logits as f32 rows.
fn logits_rows(logits: &Array) -> Result<Vec<Vec<f32>>> {
    let logits = logits.as_dtype(Dtype::Float32)?;
    logits.eval()?;
    let values = logits.try_as_slice::<f32>().map_err(|e| EngineError::Mlx(e.to_string()))?;
    let vocab = logits.dim(-1) as usize;
    Ok(values.chunks(vocab).map(<[f32]>::to_vec).collect())
}

/// Feeds the next chunk of a sequence's prompt. Returns the last position's logits once the
/// whole prompt is in the cache.
fn prefill_step(model: &DecoderModel, sequence: &mut Sequence, chunk: usize) -> Result<Option<Vec<f32>>> {
    // The last prompt token always runs on its own, as it does after a prefix-cache hit (which
    // reuses all but the last token): cold and cached prompts then compute the first logits
    // with the same kernels, so a seeded request gives the same answer either way.
    let last = sequence.prompt.len() - 1;
    let end = if sequence.prefilled < last { (sequence.prefilled + chunk).min(last) } else { sequence.prompt.len() };
    let tokens: Vec<i32> = sequence.prompt[sequence.prefilled..end].iter().map(|&t| t as i32).collect();
    let input = Array::from_slice(&tokens, &[1, tokens.len() as i32]);
    let logits = model.forward(&input, &mut SequenceSlot { cache: &mut sequence.cache })?;
    mlx_rs::transforms::eval(std::iter::once(&logits).chain(sequence.cache.iter().flat_map(|c| c.arrays())))?;
    sequence.prefilled = end;
    if sequence.prompt_done() {
        Ok(logits_rows(&logits)?.pop())
    } else {
        Ok(None)
    }
}

/// Every running sequence fails with `error`; the batch starts over empty.
fn fail_batch(running: &mut Vec<Sequence>, batch: &mut nn::BatchCache, in_flight: &mut Option<InFlight>, error: EngineError) {
    tracing::error!(%error, "decode step failed");
    for sequence in running.drain(..) {
        sequence.fail(error.clone());
    }
    *batch = nn::BatchCache::default();
    *in_flight = None;
}

/// Rows whose clients stopped reading leave the batch with their caches (tokens queued on
/// the device are taken first, so each cache holds exactly its sequence's tokens).
fn park_backlogged(parked: &mut Vec<Sequence>, running: &mut Vec<Sequence>, batch: &mut nn::BatchCache, in_flight: &mut Option<InFlight>, finished: &mut Vec<Sequence>) -> Result<()> {
    if !running.iter().any(Sequence::backlogged) {
        return Ok(());
    }
    drain_in_flight(batch, running, in_flight, finished)?;
    for row in (0..running.len()).rev() {
        if running[row].backlogged() {
            let caches = batch.remove(row)?;
            let mut sequence = running.remove(row);
            sequence.cache = caches;
            parked.push(sequence);
        }
    }
    Ok(())
}

/// Paused sequences whose clients caught up rejoin the batch, as a prefilled prompt does.
fn resume_parked(parked: &mut Vec<Sequence>, running: &mut Vec<Sequence>, batch: &mut nn::BatchCache, in_flight: &mut Option<InFlight>) -> Result<()> {
    let mut index = 0;
    while index < parked.len() {
        if !parked[index].drained() {
            index += 1;
            continue;
        }
        let mut sequence = parked.remove(index);
        batch.push(&sequence.cache)?;
        sequence.cache = Vec::new();
        if let Some(queued) = in_flight.take() {
            *in_flight = Some(queued.join(sequence.next_input.unwrap_or(0))?);
        }
        running.push(sequence);
    }
    Ok(())
}

/// Finished rows leave the batch with their caches, cut to the tokens the sequence holds (a
/// pipelined step may have written one more; otherwise the cut changes nothing).
fn retire(batch: &mut nn::BatchCache, running: &mut Vec<Sequence>, done: Vec<usize>, finished: &mut Vec<Sequence>) -> Result<()> {
    for index in done.into_iter().rev() {
        let mut caches = batch.remove(index)?;
        let mut sequence = running.remove(index);
        let held = (sequence.prompt.len() + sequence.generated.len()) as i32;
        caches.iter_mut().for_each(|cache| cache.truncate(held));
        sequence.cache = caches;
        finished.push(sequence);
    }
    Ok(())
}

/// Hands each row's queued token to its sequence (rows the host already knows are skipped);
/// returns the rows that finished.
fn take_tokens(queued: &InFlight, running: &mut [Sequence]) -> Result<Vec<usize>> {
    queued.tokens.eval()?;
    let tokens = queued.tokens.try_as_slice::<u32>().map_err(|e| EngineError::Mlx(e.to_string()))?;
    let mut done = Vec::new();
    for (index, sequence) in running.iter_mut().enumerate() {
        if queued.known.get(index).copied().unwrap_or(true) {
            continue;
        }
        if let Progress::Finished = sequence.accept_token(tokens[index], None) {
            done.push(index);
        }
    }
    Ok(done)
}

/// Reads the queued tokens, if any, and hands them to their sequences.
fn drain_in_flight(batch: &mut nn::BatchCache, running: &mut Vec<Sequence>, in_flight: &mut Option<InFlight>, finished: &mut Vec<Sequence>) -> Result<()> {
    let Some(queued) = in_flight.take() else { return Ok(()) };
    let done = take_tokens(&queued, running)?;
    retire(batch, running, done, finished)
}

/// One decode step for greedy rows, pipelined as mlx-lm does: the step is queued on the
/// device with the previous step's tokens as lazy inputs and picks its tokens there (argmax),
/// and only then does the host read the previous step's tokens and do its bookkeeping
/// (detokenizing, stop strings, events) while the device computes. A row that finishes
/// leaves the batch; the queued token computed for it is dropped.
/// Pipelining is on unless `MLXSERVER_PIPELINE=0` (for measurements).
fn pipelining() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("MLXSERVER_PIPELINE").map_or(true, |v| v != "0"))
}

fn decode_pipelined_step(
    model: &DecoderModel,
    batch: &mut nn::BatchCache,
    running: &mut Vec<Sequence>,
    in_flight: &mut Option<InFlight>,
    finished: &mut Vec<Sequence>,
    profile: &mut DecodeProfile,
) -> Result<()> {
    let started = Instant::now();
    let rows = running.len() as i32;
    let previous = in_flight.take();
    let inputs = match &previous {
        Some(queued) => queued.tokens.reshape(&[rows, 1])?,
        None => Array::from_slice(&running.iter().map(|s| s.next_input.unwrap_or(0)).collect::<Vec<_>>(), &[rows, 1]),
    };
    let logits = model.decode_batched(&inputs, batch)?;
    let next = ops::indexing::argmax_axis(&logits, -1, false)?;
    let built = Instant::now();
    dump_graph_once(&next);
    // The cache writes are dependencies of `next`: evaluating it evaluates them.
    mlx_rs::transforms::async_eval(std::iter::once(&next))?;
    let launched = Instant::now();
    let next = InFlight { tokens: next, known: vec![false; rows as usize] };
    let Some(previous) = previous else {
        *in_flight = Some(next);
        return Ok(());
    };
    previous.tokens.eval()?;
    let waited = Instant::now();
    let done = take_tokens(&previous, running)?;
    profile.step(rows as usize, built - started, launched - built, waited - launched, waited.elapsed());
    let keep: Vec<i32> = (0..rows).filter(|row| !done.contains(&(*row as usize))).collect();
    retire(batch, running, done, finished)?;
    *in_flight = next.keep(&keep)?;
    Ok(())
}

/// Writes the graph of one decode step (MLX's DOT format) to the file `MLXSERVER_DUMP_GRAPH`
/// names, once per process: the op count and kinds of a step, to compare with mlx-lm's
/// (`mx.export_to_dot`) when looking for per-step overhead.
fn dump_graph_once(output: &Array) {
    static DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let Some(path) = std::env::var_os("MLXSERVER_DUMP_GRAPH") else { return };
    if DONE.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    use std::os::unix::ffi::OsStrExt;
    let (Ok(path), Ok(mode)) = (std::ffi::CString::new(path.as_bytes()), std::ffi::CString::new("w")) else { return };
    // SAFETY: the FILE and the vector are created, used and released here; the array pointer
    // stays valid while `output` is borrowed.
    unsafe {
        let file = libc::fopen(path.as_ptr(), mode.as_ptr());
        if file.is_null() {
            return;
        }
        let outputs = mlx_sys::mlx_vector_array_new();
        mlx_sys::mlx_vector_array_append_value(outputs, output.as_ptr());
        let namer = mlx_sys::mlx_node_namer_new();
        mlx_sys::mlx_export_to_dot(file.cast(), namer, outputs);
        mlx_sys::mlx_node_namer_free(namer);
        mlx_sys::mlx_vector_array_free(outputs);
        libc::fclose(file);
    }
}

/// One token for every running sequence with one attention call per layer over the batch
/// cache; finished sequences leave the batch with their caches.
fn decode_batched_step(model: &DecoderModel, batch: &mut nn::BatchCache, running: &mut Vec<Sequence>, finished: &mut Vec<Sequence>) -> Result<()> {
    let tokens: Vec<i32> = running.iter().map(|s| s.next_input.unwrap_or(0) as i32).collect();
    let input = Array::from_slice(&tokens, &[running.len() as i32, 1]);
    let logits = model.decode_batched(&input, batch)?;
    mlx_rs::transforms::eval(std::iter::once(&logits).chain(batch.arrays()))?;
    let rows = logits_rows(&logits)?;
    let mut done = Vec::new();
    for (index, (sequence, mut row)) in running.iter_mut().zip(rows).enumerate() {
        if let Progress::Finished = sequence.accept_logits(&mut row) {
            done.push(index);
        }
    }
    retire(batch, running, done, finished)
}
