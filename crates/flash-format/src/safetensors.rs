//! The safetensors file format: a strict header parser, a streaming writer,
//! and the `model.safetensors.index.json` of sharded checkpoints.
//!
//! Layout of a file: 8 bytes little-endian `N`, then `N` bytes of UTF-8 JSON
//! (the header), then the data area. The header maps tensor names to
//! `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to the
//! data area) and may hold a `"__metadata__"` map of strings. The data area is
//! indexed entirely: tensors may not overlap and may not leave holes.

use crate::dtype::DType;
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// Headers larger than this are refused before any allocation (the reference
/// implementation uses the same bound).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// What is wrong with a header, independent of which file it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("file is {0} bytes, too short to hold the 8-byte header length")]
    TooShort(u64),
    #[error("header length {len} exceeds the limit of {MAX_HEADER_LEN} bytes")]
    HeaderTooLarge { len: u64 },
    #[error("header length {len} runs past the end of the file ({file_len} bytes)")]
    HeaderPastEnd { len: u64, file_len: u64 },
    #[error("header is not valid UTF-8")]
    NotUtf8,
    #[error("header does not start with '{{'")]
    BadStart,
    #[error("header is not valid JSON: {0}")]
    Json(String),
    #[error("header key {0:?} appears twice")]
    DuplicateKey(String),
    #[error("__metadata__ must be a map of strings to strings")]
    BadMetadata,
    #[error("tensor {name:?}: {why}")]
    BadEntry { name: String, why: String },
    #[error("tensor {name:?}: unknown dtype {dtype:?}")]
    UnknownDType { name: String, dtype: String },
    #[error("tensor {name:?}: shape {shape:?} of {dtype} needs {expected} bytes but data_offsets span {actual}")]
    LengthMismatch {
        name: String,
        dtype: DType,
        shape: Vec<u64>,
        expected: String,
        actual: u64,
    },
    #[error(
        "tensor {name:?}: data_offsets [{begin}, {end}] run past the data area ({data_len} bytes)"
    )]
    OutOfRange {
        name: String,
        begin: u64,
        end: u64,
        data_len: u64,
    },
    #[error("tensors {a:?} and {b:?} overlap")]
    Overlap { a: String, b: String },
    #[error("the data area has a hole of {len} bytes at offset {at}")]
    Hole { at: u64, len: u64 },
}

/// A header problem or an I/O error, with the file it concerns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Header {
        path: PathBuf,
        #[source]
        source: HeaderError,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: {why}", path.display())]
    Index { path: PathBuf, why: String },
    #[error("{}: {why}", path.display())]
    Write { path: PathBuf, why: String },
}

impl Error {
    fn io(path: &Path, source: io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// One tensor of a safetensors header. Offsets are relative to the data area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub begin: u64,
    pub end: u64,
}

impl TensorEntry {
    pub fn len(&self) -> u64 {
        self.end - self.begin
    }
    pub fn is_empty(&self) -> bool {
        self.begin == self.end
    }
}

/// A parsed, validated header.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Header {
    /// The `__metadata__` map, empty when absent.
    pub metadata: BTreeMap<String, String>,
    /// Tensors sorted by `begin` (then name, for zero-size ones).
    pub tensors: Vec<TensorEntry>,
    /// Length of the JSON header in bytes (the `N` of the file).
    pub header_len: u64,
}

impl Header {
    /// Absolute file offset where the data area starts.
    pub fn data_start(&self) -> u64 {
        8 + self.header_len
    }
    /// Length of the data area.
    pub fn data_len(&self) -> u64 {
        self.tensors.iter().map(|t| t.end).max().unwrap_or(0)
    }
}

/// JSON object entries in file order, keeping duplicates so they can be refused.
struct Entries(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Value>()? {
                    out.push((k, v));
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V)
    }
}

fn u64_array(v: &Value) -> Option<Vec<u64>> {
    v.as_array()?.iter().map(Value::as_u64).collect()
}

