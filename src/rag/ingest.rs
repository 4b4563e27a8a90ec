//! Adding documents to a collection: walk a folder, read text files, chunk them by tokens of
//! the embedding model, embed in batches on the engine and write each file in one commit.
//! Unchanged files (same content hash, fully stored) are skipped; changed files replace their
//! old chunks; files gone from the folder are removed from the collection.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::{chunk, quote, ChunkRow, Embedder, EmbedderError, Rag, RagError};
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
    fn file(&self, _path: &Path) {}
}

impl Progress for () {}

/// A document's text, by its file type; None for types that are not read.
pub fn read_document(path: &Path) -> Option<String> {
    let extension = path.extension()?.to_string_lossy().to_ascii_lowercase();
    let bytes = std::fs::read(path).ok()?;
    let text = String::from_utf8(bytes).ok()?;
    match extension.as_str() {
        "txt" | "md" | "markdown" | "rst" | "text" => Some(text),
        "html" | "htm" => Some(html_to_text(&text)),
        _ => None,
    }
}

/// The visible text of an HTML page (tags, scripts and styles removed).
pub fn html_to_text(html: &str) -> String {
    let mut text = String::with_capacity(html.len());
    let lower = html.to_ascii_lowercase();
    let mut index = 0;
    while index < html.len() {
        if html[index..].starts_with('<') {
            for hidden in ["<script", "<style"] {
                if lower[index..].starts_with(hidden) {
                    let close = format!("</{}", &hidden[1..]);
                    index = lower[index..].find(&close).map(|end| index + end).unwrap_or(html.len());
                }
            }
            let tag_end = html[index..].find('>').map(|end| index + end + 1).unwrap_or(html.len());
            let tag = &lower[index..tag_end];
            if ["<p", "<br", "<div", "<h1", "<h2", "<h3", "<h4", "<li", "</p", "</div", "</h"].iter().any(|t| tag.starts_with(t)) {
                text.push_str("\n\n");
            }
            index = tag_end;
        } else {
            let next = html[index..].find('<').map(|n| index + n).unwrap_or(html.len());
            text.push_str(&html[index..next]);
            index = next;
        }
    }
    let text = text.replace("&nbsp;", " ").replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", "\"").replace("&#39;", "'").replace("&amp;", "&");
    let mut collapsed = String::new();
    for paragraph in text.split("\n\n") {
        let line = paragraph.split_whitespace().collect::<Vec<_>>().join(" ");
        if !line.is_empty() {
            collapsed.push_str(&line);
            collapsed.push_str("\n\n");
        }
    }
    collapsed.trim_end().to_string()
}

pub fn content_hash(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// A document to add: where it came from and its text.
pub struct Document {
    pub source: String,
    pub text: String,
}

/// Chunks and embeds documents into a collection, one commit per document. Returns the
/// chunks written per document (0 for documents already stored unchanged).
pub async fn add_documents(rag: &Rag, embedder: &dyn Embedder, options: &IngestOptions, documents: Vec<Document>, progress: &dyn Progress) -> Result<(Vec<usize>, usize), IngestError> {
    let model = model_name(&options.model)?;
    let session = embedder.open(&model).await?;
    let dimensions = session.dimensions();
    let table = rag.collection_for(&options.collection, &model, dimensions).await?;
    let stored = Rag::stored_files(&table).await?;
    let tokenizer = session.tokenizer();
    let count = |text: &str| tokenizer.encode(text, false).map(|e| e.get_ids().len()).unwrap_or(text.len() / 4);
    let split_long = |text: &str, size: usize| -> Vec<String> {
        let Ok(encoding) = tokenizer.encode(text, false) else { return vec![text.to_string()] };
        let offsets = encoding.get_offsets();
        offsets.chunks(size).filter_map(|window| Some(text[window.first()?.0..window.last()?.1].to_string())).collect()
    };
    let mut written = Vec::with_capacity(documents.len());
    let mut unchanged = 0;
    for document in documents {
        progress.file(Path::new(&document.source));
        let hash = content_hash(&document.text);
        let hashes_of_source: Vec<&String> = stored.keys().filter(|(s, _)| *s == document.source).map(|(_, h)| h).collect();
        let have_current = hashes_of_source.iter().any(|h| **h == hash);
        let have_stale = hashes_of_source.iter().any(|h| **h != hash);
        if have_current {
            if have_stale {
                Rag::delete(&table, &format!("source = {} AND content_hash != {}", quote(&document.source), quote(&hash))).await?;
            }
            unchanged += 1;
            written.push(0);
            continue;
        }
        let chunks = chunk::chunk(&document.text, options.chunk_size, options.overlap, &count, &split_long);
        let mut rows = Vec::with_capacity(chunks.len());
        for batch in chunks.chunks(32) {
            let embeddings = session.embed(batch).await?;
            for (text, vector) in batch.iter().zip(embeddings) {
                rows.push(ChunkRow { source: document.source.clone(), chunk_index: rows.len() as i32, content_hash: hash.clone(), text: text.clone(), vector });
            }
        }
        // New chunks first, then the old ones go: an interruption leaves the file readable.
        Rag::add_chunks(&table, &model, dimensions, &rows).await?;
        if have_stale {
            Rag::delete(&table, &format!("source = {} AND content_hash != {}", quote(&document.source), quote(&hash))).await?;
        }
        written.push(rows.len());
    }
    Ok((written, unchanged))
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
        match read_document(file) {
            Some(text) if !text.trim().is_empty() => {
                let source = file.display().to_string();
                seen.insert(source.clone());
                documents.push(Document { source, text });
            }
            _ => {
                progress.file(file);
                report.skipped += 1;
            }
        }
    }
    let (written, unchanged) = add_documents(rag, embedder, options, documents, progress).await?;
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
    report.elapsed = started.elapsed();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_text() {
        let html = "<html><head><style>p{}</style><script>var x=1;</script></head><body><h1>Title</h1><p>Hello &amp; welcome</p><p>Second</p></body></html>";
        assert_eq!(html_to_text(html), "Title\n\nHello & welcome\n\nSecond");
    }
}
