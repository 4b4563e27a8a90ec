//! Crash safety: every command that writes is killed with SIGKILL at random points, many
//! times. After each kill `list`, `show` and `rag status` work, every listed model's files
//! match its manifest, and running the same command again finishes with the same result as a
//! run that was never interrupted (same digest, same Modelfile, same rows). The server is
//! killed mid-stream and restarted. The seed is printed; `MLXSERVER_CRASH_SEED` replays one.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::common::{stderr, stdout, Home};
use crate::engine_reference::models_dir;
use crate::serving::{home_with_models, CHAT, EMBED};

fn rng() -> StdRng {
    let seed = std::env::var("MLXSERVER_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random::<u64>);
    eprintln!("crash tests: MLXSERVER_CRASH_SEED={seed}");
    StdRng::seed_from_u64(seed)
}

/// Runs a command to the end and returns how long it took.
fn timed(command: &mut Command) -> Duration {
    let started = Instant::now();
    let output = command.stdin(Stdio::null()).output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    started.elapsed()
}

/// Starts a command and kills it (SIGKILL) after `delay`, unless it ended first. Returns
/// whether it was killed.
fn kill_after(command: &mut Command, delay: Duration) -> bool {
    let mut child = command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + delay;
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2).min(deadline.saturating_duration_since(Instant::now())));
    }
    let killed = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    killed
}

/// A random point within a run that takes `whole` (a little past its end, so the last step is
/// covered too).
fn somewhere_in(rng: &mut StdRng, whole: Duration) -> Duration {
    whole.mul_f64(rng.random_range(0.0..1.1))
}

/// What a kill may never leave behind: `list`, `show` and `rag status` work, and the model
/// the killed command wrote (`written`), when it is listed, is whole.
fn assert_consistent(home: &Home, after: &str, written: Option<&str>) {
    let list = home.run(&["list"]);
    assert!(list.status.success(), "list after {after}: {}", stderr(&list));
    let store = mlxserver::store::Store::new(home.path().join("models"));
    for entry in store.list().unwrap() {
        let name = match &entry {
            mlxserver::store::Entry::Base(base) => {
                // Digesting every model after every kill would take minutes; the others were
                // checked when they were written.
                if written == Some(base.manifest.name.as_str()) {
                    assert!(store.verify(base), "{} is listed but its files do not match its manifest (after {after})", base.manifest.name);
                }
                base.manifest.name.clone()
            }
            mlxserver::store::Entry::Personality(personality) => personality.name.clone(),
        };
        let show = home.run(&["show", &name]);
        assert!(show.status.success(), "show {name} after {after}: {}", stderr(&show));
    }
    let status = home.run(&["rag", "status"]);
    assert!(status.status.success(), "rag status after {after}: {}", stderr(&status));
}

/// The leftovers of killed writers are gone once the next writing command has run.
fn assert_no_leftovers(home: &Home) {
    let leftovers: Vec<String> = std::fs::read_dir(home.path().join("models"))
        .unwrap()
        .chain(std::fs::read_dir(home.path().join("models/.personalities")).into_iter().flatten())
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(".partial-") || name.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "leftovers of killed writers: {leftovers:?}");
}

fn digest(home: &Home, name: &str) -> String {
    let text = std::fs::read_to_string(home.path().join("models").join(name).join("manifest.json")).unwrap();
    let manifest: Value = serde_json::from_str(&text).unwrap();
    manifest["digest"].as_str().unwrap().to_string()
}

/// Kills `args` at random points, checks the store after each kill, runs the command again,
/// compares what it wrote (the argument with `{}`) with `expected` and removes it.
fn kill_repeatedly(home: &Home, rng: &mut StdRng, rounds: usize, args: &[&str], whole: Duration, mut result: impl FnMut(&str) -> String, expected: &str) -> usize {
    let mut kills = 0;
    for round in 0..rounds {
        let written = args.iter().find(|a| a.contains("{}")).expect("a {} in the written name").replace("{}", "round");
        let args: Vec<String> = args.iter().map(|a| a.replace("{}", "round")).collect();
        let what = format!("{} (round {round})", args.join(" "));
        kills += usize::from(kill_after(home.command().args(&args), somewhere_in(rng, whole)));
        assert_consistent(home, &what, Some(&written));
        let again = home.command().args(&args).stdin(Stdio::null()).output().unwrap();
        assert!(again.status.success(), "{what} after a kill: {}", stderr(&again));
        assert_eq!(result(&written), expected, "{what}: the run after a kill gives another result");
        assert_no_leftovers(home);
        // The next round starts from nothing again.
        let removed = home.run(&["rm", &written]);
        assert!(removed.status.success(), "{}", stderr(&removed));
    }
    kills
}

