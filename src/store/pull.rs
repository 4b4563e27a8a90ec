//! `pull` from the Hugging Face Hub (through `hf-hub`, which honours `HF_ENDPOINT`; `HF_TOKEN`
//! is passed for gated repositories): read the repository's file list, tell its format,
//! download what is needed (resumable, digest-checked) and bring it into the store.

use std::path::{Path, PathBuf};

use hf_hub::api::tokio::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Repo, RepoType};
use sha2::{Digest, Sha256};

use super::{names::ModelName, Format, StoreError};
use crate::engine::ModelKind;

/// What a repository holds, as far as pulling is concerned.
#[derive(Debug, Clone, PartialEq)]
pub enum RepoFormat {
    /// GGUF files to choose from.
    Gguf { files: Vec<String> },
    /// A Hugging Face folder (config.json + safetensors); `mlx` when already MLX-quantized.
    Folder { mlx: bool },
}

/// A parsed `owner/repo[:revision]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RepoSpec {
    pub id: String,
    pub revision: String,
}

impl RepoSpec {
    pub fn parse(source: &str) -> Result<RepoSpec, StoreError> {
        let source = source.trim().trim_start_matches("https://huggingface.co/").trim_start_matches("hf.co/");
        let (id, revision) = match source.split_once(':') {
            Some((id, revision)) if !revision.is_empty() => (id, revision),
            _ => (source, "main"),
        };
        // Validate like a store name; the Hub's own names follow the same rules.
        let name = ModelName::parse(id)?;
        if name.owner.is_none() {
            return Err(StoreError::InvalidName { name: source.to_string(), reason: "Hub models are named OWNER/REPO" });
        }
        if revision.contains('/') && revision.contains("..") {
            return Err(StoreError::InvalidName { name: source.to_string(), reason: "invalid revision" });
        }
        Ok(RepoSpec { id: id.to_string(), revision: revision.to_string() })
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{}", self.msg())]
pub enum PullError {
    Store(#[from] StoreError),
    NotFound(String),
    Gated(String),
    Unsupported { repo: String, reason: String },
    Download { file: String, reason: String },
    Digest { file: String, expected: String, actual: String },
    Convert(String),
}

impl PullError {
    pub fn msg(&self) -> crate::i18n::Msg {
        use crate::msg;
        match self {
            PullError::Store(error) => error.msg(),
            PullError::NotFound(repo) => msg!("pull.error.not_found", repo = repo),
            PullError::Gated(repo) => msg!("pull.error.gated", repo = repo),
            PullError::Unsupported { repo, reason } => msg!("pull.error.unsupported", repo = repo, reason = reason),
            PullError::Download { file, reason } => msg!("pull.error.download", file = file, reason = reason),
            PullError::Digest { file, expected, actual } => msg!("pull.error.digest", file = file, expected = expected, actual = actual),
            PullError::Convert(reason) => msg!("pull.error.convert", reason = reason),
        }
    }
}

/// Picks the files of a repository listing that matter, and its format.
pub fn detect(files: &[String]) -> Option<RepoFormat> {
    let has = |name: &str| files.iter().any(|f| f == name);
    let safetensors = files.iter().any(|f| f.ends_with(".safetensors"));
    if has("config.json") && safetensors {
        return Some(RepoFormat::Folder { mlx: false });
    }
    let ggufs: Vec<String> = files.iter().filter(|f| f.to_ascii_lowercase().ends_with(".gguf")).cloned().collect();
    if !ggufs.is_empty() {
        return Some(RepoFormat::Gguf { files: ggufs });
    }
    None
}

/// GGUF quantizations MLX can load, in order of preference for a default choice.
const GGUF_PREFERENCE: &[&str] = &["Q4_0", "Q4_1", "Q8_0", "F16", "BF16", "F32"];

/// The GGUF file to take: the one asked for, else the preferred quantization MLX supports.
pub fn choose_gguf(files: &[String], asked: Option<&str>) -> Result<String, String> {
    if let Some(asked) = asked {
        return files.iter().find(|f| f.as_str() == asked || f.rsplit('/').next() == Some(asked)).cloned().ok_or_else(|| {
            format!("no file {asked}; the repository has: {}", files.join(", "))
        });
    }
    for quantization in GGUF_PREFERENCE {
        if let Some(file) = files.iter().find(|f| f.to_ascii_uppercase().contains(quantization)) {
            return Ok(file.clone());
        }
    }
    if files.len() == 1 && !files[0].to_ascii_uppercase().contains("_K") {
        return Ok(files[0].clone());
    }
    Err(format!(
        "none of its GGUF files uses a quantization MLX can load (Q4_0, Q4_1, Q8_0, F16, F32); pick one with --file from: {}",
        files.join(", ")
    ))
}

/// Files of a Hugging Face folder worth downloading.
pub fn folder_files(files: &[String]) -> Vec<String> {
    files
        .iter()
        .filter(|f| {
            let name = f.as_str();
            name.ends_with(".safetensors")
                || matches!(
                    name,
                    "config.json"
                        | "model.safetensors.index.json"
                        | "tokenizer.json"
                        | "tokenizer_config.json"
                        | "generation_config.json"
                        | "special_tokens_map.json"
                        | "chat_template.jinja"
                        | "modules.json"
                        | "sentence_bert_config.json"
                        | "config_sentence_transformers.json"
                        | "1_Pooling/config.json"
                )
        })
        .cloned()
        .collect()
}

/// Progress of a pull, for a front end (progress bars, Ollama's progress objects).
pub trait PullProgress: Send + Sync {
    fn status(&self, _status: &str) {}
    fn file_started(&self, _file: &str, _total: u64) {}
    fn file_progress(&self, _file: &str, _completed: u64) {}
    fn file_done(&self, _file: &str) {}
}

impl PullProgress for () {}

// hf-hub's progress callbacks must be 'static; events travel over a channel to the caller's
// (borrowed) progress reporter.
enum FileEvent {
    Started(u64),
    Progress(u64),
    Done,
}

#[derive(Clone)]
struct ChannelProgress {
    sender: tokio::sync::mpsc::UnboundedSender<FileEvent>,
    completed: u64,
}

impl hf_hub::api::tokio::Progress for ChannelProgress {
    async fn init(&mut self, size: usize, _filename: &str) {
        let _ = self.sender.send(FileEvent::Started(size as u64));
    }
    async fn update(&mut self, size: usize) {
        self.completed += size as u64;
        let _ = self.sender.send(FileEvent::Progress(self.completed));
    }
    async fn finish(&mut self) {
        let _ = self.sender.send(FileEvent::Done);
    }
}

fn forward(progress: &dyn PullProgress, file: &str, event: FileEvent) {
    match event {
        FileEvent::Started(total) => progress.file_started(file, total),
        FileEvent::Progress(completed) => progress.file_progress(file, completed),
        FileEvent::Done => progress.file_done(file),
    }
}

fn map_api_error(repo: &str, file: &str, error: ApiError) -> PullError {
    let text = error.to_string();
    if text.contains("404") {
        PullError::NotFound(repo.to_string())
    } else if text.contains("401") || text.contains("403") {
        PullError::Gated(repo.to_string())
    } else {
        PullError::Download { file: file.to_string(), reason: text }
    }
}

pub struct Hub {
    repo: ApiRepo,
    spec: RepoSpec,
}

impl Hub {
    /// Connects to the Hub (or `HF_ENDPOINT`), caching downloads under `cache_dir`.
    pub fn new(spec: RepoSpec, cache_dir: &Path) -> Result<Hub, PullError> {
        let token = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty());
        let api = ApiBuilder::from_env()
            .with_cache_dir(cache_dir.to_path_buf())
            .with_token(token)
            .with_progress(false)
            .build()
            .map_err(|e| PullError::Download { file: String::new(), reason: e.to_string() })?;
        let repo = api.repo(Repo::with_revision(spec.id.clone(), RepoType::Model, spec.revision.clone()));
        Ok(Hub { repo, spec })
    }

    /// The repository's files and commit.
    pub async fn files(&self) -> Result<(Vec<String>, String), PullError> {
        let info = self.repo.info().await.map_err(|e| map_api_error(&self.spec.id, "", e))?;
        Ok((info.siblings.into_iter().map(|s| s.rfilename).collect(), info.sha))
    }

    /// Downloads one file (resuming a partial download) and checks its digest against the
    /// ETag the Hub gives LFS files (their sha256).
    pub async fn download(&self, file: &str, progress: &dyn PullProgress) -> Result<PathBuf, PullError> {
        // hf-hub keeps finished chunks of a broken download; each retry resumes after them.
        let retries: usize = std::env::var("MLXSERVER_PULL_RETRIES").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
        let mut attempt = 0;
        loop {
            match self.download_once(file, progress).await {
                Err(PullError::Download { reason, .. }) if attempt < retries => {
                    attempt += 1;
                    tracing::warn!(file, attempt, %reason, "download failed; resuming");
                    progress.status(&format!("retrying {file}"));
                    tokio::time::sleep(std::time::Duration::from_millis(500 * attempt as u64)).await;
                }
                other => return other,
            }
        }
    }

    async fn download_once(&self, file: &str, progress: &dyn PullProgress) -> Result<PathBuf, PullError> {
        let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
        let reporter = ChannelProgress { sender, completed: 0 };
        let download = self.repo.download_with_progress(file, reporter);
        tokio::pin!(download);
        let path = loop {
            tokio::select! {
                result = &mut download => break result.map_err(|e| map_api_error(&self.spec.id, file, e))?,
                Some(event) = receiver.recv() => forward(progress, file, event),
            }
        };
        while let Ok(event) = receiver.try_recv() {
            forward(progress, file, event);
        }
        verify_blob(&path, file)?;
        Ok(path)
    }
}

/// hf-hub stores each file as a blob named by its ETag; for LFS files that is the content's
/// sha256, which is checked here.
fn verify_blob(path: &Path, file: &str) -> Result<(), PullError> {
    let Ok(blob) = std::fs::canonicalize(path) else { return Ok(()) };
    let Some(expected) = blob.file_name().map(|n| n.to_string_lossy().into_owned()) else { return Ok(()) };
    if expected.len() != 64 || !expected.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(());
    }
    let mut hasher = Sha256::new();
    let mut reader = std::fs::File::open(&blob).map_err(|e| PullError::Download { file: file.into(), reason: e.to_string() })?;
    std::io::copy(&mut reader, &mut hasher).map_err(|e| PullError::Download { file: file.into(), reason: e.to_string() })?;
    let actual = hex::encode(hasher.finalize());
    if actual != expected {
        let _ = std::fs::remove_file(&blob);
        return Err(PullError::Digest { file: file.into(), expected, actual });
    }
    Ok(())
}

/// The kind of model a downloaded folder holds. BERT folders are embedding models, cross-
/// encoders (`BertForSequenceClassification`, rerankers) included: the engine loads them with
/// their classification head and their frontend says `cross_encoder`.
pub fn folder_kind(folder: &Path) -> ModelKind {
    let text = std::fs::read_to_string(folder.join("config.json")).unwrap_or_default();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let bert = json["model_type"] == "bert"
        || json["architectures"].as_array().is_some_and(|a| a.iter().any(|v| v.as_str().is_some_and(|s| s.starts_with("Bert"))));
    if bert {
        ModelKind::Embedding
    } else {
        ModelKind::Chat
    }
}

/// Whether a folder's config.json marks MLX-quantized weights.
pub fn folder_format(folder: &Path) -> Format {
    let text = std::fs::read_to_string(folder.join("config.json")).unwrap_or_default();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    if json.get("quantization").is_some() {
        Format::Mlx
    } else {
        Format::Safetensors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn repo_specs() {
        assert_eq!(RepoSpec::parse("HuggingFaceTB/SmolLM2-135M-Instruct").unwrap(), RepoSpec { id: "HuggingFaceTB/SmolLM2-135M-Instruct".into(), revision: "main".into() });
        assert_eq!(RepoSpec::parse("a/b:v1.0").unwrap().revision, "v1.0");
        assert!(RepoSpec::parse("no-owner").is_err());
        assert!(RepoSpec::parse("../../etc").is_err());
    }

    #[test]
    fn formats_and_choices() {
        assert_eq!(detect(&list(&["config.json", "model.safetensors", "tokenizer.json"])), Some(RepoFormat::Folder { mlx: false }));
        let ggufs = list(&["x.Q2_K.gguf", "x.Q4_K_M.gguf", "x.Q8_0.gguf", "README.md"]);
        assert_eq!(detect(&ggufs), Some(RepoFormat::Gguf { files: list(&["x.Q2_K.gguf", "x.Q4_K_M.gguf", "x.Q8_0.gguf"]) }));
        assert_eq!(choose_gguf(&list(&["x.Q2_K.gguf", "x.Q4_K_M.gguf", "x.Q8_0.gguf"]), None).unwrap(), "x.Q8_0.gguf");
        assert_eq!(choose_gguf(&list(&["x.Q4_K_M.gguf", "x.Q4_0.gguf"]), Some("x.Q4_K_M.gguf")).unwrap(), "x.Q4_K_M.gguf");
        assert!(choose_gguf(&list(&["x.Q4_K_M.gguf", "x.Q5_K_S.gguf"]), None).unwrap_err().contains("--file"));
        assert_eq!(detect(&list(&["pytorch_model.bin", "config.json"])), None);
    }
}

/// Options of a pull.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Name in the store (default: the repository id, or the file/folder name).
    pub name: Option<String>,
    /// Which GGUF file to take.
    pub file: Option<String>,
    /// Quantize to this many bits on the way in (Hugging Face folders).
    pub quantize: Option<i32>,
    /// Replace a model of the same name pulled from another source.
    pub force: bool,
}

/// What a pull does with its name.
enum Plan {
    /// The name is free.
    Fresh,
    /// The model there is replaced (a newer revision, broken files, or `force`).
    Replace,
    /// The same source is there, whole: nothing to fetch.
    UpToDate(super::BaseModel),
}

/// Decides a pull's plan. A re-pull of the same source verifies the stored files (and, for
/// the Hub, that no newer revision exists: `current` is the revision's source string); another
/// source under a taken name needs `force`.
fn plan(store: &super::Store, name: &ModelName, options: &PullOptions, same_source: impl Fn(&str) -> bool, current: Option<&str>) -> Result<Plan, PullError> {
    if !store.exists(name) {
        return Ok(Plan::Fresh);
    }
    let Some(base) = store.base(name)? else {
        // A personality has the name.
        return Err(StoreError::AlreadyExists { name: name.to_string() }.into());
    };
    let quantization_matches = options.quantize.is_none_or(|bits| base.manifest.quantization.as_deref() == Some(&format!("{bits}bit")));
    if !(same_source(&base.manifest.source) && quantization_matches) {
        return if options.force { Ok(Plan::Replace) } else { Err(StoreError::Taken { name: name.to_string(), from: base.manifest.source.clone() }.into()) };
    }
    let current_revision = current.is_none_or(|current| current == base.manifest.source);
    if current_revision && store.verify(&base) {
        Ok(Plan::UpToDate(base))
    } else {
        Ok(Plan::Replace)
    }
}

fn convert_error(error: crate::engine::EngineError) -> PullError {
    PullError::Convert(error.to_string())
}

/// Links (or copies) a downloaded file into a staging folder.
fn place(from: &Path, to: &Path) -> Result<(), PullError> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).map_err(|e| StoreError::Io { path: parent.to_path_buf(), reason: e.to_string() })?;
    }
    let from = std::fs::canonicalize(from).unwrap_or_else(|_| from.to_path_buf());
    if std::fs::hard_link(&from, to).is_err() {
        super::copy_file(&from, to)?;
    }
    Ok(())
}

