//! Read patterns and the disk probe: how fast a disk delivers files under a
//! given way of reading them, measured with the same pipeline the loads use.
//!
//! A [`ReadPattern`] is the part of [`LoadOptions`] that decides what the
//! disk sees: O_DIRECT or the page cache, how many readers, how they walk the
//! files ([`ReadOrder`]), the size of each read, a readahead hint, and
//! optionally io_uring (each reader keeping several reads in flight). The
//! probe ([`read_files`]) reads files with a pattern and drops the bytes;
//! `flash doctor` probes [`candidates`] and reports the best as the disk's
//! limit, and `flash bench-disk` compares patterns round by round.

use crate::error::LoadError;
use crate::pipeline::{
    execute, Advice, IoMode, LoadOptions, LoadStats, ReadFn, ReadOrder, Sink, SinkWorker,
};
use crate::plan::{Job, LoadPlan};
use crate::source::SourceFile;
use flash_sys::os::{self, AlignedBuf};
use flash_sys::uring::{ReadRange, UringReader};
use std::fmt;
use std::fs::File;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// One way of reading files; written `IO:ORDER:THREADSxREQUEST[:ADVICE][:qdN]`,
/// e.g. `direct:shared:16x32M`, `buffered:per-file:4x16M:willneed`,
/// `direct:per-file:4x8M:qd8` (io_uring, 8 reads in flight per reader).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ReadPattern {
    /// `Direct` or `Buffered` (`Auto` is a load-time choice, not a pattern).
    pub io: IoMode,
    pub order: ReadOrder,
    pub threads: usize,
    /// Bytes per read (a multiple of 4 KiB).
    pub request: u64,
    pub advice: Advice,
    /// io_uring with this many reads in flight per reader; `None`: one
    /// blocking `pread` at a time per reader.
    pub queue_depth: Option<usize>,
}

impl ReadPattern {
    /// The load options that read this way (other options as in `base`).
    pub fn apply(&self, base: &LoadOptions) -> LoadOptions {
        LoadOptions {
            threads: self.threads,
            chunk_bytes: self.request,
            io: self.io,
            order: self.order,
            advice: self.advice,
            ..base.clone()
        }
    }
}

fn parse_size(s: &str) -> Option<u64> {
    let (num, mult) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], 1u64 << 10),
        'M' | 'm' => (&s[..s.len() - 1], 1 << 20),
        'G' | 'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

fn size_str(b: u64) -> String {
    match b {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{}G", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{}M", b >> 20),
        b if b % (1 << 10) == 0 => format!("{}K", b >> 10),
        b => b.to_string(),
    }
}

impl FromStr for ReadPattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!("read pattern {s:?}: {why} (IO:ORDER:THREADSxREQUEST[:ADVICE][:qdN], e.g. direct:shared:16x32M)")
        };
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() < 3 {
            return Err(bad("too few parts"));
        }
        let io = match parts[0] {
            "direct" => IoMode::Direct,
            "buffered" => IoMode::Buffered,
            other => return Err(bad(&format!("I/O {other:?} is not direct or buffered"))),
        };
        let order = parts[1].parse().map_err(|e: String| bad(&e))?;
        let (threads, request) = parts[2]
            .split_once('x')
            .ok_or_else(|| bad("THREADSxREQUEST expected"))?;
        let threads: usize = threads
            .parse()
            .ok()
            .filter(|&t| (1..=256).contains(&t))
            .ok_or_else(|| bad("threads must be 1 to 256"))?;
        let request = parse_size(request)
            .filter(|&r| r >= 4096 && r % 4096 == 0 && r <= 1 << 30)
            .ok_or_else(|| bad("request must be a multiple of 4K up to 1G"))?;
        let mut p = ReadPattern {
            io,
            order,
            threads,
            request,
            advice: Advice::Sequential,
            queue_depth: None,
        };
        for extra in &parts[3..] {
            if let Some(qd) = extra.strip_prefix("qd") {
                p.queue_depth = Some(
                    qd.parse()
                        .ok()
                        .filter(|&q| (1..=256).contains(&q))
                        .ok_or_else(|| bad("qdN: N must be 1 to 256"))?,
                );
            } else {
                p.advice = extra.parse().map_err(|e: String| bad(&e))?;
            }
        }
        Ok(p)
    }
}

