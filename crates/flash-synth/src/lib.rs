//! Synthetic Hugging Face checkpoints with the real shapes of Qwen3 and Llama 3.
//!
//! [`synth`] writes a folder that loads like a Hugging Face download:
//! `config.json`, `generation_config.json`, safetensors shards of at most
//! [`SynthOptions::max_shard_bytes`] (with `model.safetensors.index.json`
//! when there are several; a single `model.safetensors` otherwise), a small
//! byte-level BPE `tokenizer.json` and a `tokenizer_config.json` with the
//! family's chat template.
//!
//! Weights are random (normal, std `initializer_range`; norm weights are
//! ones) and depend only on `(seed, tensor name)`: the same seed gives the
//! same bytes whatever the thread count. See [`random`] for the generator.
//!
//! ```no_run
//! use flash_synth::{spec, synth, Arch, SynthOptions};
//! let model = spec(Arch::Qwen3, "8b")?;
//! let report = synth(&model, "/tmp/qwen3-8b".as_ref(), &SynthOptions::default())?;
//! println!("{} files, {} bytes", report.files.len(), report.total_bytes);
//! # Ok::<(), flash_synth::SynthError>(())
//! ```

pub mod random;
mod spec;
pub mod tokenizer;
mod write;

pub use spec::{presets, spec, Arch, Init, ModelSpec, RopeScaling, SynthTensor};
pub use write::{plan_shards, tensor_data, Shard};

use flash_format::safetensors::{ShardIndex, INDEX_FILE};
use flash_format::DType;
use serde_json::{json, Value};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Hugging Face's default `max_shard_size` ("5GB").
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// A progress callback: `(tensor bytes written so far, total tensor bytes)`.
/// Called from the writing thread after every 8 MiB chunk.
pub type ProgressFn = dyn Fn(u64, u64) + Send + Sync;

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("unknown architecture {name:?}; expected qwen3 or llama")]
    UnknownArch { name: String },
    #[error("unknown {arch} size {size:?}; valid sizes: {valid}")]
    UnknownSize {
        arch: Arch,
        size: String,
        valid: String,
    },
    #[error("invalid model {model}: {why}")]
    InvalidSpec { model: String, why: String },
    #[error("synth writes BF16, F16 or F32, not {0}")]
    UnsupportedDType(DType),
    #[error("max_shard_bytes must be at least 1")]
    ZeroShardSize,
    #[error("{}: already exists and is not an empty folder; refusing to overwrite it", path.display())]
    OutExists { path: PathBuf },
    #[error("{}: not a usable output folder path", path.display())]
    BadOut { path: PathBuf },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Format(#[from] flash_format::safetensors::Error),
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SynthError + '_ {
    move |source| SynthError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How to write a checkpoint.
#[derive(Clone)]
pub struct SynthOptions {
    /// Seed of every random value. Same seed, same bytes.
    pub seed: u64,
    /// Element type of the weights: BF16 (default), F16 or F32.
    pub dtype: DType,
    /// Largest tensor data per shard, in bytes (default 5 GB, as
    /// `save_pretrained`). A tensor larger than this gets a shard of its own.
    pub max_shard_bytes: u64,
    /// Called as data is written; see [`ProgressFn`].
    pub progress: Option<Arc<ProgressFn>>,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions {
            seed: 0,
            dtype: DType::BF16,
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
            progress: None,
        }
    }
}

impl fmt::Debug for SynthOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SynthOptions")
            .field("seed", &self.seed)
            .field("dtype", &self.dtype)
            .field("max_shard_bytes", &self.max_shard_bytes)
            .field("progress", &self.progress.as_ref().map(|_| "Fn"))
            .finish()
    }
}

/// What [`synth`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthReport {
    /// The model folder (`out`).
    pub dir: PathBuf,
    /// Every file written, as paths inside `dir`: the shards in order, the
    /// index (if sharded), then the JSON files.
    pub files: Vec<PathBuf>,
    /// Size of all files together.
    pub total_bytes: u64,
    /// Bytes of tensor data (the index's `total_size`).
    pub data_bytes: u64,
    /// Number of tensors.
    pub tensors: usize,
    /// Number of parameters (a tied embedding counts once).
    pub params: u64,
    /// Wall time of the whole write, fsyncs included.
    pub elapsed: Duration,
}

/// Removes a temporary folder on drop unless it was kept.
struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            if let Err(e) = fs::remove_dir_all(&self.path) {
                tracing::warn!(path = %self.path.display(), error = %e, "could not remove the temporary folder");
            }
        }
    }
}

fn temp_dir_beside(out: &Path) -> Result<TempDir, SynthError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let bad = || SynthError::BadOut {
        path: out.to_path_buf(),
    };
    let name = out.file_name().ok_or_else(bad)?.to_string_lossy();
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs::create_dir_all(parent).map_err(io_err(parent))?;
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = parent.join(format!(".{name}.synth-{}-{n}", std::process::id()));
        match fs::create_dir(&path) {
            Ok(()) => return Ok(TempDir { path, keep: false }),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err(&path)(e)),
        }
    }
}

