//! Checks a model folder before it is registered: config.json describes a supported family,
//! every safetensors file has a readable header whose tensors fit inside the file, and the
//! tensors the family needs are there with shapes that agree with config.json. Headers only:
//! no weights are read, so a broken or truncated download is refused in milliseconds.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use serde_json::Value;

use super::decoder::DecoderConfig;

/// A tensor as a safetensors header describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub dtype: String,
    pub shape: Vec<u64>,
}

fn element_bytes(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => 1,
        _ => return None,
    })
}

/// Reads the header of one safetensors file and checks that every tensor's bytes lie inside
/// the file and match its dtype and shape.
pub fn safetensors_header(path: &Path) -> Result<HashMap<String, TensorInfo>, String> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut file = std::fs::File::open(path).map_err(|e| format!("{name}: {e}"))?;
    let size = file.metadata().map_err(|e| format!("{name}: {e}"))?.len();
    let mut length = [0u8; 8];
    file.read_exact(&mut length).map_err(|_| format!("{name}: too short to be safetensors"))?;
    let header_length = u64::from_le_bytes(length);
    if header_length == 0 || header_length > (100 << 20) || 8 + header_length > size {
        return Err(format!("{name}: not a safetensors file (header length {header_length} of a {size}-byte file)"));
    }
    let mut header = vec![0u8; header_length as usize];
    file.read_exact(&mut header).map_err(|_| format!("{name}: the header is cut short"))?;
    let header: serde_json::Map<String, Value> =
        serde_json::from_slice(&header).map_err(|e| format!("{name}: the header is not valid JSON ({e})"))?;
    let data_size = size - 8 - header_length;
    let mut tensors = HashMap::with_capacity(header.len());
    for (tensor, entry) in header {
        if tensor == "__metadata__" {
            continue;
        }
        let dtype = entry["dtype"].as_str().ok_or_else(|| format!("{name}: tensor {tensor} has no dtype"))?.to_string();
        let shape: Vec<u64> = entry["shape"]
            .as_array()
            .and_then(|dims| dims.iter().map(Value::as_u64).collect())
            .ok_or_else(|| format!("{name}: tensor {tensor} has no shape"))?;
        let offsets: Vec<u64> = entry["data_offsets"]
            .as_array()
            .and_then(|o| o.iter().map(Value::as_u64).collect())
            .filter(|o: &Vec<u64>| o.len() == 2)
            .ok_or_else(|| format!("{name}: tensor {tensor} has no data offsets"))?;
        let bytes = element_bytes(&dtype).ok_or_else(|| format!("{name}: tensor {tensor} has an unknown dtype {dtype}"))?;
        let expected = shape.iter().try_fold(bytes, |acc, d| acc.checked_mul(*d)).ok_or_else(|| format!("{name}: tensor {tensor} is too large"))?;
        if offsets[1] < offsets[0] || offsets[1] - offsets[0] != expected {
            return Err(format!("{name}: tensor {tensor} ({dtype} {shape:?}) does not match its {} data bytes", offsets[1].saturating_sub(offsets[0])));
        }
        if offsets[1] > data_size {
            return Err(format!("{name}: tensor {tensor} lies past the end of the file (the file is truncated)"));
        }
        tensors.insert(tensor, TensorInfo { dtype, shape });
    }
    Ok(tensors)
}

