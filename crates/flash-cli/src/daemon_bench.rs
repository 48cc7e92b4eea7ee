//! `flash bench-daemon`: the daemon's targets, measured from a client
//! process against a running daemon (`flash start` first, with the budgets
//! the workload needs).
//!
//! - `upload`: memory tier → GPU of one model (the daemon's time; the model
//!   is dropped from the GPU and kept in memory before each run);
//! - `attach`: this process (not the daemon) connects, leases a GPU-resident
//!   model in share mode and opens its IPC handle: time to usable device
//!   pointers (CUDA context made beforehand, as a real client has one);
//! - `swap`: N models, C concurrent clients (each its own connection and
//!   session), Zipf(s) popularity, for D seconds: every request acquires,
//!   maps (GPU) and releases; errors and p50/p99 latency per source tier
//!   (where the daemon found the bytes: the requested tier for a hit, else
//!   memory or disk).
//!
//! Runs on the CPU too (memory tier only: `upload` is skipped), which is how
//! the tests run a small version of it.

use crate::args::BenchDaemonArgs;
use crate::daemon::{connect, home};
use anyhow::{anyhow, bail, Context, Result};
use flash_client::{Client, Location, Place, PullSpec};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A small deterministic generator (xorshift64*): enough for picking models.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1)
    }
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545F4914F6CDD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Cumulative Zipf(s) weights of ranks 1..=n.
fn zipf_cdf(n: usize, s: f64) -> Vec<f64> {
    let w: Vec<f64> = (1..=n).map(|k| 1.0 / (k as f64).powf(s)).collect();
    let total: f64 = w.iter().sum();
    let mut acc = 0.0;
    w.iter()
        .map(|x| {
            acc += x / total;
            acc
        })
        .collect()
}

