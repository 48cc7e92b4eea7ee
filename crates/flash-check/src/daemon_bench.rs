//! The daemon's targets, measured from a client process against a running
//! daemon (`flash bench-daemon`; the daemon started first, with the budgets
//! the workload needs).
//!
//! - [`upload`]: memory tier → GPU of one model (the daemon's time; the
//!   model is dropped from the GPU and kept in memory before each run);
//! - [`attach`]: this process (not the daemon) connects, leases a
//!   resident model in share mode and maps it: time to usable device
//!   pointers (CUDA context made beforehand, as a real client has one);
//! - [`swap`]: N models, C concurrent clients (each its own connection and
//!   session), Zipf(s) popularity, for D seconds: every request acquires,
//!   maps (GPU) and releases; errors and p50/p99 latency per source tier
//!   (where the daemon found the bytes: the requested tier for a hit, else
//!   memory or disk).
//!
//! Runs on the CPU too (memory tier only: no upload), which is how the
//! tests run a small version of it.

use crate::{CheckError, Result};
use flash_client::{Client, Lease, Location, Place, PullSpec, StatusReply};
use flash_sys::cuda::Gpu;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
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
    cdf.partition_point(|&c| c < u)
        .min(cdf.len().saturating_sub(1))
}

/// The `p` quantile (0 to 1) of sorted values, NaN for none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The tier `tier` names (`auto`: GPU 0 when the daemon has one, else
/// memory).
pub fn place(tier: &str, status: &StatusReply) -> Result<Place> {
    Ok(match tier.parse().map_err(CheckError::Invalid)? {
        Place::Auto if status.gpus > 0 => Place::Gpu(0),
        Place::Auto => Place::Memory,
        p => p,
    })
}

/// The GPU of a GPU tier, bound to this thread (a client maps GPU leases
/// with it); none for the memory tier.
pub fn gpu_for(place: Place) -> Result<Option<Gpu>> {
    match place {
        Place::Gpu(n) => {
            let cuda = flash_sys::cuda::probe()
                .map_err(|e| CheckError::Failed(format!("GPU tier asked, but: {e}")))?;
            let g = cuda.device(n as usize)?;
            g.bind_to_thread()?;
            Ok(Some(g))
        }
        _ => Ok(None),
    }
}

/// The swap models to have in the store.
#[derive(Clone, Debug)]
pub struct ModelSet {
    /// `ARCH:SIZE` of flash-synth's presets.
    pub synth: String,
    /// Keep only this many decoder layers (smaller models of real width).
    pub layers: Option<usize>,
    pub count: usize,
    pub seed: u64,
    /// Store them compressed (named `...-c-<i>`, apart from the plain ones).
    pub compress: bool,
}

/// The names of the swap models (`bench/<arch>-<size>[-l<layers>][-c]-<i>`),
/// synthesized into `<home>/tmp` and pulled through the daemon when
/// missing. `on_progress(made)` hears of each model made.
pub fn ensure_models(
    home: &Path,
    client: &Client,
    set: &ModelSet,
    mut on_progress: impl FnMut(usize),
) -> Result<Vec<String>> {
    let (arch, size) = set
        .synth
        .split_once(':')
        .ok_or_else(|| CheckError::Invalid("--synth wants ARCH:SIZE, e.g. qwen3:0.6b".into()))?;
    let arch: flash_synth::Arch = arch.parse()?;
    let mut spec = flash_synth::spec(arch, size)?;
    let mut tag = format!("{}-{}", arch.name(), size.to_ascii_lowercase());
    if let Some(l) = set.layers {
        if l == 0 {
            return Err(CheckError::Invalid("--layers must be at least 1".into()));
        }
        spec.shape.num_hidden_layers = l;
        tag.push_str(&format!("-l{l}"));
    }
    if set.compress {
        tag.push_str("-c");
    }
    let names: Vec<String> = (0..set.count)
        .map(|i| format!("bench/{tag}-{i:03}"))
        .collect();
    let scratch = home
        .join("tmp")
        .join(format!("bench-synth-{}", std::process::id()));
    let mut made = 0;
    for (i, name) in names.iter().enumerate() {
        if client.info(name)?.is_some() {
            continue;
        }
        let dir = scratch.join(format!("m{i}"));
        let opts = flash_synth::SynthOptions {
            seed: set.seed.wrapping_mul(1000) + i as u64 + 1,
            ..Default::default()
        };
        flash_synth::synth(&spec, &dir, &opts)?;
        client.pull(&PullSpec {
            model: name.clone(),
            from_dir: Some(dir.clone()),
            // Said either way: the store's default must not decide what a
            // name of this set holds.
            compress: Some(set.compress),
            ..Default::default()
        })?;
        let _ = std::fs::remove_dir_all(&dir);
        made += 1;
        on_progress(made);
    }
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(names)
}

