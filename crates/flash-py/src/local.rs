//! In-process loads and saves: no daemon involved.

use crate::block::{Block, Memory};
use crate::errors::{device, flash, invalid, load_err};
use flash_format::manifest::{
    ChecksumSpec, Manifest, Source, ALIGNMENT, CHECKSUM_ALGORITHM, DEFAULT_CHECKSUM_CHUNK,
    FORMAT_NAME, MANIFEST_FILE, PLAIN_FORMAT_VERSION,
};
use flash_format::safetensors::{self as st, TensorSpec};
use flash_format::writer::DataWriter;
use flash_format::DType;
use flash_load::{
    load_placed, Device, DeviceMap, LoadOptions, ModelSource, SourceFile, SourceKind, StoredTensor,
};
use pyo3::buffer::PyBuffer;
use pyo3::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Data files of a saved dict are split at this size.
const MAX_DATA_FILE: u64 = 4 << 30;

/// Opens a model folder (flash format or safetensors) or one `.safetensors` file.
pub fn open_source(path: &Path) -> Result<ModelSource, flash_load::LoadError> {
    if path.is_dir() {
        return ModelSource::open(path);
    }
    if !path.is_file() {
        return Err(flash_load::LoadError::model(path, "no such file or folder"));
    }
    let header = st::read_header(path)?;
    let data_start = header.data_start();
    let len = data_start + header.data_len();
    let tensors = header
        .tensors
        .into_iter()
        .map(|t| StoredTensor {
            offset: data_start + t.begin,
            length: t.end - t.begin,
            name: t.name,
            dtype: t.dtype,
            shape: t.shape,
            file: 0,
            encoding: None,
        })
        .collect();
    Ok(ModelSource {
        dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
        kind: SourceKind::Safetensors,
        files: vec![SourceFile {
            path: path.to_path_buf(),
            len,
        }],
        tensors,
        aliases: BTreeMap::new(),
        metadata: header.metadata,
        manifest: None,
    })
}

pub fn options(threads: Option<usize>, chunk_bytes: Option<u64>) -> LoadOptions {
    let mut o = LoadOptions::default();
    if let Some(t) = threads.filter(|&t| t > 0) {
        o.threads = t;
    }
    if let Some(c) = chunk_bytes.filter(|&c| c > 0) {
        o.chunk_bytes = c.div_ceil(4096) * 4096;
    }
    o
}

/// The GPUs a device map needs, checked to exist.
fn gpus_for(map: &DeviceMap) -> PyResult<Vec<flash_sys::cuda::Gpu>> {
    let wanted: Vec<usize> = match map {
        DeviceMap::Auto => Vec::new(),
        DeviceMap::Prefixes(p) => p
            .values()
            .filter_map(|d| match d {
                Device::Gpu(n) => Some(*n),
                Device::Cpu => None,
            })
            .collect(),
    };
    if wanted.is_empty() && !matches!(map, DeviceMap::Auto) {
        return Ok(Vec::new());
    }
    let cuda = match flash_sys::cuda::probe() {
        Ok(c) => c,
        // `auto` without CUDA places everything in host memory.
        Err(_) if matches!(map, DeviceMap::Auto) => return Ok(Vec::new()),
        Err(e) => {
            return Err(device(format!(
            "device_map asks for GPU {} but CUDA is not usable here ({e}); use {{\"\": \"cpu\"}}",
            wanted[0]
        )))
        }
    };
    if let Some(&bad) = wanted.iter().find(|&&n| n >= cuda.device_count()) {
        return Err(device(format!(
            "device_map asks for GPU {bad}, but this machine has {} GPU(s) (0..{})",
            cuda.device_count(),
            cuda.device_count().saturating_sub(1)
        )));
    }
    (0..cuda.device_count())
        .map(|i| cuda.device(i).map_err(|e| device(e.to_string())))
        .collect()
}

/// Loads a model folder or safetensors file in this process, placed by
/// `device_map` (JSON: `{"": 0}`, `{"": "cpu"}`, `"auto"`); one block per device.
/// `rank`: one tensor-parallel rank of a flash folder stored split.
#[pyfunction]
#[pyo3(signature = (path, device_map, threads=None, chunk_bytes=None, rank=None))]
pub fn load_local(
    py: Python<'_>,
    path: PathBuf,
    device_map: &str,
    threads: Option<usize>,
    chunk_bytes: Option<u64>,
    rank: Option<u32>,
) -> PyResult<Vec<Block>> {
    let map = DeviceMap::from_json(device_map).map_err(device)?;
    let gpus = gpus_for(&map)?;
    let opts = options(threads, chunk_bytes);
    let placed = py
        .detach(|| {
            let source = match rank {
                Some(r) if path.is_dir() => ModelSource::open_rank(&path, r)?,
                Some(_) => return Err(flash_load::LoadError::model(
                    &path,
                    "a rank names a part of a flash folder stored split (`flash pull --tp N`), \
                         not of a safetensors file",
                )),
                None => open_source(&path)?,
            };
            load_placed(&source, &map, &gpus, &opts)
        })
        .map_err(load_err)?;
    let mut out = Vec::new();
    let mut seconds = 0f64;
    for (_, s) in &placed.stats {
        seconds = seconds.max(s.seconds);
    }
    if let Some(h) = placed.host {
        let t = h.tensors().to_vec();
        out.push(Block::new(Memory::Host(h), t).with_fact("seconds", seconds));
    }
    for (_, g) in placed.gpus {
        let t = g.tensors().to_vec();
        out.push(Block::new(Memory::Gpu(g), t).with_fact("seconds", seconds));
    }
    if out.is_empty() {
        out.push(Block::new(Memory::Empty, Vec::new()));
    }
    Ok(out)
}