/// Parses and validates the JSON header of a file whose data area is
/// `data_len` bytes long.
pub fn parse_header(json: &[u8], data_len: u64) -> Result<Header, HeaderError> {
    let text = std::str::from_utf8(json).map_err(|_| HeaderError::NotUtf8)?;
    if !text.starts_with('{') {
        return Err(HeaderError::BadStart);
    }
    let Entries(entries) =
        serde_json::from_str(text).map_err(|e| HeaderError::Json(e.to_string()))?;
    let mut seen = HashSet::with_capacity(entries.len());
    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::with_capacity(entries.len());
    for (name, value) in entries {
        if !seen.insert(name.clone()) {
            return Err(HeaderError::DuplicateKey(name));
        }
        if name == "__metadata__" {
            let obj = value.as_object().ok_or(HeaderError::BadMetadata)?;
            for (k, v) in obj {
                let s = v.as_str().ok_or(HeaderError::BadMetadata)?;
                metadata.insert(k.clone(), s.to_string());
            }
            continue;
        }
        tensors.push(parse_entry(name, &value, data_len)?);
    }
    tensors.sort_by(|a, b| (a.begin, a.end, &a.name).cmp(&(b.begin, b.end, &b.name)));
    check_coverage(&tensors, data_len)?;
    Ok(Header {
        metadata,
        tensors,
        header_len: json.len() as u64,
    })
}

fn parse_entry(name: String, value: &Value, data_len: u64) -> Result<TensorEntry, HeaderError> {
    let bad = |why: &str| HeaderError::BadEntry {
        name: name.clone(),
        why: why.to_string(),
    };
    let obj = value
        .as_object()
        .ok_or_else(|| bad("entry is not an object"))?;
    let dtype_name = obj
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("missing or non-string \"dtype\""))?;
    let dtype: DType = dtype_name.parse().map_err(|_| HeaderError::UnknownDType {
        name: name.clone(),
        dtype: dtype_name.to_string(),
    })?;
    let shape = obj
        .get("shape")
        .and_then(u64_array)
        .ok_or_else(|| bad("missing \"shape\" or it is not an array of non-negative integers"))?;
    let offsets = obj
        .get("data_offsets")
        .and_then(u64_array)
        .filter(|o| o.len() == 2)
        .ok_or_else(|| bad("\"data_offsets\" must be two non-negative integers"))?;
    let (begin, end) = (offsets[0], offsets[1]);
    if begin > end {
        return Err(bad("data_offsets begin after they end"));
    }
    if end > data_len {
        return Err(HeaderError::OutOfRange {
            name,
            begin,
            end,
            data_len,
        });
    }
    let expected = dtype.byte_len(&shape);
    if expected != Some(end - begin) {
        return Err(HeaderError::LengthMismatch {
            name,
            dtype,
            shape,
            expected: expected.map_or("an impossible number of".into(), |e| e.to_string()),
            actual: end - begin,
        });
    }
    Ok(TensorEntry {
        name,
        dtype,
        shape,
        begin,
        end,
    })
}

/// Sorted tensors must tile `[0, data_len)` exactly: no overlap, no hole.
fn check_coverage(tensors: &[TensorEntry], data_len: u64) -> Result<(), HeaderError> {
    let mut cursor = 0u64;
    let mut last: Option<&TensorEntry> = None;
    for t in tensors.iter().filter(|t| !t.is_empty()) {
        if t.begin < cursor {
            return Err(HeaderError::Overlap {
                a: last.map(|l| l.name.clone()).unwrap_or_default(),
                b: t.name.clone(),
            });
        }
        if t.begin > cursor {
            return Err(HeaderError::Hole {
                at: cursor,
                len: t.begin - cursor,
            });
        }
        cursor = t.end;
        last = Some(t);
    }
    if cursor != data_len {
        return Err(HeaderError::Hole {
            at: cursor,
            len: data_len - cursor,
        });
    }
    Ok(())
}

/// Reads and validates the header of the safetensors file at `path`.
/// Reads only the header, never the data area.
pub fn read_header(path: &Path) -> Result<Header, Error> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let header_err = |source| Error::Header {
        path: path.to_path_buf(),
        source,
    };
    if file_len < 8 {
        return Err(header_err(HeaderError::TooShort(file_len)));
    }
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes)
        .map_err(|e| Error::io(path, e))?;
    let len = u64::from_le_bytes(len_bytes);
    if len > MAX_HEADER_LEN {
        return Err(header_err(HeaderError::HeaderTooLarge { len }));
    }
    if len > file_len - 8 {
        return Err(header_err(HeaderError::HeaderPastEnd { len, file_len }));
    }
    let mut json = vec![0u8; len as usize];
    file.read_exact(&mut json).map_err(|e| Error::io(path, e))?;
    parse_header(&json, file_len - 8 - len).map_err(header_err)
}