/// The family (an unknown one names the supported ones), then headers, tensor names and
/// shapes against config.json: a broken model is refused before it is listed.
fn check_architecture(folder: &Path, repo: &str) -> Result<(), PullError> {
    crate::engine::validate::check_folder(folder).map_err(|problem| PullError::Unsupported { repo: repo.into(), reason: problem })
}

/// Converts a GGUF file into the staging folder (quantization kept, MLX layout).
async fn convert_gguf(engine: &crate::engine::Engine, gguf: PathBuf, staging: PathBuf) -> Result<Option<String>, PullError> {
    let report = engine
        .run(move || crate::engine::convert::gguf_to_folder(&gguf, &staging, crate::engine::convert::WeightFormat::KeepQuantized))
        .await
        .map_err(convert_error)?
        .map_err(convert_error)?;
    Ok(report.quantization)
}

/// Quantizes the folder `staging` into a fresh staging folder, which replaces it.
async fn quantize_staged(store: &super::Store, engine: &crate::engine::Engine, name: &ModelName, staging: PathBuf, bits: i32) -> Result<PathBuf, PullError> {
    let quantized = store.staging_folder(name)?;
    let (source, out) = (staging.clone(), quantized.clone());
    let outcome = engine.run(move || crate::engine::convert::quantize_folder(&source, &out, bits, 64)).await.map_err(convert_error)?;
    let _ = std::fs::remove_dir_all(&staging);
    match outcome {
        Ok(_) => Ok(quantized),
        Err(error) => {
            let _ = std::fs::remove_dir_all(&quantized);
            Err(convert_error(error))
        }
    }
}

