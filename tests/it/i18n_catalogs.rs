//! The English and Japanese catalogs are complete, every key the code uses exists, every
//! command and flag has localized help, and nothing is printed that bypasses the catalogs.

use std::collections::BTreeSet;
use std::path::Path;

use clap::CommandFactory;
use mlxserver::i18n::{self, Lang};

fn source_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            source_files(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

fn sources() -> Vec<(String, String)> {
    let mut files = Vec::new();
    source_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut files);
    files.into_iter().map(|path| (path.display().to_string(), std::fs::read_to_string(&path).unwrap())).collect()
}

/// The string literal that starts right after `prefix` at each of its occurrences.
fn literals_after<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(index) = rest.find(prefix) {
        // `t!(` must not be the tail of another macro such as `format!(`.
        let preceded = rest[..index].chars().next_back().is_some_and(|c| c.is_alphanumeric() || c == '_');
        rest = &rest[index + prefix.len()..];
        if preceded {
            continue;
        }
        let trimmed = rest.trim_start();
        if let Some(body) = trimmed.strip_prefix('"') {
            if let Some(end) = body.find('"') {
                found.push(&body[..end]);
            }
        }
    }
    found
}

#[test]
fn both_catalogs_have_the_same_keys() {
    let english: BTreeSet<_> = i18n::keys(Lang::En).into_iter().collect();
    let japanese: BTreeSet<_> = i18n::keys(Lang::Ja).into_iter().collect();
    let only_en: Vec<_> = english.difference(&japanese).collect();
    let only_ja: Vec<_> = japanese.difference(&english).collect();
    assert!(only_en.is_empty(), "missing from ja.toml: {only_en:?}");
    assert!(only_ja.is_empty(), "missing from en.toml: {only_ja:?}");
    for key in &english {
        for lang in Lang::ALL {
            assert!(!i18n::render(lang, key, &[]).trim().is_empty(), "{key} is empty in {lang}");
        }
    }
}

#[test]
fn placeholders_agree_between_languages() {
    let placeholders = |text: &str| -> BTreeSet<String> {
        text.split('{').skip(1).filter_map(|part| part.split_once('}').map(|(name, _)| name.to_string())).collect()
    };
    for key in i18n::keys(Lang::En) {
        let en = placeholders(&i18n::render(Lang::En, key, &[]));
        let ja = placeholders(&i18n::render(Lang::Ja, key, &[]));
        assert_eq!(en, ja, "placeholders of {key}");
    }
}

#[test]
fn every_key_used_in_the_code_exists() {
    let known: BTreeSet<_> = i18n::keys(Lang::En).into_iter().collect();
    let mut missing = Vec::new();
    // The macros' own definitions name a placeholder key.
    for (file, text) in sources().into_iter().filter(|(file, _)| !file.ends_with("i18n/mod.rs")) {
        for prefix in ["t!(", "msg!("] {
            for key in literals_after(&text, prefix) {
                if !known.contains(key) {
                    missing.push(format!("{file}: {key}"));
                }
            }
        }
    }
    assert!(missing.is_empty(), "keys missing from the catalogs: {missing:#?}");
}

#[test]
fn nothing_is_printed_outside_the_catalogs() {
    let mut offenders = Vec::new();
    for (file, text) in sources() {
        for prefix in ["println!(", "eprintln!(", "print!(", "eprint!("] {
            for literal in literals_after(&text, prefix) {
                // Remove `{...}` placeholders; what is left must carry no words.
                let mut bare = String::new();
                let mut depth = 0;
                for c in literal.chars() {
                    match c {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        _ if depth == 0 => bare.push(c),
                        _ => {}
                    }
                }
                if bare.chars().any(char::is_alphabetic) {
                    offenders.push(format!("{file}: {prefix}\"{literal}\""));
                }
            }
        }
    }
    assert!(offenders.is_empty(), "printed text that is not from a catalog: {offenders:#?}");
}

fn help_keys(command: &clap::Command, path: &str, out: &mut Vec<String>) {
    out.push(if path.is_empty() { "help.mlxserver".into() } else { format!("help.{path}") });
    for arg in command.get_arguments() {
        let id = arg.get_id().as_str();
        if id == "help" || id == "version" {
            continue;
        }
        out.push(if path.is_empty() { format!("help.arg.{id}") } else { format!("help.{path}.{id}") });
    }
    for sub in command.get_subcommands() {
        let sub_path = if path.is_empty() { sub.get_name().to_string() } else { format!("{path}.{}", sub.get_name()) };
        help_keys(sub, &sub_path, out);
    }
}

#[test]
fn every_command_and_flag_has_localized_help() {
    let known: BTreeSet<_> = i18n::keys(Lang::En).into_iter().collect();
    let mut keys = Vec::new();
    help_keys(&mlxserver::cli::Cli::command(), "", &mut keys);
    let missing: Vec<_> = keys.iter().filter(|key| !known.contains(key.as_str())).collect();
    assert!(missing.is_empty(), "help texts missing from the catalogs: {missing:#?}");
}
