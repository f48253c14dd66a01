//! GGUF reader: header, metadata and tensor index over the file read into memory.
//!
//! Format per the GGUF spec (version 2 and 3). Every length, count, offset and
//! shape read from the file is checked against the file size before use, so a
//! truncated or corrupted file gives a `ModelLoad` error instead of a panic or
//! an out-of-bounds read.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::formats::filebuf::FileBuf;

use crate::error::EngineError;
use crate::formats::quant::QType;

const GGUF_MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
const MAX_DIMS: u32 = 4;
const BAD_MAGIC: &str = "not a GGUF file (bad magic)";
/// Collections are sized by what parsed, not by counts the file states: a
/// count is checked only against the bytes left, and a metadata entry in
/// memory is larger than its bytes in the file.
const MAX_RESERVE: usize = 1024;

/// A metadata value. Arrays keep their element values (token lists are large
/// but only read once, at load).
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<MetaValue>),
    /// An array of numbers or booleans, kept as the file's little-endian
    /// bytes with the elements' type: as `MetaValue`s (32 bytes each) an
    /// 8 MB array of bytes would take 256 MB.
    Packed(u32, Vec<u8>),
}

/// Bytes per element of a GGUF number or boolean type; `None` for strings
/// and arrays.
fn packed_size(ty: u32) -> Option<usize> {
    match ty {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

impl MetaValue {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v as u64),
            MetaValue::U16(v) => Some(v as u64),
            MetaValue::U32(v) => Some(v as u64),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) if v >= 0 => Some(v as u64),
            MetaValue::I16(v) if v >= 0 => Some(v as u64),
            MetaValue::I32(v) if v >= 0 => Some(v as u64),
            MetaValue::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v as f64),
            MetaValue::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
    /// An array of numbers as f64 (exact for every integer a vocabulary
    /// holds); `None` if it is not an array or holds something else.
    pub fn numbers(&self) -> Option<Vec<f64>> {
        match self {
            MetaValue::Array(a) => a.iter().map(MetaValue::as_f64).collect(),
            MetaValue::Packed(ty, bytes) => {
                let mut r = Reader { buf: bytes, pos: 0 };
                let n = bytes.len() / packed_size(*ty)?;
                (0..n).map(|_| r.value(*ty, 0).ok().and_then(|v| v.as_f64())).collect()
            }
            _ => None,
        }
    }
}

/// One tensor's entry in the index. `dims[0]` is the contiguous (innermost)
/// dimension, as in ggml.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub qtype: QType,
    /// Absolute byte offset of the tensor data in the file.
    pub offset: usize,
    pub n_bytes: usize,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: HashMap<String, MetaValue>,
    pub tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    bytes: Arc<FileBuf>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("n_metadata", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .finish()
    }
}

