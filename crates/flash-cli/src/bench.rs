//! `flash bench`: this project's load path against a naive baseline and the
//! disk's raw speed, in one run on one machine.
//!
//! Loaders on the CPU:
//! - `disk`: every byte of the files read with O_DIRECT and dropped: the
//!   storage limit every cold load is measured against;
//! - `flash`: the load pipeline into host memory;
//! - `mmap`: map each file and copy each tensor into its own buffer, the way
//!   a plain safetensors loader does.

use crate::args::BenchArgs;
use crate::commands::{model_name, Ctx};
use anyhow::{bail, Context, Result};
use flash_load::{execute, load_to_host, IoMode, LoadOptions, LoadPlan, ModelSource, ScanSink};
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
    pub bytes: u64,
    pub card: String,
    /// Share of the page cache holding the files when the run started.
    pub resident_before: f64,
}

/// Drops the files from the page cache; returns the share still resident
/// (not every file system lets pages go, tmpfs never does).
pub fn evict(files: &[PathBuf]) -> Result<f64> {
    // Best effort, as root: the big hammer, then the per-file hint.
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "1");
    for f in files {
        let file = File::open(f).with_context(|| format!("{}: cannot open", f.display()))?;
        os::evict_page_cache(&file).with_context(|| format!("{}: cannot evict", f.display()))?;
    }
    residency(files)
}

/// Share of the files' bytes in the page cache.
pub fn residency(files: &[PathBuf]) -> Result<f64> {
    let (mut resident, mut total) = (0.0, 0.0);
    for f in files {
        let file = File::open(f).with_context(|| format!("{}: cannot open", f.display()))?;
        let len = file.metadata()?.len() as f64;
        resident += os::page_cache_residency(&file).unwrap_or(0.0) * len;
        total += len;
    }
    Ok(if total > 0.0 { resident / total } else { 1.0 })
}

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

fn disk_read(source: &ModelSource, opts: &LoadOptions) -> Result<u64> {
    let plan = LoadPlan::whole_files(&source.files);
    let sink = ScanSink::new(opts.chunk_bytes, |_, bytes| {
        std::hint::black_box(bytes);
        Ok(())
    });
    let stats = execute(&plan, &sink, &LoadOptions { io: IoMode::Direct, ..opts.clone() })?;
    Ok(stats.bytes_read)
}

fn flash_load(source: &ModelSource, opts: &LoadOptions) -> Result<u64> {
    let (model, _) = load_to_host(source, None, opts)?;
    Ok(model.tensors().iter().map(|t| t.length).sum())
}

fn mmap_copy(source: &ModelSource) -> Result<u64> {
    let mut maps = Vec::with_capacity(source.files.len());
    for f in &source.files {
        let file = File::open(&f.path).with_context(|| format!("{}: cannot open", f.path.display()))?;
        maps.push(os::Mapping::new(&file)?);
    }
    let mut total = 0;
    let mut out = Vec::with_capacity(source.tensors.len());
    for t in &source.tensors {
        let bytes = &maps[t.file][t.offset as usize..(t.offset + t.length) as usize];
        out.push(bytes.to_vec());
        total += t.length;
    }
    std::hint::black_box(&out);
    Ok(total)
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
        let scratch = store.root().join("tmp").join(format!("bench-{}-synth", std::process::id()));
        let _ = std::fs::remove_dir_all(&scratch);
        let dir = scratch.join("model");
        std::fs::create_dir_all(&scratch)?;
        let target = Target { dir: dir.clone(), label: format!("synth:{arch}:{size}"), scratch: Some(scratch) };
        flash_synth::synth(&spec, &dir, &flash_synth::SynthOptions::default())?;
        return Ok(target);
    }
    let t = a.target.as_deref().expect("clap requires target or --synth");
    let p = Path::new(t);
    if p.is_dir() {
        return Ok(Target { dir: p.to_path_buf(), label: t.to_string(), scratch: None });
    }
    let name = model_name(t)?;
    let dir = ctx.store()?.existing(&name)?;
    Ok(Target { dir, label: name.to_string(), scratch: None })
}

pub fn run(ctx: &Ctx, a: BenchArgs) -> Result<ExitCode> {
    let scenarios: Vec<&str> = match a.scenario.as_str() {
        "all" => vec!["cold", "warm"],
        s @ ("cold" | "warm") => vec![s],
        other => bail!("unknown scenario {other:?} on the CPU (cold, warm, all)"),
    };
    let target = resolve(ctx, &a)?;
    let source = ModelSource::open(&target.dir)?;
    let files: Vec<PathBuf> = source.files.iter().map(|f| f.path.clone()).collect();
    let opts = LoadOptions { threads: a.threads.max(1), chunk_bytes: a.chunk_size, io: IoMode::Auto };
    let mut rows = Vec::new();
    type LoaderFn<'a> = Box<dyn Fn() -> Result<u64> + 'a>;
    let loaders: Vec<(&str, LoaderFn)> = vec![
        ("disk", Box::new(|| disk_read(&source, &opts))),
        ("flash", Box::new(|| flash_load(&source, &opts))),
        ("mmap", Box::new(|| mmap_copy(&source))),
    ];
    for scenario in &scenarios {
        for (loader, f) in &loaders {
            if *loader == "disk" && *scenario == "warm" {
                continue; // O_DIRECT bypasses the page cache: warm means nothing to it
            }
            let mut best: Option<Measurement> = None;
            for _ in 0..a.repeat.max(1) {
                let resident_before = if *scenario == "cold" {
                    evict(&files)?
                } else {
                    warm(&files)?;
                    residency(&files)?
                };
                let t = Instant::now();
                let bytes = f()?;
                let seconds = t.elapsed().as_secs_f64();
                let m = Measurement {
                    loader: loader.to_string(),
                    model: target.label.clone(),
                    scenario: scenario.to_string(),
                    seconds,
                    gbps: bytes as f64 / seconds / 1e9,
                    bytes,
                    card: "cpu".into(),
                    resident_before,
                };
                if best.as_ref().is_none_or(|b| m.seconds < b.seconds) {
                    best = Some(m);
                }
            }
            rows.extend(best);
        }
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
    let disk = rows.iter().find(|r| r.loader == "disk").map(|r| r.gbps);
    println!(
        "{:<6} {:<6} {:>9} {:>8} {:>9} {:>9} {:>9}",
        "LOADER", "CASE", "SECONDS", "GB/s", "VS mmap", "% DISK", "CACHED"
    );
    for r in rows {
        let base = rows.iter().find(|b| b.loader == "mmap" && b.scenario == r.scenario);
        let ratio = base.map(|b| format!("{:.2}x", r.seconds / b.seconds)).unwrap_or_default();
        let pct = match (disk, r.scenario.as_str()) {
            (Some(d), "cold") => format!("{:.0}%", 100.0 * r.gbps / d),
            _ => String::new(),
        };
        println!(
            "{:<6} {:<6} {:>9.3} {:>8.2} {:>9} {:>9} {:>8.0}%",
            r.loader,
            r.scenario,
            r.seconds,
            r.gbps,
            ratio,
            pct,
            100.0 * r.resident_before
        );
    }
    if let Some(r) = rows.iter().find(|r| r.scenario == "cold" && r.resident_before > 0.5) {
        println!(
            "note: {:.0}% of the files stayed in the page cache after eviction (tmpfs or no permission): cold numbers are warm ones",
            100.0 * r.resident_before
        );
    }
}
