//! The HTTP listener: Prometheus `/metrics` and `/health`, as an
//! `axum::Router` that other crates extend with their routes (see
//! [`crate::server::run`]).
//!
//! The exposition is written by hand in the Prometheus text format (0.0.4):
//! every number already lives in the tier manager's status or in a few
//! counters of the daemon, so a metrics library would only copy them.
//!
//! Metrics (labels in braces):
//! - `flash_tier_budget_bytes`, `flash_tier_used_bytes`,
//!   `flash_tier_resident_bytes`, `flash_tier_reserved_bytes` {tier}:
//!   budgets and use (reserved: engines' buffers);
//! - `flash_tier_hits_total`, `flash_tier_coalesced_total`,
//!   `flash_tier_misses_total`, `flash_tier_evictions_total`,
//!   `flash_tier_evicted_bytes_total`, `flash_tier_loads_total`,
//!   `flash_tier_load_failures_total` {tier};
//! - `flash_bytes_moved_total` {tier}: bytes loaded into each tier;
//!   `flash_fill_bytes_total`: bytes copied into clients' buffers;
//! - `flash_load_seconds` {tier, from}: load durations into a tier by source
//!   tier (histogram);
//! - `flash_request_seconds` {tier, from}: acquire/fill latency seen by the
//!   daemon, by the tier served and where its bytes came from (a hit has
//!   `from` = `tier`): the switch latency (histogram);
//! - `flash_disk_loads` {state = reading | waiting}: loads reading the
//!   store's disk and loads waiting for their turn on it;
//! - `flash_sessions`, `flash_leases`, `flash_requests_total`,
//!   `flash_errors_total`, `flash_uptime_seconds`.

use crate::server::Daemon;
use crate::service::status_reply;
use axum::routing::get;
use flash_tier::{Tier, LOAD_SECONDS_BUCKETS};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Latency histograms keyed by (tier served, source tier).
#[derive(Debug, Default, Clone)]
pub struct Histograms {
    by: BTreeMap<(Tier, Tier), Histo>,
}

#[derive(Debug, Clone, Default)]
struct Histo {
    counts: [u64; LOAD_SECONDS_BUCKETS.len() + 1],
    sum: f64,
}

impl Histograms {
    pub fn observe(&mut self, tier: Tier, from: Tier, seconds: f64) {
        let h = self.by.entry((tier, from)).or_default();
        let i = LOAD_SECONDS_BUCKETS
            .iter()
            .position(|&le| seconds <= le)
            .unwrap_or(LOAD_SECONDS_BUCKETS.len());
        h.counts[i] += 1;
        h.sum += seconds;
    }
}

fn histogram(
    out: &mut String,
    name: &str,
    labels: &str,
    buckets: impl Iterator<Item = (f64, u64)>,
    count: u64,
    sum: f64,
) {
    for (le, c) in buckets {
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {c}");
    }
    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
    let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
    let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
}