impl fmt::Display for ReadPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let io = match self.io {
            IoMode::Buffered => "buffered",
            _ => "direct",
        };
        write!(
            f,
            "{io}:{}:{}x{}",
            self.order,
            self.threads,
            size_str(self.request)
        )?;
        if self.advice != Advice::Sequential {
            write!(f, ":{}", self.advice)?;
        }
        if let Some(qd) = self.queue_depth {
            write!(f, ":qd{qd}")?;
        }
        Ok(())
    }
}

/// The patterns `flash doctor` probes: the loader's default, which is also
/// the fastest peer's way of reading without GDS (fastsafetensors 0.5: 16
/// readers taking 512 KiB O_DIRECT reads from one cursor); the loader's
/// earlier default of 32 MiB reads, shared and per file; the peer's way
/// before 0.5 (one buffered stream per file); a tight window (16 reads of 2 MiB, all within 32 MiB
/// of the cursor); per-file O_DIRECT with io_uring; and one strictly
/// sequential stream over all the files (buffered, and O_DIRECT with reads
/// in flight). On a virtual disk whose host reads ahead only for sequential
/// access, the tight and sequential ones may be what the disk rewards.
pub fn candidates() -> Vec<ReadPattern> {
    [
        "direct:shared:16x512K",
        "direct:shared:16x32M",
        "direct:per-file:16x32M",
        "direct:shared:16x2M",
        "buffered:per-file:4x16M",
        "direct:per-file:4x8M:qd8",
        "buffered:shared:1x16M",
        "direct:shared:1x16M:qd16",
    ]
    .iter()
    .map(|s| s.parse().expect("built-in patterns parse"))
    .collect()
}

/// What one probe read measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProbeResult {
    pub pattern: String,
    pub bytes: u64,
    pub seconds: f64,
    pub gbps: f64,
    /// The fastest rate over any [`PEAK_WINDOW`] of the read, or the whole
    /// read's rate where that is faster or the read was shorter: what the disk gave once the read
    /// was under way, without its start (files opened, buffers made, the
    /// queue filling) and its drain (the last reads in flight alone).
    pub peak_gbps: f64,
    /// Files read through the page cache because O_DIRECT was refused.
    pub fallback_buffered: usize,
    /// What the block device holding the first file was asked meanwhile
    /// (every process's reads), where /proc/diskstats tells.
    pub device: Option<DeviceRequests>,
}

/// A block device's read counters (/proc/diskstats).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockCounters {
    /// Read requests completed (after the block layer merged adjacent ones).
    pub reads: u64,
    /// 512-byte sectors read.
    pub sectors: u64,
    /// Milliseconds the completed reads took, queue and device, summed.
    pub read_ms: u64,
    /// Milliseconds of requests in flight, weighted by how many were.
    pub weighted_ms: u64,
}

impl BlockCounters {
    /// The counters of the block device (or partition) holding `path`;
    /// `None` where /sys or /proc/diskstats do not say (not Linux, a
    /// network or overlay file system without a block device).
    pub fn of(path: &std::path::Path) -> Option<(String, BlockCounters)> {
        use std::os::unix::fs::MetadataExt;
        let dev = std::fs::metadata(path).ok()?.dev();
        let (major, minor) = (
            ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff),
            (dev & 0xff) | ((dev >> 12) & !0xff),
        );
        let link = std::fs::read_link(format!("/sys/dev/block/{major}:{minor}")).ok()?;
        let name = link.file_name()?.to_str()?.to_string();
        let counters = Self::read(&name)?;
        Some((name, counters))
    }

    /// The counters of the device called `name` in /proc/diskstats.
    pub fn read(name: &str) -> Option<BlockCounters> {
        let stats = std::fs::read_to_string("/proc/diskstats").ok()?;
        Self::parse(&stats, name)
    }

    /// `name`'s line of a /proc/diskstats text: fields 4 (reads completed),
    /// 6 (sectors read), 7 (ms reading) and 11 (weighted ms doing I/O).
    pub fn parse(diskstats: &str, name: &str) -> Option<BlockCounters> {
        diskstats.lines().find_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 14 || f[2] != name {
                return None;
            }
            let n = |i: usize| f[i].parse::<u64>().ok();
            Some(BlockCounters {
                reads: n(3)?,
                sectors: n(5)?,
                read_ms: n(6)?,
                weighted_ms: n(13)?,
            })
        })
    }
}

/// What a device was asked between two [`BlockCounters`] readings.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DeviceRequests {
    /// The device's name in /proc/diskstats (`vda`, `nvme0n1p1`).
    pub name: String,
    /// Read requests completed.
    pub requests: u64,
    /// Their mean size, KiB.
    pub req_kib: f64,
    /// The mean time one took, queue and device, ms.
    pub ms_per_req: f64,
    /// Requests in flight on average over the interval.
    pub mean_in_flight: f64,
}

