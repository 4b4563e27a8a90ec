//! `mlxserver run` driven as a person would: a real pseudo-terminal for the interactive chat
//! (streamed answers, /set, /show, /clear, Ctrl-C in the middle of an answer, /bye), one-shot
//! and piped modes, with and without a running server, in English and Japanese.

use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

use expectrl::Session;

use crate::common::{stderr, stdout, Home};
use crate::serving::{home_with_models, start, CHAT};

const ENTER: &str = "\r";

fn chat_session(home: &Home, args: &[&str]) -> Session {
    let mut command = home.command();
    command.arg("run").arg(CHAT).args(args);
    let mut session = Session::spawn(command).expect("spawn run in a pty");
    session.set_expect_timeout(Some(Duration::from_secs(120)));
    session
}

/// Types a line and waits for `reply` and the next prompt. Input typed while an answer is
/// still printing would be dropped when the line editor takes the terminal back, so every
/// step waits for the prompt first.
fn line(chat: &mut Session, text: &str, reply: &str) {
    chat.send(text).unwrap();
    chat.send(ENTER).unwrap();
    chat.expect(reply).unwrap_or_else(|e| panic!("{text}: waiting for {reply:?}: {e}"));
    chat.expect(">>> ").unwrap_or_else(|e| panic!("{text}: waiting for the prompt: {e}"));
}

#[test]
fn interactive_chat_in_english_without_a_server() {
    let _guard = crate::engine_reference::mlx_lock();
    let home = home_with_models();
    let mut chat = chat_session(&home, &[]);
    chat.expect("No server is running").unwrap();
    chat.expect("/help").unwrap();
    chat.expect(">>> ").unwrap();
    line(&mut chat, "/set parameter temperature 0", "Set parameter temperature to 0.");
    line(&mut chat, "/set parameter repeat_penalty 1", "Set parameter repeat_penalty to 1.");
    line(&mut chat, "What is the capital of France? Answer in one word.", "Paris");

    line(&mut chat, "/set parameter num_predict 3", "Set parameter num_predict to 3.");
    line(&mut chat, "/show parameters", "num_predict 3");
    line(&mut chat, "/set system \"You are a pirate.\"", "Set the system prompt.");
    line(&mut chat, "/show system", "You are a pirate.");
    line(&mut chat, "/clear", "Cleared the conversation.");

    // A long answer, stopped with Ctrl-C once it has started; the chat goes on.
    line(&mut chat, "/set parameter num_predict 400", "Set parameter num_predict to 400.");
    chat.send("Count from 1 to 100.").unwrap();
    chat.send(ENTER).unwrap();
    chat.expect("3").unwrap();
    chat.send("\x03").unwrap();
    chat.expect("(answer stopped)").unwrap();
    chat.expect(">>> ").unwrap();

    // A multi-line message between """.
    line(&mut chat, "/set parameter num_predict 8", "Set parameter num_predict to 8.");
    chat.send("\"\"\"Say hello").unwrap();
    chat.send(ENTER).unwrap();
    chat.expect("... ").unwrap();
    chat.send("to me\"\"\"").unwrap();
    chat.send(ENTER).unwrap();
    chat.expect(">>> ").unwrap();

    chat.send("/bye").unwrap();
    chat.send(ENTER).unwrap();
    chat.expect(expectrl::Eof).unwrap();
    let history = std::fs::read_to_string(home.path().join("history.txt")).unwrap();
    assert!(history.contains("What is the capital of France?"), "{history}");
}

#[test]
fn interactive_chat_in_japanese_through_a_running_server() {
    let _guard = crate::engine_reference::mlx_lock();
    let home = home_with_models();
    home.write_config("language = \"ja\"\n");
    let server = start(&home, &[], &[]);
    let port = server.port.to_string();
    let mut command = home.command();
    command.env("MLXSERVER_PORT", &port).args(["run", CHAT]);
    let mut chat = Session::spawn(command).unwrap();
    chat.set_expect_timeout(Some(Duration::from_secs(120)));
    chat.expect("メッセージを入力してください").unwrap();
    chat.expect(">>> ").unwrap();
    line(&mut chat, "/set parameter num_predict 32", "パラメーター num_predict を 32 に設定しました。");
    line(&mut chat, "日本の首都はどこですか？", "\n");
    line(&mut chat, "/set parameter num_predict 300", "パラメーター num_predict を 300 に設定しました。");
    line(&mut chat, "/set parameter temperature 0", "パラメーター temperature を 0 に設定しました。");
    line(&mut chat, "/set parameter repeat_penalty 1", "パラメーター repeat_penalty を 1 に設定しました。");
    line(&mut chat, "/clear", "会話をリセットしました。");
    chat.send("Count from 1 to 100.").unwrap();
    chat.send(ENTER).unwrap();
    chat.expect("3").unwrap();
    chat.send("\x03").unwrap();
    chat.expect("(回答を中断しました)").unwrap();
    chat.expect(">>> ").unwrap();
    chat.send("\x04").unwrap();
    chat.expect(expectrl::Eof).unwrap();
    drop(server);
}

