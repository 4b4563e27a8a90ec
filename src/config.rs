//! Configuration: defaults, the TOML file under the home folder, environment variables and
//! CLI flags, in that order of precedence (later wins).
//!
//! The home folder is `~/.my_mlx_server` (movable with `MLXSERVER_HOME`). It holds
//! `config.toml`, the server's pid and log files, the chat history and, by default, the model
//! store and the RAG tables. A legacy `config.json` written by the original Python mlxserver
//! is read and migrated to TOML when no TOML file exists yet.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::i18n::{Lang, Msg};
use crate::msg;

pub const DEFAULT_PORT: u16 = 27000;
pub const DEFAULT_HOST: &str = "127.0.0.1";
pub const CONFIG_FILE: &str = "config.toml";
pub const LEGACY_CONFIG_FILE: &str = "config.json";

#[derive(Debug, thiserror::Error)]
#[error("{}", self.msg())]
pub enum ConfigError {
    Read { path: PathBuf, source: std::io::Error },
    Parse { path: PathBuf, detail: String },
    Write { path: PathBuf, source: std::io::Error },
    InvalidValue { key: String, value: String, expected: &'static str },
    UnknownKey { key: String },
    NoHome,
}

impl ConfigError {
    pub fn msg(&self) -> Msg {
        match self {
            ConfigError::Read { path, source } => {
                msg!("config.error.read", path = path.display(), reason = source)
            }
            ConfigError::Parse { path, detail } => {
                msg!("config.error.parse", path = path.display(), reason = detail)
            }
            ConfigError::Write { path, source } => {
                msg!("config.error.write", path = path.display(), reason = source)
            }
            ConfigError::InvalidValue { key, value, expected } => {
                msg!("config.error.invalid_value", key = key, value = value, expected = expected)
            }
            ConfigError::UnknownKey { key } => msg!("config.error.unknown_key", key = key),
            ConfigError::NoHome => msg!("config.error.no_home"),
        }
    }
}

/// How long a model stays loaded after its last request (Ollama's `keep_alive`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAlive {
    /// Unload as soon as the model is idle.
    Immediately,
    For(Duration),
    Forever,
}

impl KeepAlive {
    /// Parses Ollama's forms: a duration string ("5m", "1h30m", "10s"), a number of seconds,
    /// "0" (unload right away) or a negative value (keep forever).
    pub fn parse(value: &str) -> Option<KeepAlive> {
        let value = value.trim();
        if let Ok(seconds) = value.parse::<f64>() {
            return Some(KeepAlive::from_seconds(seconds));
        }
        if value.starts_with('-') {
            return humantime::parse_duration(&value[1..]).ok().map(|_| KeepAlive::Forever);
        }
        match humantime::parse_duration(value) {
            Ok(duration) if duration.is_zero() => Some(KeepAlive::Immediately),
            Ok(duration) => Some(KeepAlive::For(duration)),
            Err(_) => None,
        }
    }

    pub fn from_seconds(seconds: f64) -> KeepAlive {
        if seconds < 0.0 {
            KeepAlive::Forever
        } else if seconds == 0.0 {
            KeepAlive::Immediately
        } else {
            KeepAlive::For(Duration::from_secs_f64(seconds))
        }
    }
}

impl fmt::Display for KeepAlive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeepAlive::Immediately => f.write_str("0"),
            KeepAlive::For(duration) => write!(f, "{}", humantime::format_duration(*duration)),
            KeepAlive::Forever => f.write_str("-1"),
        }
    }
}

/// Parses "8GiB", "512MB", "1.5G", "1048576" into bytes (binary units for K/M/G/T).
pub fn parse_bytes(value: &str) -> Option<u64> {
    let value = value.trim();
    let split = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let number: f64 = number.replace('_', "").parse().ok()?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return None,
    };
    if number < 0.0 || !number.is_finite() {
        return None;
    }
    Some((number * multiplier as f64) as u64)
}