/// Checks the model folder at `folder`; the error names the first problem found.
pub fn check_folder(folder: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(folder.join("config.json")).map_err(|e| format!("config.json: {e}"))?;
    let config: Value = serde_json::from_str(&text).map_err(|e| format!("config.json is not valid JSON ({e})"))?;
    let mut tensors = HashMap::new();
    let mut files: Vec<_> = std::fs::read_dir(folder)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err("no .safetensors weights".into());
    }
    for file in &files {
        tensors.extend(safetensors_header(file)?);
    }
    let bert = config["model_type"] == "bert" || config["architectures"].as_array().is_some_and(|a| a.iter().any(|v| v.as_str().is_some_and(|s| s.starts_with("Bert"))));
    if bert {
        let hidden = config["hidden_size"].as_u64().ok_or("config.json has no hidden_size")?;
        let embeddings = ["embeddings.word_embeddings.weight", "bert.embeddings.word_embeddings.weight"]
            .iter()
            .find_map(|n| tensors.get(*n))
            .ok_or("no embeddings.word_embeddings.weight tensor")?;
        if embeddings.shape.last() != Some(&hidden) {
            return Err(format!("embeddings.word_embeddings.weight is {:?}, config.json says hidden_size {hidden}", embeddings.shape));
        }
        if super::loader::is_cross_encoder(&config) {
            // The sequence-classification head: pooler [hidden, hidden], classifier [labels, hidden].
            let pooler = ["bert.pooler.dense.weight", "pooler.dense.weight"]
                .iter()
                .find_map(|n| tensors.get(*n))
                .ok_or("no bert.pooler.dense.weight tensor (config.json says BertForSequenceClassification)")?;
            if pooler.shape != [hidden, hidden] {
                return Err(format!("bert.pooler.dense.weight is {:?}, config.json says hidden_size {hidden}", pooler.shape));
            }
            let classifier = tensors.get("classifier.weight").ok_or("no classifier.weight tensor (config.json says BertForSequenceClassification)")?;
            if classifier.shape.len() != 2 || classifier.shape[0] == 0 || classifier.shape[1] != hidden {
                return Err(format!("classifier.weight is {:?}, expected [labels, {hidden}]", classifier.shape));
            }
        }
        return Ok(());
    }
    let decoder = DecoderConfig::from_hf(&config).map_err(|e| e.to_string())?;
    if let Some(mode) = super::loader::non_affine_mode(&config) {
        return Err(format!("the model is {}", super::loader::unsupported_mode(&mode)));
    }
    let find = |name: &str| tensors.get(name).or_else(|| tensors.get(&format!("language_model.{name}")));
    let embed = find("model.embed_tokens.weight").ok_or("no model.embed_tokens.weight tensor")?;
    let quantized = find("model.embed_tokens.scales").is_some();
    let rows = embed.shape.first().copied().unwrap_or(0);
    if rows < decoder.vocab_size as u64 {
        return Err(format!("model.embed_tokens.weight has {rows} rows, config.json says vocab_size {}", decoder.vocab_size));
    }
    if !quantized && embed.shape.get(1) != Some(&(decoder.hidden_size as u64)) {
        return Err(format!("model.embed_tokens.weight is {:?}, config.json says hidden_size {}", embed.shape, decoder.hidden_size));
    }
    if find("model.norm.weight").is_none() {
        return Err("no model.norm.weight tensor".into());
    }
    for layer in 0..decoder.num_layers {
        let o_proj = format!("model.layers.{layer}.self_attn.o_proj.weight");
        let weight = find(&o_proj).ok_or_else(|| format!("no {o_proj} tensor (config.json says {} layers)", decoder.num_layers))?;
        if weight.shape.first() != Some(&(decoder.hidden_size as u64)) {
            return Err(format!("{o_proj} is {:?}, config.json says hidden_size {}", weight.shape, decoder.hidden_size));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, header: &str, data: usize) {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header.as_bytes());
        bytes.extend(std::iter::repeat_n(0u8, data));
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn random_bytes_and_truncated_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        std::fs::write(&path, b"\x13\x37 not a model at all, just bytes that go on and on").unwrap();
        assert!(safetensors_header(&path).unwrap_err().contains("not a safetensors file"));
        write(&path, r#"{"a": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}"#, 32);
        assert!(safetensors_header(&path).unwrap_err().contains("truncated"));
        write(&path, r#"{"a": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 60]}}"#, 64);
        assert!(safetensors_header(&path).unwrap_err().contains("does not match"));
        write(&path, r#"{"a": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}"#, 64);
        assert_eq!(safetensors_header(&path).unwrap()["a"].shape, vec![4, 4]);
    }

    #[test]
    fn a_config_without_matching_tensors_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"model_type": "llama", "hidden_size": 4, "num_attention_heads": 2, "num_hidden_layers": 1, "vocab_size": 4}"#,
        )
        .unwrap();
        write(&dir.path().join("model.safetensors"), r#"{"model.embed_tokens.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}"#, 64);
        assert_eq!(check_folder(dir.path()).unwrap_err(), "no model.norm.weight tensor");
    }
}