#[test]
fn killed_model_commands_finish_on_rerun() {
    let _guard = crate::engine_reference::mlx_lock();
    let mut rng = rng();
    let home = Home::new();
    let gguf = models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let gguf = gguf.to_str().unwrap();
    let minilm = models_dir().join("all-MiniLM-L6-v2");
    let minilm = minilm.to_str().unwrap();

    // Uninterrupted runs: how long each takes and what it makes.
    let pull_time = timed(home.command().args(["pull", gguf, "--name", "smol"]));
    let smol = digest(&home, "smol");
    let folder_time = timed(home.command().args(["pull", minilm, "--name", "minilm"]));
    let minilm_digest = digest(&home, "minilm");
    let cp_time = timed(home.command().args(["cp", "smol", "smol-copy"]));
    let quantize_time = timed(home.command().args(["quantize", "smol", "--bits", "8", "--output", "smol-q8"]));
    let quantized = digest(&home, "smol-q8");
    let modelfile = home.path().join("Modelfile");
    std::fs::write(&modelfile, "FROM smol\nSYSTEM \"You are a cat.\"\nPARAMETER temperature 0.3\n").unwrap();
    let create_time = timed(home.command().args(["create", "cat", "-f", modelfile.to_str().unwrap()]));
    let personality = |home: &Home, name: &str| -> String {
        let text = std::fs::read_to_string(home.path().join(format!("models/.personalities/{name}.json"))).unwrap();
        let value: Value = serde_json::from_str(&text).unwrap();
        value["modelfile"].to_string()
    };
    let cat = personality(&home, "cat");

    let mut kills = 0;
    kills += kill_repeatedly(&home, &mut rng, 8, &["pull", gguf, "--name", "{}-pulled"], pull_time, |n| digest(&home, n), &smol);
    kills += kill_repeatedly(&home, &mut rng, 4, &["pull", minilm, "--name", "{}-folder"], folder_time, |n| digest(&home, n), &minilm_digest);
    kills += kill_repeatedly(&home, &mut rng, 8, &["cp", "smol", "{}-copy"], cp_time, |n| digest(&home, n), &smol);
    kills += kill_repeatedly(&home, &mut rng, 3, &["quantize", "smol", "--bits", "8", "--output", "{}-q8"], quantize_time, |n| digest(&home, n), &quantized);
    let modelfile = modelfile.to_str().unwrap();
    kills += kill_repeatedly(&home, &mut rng, 6, &["create", "{}-cat", "-f", modelfile], create_time, |n| personality(&home, n), &cat);

    // rm: killed at any point, the model is either whole or gone, and removing again ends it.
    timed(home.command().args(["cp", "smol", "measure"]));
    let rm_time = timed(home.command().args(["rm", "measure"]));
    for round in 0..6 {
        let name = format!("doomed{round}");
        timed(home.command().args(["cp", "smol", &name]));
        kills += usize::from(kill_after(home.command().args(["rm", &name]), somewhere_in(&mut rng, rm_time)));
        assert_consistent(&home, &format!("rm {name}"), Some(&name));
        let again = home.run(&["rm", &name]);
        assert!(again.status.success() || stderr(&again).contains("not found"), "rm {name} again: {}", stderr(&again));
        assert!(!stdout(&home.run(&["list"])).contains(&name));
    }
    timed(home.command().args(["pull", gguf, "--name", "smol"]));
    assert_no_leftovers(&home);
    eprintln!("crash tests: {kills} commands killed mid-run");
    assert!(kills >= 15, "only {kills} kills landed mid-run: the random points missed the commands");
}

#[test]
fn a_killed_hub_pull_finishes_on_rerun() {
    let _guard = crate::engine_reference::mlx_lock();
    let mut rng = rng();
    let home = Home::new();
    let hub = crate::hub::hub_with_models(&home);
    let endpoint = crate::hub::start_hub(hub);
    let hub_pull = |name: &str| {
        let mut command = home.command();
        command.env("HF_ENDPOINT", &endpoint).env("HF_HOME", home.path().join(format!("hf-{name}"))).args(["pull", "test-org/SmolLM2-135M-Instruct-GGUF", "--name", name]);
        command
    };
    let whole = timed(&mut hub_pull("reference"));
    let expected = digest(&home, "reference");
    let mut kills = 0;
    for round in 0..6 {
        let name = format!("hub{round}");
        kills += usize::from(kill_after(&mut hub_pull(&name), somewhere_in(&mut rng, whole)));
        assert_consistent(&home, &format!("pull --name {name}"), Some(&name));
        timed(&mut hub_pull(&name));
        assert_eq!(digest(&home, &name), expected);
        assert_no_leftovers(&home);
    }
    assert!(kills >= 2, "only {kills} kills landed mid-download");
}