fn pick(cdf: &[f64], u: f64) -> usize {
    cdf.partition_point(|&c| c < u).min(cdf.len() - 1)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn out(json: bool, v: serde_json::Value, text: String) {
    if json {
        println!("{v}");
    } else {
        println!("{text}");
    }
}

/// The names of the swap models, synthesized and pulled when missing.
fn ensure_models(home: &Path, client: &Client, a: &BenchDaemonArgs) -> Result<Vec<String>> {
    let (arch, size) = a
        .synth
        .split_once(':')
        .ok_or_else(|| anyhow!("--synth wants ARCH:SIZE, e.g. qwen3:0.6b"))?;
    let arch: flash_synth::Arch = arch.parse().map_err(|e| anyhow!("{e}"))?;
    let mut spec = flash_synth::spec(arch, size)?;
    let mut tag = format!("{}-{}", arch.name(), size.to_ascii_lowercase());
    if let Some(l) = a.layers {
        if l == 0 {
            bail!("--layers must be at least 1");
        }
        spec.num_hidden_layers = l;
        tag.push_str(&format!("-l{l}"));
    }
    let names: Vec<String> = (0..a.models)
        .map(|i| format!("bench/{tag}-{i:03}"))
        .collect();
    let scratch: PathBuf = home
        .join("tmp")
        .join(format!("bench-synth-{}", std::process::id()));
    let mut made = 0;
    for (i, name) in names.iter().enumerate() {
        if client.info(name).map_err(|e| anyhow!(e))?.is_some() {
            continue;
        }
        let dir = scratch.join(format!("m{i}"));
        let opts = flash_synth::SynthOptions {
            seed: a.seed.wrapping_mul(1000) + i as u64 + 1,
            ..Default::default()
        };
        flash_synth::synth(&spec, &dir, &opts).with_context(|| format!("synthesizing {name}"))?;
        client
            .pull(&PullSpec {
                model: name.clone(),
                from_dir: Some(dir.clone()),
                ..Default::default()
            })
            .map_err(|e| anyhow!(e))?;
        let _ = std::fs::remove_dir_all(&dir);
        made += 1;
        if made % 10 == 0 {
            eprintln!("synthesized {made} models");
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    if made > 0 {
        eprintln!("synthesized and imported {made} models ({tag})");
    }
    Ok(names)
}

pub fn run(storage: &Option<PathBuf>, a: BenchDaemonArgs) -> Result<ExitCode> {
    let home = home(storage);
    let client = connect(&home)?;
    let status = client.status().map_err(|e| anyhow!(e))?;
    let place: Place = a.tier.parse().map_err(anyhow::Error::msg)?;
    let place = match place {
        Place::Auto if status.gpus > 0 => Place::Gpu(0),
        Place::Auto => Place::Memory,
        p => p,
    };
    let scenarios: Vec<&str> = match a.scenario.as_str() {
        "all" => vec!["upload", "attach", "swap"],
        s @ ("upload" | "attach" | "swap") => vec![s],
        s => bail!("unknown scenario {s:?} (upload, attach, swap or all)"),
    };
    let needs_models = scenarios.contains(&"swap") || a.model.is_none();
    let models = if needs_models {
        ensure_models(&home, &client, &a)?
    } else {
        Vec::new()
    };
    let model = a
        .model
        .clone()
        .or_else(|| models.first().cloned())
        .ok_or_else(|| anyhow!("no model: pass --model or --models N"))?;
    let gpu = match place {
        Place::Gpu(n) => {
            let cuda = flash_sys::cuda::probe().map_err(|e| anyhow!("GPU tier asked, but: {e}"))?;
            let g = cuda.device(n as usize)?;
            g.bind_to_thread()?;
            Some(g)
        }
        _ => None,
    };
    let mut failed = false;
    for sc in scenarios {
        match sc {
            "upload" => {
                let Place::Gpu(n) = place else {
                    out(
                        a.json,
                        json!({"scenario": "upload", "skipped": "needs a GPU tier"}),
                        "upload: skipped (needs a GPU tier)".into(),
                    );
                    continue;
                };
                let mut times = Vec::new();
                let mut bytes = 0;
                for _ in 0..a.repeat.max(1) {
                    let _ = client.unload(&model, place);
                    client
                        .load(&model, Place::Memory, false)
                        .map_err(|e| anyhow!(e))?;
                    let r = client.load(&model, place, false).map_err(|e| anyhow!(e))?;
                    if r.served_from != "memory" {
                        bail!(
                            "{model} came from {} instead of the memory tier",
                            r.served_from
                        );
                    }
                    bytes = r.bytes;
                    times.push(r.seconds);
                }
                times.sort_by(f64::total_cmp);
                let (best, median) = (times[0], percentile(&times, 0.5));
                out(
                    a.json,
                    json!({"scenario": "upload", "model": model, "gpu": n, "bytes": bytes,
                           "best_seconds": best, "median_seconds": median,
                           "gb_per_s": bytes as f64 / best / 1e9, "runs": times}),
                    format!(
                        "upload   {model}: memory -> gpu:{n}, {:.2} GB in {best:.3} s best, {median:.3} s median ({:.1} GB/s)",
                        bytes as f64 / 1e9,
                        bytes as f64 / best / 1e9
                    ),
                );
            }
            "attach" => {
                client.load(&model, place, false).map_err(|e| anyhow!(e))?;
                let mut cold = Vec::new();
                let mut warm = Vec::new();
                // Phases of the warm attach (ms): the acquire call, the
                // daemon's share of it, and mapping the lease here.
                let (mut rpc, mut daemon, mut map) = (Vec::new(), Vec::new(), Vec::new());
                for _ in 0..a.repeat.max(1) {
                    let t0 = Instant::now();
                    let mut c = Client::connect(&home).map_err(|e| anyhow!(e))?;
                    let lease = c.acquire(&model, place).map_err(|e| anyhow!(e))?;
                    let mapped = usable(&lease, gpu.as_ref())?;
                    cold.push(t0.elapsed().as_secs_f64());
                    drop(mapped);
                    c.release(lease).map_err(|e| anyhow!(e))?;
                    // Once more on the open connection and session.
                    let t3 = Instant::now();
                    let lease = c.acquire(&model, place).map_err(|e| anyhow!(e))?;
                    let t4 = Instant::now();
                    let usable2 = usable(&lease, gpu.as_ref())?;
                    warm.push(t3.elapsed().as_secs_f64());
                    rpc.push((t4 - t3).as_secs_f64() * 1e3);
                    daemon.push(lease.seconds * 1e3);
                    map.push(t4.elapsed().as_secs_f64() * 1e3);
                    drop(usable2);
                    c.release(lease).map_err(|e| anyhow!(e))?;
                }
                for v in [&mut cold, &mut warm, &mut rpc, &mut daemon, &mut map] {
                    v.sort_by(f64::total_cmp);
                }
                out(
                    a.json,
                    json!({"scenario": "attach", "model": model, "tier": place.to_string(),
                           "connect_to_usable_median_s": percentile(&cold, 0.5),
                           "connect_to_usable_best_s": cold[0],
                           "acquire_to_usable_median_s": percentile(&warm, 0.5),
                           "acquire_to_usable_best_s": warm[0],
                           "acquire_rpc_median_ms": percentile(&rpc, 0.5),
                           "acquire_in_daemon_median_ms": percentile(&daemon, 0.5),
                           "map_median_ms": percentile(&map, 0.5)}),
                    format!(
                        "attach   {model} in {}: connect -> usable {:.2} ms median ({:.2} best); on an open connection {:.2} ms median \
                         (acquire call {:.2} ms, {:.2} ms of it in the daemon; mapping {:.2} ms)",
                        place,
                        percentile(&cold, 0.5) * 1e3,
                        cold[0] * 1e3,
                        percentile(&warm, 0.5) * 1e3,
                        percentile(&rpc, 0.5),
                        percentile(&daemon, 0.5),
                        percentile(&map, 0.5),
                    ),
                );
            }
            "swap" => {
                let r = swap(&home, &a, &models, place, gpu.as_ref())?;
                failed |= r;
            }
            _ => unreachable!(),
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Makes a lease's bytes usable in this process: maps the GPU copy (IPC) or
/// the shared memory.
fn usable(
    lease: &flash_client::Lease,
    gpu: Option<&flash_sys::cuda::Gpu>,
) -> Result<Box<dyn std::any::Any>> {
    Ok(match &lease.location {
        Location::Cuda { .. } => {
            let g = gpu.ok_or_else(|| anyhow!("a GPU lease without CUDA here"))?;
            Box::new(lease.map_gpu(g).map_err(|e| anyhow!(e))?)
        }
        Location::Shm { .. } => Box::new(lease.map_host().map_err(|e| anyhow!(e))?),
    })
}

#[derive(Default)]
struct Tally {
    /// Latencies (s) by source tier.
    by_source: BTreeMap<String, Vec<f64>>,
    errors: u64,
    first_errors: Vec<String>,
}

/// The swap workload; returns whether any request failed.
fn swap(
    home: &Path,
    a: &BenchDaemonArgs,
    models: &[String],
    place: Place,
    gpu: Option<&flash_sys::cuda::Gpu>,
) -> Result<bool> {
    if models.is_empty() {
        bail!("the swap workload needs --models N > 0");
    }
    let cdf = Arc::new(zipf_cdf(models.len(), a.zipf));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs_f64(a.duration.max(0.0));
    let t0 = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let mut handles = Vec::new();
        for c in 0..a.clients.max(1) {
            let (cdf, tally, stop) = (cdf.clone(), tally.clone(), stop.clone());
            let gpu = gpu.cloned();
            handles.push(s.spawn(move || -> Result<()> {
                let mut client = Client::connect(home).map_err(|e| anyhow!(e))?;
                let mut rng = Rng::new(a.seed.wrapping_add(c as u64 * 7919));
                while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                    let m = &models[pick(&cdf, rng.unit())];
                    let t = Instant::now();
                    let r = client
                        .acquire(m, place)
                        .map_err(|e| anyhow!(e))
                        .and_then(|lease| {
                            let u = if a.map {
                                Some(usable(&lease, gpu.as_ref())?)
                            } else {
                                None
                            };
                            let from = lease.served_from.clone();
                            drop(u);
                            client.release(lease).map_err(|e| anyhow!(e))?;
                            Ok(from)
                        });
                    let dt = t.elapsed().as_secs_f64();
                    let mut tl = tally.lock().unwrap_or_else(|p| p.into_inner());
                    match r {
                        Ok(from) => tl.by_source.entry(from).or_default().push(dt),
                        Err(e) => {
                            tl.errors += 1;
                            if tl.first_errors.len() < 5 {
                                tl.first_errors.push(format!("{m}: {e}"));
                            }
                        }
                    }
                }
                Ok(())
            }));
        }
        for h in handles {
            h.join()
                .map_err(|_| anyhow!("a client thread panicked"))??;
        }
        Ok(())
    })?;
    let elapsed = t0.elapsed().as_secs_f64();
    let mut tl = tally.lock().unwrap_or_else(|p| p.into_inner());
    let total: usize = tl.by_source.values().map(|v| v.len()).sum();
    let mut per = serde_json::Map::new();
    let mut lines = Vec::new();
    for (from, v) in tl.by_source.iter_mut() {
        v.sort_by(f64::total_cmp);
        let (p50, p99, max) = (percentile(v, 0.5), percentile(v, 0.99), v[v.len() - 1]);
        per.insert(
            from.clone(),
            json!({"count": v.len(), "p50_s": p50, "p99_s": p99, "max_s": max}),
        );
        let label = if *from == place.to_string() {
            format!("{from} (hit)")
        } else {
            format!("from {from}")
        };
        lines.push(format!(
            "  {label:<14} {:>7} requests  p50 {:>9.3} ms  p99 {:>9.3} ms  max {:>9.3} ms",
            v.len(),
            p50 * 1e3,
            p99 * 1e3,
            max * 1e3
        ));
    }
    out(
        a.json,
        json!({"scenario": "swap", "models": models.len(), "clients": a.clients, "zipf": a.zipf,
               "tier": place.to_string(), "seconds": elapsed, "requests": total,
               "errors": tl.errors, "first_errors": tl.first_errors, "by_source": per}),
        format!(
            "swap     {} models, {} clients, zipf {}, {:.0} s: {} requests ({:.1}/s), {} errors\n{}{}",
            models.len(),
            a.clients,
            a.zipf,
            elapsed,
            total,
            total as f64 / elapsed.max(1e-9),
            tl.errors,
            lines.join("\n"),
            if tl.first_errors.is_empty() {
                String::new()
            } else {
                format!("\n  first errors:\n    {}", tl.first_errors.join("\n    "))
            }
        ),
    );
    Ok(tl.errors > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_prefers_low_ranks() {
        let cdf = zipf_cdf(100, 1.0);
        assert!((cdf[99] - 1.0).abs() < 1e-9);
        let mut rng = Rng::new(3);
        let mut counts = [0usize; 100];
        for _ in 0..20_000 {
            counts[pick(&cdf, rng.unit())] += 1;
        }
        assert!(
            counts[0] > counts[9] && counts[9] > counts[99],
            "{counts:?}"
        );
        assert!(counts.iter().all(|&c| c > 0) || counts[99] < 50);
        assert_eq!(percentile(&[1.0, 2.0, 3.0], 0.5), 2.0);
    }
}