/// Cursor over the header bytes; every read is bounds-checked.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| format!("unexpected end of file at byte {} (needed {n} more)", self.pos))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn string(&mut self) -> Result<String, String> {
        let len = self.u64()?;
        if len > self.remaining() as u64 {
            return Err(format!("string length {len} at byte {} exceeds the file", self.pos));
        }
        let bytes = self.take(len as usize)?;
        // Token texts in real files are valid UTF-8; be lenient rather than fail a load.
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    fn value(&mut self, ty: u32, depth: u32) -> Result<MetaValue, String> {
        Ok(match ty {
            0 => MetaValue::U8(self.u8()?),
            1 => MetaValue::I8(self.u8()? as i8),
            2 => MetaValue::U16(self.u16()?),
            3 => MetaValue::I16(self.u16()? as i16),
            4 => MetaValue::U32(self.u32()?),
            5 => MetaValue::I32(self.u32()? as i32),
            6 => MetaValue::F32(f32::from_bits(self.u32()?)),
            7 => MetaValue::Bool(self.u8()? != 0),
            8 => MetaValue::Str(self.string()?),
            9 => {
                if depth > 2 {
                    return Err("metadata arrays nested too deeply".into());
                }
                let elem_ty = self.u32()?;
                let len = self.u64()?;
                // Every element takes at least one byte: a cheap guard against
                // absurd counts in a corrupted file before allocating.
                if len > self.remaining() as u64 {
                    return Err(format!("array length {len} at byte {} exceeds the file", self.pos));
                }
                if let Some(size) = packed_size(elem_ty) {
                    let n = (len as usize).checked_mul(size).ok_or("array size overflows")?;
                    return Ok(MetaValue::Packed(elem_ty, self.take(n)?.to_vec()));
                }
                let mut items = Vec::with_capacity((len as usize).min(MAX_RESERVE));
                for _ in 0..len {
                    items.push(self.value(elem_ty, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64()?),
            11 => MetaValue::I64(self.u64()? as i64),
            12 => MetaValue::F64(f64::from_bits(self.u64()?)),
            other => return Err(format!("unknown metadata value type {other}")),
        })
    }
}

impl GgufFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self, EngineError> {
        let path = path.as_ref().to_path_buf();
        let fail = |reason: String| EngineError::ModelLoad { path: path.display().to_string(), reason };
        let check = |head: &[u8], _len: u64| if head == GGUF_MAGIC { Ok(()) } else { Err(BAD_MAGIC.to_string()) };
        let bytes = FileBuf::open(&path, GGUF_MAGIC.len(), check).map_err(fail)?;
        Self::parse(path.clone(), Arc::new(bytes)).map_err(fail)
    }

    /// Parses a file already in memory (`path` names it in errors).
    pub fn from_buffer(path: PathBuf, bytes: Arc<FileBuf>) -> Result<Self, EngineError> {
        let shown = path.display().to_string();
        Self::parse(path, bytes).map_err(|reason| EngineError::ModelLoad { path: shown, reason })
    }

    fn parse(path: PathBuf, bytes: Arc<FileBuf>) -> Result<Self, String> {
        let buf: &[u8] = &bytes;
        if buf.len() < 4 || &buf[..4] != GGUF_MAGIC {
            return Err(BAD_MAGIC.into());
        }
        let mut r = Reader { buf, pos: 4 };
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(format!("unsupported GGUF version {version}"));
        }
        let n_tensors = r.u64()?;
        let n_kv = r.u64()?;
        if n_tensors > r.remaining() as u64 || n_kv > r.remaining() as u64 {
            return Err(format!("header counts ({n_tensors} tensors, {n_kv} metadata) exceed the file"));
        }
        let mut metadata = HashMap::with_capacity((n_kv as usize).min(MAX_RESERVE));
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let v = r.value(ty, 0).map_err(|e| format!("metadata '{key}': {e}"))?;
            metadata.insert(key, v);
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => return Err(format!("invalid general.alignment {v:?}")),
            },
        };

        struct Raw {
            name: String,
            dims: Vec<u64>,
            ty: u32,
            rel_offset: u64,
        }
        let mut raws = Vec::with_capacity((n_tensors as usize).min(MAX_RESERVE));
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(format!("tensor '{name}': {n_dims} dimensions (1 to {MAX_DIMS} allowed)"));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64()?);
            }
            let ty = r.u32()?;
            let rel_offset = r.u64()?;
            raws.push(Raw { name, dims, ty, rel_offset });
        }
        let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
        let file_len = buf.len() as u64;

        let mut tensors = Vec::with_capacity(raws.len());
        let mut by_name = HashMap::with_capacity(raws.len());
        for raw in raws {
            let name = raw.name;
            let qtype = QType::from_ggml(raw.ty)
                .ok_or_else(|| format!("tensor '{name}': unsupported tensor type {}", ggml_type_name(raw.ty)))?;
            let n_elem = raw
                .dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("tensor '{name}': invalid shape {:?}", raw.dims))?;
            let block = qtype.block_size() as u64;
            if raw.dims[0] % block != 0 {
                return Err(format!(
                    "tensor '{name}': row length {} is not a multiple of the {} block size {block}",
                    raw.dims[0],
                    qtype.name()
                ));
            }
            let n_bytes = (n_elem / block)
                .checked_mul(qtype.block_bytes() as u64)
                .ok_or_else(|| format!("tensor '{name}': size overflows"))?;
            if raw.rel_offset % alignment != 0 {
                return Err(format!("tensor '{name}': offset {} is not aligned to {alignment}", raw.rel_offset));
            }
            let start = data_start
                .checked_add(raw.rel_offset)
                .ok_or_else(|| format!("tensor '{name}': offset overflows"))?;
            let end = start.checked_add(n_bytes).ok_or_else(|| format!("tensor '{name}': offset overflows"))?;
            if end > file_len {
                return Err(format!(
                    "tensor '{name}' needs bytes {start}..{end} but the file has {file_len} (truncated?)"
                ));
            }
            if by_name.insert(name.clone(), tensors.len()).is_some() {
                return Err(format!("duplicate tensor name '{name}'"));
            }
            tensors.push(TensorInfo { name, dims: raw.dims, qtype, offset: start as usize, n_bytes: n_bytes as usize });
        }
        Ok(GgufFile { path, version, metadata, tensors, by_name, bytes })
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The bytes of a tensor; bounds were checked when the index was parsed.
    pub fn tensor_bytes(&self, t: &TensorInfo) -> &[u8] {
        &self.bytes[t.offset..t.offset + t.n_bytes]
    }

    /// The whole file in memory; tensors borrow ranges of it.
    pub fn bytes(&self) -> &Arc<FileBuf> {
        &self.bytes
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(MetaValue::as_str)
    }
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(MetaValue::as_u64)
    }
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(MetaValue::as_f64)
    }
    pub fn file_len(&self) -> usize {
        self.bytes.len()
    }
}

