//! Mutation fuzzing of the parsers that read files users bring: the GGUF header and tensor
//! table (and the tokenizer built from its vocabulary), safetensors headers, `config.json`
//! (the decoder configuration of every family), Modelfiles, chat templates and
//! `tokenizer.json`. Each target starts from real seeds (the small models, the family
//! configurations, llama.cpp's templates), mutates them (bit flips, truncation, splices,
//! extreme numbers, swapped JSON types) and requires an `Ok` or an `Err`, never a panic.
//!
//! First every saved input under `tests/fixtures/fuzz/<target>/` is replayed (crashes found
//! earlier, kept as regressions). A panic saves its input there and fails the test.
//! `MLXSERVER_FUZZ_SECONDS` (default 2 per target) bounds a run; `scripts/fuzz.sh` runs longer.
//! This is a blind mutation fuzzer on the stable toolchain; the same targets
//! (`mlxserver::fuzz_targets`) run coverage-guided under libFuzzer in `fuzz/`
//! (`scripts/cargo-fuzz.sh`), whose crashes land in the same folders and are replayed here.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use mlxserver::fuzz_targets as targets;

use crate::engine_reference::models_dir;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn budget() -> Duration {
    Duration::from_secs_f64(std::env::var("MLXSERVER_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(2.0))
}

/// A run of one target: replays the saved regressions, then mutates the seeds until the time
/// budget is spent. Returns how many inputs were tried.
fn fuzz(target: &str, seeds: Vec<Vec<u8>>, mutate: impl Fn(&mut StdRng, &[u8]) -> Vec<u8>, check: impl Fn(&[u8])) -> usize {
    let saved = fixtures().join("fuzz").join(target);
    let mut regressions: Vec<PathBuf> = std::fs::read_dir(&saved).into_iter().flatten().filter_map(|e| e.ok().map(|e| e.path())).collect();
    regressions.sort();
    for path in &regressions {
        let input = std::fs::read(path).unwrap();
        if catch_unwind(AssertUnwindSafe(|| check(&input))).is_err() {
            panic!("{target}: the saved input {} panics again", path.display());
        }
    }
    let seed = std::env::var("MLXSERVER_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random::<u64>);
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();
    let mut tried = 0;
    for input in &seeds {
        if catch_unwind(AssertUnwindSafe(|| check(input))).is_err() {
            save_and_fail(target, &saved, input);
        }
    }
    while started.elapsed() < budget() {
        let base = &seeds[rng.random_range(0..seeds.len())];
        let input = mutate(&mut rng, base);
        if catch_unwind(AssertUnwindSafe(|| check(&input))).is_err() {
            save_and_fail(target, &saved, &input);
        }
        tried += 1;
    }
    eprintln!("fuzz {target}: {tried} inputs, {} regressions replayed, MLXSERVER_FUZZ_SEED={seed}", regressions.len());
    tried
}

fn save_and_fail(target: &str, folder: &Path, input: &[u8]) -> ! {
    use sha2::Digest;
    std::fs::create_dir_all(folder).unwrap();
    let path = folder.join(format!("crash-{}", &hex::encode(sha2::Sha256::digest(input))[..16]));
    std::fs::write(&path, input).unwrap();
    panic!("{target}: a panic on the input saved as {}", path.display());
}

const INTERESTING: [u64; 10] = [0, 1, 2, 0x7f, 0xff, 0xffff, 0x7fff_ffff, 0xffff_ffff, 0x7fff_ffff_ffff_ffff, u64::MAX];

/// Byte-level mutations: flips, random bytes, interesting integers, truncation, cut-outs,
/// duplicated spans.
fn mutate_bytes(rng: &mut StdRng, base: &[u8]) -> Vec<u8> {
    let mut data = base.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        if data.is_empty() {
            data.push(rng.random());
            continue;
        }
        let at = rng.random_range(0..data.len());
        match rng.random_range(0..7) {
            0 => data[at] ^= 1 << rng.random_range(0..8),
            1 => data[at] = rng.random(),
            2 => {
                let value = INTERESTING[rng.random_range(0..INTERESTING.len())].to_le_bytes();
                let width = [1, 2, 4, 8][rng.random_range(0..4)];
                for (i, byte) in value.iter().take(width).enumerate() {
                    if let Some(slot) = data.get_mut(at + i) {
                        *slot = *byte;
                    }
                }
            }
            3 => data.truncate(at),
            4 => {
                let end = (at + rng.random_range(1..64)).min(data.len());
                data.drain(at..end);
            }
            5 => {
                let end = (at + rng.random_range(1..64)).min(data.len());
                let span = data[at..end].to_vec();
                let to = rng.random_range(0..=data.len());
                data.splice(to..to, span);
            }
            _ => data.insert(at, rng.random()),
        }
    }
    data
}

/// JSON-level mutations: a random value somewhere in the document becomes an extreme number,
/// another type, or disappears.
fn mutate_json(rng: &mut StdRng, base: &[u8]) -> Vec<u8> {
    let Ok(mut value) = serde_json::from_slice::<Value>(base) else { return mutate_bytes(rng, base) };
    for _ in 0..rng.random_range(1..=3) {
        mutate_value(rng, &mut value);
    }
    if rng.random_bool(0.1) {
        return mutate_bytes(rng, &serde_json::to_vec(&value).unwrap());
    }
    serde_json::to_vec(&value).unwrap()
}

fn mutate_value(rng: &mut StdRng, value: &mut Value) {
    match value {
        Value::Object(map) if !map.is_empty() && rng.random_bool(0.85) => {
            let key = map.keys().nth(rng.random_range(0..map.len())).cloned().unwrap();
            if rng.random_bool(0.1) {
                map.remove(&key);
            } else {
                mutate_value(rng, map.get_mut(&key).unwrap());
            }
        }
        Value::Array(items) if !items.is_empty() && rng.random_bool(0.85) => {
            let index = rng.random_range(0..items.len());
            if rng.random_bool(0.1) {
                items.remove(index);
            } else {
                mutate_value(rng, &mut items[index]);
            }
        }
        _ => {
            *value = match rng.random_range(0..12) {
                0 => Value::Null,
                1 => Value::Bool(rng.random()),
                2 => serde_json::json!(-1),
                3 => serde_json::json!(0),
                4 => serde_json::json!(i64::MAX),
                5 => serde_json::json!(u64::MAX),
                6 => serde_json::json!(1e308),
                7 => serde_json::json!(-0.5),
                8 => serde_json::json!(""),
                9 => serde_json::json!([]),
                10 => serde_json::json!({}),
                _ => serde_json::json!(rng.random_range(-4096..65536)),
            };
        }
    }
}

fn mutate_text(rng: &mut StdRng, base: &[u8]) -> Vec<u8> {
    const PIECES: [&str; 12] = ["\n", "\"\"\"", "{{", "}}", "{%", "%}", "FROM ", "PARAMETER ", " num_ctx -1", "\u{0}", "é", "{{ messages[0]['content'] }}"];
    let mut data = base.to_vec();
    if rng.random_bool(0.5) {
        let at = rng.random_range(0..=data.len());
        let piece = PIECES[rng.random_range(0..PIECES.len())];
        data.splice(at..at, piece.bytes());
        data
    } else {
        mutate_bytes(rng, &data)
    }
}

#[test]
fn gguf_headers_and_vocabularies() {
    // The real header and tensor table of SmolLM2 (vocabulary and merges included): the
    // first 4 MiB of the file, read as the start of a 1 GiB file.
    let mut head = std::fs::read(models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    head.truncate(4 << 20);
    mlxserver::engine::gguf::parse_prefix(&head, targets::GGUF_FILE_SIZE).expect("the real header parses");
    let tried = fuzz("gguf", vec![head], mutate_bytes, targets::gguf_header);
    assert!(tried > 0);
}

/// A small safetensors file: its JSON header and the bytes it describes.
fn safetensors_seed(tensors: &[(&str, &str, &[usize])]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for (name, dtype, shape) in tensors {
        let bytes = shape.iter().product::<usize>() * if *dtype == "F32" { 4 } else { 2 };
        header.insert(name.to_string(), serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes]}));
        offset += bytes;
    }
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let json = serde_json::to_vec(&Value::Object(header)).unwrap();
    let mut file = (json.len() as u64).to_le_bytes().to_vec();
    file.extend(json);
    file.extend(vec![0u8; offset]);
    file
}

