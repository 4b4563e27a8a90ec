//! Ollama's Modelfile: `FROM`, `SYSTEM`, `TEMPLATE`, `PARAMETER`, `MESSAGE`, `LICENSE` and
//! comments, with `"""` blocks spanning lines. Unknown or unsupported instructions are errors
//! that name their line.

use serde::{Deserialize, Serialize};

use super::StoreError;

/// Generation parameters a personality or a request may set (Ollama's names).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Parameters {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_ctx: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_predict: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repeat_penalty: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repeat_last_n: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
}

impl Parameters {
    /// Every parameter name `set` accepts.
    pub const NAMES: &'static [&'static str] = &[
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "num_ctx",
        "num_predict",
        "repeat_penalty",
        "repeat_last_n",
        "presence_penalty",
        "frequency_penalty",
        "seed",
        "stop",
    ];

    /// Sets one parameter from its text form; `stop` accumulates.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), String> {
        let value = value.trim();
        fn number<T: std::str::FromStr>(name: &str, value: &str) -> Result<T, String> {
            value.parse().map_err(|_| format!("invalid value '{value}' for {name}"))
        }
        match name.to_ascii_lowercase().as_str() {
            "temperature" => self.temperature = Some(number(name, value)?),
            "top_p" => self.top_p = Some(number(name, value)?),
            "top_k" => self.top_k = Some(number(name, value)?),
            "min_p" => self.min_p = Some(number(name, value)?),
            "num_ctx" => self.num_ctx = Some(number(name, value)?),
            "num_predict" => self.num_predict = Some(number(name, value)?),
            "repeat_penalty" => self.repeat_penalty = Some(number(name, value)?),
            "repeat_last_n" => self.repeat_last_n = Some(number(name, value)?),
            "presence_penalty" => self.presence_penalty = Some(number(name, value)?),
            "frequency_penalty" => self.frequency_penalty = Some(number(name, value)?),
            "seed" => self.seed = Some(number::<i64>(name, value)?.max(0) as u64),
            "stop" => self.stop.push(unquote(value).to_string()),
            other => return Err(format!("unknown parameter '{other}'")),
        }
        Ok(())
    }

    /// Applies `other` on top of `self`: what `other` sets wins.
    pub fn overlay(&mut self, other: &Parameters) {
        macro_rules! take {
            ($($field:ident),*) => {$(if other.$field.is_some() { self.$field = other.$field; })*};
        }
        take!(temperature, top_p, top_k, min_p, num_ctx, num_predict, repeat_penalty, repeat_last_n, presence_penalty, frequency_penalty, seed);
        if !other.stop.is_empty() {
            self.stop = other.stop.clone();
        }
    }

    /// `(name, value)` pairs in Modelfile order, for `show`.
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut pairs = Vec::new();
        macro_rules! push {
            ($($field:ident),*) => {$(if let Some(value) = &self.$field { pairs.push((stringify!($field), value.to_string())); })*};
        }
        push!(temperature, top_p, top_k, min_p, num_ctx, num_predict, repeat_penalty, repeat_last_n, presence_penalty, frequency_penalty, seed);
        for stop in &self.stop {
            pairs.push(("stop", format!("{stop:?}")));
        }
        pairs
    }

    pub fn is_empty(&self) -> bool {
        self.pairs().is_empty()
    }
}

fn unquote(value: &str) -> &str {
    value.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(value)
}

/// A few-shot turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Modelfile {
    pub from: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    #[serde(default)]
    pub parameters: Parameters,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub messages: Vec<Message>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub license: Vec<String>,
}

impl Modelfile {
    pub fn parse(source: &str) -> Result<Modelfile, StoreError> {
        let mut modelfile = Modelfile::default();
        let lines: Vec<&str> = source.lines().collect();
        let mut index = 0;
        while index < lines.len() {
            let line_number = index + 1;
            let line = lines[index].trim();
            index += 1;
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let error = |reason: String| StoreError::Modelfile { line: line_number, reason };
            let (instruction, rest) = match line.split_once(char::is_whitespace) {
                Some((instruction, rest)) => (instruction, rest.trim_start()),
                None => (line, ""),
            };
            let upper = instruction.to_ascii_uppercase();
            // MESSAGE and PARAMETER take a word before their value.
            let (word, rest) = if upper == "MESSAGE" || upper == "PARAMETER" {
                match rest.split_once(char::is_whitespace) {
                    Some((word, rest)) => (word, rest.trim_start()),
                    None => (rest, ""),
                }
            } else {
                ("", rest)
            };
            // A value may be a """ block running over several lines.
            let mut value = rest.to_string();
            if let Some(after) = rest.strip_prefix("\"\"\"") {
                if let Some(end) = after.find("\"\"\"") {
                    value = after[..end].to_string();
                } else {
                    let mut block = vec![after.to_string()];
                    loop {
                        let Some(next) = lines.get(index) else {
                            return Err(error("unterminated \"\"\" block".into()));
                        };
                        index += 1;
                        if let Some(end) = next.find("\"\"\"") {
                            block.push(next[..end].to_string());
                            break;
                        }
                        block.push(next.to_string());
                    }
                    value = block.join("\n");
                }
                value = value.trim_matches('\n').to_string();
            } else {
                value = unquote(value.trim()).to_string();
            }
            match upper.as_str() {
                "FROM" => {
                    if value.trim().is_empty() {
                        return Err(error("FROM needs a model name".into()));
                    }
                    modelfile.from = value.trim().to_string();
                }
                "SYSTEM" => modelfile.system = Some(value),
                "TEMPLATE" => modelfile.template = Some(value),
                "LICENSE" => modelfile.license.push(value),
                "PARAMETER" => {
                    if word.is_empty() || value.is_empty() {
                        return Err(error("PARAMETER needs a name and a value".into()));
                    }
                    modelfile.parameters.set(word, &value).map_err(error)?;
                }
                "MESSAGE" => {
                    if word.is_empty() || value.is_empty() {
                        return Err(error("MESSAGE needs a role and a text".into()));
                    }
                    let role = word.to_ascii_lowercase();
                    if !matches!(role.as_str(), "system" | "user" | "assistant") {
                        return Err(error(format!("MESSAGE role must be system, user or assistant, not '{role}'")));
                    }
                    modelfile.messages.push(Message { role, content: value });
                }
                "ADAPTER" => return Err(error("ADAPTER (LoRA adapters) is not supported".into())),
                other => return Err(error(format!("unknown instruction '{other}'"))),
            }
        }
        if modelfile.from.is_empty() {
            return Err(StoreError::Modelfile { line: lines.len().max(1), reason: "a Modelfile needs a FROM line".into() });
        }
        Ok(modelfile)
    }