/// Memory tier → GPU of one model.
#[derive(Debug, Serialize)]
pub struct UploadReport {
    pub bytes: u64,
    /// Each run's seconds, sorted.
    pub runs: Vec<f64>,
    pub best_seconds: f64,
    pub median_seconds: f64,
}

/// `repeat` uploads of `model` from the memory tier to the GPU tier
/// `place` (dropped from the GPU and loaded into memory before each).
pub fn upload(client: &Client, model: &str, place: Place, repeat: usize) -> Result<UploadReport> {
    let mut runs = Vec::new();
    let mut bytes = 0;
    for _ in 0..repeat.max(1) {
        let _ = client.unload(model, place);
        client.load(model, Place::Memory, false)?;
        let r = client.load(model, place, false)?;
        if r.served_from != "memory" {
            return Err(CheckError::Failed(format!(
                "{model} came from {} instead of the memory tier",
                r.served_from
            )));
        }
        bytes = r.bytes;
        runs.push(r.seconds);
    }
    runs.sort_by(f64::total_cmp);
    Ok(UploadReport {
        bytes,
        best_seconds: runs[0],
        median_seconds: percentile(&runs, 0.5),
        runs,
    })
}

/// Time to usable bytes or pointers in this process (seconds, sorted
/// lists of each run), and the phases of an attach on an open connection
/// (milliseconds).
#[derive(Debug, Serialize)]
pub struct AttachReport {
    /// Connect, acquire, map.
    pub connect_to_usable_s: Vec<f64>,
    /// Acquire and map on an open connection and session.
    pub acquire_to_usable_s: Vec<f64>,
    /// The acquire call, as this process saw it.
    pub acquire_rpc_ms: Vec<f64>,
    /// The daemon's share of the acquire call.
    pub acquire_in_daemon_ms: Vec<f64>,
    /// Mapping the lease here.
    pub map_ms: Vec<f64>,
}

/// Makes a lease's bytes usable in this process: maps the GPU copy (IPC) or
/// the shared memory; usable while the returned value lives.
fn usable(lease: &Lease, gpu: Option<&Gpu>) -> Result<Box<dyn std::any::Any>> {
    Ok(match &lease.location {
        Location::Cuda { .. } => {
            let g =
                gpu.ok_or_else(|| CheckError::Failed("a GPU lease without CUDA here".into()))?;
            Box::new(lease.map_gpu(g)?)
        }
        Location::Shm { .. } => Box::new(lease.map_host()?),
    })
}

/// `repeat` attaches of `model` (loaded into `place` first) from a new
/// connection, each followed by one on that open connection.
pub fn attach(
    home: &Path,
    client: &Client,
    model: &str,
    place: Place,
    gpu: Option<&Gpu>,
    repeat: usize,
) -> Result<AttachReport> {
    client.load(model, place, false)?;
    let mut r = AttachReport {
        connect_to_usable_s: Vec::new(),
        acquire_to_usable_s: Vec::new(),
        acquire_rpc_ms: Vec::new(),
        acquire_in_daemon_ms: Vec::new(),
        map_ms: Vec::new(),
    };
    for _ in 0..repeat.max(1) {
        let t0 = Instant::now();
        let mut c = Client::connect(home)?;
        let lease = c.acquire(model, place)?;
        let mapped = usable(&lease, gpu)?;
        r.connect_to_usable_s.push(t0.elapsed().as_secs_f64());
        drop(mapped);
        c.release(lease)?;
        // Once more on the open connection and session.
        let t3 = Instant::now();
        let lease = c.acquire(model, place)?;
        let t4 = Instant::now();
        let mapped = usable(&lease, gpu)?;
        r.acquire_to_usable_s.push(t3.elapsed().as_secs_f64());
        r.acquire_rpc_ms.push((t4 - t3).as_secs_f64() * 1e3);
        r.acquire_in_daemon_ms.push(lease.seconds * 1e3);
        r.map_ms.push(t4.elapsed().as_secs_f64() * 1e3);
        drop(mapped);
        c.release(lease)?;
    }
    for v in [
        &mut r.connect_to_usable_s,
        &mut r.acquire_to_usable_s,
        &mut r.acquire_rpc_ms,
        &mut r.acquire_in_daemon_ms,
        &mut r.map_ms,
    ] {
        v.sort_by(f64::total_cmp);
    }
    Ok(r)
}

/// The swap workload's shape.
#[derive(Clone, Debug)]
pub struct SwapOptions {
    /// Concurrent clients (each its own connection and session).
    pub clients: usize,
    /// Zipf exponent of model popularity.
    pub zipf: f64,
    /// Seconds of workload.
    pub duration: f64,
    /// Map each lease, as a real client would.
    pub map: bool,
    /// Copy mode instead of a lease: the daemon copies (and decodes) the
    /// model into a shared-memory file of the client, as a host-memory
    /// client reads a compressed model (the memory tier holds it
    /// compressed, which share mode cannot hand out as tensors).
    pub copy: bool,
    pub seed: u64,
}

