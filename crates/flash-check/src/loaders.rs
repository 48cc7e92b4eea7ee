//! The load path against a naive baseline and the hardware's limits, in one
//! run on one machine (`flash bench`), and cold reads of files with several
//! read patterns side by side (`flash bench-disk`).
//!
//! Loaders:
//! - `disk`: every byte of the files read with O_DIRECT and dropped: the
//!   storage limit every cold load is measured against;
//! - `flash`: the load pipeline into host memory, or into one device
//!   allocation through pinned staging buffers;
//! - `mmap`: map each file and copy each tensor on its own (into host memory,
//!   or to the GPU with a plain pageable copy), the way a simple safetensors
//!   loader does.
//!
//! Scenarios: `cold` (page cache evicted), `warm` (files in the page cache),
//! `pinned` (GPU only: the model already in pinned host memory, the path of
//! the daemon's memory tier), `decode` (a compressed model's decoding alone,
//! on one core, every core and the GPU).
//!
//! Each run is reported against the limit of its stage: the disk's (measured
//! in the same run, else by the last doctor on the store) for cold loads,
//! pinned host-to-device for pinned ones.

use crate::{limits, CheckError, Result, ScratchDir};
use flash_load::{
    default_threads, execute, load_to_gpu, load_to_host, HostSink, IoMode, LoadOptions, LoadPlan,
    LoadStats, ModelSource, ReadPattern, ScanSink, SourceFile,
};
use flash_sys::cuda::{self, Gpu};
use flash_sys::os;
use serde::Serialize;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub use flash_load::disk::{evict, residency};

/// One loader in one scenario: the JSON line of `flash bench --json`.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    pub loader: String,
    pub model: String,
    pub scenario: String,
    pub seconds: f64,
    pub gbps: f64,
    /// Tensor bytes delivered (disk: bytes read).
    pub bytes: u64,
    pub card: String,
    pub device: String,
    /// Share of the files in the page cache when the run started.
    pub resident_before: f64,
    /// Pipeline stages of a flash run: time summed over workers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<LoadStats>,
    /// The stage limit this run is compared with, in GB/s (disk for cold,
    /// pinned host-to-device for pinned).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit_gbps: Option<f64>,
    /// Peak resident host memory of this process during the run (Linux:
    /// VmHWM after resetting it), to show what a load holds in host memory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_peak_bytes: Option<u64>,
}

/// Where the loads go.
pub enum Device {
    Cpu,
    Cuda(Gpu),
}

impl Device {
    /// `auto` (GPU 0 when one is usable, else the CPU), `cpu` or `cuda:N`
    /// (that GPU, or an error saying why it is not usable).
    pub fn pick(s: &str) -> Result<Device> {
        let want_gpu = match s {
            "cpu" => return Ok(Device::Cpu),
            "auto" => None,
            other => Some(
                other
                    .strip_prefix("cuda:")
                    .and_then(|n| n.parse::<usize>().ok())
                    .ok_or_else(|| {
                        CheckError::Invalid(format!("unknown device {other:?} (auto, cpu, cuda:N)"))
                    })?,
            ),
        };
        match (cuda::probe(), want_gpu) {
            (Ok(c), Some(n)) => Ok(Device::Cuda(c.device(n)?)),
            (Ok(c), None) if c.device_count() > 0 => Ok(Device::Cuda(c.device(0)?)),
            (Err(why), Some(_)) => Err(CheckError::Failed(format!("no usable GPU: {why}"))),
            _ => Ok(Device::Cpu),
        }
    }

    /// The card's name ("cpu" for the CPU) and the device's ("cpu", "cuda:N").
    pub fn names(&self) -> Result<(String, String)> {
        Ok(match self {
            Device::Cpu => ("cpu".to_string(), "cpu".to_string()),
            Device::Cuda(g) => (g.info()?.name, format!("cuda:{}", g.ordinal())),
        })
    }

    fn gpu(&self) -> Option<&Gpu> {
        match self {
            Device::Cpu => None,
            Device::Cuda(g) => Some(g),
        }
    }
}