#[test]
fn safetensors_headers() {
    let seeds = vec![
        safetensors_seed(&[("model.embed_tokens.weight", "F32", &[16, 8]), ("model.norm.weight", "BF16", &[8])]),
        safetensors_seed(&[("lm_head.weight", "F16", &[4, 4])]),
    ];
    let folder = tempfile::tempdir().unwrap();
    let path = folder.path().join("model.safetensors");
    let tried = fuzz(
        "safetensors",
        seeds,
        |rng, base| {
            // Mutate the JSON header structurally or the whole file byte by byte.
            let length = base.get(..8).map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize).unwrap_or(0);
            if rng.random_bool(0.5) && base.len() >= 8 + length {
                let json = mutate_json(rng, &base[8..8 + length]);
                let mut file = (json.len() as u64).to_le_bytes().to_vec();
                file.extend(json);
                file.extend(&base[8 + length..]);
                file
            } else {
                mutate_bytes(rng, base)
            }
        },
        |bytes| targets::safetensors_file(bytes, &path),
    );
    assert!(tried > 0);
}

#[test]
fn decoder_configurations() {
    let mut seeds = Vec::new();
    for entry in std::fs::read_dir(fixtures().join("reference/families")).unwrap().filter_map(|e| e.ok()) {
        let reference: Value = serde_json::from_slice(&std::fs::read(entry.path()).unwrap()).unwrap();
        seeds.push(serde_json::to_vec(&reference["config"]).unwrap());
    }
    let tried = fuzz("config", seeds, mutate_json, targets::decoder_config);
    assert!(tried > 0);
}

