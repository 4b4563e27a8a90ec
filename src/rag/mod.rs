//! Retrieval-augmented generation on LanceDB.
//!
//! One table per collection (at `rag.uri`: a local folder by default, or any LanceDB URI),
//! holding each chunk's text, source file, index, the file's content hash and its embedding.
//! The table's schema metadata records the embedding model and dimension that built it, so
//! searching or adding with another model is refused instead of returning garbage.
//!
//! Ingestion ([`ingest`]) is resumable: each file's chunks are written in one commit, and a
//! file is skipped only when its current hash is already stored in full.

pub mod chunk;
pub mod extract;
pub mod ingest;

use std::collections::HashMap;
use std::sync::Arc;

use futures::TryStreamExt;
use lancedb::arrow::arrow_array::{
    Array, FixedSizeListArray, Float32Array, Int32Array, RecordBatch, StringArray,
};
use lancedb::arrow::arrow_schema::{DataType, Field, Schema};
use lancedb::query::{ExecutableQuery, QueryBase, Select};
use lancedb::{Connection, DistanceType, Table};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::i18n::Msg;
use crate::msg;

pub const DEFAULT_COLLECTION: &str = "default";
const MODEL_KEY: &str = "mlxserver.embedding_model";
const DIMENSION_KEY: &str = "mlxserver.dimension";
/// Chunks from which a collection gets an approximate (IVF-PQ) vector index.
pub const VECTOR_INDEX_MIN_ROWS: usize = 100_000;

/// An error of the embedder, kept whole so the HTTP layer can map it to its status.
pub type EmbedderError = Box<dyn std::error::Error + Send + Sync>;

/// What indexing and retrieval need of an embedding model. The service implements it over
/// the engine; `rag` knows nothing of the service.
pub trait Embedder: Send + Sync {
    /// Loads `model`; it stays loaded while the session lives.
    fn open<'a>(&'a self, model: &'a str) -> futures::future::BoxFuture<'a, std::result::Result<Box<dyn EmbeddingSession>, EmbedderError>>;
}

/// A loaded embedding model.
pub trait EmbeddingSession: Send + Sync {
    /// Chunks are measured and cut in this tokenizer's tokens.
    fn tokenizer(&self) -> &tokenizers::Tokenizer;
    fn dimensions(&self) -> usize;
    /// One vector per text (texts longer than the model's window are cut).
    fn embed<'a>(&'a self, texts: &'a [String]) -> futures::future::BoxFuture<'a, std::result::Result<Vec<Vec<f32>>, EmbedderError>>;
}

#[derive(Debug, thiserror::Error)]
#[error("{}", self.msg())]
pub enum RagError {
    InvalidCollection { name: String },
    NoCollection { name: String },
    ModelMismatch { collection: String, built_with: String, requested: String },
    Database(String),
    NotAFolder { path: String },
    NoEmbeddingModel,
}

impl RagError {
    pub fn msg(&self) -> Msg {
        match self {
            RagError::InvalidCollection { name } => msg!("rag.error.invalid_collection", name = name),
            RagError::NoCollection { name } => msg!("rag.error.no_collection", name = name),
            RagError::ModelMismatch { collection, built_with, requested } => {
                msg!("rag.error.model_mismatch", collection = collection, built = built_with, requested = requested)
            }
            RagError::Database(detail) => msg!("rag.error.database", detail = detail),
            RagError::NotAFolder { path } => msg!("rag.error.not_a_folder", path = path),
            RagError::NoEmbeddingModel => msg!("rag.error.no_model"),
        }
    }
}

impl From<lancedb::Error> for RagError {
    fn from(error: lancedb::Error) -> Self {
        RagError::Database(error.to_string())
    }
}

impl From<lancedb::arrow::arrow_schema::ArrowError> for RagError {
    fn from(error: lancedb::arrow::arrow_schema::ArrowError) -> Self {
        RagError::Database(error.to_string())
    }
}

pub type Result<T> = std::result::Result<T, RagError>;

pub fn check_collection(name: &str) -> Result<()> {
    let valid = !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') && !name.starts_with('-');
    if valid {
        Ok(())
    } else {
        Err(RagError::InvalidCollection { name: name.to_string() })
    }
}

