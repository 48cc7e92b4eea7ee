//! `flash bench-daemon`: the daemon's targets measured from this process
//! against a running daemon (flash-check's `daemon_bench`: upload, attach, a
//! swap workload), one line or one JSON object per scenario.

use crate::args::BenchDaemonArgs;
use crate::ctx::Ctx;
use anyhow::{anyhow, bail, Result};
use flash_check::daemon_bench::{
    self as bench, percentile, AttachReport, Latency, ModelSet, SwapOptions, SwapReport,
    UploadReport,
};
use flash_client::{Client, Place};
use serde_json::json;
use std::process::ExitCode;

fn out(json: bool, v: serde_json::Value, text: String) {
    if json {
        println!("{v}");
    } else {
        println!("{text}");
    }
}

pub fn run(ctx: &Ctx, a: BenchDaemonArgs) -> Result<ExitCode> {
    let home = ctx.home();
    let client = Client::connect(&home)?;
    let status = client.status()?;
    let place = bench::place(&a.tier, &status)?;
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
    let gpu = bench::gpu_for(place)?;
    // A compressed model's memory copy holds its stored bytes: without a GPU
    // tier to decode into, clients read it in copy mode.
    let copy = a.compress && !matches!(place, Place::Gpu(_));
    let mut failed = false;
    for sc in scenarios {
        match (sc, place) {
            ("upload", Place::Gpu(n)) => print_upload(
                a.json,
                &model,
                n,
                &bench::upload(&client, &model, place, a.repeat)?,
            ),
            ("upload", _) => out(
                a.json,
                json!({"scenario": "upload", "skipped": "needs a GPU tier"}),
                "upload: skipped (needs a GPU tier)".into(),
            ),
            ("attach", _) if copy => out(
                a.json,
                json!({"scenario": "attach", "skipped": "compressed models in the memory tier are read in copy mode"}),
                "attach: skipped (compressed models in the memory tier are read in copy mode)"
                    .into(),
            ),
            ("attach", _) => {
                let r = bench::attach(&home, &client, &model, place, gpu.as_ref(), a.repeat)?;
                print_attach(a.json, &model, place, &r);
            }
            _ => {
                let o = SwapOptions {
                    clients: a.clients,
                    zipf: a.zipf,
                    duration: a.duration,
                    map: a.map,
                    copy,
                    seed: a.seed,
                };
                let r = bench::swap(&home, &models, place, gpu.as_ref(), &o)?;
                print_swap(&a, models.len(), place, copy, &r);
                failed |= r.errors > 0;
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// The swap models, synthesized and pulled when missing (progress on stderr).
fn ensure_models(
    home: &std::path::Path,
    client: &Client,
    a: &BenchDaemonArgs,
) -> Result<Vec<String>> {
    let set = ModelSet {
        synth: a.synth.clone(),
        layers: a.layers,
        count: a.models,
        seed: a.seed,
        compress: a.compress,
    };
    let mut made = 0;
    let names = bench::ensure_models(home, client, &set, |n| {
        made = n;
        if n % 10 == 0 {
            eprintln!("synthesized {n} models");
        }
    })?;
    if made > 0 {
        eprintln!("synthesized and imported {made} models ({})", a.synth);
    }
    Ok(names)
}

fn print_upload(json: bool, model: &str, n: u32, r: &UploadReport) {
    let (best, median) = (r.best_seconds, r.median_seconds);
    let gbps = r.bytes as f64 / best / 1e9;
    out(
        json,
        json!({"scenario": "upload", "model": model, "gpu": n, "bytes": r.bytes,
               "best_seconds": best, "median_seconds": median,
               "gb_per_s": gbps, "runs": r.runs}),
        format!(
            "upload   {model}: memory -> gpu:{n}, {:.2} GB in {best:.3} s best, {median:.3} s median ({gbps:.1} GB/s)",
            r.bytes as f64 / 1e9,
        ),
    );
}

fn print_attach(json: bool, model: &str, place: Place, r: &AttachReport) {
    let median = |v: &[f64]| percentile(v, 0.5);
    let best = |v: &[f64]| v.first().copied().unwrap_or(f64::NAN);
    let (cold, warm) = (&r.connect_to_usable_s, &r.acquire_to_usable_s);
    out(
        json,
        json!({"scenario": "attach", "model": model, "tier": place.to_string(),
               "connect_to_usable_median_s": median(cold),
               "connect_to_usable_best_s": best(cold),
               "acquire_to_usable_median_s": median(warm),
               "acquire_to_usable_best_s": best(warm),
               "acquire_rpc_median_ms": median(&r.acquire_rpc_ms),
               "acquire_in_daemon_median_ms": median(&r.acquire_in_daemon_ms),
               "map_median_ms": median(&r.map_ms)}),
        format!(
            "attach   {model} in {}: connect -> usable {:.2} ms median ({:.2} best); on an open connection {:.2} ms median \
             (acquire call {:.2} ms, {:.2} ms of it in the daemon; mapping {:.2} ms)",
            place,
            median(cold) * 1e3,
            best(cold) * 1e3,
            median(warm) * 1e3,
            median(&r.acquire_rpc_ms),
            median(&r.acquire_in_daemon_ms),
            median(&r.map_ms),
        ),
    );
}

fn print_swap(a: &BenchDaemonArgs, models: usize, place: Place, copy: bool, r: &SwapReport) {
    let row = |label: &str, l: &Latency| {
        format!(
            "  {label:<14} {:>7} requests  p50 {:>9.3} ms  p99 {:>9.3} ms  max {:>9.3} ms",
            l.count,
            l.p50_s * 1e3,
            l.p99_s * 1e3,
            l.max_s * 1e3
        )
    };
    let mut lines = vec![row("all", &r.all)];
    for (from, l) in &r.by_source {
        let label = if *from == place.to_string() {
            format!("{from} (hit)")
        } else {
            format!("from {from}")
        };
        lines.push(row(&label, l));
    }
    out(
        a.json,
        json!({"scenario": "swap", "models": models, "clients": a.clients, "zipf": a.zipf,
               "tier": place.to_string(), "compressed": a.compress,
               "mode": if copy { "copy" } else { "share" },
               "seconds": r.seconds, "requests": r.requests,
               "errors": r.errors, "first_errors": r.first_errors, "all": r.all,
               "by_source": r.by_source}),
        format!(
            "swap     {} models{}, {} clients, zipf {}, {:.0} s: {} requests ({:.1}/s), {} errors\n{}{}",
            models,
            match (a.compress, copy) {
                (true, true) => " (compressed, copy mode)",
                (true, false) => " (compressed)",
                _ => "",
            },
            a.clients,
            a.zipf,
            r.seconds,
            r.requests,
            r.requests as f64 / r.seconds.max(1e-9),
            r.errors,
            lines.join("\n"),
            if r.first_errors.is_empty() {
                String::new()
            } else {
                format!("\n  first errors:\n    {}", r.first_errors.join("\n    "))
            }
        ),
    );
}
