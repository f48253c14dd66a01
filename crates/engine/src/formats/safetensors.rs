//! safetensors reader and writer: an 8-byte little-endian header length, a
//! JSON header `{name: {dtype, shape, data_offsets}, "__metadata__": {..}}`,
//! then the tensor bytes (offsets relative to the end of the header).
//!
//! Every field is checked against the file before use (checked arithmetic,
//! offsets inside the data section, byte length equal to shape times dtype
//! size), so a malformed file is a `ModelLoad` error naming the file, the
//! tensor and the field, never a panic.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::{bf16, f16};
use serde_json::Value;

use crate::error::EngineError;
use crate::formats::filebuf::FileBuf;

/// Largest header accepted (real headers are a few hundred KiB).
const MAX_HEADER: u64 = 100 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U64,
    U32,
    U16,
    U8,
    Bool,
}

impl Dtype {
    const ALL: [(Dtype, &'static str, usize); 13] = [
        (Dtype::F64, "F64", 8),
        (Dtype::F32, "F32", 4),
        (Dtype::F16, "F16", 2),
        (Dtype::BF16, "BF16", 2),
        (Dtype::I64, "I64", 8),
        (Dtype::I32, "I32", 4),
        (Dtype::I16, "I16", 2),
        (Dtype::I8, "I8", 1),
        (Dtype::U64, "U64", 8),
        (Dtype::U32, "U32", 4),
        (Dtype::U16, "U16", 2),
        (Dtype::U8, "U8", 1),
        (Dtype::Bool, "BOOL", 1),
    ];
    pub fn parse(s: &str) -> Option<Dtype> {
        Self::ALL.iter().find(|(_, n, _)| *n == s).map(|(d, _, _)| *d)
    }
    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(d, _, _)| *d == self).map_or("?", |(_, n, _)| n)
    }
    pub fn size(self) -> usize {
        Self::ALL.iter().find(|(d, _, _)| *d == self).map_or(1, |(_, _, s)| *s)
    }
}

#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte offset in the file.
    pub offset: usize,
    pub len: usize,
}

pub struct SafeTensors {
    path: PathBuf,
    buf: Arc<FileBuf>,
    tensors: BTreeMap<String, TensorEntry>,
    metadata: BTreeMap<String, String>,
}

impl std::fmt::Debug for SafeTensors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafeTensors").field("path", &self.path).field("tensors", &self.tensors.len()).finish()
    }
}

impl SafeTensors {
    pub fn open(path: &Path) -> Result<SafeTensors, EngineError> {
        let err = |reason: String| EngineError::ModelLoad { path: path.display().to_string(), reason };
        // The header's length comes first: one longer than the file is
        // refused before the file is read.
        let check = |head: &[u8], len: u64| match header_len(head, len)? {
            n if n >= 2 && head.get(8) == Some(&b'{') => Ok(()),
            _ => Err("not a safetensors file (its header is not a JSON object)".to_string()),
        };
        let buf = FileBuf::open(path, 9, check).map_err(err)?;
        Self::parse(path.to_owned(), Arc::new(buf))
    }

    /// Parses a file already in memory (`path` names it in errors).
    pub fn parse(path: PathBuf, buf: Arc<FileBuf>) -> Result<SafeTensors, EngineError> {
        let (tensors, metadata) = parse_header(&buf).map_err(|reason| EngineError::ModelLoad { path: path.display().to_string(), reason })?;
        Ok(SafeTensors { path, buf, tensors, metadata })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }
    pub fn get(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.get(name)
    }
    pub fn bytes(&self, t: &TensorEntry) -> &[u8] {
        &self.buf[t.offset..t.offset + t.len]
    }
    pub fn buffer(&self) -> &Arc<FileBuf> {
        &self.buf
    }
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// A float tensor's values as f32.
    pub fn to_f32(&self, t: &TensorEntry) -> Result<Vec<f32>, EngineError> {
        let b = self.bytes(t);
        Ok(match t.dtype {
            Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::F16 => b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::BF16 => b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            other => {
                return Err(EngineError::ModelLoad {
                    path: self.path.display().to_string(),
                    reason: format!("a {} tensor where floats were expected", other.name()),
                })
            }
        })
    }
}

/// The header's length, from the file's first 8 bytes and its length.
fn header_len(head: &[u8], file_len: u64) -> Result<usize, String> {
    let n = u64::from_le_bytes(head.get(..8).ok_or("shorter than the 8-byte header length")?.try_into().unwrap());
    if n > MAX_HEADER || n > file_len - 8 {
        return Err(format!("header length {n} exceeds the file ({file_len} bytes) or the 100 MiB limit"));
    }
    Ok(n as usize)
}

type Header = (BTreeMap<String, TensorEntry>, BTreeMap<String, String>);