/// One chunk as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkRow {
    pub source: String,
    pub chunk_index: i32,
    pub content_hash: String,
    pub text: String,
    pub vector: Vec<f32>,
}

/// A retrieved chunk with its similarity to the question.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Source {
    /// 1-based, as cited in the answer: [1], [2], ...
    pub index: usize,
    /// The file the chunk came from.
    pub source: String,
    pub chunk_index: i32,
    /// Cosine similarity (-1 to 1), or the reranker's relevance when one reordered the
    /// chunks (`rag.rerank_model`).
    pub score: f32,
    pub text: String,
}

/// What `rag status` reports of a collection.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct CollectionStatus {
    pub name: String,
    pub embedding_model: String,
    pub dimension: usize,
    pub files: usize,
    pub chunks: usize,
    /// Bytes on disk (local tables only).
    pub size_bytes: Option<u64>,
}

/// The document index.
#[derive(Clone)]
pub struct Rag {
    connection: Connection,
    uri: String,
}

fn schema(model: &str, dimension: usize) -> Arc<Schema> {
    let metadata: HashMap<String, String> =
        [(MODEL_KEY.to_string(), model.to_string()), (DIMENSION_KEY.to_string(), dimension.to_string())].into_iter().collect();
    Arc::new(
        Schema::new(vec![
            Field::new("source", DataType::Utf8, false),
            Field::new("chunk_index", DataType::Int32, false),
            Field::new("content_hash", DataType::Utf8, false),
            Field::new("text", DataType::Utf8, false),
            Field::new("vector", DataType::FixedSizeList(Arc::new(Field::new("item", DataType::Float32, true)), dimension as i32), false),
        ])
        .with_metadata(metadata),
    )
}

/// SQL string literal for LanceDB filters.
pub fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// The indices a collection has, of those ingestion keeps.
struct Indexed {
    /// A full-text index on `text`.
    text: bool,
    /// Any index on `vector`.
    vector: bool,
}

/// Held while one process writes a collection; released when dropped (on object storage,
/// [`WriterLock::release`] removes the lock at once; dropping leaves it to a spawned task).
pub struct WriterLock {
    _file: Option<std::fs::File>,
    /// On object storage: the lock table this writer created.
    remote: Option<(lancedb::Connection, String)>,
    /// On object storage: the task writing the lock's heartbeat.
    heartbeat: Option<tokio::task::JoinHandle<()>>,
}

/// A lock on object storage whose holder has given no sign of life (its creation or its last
/// heartbeat) for this long was left by a writer that died; it is removed.
const REMOTE_LOCK_STALE: std::time::Duration = std::time::Duration::from_secs(5 * 60);
/// How often a holder of a lock on object storage adds a heartbeat row to it.
#[cfg(not(test))]
const LOCK_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(60);
#[cfg(test)]
const LOCK_HEARTBEAT: std::time::Duration = std::time::Duration::from_millis(100);
const LOCK_CREATED_KEY: &str = "mlxserver.lock_created_unix";

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs()
}

fn lock_schema(created: u64) -> Arc<Schema> {
    Arc::new(Schema::new(vec![Field::new("holder", DataType::Utf8, true)]).with_metadata([(LOCK_CREATED_KEY.to_string(), created.to_string())].into_iter().collect()))
}

/// A lock table's heartbeat row: the current time.
fn heartbeat_row(created: u64) -> std::result::Result<RecordBatch, lancedb::arrow::arrow_schema::ArrowError> {
    RecordBatch::try_new(lock_schema(created), vec![Arc::new(StringArray::from(vec![unix_now().to_string()]))])
}

/// Adds a row holding the current time to the lock table every [`LOCK_HEARTBEAT`], so that
/// a writer busy for longer than [`REMOTE_LOCK_STALE`] keeps its lock.
fn start_heartbeat(lock: Table, created: u64) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(LOCK_HEARTBEAT).await;
            match heartbeat_row(created) {
                Ok(beat) => {
                    if let Err(error) = lock.add(beat).execute().await {
                        tracing::warn!(%error, lock = lock.name(), "could not write the collection lock's heartbeat");
                    }
                }
                Err(error) => tracing::warn!(%error, "heartbeat row"),
            }
        }
    })
}