    /// Applies a personality layer on top of this one.
    pub fn overlay(&mut self, layer: &Modelfile) {
        if layer.system.is_some() {
            self.system = layer.system.clone();
        }
        if layer.template.is_some() {
            self.template = layer.template.clone();
        }
        self.parameters.overlay(&layer.parameters);
        if !layer.messages.is_empty() {
            self.messages = layer.messages.clone();
        }
        if !layer.license.is_empty() {
            self.license = layer.license.clone();
        }
    }

    /// The Modelfile as text (what `show --modelfile` prints).
    pub fn render(&self) -> String {
        let block = |text: &str| format!("\"\"\"{text}\"\"\"");
        let mut out = format!("FROM {}\n", self.from);
        if let Some(template) = &self.template {
            out.push_str(&format!("TEMPLATE {}\n", block(template)));
        }
        if let Some(system) = &self.system {
            out.push_str(&format!("SYSTEM {}\n", block(system)));
        }
        for (name, value) in self.parameters.pairs() {
            out.push_str(&format!("PARAMETER {name} {value}\n"));
        }
        for message in &self.messages {
            out.push_str(&format!("MESSAGE {} {}\n", message.role, block(&message.content)));
        }
        for license in &self.license {
            out.push_str(&format!("LICENSE {}\n", block(license)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NYAN: &str = "# ベースとなるモデル\nFROM Meta-Llama-3-8B-Instruct\n\n# AIの役割や口調を定義\nSYSTEM \"\"\"\nあなたは猫のキャラクター「ニャンコ先生」です。\n語尾には必ず「〜ニャ」を付けて、可愛らしく親しみやすい口調で話してください。\n\"\"\"\n";

    #[test]
    fn the_original_readme_modelfile() {
        let modelfile = Modelfile::parse(NYAN).unwrap();
        assert_eq!(modelfile.from, "Meta-Llama-3-8B-Instruct");
        let system = modelfile.system.unwrap();
        assert!(system.starts_with("あなたは猫のキャラクター「ニャンコ先生」です。"), "{system}");
        assert!(system.ends_with("話してください。"), "{system}");
    }

    #[test]
    fn parameters_messages_and_round_trip() {
        let source = "FROM base\nPARAMETER temperature 0.2\nPARAMETER stop \"<|im_end|>\"\nPARAMETER stop END\nPARAMETER num_ctx 4096\nMESSAGE user Hi\nMESSAGE assistant \"Hello!\"\nTEMPLATE \"\"\"{{ .Prompt }}\"\"\"\nLICENSE MIT\n";
        let modelfile = Modelfile::parse(source).unwrap();
        assert_eq!(modelfile.parameters.temperature, Some(0.2));
        assert_eq!(modelfile.parameters.stop, vec!["<|im_end|>".to_string(), "END".to_string()]);
        assert_eq!(modelfile.parameters.num_ctx, Some(4096));
        assert_eq!(modelfile.messages.len(), 2);
        assert_eq!(modelfile.messages[1].content, "Hello!");
        assert_eq!(Modelfile::parse(&modelfile.render()).unwrap(), modelfile);
    }

    #[test]
    fn errors_name_the_line() {
        let error = Modelfile::parse("FROM x\n\nADAPTER ./lora.bin\n").unwrap_err();
        assert!(matches!(error, StoreError::Modelfile { line: 3, .. }), "{error:?}");
        let error = Modelfile::parse("FROM x\nPARAMETER temperature hot\n").unwrap_err();
        assert!(matches!(error, StoreError::Modelfile { line: 2, .. }), "{error:?}");
        let error = Modelfile::parse("FROM x\nFROBNICATE y\n").unwrap_err();
        assert!(matches!(error, StoreError::Modelfile { line: 2, .. }), "{error:?}");
        assert!(Modelfile::parse("SYSTEM hi\n").is_err());
        assert!(Modelfile::parse("FROM x\nSYSTEM \"\"\"never closed\n").is_err());
    }
}