/// Formats bytes the way people read them ("1.5 GiB").
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A cap on the bytes of loaded models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryLimit {
    /// Three quarters of the machine's physical memory.
    Auto,
    Bytes(u64),
}

impl MemoryLimit {
    pub fn parse(value: &str) -> Option<MemoryLimit> {
        if value.trim().eq_ignore_ascii_case("auto") {
            Some(MemoryLimit::Auto)
        } else {
            parse_bytes(value).map(MemoryLimit::Bytes)
        }
    }

    pub fn bytes(self) -> u64 {
        match self {
            MemoryLimit::Bytes(bytes) => bytes,
            MemoryLimit::Auto => physical_memory().map(|total| total / 4 * 3).unwrap_or(8 << 30),
        }
    }
}

impl fmt::Display for MemoryLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemoryLimit::Auto => f.write_str("auto"),
            MemoryLimit::Bytes(bytes) => write!(f, "{}", format_bytes(*bytes).replace(' ', "")),
        }
    }
}

/// Total physical memory in bytes, where the platform tells.
pub fn physical_memory() -> Option<u64> {
    // SAFETY: sysconf has no preconditions; a negative answer means "unknown".
    let (pages, page_size) =
        unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    (pages > 0 && page_size > 0).then(|| pages as u64 * page_size as u64)
}

/// How weights are held when MLX runs on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CpuDtype {
    /// Dequantize to f32 at load time: MLX's CPU kernels for quantized and f16 matmuls are
    /// far slower than f32 with OpenBLAS on x86.
    #[default]
    Float32,
    Float16,
    Bfloat16,
    /// Keep quantized weights quantized (less memory, slower on CPU).
    Quantized,
}

impl FromStr for CpuDtype {
    type Err = ();
    fn from_str(value: &str) -> Result<Self, ()> {
        match value.trim().to_ascii_lowercase().as_str() {
            "float32" | "f32" => Ok(CpuDtype::Float32),
            "float16" | "f16" => Ok(CpuDtype::Float16),
            "bfloat16" | "bf16" => Ok(CpuDtype::Bfloat16),
            "quantized" | "keep" => Ok(CpuDtype::Quantized),
            _ => Err(()),
        }
    }
}

impl fmt::Display for CpuDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CpuDtype::Float32 => "float32",
            CpuDtype::Float16 => "float16",
            CpuDtype::Bfloat16 => "bfloat16",
            CpuDtype::Quantized => "quantized",
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    pub cpu_dtype: CpuDtype,
    /// Prompt tokens processed per forward pass during prefill.
    pub prefill_chunk: usize,
    /// Sequences decoded together in one batched step.
    pub max_batch: usize,
    /// Bytes of key/value caches kept for reuse by prompts with a shared prefix (0: off).
    pub prefix_cache_bytes: u64,
    /// Share of the accelerator's memory MLX may hold (weights, caches, scratch): MLX's
    /// memory limit, and the budget new sequences' key/value caches are admitted against.
    pub gpu_memory_fraction: f32,
    /// Bytes of freed buffers MLX keeps for reuse; without a bound its cache grows with
    /// every batch shape it has seen.
    pub cache_limit_bytes: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            cpu_dtype: CpuDtype::Float32,
            prefill_chunk: 512,
            max_batch: 16,
            prefix_cache_bytes: 1 << 30,
            gpu_memory_fraction: 0.9,
            cache_limit_bytes: 1 << 30,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RagConfig {
    /// A LanceDB URI: a local folder (default under the home) or object storage.
    pub uri: String,
    pub default_embedding_model: Option<String>,
    /// A cross-encoder (or embedding model) that reorders retrieved chunks before the best
    /// `top_k` go into the prompt.
    pub rerank_model: Option<String>,
    pub top_k: usize,
    pub min_score: f32,
    /// Retrieval fuses vector search with the full-text index (BM25) by reciprocal rank;
    /// false searches by meaning only.
    pub hybrid: bool,
}

