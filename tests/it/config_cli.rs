//! Configuration through the real binary: defaults, file, environment, flags, migration of the
//! Python mlxserver's config.json, `config set` validation, one-line localized errors.

use crate::common::{stderr, stdout, Home};

#[test]
fn defaults_without_a_file() {
    let home = Home::new();
    let output = home.run(&["config", "show"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.contains("port = 27000"), "{text}");
    assert!(text.contains("host = 127.0.0.1"), "{text}");
    assert!(text.contains("keep_alive = 5m"), "{text}");
    assert!(text.contains("api_key = -"), "{text}");
}

#[test]
fn environment_overrides_the_file() {
    let home = Home::new();
    home.write_config("port = 1234\nhost = \"0.0.0.0\"\n[rag]\ntop_k = 9\n");
    let output = home.command().args(["config", "show"]).env("MLXSERVER_PORT", "2345").env("MLXSERVER_RAG_TOP_K", "3").output().unwrap();
    let text = stdout(&output);
    assert!(text.contains("port = 2345"), "{text}");
    assert!(text.contains("host = 0.0.0.0"), "{text}");
    assert!(text.contains("rag.top_k = 3"), "{text}");
}

#[test]
fn legacy_json_is_migrated_once() {
    let home = Home::new();
    let legacy = serde_json::json!({
        "language": "ja",
        "models_dir": home.path().join("old-models"),
        "host": "127.0.0.1",
        "port": 28000,
        "max_loaded_models": 2,
        "api_key": "legacy-secret-key",
        "model_ttl": 120
    });
    std::fs::write(home.path().join("config.json"), legacy.to_string()).unwrap();
    let output = home.run(&["config", "show"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("移行しました"), "the notice speaks the migrated language: {}", stderr(&output));
    let text = stdout(&output);
    assert!(text.contains("port = 28000"), "{text}");
    assert!(text.contains("keep_alive = 2m"), "{text}");
    assert!(text.contains("max_loaded_models = 2"), "{text}");
    assert!(text.contains("api_key = *************-key"), "the key is masked: {text}");
    assert!(!text.contains("legacy-secret-key"));
    let toml_text = std::fs::read_to_string(home.path().join("config.toml")).unwrap();
    let table: toml::Table = toml::from_str(&toml_text).unwrap();
    assert_eq!(table["language"].as_str(), Some("ja"));
    assert_eq!(table["api_key"].as_str(), Some("legacy-secret-key"));
    // A second run reads the TOML and says nothing about migrating.
    let again = home.run(&["config", "show"]);
    assert!(!stderr(&again).contains("移行"), "{}", stderr(&again));
}

#[test]
fn set_validates_and_keeps_other_keys() {
    let home = Home::new();
    home.write_config("language = \"en\"\nport = 1111\n");
    let bad = home.run(&["config", "set", "port", "70000"]);
    assert!(!bad.status.success());
    let message = stderr(&bad);
    assert_eq!(message.trim().lines().count(), 1, "one line: {message}");
    assert!(message.contains("invalid value '70000' for port"), "{message}");
    assert!(!message.contains("panicked") && !message.contains("RUST_BACKTRACE"));
    assert!(std::fs::read_to_string(home.path().join("config.toml")).unwrap().contains("port = 1111"));

    let good = home.run(&["config", "set", "keep_alive", "10m"]);
    assert!(good.status.success(), "{}", stderr(&good));
    let text = std::fs::read_to_string(home.path().join("config.toml")).unwrap();
    assert!(text.contains("port = 1111") && text.contains("keep_alive = \"10m\""), "{text}");

    let nested = home.run(&["config", "set", "rag.min_score", "0.25"]);
    assert!(nested.status.success(), "{}", stderr(&nested));
    let shown = stdout(&home.run(&["config", "show"]));
    assert!(shown.contains("rag.min_score = 0.25"), "{shown}");
}

#[test]
fn errors_are_one_localized_line() {
    let home = Home::new();
    let output = home.run(&["--lang", "ja", "config", "set", "nope", "1"]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert_eq!(message.trim().lines().count(), 1, "{message}");
    assert!(message.starts_with("エラー: 不明な設定キー 'nope'"), "{message}");

    home.write_config("port = \"not a number");
    let broken = home.run(&["config", "show"]);
    assert!(!broken.status.success());
    let message = stderr(&broken);
    assert_eq!(message.trim().lines().count(), 1, "{message}");
    assert!(message.contains("config.toml is not a valid configuration"), "{message}");
}

#[test]
fn setup_needs_a_terminal() {
    let home = Home::new();
    let output = home.run(&["config", "setup"]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("needs an interactive terminal"), "{}", stderr(&output));
}

#[test]
fn version_and_localized_help() {
    let home = Home::new();
    let version = home.run(&["--version"]);
    assert!(stdout(&version).contains(env!("CARGO_PKG_VERSION")));
    let help = home.run(&["--lang", "ja", "serve", "--help"]);
    let text = stdout(&help);
    assert!(text.contains("サーバーを起動します"), "{text}");
    assert!(text.contains("待ち受けポート"), "{text}");
    let help = home.run(&["serve", "--help"]);
    assert!(stdout(&help).contains("Port to listen on"));
}
