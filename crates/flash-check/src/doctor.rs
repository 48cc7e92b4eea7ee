//! What this machine offers each stage of a load (`flash doctor`).
//!
//! A load is storage → staging (pinned host memory) → PCIe → VRAM; the doctor
//! measures each stage's limit on this machine, so a load report can say
//! "X GB/s, Y % of the stage limit":
//! - the host: OS, CPUs, memory, whether io_uring may be used;
//! - the GPUs (through `flash_sys::cuda`): driver, CUDA version, each GPU's
//!   memory and PCIe link; on GPU 0, how fast host memory is pinned, pinned
//!   host↔device copies (1 GiB in 64 MiB pieces over 2 streams, best of 3),
//!   a device-to-device copy and pageable host-to-device copies;
//! - the store's disk (`flash_load::disk::probe_files`): 4 GiB of the data
//!   files of the store's largest model when it has that much (what loads
//!   read), else four scratch files of 1 GiB each written into the store
//!   folder (`probe_dir`), evicted from the page cache
//!   and read back cold with each of the loader's candidate read patterns
//!   (O_DIRECT or buffered, readers, request size, order, io_uring), twice,
//!   the order rotated; the disk's limit is the fastest rate any read held
//!   for a second (`flash_load::disk::PEAK_WINDOW`: a whole read's average
//!   also counts its start and drain), the best pattern the one with the
//!   best median; then read again from the page
//!   cache; deleted after. [`save`] keeps the report as
//!   `<store>/doctor.json`, where the loader benchmark takes the disk's
//!   limit from ([`saved_disk_limit`]).
//!
//! Without a GPU the CPU and disk parts are still measured and the report says
//! in one line why the GPU parts are missing. Every measurement that fails is
//! reported, never fatal.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::limits::{self, gbps, round2, REPEATS};
use crate::{CheckError, Result};
use flash_load::disk::fill_noise;
use serde::Serialize;

use flash_sys::cuda::{self, Direction, Gpu, GpuInfo, PinMethod};
use flash_sys::os;

const GIB: usize = 1 << 30;
const COPY_BYTES: usize = GIB;
const COPY_PIECE: usize = 64 << 20;
const COPY_STREAMS: usize = 2;
const DISK_BYTES: u64 = 4 << 30;
/// Scratch files the disk is measured with.
pub const DISK_FILES: usize = 4;
/// Rounds of cold reads; each reads every candidate pattern.
pub const DISK_ROUNDS: usize = 2;
/// The report of the last `flash doctor`, in the store's folder.
pub const REPORT_FILE: &str = "doctor.json";

/// Everything `flash doctor` found. Bandwidths are in GB/s (10^9 bytes per
/// second); `None` where the measurement could not be made (see the
/// `*_error` / `gpu_reason` fields).
#[derive(Debug, Clone, Serialize)]
pub struct DoctorReport {
    pub flash_version: String,
    /// PRETTY_NAME of /etc/os-release, else the OS family.
    pub os: String,
    pub kernel: Option<String>,
    pub cpu_count: usize,
    /// The first `model name` of /proc/cpuinfo.
    pub cpu_model: Option<String>,
    /// The CPU decoder of compressed chunks (`flash_codec::cpu_decoder`:
    /// "avx2" or "scalar"), used by host loads, `verify` and machines
    /// without the GPU decoder.
    pub cpu_decoder: String,
    /// That decoder's speed on one core, GB/s of decoded bf16 (32 MiB of
    /// normal weights, best of 3; its output checked against the input).
    pub cpu_decode_gbps: Option<f64>,
    pub memory_bytes: u64,
    pub io_uring_allowed: bool,