/// `Ok(true)` when `out` is an existing empty folder, `Ok(false)` when it
/// does not exist, an error otherwise.
fn check_out(out: &Path) -> Result<bool, SynthError> {
    match fs::symlink_metadata(out) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err(out)(e)),
        Ok(m) if m.is_dir() => {
            let mut entries = fs::read_dir(out).map_err(io_err(out))?;
            if entries.next().is_some() {
                Err(SynthError::OutExists {
                    path: out.to_path_buf(),
                })
            } else {
                Ok(true)
            }
        }
        Ok(_) => Err(SynthError::OutExists {
            path: out.to_path_buf(),
        }),
    }
}

fn write_json(path: &Path, value: &Value) -> Result<(), SynthError> {
    let mut text = serde_json::to_string_pretty(value).expect("JSON values serialize");
    text.push('\n');
    let mut f = File::create(path).map_err(io_err(path))?;
    f.write_all(text.as_bytes()).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> Result<(), SynthError> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err(dir))
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> Result<(), SynthError> {
    Ok(())
}

/// Writes the checkpoint of `spec` into the folder `out`.
///
/// Everything is written into a hidden temporary folder beside `out`
/// (`.NAME.synth-PID-N`), fsynced, and renamed to `out` at the end: a crash
/// or an error leaves no partial model at `out` (an error also removes the
/// temporary folder). `out` must not exist or be an empty folder; its
/// parent is created if needed.
pub fn synth(spec: &ModelSpec, out: &Path, opts: &SynthOptions) -> Result<SynthReport, SynthError> {
    let start = Instant::now();
    spec.validate()?;
    random::check_dtype(opts.dtype)?;
    if opts.max_shard_bytes == 0 {
        return Err(SynthError::ZeroShardSize);
    }
    let out_is_empty_dir = check_out(out)?;
    let tensors = spec.tensors(opts.dtype);
    let shards = plan_shards(&tensors, opts.max_shard_bytes);
    let data_bytes: u64 = shards.iter().map(|s| s.data_bytes).sum();
    let params = spec.param_count();
    tracing::info!(
        model = %spec.name(),
        dtype = %opts.dtype,
        seed = opts.seed,
        params,
        data_bytes,
        shards = shards.len(),
        out = %out.display(),
        "writing a synthetic checkpoint"
    );

    let mut tmp = temp_dir_beside(out)?;
    write::write_shards(&write::WriteJob {
        dir: &tmp.path,
        tensors: &tensors,
        shards: &shards,
        seed: opts.seed,
        progress: opts.progress.as_deref(),
        direct_io: true,
    })?;

    let mut files: Vec<String> = shards.iter().map(|s| s.file.clone()).collect();
    if shards.len() > 1 {
        let weight_map = shards
            .iter()
            .flat_map(|s| {
                s.tensors
                    .iter()
                    .map(|&t| (tensors[t].spec.name.clone(), s.file.clone()))
            })
            .collect();
        let index = ShardIndex {
            metadata: Some(json!({"total_parameters": params, "total_size": data_bytes})),
            weight_map,
        };
        let value = serde_json::to_value(&index).expect("the index serializes");
        write_json(&tmp.path.join(INDEX_FILE), &value)?;
        files.push(INDEX_FILE.to_string());
    }
    let jsons = [
        ("config.json", spec.config_json(opts.dtype)),
        ("generation_config.json", spec.generation_config_json()),
        (
            "tokenizer.json",
            tokenizer::tokenizer_json(spec.arch, spec.shape.vocab_size as u64),
        ),
        (
            "tokenizer_config.json",
            tokenizer::tokenizer_config_json(spec.arch, spec.max_position_embeddings),
        ),
    ];
    for (name, value) in &jsons {
        write_json(&tmp.path.join(name), value)?;
        files.push(name.to_string());
    }
    let mut total_bytes = 0;
    for f in &files {
        let p = tmp.path.join(f);
        total_bytes += fs::metadata(&p).map_err(io_err(&p))?.len();
    }
    sync_dir(&tmp.path)?;

    if out_is_empty_dir {
        fs::remove_dir(out).map_err(io_err(out))?;
    }
    fs::rename(&tmp.path, out).map_err(io_err(out))?;
    tmp.keep = true;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        sync_dir(parent)?;
    }

    let elapsed = start.elapsed();
    tracing::info!(
        model = %spec.name(),
        out = %out.display(),
        total_bytes,
        seconds = elapsed.as_secs_f64(),
        mb_per_s = total_bytes as f64 / 1e6 / elapsed.as_secs_f64().max(1e-9),
        "synthetic checkpoint written"
    );
    Ok(SynthReport {
        dir: out.to_path_buf(),
        files: files.into_iter().map(|f| out.join(f)).collect(),
        total_bytes,
        data_bytes,
        tensors: tensors.len(),
        params,
        elapsed,
    })
}