fn ggml_type_name(ty: u32) -> String {
    let name = match ty {
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        15 => "Q8_K",
        16..=23 => "IQ*",
        30 => "BF16",
        _ => return format!("#{ty}"),
    };
    format!("{name} (#{ty})")
}

/// Writes GGUF files; used by tests to build tiny models and malformed files.
pub mod writer {
    use super::MetaValue;
    use crate::formats::quant::QType;

    pub struct TensorSpec {
        pub name: String,
        pub dims: Vec<u64>,
        pub qtype: QType,
        pub data: Vec<u8>,
    }

    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    fn type_id(v: &MetaValue) -> u32 {
        match v {
            MetaValue::U8(_) => 0,
            MetaValue::I8(_) => 1,
            MetaValue::U16(_) => 2,
            MetaValue::I16(_) => 3,
            MetaValue::U32(_) => 4,
            MetaValue::I32(_) => 5,
            MetaValue::F32(_) => 6,
            MetaValue::Bool(_) => 7,
            MetaValue::Str(_) => 8,
            MetaValue::Array(_) | MetaValue::Packed(..) => 9,
            MetaValue::U64(_) => 10,
            MetaValue::I64(_) => 11,
            MetaValue::F64(_) => 12,
        }
    }

    fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
        match v {
            MetaValue::U8(x) => out.push(*x),
            MetaValue::I8(x) => out.push(*x as u8),
            MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::Bool(x) => out.push(*x as u8),
            MetaValue::Str(s) => put_str(out, s),
            MetaValue::Packed(ty, bytes) => {
                out.extend_from_slice(&ty.to_le_bytes());
                out.extend_from_slice(&((bytes.len() / super::packed_size(*ty).unwrap_or(1)) as u64).to_le_bytes());
                out.extend_from_slice(bytes);
            }
            MetaValue::Array(items) => {
                let elem = items.first().map(type_id).unwrap_or(8);
                out.extend_from_slice(&elem.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for it in items {
                    put_value(out, it);
                }
            }
        }
    }