    /// Whether CUDA and at least one GPU are usable.
    pub gpu_available: bool,
    /// Why the GPU parts are missing, or which GPU measurement failed.
    pub gpu_reason: Option<String>,
    /// The kernel driver ("580.159.04").
    pub driver_version: Option<String>,
    /// The newest CUDA the driver supports ("13.0").
    pub cuda_version: Option<String>,
    pub gpus: Vec<GpuReport>,
    /// Pinning fresh host memory (`cuMemHostAlloc` of 2 × 512 MiB, zeroed).
    pub pin_gbps: Option<f64>,
    /// Pinning the same with `FLASH_PINNED=huge` (an anonymous mapping on
    /// transparent huge pages, `cuMemHostRegister`).
    pub pin_huge_gbps: Option<f64>,
    /// `/sys/kernel/mm/transparent_hugepage/enabled` (e.g. `always [madvise] never`).
    pub transparent_hugepages: Option<String>,
    /// Pinned host → GPU 0, 1 GiB in 64 MiB pieces over 2 streams, best of 3.
    pub h2d_pinned_gbps: Option<f64>,
    /// GPU 0 → pinned host, likewise.
    pub d2h_pinned_gbps: Option<f64>,
    /// A 1 GiB device-to-device copy on GPU 0, counting bytes read plus
    /// bytes written (the memory bandwidth it used), best of 3.
    pub d2d_gbps: Option<f64>,
    /// Pageable (ordinary) host memory → GPU 0, synchronous 64 MiB copies.
    pub h2d_pageable_gbps: Option<f64>,

    pub store_dir: PathBuf,
    /// Bytes each probe read took from the files, together.
    pub disk_test_bytes: u64,
    /// What was read: the data files of the store's largest model (named)
    /// when it holds enough, else scratch files written for the probe.
    pub disk_probe_files: Option<String>,
    /// Whether O_DIRECT was allowed (else buffered reads, after eviction).
    pub disk_direct_io: Option<bool>,
    /// Page-cache residency of the scratch files after eviction (should be ~0).
    pub disk_residency_after_evict: Option<f64>,
    /// The disk's read limit: the fastest rate any pattern's cold read held
    /// for a whole `flash_load::disk::PEAK_WINDOW`.
    pub disk_read_gbps: Option<f64>,
    /// The pattern with the best median cold rate (`IO:ORDER:THREADSxREQUEST...`).
    pub disk_best_pattern: Option<String>,
    /// Every pattern probed, with its rate in each round.
    pub disk_patterns: Vec<flash_load::disk::PatternRates>,
    /// The same files read again from the page cache.
    pub page_cache_read_gbps: Option<f64>,
    pub disk_error: Option<String>,
}

/// One GPU, as the report shows it.
#[derive(Debug, Clone, Serialize)]
pub struct GpuReport {
    pub ordinal: usize,
    pub name: String,
    pub uuid: String,
    pub total_bytes: u64,
    pub free_bytes: u64,
    /// "9.0".
    pub compute_capability: String,
    pub pci_bus_id: String,
    pub pcie_link_gen: Option<u8>,
    pub pcie_link_width: Option<u8>,
    /// The link's payload limit per direction, from generation and width.
    pub pcie_link_gbps: Option<f64>,
}

impl From<&GpuInfo> for GpuReport {
    fn from(i: &GpuInfo) -> Self {
        GpuReport {
            ordinal: i.ordinal,
            name: i.name.clone(),
            uuid: i.uuid.clone(),
            total_bytes: i.total_bytes,
            free_bytes: i.free_bytes,
            compute_capability: format!("{}.{}", i.compute_capability.0, i.compute_capability.1),
            pci_bus_id: i.pci_bus_id.clone(),
            pcie_link_gen: i.pcie_link_gen,
            pcie_link_width: i.pcie_link_width,
            pcie_link_gbps: i.pcie_link_gbps().map(round2),
        }
    }
}

/// Saves the report as `<store>/doctor.json` (written aside, then renamed;
/// best effort: a read-only store still gets its report printed).
pub fn save(store_dir: &Path, r: &DoctorReport) {
    let path = store_dir.join(REPORT_FILE);
    let tmp = store_dir.join(format!(".{REPORT_FILE}.{}", std::process::id()));
    let written = serde_json::to_vec_pretty(r)
        .map_err(std::io::Error::other)
        .and_then(|b| std::fs::write(&tmp, b))
        .and_then(|_| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        tracing::warn!("cannot save {}: {e}", path.display());
    }
}