/// When the holder of a lock on object storage was last heard from: its creation or its
/// latest heartbeat, in Unix seconds.
async fn lock_last_alive(lock: &Table) -> Result<Option<u64>> {
    let created = lock.schema().await?.metadata().get(LOCK_CREATED_KEY).and_then(|t| t.parse::<u64>().ok());
    let batches: Vec<RecordBatch> = lock.query().select(Select::columns(&["holder"])).execute().await?.try_collect().await?;
    let mut last = created;
    for batch in &batches {
        let beats = string_column(batch, "holder")?;
        for row in 0..batch.num_rows() {
            if let Ok(beat) = beats.value(row).parse::<u64>() {
                last = Some(last.map_or(beat, |last| last.max(beat)));
            }
        }
    }
    Ok(last)
}

impl WriterLock {
    pub async fn release(mut self) {
        if let Some(heartbeat) = self.heartbeat.take() {
            heartbeat.abort();
        }
        if let Some((connection, name)) = self.remote.take() {
            if let Err(error) = connection.drop_table(&name, &[]).await {
                tracing::warn!(%error, lock = name, "could not remove the collection's write lock");
            }
        }
    }
}

impl Drop for WriterLock {
    fn drop(&mut self) {
        if let Some(heartbeat) = self.heartbeat.take() {
            heartbeat.abort();
        }
        if let Some((connection, name)) = self.remote.take() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let _ = connection.drop_table(&name, &[]).await;
                });
            }
        }
    }
}

impl Rag {
    /// Waits until no other process (another server, a `rag add-docs`) writes `collection`,
    /// and keeps it so until the lock is dropped. Readers never wait. Two writers that decide
    /// what to add from what is stored would otherwise both add the same new file; LanceDB's
    /// own conflict handling keeps each commit whole but does not see such duplicates.
    /// Object storage has no file locks: there the lock is a table `<collection>.writer`,
    /// created by whoever takes it (LanceDB's create is a conditional put: one wins), kept
    /// alive by a heartbeat row every LOCK_HEARTBEAT and dropped when done; one whose holder
    /// has been silent for REMOTE_LOCK_STALE was left by a writer that died and is removed.
    pub async fn lock_writer(&self, collection: &str) -> Result<WriterLock> {
        check_collection(collection)?;
        let Some(root) = self.local_root() else {
            return self.lock_writer_remote(collection).await;
        };
        let path = root.join(format!(".{collection}.write-lock"));
        let file = tokio::task::spawn_blocking(move || -> std::io::Result<std::fs::File> {
            let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path)?;
            #[cfg(unix)]
            {
                use std::os::fd::AsRawFd;
                // SAFETY: flock on a descriptor this function owns; the lock ends with it.
                if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(file)
        })
        .await
        .map_err(|e| RagError::Database(e.to_string()))?
        .map_err(|e| RagError::Database(format!("locking the collection {collection}: {e}")))?;
        Ok(WriterLock { _file: Some(file), remote: None, heartbeat: None })
    }

