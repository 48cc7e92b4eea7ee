//! `flash bench` and `flash bench-disk`: the arguments turned into
//! flash-check's loader benchmark options, the results printed as a table or
//! JSON lines. The loaders, scenarios and limits are flash-check's
//! `loaders` module.

use crate::args::{BenchArgs, BenchDiskArgs};
use crate::ctx::{model_name, Ctx};
use anyhow::{bail, Result};
use flash_check::loaders::{self, BenchOptions, Device, Measurement, ScratchModel};
use flash_load::LoadOptions;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The model to bench: a folder, a store model, or a preset synthesized
/// into the store's scratch space (removed when done).
struct Target {
    dir: PathBuf,
    label: String,
    _scratch: Option<ScratchModel>,
}

fn resolve(ctx: &Ctx, a: &BenchArgs) -> Result<Target> {
    if let Some(spec) = &a.synth {
        let Some((arch, size)) = spec.split_once(':') else {
            bail!("--synth takes ARCH:SIZE, for example qwen3:0.6b");
        };
        let model = loaders::synth_scratch(ctx.store()?.root(), arch, size)?;
        return Ok(Target {
            dir: model.dir.clone(),
            label: format!("synth:{arch}:{size}"),
            _scratch: Some(model),
        });
    }
    let Some(t) = a.target.as_deref() else {
        bail!("name a model (ORG/NAME or a folder) or --synth ARCH:SIZE");
    };
    let p = Path::new(t);
    if p.is_dir() {
        return Ok(Target {
            dir: p.to_path_buf(),
            label: t.to_string(),
            _scratch: None,
        });
    }
    let name = model_name(t)?;
    Ok(Target {
        dir: ctx.store()?.existing(&name)?,
        label: name.to_string(),
        _scratch: None,
    })
}

/// The flash loader's options from the flags (a whole `--pattern`
/// overrides the others).
fn load_options(a: &BenchArgs) -> Result<LoadOptions> {
    if a.staging_size == Some(0) {
        anyhow::bail!("--staging-size 0: a staging buffer needs at least one byte");
    }
    let defaults = LoadOptions::default();
    let opts = LoadOptions {
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
    Ok(match &a.pattern {
        Some(p) => {
            let p: flash_load::ReadPattern = p.parse().map_err(anyhow::Error::msg)?;
            if p.queue_depth.is_some() {
                // The load pipeline's readers make one blocking read at a
                // time: a load run with this pattern would not be what its
                // label says.
                anyhow::bail!(
                    "--pattern {p}: loads read with one read at a time per reader; io_uring queue \
                     depths (qdN) are for the disk probe (`flash bench-disk`, `flash doctor`)"
                );
            }
            p.apply(&opts)
        }
        None => opts,
    })
}

pub fn run(ctx: &Ctx, a: BenchArgs) -> Result<ExitCode> {
    let device = Device::pick(&a.device)?;
    // Arguments first: nothing is synthesized for a run that cannot happen.
    loaders::scenarios(&device, &a.scenario)?;
    let load = load_options(&a)?;
    let target = resolve(ctx, &a)?;
    // The disk's limit and best read pattern from `flash doctor` on this store.
    let doctor = ctx
        .store()
        .ok()
        .and_then(|s| flash_check::doctor::saved_disk_limit(s.root()));
    let rows = loaders::run(&BenchOptions {
        dir: target.dir.clone(),
        label: target.label.clone(),
        device,
        scenario: a.scenario.clone(),
        loaders: a.loader.clone(),
        load,
        repeat: a.repeat,
        doctor,
    })?;
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

/// `flash bench-disk`: cold reads of the same files with several patterns,
/// alternating, and the median of each.
pub fn disk(a: BenchDiskArgs) -> Result<ExitCode> {
    let files = loaders::disk_files(&a.paths)?;
    let patterns = loaders::patterns(&a.pattern)?;
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
    let c = loaders::compare_patterns(&files, &patterns, a.rounds, a.limit, |round, r| {
        if a.json {
            let mut v = serde_json::to_value(r).unwrap_or_default();
            v["round"] = round.into();
            v["loader"] = "disk".into();
            v["scenario"] = "cold".into();
            println!("{v}");
        } else {
            let device = r.device.as_ref().map_or(String::new(), |d| {
                format!(
                    "  {}: {:.0} KiB a request, {:.2} ms each, {:.1} in flight",
                    d.name, d.req_kib, d.ms_per_req, d.mean_in_flight
                )
            });
            println!(
                "round {round}  {:<36} {:>6.2} GB/s (best second {:.2})  {:>6.2} s{device}",
                r.pattern, r.gbps, r.peak_gbps, r.seconds
            );
        }
    })?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"medians": c.medians.iter().map(|(p, g)| serde_json::json!({"pattern": p, "gbps": g})).collect::<Vec<_>>(),
                               "best": c.best.as_ref().map(|b| &b.0)})
        );
    } else {
        println!("median over {} rounds:", a.rounds.max(1));
        for (p, g) in &c.medians {
            let mark = if c.best.as_ref().is_some_and(|b| &b.0 == p) {
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