/// The disk limit and best pattern of the last `flash doctor` on this store.
pub fn saved_disk_limit(store_dir: &Path) -> Option<(f64, Option<String>)> {
    let bytes = std::fs::read(store_dir.join(REPORT_FILE)).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let gbps = v.get("disk_read_gbps")?.as_f64()?;
    let best = v
        .get("disk_best_pattern")
        .and_then(|p| p.as_str())
        .map(str::to_string);
    Some((gbps, best))
}

/// Builds the report (the measurements take some seconds).
pub fn collect(store_dir: &Path) -> DoctorReport {
    collect_sized(store_dir, DISK_BYTES)
}

/// As [`collect`], with scratch files of at most `disk_bytes` together.
pub fn collect_sized(store_dir: &Path, disk_bytes: u64) -> DoctorReport {
    let mut r = DoctorReport::host(store_dir);
    r.cpu_decode_gbps = cpu_decode_gbps();
    gpu_checks(&mut r);
    if let Err(e) = disk_checks(&mut r, store_dir, disk_bytes) {
        r.disk_error = Some(e.to_string());
    }
    r
}

impl DoctorReport {
    /// The host's facts (OS, CPUs, memory, io_uring), nothing measured yet.
    pub fn host(store_dir: &Path) -> DoctorReport {
        DoctorReport {
            flash_version: env!("CARGO_PKG_VERSION").to_string(),
            os: os_name(),
            kernel: read_trim("/proc/sys/kernel/osrelease"),
            cpu_count: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            cpu_model: cpu_model(),
            cpu_decoder: flash_codec::cpu_decoder().to_string(),
            cpu_decode_gbps: None,
            memory_bytes: os::physical_memory(),
            io_uring_allowed: os::io_uring_allowed(),
            gpu_available: false,
            gpu_reason: None,
            driver_version: None,
            cuda_version: None,
            gpus: Vec::new(),
            pin_gbps: None,
            pin_huge_gbps: None,
            transparent_hugepages: std::fs::read_to_string(
                "/sys/kernel/mm/transparent_hugepage/enabled",
            )
            .ok()
            .map(|v| v.trim().to_string()),
            h2d_pinned_gbps: None,
            d2h_pinned_gbps: None,
            d2d_gbps: None,
            h2d_pageable_gbps: None,
            store_dir: store_dir.to_path_buf(),
            disk_test_bytes: 0,
            disk_probe_files: None,
            disk_direct_io: None,
            disk_residency_after_evict: None,
            disk_read_gbps: None,
            disk_best_pattern: None,
            disk_patterns: Vec::new(),
            page_cache_read_gbps: None,
            disk_error: None,
        }
    }
}

// ---------------------------------------------------------------------------
// GPU
// ---------------------------------------------------------------------------

fn gpu_checks(r: &mut DoctorReport) {
    let cuda = match cuda::probe() {
        Ok(c) => c,
        Err(reason) => {
            r.gpu_reason = Some(reason.to_string());
            return;
        }
    };
    r.driver_version = cuda.driver_version().map(str::to_string);
    r.cuda_version = Some(cuda.cuda_version());
    for i in 0..cuda.device_count() {
        match cuda.device(i).and_then(|g| g.info()) {
            Ok(info) => r.gpus.push(GpuReport::from(&info)),
            Err(e) => {
                r.gpu_reason = Some(format!("GPU {i}: {e}"));
                return;
            }
        }
    }
    r.gpu_available = true;
    let gpu = match cuda.device(0) {
        Ok(g) => g,
        Err(e) => {
            r.gpu_reason = Some(e.to_string());
            return;
        }
    };
    if let Err(e) = copy_checks(r, &gpu) {
        r.gpu_reason = Some(format!("GPU 0 copy measurement: {e}"));
    }
}

