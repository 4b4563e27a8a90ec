//! RAG with the real all-MiniLM-L6-v2 model and a real LanceDB table: add-docs, status,
//! retrieval of the right chunk for questions in English and Japanese, answers that report
//! their sources, clear, unchanged re-adds, a refused model switch, and an add-docs killed
//! mid-run (SIGKILL) then re-run ending with the same table as an uninterrupted run.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::{stderr, stdout, Home};
use crate::serving::{home_with_models, start, CHAT, EMBED};

/// Facts that no small model knows, one per file.
const DOCS: &[(&str, &str)] = &[
    ("zorblat.md", "# Zorblat\n\nThe planet Zorblat has three purple moons named Kif, Lorp and Mabble.\n\nZorblat's oceans are made of lemonade."),
    ("harbor.txt", "The lighthouse keeper of Greyhaven harbor is called Oswin Tallow. He paints the lighthouse green every spring."),
    ("recipe.html", "<html><body><h1>Moon cake</h1><p>The secret ingredient of Aunt Delia's moon cake is smoked paprika.</p></body></html>"),
    ("nested/train.rst", "Trains\n======\n\nThe night train from Velmora to Quist departs at 23:47 from platform nine."),
    ("fuji_ja.md", "富士山の高さは3776メートルです。日本で一番高い山です。"),
    ("sapporo_ja.txt", "札幌の名物は味噌ラーメンです。冬には雪まつりがあります。"),
];