/// Parses a whole in-memory safetensors file (header and data).
pub fn parse_bytes(bytes: &[u8]) -> Result<Header, HeaderError> {
    let file_len = bytes.len() as u64;
    if file_len < 8 {
        return Err(HeaderError::TooShort(file_len));
    }
    let len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    if len > MAX_HEADER_LEN {
        return Err(HeaderError::HeaderTooLarge { len });
    }
    if len > file_len - 8 {
        return Err(HeaderError::HeaderPastEnd { len, file_len });
    }
    let end = 8 + len as usize;
    parse_header(&bytes[8..end], file_len - 8 - len)
}

/// What a writer needs to know of a tensor before its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
}

/// Builds a header for tensors laid out back to back in the given order.
/// Returns the header bytes (padded with spaces to a multiple of 8, as the
/// reference implementation does) and each tensor's byte length.
pub fn build_header(
    specs: &[TensorSpec],
    metadata: &BTreeMap<String, String>,
) -> Result<(Vec<u8>, Vec<u64>), HeaderError> {
    #[derive(Serialize)]
    struct Info<'a> {
        dtype: &'a str,
        shape: &'a [u64],
        data_offsets: [u64; 2],
    }
    let mut map = serde_json::Map::new();
    if !metadata.is_empty() {
        map.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).expect("strings"),
        );
    }
    let mut lens = Vec::with_capacity(specs.len());
    let mut cursor = 0u64;
    for s in specs {
        let len = s
            .dtype
            .byte_len(&s.shape)
            .ok_or_else(|| HeaderError::BadEntry {
                name: s.name.clone(),
                why: format!(
                    "shape {:?} of {} is not a whole number of bytes",
                    s.shape, s.dtype
                ),
            })?;
        if s.name == "__metadata__" {
            return Err(HeaderError::BadEntry {
                name: s.name.clone(),
                why: "the name is reserved".into(),
            });
        }
        let info = Info {
            dtype: s.dtype.name(),
            shape: &s.shape,
            data_offsets: [cursor, cursor + len],
        };
        if map
            .insert(
                s.name.clone(),
                serde_json::to_value(info).expect("plain data"),
            )
            .is_some()
        {
            return Err(HeaderError::DuplicateKey(s.name.clone()));
        }
        cursor += len;
        lens.push(len);
    }
    let mut json = serde_json::to_vec(&Value::Object(map)).expect("plain data");
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    Ok((json, lens))
}

/// Writes a safetensors file: the header first, then each tensor's bytes in
/// the order of the specs, streamed through [`Writer::write`].
pub struct Writer {
    path: PathBuf,
    out: BufWriter<File>,
    remaining: u64,
}

impl Writer {
    pub fn create(
        path: &Path,
        specs: &[TensorSpec],
        metadata: &BTreeMap<String, String>,
    ) -> Result<Self, Error> {
        let (json, lens) = build_header(specs, metadata).map_err(|source| Error::Header {
            path: path.to_path_buf(),
            source,
        })?;
        let file = File::create(path).map_err(|e| Error::io(path, e))?;
        let mut out = BufWriter::with_capacity(8 << 20, file);
        out.write_all(&(json.len() as u64).to_le_bytes())
            .and_then(|_| out.write_all(&json))
            .map_err(|e| Error::io(path, e))?;
        Ok(Writer {
            path: path.to_path_buf(),
            out,
            remaining: lens.iter().sum(),
        })
    }

    /// Appends data bytes; the caller feeds tensors in spec order.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), Error> {
        if bytes.len() as u64 > self.remaining {
            return Err(Error::Write {
                path: self.path.clone(),
                why: "more data than the header declares".into(),
            });
        }
        self.remaining -= bytes.len() as u64;
        self.out
            .write_all(bytes)
            .map_err(|e| Error::io(&self.path, e))
    }

    /// Flushes and syncs the file; fails if fewer bytes came than declared.
    pub fn finish(self) -> Result<(), Error> {
        if self.remaining != 0 {
            return Err(Error::Write {
                path: self.path.clone(),
                why: format!("{} bytes of tensor data missing", self.remaining),
            });
        }
        let file = self
            .out
            .into_inner()
            .map_err(|e| Error::io(&self.path, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&self.path, e))
    }
}

/// Writes a whole file from in-memory tensors (tests and small models).
pub fn write_file(
    path: &Path,
    tensors: &[(TensorSpec, &[u8])],
    metadata: &BTreeMap<String, String>,
) -> Result<(), Error> {
    let specs: Vec<TensorSpec> = tensors.iter().map(|(s, _)| s.clone()).collect();
    let mut w = Writer::create(path, &specs, metadata)?;
    for (spec, bytes) in tensors {
        let want = spec.dtype.byte_len(&spec.shape).unwrap_or(u64::MAX);
        if want != bytes.len() as u64 {
            return Err(Error::Write {
                path: path.to_path_buf(),
                why: format!(
                    "tensor {:?}: {} bytes given, shape needs {want}",
                    spec.name,
                    bytes.len()
                ),
            });
        }
        w.write(bytes)?;
    }
    w.finish()
}

