//! Real chat templates (llama.cpp's models/templates copies) rendered by mlxserver's minijinja
//! setup must match transformers' `apply_chat_template` (Python jinja2) byte for byte.
//! Reference: tests/fixtures/templates/expected.json from
//! scripts/reference/make_template_references.py.

use std::path::PathBuf;

use mlxserver::engine::template::{ChatTemplate, TemplateMessage};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/templates")
}

/// A fixture message as the server builds it (`ChatMessage::to_template`).
fn message(value: &Value) -> TemplateMessage {
    let text = |key: &str| value.get(key).and_then(Value::as_str).map(str::to_string);
    TemplateMessage {
        role: text("role").expect("role"),
        content: text("content").expect("content"),
        tool_calls: value.get("tool_calls").cloned(),
        tool_call_id: text("tool_call_id"),
        name: text("name"),
    }
}

/// The generator stands `strftime_now(format)` in as "\0strftime:<format>\0"; today's date in
/// that format is what both sides really produce.
fn with_today(expected: &str) -> String {
    let mut out = String::new();
    let mut rest = expected;
    while let Some(start) = rest.find("\u{0}strftime:") {
        out.push_str(&rest[..start]);
        let after = &rest[start + "\u{0}strftime:".len()..];
        let end = after.find('\u{0}').expect("closed strftime marker");
        out.push_str(&chrono::Local::now().format(&after[..end]).to_string());
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

/// Where two renderings part, line by line, escaped so whitespace shows.
fn diff(expected: &str, actual: &str) -> String {
    let at = expected.bytes().zip(actual.bytes()).take_while(|(a, b)| a == b).count();
    let line = expected[..at].matches('\n').count() + 1;
    let start = expected[..at].rfind('\n').map_or(0, |i| i + 1);
    let window = |text: &str| {
        let from = start.min(text.len());
        let to = text[from..].char_indices().nth(240).map_or(text.len(), |(i, _)| from + i);
        format!("{:?}", &text[from..to])
    };
    format!(
        "first difference at byte {at} (line {line}; lengths {} vs {})\n  python jinja2: {}\n  mlxserver:     {}",
        expected.len(),
        actual.len(),
        window(expected),
        window(actual)
    )
}

#[test]
fn real_templates_render_like_transformers() {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).expect("expected.json");
    let entries: Vec<Value> = serde_json::from_str(&text).expect("expected.json parses");
    assert!(entries.len() >= 40, "too few reference entries: {}", entries.len());
    let mut failures = Vec::new();
    let mut passed = 0;
    for entry in &entries {
        let name = entry["template"].as_str().unwrap();
        let case = entry["case"].as_str().unwrap();
        let vars = &entry["variables"];
        let source = std::fs::read_to_string(fixtures().join(format!("{name}.jinja"))).expect("template file");
        let template = match ChatTemplate::new(Some(source), vars["bos_token"].as_str().unwrap(), vars["eos_token"].as_str().unwrap()) {
            Ok(template) => template,
            Err(error) => {
                failures.push(format!("{name} / {case}: does not compile: {error}"));
                continue;
            }
        };
        let messages: Vec<TemplateMessage> = vars["messages"].as_array().unwrap().iter().map(message).collect();
        let tools = vars.get("tools").filter(|t| !t.is_null());
        let result = template.render_with(&messages, vars["add_generation_prompt"].as_bool().unwrap(), tools, vars["enable_thinking"].as_bool());
        match (entry.get("rendered").and_then(Value::as_str), result) {
            (Some(expected), Ok(actual)) => {
                let expected = with_today(expected);
                if expected == actual {
                    passed += 1;
                } else {
                    failures.push(format!("{name} / {case}: {}", diff(&expected, &actual)));
                }
            }
            (Some(_), Err(error)) => failures.push(format!("{name} / {case}: jinja2 renders, mlxserver fails: {error}")),
            (None, Ok(actual)) => failures.push(format!("{name} / {case}: jinja2 raises ({}), mlxserver renders {actual:?}", entry["error"])),
            (None, Err(error)) => {
                // The template's own raise_exception message must come through.
                let reason = entry["error"].as_str().unwrap_or("");
                let reason = reason.split_once(": ").map_or(reason, |(_, message)| message);
                if error.to_string().contains(reason) {
                    passed += 1;
                } else {
                    failures.push(format!("{name} / {case}: both raise, but mlxserver says {error} and jinja2 {reason:?}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} of {} template renderings differ from jinja2:\n\n{}", failures.len(), passed + failures.len(), failures.join("\n\n"));
}

/// Expected strings are Python's `json.dumps` output for the same value and arguments.
#[test]
fn tojson_writes_what_python_json_dumps_writes() {
    let source = "{{ tools | tojson }}|{{ tools | tojson(ensure_ascii=True, separators=(',', ':'), sort_keys=True) }}|{{ tools | tojson(indent=2) }}";
    let template = ChatTemplate::new(Some(source.into()), "", "").unwrap();
    let value = serde_json::json!({"b": [1, {"é😀": "<&'>", "n": null}], "a": [], "c": {}});
    let text = template.render(&[], false, Some(&value)).unwrap();
    let parts: Vec<&str> = text.split('|').collect();
    assert_eq!(parts[0], r#"{"b": [1, {"é😀": "<&'>", "n": null}], "a": [], "c": {}}"#);
    assert_eq!(parts[1], r#"{"a":[],"b":[1,{"n":null,"\u00e9\ud83d\ude00":"<&'>"}],"c":{}}"#);
    assert_eq!(parts[2], "{\n  \"b\": [\n    1,\n    {\n      \"é😀\": \"<&'>\",\n      \"n\": null\n    }\n  ],\n  \"a\": [],\n  \"c\": {}\n}");
}