/// Checks and indexes the header of a whole file.
pub fn parse_header(file: &[u8]) -> Result<Header, String> {
    let data_start = 8 + header_len(file, file.len() as u64)?;
    let data_len = file.len() - data_start;
    let header: Value = serde_json::from_slice(&file[8..data_start]).map_err(|e| format!("header is not valid JSON: {e}"))?;
    let obj = header.as_object().ok_or("header is not a JSON object")?;
    let mut tensors = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    for (name, v) in obj {
        if name == "__metadata__" {
            for (k, v) in v.as_object().ok_or("__metadata__ is not an object")? {
                let s = v.as_str().ok_or_else(|| format!("__metadata__.{k} is not a string"))?;
                metadata.insert(k.clone(), s.to_owned());
            }
            continue;
        }
        let field = |f: &str| format!("tensor '{name}': {f}");
        let dtype_s = v["dtype"].as_str().ok_or_else(|| field("dtype is missing"))?;
        let dtype = Dtype::parse(dtype_s).ok_or_else(|| field(&format!("dtype '{dtype_s}' is unknown")))?;
        let shape = v["shape"]
            .as_array()
            .ok_or_else(|| field("shape is missing"))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| field("shape holds a non-integer"))?;
        let offs = v["data_offsets"].as_array().filter(|a| a.len() == 2).ok_or_else(|| field("data_offsets is not [begin, end]"))?;
        let (begin, end) = match (offs[0].as_u64(), offs[1].as_u64()) {
            (Some(b), Some(e)) if b <= e && e <= data_len as u64 => (b as usize, e as usize),
            _ => return Err(field(&format!("data_offsets {offs:?} fall outside the {data_len} data bytes"))),
        };
        let want = shape.iter().try_fold(dtype.size(), |a, &d| a.checked_mul(d)).ok_or_else(|| field("shape overflows"))?;
        if want != end - begin {
            return Err(field(&format!("shape {shape:?} of {} needs {want} bytes, data_offsets give {}", dtype.name(), end - begin)));
        }
        tensors.insert(name.clone(), TensorEntry { dtype, shape, offset: data_start + begin, len: end - begin });
    }
    Ok((tensors, metadata))
}

/// One tensor to write.
pub type TensorOut<'a> = (&'a str, Dtype, &'a [usize], &'a [u8]);

/// The bytes of a safetensors file holding `tensors` in the given order; the
/// header is padded with spaces so the data starts 8-byte aligned.
pub fn serialize(tensors: &[TensorOut], metadata: &BTreeMap<String, String>) -> Result<Vec<u8>, String> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(metadata).unwrap());
    }
    let mut at = 0usize;
    for (name, dtype, shape, data) in tensors {
        let want = shape.iter().product::<usize>() * dtype.size();
        if want != data.len() {
            return Err(format!("tensor '{name}': shape {shape:?} needs {want} bytes, got {}", data.len()));
        }
        header.insert((*name).to_owned(), serde_json::json!({"dtype": dtype.name(), "shape": shape, "data_offsets": [at, at + data.len()]}));
        at += data.len();
    }
    let mut json = serde_json::to_string(&header).unwrap().into_bytes();
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + at);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    for (_, _, _, data) in tensors {
        out.extend_from_slice(data);
    }
    Ok(out)
}

pub fn write(path: &Path, tensors: &[TensorOut], metadata: &BTreeMap<String, String>) -> std::io::Result<()> {
    let bytes = serialize(tensors, metadata).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    std::fs::write(path, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let a: Vec<u8> = [1.0f32, -2.5, 3.25].iter().flat_map(|v| v.to_le_bytes()).collect();
        let b: Vec<u8> = [0.5f32, 1.5].iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect();
        let mut md = BTreeMap::new();
        md.insert("format".into(), "mlx".into());
        serialize(&[("a", Dtype::F32, &[3], &a), ("b.weight", Dtype::F16, &[1, 2], &b)], &md).unwrap()
    }

    #[test]
    fn round_trip() {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), sample()).unwrap();
        let st = SafeTensors::open(f.path()).unwrap();
        assert_eq!(st.names().collect::<Vec<_>>(), ["a", "b.weight"]);
        assert_eq!(st.to_f32(st.get("a").unwrap()).unwrap(), [1.0, -2.5, 3.25]);
        let b = st.get("b.weight").unwrap();
        assert_eq!((b.dtype, b.shape.clone()), (Dtype::F16, vec![1, 2]));
        assert_eq!(st.to_f32(b).unwrap(), [0.5, 1.5]);
        assert_eq!(st.metadata()["format"], "mlx");
        assert_eq!((8 + u64::from_le_bytes(sample()[..8].try_into().unwrap())) % 8, 0);
    }

    /// Replaces the header of `sample()` with `json`.
    fn with_header(json: &str) -> Vec<u8> {
        let s = sample();
        let n = u64::from_le_bytes(s[..8].try_into().unwrap()) as usize;
        let mut out = (json.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(json.as_bytes());
        out.extend_from_slice(&s[8 + n..]);
        out
    }

    #[test]
    fn malformed_headers_are_errors_naming_the_field() {
        let cases = [
            (r#"[1]"#, "not a JSON object"),
            (r#"{"a": {"dtype": "F8", "shape": [3], "data_offsets": [0, 12]}}"#, "dtype 'F8' is unknown"),
            (r#"{"a": {"shape": [3], "data_offsets": [0, 12]}}"#, "tensor 'a': dtype is missing"),
            (r#"{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}"#, "needs 16 bytes"),
            (r#"{"a": {"dtype": "F32", "shape": [3], "data_offsets": [12, 0]}}"#, "fall outside"),
            (r#"{"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 99999]}}"#, "fall outside"),
            (r#"{"a": {"dtype": "F32", "shape": [-3], "data_offsets": [0, 12]}}"#, "non-integer"),
            (r#"{"a": {"dtype": "F32", "shape": [4294967296, 4294967296, 4294967296], "data_offsets": [0, 12]}}"#, "overflows"),
            (r#"{"__metadata__": {"k": 1}}"#, "__metadata__.k is not a string"),
            ("{not json", "not valid JSON"),
        ];
        for (json, want) in cases {
            let err = parse_header(&with_header(json)).unwrap_err();
            assert!(err.contains(want), "{json}: {err}");
        }
        assert!(parse_header(&[1, 2, 3]).unwrap_err().contains("shorter"));
        let mut huge = u64::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        assert!(parse_header(&huge).unwrap_err().contains("exceeds"));
    }
}
