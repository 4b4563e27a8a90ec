//! The GGUF header read in plain Rust: metadata and the tensor table, without MLX arrays.
//!
//! Reading metadata through MLX made every number an array on the default device, and the
//! float64 conversion that followed is refused on a GPU (Metal and CUDA alike), so a GGUF
//! could not be loaded there. This reader also bounds every length by the file's size, so a
//! truncated or hostile file is a clear error instead of a huge allocation.

use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::path::Path;

const MAGIC: &[u8; 4] = b"GGUF";

#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    Int(i64),
    UInt(u64),
    Float(f64),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
}

impl GgufValue {
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            GgufValue::Int(v) => Some(*v as f64),
            GgufValue::UInt(v) => Some(*v as f64),
            GgufValue::Float(v) => Some(*v),
            GgufValue::Bool(v) => Some(f64::from(u8::from(*v))),
            GgufValue::Array(values) if values.len() == 1 => values[0].as_f64(),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(text) => Some(text),
            _ => None,
        }
    }
}

/// One entry of the tensor table.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// GGUF order: the fastest-varying dimension first.
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    pub offset: u64,
}

#[derive(Debug, Clone, Default)]
pub struct GgufHeader {
    pub version: u32,
    pub metadata: HashMap<String, GgufValue>,
    pub tensors: Vec<GgufTensorInfo>,
}

impl GgufHeader {
    pub fn number(&self, key: &str) -> Option<f64> {
        self.metadata.get(key).and_then(GgufValue::as_f64)
    }

    pub fn string(&self, key: &str) -> Option<String> {
        self.metadata.get(key).and_then(GgufValue::as_str).map(str::to_string)
    }

    pub fn strings(&self, key: &str) -> Option<Vec<String>> {
        match self.metadata.get(key)? {
            GgufValue::Array(values) => values.iter().map(|v| v.as_str().map(str::to_string)).collect(),
            _ => None,
        }
    }

    pub fn numbers(&self, key: &str) -> Option<Vec<f64>> {
        match self.metadata.get(key)? {
            GgufValue::Array(values) => values.iter().map(GgufValue::as_f64).collect(),
            other => other.as_f64().map(|v| vec![v]),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct GgufError(pub String);

struct Reader<R> {
    inner: R,
    /// Bytes left in the file: no length read from it may exceed this.
    remaining: u64,
}

impl<R: Read> Reader<R> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        let mut buffer = [0u8; N];
        self.inner.read_exact(&mut buffer).map_err(|_| GgufError("the file ends inside its header".into()))?;
        self.remaining = self.remaining.saturating_sub(N as u64);
        Ok(buffer)
    }

    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }

    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }

    /// A count of items of at least `item_bytes` each, checked against the bytes left.
    fn count(&mut self, item_bytes: u64, what: &str) -> Result<usize, GgufError> {
        let count = self.u64()?;
        if count.saturating_mul(item_bytes.max(1)) > self.remaining {
            return Err(GgufError(format!("{what} count {count} does not fit in the file")));
        }
        usize::try_from(count).map_err(|_| GgufError(format!("{what} count {count} is too large")))
    }

    fn string(&mut self) -> Result<String, GgufError> {
        let length = self.count(1, "string length")?;
        let mut buffer = vec![0u8; length];
        self.inner.read_exact(&mut buffer).map_err(|_| GgufError("the file ends inside a string".into()))?;
        self.remaining = self.remaining.saturating_sub(length as u64);
        // Token tables of real models hold invalid UTF-8 pieces now and then; keep them lossy.
        Ok(String::from_utf8(buffer).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
    }

    fn value(&mut self, kind: u32, depth: usize) -> Result<GgufValue, GgufError> {
        Ok(match kind {
            0 => GgufValue::UInt(u64::from(self.bytes::<1>()?[0])),
            1 => GgufValue::Int(i64::from(i8::from_le_bytes(self.bytes()?))),
            2 => GgufValue::UInt(u64::from(u16::from_le_bytes(self.bytes()?))),
            3 => GgufValue::Int(i64::from(i16::from_le_bytes(self.bytes()?))),
            4 => GgufValue::UInt(u64::from(self.u32()?)),
            5 => GgufValue::Int(i64::from(i32::from_le_bytes(self.bytes()?))),
            6 => GgufValue::Float(f64::from(f32::from_le_bytes(self.bytes()?))),
            7 => GgufValue::Bool(self.bytes::<1>()?[0] != 0),
            8 => GgufValue::String(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(GgufError("metadata arrays nest too deeply".into()));
                }
                let item_kind = self.u32()?;
                let count = self.count(1, "array")?;
                let mut values = Vec::with_capacity(count.min(1 << 20));
                for _ in 0..count {
                    values.push(self.value(item_kind, depth + 1)?);
                }
                GgufValue::Array(values)
            }
            10 => GgufValue::UInt(self.u64()?),
            11 => GgufValue::Int(i64::from_le_bytes(self.bytes()?)),
            12 => GgufValue::Float(f64::from_le_bytes(self.bytes()?)),
            other => return Err(GgufError(format!("unknown metadata value type {other}"))),
        })
    }
}

