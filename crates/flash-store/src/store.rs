//! The store: a folder of models in the flash format.
//!
//! Layout under the root (`$FLASH_HOME`):
//! - `models/<org>/<name>[@<revision>]/`: one model (manifest, data files,
//!   config and tokenizer files);
//! - `tmp/<kind>-<pid>-<nanos>/`: work in progress, renamed into `models/`
//!   when complete; left-overs of dead processes are removed on open;
//! - `trash/`: models being removed (renamed there first, so a model
//!   disappears atomically, then deleted).
//!
//! Invariant: a folder under `models/` is complete. Everything is written in
//! `tmp/`, synced, then renamed into place.

use crate::convert::{convert, DtypeChoice};
use crate::encode;
use crate::error::{Result, StoreError};
use crate::name::ModelName;
use flash_format::manifest::{
    self, ChecksumSpec, Manifest, Source, ALIGNMENT, CHECKSUM_ALGORITHM, FORMAT_NAME,
    MANIFEST_FILE, PLAIN_FORMAT_VERSION,
};
use flash_format::safetensors::{self as st, TensorSpec, INDEX_FILE};
use flash_format::writer::DataWriter;
use flash_format::DType;
use flash_load::decode::DecodedChunks;
use flash_load::{execute, LoadOptions, LoadPlan, ModelSource, ScanSink};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

/// Data files are split at this size.
pub const MAX_DATA_FILE: u64 = 4 << 30;
/// Shards of an export are at most this large (the Hub's convention).
pub const EXPORT_SHARD_BYTES: u64 = 5_000_000_000;

/// Weight formats other than safetensors: never copied as "extra" files.
const FOREIGN_WEIGHTS: &[&str] = &[
    ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf", ".onnx",
];

/// Reports progress in bytes: `(done, total)`.
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Sync);

#[derive(Default)]
pub struct ImportOptions<'a> {
    pub dtype: DtypeChoice,
    pub force: bool,
    pub source: Source,
    pub progress: Option<Progress<'a>>,
    /// Store floating-point tensors compressed (exponents entropy-coded,
    /// lossless; see `encode`).
    pub compress: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ImportReport {
    pub model_id: String,
    pub path: PathBuf,
    pub tensors: usize,
    pub aliases: usize,
    /// Bytes of the data files.
    pub bytes: u64,
    /// Bytes of the tensors, decoded.
    pub tensor_bytes: u64,
    pub compressed: bool,
    pub seconds: f64,
}

/// What `flash info` and `flash list` show.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    pub model_id: String,
    /// Bytes of the tensors (decoded): what a load puts in memory.
    pub size: u64,
    /// Bytes of the data files: what the model takes on disk (less than
    /// `size` when compressed).
    pub stored_bytes: u64,
    /// Whether some tensors are stored compressed.
    pub compressed: bool,
    pub dtype: Option<DType>,
    pub architecture: Option<String>,
    pub tensor_count: usize,
    pub ranks: u32,
    pub source: String,
    pub revision: Option<String>,
    pub path: PathBuf,
    pub format_version: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct BadChunk {
    pub file: String,
    pub offset: u64,
    pub len: u64,
    /// Tensors whose bytes lie in the chunk (padding alone names none).
    pub tensors: Vec<String>,
    /// For a compressed chunk whose decoded bytes are wrong: its index in
    /// its tensor, and what is wrong.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encoded_chunk: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub model_id: String,
    pub bytes: u64,
    pub chunks: u64,
    pub bad: Vec<BadChunk>,
    pub seconds: f64,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.bad.is_empty()
    }
}

pub struct Store {
    root: PathBuf,
}

/// Store-wide defaults, kept in `<store>/settings.json` (`flash config`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct StoreSettings {
    /// Imports store floating-point tensors compressed unless told otherwise.
    #[serde(default)]
    pub compress: bool,
}

/// The settings file under a store's root.
pub const SETTINGS_FILE: &str = "settings.json";