/// The Prometheus text of the daemon's state.
pub(crate) fn render(d: &Daemon) -> String {
    let st = d.tiers.status();
    let reply = status_reply(d);
    let mut o = String::new();
    let gauge = |o: &mut String, name: &str, help: &str, kind: &str| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    gauge(
        &mut o,
        "flash_uptime_seconds",
        "Seconds since the daemon started.",
        "gauge",
    );
    let _ = writeln!(o, "flash_uptime_seconds {}", reply.uptime_seconds);
    type Field = fn(&flash_tier::TierReport) -> u64;
    let per_tier: [(&str, &str, &str, Field); 13] = [
        (
            "flash_tier_budget_bytes",
            "Budget of the tier.",
            "gauge",
            |t| t.budget,
        ),
        (
            "flash_tier_used_bytes",
            "Bytes counted in the tier (copies, loads, frees, engines).",
            "gauge",
            |t| t.used,
        ),
        (
            "flash_tier_resident_bytes",
            "Bytes of complete copies in the tier.",
            "gauge",
            |t| t.resident,
        ),
        (
            "flash_tier_reserved_bytes",
            "Bytes of the tier held for engines' buffers (KV caches, activations).",
            "gauge",
            |t| t.reserved,
        ),
        ("flash_tier_models", "Copies in the tier.", "gauge", |t| {
            t.models.len() as u64
        }),
        (
            "flash_tier_hits_total",
            "Requests that found their copy in the tier.",
            "counter",
            |t| t.counters.hits,
        ),
        (
            "flash_tier_coalesced_total",
            "Requests that shared another request's load.",
            "counter",
            |t| t.counters.coalesced,
        ),
        (
            "flash_tier_misses_total",
            "Requests that loaded (or were refused).",
            "counter",
            |t| t.counters.misses,
        ),
        (
            "flash_tier_evictions_total",
            "Copies evicted to make room.",
            "counter",
            |t| t.counters.evictions,
        ),
        (
            "flash_tier_evicted_bytes_total",
            "Bytes evicted.",
            "counter",
            |t| t.counters.evicted_bytes,
        ),
        (
            "flash_tier_loads_total",
            "Loads completed into the tier.",
            "counter",
            |t| t.counters.loads,
        ),
        (
            "flash_tier_load_failures_total",
            "Loads that failed.",
            "counter",
            |t| t.counters.load_failures,
        ),
        (
            "flash_bytes_moved_total",
            "Bytes loaded into the tier.",
            "counter",
            |t| t.counters.loaded_bytes,
        ),
    ];
    for (name, help, kind, f) in per_tier {
        gauge(&mut o, name, help, kind);
        for t in &st.tiers {
            let _ = writeln!(o, "{name}{{tier=\"{}\"}} {}", t.tier, f(t));
        }
    }
    gauge(
        &mut o,
        "flash_load_seconds",
        "Load durations into a tier by source tier.",
        "histogram",
    );
    for t in &st.tiers {
        for h in &t.load_seconds {
            let labels = format!("tier=\"{}\",from=\"{}\"", t.tier, h.from);
            histogram(
                &mut o,
                "flash_load_seconds",
                &labels,
                h.buckets.iter().map(|b| (b.le, b.count)),
                h.count,
                h.sum_seconds,
            );
        }
    }
    gauge(
        &mut o,
        "flash_request_seconds",
        "Acquire and fill latency by tier served and source of its bytes (switch latency).",
        "histogram",
    );
    {
        let sw = d.switch.lock().unwrap_or_else(|p| p.into_inner());
        for ((tier, from), h) in &sw.by {
            let labels = format!("tier=\"{tier}\",from=\"{from}\"");
            let mut acc = 0;
            let cum: Vec<(f64, u64)> = LOAD_SECONDS_BUCKETS
                .iter()
                .zip(h.counts)
                .map(|(&le, c)| {
                    acc += c;
                    (le, acc)
                })
                .collect();
            let count = h.counts.iter().sum();
            histogram(
                &mut o,
                "flash_request_seconds",
                &labels,
                cum.into_iter(),
                count,
                h.sum,
            );
        }
    }
    let scalars: [(&str, &str, &str, u64); 5] = [
        (
            "flash_fill_bytes_total",
            "Bytes copied into clients' buffers (copy mode).",
            "counter",
            d.filled_bytes.load(Ordering::Relaxed),
        ),
        (
            "flash_sessions",
            "Open client sessions.",
            "gauge",
            reply.sessions as u64,
        ),
        ("flash_leases", "Leases held.", "gauge", reply.leases as u64),
        (
            "flash_requests_total",
            "Load, acquire, fill and pull requests.",
            "counter",
            d.requests.load(Ordering::Relaxed),
        ),
        (
            "flash_errors_total",
            "Requests that failed.",
            "counter",
            d.errors.load(Ordering::Relaxed),
        ),
    ];
    for (name, help, kind, v) in scalars {
        gauge(&mut o, name, help, kind);
        let _ = writeln!(o, "{name} {v}");
    }
    gauge(
        &mut o,
        "flash_disk_loads",
        "Loads reading the store's disk, and loads waiting for their turn.",
        "gauge",
    );
    let _ = writeln!(
        o,
        "flash_disk_loads{{state=\"reading\"}} {}",
        st.disk_reading
    );
    let _ = writeln!(
        o,
        "flash_disk_loads{{state=\"waiting\"}} {}",
        st.disk_waiting
    );
    o
}

/// `/metrics` and `/health`.
pub(crate) fn router(d: Arc<Daemon>) -> axum::Router {
    let m = d.clone();
    axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let d = m.clone();
                async move {
                    let text = tokio::task::spawn_blocking(move || render(&d))
                        .await
                        .unwrap_or_default();
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        text,
                    )
                }
            }),
        )
        .route("/health", get(|| async { "ok\n" }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_histograms_are_cumulative_per_tier_and_source() {
        let mut h = Histograms::default();
        h.observe(Tier::Gpu(0), Tier::Gpu(0), 0.0004);
        h.observe(Tier::Gpu(0), Tier::Memory, 0.3);
        h.observe(Tier::Gpu(0), Tier::Memory, 700.0);
        assert_eq!(h.by.len(), 2);
        let m = &h.by[&(Tier::Gpu(0), Tier::Memory)];
        assert_eq!(m.counts.iter().sum::<u64>(), 2);
        assert_eq!(
            m.counts[LOAD_SECONDS_BUCKETS.len()],
            1,
            "700 s only in +Inf"
        );
        let mut out = String::new();
        histogram(
            &mut out,
            "x",
            "a=\"b\"",
            [(0.5, 1), (1.0, 2)].into_iter(),
            3,
            1.5,
        );
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.5\"} 1"));
        assert!(out.contains("x_bucket{a=\"b\",le=\"+Inf\"} 3"));
        assert!(out.contains("x_count{a=\"b\"} 3"));
    }
}
