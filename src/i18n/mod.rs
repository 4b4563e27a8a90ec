//! English and Japanese message catalogs for every user-facing string.
//!
//! The catalogs are flat TOML tables (`en.toml`, `ja.toml`) compiled into the binary. A message
//! is looked up by key and may carry `{name}` placeholders. The process picks one language at
//! start-up (`language` in the config, `--lang` per call); errors carried over HTTP always
//! render in English because API clients parse them.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::LazyLock;

use serde::{Deserialize, Serialize};

/// A language with a catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Lang {
    #[default]
    En,
    Ja,
}

impl Lang {
    pub const ALL: [Lang; 2] = [Lang::En, Lang::Ja];

    pub fn code(self) -> &'static str {
        match self {
            Lang::En => "en",
            Lang::Ja => "ja",
        }
    }
}

impl FromStr for Lang {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value.trim().to_ascii_lowercase().as_str() {
            "en" | "english" => Ok(Lang::En),
            "ja" | "jp" | "japanese" | "日本語" => Ok(Lang::Ja),
            other => Err(other.to_string()),
        }
    }
}

impl fmt::Display for Lang {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

type Catalog = HashMap<String, String>;

fn parse_catalog(source: &str, name: &str) -> Catalog {
    // The catalogs are part of the binary and covered by tests, so a broken one is a
    // programming error, not user input.
    let table: toml::Table = toml::from_str(source)
        .unwrap_or_else(|error| panic!("catalog {name} is not valid TOML: {error}"));
    table
        .into_iter()
        .filter_map(|(key, value)| value.as_str().map(|text| (key, text.to_string())))
        .collect()
}

pub(crate) const EN_SOURCE: &str = include_str!("en.toml");
pub(crate) const JA_SOURCE: &str = include_str!("ja.toml");

static EN: LazyLock<Catalog> = LazyLock::new(|| parse_catalog(EN_SOURCE, "en.toml"));
static JA: LazyLock<Catalog> = LazyLock::new(|| parse_catalog(JA_SOURCE, "ja.toml"));

static CURRENT: AtomicU8 = AtomicU8::new(0);

/// Sets the language of this process's CLI output.
pub fn set_language(lang: Lang) {
    CURRENT.store(lang as u8, Ordering::Relaxed);
}

pub fn language() -> Lang {
    match CURRENT.load(Ordering::Relaxed) {
        1 => Lang::Ja,
        _ => Lang::En,
    }
}

fn catalog(lang: Lang) -> &'static Catalog {
    match lang {
        Lang::En => &EN,
        Lang::Ja => &JA,
    }
}

/// All keys of one catalog (for completeness tests).
pub fn keys(lang: Lang) -> Vec<&'static str> {
    let mut keys: Vec<&'static str> = catalog(lang).keys().map(String::as_str).collect();
    keys.sort_unstable();
    keys
}

/// Renders `key` in `lang`, substituting `{name}` placeholders from `args`.
pub fn render(lang: Lang, key: &str, args: &[(&str, String)]) -> String {
    let template = catalog(lang)
        .get(key)
        .or_else(|| EN.get(key))
        .map(String::as_str)
        .unwrap_or(key);
    let mut out = template.to_string();
    for (name, value) in args {
        out = out.replace(&format!("{{{name}}}"), value);
    }
    out
}

/// A message not yet rendered: a catalog key and its arguments. Errors carry these so that
/// the CLI can print them in the user's language and the API in English.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    pub key: &'static str,
    pub args: Vec<(&'static str, String)>,
}

impl Msg {
    pub fn new(key: &'static str) -> Self {
        Msg { key, args: Vec::new() }
    }

    pub fn arg(mut self, name: &'static str, value: impl fmt::Display) -> Self {
        self.args.push((name, value.to_string()));
        self
    }

    pub fn render(&self, lang: Lang) -> String {
        let args: Vec<(&str, String)> =
            self.args.iter().map(|(name, value)| (*name, value.clone())).collect();
        render(lang, self.key, &args)
    }

    pub fn english(&self) -> String {
        self.render(Lang::En)
    }

    pub fn localized(&self) -> String {
        self.render(language())
    }
}

impl fmt::Display for Msg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.english())
    }
}

/// `t!("key")` or `t!("key", name = value, ...)`: the message in the current language.
#[macro_export]
macro_rules! t {
    ($key:literal) => {
        $crate::i18n::render($crate::i18n::language(), $key, &[])
    };
    ($key:literal, $($name:ident = $value:expr),+ $(,)?) => {
        $crate::i18n::render(
            $crate::i18n::language(),
            $key,
            &[$((stringify!($name), ($value).to_string())),+],
        )
    };
}

/// `msg!("key", name = value, ...)`: a [`Msg`] to render later.
#[macro_export]
macro_rules! msg {
    ($key:literal) => {
        $crate::i18n::Msg::new($key)
    };
    ($key:literal, $($name:ident = $value:expr),+ $(,)?) => {
        $crate::i18n::Msg::new($key)$(.arg(stringify!($name), $value))+
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_substituted() {
        let text = render(Lang::En, "server.listening", &[("address", "127.0.0.1:1".into())]);
        assert!(text.contains("127.0.0.1:1"), "{text}");
        assert!(!text.contains("{address}"));
    }

    #[test]
    fn unknown_language_codes_are_rejected() {
        assert_eq!("ja".parse::<Lang>(), Ok(Lang::Ja));
        assert_eq!("EN".parse::<Lang>(), Ok(Lang::En));
        assert!("fr".parse::<Lang>().is_err());
    }
}
