//! RAG benchmark: chunks embedded per second with all-MiniLM-L6-v2 on the engine; then per
//! table size (1k real chunks, and synthetic large tables: Zipf-distributed text, vectors
//! mixed from two real embeddings plus noise): write throughput, the time ingestion spends on indices (full-text, and IVF-PQ
//! from `VECTOR_INDEX_MIN_ROWS` on), vector search p50/p99 with recall@10 against exact
//! search, hybrid (vector + full-text) search p50/p99, and embed-the-question + hybrid
//! search. Prints JSON lines.
//!
//! usage: rag_bench MINILM_FOLDER [--chunks 1000] [--large 100000,1000000] [--queries 200]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use mlxserver::config::EngineConfig;
use mlxserver::engine::{Engine, Frontend};
use mlxserver::rag::{ChunkRow, Rag};
use rand::{Rng, SeedableRng};

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn percentile(samples: &mut [Duration], p: f64) -> f64 {
    samples.sort();
    let index = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[index].as_secs_f64() * 1000.0
}

/// Synthetic text with the word statistics of real text: a vocabulary of 30,000 made-up words
/// drawn by Zipf's law (the k-th most common word with weight 1/k), so, as in real documents,
/// a few words are in almost every chunk and most are rare. (Runs before 2026-11-29 drew 24
/// words uniformly: every chunk held every query word, the worst case for full-text search.)
struct Vocabulary {
    words: Vec<String>,
    cumulative: Vec<f64>,
}

impl Vocabulary {
    fn new(size: usize, rng: &mut rand::rngs::StdRng) -> Vocabulary {
        const ONSETS: &[&str] = &["b", "br", "c", "ch", "d", "dr", "f", "g", "gl", "h", "k", "l", "m", "n", "p", "pl", "r", "s", "st", "t", "tr", "v", "w", "z"];
        const VOWELS: &[&str] = &["a", "e", "i", "o", "u", "ai", "ea", "ou"];
        const CODAS: &[&str] = &["", "n", "r", "s", "l", "m", "nd", "st", "th", "x"];
        let mut seen = std::collections::HashSet::new();
        let mut words = Vec::with_capacity(size);
        while words.len() < size {
            let syllables = 1 + (words.len() * 4 / size) + rng.random_range(0..2);
            let word: String = (0..syllables)
                .map(|_| format!("{}{}{}", ONSETS[rng.random_range(0..ONSETS.len())], VOWELS[rng.random_range(0..VOWELS.len())], CODAS[rng.random_range(0..CODAS.len())]))
                .collect();
            if seen.insert(word.clone()) {
                words.push(word);
            }
        }
        let mut total = 0.0;
        let cumulative = (1..=size).map(|rank| {
            total += 1.0 / rank as f64;
            total
        }).collect();
        Vocabulary { words, cumulative }
    }

    fn word(&self, rng: &mut rand::rngs::StdRng) -> &str {
        let target = rng.random_range(0.0..*self.cumulative.last().unwrap());
        &self.words[self.cumulative.partition_point(|c| *c < target).min(self.words.len() - 1)]
    }

    fn sentence(&self, rng: &mut rand::rngs::StdRng, words: usize) -> String {
        (0..words).map(|_| self.word(rng)).collect::<Vec<_>>().join(" ") + "."
    }

