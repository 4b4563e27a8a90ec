//! The model store under `models_dir`: base models (one folder each, with a `manifest.json`)
//! and personalities (a Modelfile layered on a base model).
//!
//! Every write goes to a temporary folder or file beside its target and is renamed into
//! place, so a crash or Ctrl-C never leaves a half-written model that `list` shows or `run`
//! loads. Names are checked so none can point outside `models_dir`.

pub mod modelfile;
pub mod names;
pub mod pull;

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::engine::ModelKind;
use crate::i18n::Msg;
use crate::msg;
pub use modelfile::{Modelfile, Parameters};
pub use names::ModelName;

pub const MANIFEST: &str = "manifest.json";
const PERSONALITIES: &str = ".personalities";

#[derive(Debug, thiserror::Error)]
#[error("{}", self.msg())]
pub enum StoreError {
    InvalidName { name: String, reason: &'static str },
    NotFound { name: String },
    AlreadyExists { name: String },
    /// The name holds a model pulled from another source.
    Taken { name: String, from: String },
    Io { path: PathBuf, reason: String },
    InvalidSource { path: PathBuf, reason: String },
    Corrupt { name: String, reason: String },
    Modelfile { line: usize, reason: String },
    InUse { name: String, users: Vec<String> },
    Cycle { name: String },
}

impl StoreError {
    pub fn msg(&self) -> Msg {
        match self {
            StoreError::InvalidName { name, reason } => msg!("store.error.invalid_name", name = name, reason = reason),
            StoreError::NotFound { name } => msg!("store.error.not_found", name = name),
            StoreError::AlreadyExists { name } => msg!("store.error.exists", name = name),
            StoreError::Taken { name, from } => msg!("store.error.taken", name = name, source = from),
            StoreError::Io { path, reason } => msg!("store.error.io", path = path.display(), reason = reason),
            StoreError::InvalidSource { path, reason } => msg!("store.error.invalid_source", path = path.display(), reason = reason),
            StoreError::Corrupt { name, reason } => msg!("store.error.corrupt", name = name, reason = reason),
            StoreError::Modelfile { line, reason } => msg!("store.error.modelfile", line = line, reason = reason),
            StoreError::InUse { name, users } => msg!("store.error.in_use", name = name, users = users.join(", ")),
            StoreError::Cycle { name } => msg!("store.error.cycle", name = name),
        }
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

fn io_error(path: &Path, error: impl std::fmt::Display) -> StoreError {
    StoreError::Io { path: path.to_path_buf(), reason: error.to_string() }
}

/// The format a base model is stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Gguf,
    Safetensors,
    Mlx,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Gguf => "gguf",
            Format::Safetensors => "safetensors",
            Format::Mlx => "mlx",
        }
    }
}

/// What `manifest.json` records about a base model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub name: String,
    pub kind: ModelKind,
    /// The format of the files in the folder.
    pub format: Format,
    /// The format it came in, before any conversion.
    pub source_format: Format,
    /// Where it came from: `hf:owner/repo@revision` or `file:/path`.
    pub source: String,
    /// The file or folder (relative to the model folder) the engine loads.
    pub entry: String,
    pub size: u64,
    /// sha256 over the files, in name order.
    pub digest: String,
    /// e.g. "Q4_1", "4bit", or None for full precision.
    pub quantization: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// A base model as found on disk.
#[derive(Debug, Clone)]
pub struct BaseModel {
    pub manifest: Manifest,
    pub folder: PathBuf,
}