fn write_docs(dir: &Path) {
    for (name, text) in DOCS {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    // PDF and Word files written by scripts/reference/make_doc_fixtures.py.
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/docs");
    for name in ["comet.pdf", "garden.docx"] {
        std::fs::copy(fixtures.join(name), dir.join(name)).unwrap();
    }
    std::fs::write(dir.join("picture.png"), [0x89u8, b'P', b'N', b'G', 0, 1, 2, 3]).unwrap();
    // A broken PDF is skipped with a warning, not a failure.
    std::fs::write(dir.join("broken.pdf"), b"%PDF-1.4 this is not a PDF").unwrap();
}

fn add_docs(home: &Home, dir: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["rag", "add-docs", dir.to_str().unwrap(), "--model", EMBED];
    args.extend_from_slice(extra);
    home.command().args(&args).output().unwrap()
}

async fn ask(server: &crate::common::ServerProcess, question: &str) -> Value {
    let body = json!({"model": CHAT, "messages": [{"role": "user", "content": question}], "rag": {"top_k": 2}, "max_tokens": 24, "temperature": 0});
    let (status, answer) = post_json(server, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200);
    answer
}

/// POSTs a JSON body and returns the status and the JSON answer.
pub(crate) async fn post_json(server: &crate::common::ServerProcess, path: &str, body: &Value) -> (u16, Value) {
    let response = reqwest::Client::new().post(server.url(path)).json(body).send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

fn top_source(answer: &Value) -> String {
    let source = answer["rag"]["sources"][0]["source"].as_str().unwrap_or_default();
    Path::new(source).file_name().unwrap().to_string_lossy().into_owned()
}

#[tokio::test]
async fn documents_are_indexed_retrieved_and_cited() {
    let _guard = crate::engine_reference::mlx_lock();
    let home = home_with_models();
    let docs = tempfile::tempdir().unwrap();
    write_docs(docs.path());

    let output = add_docs(&home, docs.path(), &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    let summary = stdout(&output);
    assert!(summary.contains("8 files added (8 chunks)") && summary.contains("2 skipped"), "{summary}");

    let status = stdout(&home.run(&["rag", "status"]));
    let line = status.lines().find(|l| l.starts_with("default")).unwrap_or_else(|| panic!("{status}"));
    let columns: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(&columns[..5], &["default", EMBED, "384", "8", "8"], "{status}");

    // Re-adding the unchanged folder adds nothing.
    let again = stdout(&add_docs(&home, docs.path(), &[]));
    assert!(again.contains("0 files added (0 chunks), 8 unchanged"), "{again}");
    // A changed file replaces its chunks.
    std::fs::write(docs.path().join("harbor.txt"), "The lighthouse keeper of Greyhaven harbor is called Oswin Tallow. He retired in 1990.").unwrap();
    let changed = stdout(&add_docs(&home, docs.path(), &[]));
    assert!(changed.contains("1 files added (1 chunks), 7 unchanged"), "{changed}");
    // A file gone from the folder leaves the collection.
    std::fs::write(docs.path().join("extra.txt"), "A short-lived note about the weather.").unwrap();
    assert!(stdout(&add_docs(&home, docs.path(), &[])).contains("1 files added (1 chunks), 8 unchanged"));
    std::fs::remove_file(docs.path().join("extra.txt")).unwrap();
    let removed = stdout(&add_docs(&home, docs.path(), &[]));
    assert!(removed.contains("0 files added (0 chunks), 8 unchanged, 1 removed"), "{removed}");
    // Another embedding model on the same collection is refused.
    let copy = home.run(&["cp", EMBED, "other-embedder"]);
    assert!(copy.status.success(), "{}", stderr(&copy));
    let refused = home.command().args(["rag", "add-docs", docs.path().to_str().unwrap(), "--model", "other-embedder"]).output().unwrap();
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("was built with the embedding model 'all-MiniLM-L6-v2'"), "{}", stderr(&refused));

    let server = start(&home, &[], &[]);
    for (question, file) in [
        ("What are the names of the moons of Zorblat?", "zorblat.md"),
        ("Who is the lighthouse keeper of Greyhaven?", "harbor.txt"),
        ("What is the secret ingredient of the moon cake?", "recipe.html"),
        ("When does the night train to Quist leave?", "train.rst"),
        ("富士山の高さは何メートルですか？", "fuji_ja.md"),
        ("札幌の名物は何ですか？", "sapporo_ja.txt"),
        ("How often does the comet Vashti return?", "comet.pdf"),
        ("What grows in the rooftop garden of the Kestrel Hotel?", "garden.docx"),
    ] {
        let answer = ask(&server, question).await;
        assert_eq!(top_source(&answer), file, "{question}: {}", answer["rag"]);
        assert!(answer["choices"][0]["message"]["content"].as_str().is_some_and(|c| !c.is_empty()));
    }
    // The answer uses the retrieved fact.
    let answer = ask(&server, "Who is the lighthouse keeper of Greyhaven harbor? Answer with the name.").await;
    let text = answer["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.contains("Oswin") || text.contains("Tallow"), "{text}");

    // Ollama's chat and the native /generate report sources too.
    let body = json!({"model": CHAT, "messages": [{"role": "user", "content": "What is Zorblat's ocean made of?"}], "stream": false, "rag": true, "options": {"num_predict": 16}});
    let (_, ollama) = post_json(&server, "/api/chat", &body).await;
    assert!(ollama["rag"]["sources"][0]["source"].as_str().unwrap().ends_with("zorblat.md"), "{ollama}");
    let (_, native) = post_json(&server, "/generate", &json!({"personality_name": CHAT, "prompt": "Which platform does the night train to Quist use?", "max_tokens": 16, "use_rag": true})).await;
    assert!(native["sources"][0]["source"].as_str().unwrap().ends_with("train.rst"), "{native}");

    // Anthropic's Messages and OpenAI's Responses carry the sources too, streamed or not.
    let (_, messages) = post_json(&server, "/v1/messages", &json!({"model": CHAT, "max_tokens": 8, "messages": [{"role": "user", "content": "How often does the comet Vashti return?"}], "rag": {"top_k": 1}})).await;
    assert!(messages["rag"]["sources"][0]["source"].as_str().unwrap().ends_with("comet.pdf"), "{messages}");
    assert_eq!(messages["rag"]["sources"][0]["chunk_index"], 0);
    let streamed = reqwest::Client::new()
        .post(server.url("/v1/messages"))
        .json(&json!({"model": CHAT, "max_tokens": 8, "stream": true, "messages": [{"role": "user", "content": "What grows in the rooftop garden of the Kestrel Hotel?"}], "rag": {"top_k": 1}}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let message_start: Value = streamed.lines().find_map(|l| l.strip_prefix("data: ")).map(|d| serde_json::from_str(d).unwrap()).unwrap();
    assert!(message_start["message"]["rag"]["sources"][0]["source"].as_str().unwrap().ends_with("garden.docx"), "{message_start}");
    let (_, response) = post_json(&server, "/v1/responses", &json!({"model": CHAT, "max_output_tokens": 8, "input": "Who is the lighthouse keeper of Greyhaven?", "rag": {"top_k": 1}})).await;
    assert!(response["rag"]["sources"][0]["source"].as_str().unwrap().ends_with("harbor.txt"), "{response}");
    assert!(response["rag"]["sources"][0]["score"].as_f64().unwrap() > 0.0);

    // The management API.
    let added = add_via(&server, "api", &[json!({"source": "note-1", "text": "The password of the blue door is 'marmalade'."})]).await;
    assert_eq!(added["chunks"], 1, "{added}");
    let status: Value = reqwest::get(server.url("/api/rag/status")).await.unwrap().json().await.unwrap();
    assert_eq!(status["collections"].as_array().unwrap().len(), 2, "{status}");
    let deleted = reqwest::Client::new().delete(server.url("/api/rag/api")).send().await.unwrap();
    assert_eq!(deleted.status(), 200);
    let missing = reqwest::Client::new().delete(server.url("/api/rag/api")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    drop(server);

    // With a reranker configured, candidates are reordered by its relevance before the best
    // top_k are kept: each source's score is what /v1/rerank gives its text.
    let server = start(&home, &[("MLXSERVER_RAG_RERANK_MODEL", EMBED)], &[]);
    let question = "What are the names of the moons of Zorblat?";
    let answer = ask(&server, question).await;
    assert_eq!(top_source(&answer), "zorblat.md", "{}", answer["rag"]);
    let sources = answer["rag"]["sources"].as_array().unwrap().clone();
    assert_eq!(sources.len(), 2);
    let texts: Vec<&str> = sources.iter().map(|s| s["text"].as_str().unwrap()).collect();
    let (_, ranked) = post_json(&server, "/v1/rerank", &json!({"model": EMBED, "query": question, "documents": texts})).await;
    for (position, source) in sources.iter().enumerate() {
        assert_eq!(source["index"], position + 1);
        let relevance = ranked["results"].as_array().unwrap().iter().find(|r| r["index"] == position).unwrap()["relevance_score"].as_f64().unwrap();
        assert!((source["score"].as_f64().unwrap() - relevance).abs() < 1e-5, "{source} vs {ranked}");
    }
    assert!(sources[0]["score"].as_f64() >= sources[1]["score"].as_f64());
    drop(server);

    // clear empties the collection.
    let cleared = home.run(&["rag", "clear", "--yes"]);
    assert!(stdout(&cleared).contains("Deleted the collection default"), "{}", stdout(&cleared));
    assert!(stdout(&home.run(&["rag", "status"])).contains("no collections"));
}

#[test]
fn a_killed_add_docs_run_completes_on_rerun() {
    let _guard = crate::engine_reference::mlx_lock();
    let home = home_with_models();
    let docs = tempfile::tempdir().unwrap();
    for i in 0..80 {
        let text = (0..30).map(|j| format!("Document {i} sentence {j} talks about topic {} in detail.", (i * 7 + j) % 13)).collect::<Vec<_>>().join(" ");
        std::fs::write(docs.path().join(format!("doc{i:02}.txt")), text).unwrap();
    }
    let mut child = home
        .command()
        .args(["rag", "add-docs", docs.path().to_str().unwrap(), "--model", EMBED, "--collection", "killed", "--chunk-size", "64"])
        .spawn()
        .unwrap();
    // Kill once some files are in the table.
    let table = home.path().join("rag/killed.lance");
    let started = std::time::Instant::now();
    // Version 1 is the empty table; every later one a commit of whole files.
    while !table.join("_versions").exists() || std::fs::read_dir(table.join("_versions")).map(|d| d.count()).unwrap_or(0) < 2 {
        assert!(started.elapsed() < Duration::from_secs(120), "add-docs wrote nothing");
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(child.try_wait().unwrap().is_none(), "add-docs finished before it could be killed");
    let _ = child.kill();
    let _ = child.wait();
    let rerun = home.command().args(["rag", "add-docs", docs.path().to_str().unwrap(), "--model", EMBED, "--collection", "killed", "--chunk-size", "64"]).output().unwrap();
    assert!(rerun.status.success(), "{}", stderr(&rerun));
    let full = home.command().args(["rag", "add-docs", docs.path().to_str().unwrap(), "--model", EMBED, "--collection", "whole", "--chunk-size", "64"]).output().unwrap();
    assert!(full.status.success(), "{}", stderr(&full));

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (killed, whole) = runtime.block_on(async {
        let rag = mlxserver::rag::Rag::open(home.path().join("rag").to_str().unwrap()).await.unwrap();
        (rag.rows("killed").await.unwrap(), rag.rows("whole").await.unwrap())
    });
    assert!(whole.len() > 80, "{}", whole.len());
    assert_eq!(killed, whole, "the re-run completed the interrupted table");
}

/// Part numbers mean little to an embedding model: asked by its number, vector search cannot
/// tell a part from its predecessor whose number differs in the last digit, while the
/// full-text index finds the one chunk with that exact number, and hybrid retrieval
/// (reciprocal rank fusion) puts it first. (With `hybrid: false` this test fails.)
#[tokio::test]
async fn hybrid_retrieval_finds_rare_terms() {
    let _guard = crate::engine_reference::mlx_lock();
    let home = home_with_models();
    let server = start(&home, &[], &[]);
    let parts = ["valve", "pump", "gasket", "filter", "sensor", "bearing", "hose", "nozzle", "clamp", "seal", "relay", "spring"];
    let number = |i: usize| 4100 + i * 37;
    let mut documents = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        documents.push(json!({"source": format!("{part}.txt"), "text": format!("Spare part {} is the {part} of the coolant loop.", number(i))}));
        documents.push(json!({"source": format!("{part}-old.txt"), "text": format!("Spare part {} was the {part} of the coolant loop.", number(i) + 1)}));
    }
    let added = add_via(&server, "parts", &documents).await;
    assert_eq!(added["chunks"], 24, "{added}");
    for (i, part) in parts.iter().enumerate() {
        let body = json!({"model": CHAT, "messages": [{"role": "user", "content": format!("{}?", number(i))}], "rag": {"collection": "parts", "top_k": 1, "hybrid": true}, "max_tokens": 1});
        let (_, answer) = post_json(&server, "/v1/chat/completions", &body).await;
        assert_eq!(answer["rag"]["sources"][0]["source"], format!("{part}.txt"), "{}: {}", number(i), answer["rag"]);
        // The score stays the chunk's cosine similarity to the question.
        let score = answer["rag"]["sources"][0]["score"].as_f64().unwrap();
        assert!(score > -1.0 && score < 1.0, "{score}");
    }
}

pub(crate) async fn add_via(server: &crate::common::ServerProcess, collection: &str, documents: &[Value]) -> Value {
    let (status, added) = post_json(server, "/api/rag/documents", &json!({"collection": collection, "model": EMBED, "documents": documents})).await;
    assert_eq!(status, 200, "{added}");
    added
}

/// Two servers (own homes, own ports) on one shared index: what one adds the other
/// retrieves, and both adding the same documents at once leaves each chunk stored once.
#[tokio::test]
async fn two_servers_share_one_collection() {
    let _guard = crate::engine_reference::mlx_lock();
    let shared = tempfile::tempdir().unwrap();
    let uri = shared.path().to_str().unwrap();
    let (home_a, home_b) = (home_with_models(), home_with_models());
    let server_a = start(&home_a, &[("MLXSERVER_RAG_URI", uri)], &[]);
    let server_b = start(&home_b, &[("MLXSERVER_RAG_URI", uri)], &[]);

    let note = json!({"source": "vault.txt", "text": "The code of the Harrowgate vault is 7741, changed every March."});
    assert_eq!(add_via(&server_a, "shared", &[note]).await["chunks"], 1);
    let body = json!({"model": CHAT, "messages": [{"role": "user", "content": "What is the code of the Harrowgate vault?"}], "rag": {"collection": "shared", "top_k": 1}, "max_tokens": 1});
    let (_, answer) = post_json(&server_b, "/v1/chat/completions", &body).await;
    assert_eq!(answer["rag"]["sources"][0]["source"], "vault.txt", "{}", answer["rag"]);

    let documents: Vec<Value> = (0..12)
        .map(|i| json!({"source": format!("race-{i}.txt"), "text": (0..12).map(|j| format!("Race note {i} line {j} about lane {}.", (i + j) % 5)).collect::<Vec<_>>().join(" ")}))
        .collect();
    let (from_a, from_b) = tokio::join!(add_via(&server_a, "race", &documents), add_via(&server_b, "race", &documents));
    // One of them wrote each document; the other found it stored.
    assert_eq!(from_a["added"].as_u64().unwrap() + from_b["added"].as_u64().unwrap(), 12, "{from_a} {from_b}");
    assert_eq!(from_a["unchanged"].as_u64().unwrap() + from_b["unchanged"].as_u64().unwrap(), 12, "{from_a} {from_b}");
    let rag = mlxserver::rag::Rag::open(uri).await.unwrap();
    let rows = rag.rows("race").await.unwrap();
    let mut keys: Vec<(String, i32)> = rows.iter().map(|(source, index, _, _)| (source.clone(), *index)).collect();
    let total = keys.len();
    keys.dedup();
    assert_eq!(keys.len(), total, "duplicate chunks");
    let chunks = from_a["chunks"].as_u64().unwrap() + from_b["chunks"].as_u64().unwrap();
    assert_eq!(total as u64, chunks);
    assert_eq!(keys.iter().map(|(s, _)| s).collect::<std::collections::HashSet<_>>().len(), 12);
}