/// The effective configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub home: PathBuf,
    pub language: Lang,
    pub models_dir: PathBuf,
    pub host: String,
    pub port: u16,
    pub api_key: Option<String>,
    pub keep_alive: KeepAlive,
    pub max_loaded_models: usize,
    pub memory_limit: MemoryLimit,
    pub max_queue: usize,
    /// The context window of a request that sets no `num_ctx` (Ollama's OLLAMA_CONTEXT_LENGTH).
    pub context_length: usize,
    pub cors_origins: Vec<String>,
    pub max_body_bytes: u64,
    pub request_timeout: Duration,
    pub shutdown_timeout: Duration,
    /// Serve Prometheus metrics at /metrics (behind the API key when one is set).
    pub metrics: bool,
    pub engine: EngineConfig,
    pub rag: RagConfig,
}

impl Config {
    pub fn defaults(home: &Path) -> Config {
        Config {
            home: home.to_path_buf(),
            language: Lang::En,
            models_dir: home.join("models"),
            host: DEFAULT_HOST.to_string(),
            port: DEFAULT_PORT,
            api_key: None,
            keep_alive: KeepAlive::For(Duration::from_secs(300)),
            max_loaded_models: 3,
            memory_limit: MemoryLimit::Auto,
            max_queue: 64,
            context_length: 4096,
            cors_origins: Vec::new(),
            max_body_bytes: 32 << 20,
            request_timeout: Duration::from_secs(600),
            shutdown_timeout: Duration::from_secs(30),
            metrics: false,
            engine: EngineConfig::default(),
            rag: RagConfig {
                uri: home.join("rag").to_string_lossy().into_owned(),
                default_embedding_model: None,
                rerank_model: None,
                top_k: 4,
                min_score: 0.0,
                hybrid: true,
            },
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.home.join(CONFIG_FILE)
    }

    pub fn pid_path(&self) -> PathBuf {
        self.home.join("server.pid")
    }

    pub fn log_path(&self) -> PathBuf {
        self.home.join("server.log")
    }

    /// The base URL a client on this machine uses to reach the configured server.
    pub fn server_url(&self) -> String {
        let host = match self.host.as_str() {
            "0.0.0.0" | "" => "127.0.0.1",
            "::" => "[::1]",
            host if host.contains(':') && !host.starts_with('[') => return format!("http://[{host}]:{}", self.port),
            host => host,
        };
        format!("http://{host}:{}", self.port)
    }

    /// Applies one `key = value` setting, validating it. Keys are the TOML names, with
    /// dotted names for tables (`rag.uri`, `engine.cpu_dtype`).
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
        let spec = KEYS.iter().find(|spec| spec.name == key).ok_or_else(|| ConfigError::UnknownKey { key: key.to_string() })?;
        (spec.set)(self, value).map_err(|expected| ConfigError::InvalidValue { key: key.to_string(), value: value.to_string(), expected })
    }

    /// The value of one key as `config set` takes it.
    pub fn get(&self, key: &str) -> Option<String> {
        KEYS.iter().find(|spec| spec.name == key).map(|spec| (spec.get)(self))
    }

    /// Every key `config set` accepts, in file order.
    pub fn keys() -> impl Iterator<Item = &'static str> {
        KEYS.iter().map(|spec| spec.name)
    }

    /// The TOML document for this configuration (what `config setup` writes).
    pub fn to_toml(&self) -> String {
        let mut root = toml::Table::new();
        let mut engine = toml::Table::new();
        let mut rag = toml::Table::new();
        for spec in KEYS {
            let value = (spec.get)(self);
            if value.is_empty() {
                continue;
            }
            let value = spec.kind.toml(&value);
            match spec.name.split_once('.') {
                Some(("engine", name)) => engine.insert(name.to_string(), value),
                Some(("rag", name)) => rag.insert(name.to_string(), value),
                _ => root.insert(spec.name.to_string(), value),
            };
        }
        root.insert("engine".into(), toml::Value::Table(engine));
        root.insert("rag".into(), toml::Value::Table(rag));
        let body = toml::to_string_pretty(&root).unwrap_or_default();
        format!("# mlxserver configuration. Every key is documented in config.example.toml.\n\n{body}")
    }
}