impl BaseModel {
    fn config_json(&self) -> Option<serde_json::Value> {
        let text = fs::read_to_string(self.folder.join("config.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// The model's family (its Hugging Face `model_type`, e.g. "qwen3").
    pub fn family(&self) -> Option<String> {
        let json = self.config_json()?;
        let family = json["model_type"].as_str().or_else(|| json["text_config"]["model_type"].as_str())?;
        Some(family.to_string())
    }

    /// For a cross-encoder (reranker, `BertForSequenceClassification` in config.json): its
    /// number of labels (from `id2label`, else `num_labels`, else 1). None for other models.
    pub fn cross_encoder_labels(&self) -> Option<usize> {
        let json = self.config_json()?;
        if !crate::engine::loader::is_cross_encoder(&json) {
            return None;
        }
        let labels = json["id2label"].as_object().map(|m| m.len()).or_else(|| json["num_labels"].as_u64().map(|n| n as usize)).unwrap_or(1);
        Some(labels.max(1))
    }

    /// Parameters of the model, from its config.json (None for embedding models and
    /// folders whose family is unknown).
    pub fn parameter_count(&self) -> Option<u64> {
        let json = self.config_json()?;
        crate::engine::decoder::DecoderConfig::from_hf(&json).ok().map(|c| c.parameter_count())
    }

    /// The model's context length, from its config.json.
    pub fn context_length(&self) -> Option<usize> {
        let text = fs::read_to_string(self.folder.join("config.json")).ok()?;
        let json: serde_json::Value = serde_json::from_str(&text).ok()?;
        json["max_position_embeddings"].as_u64().map(|n| n as usize)
    }

    /// The path the engine loads.
    pub fn entry_path(&self) -> PathBuf {
        if self.manifest.entry.is_empty() || self.manifest.entry == "." {
            self.folder.clone()
        } else {
            self.folder.join(&self.manifest.entry)
        }
    }
}

/// A personality: a Modelfile over a base model or another personality.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Personality {
    pub name: String,
    pub modelfile: Modelfile,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// A name resolved to its base model and the personality layers on top, outermost last.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub name: String,
    pub base: BaseModel,
    pub layers: Vec<Personality>,
}

impl Resolved {
    /// The effective Modelfile: layers applied in order, later ones overriding.
    pub fn effective(&self) -> Modelfile {
        let mut effective = Modelfile { from: self.base.manifest.name.clone(), ..Default::default() };
        for layer in &self.layers {
            effective.overlay(&layer.modelfile);
        }
        effective
    }
}

pub enum Entry {
    Base(BaseModel),
    Personality(Personality),
}

#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    pub fn new(models_dir: impl Into<PathBuf>) -> Store {
        Store { root: models_dir.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn base_folder(&self, name: &ModelName) -> PathBuf {
        self.root.join(name.folder_name())
    }

    fn personality_path(&self, name: &ModelName) -> PathBuf {
        self.root.join(PERSONALITIES).join(format!("{}.json", name.folder_name()))
    }

    pub fn base(&self, name: &ModelName) -> Result<Option<BaseModel>> {
        let folder = self.base_folder(name);
        let manifest_path = folder.join(MANIFEST);
        if !manifest_path.is_file() {
            return Ok(None);
        }
        let text = fs::read_to_string(&manifest_path).map_err(|e| io_error(&manifest_path, e))?;
        let manifest: Manifest = serde_json::from_str(&text)
            .map_err(|e| StoreError::Corrupt { name: name.to_string(), reason: format!("manifest.json: {e}") })?;
        Ok(Some(BaseModel { manifest, folder }))
    }

    pub fn personality(&self, name: &ModelName) -> Result<Option<Personality>> {
        let path = self.personality_path(name);
        if !path.is_file() {
            return Ok(None);
        }
        let text = fs::read_to_string(&path).map_err(|e| io_error(&path, e))?;
        serde_json::from_str(&text).map(Some).map_err(|e| StoreError::Corrupt { name: name.to_string(), reason: e.to_string() })
    }

    /// Resolves a model or personality name (Ollama's `:latest` tag accepted).
    pub fn resolve(&self, raw: &str) -> Result<Resolved> {
        let name = ModelName::parse(raw)?;
        let mut layers = Vec::new();
        let mut current = name.clone();
        loop {
            if let Some(personality) = self.personality(&current)? {
                if layers.len() > 16 || layers.iter().any(|p: &Personality| p.name == personality.name) {
                    return Err(StoreError::Cycle { name: name.to_string() });
                }
                let next = ModelName::parse(&personality.modelfile.from)?;
                layers.push(personality);
                current = next;
                continue;
            }
            if let Some(base) = self.base(&current)? {
                layers.reverse();
                return Ok(Resolved { name: name.to_string(), base, layers });
            }
            return Err(StoreError::NotFound { name: if layers.is_empty() { name.to_string() } else { current.to_string() } });
        }
    }

    /// Everything in the store, base models first, each group by name.
    pub fn list(&self) -> Result<Vec<Entry>> {
        let mut entries = Vec::new();
        if let Ok(read) = fs::read_dir(&self.root) {
            let mut folders: Vec<PathBuf> = read.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.join(MANIFEST).is_file()).collect();
            folders.sort();
            for folder in folders {
                let Some(name) = folder.file_name().and_then(|n| ModelName::from_folder_name(&n.to_string_lossy())) else { continue };
                if let Ok(Some(base)) = self.base(&name) {
                    entries.push(Entry::Base(base));
                }
            }
        }
        if let Ok(read) = fs::read_dir(self.root.join(PERSONALITIES)) {
            let mut files: Vec<PathBuf> = read.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "json")).collect();
            files.sort();
            for file in files {
                let Some(name) = file.file_stem().and_then(|n| ModelName::from_folder_name(&n.to_string_lossy())) else { continue };
                if let Ok(Some(personality)) = self.personality(&name) {
                    entries.push(Entry::Personality(personality));
                }
            }
        }
        Ok(entries)
    }

    pub fn exists(&self, name: &ModelName) -> bool {
        self.base_folder(name).join(MANIFEST).is_file() || self.personality_path(name).is_file()
    }

    /// A fresh hidden folder beside the final one, for building a model in.
    pub fn staging_folder(&self, name: &ModelName) -> Result<PathBuf> {
        fs::create_dir_all(&self.root).map_err(|e| io_error(&self.root, e))?;
        let staging = self.root.join(format!(".partial-{}-{}-{}", name.folder_name(), std::process::id(), uuid::Uuid::new_v4().simple()));
        fs::create_dir_all(&staging).map_err(|e| io_error(&staging, e))?;
        Ok(staging)
    }

    /// Measures and digests a staged model, writes its manifest, and renames it into place.
    /// With `replace`, a model already under the name is swapped out in one step (the old
    /// files end in the staging folder, which is then removed).
    pub fn finish_base(&self, staging: &Path, name: &ModelName, mut manifest: Manifest, replace: bool) -> Result<BaseModel> {
        let (size, digest) = digest_folder(staging)?;
        manifest.size = size;
        manifest.digest = format!("sha256:{digest}");
        let json = serde_json::to_vec_pretty(&manifest).map_err(|e| io_error(staging, e))?;
        write_file(&staging.join(MANIFEST), &json)?;
        let target = self.base_folder(name);
        if target.exists() {
            if !replace {
                return Err(StoreError::AlreadyExists { name: name.to_string() });
            }
            exchange(staging, &target)?;
            let _ = fs::remove_dir_all(staging);
        } else {
            fs::rename(staging, &target).map_err(|e| io_error(&target, e))?;
        }
        Ok(BaseModel { manifest, folder: target })
    }

    /// Whether a stored model's files are still what its manifest recorded.
    pub fn verify(&self, base: &BaseModel) -> bool {
        digest_folder(&base.folder).is_ok_and(|(size, digest)| size == base.manifest.size && format!("sha256:{digest}") == base.manifest.digest)
    }

    /// Removes leftovers of interrupted writes (called when `serve` and `pull` start). A
    /// staging folder whose writer (the process id in its name) still runs is left alone: it
    /// is another pull in progress, not a leftover.
    pub fn clean_partials(&self) {
        if let Ok(read) = fs::read_dir(&self.root) {
            for entry in read.filter_map(|e| e.ok()) {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(".partial-") && !writer_alive(&name) {
                    let _ = fs::remove_dir_all(entry.path());
                }
            }
        }
        if let Ok(read) = fs::read_dir(self.root.join(PERSONALITIES)) {
            for entry in read.filter_map(|e| e.ok()) {
                if temp_writer_alive(&entry.file_name().to_string_lossy()) == Some(false) {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
    }
}

/// Swaps two folders. On Linux in one step (`renameat2` with `RENAME_EXCHANGE`), so a crash
/// leaves either the old model or the new one in place, never neither; elsewhere the old one
/// first moves aside into a staging name (cleaned at the next start).
fn exchange(staging: &Path, target: &Path) -> Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let (Ok(from), Ok(to)) = (std::ffi::CString::new(staging.as_os_str().as_bytes()), std::ffi::CString::new(target.as_os_str().as_bytes())) else {
            return Err(io_error(target, "a path holds a NUL byte"));
        };
        // SAFETY: both are valid NUL-terminated paths; AT_FDCWD resolves them as given.
        let done = unsafe { libc::renameat2(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), libc::RENAME_EXCHANGE) } == 0;
        if done {
            return Ok(());
        }
    }
    let aside = staging.with_file_name(format!("{}-old", staging.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()));
    fs::rename(target, &aside).map_err(|e| io_error(target, e))?;
    fs::rename(staging, target).map_err(|e| io_error(target, e))?;
    fs::rename(&aside, staging).map_err(|e| io_error(staging, e))
}

