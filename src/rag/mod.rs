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

impl Rag {
    pub async fn open(uri: &str) -> Result<Rag> {
        if !uri.contains("://") {
            std::fs::create_dir_all(uri).map_err(|e| RagError::Database(format!("{uri}: {e}")))?;
        }
        let connection = lancedb::connect(uri).execute().await?;
        Ok(Rag { connection, uri: uri.to_string() })
    }

    pub async fn collections(&self) -> Result<Vec<String>> {
        let mut names = self.connection.table_names().execute().await?;
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
        match self.table(collection).await? {
            Some(table) => {
                let (built_with, built_dimension) = Self::binding(&table).await?;
                if built_with != model || built_dimension != dimension {
                    return Err(RagError::ModelMismatch { collection: collection.into(), built_with, requested: model.into() });
                }
                Ok(table)
            }
            None => Ok(self.connection.create_empty_table(collection, schema(model, dimension)).execute().await?),
        }
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

    /// The `top_k` chunks most similar to `vector`, at least `min_score` similar.
    pub async fn search(&self, collection: &str, model: &str, vector: Vec<f32>, top_k: usize, min_score: f32) -> Result<Vec<Source>> {
        let table = self.table(collection).await?.ok_or_else(|| RagError::NoCollection { name: collection.into() })?;
        let (built_with, dimension) = Self::binding(&table).await?;
        if built_with != model || dimension != vector.len() {
            return Err(RagError::ModelMismatch { collection: collection.into(), built_with, requested: model.into() });
        }
        let batches: Vec<RecordBatch> = table
            .vector_search(vector)?
            .distance_type(DistanceType::Cosine)
            .select(Select::columns(&["source", "chunk_index", "text", "_distance"]))
            .limit(top_k.max(1))
            .execute()
            .await?
            .try_collect()
            .await?;
        let mut sources = Vec::new();
        for batch in batches {
            let source = string_column(&batch, "source")?;
            let text = string_column(&batch, "text")?;
            let index = batch
                .column_by_name("chunk_index")
                .and_then(|c| c.as_any().downcast_ref::<Int32Array>())
                .ok_or_else(|| RagError::Database("chunk_index column missing".into()))?;
            let distance = batch
                .column_by_name("_distance")
                .and_then(|c| c.as_any().downcast_ref::<Float32Array>())
                .ok_or_else(|| RagError::Database("_distance column missing".into()))?;
            for row in 0..batch.num_rows() {
                let score = 1.0 - distance.value(row);
                if score >= min_score {
                    sources.push(Source { index: 0, source: source.value(row).to_string(), chunk_index: index.value(row), score, text: text.value(row).to_string() });
                }
            }
        }
        sources.sort_by(|a, b| b.score.total_cmp(&a.score));
        sources.truncate(top_k);
        for (i, source) in sources.iter_mut().enumerate() {
            source.index = i + 1;
        }
        Ok(sources)
    }

    pub async fn status(&self) -> Result<Vec<CollectionStatus>> {
        let mut out = Vec::new();
        for name in self.collections().await? {
            let table = self.connection.open_table(&name).execute().await?;
            let (model, dimension) = Self::binding(&table).await?;
            let files = Self::stored_files(&table).await?;
            let chunks = files.values().sum();
            let distinct: std::collections::HashSet<&String> = files.keys().map(|(s, _)| s).collect();
            let size_bytes = (!self.uri.contains("://")).then(|| folder_size(&std::path::Path::new(&self.uri).join(format!("{name}.lance"))));
            out.push(CollectionStatus { name, embedding_model: model, dimension, files: distinct.len(), chunks, size_bytes });
        }
        Ok(out)
    }

    /// Deletes a collection; returns whether it existed.
    pub async fn clear(&self, collection: &str) -> Result<bool> {
        check_collection(collection)?;
        if !self.collections().await?.iter().any(|n| n == collection) {
            return Ok(false);
        }
        self.connection.drop_table(collection, &[]).await?;
        Ok(true)
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

    #[test]
    fn quotes_are_escaped() {
        assert_eq!(quote("it's"), "'it''s'");
    }
}