    async fn lock_writer_remote(&self, collection: &str) -> Result<WriterLock> {
        let name = format!("{collection}.writer");
        let mut wait = std::time::Duration::from_millis(50);
        loop {
            let now = unix_now();
            match self.connection.create_empty_table(&name, lock_schema(now)).execute().await {
                Ok(lock) => {
                    let heartbeat = Some(start_heartbeat(lock, now));
                    return Ok(WriterLock { _file: None, remote: Some((self.connection.clone(), name)), heartbeat });
                }
                Err(lancedb::Error::TableAlreadyExists { .. }) => {
                    let last_alive = match self.connection.open_table(&name).execute().await {
                        Ok(lock) => lock_last_alive(&lock).await?,
                        // Released between our create and open: try again at once.
                        Err(_) => continue,
                    };
                    if last_alive.is_some_and(|last| now.saturating_sub(last) > REMOTE_LOCK_STALE.as_secs()) {
                        tracing::warn!(lock = name, "removing a stale collection write lock");
                        let _ = self.connection.drop_table(&name, &[]).await;
                        continue;
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(std::time::Duration::from_secs(2));
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    pub async fn open(uri: &str) -> Result<Rag> {
        if !uri.contains("://") {
            std::fs::create_dir_all(uri).map_err(|e| RagError::Database(format!("{uri}: {e}")))?;
            remove_cleared_leftovers(std::path::Path::new(uri));
        }
        let connection = lancedb::connect(uri).execute().await?;
        Ok(Rag { connection, uri: uri.to_string() })
    }

    pub async fn collections(&self) -> Result<Vec<String>> {
        let mut names = self.connection.table_names().execute().await?;
        // Write locks on object storage (`<collection>.writer`) are not collections.
        names.retain(|name| check_collection(name).is_ok());
        names.sort();
        Ok(names)
    }

    async fn table(&self, collection: &str) -> Result<Option<Table>> {
        check_collection(collection)?;
        if !self.collections().await?.iter().any(|n| n == collection) {
            return Ok(None);
        }
        Ok(Some(self.connection.open_table(collection).execute().await?))
    }

    /// The model and dimension a collection was built with.
    pub async fn binding(table: &Table) -> Result<(String, usize)> {
        let schema = table.schema().await?;
        let model = schema.metadata().get(MODEL_KEY).cloned().unwrap_or_default();
        let dimension = schema.metadata().get(DIMENSION_KEY).and_then(|d| d.parse().ok()).unwrap_or(0);
        Ok((model, dimension))
    }

    /// Opens (or creates) a collection for `model`, refusing one built with another model.
    pub async fn collection_for(&self, collection: &str, model: &str, dimension: usize) -> Result<Table> {
        let table = match self.table(collection).await? {
            Some(table) => table,
            None => match self.connection.create_empty_table(collection, schema(model, dimension)).execute().await {
                Ok(table) => return Ok(table),
                // Another server created it in the meantime (object storage has no lock to
                // take turns with): use theirs, if it was made for the same model.
                Err(lancedb::Error::TableAlreadyExists { .. }) => self.connection.open_table(collection).execute().await?,
                Err(error) => return Err(error.into()),
            },
        };
        let (built_with, built_dimension) = Self::binding(&table).await?;
        if built_with != model || built_dimension != dimension {
            return Err(RagError::ModelMismatch { collection: collection.into(), built_with, requested: model.into() });
        }
        Ok(table)
    }

    /// The embedding model of an existing collection.
    pub async fn model_of(&self, collection: &str) -> Result<String> {
        let table = self.table(collection).await?.ok_or_else(|| RagError::NoCollection { name: collection.into() })?;
        Ok(Self::binding(&table).await?.0)
    }

    /// Writes one file's chunks in a single commit.
    pub async fn add_chunks(table: &Table, model: &str, dimension: usize, rows: &[ChunkRow]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let schema = schema(model, dimension);
        let values: Vec<f32> = rows.iter().flat_map(|r| r.vector.iter().copied()).collect();
        let vectors = FixedSizeListArray::try_new(
            Arc::new(Field::new("item", DataType::Float32, true)),
            dimension as i32,
            Arc::new(Float32Array::from(values)),
            None,
        )?;
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.source.as_str()))),
                Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.chunk_index))),
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.content_hash.as_str()))),
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.text.as_str()))),
                Arc::new(vectors),
            ],
        )?;
        table.add(batch).execute().await?;
        Ok(())
    }

    /// `(source, content_hash)` pairs stored, with chunk counts.
    pub async fn stored_files(table: &Table) -> Result<HashMap<(String, String), usize>> {
        let batches: Vec<RecordBatch> = table
            .query()
            .select(Select::columns(&["source", "content_hash"]))
            .execute()
            .await?
            .try_collect()
            .await?;
        let mut files = HashMap::new();
        for batch in batches {
            let sources = string_column(&batch, "source")?;
            let hashes = string_column(&batch, "content_hash")?;
            for row in 0..batch.num_rows() {
                *files.entry((sources.value(row).to_string(), hashes.value(row).to_string())).or_default() += 1;
            }
        }
        Ok(files)
    }

    /// Deletes rows matching a LanceDB filter.
    pub async fn delete(table: &Table, filter: &str) -> Result<()> {
        table.delete(filter).await?;
        Ok(())
    }

    /// The `top_k` chunks that best answer a question, at least `min_score` similar (cosine)
    /// to its embedding `vector`. With the question's `text`, the search is hybrid: the best
    /// matches by meaning (vector search) and by words (the full-text index, BM25) are fused
    /// by reciprocal rank, so a chunk that names the question's rare terms is found even when
    /// its embedding is not among the nearest. Each source's score is its cosine similarity.
    pub async fn search(&self, collection: &str, model: &str, vector: Vec<f32>, text: Option<&str>, top_k: usize, min_score: f32) -> Result<Vec<Source>> {
        let table = self.table(collection).await?.ok_or_else(|| RagError::NoCollection { name: collection.into() })?;
        let (built_with, dimension) = Self::binding(&table).await?;
        if built_with != model || dimension != vector.len() {
            return Err(RagError::ModelMismatch { collection: collection.into(), built_with, requested: model.into() });
        }
        let top_k = top_k.max(1);
        // Each list offers more than will be kept, so the fusion has something to choose from.
        let pool = if text.is_some() { (top_k * 4).max(20) } else { top_k };
        let batches: Vec<RecordBatch> = table
            .vector_search(vector.clone())?
            .distance_type(DistanceType::Cosine)
            // With an IVF-PQ index, candidates ranked by compressed distances are re-ranked by
            // exact ones (30x as many as asked for): recall@10 went from 0.16 to the figure in
            // bench/README.md. Flat search is exact and ignores this.
            .refine_factor(30)
            .select(Select::columns(&["source", "chunk_index", "text", "_distance"]))
            .limit(pool)
            .execute()
            .await?
            .try_collect()
            .await?;
        let mut by_meaning = Vec::new();
        for batch in &batches {
            let distance = float_column(batch, "_distance")?;
            for (row, mut hit) in hits(batch)?.into_iter().enumerate() {
                hit.score = 1.0 - distance.value(row);
                by_meaning.push((hit.score, hit));
            }
        }
        by_meaning.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut fused: Vec<(f32, Source)> = match text.map(str::trim).filter(|t| !t.is_empty()) {
            None => by_meaning,
            Some(text) => {
                let by_words = self.words_search(&table, text, &vector, pool).await?;
                reciprocal_rank_fusion(&[by_meaning, by_words])
            }
        };
        fused.retain(|(_, source)| source.score >= min_score);
        fused.truncate(top_k);
        Ok(fused
            .into_iter()
            .enumerate()
            .map(|(position, (_, source))| Source { index: position + 1, ..source })
            .collect())
    }

    /// The best `limit` matches of `text` in the full-text index, each with its cosine
    /// similarity to `vector`. A collection without the index (built before it existed)
    /// gets it when its search fails for want of it; the common path asks nothing extra.
    async fn words_search(&self, table: &Table, text: &str, vector: &[f32], limit: usize) -> Result<Vec<(f32, Source)>> {
        let batches = match Self::full_text_query(table, text, limit).await {
            Ok(batches) => batches,
            Err(error) => {
                if Self::indexed(table).await?.text {
                    return Err(error);
                }
                Self::refresh_indices(table).await?;
                Self::full_text_query(table, text, limit).await?
            }
        };
        let query_norm = vector.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        let mut out = Vec::new();
        for batch in &batches {
            let vectors = batch
                .column_by_name("vector")
                .and_then(|c| c.as_any().downcast_ref::<FixedSizeListArray>())
                .ok_or_else(|| RagError::Database("vector column missing".into()))?;
            for (row, mut hit) in hits(batch)?.into_iter().enumerate() {
                let stored = vectors.value(row);
                let stored = stored.as_any().downcast_ref::<Float32Array>().ok_or_else(|| RagError::Database("vector values".into()))?;
                let (dot, norm) = stored.values().iter().zip(vector).fold((0.0f32, 0.0f32), |(dot, norm), (s, q)| (dot + s * q, norm + s * s));
                hit.score = dot / (norm.sqrt().max(1e-12) * query_norm);
                out.push((hit.score, hit));
            }
        }
        Ok(out)
    }

    async fn full_text_query(table: &Table, text: &str, limit: usize) -> Result<Vec<RecordBatch>> {
        use lancedb::index::scalar::FullTextSearchQuery;
        Ok(table
            .query()
            .full_text_search(FullTextSearchQuery::new(text.to_string()))
            .select(Select::columns(&["source", "chunk_index", "text", "vector", "_score"]))
            .limit(limit)
            .execute()
            .await?
            .try_collect()
            .await?)
    }

    /// Which of the indices ingestion keeps a collection has.
    async fn indexed(table: &Table) -> Result<Indexed> {
        let indices = table.list_indices().await?;
        let on = |index: &lancedb::index::IndexConfig, column: &str| index.columns.iter().any(|c| c == column);
        Ok(Indexed {
            text: indices.iter().any(|index| on(index, "text") && matches!(index.index_type, lancedb::index::IndexType::FTS)),
            vector: indices.iter().any(|index| on(index, "vector")),
        })
    }

    /// Brings a collection's indices up to date after writes: the full-text index of the
    /// chunks' text (built the first time, then extended with the rows written since), and
    /// once the collection holds [`VECTOR_INDEX_MIN_ROWS`] chunks an IVF-PQ vector index
    /// (flat search stays exact and is fast enough below that; bench/README.md has the
    /// figures).
    pub async fn refresh_indices(table: &Table) -> Result<()> {
        // Servers sharing a collection on object storage (no lock to take turns with) can
        // build or extend an index at the same moment; LanceDB then refuses one commit as a
        // retryable conflict. Retry on the latest version (whose indices may be done already).
        let mut attempt = 0;
        loop {
            match Self::refresh_indices_once(table).await {
                Err(RagError::Database(detail)) if detail.to_ascii_lowercase().contains("commit conflict") && attempt < 5 => {
                    attempt += 1;
                    tracing::debug!(attempt, %detail, "index commit conflict, retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(50 << attempt)).await;
                    table.checkout_latest().await?;
                }
                other => return other,
            }
        }
    }

    async fn refresh_indices_once(table: &Table) -> Result<()> {
        use lancedb::index::{scalar::FtsIndexBuilder, Index};
        use lancedb::table::{OptimizeAction, OptimizeOptions};
        let indexed = Self::indexed(table).await?;
        if !indexed.text {
            table.create_index(&["text"], Index::FTS(FtsIndexBuilder::default())).replace(true).execute().await?;
        }
        if !indexed.vector && table.count_rows(None).await? >= VECTOR_INDEX_MIN_ROWS {
            // Searches rank by cosine distance; an index built for another metric is not used.
            let mut builder = lancedb::index::vector::IvfPqIndexBuilder::default().distance_type(DistanceType::Cosine);
            // One byte per 8 dimensions (LanceDB's default is per 16): recall@10 at 100k
            // distinct chunks went from 0.867 to 0.971 for 3 ms more per search
            // (bench/README.md); probing more partitions did not help (0.878 at effort 0.9).
            let (_, dimension) = Self::binding(table).await?;
            if dimension > 0 && dimension % 8 == 0 {
                builder = builder.num_sub_vectors((dimension / 8) as u32);
            }
            table.create_index(&["vector"], Index::IvfPq(builder)).replace(true).execute().await?;
        }
        if indexed.text || indexed.vector {
            table.optimize(OptimizeAction::Index(OptimizeOptions::default())).await?;
        }
        Ok(())
    }

    /// Removes what older versions of a file left: its rows with another content hash.
    pub async fn delete_older_versions(table: &Table, source: &str, hash: &str) -> Result<()> {
        Self::delete(table, &format!("source = {} AND content_hash != {}", quote(source), quote(hash))).await
    }

    pub async fn status(&self) -> Result<Vec<CollectionStatus>> {
        let mut out = Vec::new();
        for name in self.collections().await? {
            let table = self.connection.open_table(&name).execute().await?;
            let (model, dimension) = Self::binding(&table).await?;
            let files = Self::stored_files(&table).await?;
            let chunks = files.values().sum();
            let distinct: std::collections::HashSet<&String> = files.keys().map(|(s, _)| s).collect();
            let size_bytes = self.local_root().map(|root| folder_size(&root.join(format!("{name}.lance"))));
            out.push(CollectionStatus { name, embedding_model: model, dimension, files: distinct.len(), chunks, size_bytes });
        }
        Ok(out)
    }

    /// Deletes a collection; returns whether it existed.
    pub async fn clear(&self, collection: &str) -> Result<bool> {
        let writer = self.lock_writer(collection).await?;
        let cleared = self.clear_locked(collection).await;
        writer.release().await;
        cleared
    }

    async fn clear_locked(&self, collection: &str) -> Result<bool> {
        if !self.collections().await?.iter().any(|n| n == collection) {
            return Ok(false);
        }
        match self.local_root() {
            // The table's folder is renamed away before it is deleted, so a clear that is
            // killed midway leaves no half-deleted collection (`open` removes the leftover).
            Some(root) => {
                let table = root.join(format!("{collection}.lance"));
                let doomed = root.join(format!(".{collection}{CLEARED}{}", uuid::Uuid::new_v4().simple()));
                std::fs::rename(&table, &doomed).map_err(|e| RagError::Database(format!("{}: {e}", table.display())))?;
                let _ = tokio::fs::remove_dir_all(&doomed).await;
            }
            None => self.connection.drop_table(collection, &[]).await?,
        }
        Ok(true)
    }

    /// The folder of a local collection store (`None` for object storage).
    fn local_root(&self) -> Option<&std::path::Path> {
        (!self.uri.contains("://")).then(|| std::path::Path::new(&self.uri))
    }

    /// Every stored row of a collection (tests compare whole tables).
    pub async fn rows(&self, collection: &str) -> Result<Vec<(String, i32, String, String)>> {
        let table = self.table(collection).await?.ok_or_else(|| RagError::NoCollection { name: collection.into() })?;
        let batches: Vec<RecordBatch> = table
            .query()
            .select(Select::columns(&["source", "chunk_index", "content_hash", "text"]))
            .execute()
            .await?
            .try_collect()
            .await?;
        let mut rows = Vec::new();
        for batch in batches {
            let source = string_column(&batch, "source")?;
            let hash = string_column(&batch, "content_hash")?;
            let text = string_column(&batch, "text")?;
            let index = batch.column_by_name("chunk_index").and_then(|c| c.as_any().downcast_ref::<Int32Array>()).ok_or_else(|| RagError::Database("chunk_index".into()))?;
            for row in 0..batch.num_rows() {
                rows.push((source.value(row).to_string(), index.value(row), hash.value(row).to_string(), text.value(row).to_string()));
            }
        }
        rows.sort();
        Ok(rows)
    }
}