/// Whether the process that made the staging folder `name` (`.partial-NAME-PID-UUID`) runs.
fn writer_alive(name: &str) -> bool {
    let mut parts = name.rsplitn(3, '-');
    let (_uuid, pid) = (parts.next(), parts.next().and_then(|p| p.parse::<i32>().ok()));
    pid.is_some_and(other_process_alive)
}

/// Whether the writer of a temporary file of `write_atomic` (`.NAME.PID.tmp`) still runs;
/// `None` for a name of another shape.
fn temp_writer_alive(name: &str) -> Option<bool> {
    let pid = name.strip_prefix('.')?.strip_suffix(".tmp")?.rsplit('.').next()?.parse::<i32>().ok()?;
    Some(other_process_alive(pid))
}

fn other_process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    pid > 0 && pid != std::process::id() as i32 && unsafe { libc::kill(pid, 0) == 0 }
}

impl Store {
    /// Creates (or replaces) a personality. Its FROM must name an existing model or
    /// personality, and it may not take the name of a base model.
    pub fn create_personality(&self, name: &str, modelfile: Modelfile) -> Result<Personality> {
        let parsed = ModelName::parse(name)?;
        if self.base(&parsed)?.is_some() {
            return Err(StoreError::AlreadyExists { name: parsed.to_string() });
        }
        let from = ModelName::parse(&modelfile.from)?;
        if from == parsed {
            return Err(StoreError::Cycle { name: parsed.to_string() });
        }
        self.resolve(&from.to_string())?;
        let personality = Personality { name: parsed.to_string(), modelfile: Modelfile { from: from.to_string(), ..modelfile }, created_at: chrono::Utc::now() };
        // A personality whose chain leads back to itself is refused before it is written.
        let path = self.personality_path(&parsed);
        let json = serde_json::to_vec_pretty(&personality).map_err(|e| io_error(&path, e))?;
        let previous = fs::read(&path).ok();
        write_file(&path, &json)?;
        if let Err(error) = self.resolve(&parsed.to_string()) {
            match previous {
                Some(bytes) => write_file(&path, &bytes)?,
                None => {
                    let _ = fs::remove_file(&path);
                }
            }
            return Err(error);
        }
        Ok(personality)
    }

