//! `mlxserver config setup` driven through a real pseudo-terminal, typing as a person would.

use std::time::Duration;

use expectrl::Session;

use crate::common::Home;

const DOWN: &str = "\x1b[B";
const ENTER: &str = "\r";
const BACKSPACE: &str = "\x7f";

fn spawn_wizard(home: &Home) -> Session {
    let mut command = home.command();
    command.args(["config", "setup"]);
    let mut session = Session::spawn(command).expect("spawn the wizard in a pty");
    session.set_expect_timeout(Some(Duration::from_secs(20)));
    session
}

fn read_config(home: &Home) -> toml::Table {
    let text = std::fs::read_to_string(home.path().join("config.toml")).expect("config.toml written");
    toml::from_str(&text).expect("valid TOML")
}

#[test]
fn wizard_in_english_writes_a_valid_config() {
    let home = Home::new();
    let models = home.path().join("my-models");
    let mut wizard = spawn_wizard(&home);
    wizard.expect("Language").unwrap();
    wizard.send(ENTER).unwrap(); // English is the default
    wizard.expect("Folder for models").unwrap();
    wizard.send(models.to_str().unwrap()).unwrap();
    wizard.send(ENTER).unwrap();
    wizard.expect("Address to listen on").unwrap();
    wizard.send(ENTER).unwrap(); // keep 127.0.0.1
    wizard.expect("Port").unwrap();
    wizard.send("99999").unwrap();
    wizard.send(ENTER).unwrap();
    wizard.expect("Enter a port number from 1 to 65535.").unwrap();
    for _ in 0..5 {
        wizard.send(BACKSPACE).unwrap();
    }
    wizard.send("28080").unwrap();
    wizard.send(ENTER).unwrap();
    wizard.expect("API key").unwrap();
    wizard.send(DOWN).unwrap(); // "Enter a key"
    wizard.send(ENTER).unwrap();
    wizard.expect("Key").unwrap();
    wizard.send("short").unwrap();
    wizard.send(ENTER).unwrap();
    wizard.expect("Use at least 8 characters").unwrap();
    wizard.send("-but-longer").unwrap();
    wizard.send(ENTER).unwrap();
    wizard.expect("Save this configuration?").unwrap();
    wizard.send("y").unwrap();
    wizard.send(ENTER).unwrap();
    wizard.expect("Saved").unwrap();
    wizard.expect(expectrl::Eof).unwrap();

    let config = read_config(&home);
    assert_eq!(config["language"].as_str(), Some("en"));
    assert_eq!(config["port"].as_integer(), Some(28080));
    assert_eq!(config["host"].as_str(), Some("127.0.0.1"));
    assert_eq!(config["api_key"].as_str(), Some("short-but-longer"));
    assert_eq!(config["models_dir"].as_str(), Some(models.to_str().unwrap()));
    assert!(models.is_dir(), "the wizard checked the folder by creating it");

    // The file loads back through the CLI, with the key masked.
    let shown = crate::common::stdout(&home.run(&["config", "show"]));
    assert!(shown.contains("port = 28080"), "{shown}");
    assert!(shown.contains("api_key = ************nger"), "{shown}");
}

#[test]
fn wizard_in_japanese_switches_language_and_generates_a_key() {
    let home = Home::new();
    let mut wizard = spawn_wizard(&home);
    wizard.expect("Language").unwrap();
    wizard.send(DOWN).unwrap();
    wizard.send(ENTER).unwrap();
    wizard.expect("モデルの保存先フォルダー").unwrap();
    wizard.send(ENTER).unwrap(); // default folder under the home
    wizard.expect("待ち受けアドレス").unwrap();
    wizard.send(ENTER).unwrap();
    wizard.expect("ポート").unwrap();
    wizard.send(ENTER).unwrap(); // 27000
    wizard.expect("API キー").unwrap();
    wizard.send(DOWN).unwrap();
    wizard.send(DOWN).unwrap(); // "ランダムなキーを生成する"
    wizard.send(ENTER).unwrap();
    wizard.expect("API キー: mlx-").unwrap();
    wizard.expect("この設定を保存しますか").unwrap();
    wizard.send("y").unwrap();
    wizard.send(ENTER).unwrap();
    wizard.expect("保存しました").unwrap();
    wizard.expect(expectrl::Eof).unwrap();

    let config = read_config(&home);
    assert_eq!(config["language"].as_str(), Some("ja"));
    assert_eq!(config["port"].as_integer(), Some(27000));
    let key = config["api_key"].as_str().expect("a generated key");
    assert!(key.starts_with("mlx-") && key.len() == 52, "{key}");
}

#[test]
fn cancelling_the_wizard_saves_nothing() {
    let home = Home::new();
    let mut wizard = spawn_wizard(&home);
    wizard.expect("Language").unwrap();
    wizard.send("\x1b").unwrap(); // Esc
    wizard.expect("nothing was saved").unwrap();
    assert!(!home.path().join("config.toml").exists());
}