impl DeviceRequests {
    /// From readings before and after an interval of `seconds`; `None` when
    /// no read completed or the counters went back (a device reset).
    pub fn between(name: &str, a: BlockCounters, b: BlockCounters, seconds: f64) -> Option<Self> {
        let requests = b.reads.checked_sub(a.reads).filter(|&r| r > 0)?;
        let sectors = b.sectors.checked_sub(a.sectors)?;
        let read_ms = b.read_ms.checked_sub(a.read_ms)?;
        let weighted = b.weighted_ms.checked_sub(a.weighted_ms)?;
        let round = |x: f64, d: f64| (x * d).round() / d;
        Some(DeviceRequests {
            name: name.to_string(),
            requests,
            req_kib: round(sectors as f64 * 512.0 / 1024.0 / requests as f64, 10.0),
            ms_per_req: round(read_ms as f64 / requests as f64, 1000.0),
            mean_in_flight: if seconds > 0.0 {
                round(weighted as f64 / 1000.0 / seconds, 10.0)
            } else {
                0.0
            },
        })
    }
}

/// Drops the files from the page cache and returns the share of their bytes
/// still resident (not every file system lets pages go; tmpfs never does).
/// When some stay, and this process may, the whole page cache is dropped
/// (`/proc/sys/vm/drop_caches`, root only), as a cold-start benchmark needs.
pub fn evict(files: &[std::path::PathBuf]) -> Result<f64, LoadError> {
    for f in files {
        let file = File::open(f).map_err(|e| LoadError::io(f, e))?;
        os::evict_page_cache(&file).map_err(|e| LoadError::io(f, e))?;
    }
    let left = residency(files)?;
    if left > 0.0 {
        let _ = std::fs::write("/proc/sys/vm/drop_caches", "1");
        return residency(files);
    }
    Ok(left)
}

/// Share of the files' bytes in the page cache (mincore).
pub fn residency(files: &[std::path::PathBuf]) -> Result<f64, LoadError> {
    let (mut resident, mut total) = (0.0, 0.0);
    for f in files {
        let file = File::open(f).map_err(|e| LoadError::io(f, e))?;
        let len = file.metadata().map_err(|e| LoadError::io(f, e))?.len() as f64;
        resident += os::page_cache_residency(&file).unwrap_or(0.0) * len;
        total += len;
    }
    Ok(if total > 0.0 { resident / total } else { 1.0 })
}

/// Reads the files cold with every pattern, `rounds` times, the order of the
/// patterns rotated by one each round (the disk's speed drifts between
/// runs: neighbours in time compare fairly, and every pattern takes every
/// place in the order). `each(round, result)` sees every read as it ends.
pub fn compare(
    files: &[SourceFile],
    patterns: &[ReadPattern],
    rounds: usize,
    limit: Option<u64>,
    mut each: impl FnMut(usize, &ProbeResult),
) -> Result<Vec<(usize, ProbeResult)>, LoadError> {
    let paths: Vec<std::path::PathBuf> = files.iter().map(|f| f.path.clone()).collect();
    let mut out = Vec::new();
    for round in 0..rounds {
        for k in 0..patterns.len() {
            let p = &patterns[(round + k) % patterns.len()];
            evict(&paths)?;
            let r = read_files(files, limit, p)?;
            each(round, &r);
            out.push((round, r));
        }
    }
    Ok(out)
}