    /// Copies a model or personality to a new name.
    pub fn copy(&self, source: &str, destination: &str) -> Result<()> {
        let source = ModelName::parse(source)?;
        let destination = ModelName::parse(destination)?;
        if self.exists(&destination) {
            // Copying again onto a finished copy succeeds, so a `cp` interrupted after its
            // last step can simply be run again.
            if self.is_copy_of(&source, &destination)? {
                return Ok(());
            }
            return Err(StoreError::AlreadyExists { name: destination.to_string() });
        }
        if let Some(personality) = self.personality(&source)? {
            let copy = Personality { name: destination.to_string(), modelfile: personality.modelfile, created_at: chrono::Utc::now() };
            let path = self.personality_path(&destination);
            let json = serde_json::to_vec_pretty(&copy).map_err(|e| io_error(&path, e))?;
            return write_file(&path, &json);
        }
        let base = self.base(&source)?.ok_or_else(|| StoreError::NotFound { name: source.to_string() })?;
        let staging = self.staging_folder(&destination)?;
        let result = copy_folder(&base.folder, &staging).and_then(|()| {
            let manifest = Manifest { name: destination.to_string(), created_at: chrono::Utc::now(), ..base.manifest.clone() };
            self.finish_base(&staging, &destination, manifest, false).map(|_| ())
        });
        if result.is_err() {
            let _ = fs::remove_dir_all(&staging);
        }
        result
    }

    /// Whether `copy` is already what copying `source` would make: the same files for a base
    /// model (and intact), the same Modelfile for a personality.
    fn is_copy_of(&self, source: &ModelName, copy: &ModelName) -> Result<bool> {
        if let (Some(original), Some(existing)) = (self.personality(source)?, self.personality(copy)?) {
            return Ok(original.modelfile == existing.modelfile);
        }
        if let (Some(original), Some(existing)) = (self.base(source)?, self.base(copy)?) {
            return Ok(original.manifest.digest == existing.manifest.digest && self.verify(&existing));
        }
        Ok(false)
    }

