//! The swap workload of `flash bench-daemon --scenario swap` (30 models,
//! Zipf 1.0, a GPU tier of 3 and a memory tier of 6, every request a GPU
//! lease) run against the real [`flash_tier::TierManager`] over fake tiers
//! whose transfers take simulated time: a disk every read in flight shares,
//! and a host-to-GPU link every upload shares. What it tells: the share of
//! requests each tier serves and the latency that follows from the policy
//! (who waits for room, what is evicted, what the memory tier keeps) when
//! several clients contend, on a machine without a GPU.
//!
//! ```text
//! cargo run --release -p flash-tier --example swap_sim -- [SECONDS] [CLIENTS...]
//! ```
//!
//! Times are the daemon's on the GPU machine (H200, one client,
//! bench/results/2026-12-04-NVIDIA-H200-swapcold-queue-*), scaled down 10x
//! while running: a Qwen3-0.6B-shaped model (1.19 GB) from disk in 0.766 s
//! alone (1.56 GB/s), from the memory tier in 0.028 s (42.6 GB/s); several
//! in flight share those rates. `SIM_SEED` picks the clients' random
//! streams. Default: 40 s with 1 client, then 4.

#[path = "../tests/fake/mod.rs"]
mod fake;

use fake::{m, rig, Rng, GPU};
use flash_tier::{ClientId, Tier, TierError};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Wall time runs this much faster than the GPU machine's.
const SCALE: f64 = 10.0;
const MODELS: usize = 30;
/// Sizes in MB: a Qwen3-0.6B-shaped image; the budgets of device.sh's
/// swap-cold stage (`--mem-pool 7000M --gpu-budget 3500M`).
const MODEL_MB: u64 = 1192;
const MEMORY_MB: u64 = 7000 * 1_048_576 / 1_000_000;
const GPU_MB: u64 = 3500 * 1_048_576 / 1_000_000;
/// Nanoseconds of the link per MB at full speed, scaled.
const DISK_NS_PER_MB: f64 = 0.766e9 / MODEL_MB as f64 / SCALE;
const UPLOAD_NS_PER_MB: f64 = 0.028e9 / MODEL_MB as f64 / SCALE;

fn main() {
    let args: Vec<f64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers: SECONDS CLIENTS..."))
        .collect();
    let seconds = args.first().copied().unwrap_or(40.0);
    let clients: Vec<usize> = match args.get(1..) {
        Some(c) if !c.is_empty() => c.iter().map(|&c| c as usize).collect(),
        _ => vec![1, 4],
    };
    for c in clients {
        run(seconds, c);
    }
}

fn run(seconds: f64, clients: usize) {
    let seed: u64 = std::env::var("SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    // SIM_DISK_LOADS: loads reading the disk at once (0: no limit).
    let disk_loads: usize = std::env::var("SIM_DISK_LOADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(flash_tier::DEFAULT_DISK_LOADS);
    let names: Vec<String> = (0..MODELS).map(|i| format!("m{i:02}")).collect();
    let sizes: Vec<(&str, u64)> = names.iter().map(|n| (n.as_str(), MODEL_MB)).collect();
    let r = rig(MEMORY_MB, &[GPU_MB])
        .models(&sizes)
        .space_wait(Duration::from_secs_f64(30.0 / SCALE))
        .disk_loads(disk_loads)
        .build();
    let fakes = r.fakes();
    fakes
        .disk_ns_per_byte
        .store(DISK_NS_PER_MB as u64, Ordering::SeqCst);
    fakes
        .upload_ns_per_byte
        .store(UPLOAD_NS_PER_MB as u64, Ordering::SeqCst);
    let weights: Vec<f64> = (1..=MODELS).map(|k| 1.0 / k as f64).collect();
    let total: f64 = weights.iter().sum();
    let by_source: Mutex<BTreeMap<String, Vec<f64>>> = Mutex::default();
    let errors = Mutex::new(Vec::<String>::new());
    let deadline = Instant::now() + Duration::from_secs_f64(seconds / SCALE);
    std::thread::scope(|s| {
        for c in 0..clients {
            let (r, names, weights, by_source, errors) =
                (&r, &names, &weights, &by_source, &errors);
            s.spawn(move || {
                let mut rng = Rng(seed + 7919 * c as u64);
                while Instant::now() < deadline {
                    let mut u = rng.unit() * total;
                    let i = weights.iter().position(|w| {
                        u -= w;
                        u < 0.0
                    });
                    let model = m(&names[i.unwrap_or(MODELS - 1)]);
                    let t = Instant::now();
                    match r.mgr.acquire(&model, GPU, ClientId(1 + c as u64)) {
                        Ok(lease) => {
                            let from = match lease.served_from() {
                                Tier::Disk => "disk".to_string(),
                                t => t.to_string(),
                            };
                            let dt = t.elapsed().as_secs_f64() * SCALE;
                            drop(lease);
                            by_source.lock().unwrap().entry(from).or_default().push(dt);
                        }
                        Err(e @ TierError::NoSpace(_)) => {
                            errors.lock().unwrap().push(e.to_string())
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
            });
        }
    });
    r.assert_sound();
    let by_source = by_source.into_inner().unwrap();
    let all: Vec<f64> = by_source.values().flatten().copied().collect();
    let n = all.len();
    let errors = errors.into_inner().unwrap();
    println!(
        "{clients} client(s), {seconds:.0} s: {n} requests, {} errors, all p50 {:.3} s p99 {:.3} s",
        errors.len(),
        pct(&all, 0.5),
        pct(&all, 0.99)
    );
    let share = |from: &str| by_source.get(from).map_or(0, Vec::len) as f64 / n.max(1) as f64;
    // One JSON line for bench/results.
    let p50: BTreeMap<&str, f64> = by_source
        .iter()
        .map(|(from, v)| (from.as_str(), pct(v, 0.5)))
        .collect();
    let row = serde_json::json!({
        "loader": "flash-tier-sim", "model": "30 x qwen3-0.6b (simulated)",
        "scenario": format!("swap-cold-{clients}c"), "seconds": seconds, "card": "cpu-sim",
        "seed": seed, "clients": clients, "disk_loads": disk_loads, "requests": n, "errors": errors.len(),
        "p50_s": pct(&all, 0.5), "p99_s": pct(&all, 0.99),
        "disk_share": share("disk"), "gpu_share": share("gpu:0"), "p50_by_source": p50,
    });
    println!("{row}");
    for (from, v) in &by_source {
        println!(
            "  from {from:<7} {:>4} ({:>4.1} %)  p50 {:.3} s  p99 {:.3} s",
            v.len(),
            100.0 * v.len() as f64 / n.max(1) as f64,
            pct(v, 0.5),
            pct(v, 0.99)
        );
    }
}

fn pct(v: &[f64], q: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n => v[((n - 1) as f64 * q).round() as usize],
    }
}