/// `model.safetensors.index.json` of a sharded checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardIndex {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    pub weight_map: BTreeMap<String, String>,
}

pub const INDEX_FILE: &str = "model.safetensors.index.json";

impl ShardIndex {
    /// Reads an index and checks that every shard it names is a plain file
    /// name inside `dir` (no path separators, no `..`).
    pub fn read(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let index: ShardIndex = serde_json::from_str(&text).map_err(|e| Error::Index {
            path: path.to_path_buf(),
            why: format!("not a valid index: {e}"),
        })?;
        for shard in index.weight_map.values() {
            if shard.is_empty() || shard.contains('/') || shard.contains('\\') || shard == ".." {
                return Err(Error::Index {
                    path: path.to_path_buf(),
                    why: format!("shard name {shard:?} is not a plain file name"),
                });
            }
        }
        Ok(index)
    }

    /// Shard file names in a stable order.
    pub fn shards(&self) -> Vec<String> {
        let set: std::collections::BTreeSet<&String> = self.weight_map.values().collect();
        set.into_iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(json: &str, data: &[u8]) -> Vec<u8> {
        let mut v = (json.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(json.as_bytes());
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn accepts_scalars_zero_size_and_metadata() {
        let json = r#"{"__metadata__":{"format":"pt"},"s":{"dtype":"F32","shape":[],"data_offsets":[0,4]},"z":{"dtype":"BF16","shape":[0,3],"data_offsets":[4,4]}}"#;
        let h = parse_bytes(&file_with(json, &[0; 4])).unwrap();
        assert_eq!(h.metadata["format"], "pt");
        assert_eq!(h.tensors.len(), 2);
        assert_eq!(h.data_len(), 4);
    }

    #[test]
    fn refuses_malformed_headers() {
        let cases: &[(&str, usize, &str)] = &[
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
                4,
                "needs 8 bytes",
            ),
            (
                r#"{"a":{"dtype":"Q7","shape":[1],"data_offsets":[0,1]}}"#,
                1,
                "unknown dtype",
            ),
            (
                r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#,
                6,
                "overlap",
            ),
            (
                r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}}"#,
                4,
                "hole",
            ),
            (
                r#"{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]}}"#,
                4,
                "past the data area",
            ),
            (
                r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#,
                2,
                "twice",
            ),
            (r#"{"a":1}"#, 0, "not an object"),
            (
                r#"{"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}"#,
                1,
                "shape",
            ),
            (r#"{"__metadata__":{"a":1}}"#, 0, "__metadata__"),
            (r#"[1,2]"#, 0, "start with"),
            (r#"{"a":"#, 0, "JSON"),
        ];
        for (json, data, want) in cases {
            let err = parse_bytes(&file_with(json, &vec![0; *data])).unwrap_err();
            assert!(err.to_string().contains(want), "{json}: {err}");
        }
        assert!(matches!(
            parse_bytes(&[1, 2]),
            Err(HeaderError::TooShort(2))
        ));
        let mut huge = (MAX_HEADER_LEN + 1).to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        assert!(matches!(
            parse_bytes(&huge),
            Err(HeaderError::HeaderTooLarge { .. })
        ));
        let past = file_with("{}", &[]);
        let mut past = past.clone();
        past[0] = 200;
        assert!(matches!(
            parse_bytes(&past),
            Err(HeaderError::HeaderPastEnd { .. })
        ));
    }

    #[test]
    fn writer_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.safetensors");
        let a = TensorSpec {
            name: "a".into(),
            dtype: DType::F16,
            shape: vec![3],
        };
        let b = TensorSpec {
            name: "b".into(),
            dtype: DType::U8,
            shape: vec![],
        };
        let mut meta = BTreeMap::new();
        meta.insert("k".to_string(), "v".to_string());
        write_file(&p, &[(a, &[1, 2, 3, 4, 5, 6]), (b, &[9])], &meta).unwrap();
        let h = read_header(&p).unwrap();
        assert_eq!(h.header_len % 8, 0);
        assert_eq!(h.metadata, meta);
        assert_eq!(h.tensors[1].name, "b");
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[h.data_start() as usize..], &[1, 2, 3, 4, 5, 6, 9]);
    }
}