/// What to measure.
pub struct BenchOptions {
    /// The model folder (flash format or safetensors).
    pub dir: PathBuf,
    /// Its name in the report (`model`).
    pub label: String,
    pub device: Device,
    /// cold, warm, pinned (GPU only), decode, or all (every scenario of the
    /// device but decode).
    pub scenario: String,
    /// Loaders to run (disk, flash, mmap); empty: every one that can read
    /// the model.
    pub loaders: Vec<String>,
    /// The flash loader's options (the disk loader reads with O_DIRECT and
    /// these threads and chunk size, unless a doctor's best pattern is known).
    pub load: LoadOptions,
    /// Timed runs per loader and scenario (the best is reported).
    pub repeat: usize,
    /// The disk's limit and best read pattern from the last doctor on the
    /// store ([`crate::doctor::saved_disk_limit`]).
    pub doctor: Option<(f64, Option<String>)>,
}

/// Runs every loader of every scenario asked for; one measurement per
/// loader and scenario, each with the limit of its stage.
pub fn run(o: &BenchOptions) -> Result<Vec<Measurement>> {
    let scenarios = scenarios(&o.device, &o.scenario)?;
    let source = ModelSource::open(&o.dir)?;
    check_loaders(&o.loaders, &source, &o.label)?;
    let (card, device) = o.device.names()?;
    let row = |loader: String, scenario: &str, seconds: f64, bytes: u64| Measurement {
        loader,
        model: o.label.clone(),
        scenario: scenario.to_string(),
        seconds,
        gbps: bytes as f64 / seconds / 1e9,
        bytes,
        card: card.clone(),
        device: device.clone(),
        resident_before: 1.0,
        stats: None,
        limit_gbps: None,
        rss_peak_bytes: None,
    };
    let mut rows: Vec<Measurement> = Vec::new();
    if scenarios == ["decode"] {
        for (loader, seconds, bytes) in decode_rows(&source, &o.load, &o.device)? {
            rows.push(row(loader, "decode", seconds, bytes));
        }
    }
    for scenario in scenarios.iter().filter(|s| **s != "decode") {
        for loader in loaders_of(scenario) {
            if !wanted(&o.loaders, &source, loader) {
                continue;
            }
            let mut best: Option<Measurement> = None;
            for _ in 0..o.repeat.max(1) {
                let (resident_before, seconds, bytes, stats) =
                    measure(o, &source, loader, scenario)?;
                let m = Measurement {
                    resident_before,
                    stats,
                    rss_peak_bytes: peak_rss(),
                    ..row(loader.to_string(), scenario, seconds, bytes)
                };
                if best.as_ref().is_none_or(|b| m.seconds < b.seconds) {
                    best = Some(m);
                }
            }
            rows.extend(best);
        }
    }
    set_limits(&mut rows, o, scenarios.contains(&"pinned"))?;
    Ok(rows)
}

/// The scenarios `wanted` names on `device` (cold, warm, pinned with a
/// GPU, decode, or all but decode), or an error listing them.
pub fn scenarios(device: &Device, wanted: &str) -> Result<Vec<&'static str>> {
    let all: &[&'static str] = match device {
        Device::Cpu => &["cold", "warm"],
        Device::Cuda(_) => &["cold", "warm", "pinned"],
    };
    Ok(match wanted {
        "all" => all.to_vec(),
        "decode" => vec!["decode"],
        s => match all.iter().find(|a| **a == s) {
            Some(a) => vec![*a],
            None => {
                let device = match device {
                    Device::Cpu => "cpu".to_string(),
                    Device::Cuda(g) => format!("cuda:{}", g.ordinal()),
                };
                return Err(CheckError::Invalid(format!(
                    "unknown scenario {s:?} on {device} ({}, decode, all)",
                    all.join(", ")
                )));
            }
        },
    })
}

/// The loaders each scenario compares.
fn loaders_of(scenario: &str) -> &'static [&'static str] {
    match scenario {
        "cold" => &["disk", "flash", "mmap"],
        "warm" => &["flash", "mmap"],
        _ => &["flash"],
    }
}

/// Refuses unknown loaders, and the mmap baseline on a compressed model (it
/// reads tensors in place, which a compressed model does not have).
fn check_loaders(loaders: &[String], source: &ModelSource, label: &str) -> Result<()> {
    for l in loaders {
        if !["disk", "flash", "mmap"].contains(&l.as_str()) {
            return Err(CheckError::Invalid(format!(
                "unknown loader {l:?} (disk, flash, mmap)"
            )));
        }
    }
    if source.is_encoded() && loaders.iter().any(|l| l == "mmap") {
        return Err(CheckError::Invalid(format!(
            "{label}: the mmap loader cannot read a compressed model (its tensors are not stored verbatim)"
        )));
    }
    Ok(())
}