    /// Personalities whose FROM chain ends at base model `name`.
    pub fn users_of(&self, name: &ModelName) -> Result<Vec<String>> {
        let mut users = Vec::new();
        for entry in self.list()? {
            if let Entry::Personality(personality) = entry {
                if let Ok(resolved) = self.resolve(&personality.name) {
                    if resolved.base.manifest.name == name.to_string() {
                        users.push(personality.name);
                    }
                }
            }
        }
        users.sort();
        Ok(users)
    }

    /// Removes a personality, or a base model (refused while personalities use it, unless
    /// `force`). The folder is renamed away first, so a crash never leaves half a model.
    pub fn remove(&self, name: &str, force: bool) -> Result<()> {
        let name = ModelName::parse(name)?;
        let personality_path = self.personality_path(&name);
        if personality_path.is_file() {
            return fs::remove_file(&personality_path).map_err(|e| io_error(&personality_path, e));
        }
        let folder = self.base_folder(&name);
        if !folder.join(MANIFEST).is_file() {
            return Err(StoreError::NotFound { name: name.to_string() });
        }
        let users = self.users_of(&name)?;
        if !users.is_empty() && !force {
            return Err(StoreError::InUse { name: name.to_string(), users });
        }
        let doomed = self.root.join(format!(".partial-removing-{}-{}", name.folder_name(), uuid::Uuid::new_v4().simple()));
        fs::rename(&folder, &doomed).map_err(|e| io_error(&folder, e))?;
        fs::remove_dir_all(&doomed).map_err(|e| io_error(&doomed, e))
    }
}