/// Latencies of the requests served from one tier.
#[derive(Debug, Serialize)]
pub struct Latency {
    pub count: usize,
    pub p50_s: f64,
    pub p99_s: f64,
    pub max_s: f64,
}

impl Latency {
    fn of(mut v: Vec<f64>) -> Self {
        v.sort_by(f64::total_cmp);
        Latency {
            count: v.len(),
            p50_s: percentile(&v, 0.5),
            p99_s: percentile(&v, 0.99),
            max_s: v.last().copied().unwrap_or(f64::NAN),
        }
    }
}

/// What the swap workload saw.
#[derive(Debug, Serialize)]
pub struct SwapReport {
    pub seconds: f64,
    pub requests: usize,
    pub errors: u64,
    /// The first few errors, with the model each was for.
    pub first_errors: Vec<String>,
    /// Every successful request, whatever served it.
    pub all: Latency,
    /// By the tier the daemon found the bytes in.
    pub by_source: BTreeMap<String, Latency>,
}

#[derive(Default)]
struct Tally {
    /// Latencies (s) by source tier.
    by_source: BTreeMap<String, Vec<f64>>,
    errors: u64,
    first_errors: Vec<String>,
}

impl Tally {
    fn record(&mut self, model: &str, dt: f64, r: Result<String>) {
        match r {
            Ok(from) => self.by_source.entry(from).or_default().push(dt),
            Err(e) => {
                self.errors += 1;
                if self.first_errors.len() < 5 {
                    self.first_errors.push(format!("{model}: {e}"));
                }
            }
        }
    }
}

/// Runs the swap workload over `models` against the daemon at `home`.
pub fn swap(
    home: &Path,
    models: &[String],
    place: Place,
    gpu: Option<&Gpu>,
    o: &SwapOptions,
) -> Result<SwapReport> {
    if models.is_empty() {
        return Err(CheckError::Invalid(
            "the swap workload needs --models N > 0".into(),
        ));
    }
    let cdf = zipf_cdf(models.len(), o.zipf);
    let tally = Mutex::new(Tally::default());
    let stop = AtomicBool::new(false);
    let deadline = Instant::now() + Duration::from_secs_f64(o.duration.max(0.0));
    let t0 = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = (0..o.clients.max(1))
            .map(|c| {
                let (cdf, tally, stop) = (&cdf, &tally, &stop);
                let gpu = gpu.cloned();
                s.spawn(move || -> Result<()> {
                    let mut client = Client::connect(home)?;
                    let mut rng = Rng::new(o.seed.wrapping_add(c as u64 * 7919));
                    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                        let m = &models[pick(cdf, rng.unit())];
                        let t = Instant::now();
                        let r = if o.copy {
                            one_copy(&client, m)
                        } else {
                            one_request(&mut client, m, place, o.map, gpu.as_ref())
                        };
                        let dt = t.elapsed().as_secs_f64();
                        tally
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .record(m, dt, r);
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| CheckError::Failed("a client thread panicked".into()))??;
        }
        Ok(())
    })?;
    let seconds = t0.elapsed().as_secs_f64();
    let tally = tally.into_inner().unwrap_or_else(|p| p.into_inner());
    let all: Vec<f64> = tally.by_source.values().flatten().copied().collect();
    let by_source: BTreeMap<String, Latency> = tally
        .by_source
        .into_iter()
        .map(|(from, v)| (from, Latency::of(v)))
        .collect();
    Ok(SwapReport {
        seconds,
        requests: all.len(),
        errors: tally.errors,
        first_errors: tally.first_errors,
        all: Latency::of(all),
        by_source,
    })
}

/// One request of the workload: acquire, map (when asked), release; the
/// tier the bytes came from.
fn one_request(
    client: &mut Client,
    model: &str,
    place: Place,
    map: bool,
    gpu: Option<&Gpu>,
) -> Result<String> {
    let lease = client.acquire(model, place)?;
    let mapped = if map {
        Some(usable(&lease, gpu)?)
    } else {
        None
    };
    let from = lease.served_from.clone();
    drop(mapped);
    client.release(lease)?;
    Ok(from)
}

/// One request in copy mode: the whole image into a shared-memory file of
/// this process (removed again); the tier the bytes came from, as
/// [`one_request`] names it.
fn one_copy(client: &Client, model: &str) -> Result<String> {
    let (file, _info, reply) = client.fill_shm(model)?;
    drop(file);
    Ok(if reply.loaded_from.is_empty() {
        reply.source_tier
    } else {
        reply.loaded_from
    })
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
        assert!(percentile(&[], 0.5).is_nan());
    }
}
