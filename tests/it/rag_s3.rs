//! RAG collections on object storage (`rag.uri = "s3://bucket/path"`, the `rag-s3` feature,
//! on by default) against a real S3-compatible server: moto's server (PyPI `moto[server]`,
//! which `scripts/test.sh` installs), started here on a free port. Everything is checked
//! through the servers' HTTP APIs, so this process never needs the AWS_* variables.

use std::time::Duration;

use serde_json::{json, Value};

use crate::rag::{add_via, post_json};
use crate::serving::{home_with_models, start, CHAT};

/// A moto S3 server with one empty bucket, stopped when dropped.
struct S3Server {
    child: std::process::Child,
    endpoint: String,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn moto_server() -> std::path::PathBuf {
    if let Some(path) = std::env::var_os("MOTO_SERVER") {
        return path.into();
    }
    let cache = std::env::var_os("MLXSERVER_CACHE").map(std::path::PathBuf::from).unwrap_or_else(|| std::path::PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/mlxserver"));
    let path = cache.join("motovenv/bin/moto_server");
    assert!(path.exists(), "{} is missing: run scripts/test.sh (it installs moto[server] there)", path.display());
    path
}

async fn s3_with_bucket(bucket: &str) -> S3Server {
    let port = crate::common::free_port();
    let child = std::process::Command::new(moto_server()).args(["-H", "127.0.0.1", "-p", &port.to_string()]).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().expect("start moto_server");
    let server = S3Server { child, endpoint: format!("http://127.0.0.1:{port}") };
    let client = reqwest::Client::new();
    let started = std::time::Instant::now();
    loop {
        // moto does not check signatures: a plain PUT creates the bucket.
        if let Ok(response) = client.put(format!("{}/{bucket}", server.endpoint)).send().await {
            assert!(response.status().is_success(), "creating the bucket: {}", response.status());
            return server;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "moto_server did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the servers (and this process, to read the table) need to reach the S3 stand-in:
/// LanceDB reads the usual AWS_* variables.
fn s3_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT", endpoint.to_string()),
        ("AWS_ALLOW_HTTP", "true".into()),
        ("AWS_ACCESS_KEY_ID", "testing".into()),
        ("AWS_SECRET_ACCESS_KEY", "testing".into()),
        ("AWS_REGION", "us-east-1".into()),
    ]
}

/// Two servers on one S3 collection: what one adds the other retrieves; both adding different
/// documents at the same moment lose none of them (LanceDB's conditional-put commits, retried
/// on conflict); a document added again is found unchanged, not stored twice.
#[tokio::test]
async fn two_servers_share_a_collection_on_s3() {
    let _guard = crate::engine_reference::mlx_lock();
    let s3 = s3_with_bucket("mlxserver-rag").await;
    let uri = "s3://mlxserver-rag/collections";
    let env = s3_env(&s3.endpoint);
    let mut server_env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    server_env.push(("MLXSERVER_RAG_URI", uri));
    let (home_a, home_b) = (home_with_models(), home_with_models());
    let server_a = start(&home_a, &server_env, &[]);
    let server_b = start(&home_b, &server_env, &[]);

    let note = json!({"source": "vault.txt", "text": "The code of the Harrowgate vault is 7741, changed every March."});
    assert_eq!(add_via(&server_a, "shared", &[note.clone()]).await["chunks"], 1);
    let body = json!({"model": CHAT, "messages": [{"role": "user", "content": "What is the code of the Harrowgate vault?"}], "rag": {"collection": "shared", "top_k": 1}, "max_tokens": 1});
    let (status, answer) = post_json(&server_b, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["rag"]["sources"][0]["source"], "vault.txt", "{}", answer["rag"]);
    let again = add_via(&server_b, "shared", &[note]).await;
    assert_eq!((again["added"].as_u64(), again["unchanged"].as_u64()), (Some(0), Some(1)), "{again}");

    let documents = |server: &str| -> Vec<Value> {
        (0..6).map(|i| json!({"source": format!("{server}-{i}.txt"), "text": format!("Note {i} written through server {server}: lane {} is closed on day {}.", i % 3, i + 1)})).collect()
    };
    let (documents_a, documents_b) = (documents("a"), documents("b"));
    let (from_a, from_b) = tokio::join!(add_via(&server_a, "race", &documents_a), add_via(&server_b, "race", &documents_b));
    assert_eq!((from_a["added"].as_u64(), from_b["added"].as_u64()), (Some(6), Some(6)), "{from_a} {from_b}");
    let collection = |status: &Value, name: &str| -> (u64, u64) {
        let found = status["collections"].as_array().and_then(|all| all.iter().find(|c| c["name"] == name)).unwrap_or_else(|| panic!("no collection {name}: {status}"));
        (found["files"].as_u64().unwrap(), found["chunks"].as_u64().unwrap())
    };
    // Read back through the other server: every document of both, each once (one chunk each).
    assert_eq!(collection(&rag_status(&server_b).await, "race"), (12, 12), "every document of both servers, each once");

    // Both adding the same new documents at once: the collection's write lock (a table on
    // the bucket) makes them take turns, so each is stored once.
    let same: Vec<Value> = (0..8).map(|i| json!({"source": format!("same-{i}.txt"), "text": format!("Shared note {i}: the ferry leaves at {} o'clock.", 6 + i)})).collect();
    let (first, second) = tokio::join!(add_via(&server_a, "race", &same), add_via(&server_b, "race", &same));
    assert_eq!(first["added"].as_u64().unwrap() + second["added"].as_u64().unwrap(), 8, "{first} {second}");
    assert_eq!(first["unchanged"].as_u64().unwrap() + second["unchanged"].as_u64().unwrap(), 8, "{first} {second}");
    let status = rag_status(&server_a).await;
    assert_eq!(collection(&status, "race"), (20, 20), "duplicate chunks: {status}");
    // The lock is not listed as a collection, and it was released: a later writer gets it at
    // once (one left behind would hold it for 30 minutes).
    assert!(!status.to_string().contains(".writer"), "{status}");
    let late = json!({"source": "late.txt", "text": "A late note: the lighthouse is painted red."});
    let added = tokio::time::timeout(Duration::from_secs(30), add_via(&server_b, "race", &[late])).await.expect("the write lock was left behind");
    assert_eq!(added["added"], 1, "{added}");
}

async fn rag_status(server: &crate::common::ServerProcess) -> Value {
    reqwest::get(server.url("/api/rag/status")).await.unwrap().json().await.unwrap()
}