fn dir_sync(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(path, e))
}

fn pid_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

impl Store {
    /// The default root: `$FLASH_HOME`, else `<cache dir>/flashtensors`.
    pub fn default_root() -> PathBuf {
        if let Some(home) = std::env::var_os("FLASH_HOME").filter(|h| !h.is_empty()) {
            return PathBuf::from(home);
        }
        dirs::cache_dir()
            .unwrap_or_else(std::env::temp_dir)
            .join("flashtensors")
    }

    /// Opens (creating if needed) the store at `root` and removes work left
    /// behind by processes that died.
    pub fn open(root: &Path) -> Result<Self> {
        for sub in ["models", "tmp", "trash"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(|e| StoreError::io(&p, e))?;
        }
        let store = Store {
            root: root.to_path_buf(),
        };
        store.recover();
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The store-wide defaults (the built-in ones when none were set).
    pub fn settings(&self) -> Result<StoreSettings> {
        let path = self.root.join(SETTINGS_FILE);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| StoreError::invalid(&path, format!("not valid store settings: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StoreSettings::default()),
            Err(e) => Err(StoreError::io(&path, e)),
        }
    }

    /// Saves the store-wide defaults (written aside, then renamed).
    pub fn set_settings(&self, settings: &StoreSettings) -> Result<()> {
        let path = self.root.join(SETTINGS_FILE);
        let tmp = self
            .root
            .join(format!(".{SETTINGS_FILE}.{}", std::process::id()));
        let text = serde_json::to_vec_pretty(settings).expect("plain data");
        fs::write(&tmp, text)
            .and_then(|_| fs::rename(&tmp, &path))
            .map_err(|e| StoreError::io(&path, e))
    }

    /// Removes temporary folders of dead processes and anything in trash/.
    fn recover(&self) {
        if let Ok(rd) = fs::read_dir(self.root.join("tmp")) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let pid = name.split('-').nth(1).and_then(|p| p.parse::<u32>().ok());
                if pid.is_none_or(|p| !pid_alive(p)) {
                    tracing::info!(path = %e.path().display(), "removing unfinished work of a dead process");
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        if let Ok(rd) = fs::read_dir(self.root.join("trash")) {
            for e in rd.flatten() {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }

    fn tmp_dir(&self, kind: &str) -> Result<PathBuf> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let p = self
            .root
            .join("tmp")
            .join(format!("{kind}-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&p).map_err(|e| StoreError::io(&p, e))?;
        Ok(p)
    }

    pub fn model_dir(&self, name: &ModelName) -> PathBuf {
        self.root.join("models").join(name.rel_path())
    }

    /// The folder of an existing model.
    pub fn existing(&self, name: &ModelName) -> Result<PathBuf> {
        let dir = self.model_dir(name);
        if dir.join(MANIFEST_FILE).is_file() {
            Ok(dir)
        } else {
            Err(StoreError::NotFound(name.to_string()))
        }
    }

    pub fn contains(&self, name: &ModelName) -> bool {
        self.existing(name).is_ok()
    }

    /// Moves a finished temporary folder into place.
    fn install(&self, tmp: &Path, name: &ModelName, force: bool) -> Result<PathBuf> {
        let dest = self.model_dir(name);
        let parent = dest.parent().expect("models/<org>/<leaf> has a parent");
        fs::create_dir_all(parent).map_err(|e| StoreError::io(parent, e))?;
        let mut old = None;
        if dest.exists() {
            if !force {
                return Err(StoreError::Exists(name.to_string()));
            }
            let trash = self.tmp_trash_name(name);
            fs::rename(&dest, &trash).map_err(|e| StoreError::io(&dest, e))?;
            old = Some(trash);
        }
        if let Err(e) = fs::rename(tmp, &dest) {
            if let Some(old) = &old {
                // Put the previous model back: nothing stored is lost.
                let _ = fs::rename(old, &dest);
            }
            return Err(if e.kind() == std::io::ErrorKind::DirectoryNotEmpty {
                StoreError::Exists(name.to_string())
            } else {
                StoreError::io(&dest, e)
            });
        }
        dir_sync(parent)?;
        if let Some(old) = old {
            let _ = fs::remove_dir_all(old);
        }
        Ok(dest)
    }

    fn tmp_trash_name(&self, name: &ModelName) -> PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        self.root.join("trash").join(format!(
            "{}--{}-{nanos}",
            name.org,
            name.rel_path()
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        ))
    }

    /// Imports a Hugging Face style folder (safetensors, sharded or not, plus
    /// config and tokenizer files) as model `name`.
    pub fn import(
        &self,
        src_dir: &Path,
        name: &ModelName,
        opts: &ImportOptions,
    ) -> Result<ImportReport> {
        let start = Instant::now();
        if self.contains(name) && !opts.force {
            return Err(StoreError::Exists(name.to_string()));
        }
        let src = ModelSource::open(src_dir)?;
        if src.tensors.is_empty() {
            return Err(StoreError::invalid(
                src_dir,
                "the checkpoint holds no tensors",
            ));
        }
        let tmp = self.tmp_dir("import")?;
        let result = self.write_model(&src, &tmp, name, opts).and_then(|m| {
            let dest = self.install(&tmp, name, opts.force)?;
            Ok((m, dest))
        });
        match result {
            Ok((m, path)) => Ok(ImportReport {
                model_id: name.to_string(),
                path,
                tensors: m.tensors.len(),
                aliases: m.aliases.len(),
                bytes: m.data_bytes(),
                tensor_bytes: m.tensor_bytes(),
                compressed: m.is_encoded(),
                seconds: start.elapsed().as_secs_f64(),
            }),
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                Err(e)
            }
        }
    }

    fn write_model(
        &self,
        src: &ModelSource,
        tmp: &Path,
        name: &ModelName,
        opts: &ImportOptions,
    ) -> Result<Manifest> {
        let chunk = manifest::DEFAULT_CHECKSUM_CHUNK;
        let mut writer = DataWriter::new(tmp, chunk, MAX_DATA_FILE);
        let files: Vec<File> = src
            .files
            .iter()
            .map(|f| File::open(&f.path).map_err(|e| StoreError::io(&f.path, e)))
            .collect::<Result<_>>()?;
        let mut order: Vec<usize> = (0..src.tensors.len()).collect();
        order.sort_by_key(|&i| (src.tensors[i].file, src.tensors[i].offset));
        let total = src.tensor_bytes();
        let mut done = 0u64;
        // Identical tensors (same dtype, shape and bytes) are stored once.
        let mut seen: HashMap<(DType, Vec<u64>, u128), String> = HashMap::new();
        let mut aliases = BTreeMap::new();
        let mut dtype_bytes: BTreeMap<DType, u64> = BTreeMap::new();
        // A reader thread reads tensors in file order while this thread
        // converts, hashes and writes the previous ones, so the source disk
        // and the store's disk work at the same time. At most two tensors
        // wait in the channel (memory: three tensors, not the model).
        std::thread::scope(|scope| -> Result<()> {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Result<(usize, Vec<u8>)>>(1);
            let (order, files) = (&order, &files);
            scope.spawn(move || {
                for &i in order {
                    let t = &src.tensors[i];
                    // A compressed flash folder as the source is decoded.
                    let read = flash_load::decode::read_tensor(src, &files[t.file], t)
                        .map(|bytes| (i, bytes))
                        .map_err(StoreError::from);
                    let failed = read.is_err();
                    // A send fails when the writer gave up: stop reading.
                    if tx.send(read).is_err() || failed {
                        return;
                    }
                }
            });
            for received in rx {
                let (i, bytes) = received?;
                let t = &src.tensors[i];
                let dtype = opts.dtype.target(t.dtype);
                let bytes = convert(t.dtype, dtype, bytes);
                done += t.length;
                if let Some(p) = opts.progress {
                    p(done, total);
                }
                if !bytes.is_empty() {
                    let key = (dtype, t.shape.clone(), xxhash_rust::xxh3::xxh3_128(&bytes));
                    if let Some(first) = seen.get(&key) {
                        aliases.insert(t.name.clone(), first.clone());
                        continue;
                    }
                    seen.insert(key, t.name.clone());
                }
                *dtype_bytes.entry(dtype).or_default() += bytes.len() as u64;
                encode::write_tensor(&mut writer, &t.name, dtype, &t.shape, &bytes, opts.compress)?;
            }
            Ok(())
        })?;
        // A flash-format source's own aliases (tied weights stored once
        // there) stay aliases, of whatever now holds their target's bytes.
        for (alias, target) in &src.aliases {
            let to = aliases
                .get(target)
                .cloned()
                .unwrap_or_else(|| target.clone());
            aliases.insert(alias.clone(), to);
        }
        let (data_files, tensors) = writer.finish()?;
        let extra_files = copy_extra_files(&src.dir, tmp, opts.dtype)?;
        let config = read_config(tmp);
        let architecture = config
            .as_ref()
            .and_then(|c| c.get("architectures"))
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str())
            .map(str::to_string);
        let mut m = Manifest {
            format: FORMAT_NAME.into(),
            version: PLAIN_FORMAT_VERSION,
            model_id: name.to_string(),
            source: opts.source.clone(),
            architecture,
            dtype: dtype_bytes.iter().max_by_key(|(_, &b)| b).map(|(&d, _)| d),
            alignment: ALIGNMENT,
            checksum: ChecksumSpec {
                algorithm: CHECKSUM_ALGORITHM.into(),
                chunk_size: chunk,
            },
            files: data_files,
            tensors,
            aliases,
            metadata: src.metadata.clone(),
            extra_files,
        };
        m.version = m.required_version();
        m.validate().map_err(|why| {
            StoreError::invalid(tmp, format!("internal error, manifest invalid: {why}"))
        })?;
        let mpath = tmp.join(MANIFEST_FILE);
        let f = File::create(&mpath).map_err(|e| StoreError::io(&mpath, e))?;
        std::io::Write::write_all(&mut &f, m.to_json().as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| StoreError::io(&mpath, e))?;
        dir_sync(tmp)?;
        Ok(m)
    }

    /// Every model in the store, sorted by name.
    pub fn list(&self) -> Result<Vec<ModelInfo>> {
        let models = self.root.join("models");
        let mut out = Vec::new();
        let orgs = fs::read_dir(&models).map_err(|e| StoreError::io(&models, e))?;
        for org in orgs.flatten() {
            let Ok(leaves) = fs::read_dir(org.path()) else {
                continue;
            };
            for leaf in leaves.flatten() {
                let Some(name) = ModelName::from_rel(
                    &org.file_name().to_string_lossy(),
                    &leaf.file_name().to_string_lossy(),
                ) else {
                    continue;
                };
                match self.info(&name) {
                    Ok(info) => out.push(info),
                    Err(StoreError::NotFound(_)) => {}
                    Err(e) => tracing::warn!("skipping {name}: {e}"),
                }
            }
        }
        out.sort_by(|a, b| a.model_id.cmp(&b.model_id));
        Ok(out)
    }

    pub fn manifest(&self, name: &ModelName) -> Result<Manifest> {
        Ok(Manifest::read(&self.existing(name)?)?)
    }

    pub fn info(&self, name: &ModelName) -> Result<ModelInfo> {
        let path = self.existing(name)?;
        let m = Manifest::read(&path)?;
        Ok(ModelInfo {
            model_id: name.to_string(),
            size: m.tensor_bytes(),
            stored_bytes: m.data_bytes(),
            compressed: m.is_encoded(),
            dtype: m.dtype,
            architecture: m.architecture.clone(),
            tensor_count: m.tensor_count(),
            ranks: m.ranks(),
            source: match (&m.source.repo, &m.source.path) {
                (Some(r), _) => format!("{}:{r}", m.source.kind),
                (None, Some(p)) => format!("{}:{p}", m.source.kind),
                _ => m.source.kind.clone(),
            },
            revision: m.source.revision.clone(),
            path,
            format_version: m.version,
        })
    }

    /// Removes a model. It disappears at once (renamed into trash/), then its
    /// files are deleted.
    pub fn remove(&self, name: &ModelName) -> Result<()> {
        let dir = self.existing(name)?;
        let trash = self.tmp_trash_name(name);
        fs::rename(&dir, &trash).map_err(|e| StoreError::io(&dir, e))?;
        if let Some(parent) = dir.parent() {
            let _ = fs::remove_dir(parent); // only succeeds when the org folder is empty
        }
        fs::remove_dir_all(&trash).map_err(|e| StoreError::io(&trash, e))
    }

    /// Re-reads every chunk of the model's data files and compares it with
    /// the manifest's checksum; a bad chunk names the tensors in it.
    /// For compressed tensors, every chunk is also decoded and its decoded
    /// bytes compared with their checksum.
    pub fn verify(
        &self,
        name: &ModelName,
        opts: &LoadOptions,
        progress: Option<Progress>,
    ) -> Result<VerifyReport> {
        let start = Instant::now();
        let dir = self.existing(name)?;
        let src = ModelSource::open(&dir)?;
        let m = src
            .manifest
            .as_ref()
            .expect("the store holds the flash format");
        let chunk = m.checksum.chunk_size;
        let plan = LoadPlan::whole_files(&src.files);
        let total = m.data_bytes();
        let done = std::sync::atomic::AtomicU64::new(0);
        let bad = Mutex::new(Vec::new());
        let sink = ScanSink::new(chunk, |job, bytes| {
            let idx = (job.file_offset / chunk) as usize;
            let want = &m.files[job.file].checksums[idx];
            let got = manifest::checksum_hex(manifest::chunk_checksum(bytes));
            if &got != want {
                bad.lock().unwrap_or_else(|p| p.into_inner()).push((
                    job.file,
                    job.file_offset,
                    bytes.len() as u64,
                ));
            }
            let d = done.fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
            if let Some(p) = progress {
                p(d + bytes.len() as u64, total);
            }
            Ok(())
        });
        let opts = LoadOptions {
            chunk_bytes: chunk,
            ..opts.clone()
        };
        execute(&plan, &sink, &opts)?;
        let mut bad = bad.into_inner().unwrap_or_else(|p| p.into_inner());
        bad.sort();
        let bad = bad
            .into_iter()
            .map(|(file, offset, len)| {
                Ok(BadChunk {
                    file: m.files[file].name.clone(),
                    offset,
                    len,
                    tensors: bad_tensors_in(m, &src.files[file].path, file as u32, offset, len)?,
                    encoded_chunk: None,
                    why: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut bad = bad;
        bad.extend(verify_decoded(&src, m, &opts)?);
        Ok(VerifyReport {
            model_id: name.to_string(),
            bytes: total,
            chunks: m.files.iter().map(|f| f.checksums.len() as u64).sum(),
            bad,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// Writes the model back out as safetensors (sharded at `shard_bytes`)
    /// with its config and tokenizer files, through the load path.
    pub fn export(
        &self,
        name: &ModelName,
        to: &Path,
        shard_bytes: u64,
        opts: &LoadOptions,
    ) -> Result<Vec<PathBuf>> {
        let dir = self.existing(name)?;
        if to.exists()
            && fs::read_dir(to)
                .map(|mut d| d.next().is_some())
                .unwrap_or(true)
        {
            return Err(StoreError::invalid(to, "already exists and is not empty"));
        }
        let src = ModelSource::open(&dir)?;
        let m = src.manifest.clone().expect("flash format");
        let parent = to
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        fs::create_dir_all(parent).map_err(|e| StoreError::io(parent, e))?;
        remove_dead_exports(parent);
        let tmp = parent.join(format!(".flash-export-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).map_err(|e| StoreError::io(&tmp, e))?;
        let result = export_into(&src, &m, &tmp, shard_bytes, opts).and_then(|files| {
            for f in &m.extra_files {
                let (from, into) = (dir.join(f), tmp.join(f));
                fs::copy(&from, &into).map_err(|e| StoreError::io(&from, e))?;
            }
            if to.exists() {
                fs::remove_dir(to).map_err(|e| StoreError::io(to, e))?;
            }
            fs::rename(&tmp, to).map_err(|e| StoreError::io(to, e))?;
            Ok(files.into_iter().map(|f| to.join(f)).collect())
        });
        if result.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        result
    }
}

/// Decodes every chunk of the model's compressed tensors and compares its
/// decoded bytes with their checksum; returns the chunks that differ or do
/// not decode.
fn verify_decoded(src: &ModelSource, m: &Manifest, opts: &LoadOptions) -> Result<Vec<BadChunk>> {
    if !m.is_encoded() {
        return Ok(Vec::new());
    }
    let encodings: HashMap<&str, &manifest::TensorEncoding> = m
        .tensors
        .iter()
        .filter_map(|t| Some((t.name.as_str(), t.encoding.as_ref()?)))
        .collect();
    let plan = LoadPlan::new(src, Some(&|n: &str| encodings.contains_key(n)))?;
    let bad = Mutex::new(Vec::new());
    let sink = DecodedChunks::new(|c, decoded| {
        let t = &plan.encoded[c.tensor as usize];
        let want = &encodings[t.name.as_str()].chunks[c.index as usize].2;
        let why = match decoded {
            Ok(bytes) => {
                let got = manifest::checksum_hex(manifest::chunk_checksum(bytes));
                (&got != want)
                    .then(|| format!("decoded bytes have checksum {got}, the manifest says {want}"))
            }
            Err(e) => Some(e.to_string()),
        };
        if let Some(why) = why {
            bad.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(BadChunk {
                    file: m.files[t.file].name.clone(),
                    offset: c.file_offset,
                    len: c.stored_len,
                    tensors: vec![t.name.clone()],
                    encoded_chunk: Some(c.index),
                    why: Some(why),
                });
        }
        Ok(())
    });
    execute(&plan, &sink, opts)?;
    let mut bad = bad.into_inner().unwrap_or_else(|p| p.into_inner());
    bad.sort_by(|a, b| (&a.file, a.offset).cmp(&(&b.file, b.offset)));
    Ok(bad)
}

/// Removes `.flash-export-<pid>` folders of exports whose process died, so
/// an export killed half-way leaves nothing behind after the next one.
fn remove_dead_exports(parent: &Path) {
    let Ok(rd) = fs::read_dir(parent) else { return };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix(".flash-export-")
            .and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| !pid_alive(p)) {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// Names of the tensors (and their aliases) with bytes in `[offset, offset+len)`
/// of `file` whose own checksum no longer matches. Empty when only padding changed.
fn bad_tensors_in(
    m: &Manifest,
    path: &Path,
    file: u32,
    offset: u64,
    len: u64,
) -> Result<Vec<String>> {
    let f = File::open(path).map_err(|e| StoreError::io(path, e))?;
    let mut names = Vec::new();
    for t in &m.tensors {
        // Compressed tensors are checked chunk by chunk once decoded
        // (`verify_decoded`), which names the chunk.
        if t.file != file
            || t.length == 0
            || t.encoding.is_some()
            || t.offset >= offset + len
            || offset >= t.offset + t.length
        {
            continue;
        }
        let mut bytes = vec![0u8; t.length as usize];
        f.read_exact_at(&mut bytes, t.offset)
            .map_err(|e| StoreError::io(path, e))?;
        if manifest::checksum_hex(manifest::chunk_checksum(&bytes)) != t.checksum {
            names.push(t.name.clone());
            names.extend(
                m.aliases
                    .iter()
                    .filter(|(_, target)| **target == t.name)
                    .map(|(a, _)| a.clone()),
            );
        }
    }
    Ok(names)
}

fn export_into(
    src: &ModelSource,
    m: &Manifest,
    tmp: &Path,
    shard_bytes: u64,
    opts: &LoadOptions,
) -> Result<Vec<String>> {
    // Output tensors: stored ones in manifest order, then aliases.
    let mut outputs: Vec<(String, usize)> = m
        .tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect();
    let by_name: HashMap<&str, usize> = m
        .tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    for (alias, target) in &m.aliases {
        outputs.push((alias.clone(), by_name[target.as_str()]));
    }
    // Group into shards.
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut size = 0u64;
    for (k, (_, i)) in outputs.iter().enumerate() {
        let len = m.tensors[*i].length;
        if size > 0 && size + len > shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        size += len;
        shards.last_mut().expect("non-empty").push(k);
    }
    let n = shards.len();
    let names: Vec<String> = (0..n)
        .map(|s| {
            if n == 1 {
                "model.safetensors".to_string()
            } else {
                format!("model-{:05}-of-{n:05}.safetensors", s + 1)
            }
        })
        .collect();
    let mut metadata = m.metadata.clone();
    metadata
        .entry("format".into())
        .or_insert_with(|| "pt".into());
    // Where each stored tensor's bytes go: (shard, absolute offset).
    let mut targets: Vec<Vec<(usize, u64)>> = vec![Vec::new(); m.tensors.len()];
    let mut out_files = Vec::with_capacity(n);
    let mut weight_map = BTreeMap::new();
    let mut total_size = 0u64;
    for (s, members) in shards.iter().enumerate() {
        let specs: Vec<TensorSpec> = members
            .iter()
            .map(|&k| {
                let t = &m.tensors[outputs[k].1];
                TensorSpec {
                    name: outputs[k].0.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                }
            })
            .collect();
        let path = tmp.join(&names[s]);
        let (header, lens) = st::build_header(&specs, &metadata)
            .map_err(|e| StoreError::invalid(&path, e.to_string()))?;
        let data_start = 8 + header.len() as u64;
        let mut cursor = data_start;
        for (&k, len) in members.iter().zip(&lens) {
            targets[outputs[k].1].push((s, cursor));
            weight_map.insert(outputs[k].0.clone(), names[s].clone());
            cursor += len;
            total_size += len;
        }
        let f = File::create(&path).map_err(|e| StoreError::io(&path, e))?;
        f.write_all_at(&(header.len() as u64).to_le_bytes(), 0)
            .and_then(|_| f.write_all_at(&header, 8))
            .and_then(|_| f.set_len(cursor))
            .map_err(|e| StoreError::io(&path, e))?;
        out_files.push((path, f));
    }
    // Verbatim tensors of each data file, by offset, to map reads to
    // tensors; compressed ones are decoded below.
    let mut per_file: Vec<Vec<usize>> = vec![Vec::new(); m.files.len()];
    for (i, t) in m.tensors.iter().enumerate() {
        if t.length > 0 && t.encoding.is_none() {
            per_file[t.file as usize].push(i);
        }
    }
    for list in &mut per_file {
        list.sort_by_key(|&i| m.tensors[i].offset);
    }
    // Only the verbatim tensors' bytes are scanned.
    let verbatim: std::collections::HashSet<&str> = m
        .tensors
        .iter()
        .filter(|t| t.encoding.is_none())
        .map(|t| t.name.as_str())
        .collect();
    let plan = if m.is_encoded() {
        LoadPlan::new(src, Some(&|n: &str| verbatim.contains(n)))?
    } else {
        LoadPlan::whole_files(&src.files)
    };
    let sink = ScanSink::new(opts.chunk_bytes, |job, bytes| {
        let (lo, hi) = (job.file_offset, job.file_offset + bytes.len() as u64);
        let list = &per_file[job.file];
        let first = list.partition_point(|&i| m.tensors[i].offset + m.tensors[i].length <= lo);
        for &i in &list[first..] {
            let t = &m.tensors[i];
            if t.offset >= hi {
                break;
            }
            let a = t.offset.max(lo);
            let b = (t.offset + t.length).min(hi);
            let piece = &bytes[(a - lo) as usize..(b - lo) as usize];
            for &(s, base) in &targets[i] {
                let (path, f) = &out_files[s];
                f.write_all_at(piece, base + (a - t.offset))
                    .map_err(|e| flash_load::LoadError::io(path, e))?;
            }
        }
        Ok(())
    });
    execute(&plan, &sink, opts)?;
    if m.is_encoded() {
        let by_name: HashMap<&str, usize> = m
            .tensors
            .iter()
            .enumerate()
            .filter(|(_, t)| t.encoding.is_some())
            .map(|(i, t)| (t.name.as_str(), i))
            .collect();
        let plan = LoadPlan::new(src, Some(&|n: &str| by_name.contains_key(n)))?;
        let sink = DecodedChunks::new(|c, decoded| {
            let bytes = decoded?;
            let t = &plan.encoded[c.tensor as usize];
            let within = c.dest_offset - t.dest_offset;
            for &(s, base) in &targets[by_name[t.name.as_str()]] {
                let (path, f) = &out_files[s];
                f.write_all_at(bytes, base + within)
                    .map_err(|e| flash_load::LoadError::io(path, e))?;
            }
            Ok(())
        });
        execute(&plan, &sink, opts)?;
    }
    for (path, f) in &out_files {
        f.sync_all().map_err(|e| StoreError::io(path, e))?;
    }
    if n > 1 {
        let index = st::ShardIndex {
            metadata: Some(serde_json::json!({ "total_size": total_size })),
            weight_map,
        };
        let p = tmp.join(INDEX_FILE);
        fs::write(&p, serde_json::to_vec_pretty(&index).expect("plain data"))
            .map_err(|e| StoreError::io(&p, e))?;
    }
    Ok(names)
}

fn read_config(dir: &Path) -> Option<serde_json::Value> {
    let text = fs::read_to_string(dir.join("config.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// Copies the model's non-weight files (config, tokenizer, templates...)
/// from the top level of `src` to `dst`; returns their names. With a dtype
/// conversion, `torch_dtype` in config.json follows it.
fn copy_extra_files(src: &Path, dst: &Path, dtype: DtypeChoice) -> Result<Vec<String>> {
    let mut names = Vec::new();
    let rd = fs::read_dir(src).map_err(|e| StoreError::io(src, e))?;
    for e in rd {
        let e = e.map_err(|e| StoreError::io(src, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        let skip = name.starts_with('.')
            || name.ends_with(".safetensors")
            || name == INDEX_FILE
            || name == MANIFEST_FILE
            || FOREIGN_WEIGHTS.iter().any(|ext| name.ends_with(ext))
            || !manifest::is_plain_file_name(&name)
            || !path.is_file(); // follows symlinks: Hub snapshots are links to blobs
        if skip {
            continue;
        }
        let to = dst.join(&name);
        if name == "config.json" {
            if let Some(torch) = dtype.torch_name() {
                let text = fs::read_to_string(&path).map_err(|e| StoreError::io(&path, e))?;
                let mut v: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| StoreError::invalid(&path, format!("not valid JSON: {e}")))?;
                if let Some(obj) = v.as_object_mut() {
                    obj.insert("torch_dtype".into(), torch.into());
                    if obj.contains_key("dtype") {
                        obj.insert("dtype".into(), torch.into());
                    }
                }
                fs::write(&to, serde_json::to_vec_pretty(&v).expect("json"))
                    .map_err(|e| StoreError::io(&to, e))?;
                names.push(name);
                continue;
            }
        }
        fs::copy(&path, &to).map_err(|e| StoreError::io(&path, e))?;
        names.push(name);
    }
    names.sort();
    Ok(names)
}