/// Reads the header of the GGUF file at `path`.
pub fn read_header(path: &Path) -> Result<GgufHeader, GgufError> {
    let file = std::fs::File::open(path).map_err(|e| GgufError(format!("cannot open: {e}")))?;
    let size = file.metadata().map_err(|e| GgufError(e.to_string()))?.len();
    let mut reader = Reader { inner: BufReader::with_capacity(1 << 20, file), remaining: size };
    parse(&mut reader, size)
}

/// Parses a header held in memory (for tests and fuzzing).
pub fn parse_bytes(bytes: &[u8]) -> Result<GgufHeader, GgufError> {
    parse_prefix(bytes, bytes.len() as u64)
}

/// Reads the header from the first bytes of a file of `file_size` bytes (say, the part of a
/// remote file fetched so far).
pub fn parse_prefix(prefix: &[u8], file_size: u64) -> Result<GgufHeader, GgufError> {
    let mut reader = Reader { inner: std::io::Cursor::new(prefix), remaining: prefix.len() as u64 };
    parse(&mut reader, file_size)
}

fn parse<R: Read>(reader: &mut Reader<R>, size: u64) -> Result<GgufHeader, GgufError> {
    if &reader.bytes::<4>()? != MAGIC {
        return Err(GgufError("not a GGUF file (bad magic)".into()));
    }
    let version = reader.u32()?;
    if !(2..=3).contains(&version) {
        return Err(GgufError(format!("GGUF version {version} is not supported (2 and 3 are)")));
    }
    // A tensor entry takes at least 24 bytes, a metadata entry at least 12.
    let tensor_count = reader.count(24, "tensor")?;
    let kv_count = reader.count(12, "metadata")?;
    let mut metadata = HashMap::with_capacity(kv_count);
    for _ in 0..kv_count {
        let key = reader.string()?;
        let kind = reader.u32()?;
        let value = reader.value(kind, 0)?;
        metadata.insert(key, value);
    }
    let mut tensors = Vec::with_capacity(tensor_count);
    for _ in 0..tensor_count {
        let name = reader.string()?;
        let n_dims = reader.u32()?;
        if n_dims == 0 || n_dims > 4 {
            return Err(GgufError(format!("tensor {name} has {n_dims} dimensions")));
        }
        let dims = (0..n_dims).map(|_| reader.u64()).collect::<Result<Vec<_>, _>>()?;
        let ggml_type = reader.u32()?;
        let offset = reader.u64()?;
        if offset > size {
            return Err(GgufError(format!("tensor {name} starts past the end of the file")));
        }
        tensors.push(GgufTensorInfo { name, dims, ggml_type, offset });
    }
    Ok(GgufHeader { version, metadata, tensors })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(out: &mut Vec<u8>, text: &str) {
        out.extend((text.len() as u64).to_le_bytes());
        out.extend(text.as_bytes());
    }

    fn sample() -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(MAGIC);
        out.extend(3u32.to_le_bytes());
        out.extend(1u64.to_le_bytes()); // tensors
        out.extend(3u64.to_le_bytes()); // metadata
        string(&mut out, "general.architecture");
        out.extend(8u32.to_le_bytes());
        string(&mut out, "llama");
        string(&mut out, "llama.embedding_length");
        out.extend(4u32.to_le_bytes());
        out.extend(576u32.to_le_bytes());
        string(&mut out, "tokenizer.ggml.tokens");
        out.extend(9u32.to_le_bytes());
        out.extend(8u32.to_le_bytes());
        out.extend(2u64.to_le_bytes());
        string(&mut out, "a");
        string(&mut out, "b");
        string(&mut out, "token_embd.weight");
        out.extend(2u32.to_le_bytes());
        out.extend(576u64.to_le_bytes());
        out.extend(2u64.to_le_bytes());
        out.extend(0u32.to_le_bytes());
        out.extend(0u64.to_le_bytes());
        out
    }

    #[test]
    fn reads_metadata_and_tensor_table() {
        let header = parse_bytes(&sample()).unwrap();
        assert_eq!(header.string("general.architecture").as_deref(), Some("llama"));
        assert_eq!(header.number("llama.embedding_length"), Some(576.0));
        assert_eq!(header.strings("tokenizer.ggml.tokens").unwrap(), vec!["a", "b"]);
        assert_eq!(header.tensors[0].dims, vec![576, 2]);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let bytes = sample();
        for end in 0..bytes.len() {
            assert!(parse_bytes(&bytes[..end]).is_err(), "prefix of {end} bytes parsed");
        }
    }

    #[test]
    fn huge_counts_are_refused_before_allocating() {
        let mut bytes = sample();
        // The metadata count claims 2^60 entries.
        bytes[16..24].copy_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(parse_bytes(&bytes).unwrap_err().0.contains("does not fit"));
    }
}