/// Writes a quantized copy of a base model as a new base model (default name
/// `NAME-<bits>bit`). Returns the size before and the new model.
pub async fn quantize(store: &Store, engine: &crate::engine::Engine, name: &str, bits: i32, group_size: i32, output: Option<&str>) -> std::result::Result<(u64, BaseModel), pull::PullError> {
    let resolved = store.resolve(name)?;
    let base = resolved.base;
    if base.manifest.kind != ModelKind::Chat {
        return Err(pull::PullError::Unsupported { repo: base.manifest.name.clone(), reason: "embedding models are not quantized".into() });
    }
    let target = ModelName::parse(&output.map(str::to_string).unwrap_or_else(|| format!("{}-{bits}bit", base.manifest.name)))?;
    if store.exists(&target) {
        // The same quantization already finished (say, by a run that was killed after its
        // last step): running it again succeeds without redoing it.
        return match store.base(&target)? {
            Some(existing) if is_quantization_of(&existing, &base, bits, group_size) && store.verify(&existing) => Ok((base.manifest.size, existing)),
            _ => Err(StoreError::AlreadyExists { name: target.to_string() }.into()),
        };
    }
    let staging = store.staging_folder(&target)?;
    let (source, out) = (base.entry_path(), staging.clone());
    let outcome = engine
        .run(move || crate::engine::convert::quantize_folder(&source, &out, bits, group_size))
        .await
        .map_err(|e| pull::PullError::Convert(e.to_string()))
        .and_then(|r| r.map_err(|e| pull::PullError::Convert(e.to_string())));
    let result = outcome.and_then(|report| {
        let manifest = Manifest {
            name: target.to_string(),
            kind: ModelKind::Chat,
            format: Format::Mlx,
            source_format: base.manifest.source_format,
            source: format!("quantized:{}", base.manifest.name),
            entry: ".".into(),
            size: 0,
            digest: String::new(),
            quantization: report.quantization,
            created_at: chrono::Utc::now(),
        };
        Ok(store.finish_base(&staging, &target, manifest, false)?)
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    result.map(|model| (base.manifest.size, model))
}

fn is_quantization_of(existing: &BaseModel, base: &BaseModel, bits: i32, group_size: i32) -> bool {
    let stored_group_size = fs::read_to_string(existing.folder.join("config.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|config| config["quantization"]["group_size"].as_i64());
    existing.manifest.source == format!("quantized:{}", base.manifest.name)
        && existing.manifest.quantization.as_deref() == Some(format!("{bits}bit").as_str())
        && stored_group_size == Some(i64::from(group_size))
}

/// Works out what a local path holds and which entry the engine loads.
pub(crate) fn detect_local_format(source: &Path) -> Result<(Format, String)> {
    let invalid = |reason: &str| StoreError::InvalidSource { path: source.to_path_buf(), reason: reason.to_string() };
    if source.is_file() {
        let mut magic = [0u8; 4];
        fs::File::open(source).and_then(|mut f| f.read_exact(&mut magic)).map_err(|e| invalid(&e.to_string()))?;
        if &magic != b"GGUF" {
            return Err(invalid("not a GGUF file"));
        }
        return Ok((Format::Gguf, "model.gguf".to_string()));
    }
    let config = source.join("config.json");
    if !config.is_file() {
        return Err(invalid("the folder has no config.json"));
    }
    let has_safetensors = fs::read_dir(source)
        .map_err(|e| invalid(&e.to_string()))?
        .filter_map(|e| e.ok())
        .any(|e| e.path().extension().is_some_and(|x| x == "safetensors"));
    if !has_safetensors {
        return Err(invalid("the folder has no .safetensors weights"));
    }
    let text = fs::read_to_string(&config).map_err(|e| invalid(&e.to_string()))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| invalid(&format!("config.json: {e}")))?;
    let format = if json.get("quantization").is_some() { Format::Mlx } else { Format::Safetensors };
    Ok((format, ".".to_string()))
}

pub(crate) fn quantization_of(source: &Path, format: Format) -> Option<String> {
    match format {
        Format::Gguf => {
            let name = source.file_name()?.to_string_lossy().to_uppercase();
            ["Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K_M", "Q4_K_S", "Q5_0", "Q5_1", "Q5_K_M", "Q6_K", "Q8_0", "F16", "F32", "BF16"]
                .iter()
                .find(|q| name.contains(*q))
                .map(|q| q.to_string())
        }
        Format::Mlx => {
            let text = fs::read_to_string(source.join("config.json")).ok()?;
            let json: serde_json::Value = serde_json::from_str(&text).ok()?;
            json["quantization"]["bits"].as_u64().map(|bits| format!("{bits}bit"))
        }
        Format::Safetensors => None,
    }
}

/// Copies a file through a temporary name in the destination folder.
pub fn copy_file(from: &Path, to: &Path) -> Result<()> {
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent).map_err(|e| io_error(parent, e))?;
    }
    let temp = to.with_extension("partial");
    fs::copy(from, &temp).map_err(|e| io_error(from, e))?;
    fs::rename(&temp, to).map_err(|e| io_error(to, e))
}

pub(crate) fn copy_folder(from: &Path, to: &Path) -> Result<()> {
    for entry in walkdir::WalkDir::new(from).follow_links(true) {
        let entry = entry.map_err(|e| io_error(from, e))?;
        let relative = entry.path().strip_prefix(from).map_err(|e| io_error(from, e))?;
        let target = to.join(relative);
        if entry.file_type().is_dir() {
            fs::create_dir_all(&target).map_err(|e| io_error(&target, e))?;
        } else if relative.as_os_str() != MANIFEST {
            copy_file(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// Writes a file through a temporary name and a rename.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::config::write_atomic(path, bytes).map_err(|e| io_error(path, e))
}

/// Total size and sha256 over the files of a folder (names and contents, in name order).
pub fn digest_folder(folder: &Path) -> Result<(u64, String)> {
    let mut files: Vec<PathBuf> = walkdir::WalkDir::new(folder)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_file() && e.file_name() != MANIFEST)
        .map(|e| e.into_path())
        .collect();
    files.sort();
    let mut hasher = Sha256::new();
    let mut size = 0;
    let mut buffer = vec![0u8; 1 << 20];
    for file in files {
        let relative = file.strip_prefix(folder).unwrap_or(&file);
        hasher.update(relative.to_string_lossy().as_bytes());
        let mut reader = fs::File::open(&file).map_err(|e| io_error(&file, e))?;
        loop {
            let read = reader.read(&mut buffer).map_err(|e| io_error(&file, e))?;
            if read == 0 {
                break;
            }
            hasher.update(&buffer[..read]);
            size += read as u64;
        }
    }
    Ok((size, hex::encode(hasher.finalize())))
}

#[cfg(test)]
mod writer_tests {
    #[test]
    fn staging_folders_of_running_writers_are_kept() {
        // Process 1 always runs; a pid beyond the kernel's limit never does.
        assert!(super::writer_alive(".partial-smol-1-0123abcd"));
        assert!(!super::writer_alive(".partial-smol-2147483646-0123abcd"));
        assert!(!super::writer_alive(".partial-removing-smol-0123abcd"));
        assert_eq!(super::temp_writer_alive(".cat.json.2147483646.tmp"), Some(false));
        assert_eq!(super::temp_writer_alive(".cat.json.1.tmp"), Some(true));
        assert_eq!(super::temp_writer_alive("cat.json"), None);
    }
}
