//! Adding documents to a collection: walk a folder, read text files, chunk them by tokens of
//! the embedding model, embed in batches on the engine and write each file in one commit.
//! Unchanged files (same content hash, fully stored) are skipped; changed files replace their
//! old chunks; files gone from the folder are removed from the collection.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::chunk::{self, Kind};
use super::{extract, quote, ChunkRow, Embedder, EmbedderError, Rag, RagError};
use crate::i18n::Msg;

#[derive(Debug, thiserror::Error)]
#[error("{}", self.msg())]
pub enum IngestError {
    Rag(#[from] RagError),
    /// The embedding model could not be loaded or run; the error is the embedder's own.
    Embedder(EmbedderError),
}

impl IngestError {
    pub fn msg(&self) -> Msg {
        match self {
            IngestError::Rag(error) => error.msg(),
            IngestError::Embedder(error) => Msg::new("engine.error.bad_request").arg("detail", error),
        }
    }
}

impl From<EmbedderError> for IngestError {
    fn from(error: EmbedderError) -> Self {
        IngestError::Embedder(error)
    }
}

fn model_name(model: &str) -> Result<String, IngestError> {
    crate::store::ModelName::parse(model).map(|name| name.to_string()).map_err(|error| IngestError::Embedder(Box::new(error)))
}

#[derive(Debug, Clone)]
pub struct IngestOptions {
    pub collection: String,
    pub model: String,
    pub chunk_size: usize,
    pub overlap: usize,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct IngestReport {
    pub files_added: usize,
    pub files_unchanged: usize,
    pub files_removed: usize,
    pub chunks_added: usize,
    /// Files of a type that is not read, or not valid UTF-8.
    pub skipped: usize,
    pub elapsed: Duration,
}

/// Progress callbacks for a front end (a progress bar in the CLI).
pub trait Progress: Send + Sync {
    fn start(&self, _files: usize) {}
    /// A file is done: indexed, found unchanged, or skipped.
    fn file(&self, _path: &Path) {}
    /// Chunks embedded so far in this run.
    fn chunks(&self, _embedded: usize) {}
}

impl Progress for () {}

pub fn content_hash(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// A document to add: where it came from, its text and how to cut it.
pub struct Document {
    pub source: String,
    pub text: String,
    pub kind: Kind,
}

impl Document {
    /// A document given as text (through the API): cut as its source name's type says,
    /// prose when the name says nothing.
    pub fn from_text(source: String, text: String) -> Document {
        let kind = extract::kind_of(Path::new(&source)).unwrap_or(Kind::Prose);
        Document { source, text, kind }
    }
}

/// Texts per call to the embedder: enough that length-sorted batches pad little.
const EMBED_BATCH: usize = 128;
/// A commit is made at this many rows, or this long after the last one (an interrupted run
/// loses little), and holds whole documents only.
const COMMIT_ROWS: usize = 2048;
const COMMIT_EVERY: Duration = Duration::from_secs(2);

/// A document whose chunks are being embedded.
struct Pending {
    source: String,
    hash: String,
    replaces_older: bool,
    rows: Vec<ChunkRow>,
    expected: usize,
}

/// Chunks and embeds documents into a collection. Documents are cut on a blocking thread
/// while the embedder works on earlier ones; chunks of several documents share embedding
/// batches; finished documents are written together, each whole in one commit, and a
/// changed document's old chunks are removed after its new ones are written (an
/// interruption leaves it readable). Returns the chunks written per document (0 for
/// documents already stored unchanged) and how many were unchanged.
pub async fn add_documents(rag: &Rag, embedder: &dyn Embedder, options: &IngestOptions, documents: Vec<Document>, progress: &dyn Progress) -> Result<(Vec<usize>, usize), IngestError> {
    let writer = rag.lock_writer(&options.collection).await?;
    let added = add_documents_locked(rag, embedder, options, documents, progress).await;
    writer.release().await;
    added
}

async fn add_documents_locked(rag: &Rag, embedder: &dyn Embedder, options: &IngestOptions, documents: Vec<Document>, progress: &dyn Progress) -> Result<(Vec<usize>, usize), IngestError> {
    let model = model_name(&options.model)?;
    let session = embedder.open(&model).await?;
    let dimensions = session.dimensions();
    let table = rag.collection_for(&options.collection, &model, dimensions).await?;
    let stored = Rag::stored_files(&table).await?;
    let mut written = vec![0; documents.len()];
    let mut unchanged = 0;
    let mut to_index = Vec::new();
    for (position, document) in documents.into_iter().enumerate() {
        let hash = content_hash(&document.text);
        let hashes_of_source: Vec<&String> = stored.keys().filter(|(s, _)| *s == document.source).map(|(_, h)| h).collect();
        let replaces_older = hashes_of_source.iter().any(|h| **h != hash);
        if hashes_of_source.iter().any(|h| **h == hash) {
            if replaces_older {
                Rag::delete_older_versions(&table, &document.source, &hash).await?;
            }
            unchanged += 1;
            progress.file(Path::new(&document.source));
            continue;
        }
        to_index.push((position, document, hash, replaces_older));
    }

    let tokenizer = session.tokenizer().clone();
    let (size, overlap) = (options.chunk_size, options.overlap);
    let (sender, mut receiver) = tokio::sync::mpsc::channel::<(usize, Pending, Vec<String>)>(8);
    let chunker = tokio::task::spawn_blocking(move || {
        let count = |text: &str| tokenizer.encode(text, false).map(|e| e.get_ids().len()).unwrap_or(text.len() / 4);
        let split_long = |text: &str, size: usize| -> Vec<String> {
            let Ok(encoding) = tokenizer.encode(text, false) else { return vec![text.to_string()] };
            let offsets = encoding.get_offsets();
            offsets.chunks(size).filter_map(|window| Some(text[window.first()?.0..window.last()?.1].to_string())).collect()
        };
        for (position, document, hash, replaces_older) in to_index {
            let chunks = chunk::chunk_kind(document.kind, &document.text, size, overlap, &count, &split_long);
            let pending = Pending { source: document.source, hash, replaces_older, rows: Vec::with_capacity(chunks.len()), expected: chunks.len() };
            if sender.blocking_send((position, pending, chunks)).is_err() {
                return;
            }
        }
    });

    let mut documents: HashMap<usize, Pending> = HashMap::new();
    // Chunks waiting for the embedder: (document position, chunk index, text).
    let mut queue: std::collections::VecDeque<(usize, usize, String)> = std::collections::VecDeque::new();
    let mut finished: Vec<(usize, Pending)> = Vec::new();
    let mut embedded = 0;
    let mut chunker_done = false;
    let mut last_commit = Instant::now();
    loop {
        // Keep a full batch queued while the chunker has more.
        while !chunker_done && queue.len() < EMBED_BATCH {
            let next = if queue.is_empty() { receiver.recv().await } else { receiver.try_recv().ok() };
            match next {
                Some((position, pending, chunks)) => {
                    if chunks.is_empty() {
                        finished.push((position, pending));
                    } else {
                        queue.extend(chunks.into_iter().enumerate().map(|(index, text)| (position, index, text)));
                        documents.insert(position, pending);
                    }
                }
                None if queue.is_empty() => chunker_done = true,
                None => break,
            }
        }
        if queue.is_empty() {
            break;
        }
        let (places, texts): (Vec<(usize, usize)>, Vec<String>) = queue.drain(..queue.len().min(EMBED_BATCH)).map(|(position, index, text)| ((position, index), text)).unzip();
        let vectors = session.embed(&texts).await?;
        embedded += texts.len();
        progress.chunks(embedded);
        for (((position, index), text), vector) in places.into_iter().zip(texts).zip(vectors) {
            let Some(document) = documents.get_mut(&position) else { continue };
            document.rows.push(ChunkRow { source: document.source.clone(), chunk_index: index as i32, content_hash: document.hash.clone(), text, vector });
            if document.rows.len() == document.expected {
                if let Some(document) = documents.remove(&position) {
                    finished.push((position, document));
                }
            }
        }
        let finished_rows: usize = finished.iter().map(|(_, document)| document.rows.len()).sum();
        if finished_rows >= COMMIT_ROWS || (!finished.is_empty() && last_commit.elapsed() >= COMMIT_EVERY) {
            commit(&table, &model, dimensions, std::mem::take(&mut finished), &mut written, progress).await?;
            last_commit = Instant::now();
        }
    }
    // The chunker has finished (its channel closed); a panic there is a bug worth reporting.
    chunker.await.map_err(|error| IngestError::Embedder(Box::new(error)))?;
    commit(&table, &model, dimensions, finished, &mut written, progress).await?;
    if written.iter().any(|n| *n > 0) {
        Rag::refresh_indices(&table).await?;
    }
    Ok((written, unchanged))
}

/// Writes finished documents in one commit, then removes what their older versions left.
async fn commit(table: &lancedb::Table, model: &str, dimensions: usize, finished: Vec<(usize, Pending)>, written: &mut [usize], progress: &dyn Progress) -> Result<(), IngestError> {
    let rows: Vec<ChunkRow> = finished.iter().flat_map(|(_, document)| document.rows.iter().cloned()).collect();
    Rag::add_chunks(table, model, dimensions, &rows).await?;
    for (position, document) in finished {
        if document.replaces_older {
            Rag::delete_older_versions(table, &document.source, &document.hash).await?;
        }
        written[position] = document.rows.len();
        progress.file(Path::new(&document.source));
    }
    Ok(())
}

/// Adds every readable document under `dir` (recursively).
pub async fn add_folder(rag: &Rag, embedder: &dyn Embedder, dir: &Path, options: &IngestOptions, progress: &dyn Progress) -> Result<IngestReport, IngestError> {
    let started = Instant::now();
    let dir = dir.canonicalize().map_err(|_| RagError::NotAFolder { path: dir.display().to_string() })?;
    if !dir.is_dir() {
        return Err(RagError::NotAFolder { path: dir.display().to_string() }.into());
    }
    let mut files: Vec<PathBuf> = walkdir::WalkDir::new(&dir)
        .follow_links(true)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_file())
        .map(|e| e.into_path())
        .filter(|p| !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
        .collect();
    files.sort();
    progress.start(files.len());
    let mut report = IngestReport::default();
    let mut documents = Vec::new();
    let mut seen = HashSet::new();
    for file in &files {
        match extract::read(file) {
            Ok(Some(extracted)) if !extracted.text.trim().is_empty() => {
                let source = file.display().to_string();
                seen.insert(source.clone());
                documents.push(Document { source, text: extracted.text, kind: extracted.kind });
            }
            outcome => {
                if let Err(error) = outcome {
                    tracing::warn!("skipping {}: {error}", file.display());
                }
                progress.file(file);
                report.skipped += 1;
            }
        }
    }
    // One lock over adding and removing: another writer sees the folder's state whole.
    let writer = rag.lock_writer(&options.collection).await?;
    let updated: Result<(), IngestError> = async {
        let (written, unchanged) = add_documents_locked(rag, embedder, options, documents, progress).await?;
        report.files_unchanged = unchanged;
        report.files_added = written.iter().filter(|n| **n > 0).count();
        report.chunks_added = written.iter().sum();
        // Files that were under this folder before and are gone now.
        let model = model_name(&options.model)?;
        let dimensions = embedder.open(&model).await?.dimensions();
        let table = rag.collection_for(&options.collection, &model, dimensions).await?;
        let prefix = format!("{}{}", dir.display(), std::path::MAIN_SEPARATOR);
        let stored: HashMap<(String, String), usize> = Rag::stored_files(&table).await?;
        let gone: HashSet<String> = stored.keys().map(|(s, _)| s.clone()).filter(|s| s.starts_with(&prefix) && !seen.contains(s)).collect();
        for source in &gone {
            Rag::delete(&table, &format!("source = {}", quote(source))).await?;
        }
        report.files_removed = gone.len();
        Ok(())
    }
    .await;
    // Released on failure too: on object storage a lock left to Drop may outlive a CLI run.
    writer.release().await;
    updated?;
    report.elapsed = started.elapsed();
    Ok(report)
}
