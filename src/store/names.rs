//! Model names: `owner/repo` from the Hub or short names, optionally with Ollama's `:tag`.
//! A name maps to exactly one folder directly under `models_dir` and can never escape it.

use std::fmt;

use super::StoreError;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ModelName {
    /// `owner` of `owner/repo`, if any.
    pub owner: Option<String>,
    pub name: String,
}

const MAX_LEN: usize = 200;

fn check_part(raw: &str, part: &str) -> Result<(), StoreError> {
    let invalid = |reason: &'static str| StoreError::InvalidName { name: raw.to_string(), reason };
    if part.is_empty() {
        return Err(invalid("a part of the name is empty"));
    }
    if part == "." || part == ".." || part.starts_with('.') || part.starts_with('-') {
        return Err(invalid("a name part may not start with '.' or '-'"));
    }
    if part.contains("--") {
        return Err(invalid("'--' is reserved"));
    }
    if !part.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
        return Err(invalid("use letters, digits, '.', '_' and '-' only"));
    }
    Ok(())
}

impl ModelName {
    /// Parses `name`, `name:latest`, `owner/name` (a `:tag` other than `latest` is kept as
    /// part of the name, as `name-tag`).
    pub fn parse(raw: &str) -> Result<ModelName, StoreError> {
        let trimmed = raw.trim();
        let invalid = |reason: &'static str| StoreError::InvalidName { name: raw.to_string(), reason };
        if trimmed.is_empty() {
            return Err(invalid("the name is empty"));
        }
        if trimmed.len() > MAX_LEN {
            return Err(invalid("the name is too long"));
        }
        if trimmed.starts_with('/') || trimmed.contains('\\') || trimmed.contains('\0') {
            return Err(invalid("a name cannot be a path"));
        }
        let (path, tag) = match trimmed.rsplit_once(':') {
            Some((path, tag)) => (path, Some(tag)),
            None => (trimmed, None),
        };
        let parts: Vec<&str> = path.split('/').collect();
        let (owner, name) = match parts.as_slice() {
            [name] => (None, name.to_string()),
            [owner, name] => (Some(owner.to_string()), name.to_string()),
            _ => return Err(invalid("use NAME or OWNER/NAME")),
        };
        if let Some(owner) = &owner {
            check_part(raw, owner)?;
        }
        check_part(raw, &name)?;
        let name = match tag {
            None | Some("latest") => name,
            Some(tag) => {
                check_part(raw, tag)?;
                format!("{name}-{tag}")
            }
        };
        Ok(ModelName { owner, name })
    }

    /// The folder under `models_dir`: `owner--name` or `name`.
    pub fn folder_name(&self) -> String {
        match &self.owner {
            Some(owner) => format!("{owner}--{}", self.name),
            None => self.name.clone(),
        }
    }

    pub fn from_folder_name(folder: &str) -> Option<ModelName> {
        let raw = match folder.split_once("--") {
            Some((owner, name)) => format!("{owner}/{name}"),
            None => folder.to_string(),
        };
        ModelName::parse(&raw).ok()
    }
}

impl fmt::Display for ModelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.owner {
            Some(owner) => write!(f, "{owner}/{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_names() {
        assert_eq!(ModelName::parse("SmolLM2-135M-Instruct").unwrap().folder_name(), "SmolLM2-135M-Instruct");
        assert_eq!(ModelName::parse("smol:latest").unwrap().to_string(), "smol");
        assert_eq!(ModelName::parse("smol:v2").unwrap().to_string(), "smol-v2");
        let hub = ModelName::parse("HuggingFaceTB/SmolLM2-135M").unwrap();
        assert_eq!(hub.folder_name(), "HuggingFaceTB--SmolLM2-135M");
        assert_eq!(ModelName::from_folder_name("HuggingFaceTB--SmolLM2-135M"), Some(hub));
        assert_eq!(ModelName::parse("nyan-sensei").unwrap().to_string(), "nyan-sensei");
    }

    #[test]
    fn path_tricks_are_refused() {
        for bad in ["..", "../etc", "a/../../b", "/etc/passwd", "a/b/c", ".hidden", "-rf", "a\\b", "", "a b", "a--b", "x/..", "名前", "a:../b"] {
            assert!(ModelName::parse(bad).is_err(), "{bad:?} must be refused");
        }
    }
}