/// How a key's value is written in TOML.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Integer,
    Float,
    Bool,
    /// Comma-separated in `config set`, an array in the file.
    List,
}

impl Kind {
    fn toml(self, value: &str) -> toml::Value {
        let text = || toml::Value::String(value.to_string());
        match self {
            Kind::Text => text(),
            Kind::Integer => value.parse::<i64>().map(toml::Value::Integer).unwrap_or_else(|_| text()),
            Kind::Float => value.parse::<f64>().map(toml::Value::Float).unwrap_or_else(|_| text()),
            Kind::Bool => value.parse::<bool>().map(toml::Value::Boolean).unwrap_or_else(|_| text()),
            Kind::List => toml::Value::Array(value.split(',').filter(|s| !s.is_empty()).map(|s| toml::Value::String(s.to_string())).collect()),
        }
    }
}

/// One configuration key, defined once: its name (the TOML name, dotted inside a table), its
/// TOML type, how it is read, and how a text value is checked and applied (the error is what
/// a valid value looks like).
struct KeySpec {
    name: &'static str,
    kind: Kind,
    get: fn(&Config) -> String,
    set: fn(&mut Config, &str) -> Result<(), &'static str>,
}

fn number<T: std::str::FromStr>(value: &str, valid: impl Fn(&T) -> bool, expected: &'static str) -> Result<T, &'static str> {
    value.trim().parse::<T>().ok().filter(valid).ok_or(expected)
}

fn optional_text(value: &str) -> Option<String> {
    let value = value.trim();
    (!value.is_empty()).then(|| value.to_string())
}

fn bytes_text(bytes: u64) -> String {
    format_bytes(bytes).replace(' ', "")
}

/// Every key, in file order.
const KEYS: &[KeySpec] = &[
    KeySpec { name: "language", kind: Kind::Text, get: |c| c.language.to_string(), set: |c, v| Ok(c.language = v.parse().map_err(|_| "en | ja")?) },
    KeySpec { name: "models_dir", kind: Kind::Text, get: |c| c.models_dir.display().to_string(), set: |c, v| Ok(c.models_dir = expand_home(v)) },
    KeySpec {
        name: "host",
        kind: Kind::Text,
        get: |c| c.host.clone(),
        set: |c, v| Ok(c.host = optional_text(v).ok_or("a host name or IP address")?),
    },
    KeySpec {
        name: "port",
        kind: Kind::Integer,
        get: |c| c.port.to_string(),
        set: |c, v| Ok(c.port = number(v, |port: &u16| *port > 0, "a port number from 1 to 65535")?),
    },
    KeySpec { name: "api_key", kind: Kind::Text, get: |c| c.api_key.clone().unwrap_or_default(), set: |c, v| Ok(c.api_key = optional_text(v)) },
    KeySpec {
        name: "keep_alive",
        kind: Kind::Text,
        get: |c| c.keep_alive.to_string(),
        set: |c, v| Ok(c.keep_alive = KeepAlive::parse(v).ok_or("a duration such as 5m, 30s or -1")?),
    },
    KeySpec {
        name: "max_loaded_models",
        kind: Kind::Integer,
        get: |c| c.max_loaded_models.to_string(),
        set: |c, v| Ok(c.max_loaded_models = number(v, |n: &usize| *n > 0, "a positive whole number")?),
    },
    KeySpec {
        name: "memory_limit",
        kind: Kind::Text,
        get: |c| c.memory_limit.to_string(),
        set: |c, v| Ok(c.memory_limit = MemoryLimit::parse(v).ok_or("bytes such as 8GiB, or auto")?),
    },
    KeySpec { name: "max_queue", kind: Kind::Integer, get: |c| c.max_queue.to_string(), set: |c, v| Ok(c.max_queue = number(v, |_: &usize| true, "a whole number")?) },
    KeySpec {
        name: "context_length",
        kind: Kind::Integer,
        get: |c| c.context_length.to_string(),
        set: |c, v| Ok(c.context_length = number(v, |n: &usize| *n >= 16, "a number of tokens, at least 16")?),
    },
    KeySpec {
        name: "cors_origins",
        kind: Kind::List,
        get: |c| c.cors_origins.join(","),
        set: |c, v| Ok(c.cors_origins = v.split(',').map(str::trim).filter(|o| !o.is_empty()).map(str::to_string).collect()),
    },
    KeySpec {
        name: "max_body_size",
        kind: Kind::Text,
        get: |c| bytes_text(c.max_body_bytes),
        set: |c, v| Ok(c.max_body_bytes = parse_bytes(v).filter(|b| *b > 0).ok_or("bytes such as 32MiB")?),
    },
    KeySpec {
        name: "request_timeout",
        kind: Kind::Text,
        get: |c| humantime::format_duration(c.request_timeout).to_string(),
        set: |c, v| Ok(c.request_timeout = parse_duration(v).ok_or("a duration such as 10m")?),
    },
    KeySpec {
        name: "shutdown_timeout",
        kind: Kind::Text,
        get: |c| humantime::format_duration(c.shutdown_timeout).to_string(),
        set: |c, v| Ok(c.shutdown_timeout = parse_duration(v).ok_or("a duration such as 30s")?),
    },
    KeySpec {
        name: "metrics",
        kind: Kind::Bool,
        get: |c| c.metrics.to_string(),
        set: |c, v| Ok(c.metrics = boolean(v)?),
    },
    KeySpec {
        name: "engine.cpu_dtype",
        kind: Kind::Text,
        get: |c| c.engine.cpu_dtype.to_string(),
        set: |c, v| Ok(c.engine.cpu_dtype = v.parse().map_err(|_| "float32 | float16 | bfloat16 | quantized")?),
    },
    KeySpec {
        name: "engine.prefill_chunk",
        kind: Kind::Integer,
        get: |c| c.engine.prefill_chunk.to_string(),
        set: |c, v| Ok(c.engine.prefill_chunk = number(v, |n: &usize| *n >= 16, "a whole number of at least 16")?),
    },
    KeySpec {
        name: "engine.max_batch",
        kind: Kind::Integer,
        get: |c| c.engine.max_batch.to_string(),
        set: |c, v| Ok(c.engine.max_batch = number(v, |n: &usize| *n > 0, "a positive whole number")?),
    },
    KeySpec {
        name: "engine.prefix_cache",
        kind: Kind::Text,
        get: |c| bytes_text(c.engine.prefix_cache_bytes),
        set: |c, v| Ok(c.engine.prefix_cache_bytes = parse_bytes(v).ok_or("bytes such as 1GiB, or 0 to turn it off")?),
    },
    KeySpec {
        name: "engine.gpu_memory_fraction",
        kind: Kind::Float,
        get: |c| c.engine.gpu_memory_fraction.to_string(),
        set: |c, v| Ok(c.engine.gpu_memory_fraction = number(v, |f: &f32| *f > 0.0 && *f <= 1.0, "a fraction above 0 and at most 1, such as 0.9")?),
    },
    KeySpec {
        name: "engine.cache_limit",
        kind: Kind::Text,
        get: |c| bytes_text(c.engine.cache_limit_bytes),
        set: |c, v| Ok(c.engine.cache_limit_bytes = parse_bytes(v).ok_or("bytes such as 1GiB")?),
    },
    KeySpec {
        name: "rag.uri",
        kind: Kind::Text,
        get: |c| c.rag.uri.clone(),
        set: |c, v| {
            let value = optional_text(v).ok_or("a folder or a LanceDB URI")?;
            c.rag.uri = if value.contains("://") { value } else { expand_home(&value).to_string_lossy().into_owned() };
            Ok(())
        },
    },
    KeySpec {
        name: "rag.default_embedding_model",
        kind: Kind::Text,
        get: |c| c.rag.default_embedding_model.clone().unwrap_or_default(),
        set: |c, v| Ok(c.rag.default_embedding_model = optional_text(v)),
    },
    KeySpec {
        name: "rag.rerank_model",
        kind: Kind::Text,
        get: |c| c.rag.rerank_model.clone().unwrap_or_default(),
        set: |c, v| Ok(c.rag.rerank_model = optional_text(v)),
    },
    KeySpec {
        name: "rag.top_k",
        kind: Kind::Integer,
        get: |c| c.rag.top_k.to_string(),
        set: |c, v| Ok(c.rag.top_k = number(v, |k: &usize| (1..=100).contains(k), "a whole number from 1 to 100")?),
    },
    KeySpec {
        name: "rag.min_score",
        kind: Kind::Float,
        get: |c| c.rag.min_score.to_string(),
        set: |c, v| Ok(c.rag.min_score = number(v, |s: &f32| s.is_finite(), "a number such as 0.3")?),
    },
    KeySpec {
        name: "rag.hybrid",
        kind: Kind::Bool,
        get: |c| c.rag.hybrid.to_string(),
        set: |c, v| Ok(c.rag.hybrid = boolean(v)?),
    },
];

fn boolean(value: &str) -> Result<bool, &'static str> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "on" | "yes" | "1" => Ok(true),
        "false" | "off" | "no" | "0" => Ok(false),
        _ => Err("true or false"),
    }
}

