//! Writing models in the one local layout: a folder with `config.json`, `model.safetensors`
//! in Hugging Face llama naming (quantized tensors as MLX's `weight`/`scales`/`biases`
//! triples, with a `quantization` block in config.json, as mlx-lm writes them),
//! `tokenizer.json`, `tokenizer_config.json` (with the chat template) and
//! `generation_config.json`.
//!
//! GGUF files are converted into it, and any folder can be quantized to 2, 4 or 8 bits.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use mlx_rs::{ops, Array, Dtype};
use serde_json::{json, Value};

use super::loader::{read_gguf, GgufContents};
use super::EngineError;

pub type Result<T> = std::result::Result<T, EngineError>;

fn io(path: &Path, error: impl std::fmt::Display) -> EngineError {
    EngineError::Io { path: path.to_path_buf(), reason: error.to_string() }
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| io(path, e))?;
    std::fs::write(path, text).map_err(|e| io(path, e))
}

/// How a conversion stores weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WeightFormat {
    /// Keep GGUF's quantization, losslessly re-expressed as MLX affine quantization.
    KeepQuantized,
    /// Dequantize everything to this dtype.
    Dense(Dtype),
}

/// What a conversion or quantization wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteReport {
    pub tensors: usize,
    pub weight_bytes: u64,
    /// e.g. "Q4_1", "4bit", or None for full precision.
    pub quantization: Option<String>,
}

fn dtype_name(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::Float16 => "float16",
        Dtype::Bfloat16 => "bfloat16",
        _ => "float32",
    }
}

/// Converts a GGUF file into a model folder at `out` (which must exist and be empty).
pub fn gguf_to_folder(gguf: &Path, out: &Path, format: WeightFormat) -> Result<WriteReport> {
    let GgufContents { arch, config, tensors, tokenizer, chat_template, bos_token, eos_token_ids, eos_text, add_bos, file_type } = read_gguf(gguf)?;
    // Sorted: MLX writes tensors in the order its map receives them, and a hash map's order
    // changes from run to run, so the same model would get other bytes and another digest.
    let mut arrays: BTreeMap<String, Array> = BTreeMap::new();
    let mut quantized = false;
    let prefixes: Vec<String> = tensors.keys().filter_map(|n| n.strip_suffix(".scales").map(str::to_string)).collect();
    let mut tensors = tensors;
    for prefix in &prefixes {
        let (Some(weight), Some(scales), Some(biases)) = (
            tensors.remove(&format!("{prefix}.weight")),
            tensors.remove(&format!("{prefix}.scales")),
            tensors.remove(&format!("{prefix}.biases")),
        ) else {
            return Err(EngineError::InvalidModel(format!("{}: incomplete quantized tensor {prefix}", gguf.display())));
        };
        match format {
            WeightFormat::KeepQuantized => {
                quantized = true;
                arrays.insert(format!("{prefix}.weight"), weight);
                arrays.insert(format!("{prefix}.scales"), scales);
                arrays.insert(format!("{prefix}.biases"), biases);
            }
            WeightFormat::Dense(dtype) => {
                let bits = weight.dim(-1) / scales.dim(-1);
                let dense = ops::dequantize(&weight, &scales, &biases, 32, bits)?.as_dtype(dtype)?;
                arrays.insert(format!("{prefix}.weight"), dense);
            }
        }
    }
    for (name, array) in tensors {
        let array = match format {
            WeightFormat::Dense(dtype) => array.as_dtype(dtype)?,
            WeightFormat::KeepQuantized => array,
        };
        arrays.insert(name, array);
    }
    mlx_rs::transforms::eval(arrays.values())?;
    let weight_bytes = arrays.values().map(|a| a.nbytes() as u64).sum();
    let count = arrays.len();
    Array::save_safetensors(arrays.iter().map(|(k, v)| (k.as_str(), v)), None, out.join("model.safetensors"))
        .map_err(|e| io(&out.join("model.safetensors"), e))?;

    let mut config_json = config;
    config_json["architectures"] = json!([architecture_name(&arch)]);
    config_json["bos_token_id"] = json!(bos_token.as_ref().map(|b| b.0));
    config_json["eos_token_id"] = json!(eos_token_ids.first());
    config_json["torch_dtype"] = json!(match format { WeightFormat::Dense(dtype) => dtype_name(dtype), WeightFormat::KeepQuantized => "float16" });
    if quantized {
        // Bits differ per tensor (e.g. Q8_0 embeddings, Q4_1 layers); loaders read them
        // from the packed shapes, the group size is GGUF's 32.
        config_json["quantization"] = json!({"group_size": 32, "bits": 4, "mode": "affine"});
    }
    write_json(&out.join("config.json"), &config_json)?;
    tokenizer.save(out.join("tokenizer.json"), false).map_err(|e| io(&out.join("tokenizer.json"), e))?;
    write_json(
        &out.join("tokenizer_config.json"),
        &json!({
            "chat_template": chat_template,
            "bos_token": bos_token.as_ref().map(|b| b.1.clone()),
            "eos_token": eos_text,
            "add_bos_token": add_bos,
            "model_max_length": config_json["max_position_embeddings"],
            "clean_up_tokenization_spaces": false,
        }),
    )?;
    write_json(&out.join("generation_config.json"), &json!({"bos_token_id": bos_token.as_ref().map(|b| b.0), "eos_token_id": eos_token_ids}))?;
    Ok(WriteReport {
        tensors: count,
        weight_bytes,
        quantization: match format {
            WeightFormat::KeepQuantized => file_type,
            WeightFormat::Dense(_) => None,
        },
    })
}

