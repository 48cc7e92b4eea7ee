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
use crate::tp;
use flash_format::manifest::{
    self, ChecksumSpec, Manifest, Source, ALIGNMENT, CHECKSUM_ALGORITHM, FORMAT_NAME,
    MANIFEST_FILE, PLAIN_FORMAT_VERSION,
};
use flash_format::safetensors::{self as st, TensorSpec, INDEX_FILE};
use flash_format::writer::{concat_ranks, DataWriter};
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
    /// Stored tensors of one rank (each rank holds the same names).
    pub tensors: usize,
    pub aliases: usize,
    /// Tensor-parallel ranks stored (1: the model whole).
    pub ranks: u32,
    /// Bytes of the data files (all ranks).
    pub bytes: u64,
    /// Bytes of the tensors, decoded (all ranks: replicated tensors count
    /// once per rank).
    pub tensor_bytes: u64,
    pub compressed: bool,
    pub seconds: f64,
}

/// What `flash info` and `flash list` show.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    pub model_id: String,
    /// Bytes of the tensors (decoded): what a load puts in memory (all
    /// ranks together for a model split into tensor-parallel ranks).
    pub size: u64,
    /// Bytes of the data files: what the model takes on disk (less than
    /// `size` when compressed).
    pub stored_bytes: u64,
    /// Whether some tensors are stored compressed.
    pub compressed: bool,
    pub dtype: Option<DType>,
    pub architecture: Option<String>,
    /// Tensor names a load sees, aliases included (per rank).
    pub tensor_count: usize,
    /// Tensor-parallel ranks: 1 for a model stored whole; else a load or an
    /// export names the rank it wants (`ModelSource::open_rank`).
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
    /// Whether imports store floating-point tensors compressed unless told
    /// otherwise: set with `flash config compress on|off`; `None` (auto, the
    /// default) decides per machine, see [`StoreSettings::compress_imports`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compress: Option<bool>,
}

impl StoreSettings {
    /// Whether an import compresses when its caller does not say: the
    /// setting, else (auto) whether this machine has an NVIDIA GPU.
    ///
    /// Why auto means "where there is a GPU" (measured on an H200 machine,
    /// bench/results): there a compressed Qwen3-8B-shaped model stores in
    /// 0.66 of the bytes, imports faster (26-32 s against 30-38 s: fewer
    /// bytes written), loads cold to the GPU in 0.67-0.72x fastsafetensors'
    /// time where the plain format takes 1.0-1.27x, and goes from the
    /// daemon's memory tier to the GPU in 0.26-0.29 s against 0.30 s while
    /// the tier holds 1.5x as many models; the GPU decodes at 445-526 GB/s.
    /// Without a GPU every load decodes on the CPU (about 1.1 GB/s per core)
    /// where a plain load copies or maps bytes, and a host-memory client of
    /// the daemon gets a decoded copy instead of sharing the tier's pages.
    pub fn compress_imports(&self) -> bool {
        self.compress.unwrap_or_else(nvidia_gpu_present)
    }
}