fn copy_checks(r: &mut DoctorReport, gpu: &Gpu) -> Result<()> {
    // A small GPU still gets measured, with less.
    let (free, _) = gpu.mem_info()?;
    let bytes = COPY_BYTES.min((free as usize / 4) & !(COPY_PIECE - 1));
    if bytes < COPY_PIECE {
        return Err(CheckError::Failed(format!(
            "only {free} bytes free on GPU 0"
        )));
    }
    let per_buf = bytes / COPY_STREAMS;

    let mem = gpu.alloc(bytes)?;
    let t = Instant::now();
    let mut bufs = Vec::with_capacity(COPY_STREAMS);
    for _ in 0..COPY_STREAMS {
        bufs.push(gpu.pinned_with(per_buf, PinMethod::HostAlloc)?);
    }
    r.pin_gbps = Some(gbps(per_buf * COPY_STREAMS, t.elapsed().as_secs_f64()));
    {
        let t = Instant::now();
        let huge = (0..COPY_STREAMS)
            .map(|_| gpu.pinned_with(per_buf, PinMethod::HugePages))
            .collect::<Result<Vec<_>, _>>();
        match huge {
            Ok(_) => {
                r.pin_huge_gbps = Some(gbps(per_buf * COPY_STREAMS, t.elapsed().as_secs_f64()))
            }
            Err(e) => tracing::warn!("pinning on huge pages: {e}"),
        }
    }
    for (i, b) in bufs.iter_mut().enumerate() {
        fill_noise(b, i as u64 + 1);
    }
    let streams = (0..COPY_STREAMS)
        .map(|_| gpu.stream())
        .collect::<Result<Vec<_>, _>>()?;
    let moved = per_buf * COPY_STREAMS;

    for direction in [Direction::HostToDevice, Direction::DeviceToHost] {
        let mut best = f64::MAX;
        for _ in 0..REPEATS {
            let (d, back) = cuda::timed_pinned_copies(direction, &mem, bufs, &streams, COPY_PIECE)?;
            bufs = back;
            best = best.min(d.as_secs_f64());
        }
        let v = Some(gbps(moved, best));
        match direction {
            Direction::HostToDevice => r.h2d_pinned_gbps = v,
            Direction::DeviceToHost => r.d2h_pinned_gbps = v,
        }
    }
    drop(bufs);

    // Device to device, timed with events.
    r.d2d_gbps = Some(round2(limits::d2d_copy_gbps(
        gpu,
        &mem,
        bytes,
        &streams[0],
    )?));

    // Pageable host memory, synchronous copies.
    let mut host = vec![0u8; bytes];
    fill_noise(&mut host, 99);
    let mut best = f64::MAX;
    for _ in 0..REPEATS {
        let t = Instant::now();
        for (i, chunk) in host.chunks(COPY_PIECE).enumerate() {
            mem.copy_from_host(i * COPY_PIECE, chunk)?;
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    r.h2d_pageable_gbps = Some(gbps(bytes, best));
    Ok(())
}

// ---------------------------------------------------------------------------
// Disk
// ---------------------------------------------------------------------------

fn disk_checks(r: &mut DoctorReport, store_dir: &Path, max_bytes: u64) -> Result<()> {
    std::fs::create_dir_all(store_dir).map_err(CheckError::io(store_dir))?;
    let unit = (DISK_FILES as u64) << 24; // 16 MiB per file at least
    let size = match free_space(store_dir) {
        Some(free) => max_bytes.min(free / 4 / unit * unit),
        None => max_bytes / unit * unit,
    };
    if size < unit {
        return Err(CheckError::Failed(format!(
            "too little free space in {} for a disk test",
            store_dir.display()
        )));
    }
    let patterns = flash_load::disk::candidates();
    // The store's own data when a model holds enough of it: the files loads
    // read, as the import laid them out, rather than files written a moment
    // before (which a virtual disk may read at another rate while its host
    // still writes them back).
    let probe = match store_sample(store_dir, size)? {
        Some((model, files, per_file)) => {
            r.disk_probe_files = Some(format!("{} data files of {model}", files.len()));
            flash_load::disk::probe_files(&files, Some(per_file), &patterns, DISK_ROUNDS)?
        }
        None => {
            r.disk_probe_files = Some(format!("{DISK_FILES} scratch files"));
            flash_load::disk::probe_dir(store_dir, size, DISK_FILES, &patterns, DISK_ROUNDS)?
        }
    };
    r.disk_test_bytes = probe.test_bytes;
    r.disk_direct_io = Some(probe.direct_io);
    r.disk_residency_after_evict = Some(round2(probe.residency_after_evict));
    r.disk_read_gbps = Some(round2(probe.read_gbps));
    r.disk_best_pattern = Some(probe.best_pattern);
    r.disk_patterns = probe.patterns;
    r.page_cache_read_gbps = Some(round2(probe.page_cache_gbps));
    Ok(())
}

/// The data files of the store's largest model (by stored bytes) with the
/// bytes to read of each, when the model has at least `bytes` of them: its
/// name, its files and a per-file limit that reads about `bytes` in all.
/// `None` for an empty store, one without such a model, or no store at all.
fn store_sample(
    store_dir: &Path,
    bytes: u64,
) -> Result<Option<(String, Vec<flash_load::SourceFile>, u64)>> {
    // `Store::open` would make a store's folders where there is none.
    if !store_dir.join("models").is_dir() {
        return Ok(None);
    }
    let Ok(store) = flash_store::Store::open(store_dir) else {
        return Ok(None);
    };
    let Some(largest) = store
        .list()
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m.stored_bytes >= bytes)
        .max_by_key(|m| m.stored_bytes)
    else {
        return Ok(None);
    };
    let name = largest
        .model_id
        .parse()
        .map_err(|e| CheckError::Store(flash_store::StoreError::from(e)))?;
    let files: Vec<flash_load::SourceFile> = store
        .manifest(&name)?
        .files
        .iter()
        .map(|f| flash_load::SourceFile {
            path: largest.path.join(&f.name),
            len: f.size,
        })
        .collect();
    if files.is_empty() {
        return Ok(None);
    }
    // Whole 16 MiB pieces of each file, about `bytes` in all.
    let per_file = (bytes / files.len() as u64).div_ceil(16 << 20) * (16 << 20);
    Ok(Some((largest.model_id, files, per_file)))
}

/// Available bytes on the file system of `dir`, from `df` (None if unknown).
fn free_space(dir: &Path) -> Option<u64> {
    let out = std::process::Command::new("df")
        .arg("-Pk")
        .arg(dir)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    parse_df(&String::from_utf8_lossy(&out.stdout))
}

fn parse_df(s: &str) -> Option<u64> {
    let line = s.lines().nth(1)?;
    let kib: u64 = line.split_whitespace().nth(3)?.parse().ok()?;
    Some(kib * 1024)
}

/// One core decoding 32 MiB of compressed bf16 normal weights (what
/// `flash_synth` writes), best of 3; `None` if the round trip failed.
pub fn cpu_decode_gbps() -> Option<f64> {
    use flash_codec::{decode_chunk, encode_tensor, Layout, CHUNK_ELEMS};
    use flash_synth::random::{Filler, BLOCK_ELEMS};
    const BYTES: usize = 32 << 20;
    let filler = Filler::new(
        flash_synth::Init::Normal { std: 0.02 },
        flash_format::DType::BF16,
    )
    .ok()?;
    let mut data = vec![0u8; BYTES];
    for (block, part) in data.chunks_mut(2 * BLOCK_ELEMS as usize).enumerate() {
        filler.fill(1, 0, block as u64, part);
    }
    let chunks = encode_tensor(Layout::Bf16, &data, CHUNK_ELEMS);
    let mut out = vec![0u8; BYTES];
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        for ((codec, stored), o) in chunks.iter().zip(out.chunks_mut(2 * CHUNK_ELEMS)) {
            decode_chunk(Layout::Bf16, *codec, stored, o).ok()?;
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    (out == data).then(|| round2(BYTES as f64 / best / 1e9))
}

fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

fn read_trim(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn os_name() -> String {
    std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_string())
        })
        .unwrap_or_else(|| std::env::consts::OS.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_reads_the_largest_model_of_the_store() {
        let dir = tempfile::tempdir().unwrap();
        // No store, and an empty one: scratch files.
        assert!(store_sample(dir.path(), 1).unwrap().is_none());
        let src = dir.path().join("src");
        flash_synth::synth(
            &flash_synth::spec(flash_synth::Arch::Qwen3, "tiny").unwrap(),
            &src,
            &flash_synth::SynthOptions::default(),
        )
        .unwrap();
        let home = dir.path().join("home");
        let store = flash_store::Store::open(&home).unwrap();
        assert!(store_sample(&home, 1).unwrap().is_none());
        let name = "t/tiny".parse().unwrap();
        store
            .import(&src, &name, &flash_store::ImportOptions::default())
            .unwrap();
        let stored = store.info(&name).unwrap().stored_bytes;
        let (model, files, per_file) = store_sample(&home, 1).unwrap().unwrap();
        assert_eq!(model, "t/tiny");
        assert!(!files.is_empty() && files.iter().all(|f| f.path.is_file()));
        assert_eq!(files.iter().map(|f| f.len).sum::<u64>(), stored);
        assert_eq!(per_file % (16 << 20), 0);
        // A model smaller than the probe wants: scratch files.
        assert!(store_sample(&home, stored + 1).unwrap().is_none());
    }

    #[test]
    fn df_parsing() {
        let s = "Filesystem     1024-blocks      Used Available Capacity Mounted on\n/dev/vda        263174212  12000000  82000000      14% /\n";
        assert_eq!(parse_df(s), Some(82_000_000 * 1024));
        assert_eq!(parse_df("garbage"), None);
    }

    #[test]
    fn report_measures_and_serialises() {
        let dir = tempfile::tempdir().unwrap();
        let r = collect_sized(dir.path(), 4 << 24);
        assert!(r.cpu_count >= 1);
        // The decode round trip held (else None) at a plausible speed.
        let decode = r.cpu_decode_gbps.expect("CPU decode measured");
        assert!(decode > 0.01 && decode < 1000.0, "{decode} GB/s");
        assert!(["avx2", "scalar"].contains(&r.cpu_decoder.as_str()));
        assert!(r.gpu_available || r.gpu_reason.is_some());
        assert_eq!(r.disk_test_bytes, 4 << 24, "{:?}", r.disk_error);
        assert!(r.disk_read_gbps.is_some() && r.page_cache_read_gbps.is_some());
        // Every candidate pattern was read in every round, and the limit is
        // the fastest rate any of them held.
        assert_eq!(r.disk_patterns.len(), flash_load::disk::candidates().len());
        assert!(r.disk_patterns.iter().all(|p| p.gbps.len() == DISK_ROUNDS));
        let fastest = r
            .disk_patterns
            .iter()
            .flat_map(|p| p.peak_gbps.iter().copied())
            .fold(0.0, f64::max);
        assert_eq!(r.disk_read_gbps, Some(round2(fastest)));
        assert!(r.disk_best_pattern.is_some());
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert!(v.get("io_uring_allowed").is_some());
        // The scratch files are gone.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        // What `save` writes, `saved_disk_limit` reads back.
        save(dir.path(), &r);
        let (limit, best) = saved_disk_limit(dir.path()).unwrap();
        assert_eq!(Some(limit), r.disk_read_gbps);
        assert_eq!(best, r.disk_best_pattern);
    }
}
