//! `flash bench`: this project's load path against a naive baseline and the
//! hardware's limits, in one run on one machine.
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
//! the daemon's memory tier).

use crate::args::BenchArgs;
use crate::commands::{model_name, Ctx};
use anyhow::{anyhow, bail, Context, Result};
use flash_load::{
    default_threads, execute, load_to_gpu, load_to_host, HostSink, IoMode, LoadOptions, LoadPlan,
    LoadStats, ModelSource, ScanSink,
};
use flash_sys::cuda::{self, Direction, Gpu};
use flash_sys::os;
use serde::Serialize;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

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

pub use flash_load::disk::{evict, residency};

/// Reads every file into the page cache.
fn warm(files: &[PathBuf]) -> Result<()> {
    for f in files {
        let file = File::open(f).with_context(|| format!("{}: cannot open", f.display()))?;
        let map = os::Mapping::new(&file)?;
        let mut sum = 0u8;
        for page in map.chunks(4096) {
            sum = sum.wrapping_add(page[0]);
        }
        std::hint::black_box(sum);
    }
    Ok(())
}

enum Device {
    Cpu,
    Cuda(Gpu),
}

fn pick_device(s: &str) -> Result<Device> {
    let want_gpu = match s {
        "cpu" => return Ok(Device::Cpu),
        "auto" => None,
        other => Some(
            other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(|| anyhow!("unknown device {other:?} (auto, cpu, cuda:N)"))?,
        ),
    };
    match (cuda::probe(), want_gpu) {
        (Ok(c), Some(n)) => Ok(Device::Cuda(c.device(n)?)),
        (Ok(c), None) if c.device_count() > 0 => Ok(Device::Cuda(c.device(0)?)),
        (Err(why), Some(_)) => bail!("no usable GPU: {why}"),
        _ => Ok(Device::Cpu),
    }
}