/// One tensor to save: name, safetensors dtype name, shape, and an object
/// with the buffer protocol holding its bytes (any layout: copied C-contiguous).
type Entry<'py> = (String, String, Vec<u64>, Bound<'py, PyAny>);

struct Checked<'py> {
    name: String,
    dtype: DType,
    shape: Vec<u64>,
    len: u64,
    buf: PyBuffer<u8>,
    _obj: Bound<'py, PyAny>,
}

fn check(entries: Vec<Entry<'_>>) -> PyResult<Vec<Checked<'_>>> {
    let mut seen = std::collections::HashSet::new();
    entries
        .into_iter()
        .map(|(name, dtype, shape, obj)| {
            if !seen.insert(name.clone()) {
                return Err(invalid(format!("tensor {name:?} appears twice")));
            }
            let dtype: DType = dtype
                .parse()
                .map_err(|e| invalid(format!("tensor {name:?}: {e}")))?;
            let len = dtype.byte_len(&shape).ok_or_else(|| {
                invalid(format!(
                    "tensor {name:?}: shape {shape:?} of {dtype} is not a whole number of bytes"
                ))
            })?;
            let buf = PyBuffer::<u8>::get(&obj).map_err(|e| {
                invalid(format!(
                    "tensor {name:?}: its bytes are not readable as a byte buffer ({e})"
                ))
            })?;
            if buf.len_bytes() as u64 != len {
                return Err(invalid(format!(
                    "tensor {name:?}: {} bytes given, shape {shape:?} of {dtype} needs {len}",
                    buf.len_bytes()
                )));
            }
            Ok(Checked {
                name,
                dtype,
                shape,
                len,
                buf,
                _obj: obj,
            })
        })
        .collect()
}

fn copy_out(py: Python<'_>, c: &Checked<'_>, scratch: &mut Vec<u8>) -> PyResult<()> {
    scratch.clear();
    scratch.resize(c.len as usize, 0);
    c.buf.copy_to_slice(py, scratch)
}

fn dir_sync(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

/// Writes tensors as a flash-format folder at `dir` (created if needed).
/// `aliases` maps a name to the saved tensor whose bytes it shares (tied
/// weights, stored once). Files are written in a temporary folder inside
/// `dir`, then moved in; the manifest last, so a reader never sees a manifest
/// naming missing data.
#[pyfunction]
#[pyo3(signature = (dir, entries, aliases, metadata=None, model_id=None, compress=false))]
pub fn save_flash(
    py: Python<'_>,
    dir: PathBuf,
    entries: Vec<Entry<'_>>,
    aliases: BTreeMap<String, String>,
    metadata: Option<BTreeMap<String, String>>,
    model_id: Option<String>,
    compress: bool,
) -> PyResult<u64> {
    let items = check(entries)?;
    let names: HashMap<&str, usize> = items
        .iter()
        .enumerate()
        .map(|(i, c)| (c.name.as_str(), i))
        .collect();
    for (alias, target) in &aliases {
        if names.contains_key(alias.as_str()) {
            return Err(invalid(format!("{alias:?} is both a tensor and an alias")));
        }
        if !names.contains_key(target.as_str()) {
            return Err(invalid(format!(
                "alias {alias:?} points to {target:?}, which is not saved"
            )));
        }
    }
    if dir.exists() && !dir.is_dir() {
        return Err(invalid(format!(
            "{}: exists and is not a folder (a path ending in .safetensors saves one file)",
            dir.display()
        )));
    }
    let io = |p: &Path, e: std::io::Error| flash(format!("{}: {e}", p.display()));
    std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let tmp = dir.join(format!(".flash-save-{}-{nanos}", std::process::id()));
    std::fs::create_dir(&tmp).map_err(|e| io(&tmp, e))?;
    let result = write_flash(
        py, &dir, &tmp, &items, &aliases, metadata, model_id, compress,
    );
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

#[allow(clippy::too_many_arguments)]
fn write_flash(
    py: Python<'_>,
    dir: &Path,
    tmp: &Path,
    items: &[Checked<'_>],
    aliases: &BTreeMap<String, String>,
    metadata: Option<BTreeMap<String, String>>,
    model_id: Option<String>,
    compress: bool,
) -> PyResult<u64> {
    let mf = |e: flash_format::ManifestError| flash(e.to_string());
    let mut writer = DataWriter::new(tmp, DEFAULT_CHECKSUM_CHUNK, MAX_DATA_FILE);
    let mut scratch = Vec::new();
    let mut dtype_bytes: BTreeMap<DType, u64> = BTreeMap::new();
    for c in items {
        copy_out(py, c, &mut scratch)?;
        *dtype_bytes.entry(c.dtype).or_default() += c.len;
        let (w, bytes) = (&mut writer, &scratch);
        let (name, dtype, shape) = (c.name.as_str(), c.dtype, c.shape.as_slice());
        py.detach(|| flash_store::encode::write_tensor(w, name, dtype, shape, bytes, compress))
            .map_err(|e| flash(e.to_string()))?;
    }
    let (files, tensors) = py.detach(|| writer.finish()).map_err(mf)?;
    let model_id = model_id.unwrap_or_else(|| {
        dir.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "dict".into())
    });
    let mut m = Manifest {
        format: FORMAT_NAME.into(),
        version: PLAIN_FORMAT_VERSION,
        model_id,
        source: Source {
            kind: "dict".into(),
            ..Source::default()
        },
        architecture: None,
        dtype: dtype_bytes.iter().max_by_key(|(_, &b)| b).map(|(&d, _)| d),
        alignment: ALIGNMENT,
        checksum: ChecksumSpec {
            algorithm: CHECKSUM_ALGORITHM.into(),
            chunk_size: DEFAULT_CHECKSUM_CHUNK,
        },
        files,
        tensors,
        aliases: aliases.clone(),
        metadata: metadata.unwrap_or_default(),
        extra_files: Vec::new(),
    };
    m.version = m.required_version();
    m.validate()
        .map_err(|why| flash(format!("{}: manifest invalid: {why}", dir.display())))?;
    let io = |p: &Path, e: std::io::Error| flash(format!("{}: {e}", p.display()));
    let mtmp = tmp.join(MANIFEST_FILE);
    std::fs::write(&mtmp, m.to_json()).map_err(|e| io(&mtmp, e))?;
    std::fs::File::open(&mtmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| io(&mtmp, e))?;
    // Data files of an earlier save that this one does not overwrite.
    let keep: std::collections::HashSet<&str> = m.files.iter().map(|f| f.name.as_str()).collect();
    for f in &m.files {
        let (from, to) = (tmp.join(&f.name), dir.join(&f.name));
        std::fs::rename(&from, &to).map_err(|e| io(&to, e))?;
    }
    let (from, to) = (tmp.join(MANIFEST_FILE), dir.join(MANIFEST_FILE));
    std::fs::rename(&from, &to).map_err(|e| io(&to, e))?;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("data-") && name.ends_with(".bin") && !keep.contains(name.as_str())
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    dir_sync(dir).map_err(|e| io(dir, e))?;
    Ok(m.data_bytes())
}

/// Writes tensors as one safetensors file (safetensors cannot share bytes
/// between names: the caller passes tied tensors as separate entries).
#[pyfunction]
#[pyo3(signature = (path, entries, metadata=None))]
pub fn save_safetensors(
    py: Python<'_>,
    path: PathBuf,
    entries: Vec<Entry<'_>>,
    metadata: Option<BTreeMap<String, String>>,
) -> PyResult<u64> {
    let items = check(entries)?;
    let specs: Vec<TensorSpec> = items
        .iter()
        .map(|c| TensorSpec {
            name: c.name.clone(),
            dtype: c.dtype,
            shape: c.shape.clone(),
        })
        .collect();
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| flash(format!("{}: {e}", parent.display())))?;
    }
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
    let stf = |e: st::Error| flash(e.to_string());
    let result = (|| {
        let mut w = st::Writer::create(&tmp, &specs, &metadata.unwrap_or_default()).map_err(stf)?;
        let mut scratch = Vec::new();
        let mut total = 0u64;
        for c in &items {
            copy_out(py, c, &mut scratch)?;
            total += c.len;
            let w = &mut w;
            let bytes = &scratch;
            py.detach(|| w.write(bytes)).map_err(stf)?;
        }
        py.detach(|| w.finish()).map_err(stf)?;
        std::fs::rename(&tmp, &path).map_err(|e| flash(format!("{}: {e}", path.display())))?;
        Ok(total)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// `(name, dtype, shape)` of a stored tensor.
type TableRow = (String, String, Vec<u64>);

/// The tensor table of a folder or file without loading it:
/// `[(name, dtype, shape)]` and the aliases.
#[pyfunction]
pub fn read_table(
    py: Python<'_>,
    path: PathBuf,
) -> PyResult<(Vec<TableRow>, BTreeMap<String, String>)> {
    let source = py.detach(|| open_source(&path)).map_err(load_err)?;
    Ok((
        source
            .tensors
            .iter()
            .map(|t| (t.name.clone(), t.dtype.name().to_string(), t.shape.clone()))
            .collect(),
        source.aliases,
    ))
}