#[test]
fn modelfiles() {
    let seeds = vec![
        b"FROM smol\nSYSTEM \"You are a cat.\"\nPARAMETER temperature 0.3\nPARAMETER stop \"<|im_end|>\"\n".to_vec(),
        b"FROM smol\nTEMPLATE \"\"\"{{ .System }} {{ .Prompt }}\"\"\"\nMESSAGE user Hi\nMESSAGE assistant Hello\nPARAMETER num_ctx 2048\nLICENSE \"\"\"MIT\"\"\"\n".to_vec(),
        b"# comment\nfrom ./model.gguf\nparameter seed 42\nadapter x\n".to_vec(),
    ];
    let tried = fuzz("modelfile", seeds, mutate_text, targets::modelfile);
    assert!(tried > 0);
}

#[test]
fn chat_templates() {
    let mut seeds = Vec::new();
    for entry in std::fs::read_dir(fixtures().join("templates")).unwrap().filter_map(|e| e.ok()) {
        if entry.path().extension().is_some_and(|x| x == "jinja") {
            seeds.push(std::fs::read(entry.path()).unwrap());
        }
    }
    let tried = fuzz("template", seeds, mutate_text, targets::chat_template);
    assert!(tried > 0);
}

#[test]
fn tokenizer_files() {
    let seeds = vec![std::fs::read(models_dir().join("all-MiniLM-L6-v2/tokenizer.json")).unwrap()];
    let folder = tempfile::tempdir().unwrap();
    let path = folder.path().join("tokenizer.json");
    let tried = fuzz("tokenizer", seeds, mutate_json, |bytes| targets::tokenizer_file(bytes, &path));
    assert!(tried > 0);
}
