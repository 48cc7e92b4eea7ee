//! `flash doctor`: what this machine offers each stage of a load, measured
//! by flash-check's `doctor` (host, GPUs and their copies, pinning, the
//! store's disk), saved as `<store>/doctor.json` (where `flash bench` takes
//! the disk's limit from) and printed as one JSON object or an aligned
//! table.

use anyhow::{Context, Result};
use flash_check::doctor::{self, DoctorReport};
use std::path::Path;

const GIB: u64 = 1 << 30;

/// Runs every check and prints the report: one JSON object with `json`, else
/// a short aligned table.
pub fn run(store_dir: &Path, json: bool) -> Result<()> {
    if !json {
        eprintln!("flash doctor: measuring GPU copies and the store's disk (about 30 s)...");
    }
    let report = doctor::collect(store_dir);
    doctor::save(store_dir, &report);
    if json {
        println!(
            "{}",
            serde_json::to_string(&report).context("serialising the report")?
        );
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}

fn human_bytes(b: u64) -> String {
    format!("{:.1} GiB", b as f64 / GIB as f64)
}

fn opt_gbps(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.2} GB/s"))
        .unwrap_or_else(|| "-".into())
}

/// The human form: one aligned "label  value" line per item.
pub fn render(r: &DoctorReport) -> String {
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut row = |k: &str, v: String| rows.push((k.to_string(), v));
    row(
        "os",
        match &r.kernel {
            Some(k) => format!("{} (Linux {k})", r.os),
            None => r.os.clone(),
        },
    );
    row(
        "cpus",
        match &r.cpu_model {
            Some(m) => format!("{} ({m})", r.cpu_count),
            None => r.cpu_count.to_string(),
        },
    );
    row(
        "cpu decoder",
        format!(
            "{}, {} a core (compressed chunks on the host)",
            r.cpu_decoder,
            opt_gbps(r.cpu_decode_gbps)
        ),
    );
    row("memory", human_bytes(r.memory_bytes));
    row(
        "io_uring",
        if r.io_uring_allowed {
            "allowed"
        } else {
            "not allowed (threads are used)"
        }
        .into(),
    );
    if r.gpus.is_empty() {
        row(
            "gpu",
            format!(
                "none: {}",
                r.gpu_reason.as_deref().unwrap_or("unknown reason")
            ),
        );
    } else {
        row(
            "driver",
            format!(
                "{}, CUDA {}",
                r.driver_version.as_deref().unwrap_or("unknown"),
                r.cuda_version.as_deref().unwrap_or("?")
            ),
        );
        for g in &r.gpus {
            let link = match (g.pcie_link_gen, g.pcie_link_width) {
                (Some(gen), Some(w)) => {
                    format!("PCIe gen{gen} x{w} ({})", opt_gbps(g.pcie_link_gbps))
                }
                _ => "PCIe link unknown".into(),
            };
            row(
                &format!("gpu {}", g.ordinal),
                format!(
                    "{}, {} ({} free), cc {}, {} {}",
                    g.name,
                    human_bytes(g.total_bytes),
                    human_bytes(g.free_bytes),
                    g.compute_capability,
                    g.pci_bus_id,
                    link
                ),
            );
        }
        let link = r.gpus.first().and_then(|g| g.pcie_link_gbps);
        let of_link = |v: Option<f64>| match (v, link) {
            (Some(x), Some(l)) if l > 0.0 => {
                format!("{}  ({:.0} % of the link)", opt_gbps(v), 100.0 * x / l)
            }
            _ => opt_gbps(v),
        };
        row("pin host memory", opt_gbps(r.pin_gbps));
        row(
            "pin on huge pages",
            format!(
                "{}  (THP: {})",
                opt_gbps(r.pin_huge_gbps),
                r.transparent_hugepages.as_deref().unwrap_or("unknown")
            ),
        );
        row("H2D pinned", of_link(r.h2d_pinned_gbps));
        row("D2H pinned", of_link(r.d2h_pinned_gbps));
        row("H2D pageable", of_link(r.h2d_pageable_gbps));
        row("D2D (read+write)", opt_gbps(r.d2d_gbps));
        if let Some(reason) = &r.gpu_reason {
            row("gpu problem", reason.clone());
        }
    }
    row("store", r.store_dir.display().to_string());
    if let Some(e) = &r.disk_error {
        row("disk", format!("not measured: {e}"));
    }
    if r.disk_read_gbps.is_some() {
        let how = match r.disk_direct_io {
            Some(true) => "",
            _ => ", no O_DIRECT: buffered after eviction",
        };
        row(
            "disk read",
            format!(
                "{}  (fastest {:.0} s of cold reads of {} from {}{how}; best pattern {})",
                opt_gbps(r.disk_read_gbps),
                flash_load::disk::PEAK_WINDOW,
                human_bytes(r.disk_test_bytes),
                r.disk_probe_files.as_deref().unwrap_or("-"),
                r.disk_best_pattern.as_deref().unwrap_or("-")
            ),
        );
        for p in &r.disk_patterns {
            // Each round's whole-read rate, its peak second in brackets.
            let rates: Vec<String> = p
                .gbps
                .iter()
                .zip(&p.peak_gbps)
                .map(|(g, peak)| format!("{g:.2} [{peak:.2}]"))
                .collect();
            let device = match (
                p.device_median(|d| d.req_kib),
                p.device_median(|d| d.mean_in_flight),
            ) {
                (Some(kib), Some(depth)) => {
                    format!("  ({kib:.0} KiB a request, {depth:.1} in flight)")
                }
                _ => String::new(),
            };
            row(
                "  pattern",
                format!("{:<34} {} GB/s{device}", p.pattern, rates.join(" / ")),
            );
        }
        row("page cache read", opt_gbps(r.page_cache_read_gbps));
    }
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = format!("flash {} doctor\n", r.flash_version);
    for (k, v) in rows {
        out.push_str(&format!("  {k:<width$}  {v}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_renders() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = DoctorReport::host(dir.path());
        r.gpu_reason = Some("no driver".into());
        r.disk_read_gbps = Some(1.5);
        r.disk_best_pattern = Some("direct:shared:16x32M".into());
        let text = render(&r);
        for want in [
            "cpus",
            "cpu decoder",
            "none: no driver",
            "disk read",
            "1.50 GB/s",
            "16x32M",
        ] {
            assert!(text.contains(want), "{want:?} missing from\n{text}");
        }
    }
}