/// Marks the folder of a collection being cleared: `.NAME.cleared-UUID`.
const CLEARED: &str = ".cleared-";

/// Removes the folders of clears that were interrupted before they finished deleting.
fn remove_cleared_leftovers(root: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.contains(CLEARED) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Merges ranked lists by reciprocal rank (each list adds 1 / (60 + rank) for a chunk, as
/// in Cormack et al.'s RRF); the chunk keeps its entry from the first list that has it.
fn reciprocal_rank_fusion(lists: &[Vec<(f32, Source)>]) -> Vec<(f32, Source)> {
    const K: f32 = 60.0;
    let mut fused: Vec<(f32, Source)> = Vec::new();
    let mut position: HashMap<(String, i32), usize> = HashMap::new();
    for list in lists {
        for (rank, (_, source)) in list.iter().enumerate() {
            let gain = 1.0 / (K + rank as f32 + 1.0);
            match position.get(&(source.source.clone(), source.chunk_index)) {
                Some(&at) => fused[at].0 += gain,
                None => {
                    position.insert((source.source.clone(), source.chunk_index), fused.len());
                    fused.push((gain, source.clone()));
                }
            }
        }
    }
    fused.sort_by(|a, b| b.0.total_cmp(&a.0));
    fused
}

/// The (source, chunk_index, text) of each row of a search result, score 0.
fn hits(batch: &RecordBatch) -> Result<Vec<Source>> {
    let source = string_column(batch, "source")?;
    let text = string_column(batch, "text")?;
    let index = batch
        .column_by_name("chunk_index")
        .and_then(|c| c.as_any().downcast_ref::<Int32Array>())
        .ok_or_else(|| RagError::Database("chunk_index column missing".into()))?;
    Ok((0..batch.num_rows())
        .map(|row| Source { index: 0, source: source.value(row).to_string(), chunk_index: index.value(row), score: 0.0, text: text.value(row).to_string() })
        .collect())
}

fn float_column<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a Float32Array> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<Float32Array>())
        .ok_or_else(|| RagError::Database(format!("{name} column missing")))
}