/// Whether `loader` runs: named, or none named and it can read the model.
fn wanted(loaders: &[String], source: &ModelSource, loader: &str) -> bool {
    (loaders.is_empty() && !(loader == "mmap" && source.is_encoded()))
        || loaders.iter().any(|w| w == loader)
}

/// One timed run of `loader` in `scenario`, the page cache set up first:
/// the share of the files cached before it, seconds, bytes, the pipeline's
/// stages.
fn measure(
    o: &BenchOptions,
    source: &ModelSource,
    loader: &str,
    scenario: &str,
) -> Result<(f64, f64, u64, Option<LoadStats>)> {
    let files: Vec<PathBuf> = source.files.iter().map(|f| f.path.clone()).collect();
    let resident_before = match scenario {
        "cold" => evict(&files)?,
        _ => {
            warm(&files)?;
            residency(&files)?
        }
    };
    reset_peak_rss();
    if scenario == "pinned" {
        let gpu = o.device.gpu().ok_or_else(|| {
            CheckError::Invalid("the pinned scenario needs a GPU (--device cuda:N)".into())
        })?;
        let (seconds, bytes) = pinned_run(source, &o.load, gpu)?;
        return Ok((resident_before, seconds, bytes, None));
    }
    let t = Instant::now();
    let best_pattern = o.doctor.as_ref().and_then(|d| d.1.as_deref());
    let (bytes, stats) = match loader {
        "disk" => disk_read(source, &o.load, best_pattern)?,
        "flash" => flash_run(source, &o.load, &o.device)?,
        _ => mmap_copy(source, &o.device)?,
    };
    Ok((resident_before, t.elapsed().as_secs_f64(), bytes, stats))
}

/// Each run against the limit of its stage: the disk's, measured in this
/// run, else by the last doctor (decoded bytes of a compressed model can
/// arrive faster than the disk reads their stored bytes); pinned
/// host-to-device for the pinned scenario.
fn set_limits(rows: &mut [Measurement], o: &BenchOptions, pinned: bool) -> Result<()> {
    let disk = rows
        .iter()
        .find(|r| r.loader == "disk")
        .map(|r| r.gbps)
        .or(o.doctor.as_ref().map(|d| d.0));
    let h2d = match (o.device.gpu(), pinned) {
        (Some(g), true) => Some(limits::pinned_h2d_gbps(g)?),
        _ => None,
    };
    for r in rows {
        r.limit_gbps = match r.scenario.as_str() {
            "cold" if r.loader != "disk" => disk,
            "pinned" => h2d,
            _ => None,
        };
    }
    Ok(())
}

/// Resets the kernel's peak-RSS mark of this process (Linux 4.0+).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak RSS since the last reset, from /proc/self/status.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Reads every file into the page cache.
fn warm(files: &[PathBuf]) -> Result<()> {
    for f in files {
        let file = File::open(f).map_err(CheckError::io(f))?;
        let map = os::Mapping::new(&file).map_err(CheckError::io(f))?;
        let mut sum = 0u8;
        for page in map.chunks(4096) {
            sum = sum.wrapping_add(page[0]);
        }
        std::hint::black_box(sum);
    }
    Ok(())
}

fn parse_pattern(p: &str) -> Result<ReadPattern> {
    p.parse().map_err(CheckError::Invalid)
}

/// The raw read of every file of the model: with the best pattern the last
/// doctor found on this store when there is one, else O_DIRECT with the
/// loader's options.
fn disk_read(
    source: &ModelSource,
    opts: &LoadOptions,
    best: Option<&str>,
) -> Result<(u64, Option<LoadStats>)> {
    if let Some(p) = best {
        let r = flash_load::disk::read_files(&source.files, None, &parse_pattern(p)?)?;
        return Ok((r.bytes, None));
    }
    let plan = LoadPlan::whole_files(&source.files);
    let sink = ScanSink::new(opts.chunk_bytes, |_, bytes| {
        std::hint::black_box(bytes);
        Ok(())
    });
    let stats = execute(
        &plan,
        &sink,
        &LoadOptions {
            io: IoMode::Direct,
            ..opts.clone()
        },
    )?;
    Ok((stats.bytes_read, Some(stats)))
}