/// The pattern with the highest median rate over the rounds of [`compare`].
pub fn best_by_median(results: &[(usize, ProbeResult)]) -> Option<(String, f64)> {
    let mut by: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    for (_, r) in results {
        by.entry(&r.pattern).or_default().push(r.gbps);
    }
    by.into_iter()
        .filter_map(|(p, v)| Some((p.to_string(), middle(v)?)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
}

/// The median of `v` (the upper one of an even count); `None` when empty.
fn middle(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

/// One pattern's rates over the rounds of a probe.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PatternRates {
    pub pattern: String,
    pub gbps: Vec<f64>,
    /// Each round's [`ProbeResult::peak_gbps`].
    pub peak_gbps: Vec<f64>,
    /// What the block device was asked in each round, where known.
    pub device: Vec<DeviceRequests>,
}

impl PatternRates {
    pub fn median(&self) -> f64 {
        middle(self.gbps.clone()).unwrap_or(0.0)
    }

    /// The median over the rounds of one figure of what the block device
    /// was asked; `None` where the device was not known.
    pub fn device_median(&self, figure: fn(&DeviceRequests) -> f64) -> Option<f64> {
        middle(self.device.iter().map(figure).collect())
    }
}

/// What [`probe_dir`] measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DiskProbe {
    /// Bytes read from the files in each read, together.
    pub test_bytes: u64,
    pub files: usize,
    /// Whether O_DIRECT was allowed (else the "direct" patterns read
    /// through the page cache after eviction).
    pub direct_io: bool,
    /// Page-cache residency of the files after eviction (should be ~0).
    pub residency_after_evict: f64,
    pub patterns: Vec<PatternRates>,
    /// The pattern with the best median rate.
    pub best_pattern: String,
    /// The disk's read limit: the fastest rate any pattern's read held for
    /// a whole [`PEAK_WINDOW`] (the best [`ProbeResult::peak_gbps`]). A
    /// whole read's average also counts its start and drain, which a longer
    /// read (a model's) amortises better than the probe's, so the average
    /// would understate what a load can reach.
    pub read_gbps: f64,
    /// The files read again from the page cache (the best pattern, buffered).
    pub page_cache_gbps: f64,
}

/// Removes scratch files however the probe ends.
struct Scratch(Vec<std::path::PathBuf>);

impl Drop for Scratch {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Fills `buf` with xorshift noise (incompressible, never all zeros): data
/// no cache, compressor or page deduplication can shortcut.
pub fn fill_noise(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

/// Measures the disk under `dir`: writes `files` scratch files of `bytes`
/// together (incompressible, synced), measures them with [`probe_files`],
/// and removes them.
pub fn probe_dir(
    dir: &std::path::Path,
    bytes: u64,
    files: usize,
    patterns: &[ReadPattern],
    rounds: usize,
) -> Result<DiskProbe, LoadError> {
    use std::io::Write;
    const PIECE: usize = 8 << 20;
    let files = files.max(1);
    let per_file = (bytes / files as u64) / PIECE as u64 * PIECE as u64;
    if per_file == 0 || patterns.is_empty() {
        return Err(LoadError::model(dir, "nothing to measure the disk with"));
    }
    let paths: Vec<std::path::PathBuf> = (0..files)
        .map(|i| dir.join(format!(".flash-disk-probe-{}-{i}.tmp", std::process::id())))
        .collect();
    let scratch = Scratch(paths.clone());
    let mut block = vec![0u8; PIECE];
    for (i, p) in paths.iter().enumerate() {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(p)
            .map_err(|e| LoadError::io(p, e))?;
        for k in 0..per_file / PIECE as u64 {
            fill_noise(&mut block, (i as u64) << 32 | k);
            f.write_all(&block).map_err(|e| LoadError::io(p, e))?;
        }
        f.sync_all().map_err(|e| LoadError::io(p, e))?;
    }
    let sources: Vec<SourceFile> = paths
        .iter()
        .map(|p| SourceFile {
            path: p.clone(),
            len: per_file,
        })
        .collect();
    let probe = probe_files(&sources, None, patterns, rounds);
    drop(scratch);
    probe
}

/// Measures the disk holding `files` (the first `limit` bytes of each, all
/// when `None`), without writing: evicts them, reads them cold with every
/// pattern of `patterns`, `rounds` times with the order rotated, then once
/// from the page cache. The disk's limit is the fastest rate held for a
/// [`PEAK_WINDOW`] by any read; the best pattern is the one with the best
/// median.
pub fn probe_files(
    files: &[SourceFile],
    limit: Option<u64>,
    patterns: &[ReadPattern],
    rounds: usize,
) -> Result<DiskProbe, LoadError> {
    let Some(first) = files.first() else {
        return Err(LoadError::model("disk probe", "no files to read"));
    };
    if patterns.is_empty() {
        return Err(LoadError::model(
            &first.path,
            "no read pattern to measure the disk with",
        ));
    }
    let paths: Vec<std::path::PathBuf> = files.iter().map(|f| f.path.clone()).collect();
    let direct_io = os::open_direct(&first.path)
        .map_err(|e| LoadError::io(&first.path, e))?
        .is_some();
    let residency_after_evict = evict(&paths)?;
    let results = compare(files, patterns, rounds.max(1), limit, |_, _| {})?;
    let rates: Vec<PatternRates> = patterns
        .iter()
        .map(|p| {
            let name = p.to_string();
            let mine = || results.iter().filter(|(_, r)| r.pattern == name);
            PatternRates {
                gbps: mine().map(|(_, r)| r.gbps).collect(),
                peak_gbps: mine().map(|(_, r)| r.peak_gbps).collect(),
                device: mine().filter_map(|(_, r)| r.device.clone()).collect(),
                pattern: name.clone(),
            }
        })
        .collect();
    let best = rates
        .iter()
        .max_by(|a, b| a.median().total_cmp(&b.median()))
        .expect("at least one pattern");
    let read_gbps = rates
        .iter()
        .flat_map(|r| r.peak_gbps.iter().copied())
        .fold(0.0, f64::max);
    // The page cache: fill it, then read again through it.
    let mut buffered: ReadPattern = best.pattern.parse().expect("a pattern's own name");
    buffered.io = IoMode::Buffered;
    buffered.queue_depth = None;
    read_files(files, limit, &buffered)?;
    let warm = read_files(files, limit, &buffered)?;
    Ok(DiskProbe {
        test_bytes: files
            .iter()
            .map(|f| limit.map_or(f.len, |l| f.len.min(l)))
            .sum(),
        files: files.len(),
        direct_io,
        residency_after_evict,
        best_pattern: best.pattern.clone(),
        patterns: rates,
        read_gbps,
        page_cache_gbps: warm.gbps,
    })
}

/// Drops every job's bytes after reading them into a per-reader buffer,
/// counting them.
struct DiscardSink {
    request: usize,
    done: AtomicU64,
}

struct DiscardWorker<'s> {
    buf: AlignedBuf,
    done: &'s AtomicU64,
}

impl Sink for DiscardSink {
    type Worker<'s> = DiscardWorker<'s>;
    fn worker(&self) -> Result<DiscardWorker<'_>, LoadError> {
        let buf = AlignedBuf::new(self.request)
            .map_err(|e| LoadError::Device(format!("read buffer: {e}")))?;
        Ok(DiscardWorker {
            buf,
            done: &self.done,
        })
    }
}

impl SinkWorker for DiscardWorker<'_> {
    fn transfer(
        &mut self,
        job: &Job,
        _plan: &LoadPlan,
        read: &mut ReadFn,
    ) -> Result<(), LoadError> {
        let mut at = 0;
        while at < job.len {
            let want = (self.buf.len() as u64).min(job.len - at) as usize;
            let n = read(&mut self.buf[..want], at)?;
            std::hint::black_box(&self.buf[..n]);
            self.done.fetch_add(n as u64, Ordering::Relaxed);
            if n < want {
                break;
            }
            at += n as u64;
        }
        Ok(())
    }
    fn finish(self) -> Result<(), LoadError> {
        Ok(())
    }
}