fn parse_duration(value: &str) -> Option<Duration> {
    let value = value.trim();
    value
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
        .or_else(|| humantime::parse_duration(value).ok())
}

/// Expands a leading `~` to the user's home folder.
pub fn expand_home(value: &str) -> PathBuf {
    let value = value.trim();
    if let Some(rest) = value.strip_prefix("~/") {
        if let Some(home) = dirs::home_dir() {
            return home.join(rest);
        }
    } else if value == "~" {
        if let Some(home) = dirs::home_dir() {
            return home;
        }
    }
    PathBuf::from(value)
}

/// The home folder: `MLXSERVER_HOME`, else `~/.my_mlx_server`.
pub fn home_dir() -> Result<PathBuf, ConfigError> {
    if let Some(home) = std::env::var_os("MLXSERVER_HOME").filter(|value| !value.is_empty()) {
        return Ok(expand_home(&home.to_string_lossy()));
    }
    dirs::home_dir().map(|home| home.join(".my_mlx_server")).ok_or(ConfigError::NoHome)
}

/// Flattens a TOML table into `(dotted key, value as text)` pairs.
fn flatten(table: &toml::Table, prefix: &str, out: &mut Vec<(String, String)>) {
    for (key, value) in table {
        let name = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
        match value {
            toml::Value::Table(inner) => flatten(inner, &name, out),
            toml::Value::String(text) => out.push((name, text.clone())),
            toml::Value::Array(items) => out.push((
                name,
                items
                    .iter()
                    .map(|item| item.as_str().map(str::to_string).unwrap_or_else(|| item.to_string()))
                    .collect::<Vec<_>>()
                    .join(","),
            )),
            other => out.push((name, other.to_string())),
        }
    }
}