fn flash_run(
    source: &ModelSource,
    opts: &LoadOptions,
    device: &Device,
) -> Result<(u64, Option<LoadStats>)> {
    match device {
        Device::Cpu => {
            let (model, stats) = load_to_host(source, None, opts)?;
            Ok((model.tensors().iter().map(|t| t.length).sum(), Some(stats)))
        }
        Device::Cuda(gpu) => {
            let (model, stats) = load_to_gpu(source, None, gpu, opts, None)?;
            gpu.synchronize()?;
            Ok((model.tensors().iter().map(|t| t.length).sum(), Some(stats)))
        }
    }
}

fn mmap_copy(source: &ModelSource, device: &Device) -> Result<(u64, Option<LoadStats>)> {
    let mut maps = Vec::with_capacity(source.files.len());
    for f in &source.files {
        let file = File::open(&f.path).map_err(CheckError::io(&f.path))?;
        maps.push(os::Mapping::new(&file).map_err(CheckError::io(&f.path))?);
    }
    let bytes_of = |t: &flash_load::StoredTensor| -> Result<&[u8]> {
        maps.get(t.file)
            .and_then(|m| m.get(t.offset as usize..(t.offset + t.length) as usize))
            .ok_or_else(|| CheckError::Failed(format!("tensor {} lies outside its file", t.name)))
    };
    let total: u64 = source.tensors.iter().map(|t| t.length).sum();
    match device {
        Device::Cpu => {
            let out = source
                .tensors
                .iter()
                .map(|t| bytes_of(t).map(<[u8]>::to_vec))
                .collect::<Result<Vec<Vec<u8>>>>()?;
            std::hint::black_box(&out);
        }
        Device::Cuda(gpu) => {
            let mem = gpu.alloc(total.max(1) as usize)?;
            let mut off = 0usize;
            for t in &source.tensors {
                mem.copy_from_host(off, bytes_of(t)?)?;
                off += t.length as usize;
            }
            gpu.synchronize()?;
        }
    }
    Ok((total, None))
}

/// The model's stored image in pinned host memory (untimed; the daemon's
/// memory tier), then timed: one device allocation and the upload, which
/// decodes a compressed model on the GPU as it lands.
fn pinned_run(source: &ModelSource, opts: &LoadOptions, gpu: &Gpu) -> Result<(f64, u64)> {
    let plan = LoadPlan::new(source, None)?;
    let mut host = gpu.pinned(plan.image_len.max(1) as usize)?;
    execute(&plan.stored_image(), &HostSink::new(&mut host), opts)?;
    let decoder = if plan.is_encoded() {
        flash_load::gpu::gpu_decoder(gpu)
    } else {
        None
    };
    let t = Instant::now();
    let mem = gpu.alloc(plan.dest_len.max(1) as usize)?;
    flash_load::gpu::upload_image(&plan, &host, &mem, decoder.as_ref())?;
    gpu.synchronize()?;
    Ok((t.elapsed().as_secs_f64(), plan.tensor_bytes()))
}

/// Decoding alone (a compressed model): the stored image in memory, decoded
/// on one CPU core, on every core, and on the GPU in one launch; each row's
/// rate counts decoded bytes.
fn decode_rows(
    source: &ModelSource,
    opts: &LoadOptions,
    device: &Device,
) -> Result<Vec<(String, f64, u64)>> {
    let plan = LoadPlan::new(source, None)?;
    if !plan.is_encoded() {
        return Err(CheckError::Invalid(
            "the decode scenario needs a compressed model (flash pull --compress)".into(),
        ));
    }
    let mut image = os::AlignedBuf::new(plan.image_len.max(1) as usize)
        .map_err(|e| CheckError::Failed(format!("allocating the model's image: {e}")))?;
    execute(&plan.stored_image(), &HostSink::new(&mut image), opts)?;
    // The output written once before the clock starts: decoding is timed,
    // not the kernel handing out fresh pages (a load's destination is
    // allocated once per model, on transparent huge pages).
    let mut out = os::AlignedBuf::new(plan.dest_len.max(1) as usize)
        .map_err(|e| CheckError::Failed(format!("allocating the decoded image: {e}")))?;
    out.fill(0);
    let mut rows = Vec::new();
    for threads in [1, default_threads()] {
        rows.push(cpu_decode(&plan, &image, &mut out, threads)?);
    }
    if let Device::Cuda(gpu) = device {
        let decoder = flash_kernels::decode::GpuDecoder::load(
            gpu,
            flash_kernels::default_kernel_cache(None).as_deref(),
        )?;
        let mut times = flash_load::gpu::time_gpu_decode(&plan, &image, gpu, &decoder, 5)?;
        times.sort_by(f64::total_cmp);
        let median = times.get(times.len() / 2).copied().unwrap_or(f64::NAN);
        let decoded_bytes: u64 = plan.encoded.iter().map(|t| t.length).sum();
        rows.push(("gpu-decode".to_string(), median, decoded_bytes));
    }
    Ok(rows)
}