/// Whether this machine has an NVIDIA GPU: a `/dev/nvidiaN` device node,
/// which the driver creates for each GPU (no driver library is loaded).
pub fn nvidia_gpu_present() -> bool {
    fs::read_dir("/dev").is_ok_and(|rd| {
        rd.flatten().any(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("nvidia"))
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
    })
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
    /// config and tokenizer files) as model `name`, whole: `import_tp` with
    /// one rank.
    pub fn import(
        &self,
        src_dir: &Path,
        name: &ModelName,
        opts: &ImportOptions,
    ) -> Result<ImportReport> {
        self.import_tp(src_dir, name, opts, 1)
    }

    /// Imports a Hugging Face style folder as model `name` split into `tp`
    /// tensor-parallel ranks (1: whole), each rank's tensors in its own data
    /// files, split as [`crate::tp`] says. A model that cannot be split so
    /// is refused ([`StoreError::Split`]) before anything is written.
    /// Compression applies to each rank's tensors as to a whole model's.
    pub fn import_tp(
        &self,
        src_dir: &Path,
        name: &ModelName,
        opts: &ImportOptions,
        tp: u32,
    ) -> Result<ImportReport> {
        let start = Instant::now();
        if tp == 0 {
            return Err(StoreError::Split {
                model: name.to_string(),
                tp,
                why: "the tensor-parallel size must be at least 1".into(),
            });
        }
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
        let split = SplitPlan::new(&src, read_config(src_dir).as_ref(), tp).map_err(|why| {
            StoreError::Split {
                model: name.to_string(),
                tp,
                why,
            }
        })?;
        let tmp = self.tmp_dir("import")?;
        let result = self
            .write_model(&src, &tmp, name, opts, &split)
            .and_then(|m| {
                let dest = self.install(&tmp, name, opts.force)?;
                Ok((m, dest))
            });
        match result {
            Ok((m, path)) => Ok(ImportReport {
                model_id: name.to_string(),
                path,
                tensors: m.tensors.len() / m.ranks() as usize,
                aliases: m.aliases.len(),
                ranks: m.ranks(),
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
        split: &SplitPlan,
    ) -> Result<Manifest> {
        let chunk = manifest::DEFAULT_CHECKSUM_CHUNK;
        let tp = split.tp;
        let mut writers: Vec<DataWriter> = if tp == 1 {
            vec![DataWriter::new(tmp, chunk, MAX_DATA_FILE)]
        } else {
            (0..tp)
                .map(|r| DataWriter::for_rank(tmp, chunk, MAX_DATA_FILE, r))
                .collect()
        };
        let files: Vec<File> = src
            .files
            .iter()
            .map(|f| File::open(&f.path).map_err(|e| StoreError::io(&f.path, e)))
            .collect::<Result<_>>()?;
        // What is read: the stored tensors in file order, then the source's
        // aliases that cannot stay aliases (split unlike their target).
        let mut order: Vec<usize> = (0..src.tensors.len()).collect();
        order.sort_by_key(|&i| (src.tensors[i].file, src.tensors[i].offset));
        let mut items: Vec<(&str, usize, Option<u32>)> = order
            .iter()
            .map(|&i| (src.tensors[i].name.as_str(), i, split.dims[i]))
            .collect();
        items.extend(
            split
                .read_aliases
                .iter()
                .map(|(a, i, d)| (a.as_str(), *i, *d)),
        );
        let total = items.iter().map(|&(_, i, _)| src.tensors[i].length).sum();
        let mut done = 0u64;
        // Identical tensors (same dtype, shape, split and bytes) are stored
        // once: their parts are then identical in every rank too.
        let mut seen: HashMap<(DType, Vec<u64>, Option<u32>, u128), String> = HashMap::new();
        let mut aliases = BTreeMap::new();
        let mut dtype_bytes: BTreeMap<DType, u64> = BTreeMap::new();
        let mut split_dims: HashMap<String, Option<u32>> = HashMap::new();
        // A reader thread reads tensors in file order while this thread
        // converts, hashes, splits and writes the previous ones, so the
        // source disk and the store's disk work at the same time. At most two
        // tensors wait in the channel (memory: three tensors, not the model).
        std::thread::scope(|scope| -> Result<()> {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Result<(usize, Vec<u8>)>>(1);
            let (items, files) = (&items, &files);
            scope.spawn(move || {
                for (k, &(_, i, _)) in items.iter().enumerate() {
                    let t = &src.tensors[i];
                    // A compressed flash folder as the source is decoded.
                    let read = flash_load::decode::read_tensor(src, &files[t.file], t)
                        .map(|bytes| (k, bytes))
                        .map_err(StoreError::from);
                    let failed = read.is_err();
                    // A send fails when the writer gave up: stop reading.
                    if tx.send(read).is_err() || failed {
                        return;
                    }
                }
            });
            for received in rx {
                let (k, bytes) = received?;
                let (name, i, dim) = items[k];
                let t = &src.tensors[i];
                let dtype = opts.dtype.target(t.dtype);
                let bytes = convert(t.dtype, dtype, bytes);
                done += t.length;
                if let Some(p) = opts.progress {
                    p(done, total);
                }
                if !bytes.is_empty() {
                    let key = (
                        dtype,
                        t.shape.clone(),
                        dim,
                        xxhash_rust::xxh3::xxh3_128(&bytes),
                    );
                    if let Some(first) = seen.get(&key) {
                        aliases.insert(name.to_string(), first.clone());
                        continue;
                    }
                    seen.insert(key, name.to_string());
                }
                *dtype_bytes.entry(dtype).or_default() += bytes.len() as u64;
                split_dims.insert(name.to_string(), dim);
                match dim {
                    None => {
                        for w in &mut writers {
                            encode::write_tensor(w, name, dtype, &t.shape, &bytes, opts.compress)?;
                        }
                    }
                    Some(d) => {
                        let shape = tp::shard_shape(&t.shape, d, tp);
                        let parts = tp::split(&bytes, dtype, &t.shape, d, tp);
                        drop(bytes);
                        for (w, part) in writers.iter_mut().zip(&parts) {
                            encode::write_tensor(w, name, dtype, &shape, part, opts.compress)?;
                        }
                    }
                }
            }
            Ok(())
        })?;
        // A flash-format source's own aliases (tied weights stored once
        // there) stay aliases, of whatever now holds their target's bytes.
        for (alias, target) in &split.kept_aliases {
            let to = aliases
                .get(target)
                .cloned()
                .unwrap_or_else(|| target.clone());
            aliases.insert(alias.clone(), to);
        }
        let parts = writers
            .into_iter()
            .map(DataWriter::finish)
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let (data_files, mut tensors) = concat_ranks(parts);
        if tp > 1 {
            for t in &mut tensors {
                t.split_dim = split_dims.get(&t.name).copied().flatten();
            }
        }
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
    /// bytes compared with their checksum. A model of several
    /// tensor-parallel ranks is checked rank by rank (a bad chunk's file
    /// tells the rank).
    pub fn verify(
        &self,
        name: &ModelName,
        opts: &LoadOptions,
        progress: Option<Progress>,
    ) -> Result<VerifyReport> {
        let start = Instant::now();
        let dir = self.existing(name)?;
        let full = Manifest::read(&dir)?;
        let total = full.data_bytes();
        let done = std::sync::atomic::AtomicU64::new(0);
        let mut bad = Vec::new();
        for rank in 0..full.ranks() {
            let src = ModelSource::open_rank(&dir, rank)?;
            bad.extend(verify_rank(&src, opts, progress, &done, total)?);
        }
        Ok(VerifyReport {
            model_id: name.to_string(),
            bytes: total,
            chunks: full.files.iter().map(|f| f.checksums.len() as u64).sum(),
            bad,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// Writes the model back out as safetensors (sharded at `shard_bytes`,
    /// tensors in name order) with its config and tokenizer files, through
    /// the load path. A model of several tensor-parallel ranks is gathered
    /// back whole: each split tensor is its ranks' parts put together along
    /// its `split_dim` (each part checked against its checksum first), so an
    /// import split into ranks exports byte for byte the files of the same
    /// checkpoint imported whole.
    pub fn export(
        &self,
        name: &ModelName,
        to: &Path,
        shard_bytes: u64,
        opts: &LoadOptions,
    ) -> Result<Vec<PathBuf>> {
        self.export_with(name, to, |dir, tmp| {
            let full = Manifest::read(dir)?;
            if full.ranks() > 1 {
                return export_gathered(dir, &full, tmp, shard_bytes);
            }
            let src = ModelSource::open(dir)?;
            let m = src.manifest.clone().expect("flash format");
            export_into(&src, &m, tmp, shard_bytes, opts)
        })
    }

    /// Writes rank `rank` of the model out as safetensors: that rank's
    /// tensors under their own names with the part's shape (what one GPU of
    /// a tensor-parallel run loads), with the config and tokenizer files.
    /// Rank 0 of a model stored whole is the whole model.
    pub fn export_rank(
        &self,
        name: &ModelName,
        rank: u32,
        to: &Path,
        shard_bytes: u64,
        opts: &LoadOptions,
    ) -> Result<Vec<PathBuf>> {
        self.export_with(name, to, |dir, tmp| {
            let src = ModelSource::open_rank(dir, rank)?;
            let m = src.manifest.clone().expect("flash format");
            export_into(&src, &m, tmp, shard_bytes, opts)
        })
    }

    /// An export into `to` (absent or empty): `write` fills a temporary
    /// folder beside it with the weights (returning their file names), the
    /// model's other files are copied, and the folder is renamed into place.
    fn export_with(
        &self,
        name: &ModelName,
        to: &Path,
        write: impl FnOnce(&Path, &Path) -> Result<Vec<String>>,
    ) -> Result<Vec<PathBuf>> {
        let dir = self.existing(name)?;
        if to.exists()
            && fs::read_dir(to)
                .map(|mut d| d.next().is_some())
                .unwrap_or(true)
        {
            return Err(StoreError::invalid(to, "already exists and is not empty"));
        }
        let m = Manifest::read(&dir)?;
        let parent = to
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        fs::create_dir_all(parent).map_err(|e| StoreError::io(parent, e))?;
        remove_dead_exports(parent);
        let tmp = parent.join(format!(".flash-export-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).map_err(|e| StoreError::io(&tmp, e))?;
        let result = write(&dir, &tmp).and_then(|files| {
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

/// Checks the data files of one rank (`src`, opened with
/// `ModelSource::open_rank`; its manifest is the rank's view): every
/// checksum chunk, and every compressed chunk decoded. `done` counts the
/// bytes checked over all ranks, of `total`.
fn verify_rank(
    src: &ModelSource,
    opts: &LoadOptions,
    progress: Option<Progress>,
    done: &std::sync::atomic::AtomicU64,
    total: u64,
) -> Result<Vec<BadChunk>> {
    let m = src
        .manifest
        .as_ref()
        .expect("the store holds the flash format");
    let chunk = m.checksum.chunk_size;
    let plan = LoadPlan::whole_files(&src.files);
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
    let mut bad = bad
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
    bad.extend(verify_decoded(src, m, &opts)?);
    Ok(bad)
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

/// The safetensors files of an export, created with their headers and
/// their full length, waiting for the tensors' bytes.
struct ExportFiles {
    /// File names, in order.
    names: Vec<String>,
    files: Vec<(PathBuf, File)>,
    /// Where each stored tensor's bytes go: `(file, absolute offset)`, one
    /// entry for the tensor and one for each of its aliases.
    targets: Vec<Vec<(usize, u64)>>,
    weight_map: BTreeMap<String, String>,
    total_size: u64,
}

impl ExportFiles {
    /// Lays out the tensors of `m` and its aliases (`shapes[i]` the shape
    /// stored tensor `i` is exported with), in name order, into files of at
    /// most `shard_bytes` each. Name order makes the files depend on the
    /// tensors alone, not on how the store holds them (which copies are
    /// aliases, ranks, compression): a model exports the same files however
    /// it was imported.
    fn create(m: &Manifest, shapes: &[Vec<u64>], tmp: &Path, shard_bytes: u64) -> Result<Self> {
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
        outputs.sort();
        let length = |i: usize| m.tensors[i].dtype.byte_len(&shapes[i]).unwrap_or(0);
        // Group into shards.
        let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
        let mut size = 0u64;
        for (k, &(_, i)) in outputs.iter().enumerate() {
            let len = length(i);
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
        let mut targets: Vec<Vec<(usize, u64)>> = vec![Vec::new(); m.tensors.len()];
        let mut files = Vec::with_capacity(n);
        let mut weight_map = BTreeMap::new();
        let mut total_size = 0u64;
        for (s, members) in shards.iter().enumerate() {
            let specs: Vec<TensorSpec> = members
                .iter()
                .map(|&k| {
                    let i = outputs[k].1;
                    TensorSpec {
                        name: outputs[k].0.clone(),
                        dtype: m.tensors[i].dtype,
                        shape: shapes[i].clone(),
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
            files.push((path, f));
        }
        Ok(ExportFiles {
            names,
            files,
            targets,
            weight_map,
            total_size,
        })
    }

    /// Writes `bytes` at `within` bytes into stored tensor `i`, wherever
    /// its name and its aliases go.
    fn write(&self, i: usize, within: u64, bytes: &[u8]) -> Result<(), flash_load::LoadError> {
        for &(s, base) in &self.targets[i] {
            let (path, f) = &self.files[s];
            f.write_all_at(bytes, base + within)
                .map_err(|e| flash_load::LoadError::io(path, e))?;
        }
        Ok(())
    }

    /// Syncs the files and writes the index of a sharded export; returns
    /// the file names.
    fn finish(self, tmp: &Path) -> Result<Vec<String>> {
        for (path, f) in &self.files {
            f.sync_all().map_err(|e| StoreError::io(path, e))?;
        }
        if self.names.len() > 1 {
            let index = st::ShardIndex {
                metadata: Some(serde_json::json!({ "total_size": self.total_size })),
                weight_map: self.weight_map,
            };
            let p = tmp.join(INDEX_FILE);
            fs::write(&p, serde_json::to_vec_pretty(&index).expect("plain data"))
                .map_err(|e| StoreError::io(&p, e))?;
        }
        Ok(self.names)
    }
}

/// Exports a model of several tensor-parallel ranks (`full`, in `dir`)
/// whole into `tmp`: tensors and aliases as rank 0 names them, each split
/// tensor gathered from its parts along its `split_dim`, replicated ones
/// from rank 0. Each part is checked against its checksum, so a corrupt
/// rank is named rather than exported. One tensor at a time is gathered in
/// memory while a reader thread reads the next.
fn export_gathered(
    dir: &Path,
    full: &Manifest,
    tmp: &Path,
    shard_bytes: u64,
) -> Result<Vec<String>> {
    let ranks = full.ranks();
    let sources = (0..ranks)
        .map(|r| ModelSource::open_rank(dir, r))
        .collect::<Result<Vec<_>, _>>()?;
    let views: Vec<&Manifest> = sources
        .iter()
        .map(|s| {
            s.manifest
                .as_ref()
                .expect("the store holds the flash format")
        })
        .collect();
    let m0 = views[0];
    // The rank views drop split_dim; the full manifest has it.
    let split: HashMap<&str, Option<u32>> = full
        .tensors
        .iter()
        .filter(|t| full.rank_of(t) == 0)
        .map(|t| (t.name.as_str(), t.split_dim))
        .collect();
    let dims: Vec<Option<u32>> = m0
        .tensors
        .iter()
        .map(|t| split.get(t.name.as_str()).copied().flatten())
        .collect();
    let shapes: Vec<Vec<u64>> = m0
        .tensors
        .iter()
        .zip(&dims)
        .map(|(t, d)| match *d {
            Some(d) => tp::whole_shape(&t.shape, d, ranks),
            None => t.shape.clone(),
        })
        .collect();
    let out = ExportFiles::create(m0, &shapes, tmp, shard_bytes)?;
    let index: Vec<HashMap<&str, usize>> = sources
        .iter()
        .map(|s| {
            s.tensors
                .iter()
                .enumerate()
                .map(|(i, t)| (t.name.as_str(), i))
                .collect()
        })
        .collect();
    let files: Vec<Vec<File>> = sources
        .iter()
        .map(|s| {
            s.files
                .iter()
                .map(|f| File::open(&f.path).map_err(|e| StoreError::io(&f.path, e)))
                .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<_>>()?;
    // Rank `r`'s part of the tensor named `name`, checked.
    let part = |r: usize, name: &str| -> Result<Vec<u8>> {
        let src = &sources[r];
        let j = *index[r].get(name).ok_or_else(|| {
            StoreError::invalid(dir, format!("rank {r} holds no tensor {name:?}"))
        })?;
        let t = &src.tensors[j];
        let bytes = flash_load::decode::read_tensor(src, &files[r][t.file], t)?;
        let want = &views[r].tensors[j].checksum;
        let got = manifest::checksum_hex(manifest::chunk_checksum(&bytes));
        if &got != want {
            return Err(StoreError::invalid(
                &src.files[t.file].path,
                format!(
                    "rank {r}'s part of tensor {name:?} has checksum {got}, the manifest says \
                     {want} (see `flash verify`)"
                ),
            ));
        }
        Ok(bytes)
    };
    let mut order: Vec<usize> = (0..m0.tensors.len()).collect();
    order.sort_by_key(|&i| (m0.tensors[i].file, m0.tensors[i].offset));
    std::thread::scope(|scope| -> Result<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<(usize, Vec<u8>)>>(1);
        let (order, dims, part) = (&order, &dims, &part);
        scope.spawn(move || {
            for &i in order {
                let t = &m0.tensors[i];
                let whole = match dims[i] {
                    None => part(0, &t.name),
                    Some(d) => (0..ranks as usize)
                        .map(|r| part(r, &t.name))
                        .collect::<Result<Vec<_>>>()
                        .map(|parts| tp::gather(&parts, t.dtype, &t.shape, d)),
                };
                let failed = whole.is_err();
                if tx.send(whole.map(|b| (i, b))).is_err() || failed {
                    return;
                }
            }
        });
        for received in rx {
            let (i, bytes) = received?;
            out.write(i, 0, &bytes)?;
        }
        Ok(())
    })?;
    out.finish(tmp)
}

/// Exports the model of one rank `src` (its manifest `m`) into `tmp`.
fn export_into(
    src: &ModelSource,
    m: &Manifest,
    tmp: &Path,
    shard_bytes: u64,
    opts: &LoadOptions,
) -> Result<Vec<String>> {
    let shapes: Vec<Vec<u64>> = m.tensors.iter().map(|t| t.shape.clone()).collect();
    let out = ExportFiles::create(m, &shapes, tmp, shard_bytes)?;
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
            out.write(i, a - t.offset, piece)?;
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
            out.write(by_name[t.name.as_str()], within, bytes)
        });
        execute(&plan, &sink, opts)?;
    }
    out.finish(tmp)
}

/// How an import splits the source's tensors into ranks, decided from
/// names, shapes and config.json alone, before anything is read or written.
struct SplitPlan {
    tp: u32,
    /// The split dimension of each of the source's stored tensors.
    dims: Vec<Option<u32>>,
    /// Source aliases that stay aliases: split as their target is.
    kept_aliases: Vec<(String, String)>,
    /// Source aliases split unlike their target (a tied copy whose name
    /// calls for another split): read and stored as tensors of their own,
    /// `(name, index of the target's bytes, split)`.
    read_aliases: Vec<(String, usize, Option<u32>)>,
}

impl SplitPlan {
    /// The plan for `tp` ranks, or why the model cannot be split so (the
    /// first tensor that cannot, named).
    fn new(src: &ModelSource, config: Option<&serde_json::Value>, tp: u32) -> Result<Self, String> {
        let heads = config.and_then(tp::Heads::from_config);
        let dim = |name: &str, t: &flash_load::StoredTensor| {
            tp::split_dim(name, t.dtype, &t.shape, tp, heads)
        };
        let dims = src
            .tensors
            .iter()
            .map(|t| dim(&t.name, t))
            .collect::<Result<Vec<_>, _>>()?;
        let by_name: HashMap<&str, usize> = src
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.as_str(), i))
            .collect();
        let mut kept_aliases = Vec::new();
        let mut read_aliases = Vec::new();
        for (alias, target) in &src.aliases {
            // `ModelSource` checked that every alias has its target.
            let Some(&i) = by_name.get(target.as_str()) else {
                return Err(format!("alias {alias:?} points to missing {target:?}"));
            };
            let d = dim(alias, &src.tensors[i])?;
            if d == dims[i] {
                kept_aliases.push((alias.clone(), target.clone()));
            } else {
                read_aliases.push((alias.clone(), i, d));
            }
        }
        Ok(SplitPlan {
            tp,
            dims,
            kept_aliases,
            read_aliases,
        })
    }
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