/// The transformers class name of a GGUF architecture, for config.json.
fn architecture_name(arch: &str) -> &'static str {
    match arch {
        "qwen2" => "Qwen2ForCausalLM",
        "qwen3" => "Qwen3ForCausalLM",
        "qwen3moe" => "Qwen3MoeForCausalLM",
        "gemma2" => "Gemma2ForCausalLM",
        "gemma3" => "Gemma3ForCausalLM",
        "phi3" => "Phi3ForCausalLM",
        "olmo2" => "Olmo2ForCausalLM",
        "granite" => "GraniteForCausalLM",
        "smollm3" => "SmolLM3ForCausalLM",
        "mistral" => "MistralForCausalLM",
        _ => "LlamaForCausalLM",
    }
}

/// Modules a family keeps at 8 bits, group 64, whatever the requested bits: mlx-lm's models
/// declare these (`quant_predicate`: granite's o_proj, down_proj and lm_head, whose small
/// values low-bit scales lose; qwen3_moe's router), so its converted folders, the
/// MLX-community ones included, carry them, and `pull --quantize` writes the same.
fn family_override(model_type: &str, module: &str) -> Option<(i32, i32)> {
    let keep = match model_type {
        "granite" => module.ends_with("self_attn.o_proj") || module.ends_with("mlp.down_proj") || module == "lm_head",
        "qwen3_moe" => module.ends_with("mlp.gate"),
        _ => false,
    };
    keep.then_some((8, 64))
}

/// Linear, embedding and expert weights that quantization applies to (what mlx-lm's
/// `convert -q` quantizes: every layer whose input size divides into groups).
fn quantizable(name: &str, array: &Array, group_size: i32) -> bool {
    let linear = [
        ".q_proj.weight",
        ".k_proj.weight",
        ".v_proj.weight",
        ".qkv_proj.weight",
        ".o_proj.weight",
        ".gate_proj.weight",
        ".up_proj.weight",
        ".gate_up_proj.weight",
        ".down_proj.weight",
        ".mlp.gate.weight",
        ".block_sparse_moe.gate.weight",
        "embed_tokens.weight",
        "lm_head.weight",
    ];
    let experts = name.contains(".switch_mlp.") && array.ndim() == 3;
    (array.ndim() == 2 || experts) && array.dim(-1) % group_size == 0 && linear.iter().any(|suffix| name.ends_with(suffix))
}

/// Hugging Face checkpoints hold one tensor per expert; the local layout stacks them as
/// `switch_mlp.{gate,up,down}_proj` `[experts, out, in]`, as mlx-lm does, so they quantize
/// and run as one gather matmul.
fn stack_experts(arrays: &mut BTreeMap<String, Array>) -> Result<()> {
    let mut groups: HashMap<String, Vec<(usize, String)>> = HashMap::new();
    for name in arrays.keys() {
        let Some((block, rest)) = name.split_once(".experts.") else { continue };
        let Some((index, part)) = rest.split_once('.') else { continue };
        let Ok(index) = index.parse::<usize>() else { continue };
        let stacked_part = match part {
            "w1.weight" | "gate_proj.weight" => "gate_proj.weight",
            "w3.weight" | "up_proj.weight" => "up_proj.weight",
            "w2.weight" | "down_proj.weight" => "down_proj.weight",
            _ => continue,
        };
        groups.entry(format!("{block}.switch_mlp.{stacked_part}")).or_default().push((index, name.clone()));
    }
    for (stacked, mut parts) in groups {
        parts.sort();
        if parts.iter().enumerate().any(|(i, (index, _))| i != *index) {
            return Err(EngineError::InvalidModel(format!("{stacked}: expert tensors are not numbered 0..{}", parts.len())));
        }
        let arrays_in_order: Vec<Array> = parts.iter().filter_map(|(_, name)| arrays.remove(name)).collect();
        arrays.insert(stacked, ops::stack(&arrays_in_order, 0)?);
    }
    Ok(())
}