/// Decoding on `threads` CPU cores into `out` (the plan's destination):
/// one core decodes the first GiB of compressed tensors (a whole 8B model
/// would take a quarter minute); more decode everything.
fn cpu_decode(
    plan: &LoadPlan,
    image: &[u8],
    out: &mut [u8],
    threads: usize,
) -> Result<(String, f64, u64)> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| CheckError::Failed(format!("starting {threads} decode threads: {e}")))?;
    let budget = if threads == 1 { 1 << 30 } else { u64::MAX };
    let (mut bytes, mut seconds) = (0u64, 0.0);
    for t in &plan.encoded {
        if bytes >= budget {
            break;
        }
        let range = t.dest_offset..t.dest_offset + t.length;
        let dst = out
            .get_mut(range.start as usize..range.end as usize)
            .ok_or_else(|| {
                CheckError::Failed(format!("tensor {} lies outside the plan", t.name))
            })?;
        let clock = Instant::now();
        pool.install(|| flash_load::decode::decode_range(plan, image, range, dst))?;
        seconds += clock.elapsed().as_secs_f64();
        bytes += t.length;
    }
    let name = match threads {
        1 => "cpu-decode-1-core".to_string(),
        n => format!("cpu-decode-{n}-cores"),
    };
    Ok((name, seconds, bytes))
}

/// A synthesized model in a scratch folder, removed on drop.
pub struct ScratchModel {
    /// The model folder.
    pub dir: PathBuf,
    _scratch: ScratchDir,
}

/// Synthesizes the preset `arch:size` (default options) under
/// `<store>/tmp/bench-<pid>-synth`, for a benchmark of a model that is not
/// in the store.
pub fn synth_scratch(store_root: &Path, arch: &str, size: &str) -> Result<ScratchModel> {
    let spec = flash_synth::spec(arch.parse()?, size)?;
    let scratch = ScratchDir::new(
        store_root
            .join("tmp")
            .join(format!("bench-{}-synth", std::process::id())),
    )?;
    let dir = scratch.path().join("model");
    flash_synth::synth(&spec, &dir, &flash_synth::SynthOptions::default())?;
    Ok(ScratchModel {
        dir,
        _scratch: scratch,
    })
}

/// The files a cold-read comparison reads for each path: a file itself; a
/// folder's safetensors shards, or its flash data files, or else all its
/// files.
pub fn disk_files(paths: &[PathBuf]) -> Result<Vec<SourceFile>> {
    let mut out = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p).map_err(CheckError::io(p))?;
        let mut found = if meta.is_dir() {
            files_of_folder(p)?
        } else {
            vec![p.clone()]
        };
        found.sort();
        for f in found {
            let len = std::fs::metadata(&f).map_err(CheckError::io(&f))?.len();
            out.push(SourceFile { path: f, len });
        }
    }
    if out.is_empty() {
        return Err(CheckError::Invalid(format!(
            "no files to read in {paths:?}"
        )));
    }
    Ok(out)
}

/// A folder's safetensors shards, else its flash data files, else its files.
fn files_of_folder(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(CheckError::io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|f| f.is_file())
        .collect();
    let pick = |want: &dyn Fn(&str) -> bool| -> Vec<PathBuf> {
        entries
            .iter()
            .filter(|f| f.file_name().and_then(|n| n.to_str()).is_some_and(want))
            .cloned()
            .collect()
    };
    let shards = pick(&|n: &str| n.ends_with(".safetensors"));
    let data = pick(&|n: &str| n.starts_with("data-") && n.ends_with(".bin"));
    Ok(if !shards.is_empty() {
        shards
    } else if !data.is_empty() {
        data
    } else {
        entries
    })
}