/// The raw read of every file of the model: with the best pattern the last
/// `flash doctor` found on this store when there is one, else O_DIRECT with
/// the loader's options.
fn disk_read(
    source: &ModelSource,
    opts: &LoadOptions,
    best: Option<&str>,
) -> Result<(u64, Option<LoadStats>)> {
    if let Some(p) = best {
        let pattern: flash_load::ReadPattern = p.parse().map_err(anyhow::Error::msg)?;
        let r = flash_load::disk::read_files(&source.files, None, &pattern)?;
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
        let file =
            File::open(&f.path).with_context(|| format!("{}: cannot open", f.path.display()))?;
        maps.push(os::Mapping::new(&file)?);
    }
    let total: u64 = source.tensors.iter().map(|t| t.length).sum();
    match device {
        Device::Cpu => {
            let out: Vec<Vec<u8>> = source
                .tensors
                .iter()
                .map(|t| maps[t.file][t.offset as usize..(t.offset + t.length) as usize].to_vec())
                .collect();
            std::hint::black_box(&out);
        }
        Device::Cuda(gpu) => {
            let mem = gpu.alloc(total.max(1) as usize)?;
            let mut off = 0usize;
            for t in &source.tensors {
                mem.copy_from_host(
                    off,
                    &maps[t.file][t.offset as usize..(t.offset + t.length) as usize],
                )?;
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
    anyhow::ensure!(
        plan.is_encoded(),
        "the decode scenario needs a compressed model (flash pull --compress)"
    );
    let mut image = flash_sys::os::AlignedBuf::new(plan.image_len.max(1) as usize)?;
    execute(&plan.stored_image(), &HostSink::new(&mut image), opts)?;
    let decoded_bytes: u64 = plan.encoded.iter().map(|t| t.length).sum();
    let mut rows = Vec::new();
    // The output written once before the clock starts: decoding is timed,
    // not the kernel handing out fresh pages (a load's destination is
    // allocated once per model, on transparent huge pages).
    let mut out = flash_sys::os::AlignedBuf::new(plan.dest_len.max(1) as usize)?;
    out.fill(0);
    for threads in [1, default_threads()] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()?;
        // One core decodes the first GiB of compressed tensors (a whole 8B
        // model would take a quarter minute); all cores decode everything.
        let budget = if threads == 1 { 1 << 30 } else { u64::MAX };
        let (mut bytes, mut seconds) = (0u64, 0.0);
        for t in &plan.encoded {
            if bytes >= budget {
                break;
            }
            let range = t.dest_offset..t.dest_offset + t.length;
            let dst = &mut out[range.start as usize..range.end as usize];
            let clock = Instant::now();
            pool.install(|| flash_load::decode::decode_range(&plan, &image, range, dst))?;
            seconds += clock.elapsed().as_secs_f64();
            bytes += t.length;
        }
        let name = match threads {
            1 => "cpu-decode-1-core".to_string(),
            n => format!("cpu-decode-{n}-cores"),
        };
        rows.push((name, seconds, bytes));
    }
    if let Device::Cuda(gpu) = device {
        let decoder = flash_kernels::decode::GpuDecoder::load(
            gpu,
            flash_kernels::default_kernel_cache(None).as_deref(),
        )?;
        let mut times = flash_load::gpu::time_gpu_decode(&plan, &image, gpu, &decoder, 5)?;
        times.sort_by(f64::total_cmp);
        rows.push((
            "gpu-decode".to_string(),
            times[times.len() / 2],
            decoded_bytes,
        ));
    }
    Ok(rows)
}

/// Pinned host-to-device bandwidth, the limit of the pinned scenario.
fn h2d_limit(gpu: &Gpu) -> Result<f64> {
    let piece = 64 << 20;
    let bufs = (0..4)
        .map(|_| gpu.pinned(piece))
        .collect::<Result<Vec<_>, _>>()?;
    let mem = gpu.alloc(4 * piece)?;
    let streams = [gpu.stream()?, gpu.stream()?];
    let mut best = 0.0f64;
    let mut bufs = bufs;
    for _ in 0..3 {
        let (d, b) =
            cuda::timed_pinned_copies(Direction::HostToDevice, &mem, bufs, &streams, 16 << 20)?;
        bufs = b;
        best = best.max((4 * piece) as f64 / d.as_secs_f64() / 1e9);
    }
    Ok(best)
}

struct Target {
    dir: PathBuf,
    label: String,
    scratch: Option<PathBuf>,
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(s) = &self.scratch {
            let _ = std::fs::remove_dir_all(s);
        }
    }
}

fn resolve(ctx: &Ctx, a: &BenchArgs) -> Result<Target> {
    if let Some(spec) = &a.synth {
        let Some((arch, size)) = spec.split_once(':') else {
            bail!("--synth takes ARCH:SIZE, for example qwen3:0.6b");
        };
        let spec = flash_synth::spec(arch.parse()?, size)?;
        let store = ctx.store()?;
        let scratch = store
            .root()
            .join("tmp")
            .join(format!("bench-{}-synth", std::process::id()));
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch)?;
        let dir = scratch.join("model");
        let target = Target {
            dir: dir.clone(),
            label: format!("synth:{arch}:{size}"),
            scratch: Some(scratch),
        };
        flash_synth::synth(&spec, &dir, &flash_synth::SynthOptions::default())?;
        return Ok(target);
    }
    let t = a
        .target
        .as_deref()
        .expect("clap requires target or --synth");
    let p = Path::new(t);
    if p.is_dir() {
        return Ok(Target {
            dir: p.to_path_buf(),
            label: t.to_string(),
            scratch: None,
        });
    }
    let name = model_name(t)?;
    let dir = ctx.store()?.existing(&name)?;
    Ok(Target {
        dir,
        label: name.to_string(),
        scratch: None,
    })
}