/// Quantizes the model folder `source` into `out` (existing, empty) with MLX affine
/// quantization of its linear and embedding layers. Already quantized tensors are
/// dequantized first. Tokenizer and other files are copied.
pub fn quantize_folder(source: &Path, out: &Path, bits: i32, group_size: i32) -> Result<WriteReport> {
    if !matches!(bits, 2 | 4 | 8) {
        return Err(EngineError::BadRequest(format!("bits must be 2, 4 or 8, not {bits}")));
    }
    if !matches!(group_size, 32 | 64 | 128) {
        return Err(EngineError::BadRequest(format!("group size must be 32, 64 or 128, not {group_size}")));
    }
    let config_path = source.join("config.json");
    let config_text = std::fs::read_to_string(&config_path).map_err(|e| io(&config_path, e))?;
    let mut config: Value = serde_json::from_str(&config_text).map_err(|e| EngineError::InvalidModel(format!("{}: {e}", config_path.display())))?;
    if config["model_type"] == "bert" {
        return Err(EngineError::BadRequest("embedding models are not quantized".into()));
    }
    let source_quantization = config["quantization"].clone();
    let source_group = source_quantization["group_size"].as_i64().map(|g| g as i32);
    let mut arrays: BTreeMap<String, Array> = BTreeMap::new();
    for entry in std::fs::read_dir(source).map_err(|e| io(source, e))? {
        let path = entry.map_err(|e| io(source, e))?.path();
        if path.extension().is_some_and(|x| x == "safetensors") {
            arrays.extend(Array::load_safetensors(&path).map_err(|e| EngineError::InvalidModel(format!("{}: {e}", path.display())))?);
        }
    }
    if arrays.is_empty() {
        return Err(EngineError::InvalidModel(format!("{}: no safetensors weights", source.display())));
    }
    // Dequantize what is already quantized.
    let prefixes: Vec<String> = arrays.keys().filter_map(|n| n.strip_suffix(".scales").map(str::to_string)).collect();
    for prefix in prefixes {
        let weight = arrays.remove(&format!("{prefix}.weight"));
        let scales = arrays.remove(&format!("{prefix}.scales"));
        let biases = arrays.remove(&format!("{prefix}.biases"));
        let (Some(weight), Some(scales), Some(biases)) = (weight, scales, biases) else {
            return Err(EngineError::InvalidModel(format!("incomplete quantized tensor {prefix}")));
        };
        // A module of a mixed folder has its own entry (mlx-lm's per-layer quantization).
        let group = source_quantization[prefix.as_str()]["group_size"].as_i64().map(|g| g as i32).or(source_group).unwrap_or(32);
        let in_features = scales.dim(-1) * group;
        let old_bits = weight.dim(-1) * 32 / in_features.max(1);
        arrays.insert(format!("{prefix}.weight"), ops::dequantize(&weight, &scales, &biases, group, old_bits)?.as_dtype(Dtype::Float32)?);
    }
    stack_experts(&mut arrays)?;
    let model_type = config["model_type"].as_str().unwrap_or_default().to_string();
    let mut quantization = json!({"group_size": group_size, "bits": bits, "mode": "affine"});
    let mut output: BTreeMap<String, Array> = BTreeMap::new();
    for (name, array) in arrays {
        let prefix = name.trim_end_matches(".weight").to_string();
        let kept_at = family_override(&model_type, &prefix);
        let (module_bits, module_group) = kept_at.unwrap_or((bits, group_size));
        if quantizable(&name, &array, module_group) {
            // Scales keep the weight's dtype, as mlx-lm's convert does.
            let (weight, scales, biases) = ops::quantize(&array, module_group, module_bits)?;
            output.insert(format!("{prefix}.weight"), weight);
            output.insert(format!("{prefix}.scales"), scales);
            output.insert(format!("{prefix}.biases"), biases);
            if kept_at.is_some() {
                quantization[prefix.as_str()] = json!({"group_size": module_group, "bits": module_bits});
            }
        } else {
            output.insert(name, array);
        }
    }
    mlx_rs::transforms::eval(output.values())?;
    let weight_bytes = output.values().map(|a| a.nbytes() as u64).sum();
    let count = output.len();
    Array::save_safetensors(output.iter().map(|(k, v)| (k.as_str(), v)), None, out.join("model.safetensors"))
        .map_err(|e| io(&out.join("model.safetensors"), e))?;
    config["quantization"] = quantization;
    write_json(&out.join("config.json"), &config)?;
    for entry in std::fs::read_dir(source).map_err(|e| io(source, e))? {
        let path = entry.map_err(|e| io(source, e))?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let skip = name == "config.json" || name == "manifest.json" || name.ends_with(".safetensors") || name == "model.safetensors.index.json";
        if path.is_file() && !skip {
            std::fs::copy(&path, out.join(&name)).map_err(|e| io(&path, e))?;
        }
    }
    Ok(WriteReport { tensors: count, weight_bytes, quantization: Some(format!("{bits}bit")) })
}