/// A personality that answers greedily and briefly.
fn greedy_personality(home: &Home) {
    let modelfile = home.path().join("Greedy.modelfile");
    std::fs::write(&modelfile, format!("FROM {CHAT}\nPARAMETER temperature 0\nPARAMETER repeat_penalty 1\nPARAMETER num_predict 48\n")).unwrap();
    let created = home.run(&["create", "greedy", "-f", modelfile.to_str().unwrap()]);
    assert!(created.status.success(), "{}", stderr(&created));
}

#[test]
fn one_shot_and_piped_modes_print_only_the_answer() {
    let _guard = crate::engine_reference::mlx_lock();
    let home = home_with_models();
    greedy_personality(&home);
    let output = home.run(&["run", "greedy", "What is the capital of France? Answer in one word."]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(stdout(&output).trim(), "The capital of France is Paris.");
    assert!(stderr(&output).contains("No server is running"));

    // Piped: the answer arrives on stdout in pieces, as it is generated.
    let mut child = home
        .command()
        .args(["run", "greedy", "--verbose"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all("Count from one to thirty in words.".as_bytes()).unwrap();
    }
    let mut out = child.stdout.take().unwrap();
    let mut arrivals = Vec::new();
    let mut text = Vec::new();
    let mut buffer = [0u8; 64];
    let started = Instant::now();
    loop {
        let read = out.read(&mut buffer).unwrap();
        if read == 0 {
            break;
        }
        arrivals.push(started.elapsed());
        text.extend_from_slice(&buffer[..read]);
    }
    let status = child.wait().unwrap();
    assert!(status.success());
    let text = String::from_utf8(text).expect("valid UTF-8");
    assert!(text.split_whitespace().count() > 5, "{text}");
    assert!(arrivals.len() > 5, "streamed in pieces: {arrivals:?}");
    let spread = *arrivals.last().unwrap() - arrivals[0];
    assert!(spread > Duration::from_millis(200), "pieces arrived over time: {arrivals:?}");
    let mut timings = String::new();
    child.stderr.take().unwrap().read_to_string(&mut timings).unwrap();
    assert!(timings.contains("eval:") && timings.contains("tokens/s"), "{timings}");
}

/// The prompt token count that `--verbose` reports.
fn prompt_tokens(stderr: &str) -> usize {
    let line = stderr.lines().find(|l| l.starts_with("prompt eval:")).unwrap_or_else(|| panic!("{stderr}"));
    line.split_whitespace().nth(2).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{line}"))
}

#[test]
fn the_nyan_sensei_personality_applies_its_system_prompt() {
    let _guard = crate::engine_reference::mlx_lock();
    let home = home_with_models();
    let modelfile = home.path().join("Modelfile");
    // The Modelfile of the original README, on the small model.
    std::fs::write(
        &modelfile,
        format!("# ベースとなるモデル\nFROM {CHAT}\n\n# AIの役割や口調を定義\nSYSTEM \"\"\"\nあなたは猫のキャラクター「ニャンコ先生」です。\n語尾には必ず「〜ニャ」を付けて、可愛らしく親しみやすい口調で話してください。\n\"\"\"\nPARAMETER num_predict 24\n"),
    )
    .unwrap();
    let created = home.run(&["create", "nyan-sensei", "-f", modelfile.to_str().unwrap()]);
    assert!(created.status.success(), "{}", stderr(&created));
    let shown = stdout(&home.run(&["show", "nyan-sensei", "--system"]));
    assert!(shown.contains("ニャンコ先生"), "{shown}");
    let question = "こんにちは！自己紹介して！";
    let nyan = home.run(&["run", "nyan-sensei", question, "--verbose"]);
    assert!(nyan.status.success(), "{}", stderr(&nyan));
    assert!(!stdout(&nyan).trim().is_empty());
    // The SYSTEM prompt replaces the model's default one: many more prompt tokens, and the
    // PARAMETER caps the answer.
    // The base model with the same answer cap and no SYSTEM (an uncapped sampled answer can
    // run to the end of the context, minutes on this CPU).
    let capped = home.path().join("Modelfile.capped");
    std::fs::write(&capped, format!("FROM {CHAT}\nPARAMETER num_predict 24\n")).unwrap();
    let created = home.run(&["create", "capped", "-f", capped.to_str().unwrap()]);
    assert!(created.status.success(), "{}", stderr(&created));
    let base = home.run(&["run", "capped", question, "--verbose"]);
    let (with_system, without) = (prompt_tokens(&stderr(&nyan)), prompt_tokens(&stderr(&base)));
    assert!(with_system > without + 20, "nyan-sensei's prompt carries its SYSTEM: {with_system} vs {without} tokens");
    let eval = stderr(&nyan).lines().find(|l| l.starts_with("eval:")).unwrap().to_string();
    assert!(eval.contains(" 24 tokens") || eval.split_whitespace().nth(1).and_then(|n| n.parse::<usize>().ok()).is_some_and(|n| n <= 24), "{eval}");
}