fn string_column<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a StringArray> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<StringArray>())
        .ok_or_else(|| RagError::Database(format!("{name} column missing")))
}

fn folder_size(path: &std::path::Path) -> u64 {
    walkdir::WalkDir::new(path).into_iter().filter_map(|e| e.ok()).filter_map(|e| e.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum()
}

/// The system message that carries retrieved chunks into a chat, with numbered sources the
/// answer can cite.
pub fn context_message(sources: &[Source]) -> String {
    let mut text = String::from(
        "Answer using the numbered sources below when they are relevant, and cite them like [1]. If they do not contain the answer, say so.\n",
    );
    for source in sources {
        let name = std::path::Path::new(&source.source).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| source.source.clone());
        text.push_str(&format!("\n[{}] ({name})\n{}\n", source.index, source.text.trim()));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collection_names() {
        assert!(check_collection("default").is_ok());
        assert!(check_collection("my_docs-2").is_ok());
        for bad in ["", "../x", "a b", "x;drop", "-x"] {
            assert!(check_collection(bad).is_err(), "{bad}");
        }
    }

    fn source(name: &str, score: f32) -> (f32, Source) {
        (score, Source { index: 0, source: name.into(), chunk_index: 0, score, text: String::new() })
    }

    #[test]
    fn fusion_prefers_chunks_both_lists_rank_well() {
        let meaning = vec![source("a", 0.9), source("b", 0.8), source("c", 0.7)];
        let words = vec![source("c", 0.7), source("d", 0.2), source("a", 0.9)];
        let fused: Vec<String> = reciprocal_rank_fusion(&[meaning, words]).into_iter().map(|(_, s)| s.source).collect();
        // a: 1/61 + 1/63, c: 1/63 + 1/61 (tie, a first by arrival), b: 1/62, d: 1/62.
        assert_eq!(fused, ["a", "c", "b", "d"]);
    }

    /// The write lock on object storage (here LanceDB's in-memory object store, which takes
    /// the same code path as s3://): a holder's heartbeat keeps it, silence past
    /// REMOTE_LOCK_STALE frees it.
    #[tokio::test]
    async fn remote_write_lock_lives_by_its_heartbeat() {
        let rag = Rag::open("memory://locks").await.unwrap();
        assert!(rag.local_root().is_none());
        let long_ago = unix_now() - 2 * REMOTE_LOCK_STALE.as_secs();
        // A lock created long ago and silent since: taken over at once.
        rag.connection.create_empty_table("docs.writer", lock_schema(long_ago)).execute().await.unwrap();
        let taken = tokio::time::timeout(std::time::Duration::from_secs(5), rag.lock_writer("docs")).await.expect("a stale lock was not removed").unwrap();
        // Its holder's heartbeat rows keep it alive past its creation time.
        tokio::time::sleep(LOCK_HEARTBEAT * 3).await;
        let lock = rag.connection.open_table("docs.writer").execute().await.unwrap();
        assert!(lock.count_rows(None).await.unwrap() >= 2, "no heartbeat rows");
        assert!(lock_last_alive(&lock).await.unwrap().unwrap() >= unix_now() - 1);
        taken.release().await;
        // A lock created long ago whose holder beats: waited for, not removed.
        let old = rag.connection.create_empty_table("docs.writer", lock_schema(long_ago)).execute().await.unwrap();
        old.add(heartbeat_row(long_ago).unwrap()).execute().await.unwrap();
        assert!(tokio::time::timeout(std::time::Duration::from_millis(600), rag.lock_writer("docs")).await.is_err(), "a live lock was taken");
        rag.connection.drop_table("docs.writer", &[]).await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), rag.lock_writer("docs")).await.expect("a released lock was not taken").unwrap().release().await;
    }

    #[test]
    fn quotes_are_escaped() {
        assert_eq!(quote("it's"), "'it''s'");
    }
}