/// What a cold-read comparison found.
pub struct DiskComparison {
    /// Every read: its round and result, in the order they ran.
    pub results: Vec<(usize, flash_load::disk::ProbeResult)>,
    /// Each pattern's median rate (GB/s), in the order given.
    pub medians: Vec<(String, f64)>,
    /// The pattern with the best median, and that median.
    pub best: Option<(String, f64)>,
}

/// Cold reads of the same files with each of `patterns`, `rounds` times,
/// alternating (each round the order rotated by one); `limit` reads only
/// the first bytes of each file. `on_read(round, result)` hears of each
/// read as it ends.
pub fn compare_patterns(
    files: &[SourceFile],
    patterns: &[ReadPattern],
    rounds: usize,
    limit: Option<u64>,
    on_read: impl FnMut(usize, &flash_load::disk::ProbeResult),
) -> Result<DiskComparison> {
    let results = flash_load::disk::compare(files, patterns, rounds.max(1), limit, on_read)?;
    let medians = patterns
        .iter()
        .map(|p| {
            let name = p.to_string();
            let mut v: Vec<f64> = results
                .iter()
                .filter(|(_, r)| r.pattern == name)
                .map(|(_, r)| r.gbps)
                .collect();
            v.sort_by(f64::total_cmp);
            let median = v.get(v.len() / 2).copied().unwrap_or(f64::NAN);
            (name, median)
        })
        .collect();
    let best = flash_load::disk::best_by_median(&results);
    Ok(DiskComparison {
        results,
        medians,
        best,
    })
}

/// Parses read patterns (`IO:ORDER:THREADSxREQUEST[:ADVICE][:qdN]`); none:
/// the doctor's candidates.
pub fn patterns(given: &[String]) -> Result<Vec<ReadPattern>> {
    if given.is_empty() {
        return Ok(flash_load::disk::candidates());
    }
    given.iter().map(|p| parse_pattern(p)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synth_tiny(dir: &Path) {
        let spec = flash_synth::spec(flash_synth::Arch::Qwen3, "tiny").unwrap();
        flash_synth::synth(&spec, dir, &flash_synth::SynthOptions::default()).unwrap();
    }

    #[test]
    fn cpu_bench_reports_every_loader_against_the_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        synth_tiny(&dir);
        let rows = run(&BenchOptions {
            dir,
            label: "tiny".into(),
            device: Device::Cpu,
            scenario: "all".into(),
            loaders: Vec::new(),
            load: LoadOptions::default(),
            repeat: 1,
            doctor: None,
        })
        .unwrap();
        let cases: Vec<(&str, &str)> = rows
            .iter()
            .map(|r| (r.loader.as_str(), r.scenario.as_str()))
            .collect();
        assert_eq!(
            cases,
            [
                ("disk", "cold"),
                ("flash", "cold"),
                ("mmap", "cold"),
                ("flash", "warm"),
                ("mmap", "warm")
            ]
        );
        let disk = rows[0].gbps;
        assert!(rows[1].limit_gbps == Some(disk) && rows[0].limit_gbps.is_none());
        assert!(rows.iter().all(|r| r.bytes > 0 && r.device == "cpu"));
    }

    #[test]
    fn refusals() {
        assert!(matches!(
            scenarios(&Device::Cpu, "pinned"),
            Err(CheckError::Invalid(_))
        ));
        assert!(Device::pick("tpu:0").is_err());
        assert!(patterns(&["nonsense".into()]).is_err());
        assert_eq!(patterns(&[]).unwrap(), flash_load::disk::candidates());
    }

    #[test]
    fn disk_files_prefer_shards() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        synth_tiny(&dir);
        let files = disk_files(std::slice::from_ref(&dir)).unwrap();
        assert!(!files.is_empty());
        assert!(files
            .iter()
            .all(|f| f.path.extension().is_some_and(|e| e == "safetensors")));
        assert!(disk_files(&[tmp.path().join("none")]).is_err());
    }
}