    /// A chunk of about 160 tokens (all-MiniLM's word pieces), like add-docs' chunks.
    fn chunk(&self, rng: &mut rand::rngs::StdRng) -> String {
        (0..6).map(|_| self.sentence(rng, 10)).collect::<Vec<_>>().join(" ")
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let model = PathBuf::from(args.get(1).expect("usage: rag_bench MINILM_FOLDER"));
    let chunks = arg(&args, "--chunks", 1000);
    // Sizes of the synthetic tables, e.g. --large 100000,1000000.
    let large: Vec<usize> = args
        .iter()
        .position(|a| a == "--large")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.split(',').filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_else(|| vec![100_000]);
    let queries = arg(&args, "--queries", 200);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let engine = Engine::start(EngineConfig { cpu_dtype: Default::default(), prefill_chunk: 512, max_batch: 16, prefix_cache_bytes: 0, ..Default::default() });
    let info = runtime.block_on(engine.load(1, &model)).expect("load");
    let Frontend::Embedding(frontend) = info.frontend else { panic!("not an embedding model") };
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let vocabulary = Vocabulary::new(30_000, &mut rng);
    let texts: Vec<String> = (0..chunks).map(|_| vocabulary.chunk(&mut rng)).collect();
    let tokenized: Vec<Vec<u32>> = texts.iter().map(|t| frontend.tokenizer.encode(t.as_str(), true).unwrap().get_ids().to_vec()).collect();
    let tokens: usize = tokenized.iter().map(Vec::len).sum();
    let started = Instant::now();
    let mut vectors = Vec::with_capacity(chunks);
    for batch in tokenized.chunks(32) {
        vectors.extend(runtime.block_on(engine.embed(1, batch.to_vec())).expect("embed"));
    }
    let seconds = started.elapsed().as_secs_f64();
    println!("{}", serde_json::json!({"bench": "embed", "chunks": chunks, "tokens_per_chunk": tokens / chunks, "chunks_per_s": chunks as f64 / seconds, "tokens_per_s": tokens as f64 / seconds}));

    let query_texts: Vec<String> = (0..queries).map(|_| vocabulary.sentence(&mut rng, 8)).collect();
    let query_vectors: Vec<Vec<f32>> = runtime
        .block_on(engine.embed(1, query_texts.iter().map(|t| frontend.tokenizer.encode(t.as_str(), true).unwrap().get_ids().to_vec()).collect()))
        .expect("embed queries");
    let dir = tempfile::tempdir().expect("temp dir");
    let rag = runtime.block_on(Rag::open(dir.path().to_str().unwrap())).expect("open");
    let mut tables = vec![("small".to_string(), chunks)];
    tables.extend(large.iter().filter(|n| **n > 0).map(|n| (format!("large{n}"), *n)));
    for (name, size) in tables {
        let name = name.as_str();
        let table = runtime.block_on(rag.collection_for(name, "bench", 384)).expect("table");
        let mut written = 0;
        // Only the writes are timed (making up the synthetic rows is not ingestion).
        let mut write_time = Duration::ZERO;
        while written < size {
            // Past the embedded sample, each row is new text with a vector made from two real
            // embeddings and noise: distinct vectors spread like the real ones (a copy of one
            // real vector plus small noise, as before 2026-11-29, gave clusters of
            // near-duplicates that compressed distances cannot tell apart).
            let rows: Vec<ChunkRow> = (written..(written + 5000).min(size))
                .map(|i| {
                    let (text, vector) = if i < vectors.len() {
                        (texts[i].clone(), vectors[i].clone())
                    } else {
                        let (a, b) = (&vectors[rng.random_range(0..vectors.len())], &vectors[rng.random_range(0..vectors.len())]);
                        let weight = rng.random_range(0.2..0.8);
                        let mixed: Vec<f32> = a.iter().zip(b).map(|(x, y)| weight * x + (1.0 - weight) * y + rng.random_range(-0.01..0.01)).collect();
                        let norm = mixed.iter().map(|v| v * v).sum::<f32>().sqrt();
                        (vocabulary.chunk(&mut rng), mixed.iter().map(|v| v / norm).collect())
                    };
                    ChunkRow { source: format!("doc{}", i / 10), chunk_index: (i % 10) as i32, content_hash: "h".into(), text, vector }
                })
                .collect();
            written += rows.len();
            let started = Instant::now();
            runtime.block_on(Rag::add_chunks(&table, "bench", 384, &rows)).expect("add");
            write_time += started.elapsed();
        }
        let write_seconds = write_time.as_secs_f64();
        // What ingestion does after writing: the full-text index, and IVF-PQ from
        // VECTOR_INDEX_MIN_ROWS chunks on.
        let started = Instant::now();
        runtime.block_on(Rag::refresh_indices(&table)).expect("indices");
        let index_seconds = started.elapsed().as_secs_f64();
        let indexed = size >= mlxserver::rag::VECTOR_INDEX_MIN_ROWS;
        println!("{}", serde_json::json!({"bench": "ingest", "chunks": size, "rows_per_s": size as f64 / write_seconds, "index_seconds": index_seconds, "vector_index": if indexed { "ivf_pq" } else { "none (flat)" }}));
        let mut search = Vec::with_capacity(queries);
        let mut hybrid = Vec::with_capacity(queries);
        let mut end_to_end = Vec::with_capacity(queries);
        let mut recall = 0.0;
        for (text, vector) in query_texts.iter().zip(&query_vectors) {
            let started = Instant::now();
            let found = runtime.block_on(rag.search(name, "bench", vector.clone(), None, 10, -1.0)).expect("search");
            search.push(started.elapsed());
            // Recall@10 against exact (flat) search.
            let exact: Vec<arrow_array::RecordBatch> = runtime.block_on(async {
                use futures::TryStreamExt;
                use lancedb::query::{ExecutableQuery, QueryBase};
                table
                    .vector_search(vector.clone())
                    .unwrap()
                    .distance_type(lancedb::DistanceType::Cosine)
                    .bypass_vector_index()
                    .select(lancedb::query::Select::columns(&["source", "chunk_index"]))
                    .limit(10)
                    .execute()
                    .await
                    .unwrap()
                    .try_collect()
                    .await
                    .unwrap()
            });
            let mut truth = std::collections::HashSet::new();
            for batch in &exact {
                let sources = batch.column_by_name("source").unwrap().as_any().downcast_ref::<arrow_array::StringArray>().unwrap();
                let indices = batch.column_by_name("chunk_index").unwrap().as_any().downcast_ref::<arrow_array::Int32Array>().unwrap();
                for row in 0..batch.num_rows() {
                    truth.insert((sources.value(row).to_string(), indices.value(row)));
                }
            }
            recall += found.iter().filter(|s| truth.contains(&(s.source.clone(), s.chunk_index))).count() as f64 / truth.len().max(1) as f64;
            let started = Instant::now();
            runtime.block_on(rag.search(name, "bench", vector.clone(), Some(text), 4, -1.0)).expect("hybrid search");
            hybrid.push(started.elapsed());
            let started = Instant::now();
            let ids = frontend.tokenizer.encode(text.as_str(), true).unwrap().get_ids().to_vec();
            let vector = runtime.block_on(engine.embed(1, vec![ids])).expect("embed").pop().unwrap();
            runtime.block_on(rag.search(name, "bench", vector, Some(text), 4, -1.0)).expect("search");
            end_to_end.push(started.elapsed());
        }
        println!(
            "{}",
            serde_json::json!({
                "bench": "query", "chunks": size, "index": if indexed { "ivf_pq" } else { "none (flat)" },
                "vector_p50_ms": percentile(&mut search, 0.5), "vector_p99_ms": percentile(&mut search, 0.99),
                "recall_at_10": recall / queries as f64,
                "hybrid_p50_ms": percentile(&mut hybrid, 0.5), "hybrid_p99_ms": percentile(&mut hybrid, 0.99),
                "embed_and_hybrid_p50_ms": percentile(&mut end_to_end, 0.5), "embed_and_hybrid_p99_ms": percentile(&mut end_to_end, 0.99),
            })
        );
    }
    engine.shutdown();
}