/// Applies a TOML document over `config`.
fn apply_toml(config: &mut Config, source: &str, path: &Path) -> Result<(), ConfigError> {
    let table: toml::Table = toml::from_str(source)
        .map_err(|error| ConfigError::Parse { path: path.to_path_buf(), detail: error.message().to_string() })?;
    let mut pairs = Vec::new();
    flatten(&table, "", &mut pairs);
    for (key, value) in pairs {
        config.set(&key, &value)?;
    }
    Ok(())
}

/// Keys of the original Python mlxserver's `config.json` and their TOML names.
fn apply_legacy_json(config: &mut Config, source: &str, path: &Path) -> Result<(), ConfigError> {
    let value: serde_json::Value = serde_json::from_str(source)
        .map_err(|error| ConfigError::Parse { path: path.to_path_buf(), detail: error.to_string() })?;
    let Some(object) = value.as_object() else {
        return Err(ConfigError::Parse { path: path.to_path_buf(), detail: "not a JSON object".into() });
    };
    for (key, value) in object {
        let text = match value {
            serde_json::Value::Null => continue,
            serde_json::Value::String(text) => text.clone(),
            other => other.to_string(),
        };
        let target = match key.as_str() {
            "model_ttl" => "keep_alive",
            "language" | "models_dir" | "host" | "port" | "api_key" | "max_loaded_models" => key.as_str(),
            // The Python server's other keys have no counterpart here.
            _ => continue,
        };
        config.set(target, &text)?;
    }
    Ok(())
}