fn rows(home: &Home, collection: &str) -> Vec<(String, i32, String, String)> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let rag = mlxserver::rag::Rag::open(home.path().join("rag").to_str().unwrap()).await.unwrap();
        let rows = rag.rows(collection).await.unwrap();
        rows.into_iter().map(|(source, index, hash, text)| (Path::new(&source).file_name().unwrap().to_string_lossy().into_owned(), index, hash, text)).collect()
    })
}

#[test]
fn killed_rag_writers_finish_on_rerun() {
    let _guard = crate::engine_reference::mlx_lock();
    let mut rng = rng();
    let home = home_with_models();
    let docs = tempfile::tempdir().unwrap();
    for i in 0..24 {
        let text = (0..12).map(|j| format!("Note {i} line {j}: the lighthouse keeper counts {} gulls at dawn.", (i * 5 + j) % 17)).collect::<Vec<_>>().join(" ");
        std::fs::write(docs.path().join(format!("note{i:02}.txt")), text).unwrap();
    }
    let add_args = |collection: &str| -> Vec<String> {
        ["rag", "add-docs", docs.path().to_str().unwrap(), "--model", EMBED, "--collection", collection, "--chunk-size", "48"].iter().map(|a| a.to_string()).collect()
    };
    let add = |collection: &str| timed(home.command().args(add_args(collection)));

    // add-docs killed at random points, then run again: the same rows as one whole run.
    let add_time = add("keep");
    let whole = rows(&home, "keep");
    let mut kills = 0;
    for round in 0..3 {
        let collection = format!("added{round}");
        kills += usize::from(kill_after(home.command().args(add_args(&collection)), somewhere_in(&mut rng, add_time)));
        assert_consistent(&home, &format!("rag add-docs --collection {collection}"), None);
        add(&collection);
        assert_eq!(rows(&home, &collection), whole, "add-docs after a kill gives other rows");
    }
    add("measure");
    let clear_time = timed(home.command().args(["rag", "clear", "--collection", "measure", "--yes"]));
    for round in 0..4 {
        let collection = format!("gone{round}");
        add(&collection);
        kills += usize::from(kill_after(home.command().args(["rag", "clear", "--collection", &collection, "--yes"]), somewhere_in(&mut rng, clear_time)));
        assert_consistent(&home, &format!("rag clear {collection}"), None);
        let again = home.run(&["rag", "clear", "--collection", &collection, "--yes"]);
        assert!(again.status.success(), "{}", stderr(&again));
        let status = stdout(&home.run(&["rag", "status"]));
        assert!(!status.contains(&collection) && status.contains("keep"), "{status}");
    }
    let leftovers: Vec<_> = std::fs::read_dir(home.path().join("rag")).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name()).filter(|n| n.to_string_lossy().contains(".cleared-")).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    eprintln!("crash tests: {kills} add-docs and clears killed mid-run");
}

#[tokio::test]
async fn a_server_killed_mid_stream_restarts_and_serves() {
    let _guard = crate::engine_reference::mlx_lock();
    let home = home_with_models();
    for round in 0..2 {
        let mut server = crate::serving::start(&home, &[], &[]);
        let body = serde_json::json!({"model": CHAT, "messages": [{"role": "user", "content": "Write a long story."}], "options": {"num_predict": 400}});
        let response = reqwest::Client::new().post(server.url("/api/chat")).json(&body).send().await.unwrap();
        let mut stream = futures::StreamExt::boxed(response.bytes_stream());
        let mut chunks = 0;
        while chunks < 3 + round * 5 {
            futures::StreamExt::next(&mut stream).await.unwrap().unwrap();
            chunks += 1;
        }
        server.child.kill().unwrap();
        server.child.wait().unwrap();
        assert_consistent(&home, "a server killed mid-stream", None);
        // The stream ends with an error or early, never with a `done` line.
        let rest: Vec<_> = futures::StreamExt::collect(stream).await;
        let text: String = rest.into_iter().filter_map(Result::ok).map(|b| String::from_utf8_lossy(&b).into_owned()).collect();
        assert!(!text.contains("\"done\":true"), "{text}");
        drop(server);
    }
    let server = crate::serving::start(&home, &[], &[]);
    let started = Instant::now();
    let answer: Value = reqwest::Client::new()
        .post(server.url("/api/chat"))
        .json(&serde_json::json!({"model": CHAT, "messages": [{"role": "user", "content": "Hi"}], "stream": false, "options": {"num_predict": 4}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["done"], true, "{answer}");
    assert!(started.elapsed() < Duration::from_secs(30));
}