pub fn run(ctx: &Ctx, a: BenchArgs) -> Result<ExitCode> {
    let device = pick_device(&a.device)?;
    let (card, device_name) = match &device {
        Device::Cpu => ("cpu".to_string(), "cpu".to_string()),
        Device::Cuda(g) => (g.info()?.name, format!("cuda:{}", g.ordinal())),
    };
    let all: &[&str] = match device {
        Device::Cpu => &["cold", "warm"],
        Device::Cuda(_) => &["cold", "warm", "pinned"],
    };
    let scenarios: Vec<&str> = match a.scenario.as_str() {
        "all" => all.to_vec(),
        "decode" => vec!["decode"],
        s if all.contains(&s) => vec![s],
        other => bail!(
            "unknown scenario {other:?} on {device_name} ({}, decode, all)",
            all.join(", ")
        ),
    };
    let target = resolve(ctx, &a)?;
    let source = ModelSource::open(&target.dir)?;
    // The disk's limit and best read pattern from `flash doctor` on this store.
    let doctor = ctx
        .store()
        .ok()
        .and_then(|s| crate::doctor::saved_disk_limit(s.root()));
    let files: Vec<PathBuf> = source.files.iter().map(|f| f.path.clone()).collect();
    let defaults = LoadOptions::default();
    let mut opts = LoadOptions {
        threads: a.threads.unwrap_or(defaults.threads).max(1),
        chunk_bytes: a.chunk_size,
        io: a.io.parse().map_err(anyhow::Error::msg)?,
        order: match &a.order {
            Some(o) => o.parse().map_err(anyhow::Error::msg)?,
            None => defaults.order,
        },
        advice: match &a.advice {
            Some(o) => o.parse().map_err(anyhow::Error::msg)?,
            None => defaults.advice,
        },
        staging_bytes: a.staging_size,
        staging_buffers: a.staging_buffers,
    };
    if let Some(p) = &a.pattern {
        let p: flash_load::ReadPattern = p.parse().map_err(anyhow::Error::msg)?;
        opts = p.apply(&opts);
    }
    for l in &a.loader {
        if !["disk", "flash", "mmap"].contains(&l.as_str()) {
            bail!("unknown loader {l:?} (disk, flash, mmap)");
        }
    }
    // The plain mmap-and-copy baseline reads tensors in place, which a
    // compressed model does not have: it is left out for one.
    if source.is_encoded() && a.loader.iter().any(|l| l == "mmap") {
        bail!("{}: the mmap loader cannot read a compressed model (its tensors are not stored verbatim)", target.label);
    }
    let wanted = |l: &str| {
        (a.loader.is_empty() && !(l == "mmap" && source.is_encoded()))
            || a.loader.iter().any(|w| w == l)
    };
    let measure = |loader: &str, scenario: &str| -> Result<Measurement> {
        let resident_before = match scenario {
            "cold" => evict(&files)?,
            _ => {
                warm(&files)?;
                residency(&files)?
            }
        };
        reset_peak_rss();
        let (seconds, bytes, stats) = if scenario == "pinned" {
            let Device::Cuda(gpu) = &device else {
                unreachable!("pinned is GPU only")
            };
            let (s, b) = pinned_run(&source, &opts, gpu)?;
            (s, b, None)
        } else {
            let t = Instant::now();
            let (bytes, stats) = match loader {
                "disk" => disk_read(&source, &opts, doctor.as_ref().and_then(|d| d.1.as_deref()))?,
                "flash" => flash_run(&source, &opts, &device)?,
                _ => mmap_copy(&source, &device)?,
            };
            (t.elapsed().as_secs_f64(), bytes, stats)
        };
        Ok(Measurement {
            loader: loader.to_string(),
            model: target.label.clone(),
            scenario: scenario.to_string(),
            seconds,
            gbps: bytes as f64 / seconds / 1e9,
            bytes,
            card: card.clone(),
            device: device_name.clone(),
            resident_before,
            stats,
            limit_gbps: None,
            rss_peak_bytes: peak_rss(),
        })
    };
    let mut rows: Vec<Measurement> = Vec::new();
    if scenarios == ["decode"] {
        for (loader, seconds, bytes) in decode_rows(&source, &opts, &device)? {
            rows.push(Measurement {
                loader,
                model: target.label.clone(),
                scenario: "decode".into(),
                seconds,
                gbps: bytes as f64 / seconds / 1e9,
                bytes,
                card: card.clone(),
                device: device_name.clone(),
                resident_before: 1.0,
                stats: None,
                limit_gbps: None,
                rss_peak_bytes: None,
            });
        }
    }
    for scenario in scenarios.iter().filter(|s| **s != "decode") {
        let loaders: &[&str] = match *scenario {
            "cold" => &["disk", "flash", "mmap"],
            "warm" => &["flash", "mmap"],
            _ => &["flash"],
        };
        for loader in loaders.iter().filter(|l| wanted(l)) {
            let mut best: Option<Measurement> = None;
            for _ in 0..a.repeat.max(1) {
                let m = measure(loader, scenario)?;
                if best.as_ref().is_none_or(|b| m.seconds < b.seconds) {
                    best = Some(m);
                }
            }
            rows.extend(best);
        }
    }
    // Each run against the limit of its stage: the disk's, measured in this
    // run, else by the last `flash doctor` (decoded bytes of a compressed
    // model can arrive faster than the disk reads their stored bytes).
    let disk = rows
        .iter()
        .find(|r| r.loader == "disk")
        .map(|r| r.gbps)
        .or(doctor.as_ref().map(|d| d.0));
    let h2d = match (&device, scenarios.contains(&"pinned")) {
        (Device::Cuda(g), true) => Some(h2d_limit(g)?),
        _ => None,
    };
    for r in &mut rows {
        r.limit_gbps = match r.scenario.as_str() {
            "cold" if r.loader != "disk" => disk,
            "pinned" => h2d,
            _ => None,
        };
    }
    if a.json {
        for r in &rows {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        print_table(&rows);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(rows: &[Measurement]) {
    if let Some(r) = rows.first() {
        println!("{} on {} ({})", r.model, r.device, r.card);
    }
    println!(
        "{:<6} {:<7} {:>9} {:>8} {:>9} {:>10} {:>7} {:>10}",
        "LOADER", "CASE", "SECONDS", "GB/s", "VS mmap", "OF LIMIT", "CACHED", "PEAK RSS"
    );
    for r in rows {
        let base = rows
            .iter()
            .find(|b| b.loader == "mmap" && b.scenario == r.scenario);
        let ratio = base
            .map(|b| format!("{:.2}x", r.seconds / b.seconds))
            .unwrap_or_default();
        let pct = r
            .limit_gbps
            .map(|l| format!("{:.0}%", 100.0 * r.gbps / l))
            .unwrap_or_default();
        let rss = r
            .rss_peak_bytes
            .map(|b| format!("{:.0} MiB", b as f64 / (1 << 20) as f64))
            .unwrap_or_default();
        println!(
            "{:<6} {:<7} {:>9.3} {:>8.2} {:>9} {:>10} {:>6.0}% {:>10}",
            r.loader,
            r.scenario,
            r.seconds,
            r.gbps,
            ratio,
            pct,
            100.0 * r.resident_before,
            rss
        );
    }
    if let Some(r) = rows
        .iter()
        .find(|r| r.scenario == "cold" && r.resident_before > 0.5)
    {
        println!(
            "note: {:.0}% of the files stayed in the page cache after eviction (tmpfs, or no permission): the cold numbers are warm ones",
            100.0 * r.resident_before
        );
    }
}

/// The files `flash bench-disk` reads for a path: a file itself; a folder's
/// safetensors shards, or its flash data files, or else all its files.
fn disk_files(paths: &[PathBuf]) -> Result<Vec<flash_load::SourceFile>> {
    let mut out = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p).with_context(|| format!("{}: cannot read", p.display()))?;
        let mut found: Vec<PathBuf> = if meta.is_dir() {
            let entries: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("{}: cannot list", p.display()))?
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
            if !shards.is_empty() {
                shards
            } else if !data.is_empty() {
                data
            } else {
                entries
            }
        } else {
            vec![p.clone()]
        };
        found.sort();
        for f in found {
            let len = std::fs::metadata(&f)?.len();
            out.push(flash_load::SourceFile { path: f, len });
        }
    }
    anyhow::ensure!(!out.is_empty(), "no files to read in {paths:?}");
    Ok(out)
}