/// Reads the first `limit` bytes (all when `None`) of each file with
/// `pattern` and drops them. The caller decides what the page cache holds
/// beforehand (evict for a cold read).
pub fn read_files(
    files: &[SourceFile],
    limit: Option<u64>,
    pattern: &ReadPattern,
) -> Result<ProbeResult, LoadError> {
    let files: Vec<SourceFile> = files
        .iter()
        .map(|f| SourceFile {
            path: f.path.clone(),
            len: limit.map_or(f.len, |l| f.len.min(l)),
        })
        .collect();
    let plan = LoadPlan::whole_files(&files);
    let opts = pattern.apply(&LoadOptions::default());
    let before = files.first().and_then(|f| BlockCounters::of(&f.path));
    let sink = DiscardSink {
        request: pattern.request as usize,
        done: AtomicU64::new(0),
    };
    let (stats, progress) = with_progress(&sink.done, || match pattern.queue_depth {
        None => execute(&plan, &sink, &opts),
        Some(depth) => read_uring(&plan, &opts, depth, &sink.done),
    });
    let stats = stats?;
    let device = before.and_then(|(name, a)| {
        DeviceRequests::between(&name, a, BlockCounters::read(&name)?, stats.seconds)
    });
    let fallback_buffered = if pattern.io == IoMode::Direct {
        stats.files_buffered
    } else {
        0
    };
    Ok(ProbeResult {
        pattern: pattern.to_string(),
        bytes: stats.bytes_read,
        seconds: stats.seconds,
        gbps: stats.gbps(),
        peak_gbps: peak_rate(&progress, PEAK_WINDOW).map_or(stats.gbps(), |p| p.max(stats.gbps())),
        fallback_buffered,
        device,
    })
}