    /// Serialises a version-3 GGUF file with 32-byte alignment.
    pub fn write(metadata: &[(&str, MetaValue)], tensors: &[TensorSpec]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            put_str(&mut out, k);
            out.extend_from_slice(&type_id(v).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0u64;
        for t in tensors {
            put_str(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.qtype.ggml_id().to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offset += (t.data.len() as u64).div_ceil(32) * 32;
        }
        while out.len() % 32 != 0 {
            out.push(0);
        }
        for t in tensors {
            out.extend_from_slice(&t.data);
            while out.len() % 32 != 0 {
                out.push(0);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::writer::{write, TensorSpec};
    use super::*;
    use std::io::Write;

    fn sample() -> Vec<u8> {
        let data: Vec<u8> = (0..8u32).flat_map(|i| (i as f32).to_le_bytes()).collect();
        write(
            &[
                ("general.architecture", MetaValue::Str("llama".into())),
                ("llama.block_count", MetaValue::U32(2)),
                ("tokenizer.ggml.tokens", MetaValue::Array(vec![MetaValue::Str("a".into()), MetaValue::Str("b".into())])),
            ],
            &[TensorSpec { name: "w".into(), dims: vec![4, 2], qtype: QType::F32, data }],
        )
    }

    fn open_bytes(bytes: &[u8]) -> Result<GgufFile, EngineError> {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f.flush().unwrap();
        let path = f.into_temp_path();
        let r = GgufFile::open(&path);
        drop(path);
        r
    }

    fn load_error(bytes: &[u8]) -> String {
        match open_bytes(bytes) {
            Err(EngineError::ModelLoad { reason, .. }) => reason,
            other => panic!("expected a ModelLoad error, got {other:?}"),
        }
    }

    #[test]
    fn parses_metadata_and_tensor_index() {
        let g = open_bytes(&sample()).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.get_str("general.architecture"), Some("llama"));
        assert_eq!(g.get_u64("llama.block_count"), Some(2));
        assert_eq!(g.get("tokenizer.ggml.tokens").unwrap().as_array().unwrap().len(), 2);
        let t = g.tensor("w").unwrap();
        assert_eq!(t.dims, vec![4, 2]);
        let floats: Vec<f32> =
            g.tensor_bytes(t).chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(floats, (0..8).map(|i| i as f32).collect::<Vec<_>>());
    }

    #[test]
    fn rejects_non_gguf() {
        assert!(load_error(b"hello world, not a model").contains("bad magic"));
        assert!(load_error(b"").contains("bad magic"));
    }

    #[test]
    fn rejects_every_truncation_without_panicking() {
        let full = sample();
        for len in 0..full.len() - 1 {
            // Truncations inside trailing alignment padding of the last tensor are
            // still complete; everything else must fail cleanly.
            if let Ok(g) = open_bytes(&full[..len]) {
                let t = g.tensor("w").unwrap();
                assert!(t.offset + t.n_bytes <= len);
            }
        }
        let reason = load_error(&full[..full.len() - 20]);
        assert!(reason.contains("truncated"), "{reason}");
    }

    #[test]
    fn rejects_corrupted_counts_and_types() {
        let mut bad = sample();
        bad[8..16].copy_from_slice(&u64::MAX.to_le_bytes()); // tensor count
        assert!(load_error(&bad).contains("exceed"));

        let mut bad = sample();
        bad[4..8].copy_from_slice(&99u32.to_le_bytes());
        assert!(load_error(&bad).contains("version"));

        // An absurd string length inside metadata.
        let mut bad = sample();
        bad[24..32].copy_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(load_error(&bad).contains("exceeds the file"));
    }

    #[test]
    fn rejects_unsupported_tensor_type() {
        let bytes = write(&[], &[TensorSpec { name: "k".into(), dims: vec![256], qtype: QType::F32, data: vec![0; 1024] }]);
        // Patch the type id (F32 = 0) to Q3_K (11): it sits right after the dims.
        let name_at = bytes.windows(1 + 8).position(|w| w[0] == b'k').unwrap();
        let ty_at = name_at + 1 + 4 + 8;
        let mut bad = bytes.clone();
        bad[ty_at..ty_at + 4].copy_from_slice(&11u32.to_le_bytes());
        assert!(load_error(&bad).contains("Q3_K"), "{}", load_error(&bad));
    }

    #[test]
    fn missing_file_names_the_path() {
        match GgufFile::open("/nonexistent/model.gguf") {
            Err(e @ EngineError::ModelLoad { .. }) => assert!(e.to_string().contains("/nonexistent/model.gguf")),
            other => panic!("{other:?}"),
        }
    }
}