/// `flash bench-disk`: cold reads of the same files with several patterns,
/// alternating, and the median of each.
pub fn disk(a: crate::args::BenchDiskArgs) -> Result<ExitCode> {
    use flash_load::disk;
    let files = disk_files(&a.paths)?;
    let patterns: Vec<flash_load::ReadPattern> = if a.pattern.is_empty() {
        disk::candidates()
    } else {
        a.pattern
            .iter()
            .map(|p| p.parse().map_err(anyhow::Error::msg))
            .collect::<Result<_>>()?
    };
    let total: u64 = files
        .iter()
        .map(|f| a.limit.map_or(f.len, |l| f.len.min(l)))
        .sum();
    if !a.json {
        eprintln!(
            "reading {} in {} files cold, {} patterns x {} rounds",
            human(total),
            files.len(),
            patterns.len(),
            a.rounds
        );
    }
    let results = disk::compare(&files, &patterns, a.rounds.max(1), a.limit, |round, r| {
        if a.json {
            let mut v = serde_json::to_value(r).unwrap_or_default();
            v["round"] = round.into();
            v["loader"] = "disk".into();
            v["scenario"] = "cold".into();
            println!("{v}");
        } else {
            println!(
                "round {round}  {:<36} {:>6.2} GB/s  {:>6.2} s",
                r.pattern, r.gbps, r.seconds
            );
        }
    })?;
    let mut medians: Vec<(String, f64)> = Vec::new();
    for p in &patterns {
        let name = p.to_string();
        let mut v: Vec<f64> = results
            .iter()
            .filter(|(_, r)| r.pattern == name)
            .map(|(_, r)| r.gbps)
            .collect();
        v.sort_by(f64::total_cmp);
        medians.push((name, v[v.len() / 2]));
    }
    let best = disk::best_by_median(&results);
    if a.json {
        println!(
            "{}",
            serde_json::json!({"medians": medians.iter().map(|(p, g)| serde_json::json!({"pattern": p, "gbps": g})).collect::<Vec<_>>(),
                               "best": best.as_ref().map(|b| &b.0)})
        );
    } else {
        println!("median over {} rounds:", a.rounds.max(1));
        for (p, g) in &medians {
            let mark = if best.as_ref().is_some_and(|b| &b.0 == p) {
                "  <- best"
            } else {
                ""
            };
            println!("  {p:<36} {g:>6.2} GB/s{mark}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn human(b: u64) -> String {
    format!("{:.2} GB", b as f64 / 1e9)
}