/// The span of a read over which [`ProbeResult::peak_gbps`] is taken.
pub const PEAK_WINDOW: f64 = 1.0;

/// How often [`with_progress`] samples a read's byte count.
const SAMPLE_EVERY: std::time::Duration = std::time::Duration::from_millis(10);

/// Runs `read` while a thread samples `done` (the bytes read so far) every
/// [`SAMPLE_EVERY`]: `read`'s result and the samples, as (seconds since the
/// start, bytes), the first at the start and the last at the end.
fn with_progress<T>(done: &AtomicU64, read: impl FnOnce() -> T) -> (T, Vec<(f64, u64)>) {
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut samples = vec![(0.0, 0)];
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(SAMPLE_EVERY);
                samples.push((start.elapsed().as_secs_f64(), done.load(Ordering::Relaxed)));
            }
            samples
        });
        let out = read();
        stop.store(true, Ordering::Relaxed);
        let mut samples = sampler.join().unwrap_or_default();
        samples.push((start.elapsed().as_secs_f64(), done.load(Ordering::Relaxed)));
        (out, samples)
    })
}

/// The fastest rate (GB/s) between two samples at least `window` seconds
/// apart, each span starting at a sample and ending at the first sample
/// `window` or more after it; `None` when the samples span less than
/// `window`. Samples are (seconds, bytes so far), in time order.
pub fn peak_rate(samples: &[(f64, u64)], window: f64) -> Option<f64> {
    let mut best: Option<f64> = None;
    let mut end = 0;
    for (i, &(t0, b0)) in samples.iter().enumerate() {
        end = end.max(i + 1);
        while end < samples.len() && samples[end].0 - t0 < window {
            end += 1;
        }
        let Some(&(t1, b1)) = samples.get(end) else {
            break;
        };
        let rate = b1.saturating_sub(b0) as f64 / (t1 - t0) / 1e9;
        best = Some(best.map_or(rate, |b| b.max(rate)));
    }
    best
}