/// Adds a model from the Hub, or from a local GGUF file or model folder, to the store.
pub async fn pull(store: &super::Store, engine: &crate::engine::Engine, source: &str, options: &PullOptions, progress: &dyn PullProgress) -> Result<super::BaseModel, PullError> {
    let local = Path::new(source);
    if local.exists() {
        return pull_local(store, engine, local, options, progress).await;
    }
    let spec = RepoSpec::parse(source)?;
    let name = ModelName::parse(options.name.as_deref().unwrap_or(&spec.id))?;
    let repository = format!("hf:{}@", spec.id);
    let same_repository = |stored: &str| stored.starts_with(&repository);
    // Another source under the name is refused before anything is fetched.
    plan(store, &name, options, same_repository, None)?;
    let hub = Hub::new(spec.clone(), &store.root().join(".hf-cache"))?;
    progress.status("pulling manifest");
    let (files, commit) = hub.files().await?;
    let replace = match plan(store, &name, options, same_repository, Some(&format!("{repository}{commit}")))? {
        Plan::UpToDate(base) => {
            progress.status("success");
            return Ok(base);
        }
        Plan::Replace => true,
        Plan::Fresh => false,
    };
    let format = detect(&files).ok_or_else(|| PullError::Unsupported {
        repo: spec.id.clone(),
        reason: "it has neither safetensors weights with a config.json nor GGUF files (PyTorch .bin checkpoints are not supported)".into(),
    })?;
    let mut staging = store.staging_folder(&name)?;
    let result: Result<super::BaseModel, PullError> = async {
        let (kind, stored_format, source_format, quantization) = match format {
            RepoFormat::Gguf { files } => {
                let file = choose_gguf(&files, options.file.as_deref()).map_err(|reason| PullError::Unsupported { repo: spec.id.clone(), reason })?;
                let path = hub.download(&file, progress).await?;
                progress.status("converting");
                let quantization = convert_gguf(engine, path, staging.clone()).await?;
                (ModelKind::Chat, Format::Mlx, Format::Gguf, quantization)
            }
            RepoFormat::Folder { .. } => {
                for file in folder_files(&files) {
                    let path = hub.download(&file, progress).await?;
                    place(&path, &staging.join(&file))?;
                }
                check_architecture(&staging, &spec.id)?;
                let kind = folder_kind(&staging);
                let source_format = folder_format(&staging);
                let mut quantization = None;
                if let Some(bits) = options.quantize {
                    if kind == ModelKind::Embedding {
                        return Err(PullError::Unsupported { repo: spec.id.clone(), reason: "embedding models are not quantized".into() });
                    }
                    progress.status("quantizing");
                    staging = quantize_staged(store, engine, &name, staging.clone(), bits).await?;
                    quantization = Some(format!("{bits}bit"));
                }
                let stored = if quantization.is_some() { Format::Mlx } else { source_format };
                (kind, stored, source_format, quantization.or_else(|| (source_format == Format::Mlx).then(|| "mlx".to_string())))
            }
        };
        progress.status("writing manifest");
        let manifest = super::Manifest {
            name: name.to_string(),
            kind,
            format: stored_format,
            source_format,
            source: format!("{repository}{commit}"),
            entry: ".".into(),
            size: 0,
            digest: String::new(),
            quantization,
            created_at: chrono::Utc::now(),
        };
        Ok(store.finish_base(&staging, &name, manifest, replace)?)
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    progress.status("success");
    result
}

async fn pull_local(store: &super::Store, engine: &crate::engine::Engine, path: &Path, options: &PullOptions, progress: &dyn PullProgress) -> Result<super::BaseModel, PullError> {
    let path = path.canonicalize().map_err(|e| StoreError::InvalidSource { path: path.to_path_buf(), reason: e.to_string() })?;
    let default_name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let name = ModelName::parse(options.name.as_deref().unwrap_or(&default_name))?;
    let source = format!("file:{}", path.display());
    let replace = match plan(store, &name, options, |stored| stored == source, None)? {
        Plan::UpToDate(base) => {
            progress.status("success");
            return Ok(base);
        }
        Plan::Replace => true,
        Plan::Fresh => false,
    };
    let (source_format, _) = super::detect_local_format(&path)?;
    let mut staging = store.staging_folder(&name)?;
    let result: Result<super::BaseModel, PullError> = async {
        let (kind, mut quantization) = if source_format == Format::Gguf {
            progress.status("converting");
            (ModelKind::Chat, convert_gguf(engine, path.clone(), staging.clone()).await?)
        } else {
            super::copy_folder(&path, &staging)?;
            check_architecture(&staging, &path.display().to_string())?;
            (folder_kind(&staging), super::quantization_of(&path, source_format))
        };
        let mut stored_format = if source_format == Format::Gguf { Format::Mlx } else { source_format };
        if let Some(bits) = options.quantize {
            progress.status("quantizing");
            staging = quantize_staged(store, engine, &name, staging.clone(), bits).await?;
            quantization = Some(format!("{bits}bit"));
            stored_format = Format::Mlx;
        }
        let manifest = super::Manifest {
            name: name.to_string(),
            kind,
            format: stored_format,
            source_format,
            source,
            entry: ".".into(),
            size: 0,
            digest: String::new(),
            quantization,
            created_at: chrono::Utc::now(),
        };
        Ok(store.finish_base(&staging, &name, manifest, replace)?)
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result
}