/// Environment variables that override the file (`MLXSERVER_<KEY>`, dots as underscores).
pub fn env_overrides() -> Vec<(&'static str, String)> {
    Config::keys()
        .filter_map(|key| {
            let name = format!("MLXSERVER_{}", key.replace('.', "_").to_ascii_uppercase());
            std::env::var(&name).ok().map(|value| (key, value))
        })
        .collect()
}

/// What happened while loading.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LoadReport {
    /// A legacy config.json was migrated into config.toml.
    pub migrated_from: Option<PathBuf>,
}

/// Loads the configuration of `home`: defaults, then the file, then the environment.
/// A legacy `config.json` is migrated to `config.toml` when no TOML file exists.
pub fn load_from(home: &Path) -> Result<(Config, LoadReport), ConfigError> {
    let mut config = Config::defaults(home);
    let mut report = LoadReport::default();
    let path = home.join(CONFIG_FILE);
    let legacy = home.join(LEGACY_CONFIG_FILE);
    if path.exists() {
        let source = fs::read_to_string(&path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
        apply_toml(&mut config, &source, &path)?;
    } else if legacy.exists() {
        let source =
            fs::read_to_string(&legacy).map_err(|source| ConfigError::Read { path: legacy.clone(), source })?;
        apply_legacy_json(&mut config, &source, &legacy)?;
        write_atomic(&path, config.to_toml().as_bytes())
            .map_err(|source| ConfigError::Write { path: path.clone(), source })?;
        report.migrated_from = Some(legacy);
    }
    for (key, value) in env_overrides() {
        config.set(key, &value)?;
    }
    Ok((config, report))
}

pub fn load() -> Result<(Config, LoadReport), ConfigError> {
    load_from(&home_dir()?)
}

/// The configured language, read without migrating or writing anything (the CLI needs it
/// before it parses its arguments).
pub fn peek_language(home: &Path) -> Option<Lang> {
    if let Ok(text) = fs::read_to_string(home.join(CONFIG_FILE)) {
        let table: toml::Table = toml::from_str(&text).ok()?;
        return table.get("language")?.as_str()?.parse().ok();
    }
    let text = fs::read_to_string(home.join(LEGACY_CONFIG_FILE)).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json["language"].as_str()?.parse().ok()
}

/// Sets one key in the config file of `home`, keeping the file's other settings and comments
/// of untouched tables, after checking that the whole file still loads.
pub fn set_in_file(home: &Path, key: &str, value: &str) -> Result<Config, ConfigError> {
    let path = home.join(CONFIG_FILE);
    // Validate the value on its own first, so the error names it.
    let mut probe = Config::defaults(home);
    probe.set(key, value)?;
    let existing = if path.exists() {
        fs::read_to_string(&path).map_err(|source| ConfigError::Read { path: path.clone(), source })?
    } else {
        String::new()
    };
    let mut table: toml::Table = toml::from_str(&existing)
        .map_err(|error| ConfigError::Parse { path: path.clone(), detail: error.message().to_string() })?;
    let canonical = probe.get(key).unwrap_or_default();
    let (section, name) = match key.split_once('.') {
        Some((section, name)) => (Some(section), name),
        None => (None, key),
    };
    let target = match section {
        Some(section) => table
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| ConfigError::Parse { path: path.clone(), detail: format!("{section} is not a table") })?,
        None => &mut table,
    };
    if canonical.is_empty() {
        target.remove(name);
    } else {
        let kind = KEYS.iter().find(|spec| spec.name == key).map_or(Kind::Text, |spec| spec.kind);
        target.insert(name.to_string(), kind.toml(&canonical));
    }
    let text = toml::to_string_pretty(&table).unwrap_or_default();
    let mut config = Config::defaults(home);
    apply_toml(&mut config, &text, &path)?;
    write_atomic(&path, text.as_bytes()).map_err(|source| ConfigError::Write { path: path.clone(), source })?;
    Ok(config)
}