/// The io_uring reader: each thread takes the next file not yet started and
/// keeps `depth` reads of it in flight (whatever the pattern's order: one
/// reader per file at a time).
fn read_uring(
    plan: &LoadPlan,
    opts: &LoadOptions,
    depth: usize,
    bytes: &AtomicU64,
) -> Result<LoadStats, LoadError> {
    let start = Instant::now();
    let next_file = std::sync::atomic::AtomicUsize::new(0);
    let threads = opts.threads.clamp(1, plan.files.len().max(1));
    let direct = opts.io != IoMode::Buffered;
    let mut buffered_files = 0;
    let mut handles = Vec::new();
    for f in &plan.files {
        let file = match direct {
            true => os::open_direct(&f.path).map_err(|e| LoadError::io(&f.path, e))?,
            false => None,
        };
        let file = match file {
            Some(file) => file,
            None => {
                buffered_files += usize::from(direct);
                File::open(&f.path).map_err(|e| LoadError::io(&f.path, e))?
            }
        };
        handles.push(file);
    }
    let request = opts.chunk_bytes as usize;
    std::thread::scope(|s| -> Result<(), LoadError> {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<(), LoadError> {
                    let mut ring = UringReader::new(depth, request, true)
                        .map_err(|e| LoadError::Device(format!("io_uring: {e}")))?;
                    loop {
                        let i = next_file.fetch_add(1, Ordering::Relaxed);
                        let Some(f) = plan.files.get(i) else {
                            return Ok(());
                        };
                        let ranges: Vec<ReadRange> = (0..f.len)
                            .step_by(request)
                            .map(|offset| ReadRange {
                                offset,
                                len: request.min((f.len - offset).div_ceil(4096) as usize * 4096),
                            })
                            .collect();
                        ring.read_all(&handles[i], &ranges, |_, b| {
                            bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
                            std::hint::black_box(b);
                            Ok(())
                        })
                        .map_err(|e| LoadError::io(&f.path, e))?;
                    }
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| LoadError::Device("an io_uring reader panicked".into()))??;
        }
        Ok(())
    })?;
    Ok(LoadStats {
        bytes_read: bytes.load(Ordering::Relaxed),
        seconds: start.elapsed().as_secs_f64(),
        files_direct: if direct {
            plan.files.len() - buffered_files
        } else {
            0
        },
        files_buffered: if direct {
            buffered_files
        } else {
            plan.files.len()
        },
        threads,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn diskstats_lines_give_request_sizes_and_depth() {
        let stats = "\
 254       0 vda 1000 10 2048000 5000 0 0 0 0 0 900 16000 0 0 0 0 0 0
 254       1 vda1 10 0 80 5 0 0 0 0 0 3 5 0 0 0 0 0 0
";
        let a = BlockCounters::parse(stats, "vda").unwrap();
        assert_eq!(
            a,
            BlockCounters {
                reads: 1000,
                sectors: 2048000,
                read_ms: 5000,
                weighted_ms: 16000
            }
        );
        assert_eq!(BlockCounters::parse(stats, "vda1").unwrap().reads, 10);
        assert!(BlockCounters::parse(stats, "vdb").is_none());
        assert!(BlockCounters::parse("254 0 vda 1 2 x", "vda").is_none());
        // 100 more reads of 8 sectors... 200 KiB each on average, 4 ms each,
        // 2 s of weighted time over 0.5 s: 4 in flight.
        let b = BlockCounters {
            reads: 1100,
            sectors: 2048000 + 100 * 400,
            read_ms: 5400,
            weighted_ms: 18000,
        };
        let d = DeviceRequests::between("vda", a, b, 0.5).unwrap();
        assert_eq!(
            (d.requests, d.req_kib, d.ms_per_req, d.mean_in_flight),
            (100, 200.0, 4.0, 4.0)
        );
        assert!(
            DeviceRequests::between("vda", b, a, 0.5).is_none(),
            "counters went back"
        );
        assert!(
            DeviceRequests::between("vda", a, a, 0.5).is_none(),
            "no reads"
        );
    }

    #[test]
    fn the_peak_is_the_fastest_full_window() {
        // 1 GB/s for 2 s, then 3 GB/s for 1 s, then 0.5 GB/s for 1 s.
        let mut samples = Vec::new();
        let mut bytes = 0u64;
        for i in 0..=40 {
            let t = i as f64 * 0.1;
            samples.push((t, bytes));
            bytes += match t {
                t if t < 1.95 => 100_000_000,
                t if t < 2.95 => 300_000_000,
                _ => 50_000_000,
            };
        }
        let peak = peak_rate(&samples, 1.0).unwrap();
        assert!((peak - 3.0).abs() < 1e-6, "{peak}");
        // Wider than the burst: the burst with some of its neighbours.
        let wide = peak_rate(&samples, 2.0).unwrap();
        assert!((wide - 2.0).abs() < 1e-6, "{wide}");
        // Shorter than the window, or no samples: nothing to say.
        assert_eq!(peak_rate(&samples[..5], 1.0), None);
        assert_eq!(peak_rate(&[], 1.0), None);
        // Samples closer than the window still measure over the window.
        let sparse = [(0.0, 0), (0.5, 1_000_000_000), (1.5, 1_500_000_000)];
        assert!((peak_rate(&sparse, 1.0).unwrap() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn a_read_is_sampled_from_start_to_end() {
        let done = AtomicU64::new(0);
        let (out, samples) = with_progress(&done, || {
            for _ in 0..5 {
                std::thread::sleep(std::time::Duration::from_millis(10));
                done.fetch_add(7, Ordering::Relaxed);
            }
            "read"
        });
        assert_eq!(out, "read");
        assert_eq!(samples.first(), Some(&(0.0, 0)));
        assert_eq!(samples.last().map(|s| s.1), Some(35));
        assert!(samples
            .windows(2)
            .all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
    }

    #[test]
    fn noise_is_not_zero_and_follows_the_seed() {
        let mut a = vec![0u8; 1001];
        let mut b = vec![0u8; 1001];
        fill_noise(&mut a, 0);
        fill_noise(&mut b, 1);
        assert!(a.iter().filter(|&&x| x == 0).count() < 50);
        assert_ne!(a, b);
    }

    #[test]
    fn patterns_round_trip_through_their_names() {
        for p in candidates() {
            let back: ReadPattern = p.to_string().parse().unwrap();
            assert_eq!(back, p);
        }
        let p: ReadPattern = "buffered:per-file:4x16M:willneed:qd4".parse().unwrap();
        assert_eq!(p.threads, 4);
        assert_eq!(p.request, 16 << 20);
        assert_eq!(p.advice, Advice::WillNeed);
        assert_eq!(p.queue_depth, Some(4));
        for bad in [
            "direct",
            "direct:shared",
            "fast:shared:4x1M",
            "direct:round:4x1M",
            "direct:shared:0x1M",
            "direct:shared:4x1000",
            "direct:shared:4x1M:qd0",
            "direct:shared:4x1M:soon",
        ] {
            let e = bad.parse::<ReadPattern>().unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn every_pattern_reads_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = Vec::new();
        for (i, len) in [300_000u64, 1 << 20, 5000].iter().enumerate() {
            let path = dir.path().join(format!("f{i}"));
            let data: Vec<u8> = (0..*len).map(|x| (x % 253) as u8).collect();
            File::create(&path).unwrap().write_all(&data).unwrap();
            files.push(SourceFile { path, len: *len });
        }
        let total: u64 = files.iter().map(|f| f.len).sum();
        let mut patterns = candidates();
        patterns.push("direct:shared:3x64K".parse().unwrap());
        patterns.push("buffered:shared:2x4K:none".parse().unwrap());
        for p in patterns {
            if p.queue_depth.is_some() && !os::io_uring_allowed() {
                continue;
            }
            let r = read_files(&files, None, &p).unwrap();
            // Reads are whole 4 KiB blocks; the files' tails are short reads.
            assert_eq!(r.bytes, total, "{p}");
            let r = read_files(&files, Some(8192), &p).unwrap();
            assert_eq!(r.bytes, 8192 + 8192 + 5000, "{p}");
        }
        // On a block device, an evicted O_DIRECT read shows up in its
        // counters (the CI machine's disk; a tmpfs has none to show).
        if let Some((name, _)) = BlockCounters::of(dir.path()) {
            let paths: Vec<_> = files.iter().map(|f| f.path.clone()).collect();
            evict(&paths).unwrap();
            let r = read_files(&files, None, &"direct:shared:2x64K".parse().unwrap()).unwrap();
            let d = r.device.expect("the device's counters");
            assert_eq!(d.name, name);
            assert!(
                d.requests >= 1 && d.req_kib > 0.0 && d.ms_per_req >= 0.0,
                "{d:?}"
            );
        }
    }

    #[test]
    fn a_probe_of_existing_files_reads_their_first_bytes_and_keeps_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = Vec::new();
        for (i, len) in [3u64 << 20, 1 << 20].into_iter().enumerate() {
            let path = dir.path().join(format!("data-{i}.bin"));
            let mut data = vec![0u8; len as usize];
            fill_noise(&mut data, i as u64);
            File::create(&path).unwrap().write_all(&data).unwrap();
            files.push(SourceFile { path, len });
        }
        let patterns: Vec<ReadPattern> = ["direct:shared:2x1M", "buffered:per-file:2x1M"]
            .iter()
            .map(|p| p.parse().unwrap())
            .collect();
        let p = probe_files(&files, Some(2 << 20), &patterns, 2).unwrap();
        // 2 MiB of the first file, the whole of the second.
        assert_eq!((p.files, p.test_bytes), (2, 3 << 20));
        assert!(p.patterns.iter().all(|r| r.gbps.len() == 2));
        let fastest = p
            .patterns
            .iter()
            .flat_map(|r| r.peak_gbps.clone())
            .fold(0.0, f64::max);
        assert_eq!(p.read_gbps, fastest);
        assert!(files.iter().all(|f| f.path.is_file()), "files kept");
        let e = probe_files(&[], None, &patterns, 1).unwrap_err();
        assert!(e.to_string().contains("no files"), "{e}");
    }

    #[test]
    fn the_probe_names_the_best_pattern_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let patterns: Vec<ReadPattern> = ["direct:shared:2x1M", "buffered:per-file:2x1M"]
            .iter()
            .map(|p| p.parse().unwrap())
            .collect();
        let p = probe_dir(dir.path(), 6 << 20 << 3, 3, &patterns, 2).unwrap();
        assert_eq!(p.files, 3);
        assert_eq!(p.test_bytes, 3 * (16 << 20));
        assert_eq!(p.patterns.len(), 2);
        assert!(p.patterns.iter().all(|r| r.gbps.len() == 2));
        assert!(patterns.iter().any(|q| q.to_string() == p.best_pattern));
        // The limit is the best peak, and no read's average is above it.
        let peak = |r: &PatternRates| r.peak_gbps.clone();
        let fastest = p.patterns.iter().flat_map(peak).fold(0.0, f64::max);
        assert_eq!(p.read_gbps, fastest);
        for r in &p.patterns {
            assert_eq!(r.peak_gbps.len(), r.gbps.len());
            assert!(r.gbps.iter().zip(&r.peak_gbps).all(|(g, pk)| pk >= g));
        }
        assert!(p.page_cache_gbps > 0.0);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