/// Writes a whole configuration to the file of its home.
pub fn save(config: &Config) -> Result<(), ConfigError> {
    let path = config.config_path();
    write_atomic(&path, config.to_toml().as_bytes()).map_err(|source| ConfigError::Write { path, source })
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so a
/// reader never sees a half-written file and a crash leaves the old one intact.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(parent)?;
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temp = parent.join(format!(".{file_name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut file = fs::File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

/// The API key with all but its last four characters hidden.
pub fn mask_secret(secret: &str) -> String {
    let count = secret.chars().count();
    if count <= 4 {
        "*".repeat(count)
    } else {
        let visible: String = secret.chars().skip(count - 4).collect();
        format!("{}{}", "*".repeat(count - 4), visible)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_forms() {
        assert_eq!(KeepAlive::parse("5m"), Some(KeepAlive::For(Duration::from_secs(300))));
        assert_eq!(KeepAlive::parse("0"), Some(KeepAlive::Immediately));
        assert_eq!(KeepAlive::parse("-1"), Some(KeepAlive::Forever));
        assert_eq!(KeepAlive::parse("-5m"), Some(KeepAlive::Forever));
        assert_eq!(KeepAlive::parse("30"), Some(KeepAlive::For(Duration::from_secs(30))));
        assert_eq!(KeepAlive::parse("0s"), Some(KeepAlive::Immediately));
        assert_eq!(KeepAlive::parse("soon"), None);
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_bytes("8GiB"), Some(8 << 30));
        assert_eq!(parse_bytes("512MB"), Some(512 << 20));
        assert_eq!(parse_bytes("1.5G"), Some(3 << 29));
        assert_eq!(parse_bytes("1024"), Some(1024));
        assert_eq!(parse_bytes("12 parsecs"), None);
        assert_eq!(parse_bytes("-3GB"), None);
        assert_eq!(format_bytes(1536), "1.5 KiB");
    }

    #[test]
    fn masks_all_but_last_four() {
        assert_eq!(mask_secret("sk-secret-1234"), "**********1234");
        assert_eq!(mask_secret("abc"), "***");
    }

    #[test]
    fn set_validates() {
        let mut config = Config::defaults(Path::new("/tmp/x"));
        assert!(config.set("port", "70000").is_err());
        assert!(config.set("port", "0").is_err());
        assert!(config.set("language", "fr").is_err());
        assert!(matches!(config.set("nope", "1"), Err(ConfigError::UnknownKey { .. })));
        config.set("port", "8080").unwrap();
        assert_eq!(config.port, 8080);
    }

    #[test]
    fn toml_round_trip() {
        let mut config = Config::defaults(Path::new("/tmp/home"));
        config.set("api_key", "k").unwrap();
        config.set("rag.top_k", "7").unwrap();
        config.set("cors_origins", "http://a,http://b").unwrap();
        let text = config.to_toml();
        let mut again = Config::defaults(Path::new("/tmp/home"));
        apply_toml(&mut again, &text, Path::new("x")).unwrap();
        assert_eq!(config, again);
    }
}
