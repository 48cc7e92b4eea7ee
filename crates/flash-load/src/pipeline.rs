//! The load pipeline: worker threads read the plan's jobs from storage and
//! hand each to a [`Sink`], which puts the bytes where they belong (host
//! memory, or a GPU through pinned staging buffers).
//!
//! Threads: `LoadOptions::threads` workers, each with its own sink worker
//! (its own staging buffers and CUDA stream on a GPU). How the workers walk
//! the files is the [`ReadOrder`]: one queue in file order shared by all, or
//! one queue per file with the workers spread over the files. The first
//! error stops every worker and is returned.

use crate::error::LoadError;
use crate::plan::{Job, LoadPlan, ALIGN};
use flash_sys::os;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// How files are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IoMode {
    /// O_DIRECT for files mostly absent from the page cache, buffered reads
    /// for files mostly in it (a warm page cache is faster than the disk).
    #[default]
    Auto,
    /// O_DIRECT where the file system allows it.
    Direct,
    /// Through the page cache.
    Buffered,
}

impl std::str::FromStr for IoMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(IoMode::Auto),
            "direct" => Ok(IoMode::Direct),
            "buffered" => Ok(IoMode::Buffered),
            _ => Err(format!("unknown I/O mode {s:?} (auto, direct, buffered)")),
        }
    }
}

/// How the reader threads walk the files of a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReadOrder {
    /// One queue of windows in file order, shared by every reader: the disk
    /// sees one region of one file at a time, read by all readers at once.
    #[default]
    Shared,
    /// One queue per file: the readers are spread evenly over the files and
    /// each file is read front to back by its own readers, every file at
    /// once; a reader whose file is done helps the file with most left.
    PerFile,
}

impl std::str::FromStr for ReadOrder {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "shared" => Ok(ReadOrder::Shared),
            "per-file" => Ok(ReadOrder::PerFile),
            _ => Err(format!("unknown read order {s:?} (shared, per-file)")),
        }
    }
}

impl std::fmt::Display for ReadOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReadOrder::Shared => "shared",
            ReadOrder::PerFile => "per-file",
        })
    }
}

/// A hint given to the kernel for files read through the page cache
/// (O_DIRECT reads bypass the page cache and its readahead).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Advice {
    /// `POSIX_FADV_SEQUENTIAL` on the whole file: a larger readahead window.
    #[default]
    Sequential,
    /// As `Sequential`, and before each read `POSIX_FADV_WILLNEED` on the
    /// next window of the same file, so the kernel fetches it while this
    /// one is copied out.
    WillNeed,
    /// No hint.
    None,
}

impl std::str::FromStr for Advice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sequential" | "seq" => Ok(Advice::Sequential),
            "willneed" => Ok(Advice::WillNeed),
            "none" => Ok(Advice::None),
            _ => Err(format!(
                "unknown read advice {s:?} (sequential, willneed, none)"
            )),
        }
    }
}

impl std::fmt::Display for Advice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Advice::Sequential => "sequential",
            Advice::WillNeed => "willneed",
            Advice::None => "none",
        })
    }
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Reader threads (each with its own sink worker).
    pub threads: usize,
    /// Bytes per read (rounded up to 4 KiB).
    pub chunk_bytes: u64,
    pub io: IoMode,
    /// How the readers walk the files.
    pub order: ReadOrder,
    /// Kernel hint for files read through the page cache.
    pub advice: Advice,
    /// Bytes of one pinned staging buffer of the GPU sink (ignored by host
    /// sinks); `None`: the read size ([`staging_piece`](Self::staging_piece)),
    /// so that each read, and each compressed window, lands in pinned memory
    /// whole. Buffers are pinned lazily, as each reader starts: 32 MiB
    /// buffers for 512 KiB reads pinned 512 MiB before the first bytes
    /// arrived, and a cold Qwen3-0.6B-shaped load on the GPU machine took
    /// 0.76 s with them against 0.60 s with buffers of one read
    /// (bench/results/2026-12-05-NVIDIA-H200-staging-cold-*; warm loads
    /// alike). Never more than [`STAGING_LIMIT`] for a load.
    pub staging_bytes: Option<u64>,
    /// Pinned staging buffers one reader may hold (at least 1). With one,
    /// a reader's next read waits for its last copy; with more, reads and
    /// copies overlap within a reader. [`CudaSink`](crate::CudaSink) lowers
    /// it so that all readers together pin at most [`STAGING_LIMIT`].
    pub staging_buffers: usize,
}

/// The most pinned staging memory a load holds at once (all readers): the
/// issue's ring "of at most 1 GiB". Pinning costs ~0.5 s a GiB on the GPU
/// machine, so a load that pins this much must be a long one.
pub const STAGING_LIMIT: u64 = 1 << 30;

/// Bytes per read by default: 512 KiB, the fastest peer's request size.
/// Measured on two GPU machines (bench/results/2026-12-05-NVIDIA-H200-*,
/// whole 8B cold loads in alternating rounds, 16 readers): 512 KiB reads
/// took 0.82-0.90x the time of 32 MiB ones (folder, flash format and
/// compressed alike; faster in 13 of 14 rounds), while 2 and 4 MiB reads
/// gained nothing. The block device then had 14 requests of about 512 KiB
/// in flight, 3 ms each, where 32 MiB reads queued 110 requests of 4 MiB,
/// 190 ms each. On an earlier machine 512 KiB reads were 13 % slower
/// (bench/results/2026-12-04-NVIDIA-H200-disk-dd-512k-*), and on the CI
/// machine's disk they read at half the rate of 2 MiB ones
/// (`flash bench-disk`): `--chunk-size` / `--pattern` tune it per machine.
pub const DEFAULT_READ_BYTES: u64 = 512 << 10;

/// Default reader threads: one per core, at least 4 and at most 16. Reader
/// threads mostly wait on the disk; 16 of them keep 16 reads in flight,
/// as the fastest peer does. Measured on the GPU machine (bench/results):
/// 16 readers read at the raw disk's rate, 32 readers 10-15 % below it.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(4)
        .clamp(4, 16)
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            threads: default_threads(),
            chunk_bytes: DEFAULT_READ_BYTES,
            io: IoMode::Auto,
            order: ReadOrder::Shared,
            advice: Advice::Sequential,
            staging_bytes: None,
            staging_buffers: 2,
        }
    }
}

impl LoadOptions {
    /// Bytes of one pinned staging buffer: `staging_bytes`, else the read
    /// size as [`LoadPlan::jobs`] rounds it (whole 4 KiB pages).
    pub fn staging_piece(&self) -> usize {
        let read = flash_format::manifest::align_up(self.chunk_bytes.max(ALIGN), ALIGN);
        self.staging_bytes.unwrap_or(read).max(1) as usize
    }
}

/// Where loaded bytes go. A sink hands one [`SinkWorker`] to each reader thread.
pub trait Sink: Sync {
    type Worker<'s>: SinkWorker
    where
        Self: 's;
    /// Called once on each reader thread, on that thread.
    fn worker(&self) -> Result<Self::Worker<'_>, LoadError>;

    /// Whether every job must be a whole window of `chunk_bytes` from a
    /// multiple of it (a scan that checks per-chunk checksums), rather than
    /// the guided sizes of [`LoadPlan::jobs`].
    fn fixed_windows(&self) -> bool {
        false
    }
}

/// Reads bytes of the current job: `read(buf, at)` fills `buf` from byte
/// `at` of the job's window and returns how many bytes it read (fewer only
/// where the file ends). For O_DIRECT, `buf` and `at` must be 4 KiB-aligned
/// (an unaligned buffer is read through the page cache instead).
pub type ReadFn<'a> = dyn FnMut(&mut [u8], u64) -> Result<usize, LoadError> + 'a;

pub trait SinkWorker {
    /// Moves the bytes of `job` to the destination through `read`, in one
    /// read or in pieces: verbatim to `job.dest_offset`, or, when
    /// [`Job::decodes`], by decoding `plan.chunks[job.chunks]` from the
    /// window into the destination. The transfer may complete asynchronously.
    fn transfer(&mut self, job: &Job, plan: &LoadPlan, read: &mut ReadFn) -> Result<(), LoadError>;

    /// Waits until every transfer of this worker has landed.
    fn finish(self) -> Result<(), LoadError>;
}

/// What a load did, for reports and benchmarks.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LoadStats {
    /// Bytes read from storage (tensor bytes plus alignment padding).
    pub bytes_read: u64,
    pub seconds: f64,
    /// Sum over workers of the time spent inside read calls.
    pub read_seconds: f64,
    /// Sum over workers of the time spent handing bytes to the sink.
    pub sink_seconds: f64,
    pub files_direct: usize,
    pub files_buffered: usize,
    pub threads: usize,
    /// A GPU load's time before the readers start (the plan, the device
    /// allocation, the GPU decoder and its status words), and after they end
    /// (the decoder's status read back); 0 elsewhere.
    #[serde(skip_serializing_if = "is_zero")]
    pub setup_seconds: f64,
    #[serde(skip_serializing_if = "is_zero")]
    pub finish_seconds: f64,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

impl LoadStats {
    pub fn gbps(&self) -> f64 {
        if self.seconds > 0.0 {
            self.bytes_read as f64 / self.seconds / 1e9
        } else {
            0.0
        }
    }
}

struct OpenFile {
    buffered: File,
    direct: Option<File>,
}

fn open_files(plan: &LoadPlan, mode: IoMode, advice: Advice) -> Result<Vec<OpenFile>, LoadError> {
    plan.files
        .iter()
        .map(|f| {
            let buffered = File::open(&f.path).map_err(|e| LoadError::io(&f.path, e))?;
            let want_direct = match mode {
                IoMode::Buffered => false,
                IoMode::Direct => true,
                IoMode::Auto => os::page_cache_residency(&buffered).unwrap_or(0.0) < 0.5,
            };
            let direct = if want_direct {
                os::open_direct(&f.path).map_err(|e| LoadError::io(&f.path, e))?
            } else {
                None
            };
            if direct.is_none() && advice != Advice::None {
                // Best effort: a hint, not a requirement.
                let _ = os::advise_sequential(&buffered);
            }
            Ok(OpenFile { buffered, direct })
        })
        .collect()
}

/// Reads `buf.len()` bytes at `offset`, or fewer only where the file ends.
fn read_full(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// The plan's jobs and the queues readers take them from.
struct Queues {
    jobs: Vec<Job>,
    /// Per queue: the range of its jobs in `jobs`, and the next to hand out.
    queues: Vec<(std::ops::Range<usize>, AtomicUsize)>,
}

impl Queues {
    fn new(plan: &LoadPlan, opts: &LoadOptions, fixed_windows: bool) -> Self {
        let per_file = opts.order == ReadOrder::PerFile && plan.files.len() > 1;
        let readers = |n: usize| (!fixed_windows).then_some(n.max(1));
        if !per_file {
            let jobs = plan.jobs(opts.chunk_bytes, readers(opts.threads));
            let all = 0..jobs.len();
            return Queues {
                jobs,
                queues: vec![(all, AtomicUsize::new(0))],
            };
        }
        // Each file's jobs sized for the readers it gets, so that every
        // file's last reads shrink together.
        let files_with_bytes = plan
            .segments
            .iter()
            .map(|s| s.file)
            .collect::<std::collections::BTreeSet<_>>();
        let per_queue = opts.threads / files_with_bytes.len().max(1);
        let mut jobs = Vec::new();
        let mut queues = Vec::new();
        for file in files_with_bytes {
            let start = jobs.len();
            jobs.extend(plan.jobs_of_file(file, opts.chunk_bytes, readers(per_queue)));
            queues.push((start..jobs.len(), AtomicUsize::new(start)));
        }
        Queues { jobs, queues }
    }

    /// The next job for a reader whose own queue is `home`: from that queue,
    /// else from the queue with the most jobs left. Also returns the job
    /// that follows it in its queue, if any.
    fn next(&self, home: usize) -> Option<(&Job, Option<&Job>)> {
        let take = |q: usize| {
            let (range, next) = &self.queues[q];
            let i = next.fetch_add(1, Ordering::Relaxed);
            (i < range.end).then(|| {
                let after = (i + 1 < range.end).then(|| &self.jobs[i + 1]);
                (&self.jobs[i], after)
            })
        };
        if let Some(j) = take(home % self.queues.len()) {
            return Some(j);
        }
        loop {
            let fullest = self
                .queues
                .iter()
                .enumerate()
                .map(|(q, (range, next))| {
                    let at = next.load(Ordering::Relaxed).min(range.end);
                    (range.end - at, q)
                })
                .max()?;
            if fullest.0 == 0 {
                return None;
            }
            if let Some(j) = take(fullest.1) {
                return Some(j);
            }
        }
    }

    fn len(&self) -> usize {
        self.jobs.len()
    }
}

/// Runs `plan` into `sink` and returns what it did.
pub fn execute<S: Sink>(
    plan: &LoadPlan,
    sink: &S,
    opts: &LoadOptions,
) -> Result<LoadStats, LoadError> {
    let start = Instant::now();
    let files = open_files(plan, opts.io, opts.advice)?;
    let queues = Queues::new(plan, opts, sink.fixed_windows());
    let threads = opts.threads.clamp(1, queues.len().max(1));
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<LoadError>> = Mutex::new(None);
    let bytes_read = AtomicU64::new(0);
    let read_ns = AtomicU64::new(0);
    let sink_ns = AtomicU64::new(0);

    let fail = |e: LoadError| {
        failed.store(true, Ordering::SeqCst);
        let mut slot = first_error.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(e);
    };

    std::thread::scope(|scope| {
        for home in 0..threads {
            let (queues, files, failed, fail) = (&queues, &files, &failed, &fail);
            let (bytes_read, read_ns, sink_ns) = (&bytes_read, &read_ns, &sink_ns);
            scope.spawn(move || {
                let mut worker = match sink.worker() {
                    Ok(w) => w,
                    Err(e) => return fail(e),
                };
                let mut worker_read_ns = 0u64;
                let t_worker = Instant::now();
                while !failed.load(Ordering::Relaxed) {
                    let Some((job, after)) = queues.next(home) else {
                        break;
                    };
                    let src = &plan.files[job.file];
                    let file = &files[job.file];
                    if let (Advice::WillNeed, None, Some(after)) =
                        (opts.advice, &file.direct, after)
                    {
                        // Best effort: the kernel reads it in while this one is copied out.
                        let _ = os::advise_willneed(&file.buffered, after.file_offset, after.len);
                    }
                    let job = Job {
                        buffered: file.direct.is_none(),
                        ..*job
                    };
                    let mut read = |buf: &mut [u8], at: u64| -> Result<usize, LoadError> {
                        let len = (buf.len() as u64).min(job.len.saturating_sub(at));
                        let buf = &mut buf[..len as usize];
                        let offset = job.file_offset + at;
                        let expected = len.min(src.len.saturating_sub(offset));
                        let t = Instant::now();
                        let aligned = buf.as_ptr() as u64 % ALIGN == 0 && at % ALIGN == 0;
                        let handle = match (&file.direct, aligned) {
                            (Some(d), true) => d,
                            _ => &file.buffered,
                        };
                        let n = read_full(handle, buf, offset)
                            .map_err(|e| LoadError::io(&src.path, e))?;
                        worker_read_ns += t.elapsed().as_nanos() as u64;
                        if (n as u64) < expected {
                            return Err(LoadError::Truncated {
                                path: src.path.clone(),
                                expected: offset + expected,
                                got: offset + n as u64,
                            });
                        }
                        bytes_read.fetch_add(n as u64, Ordering::Relaxed);
                        Ok(n)
                    };
                    if let Err(e) = worker.transfer(&job, plan, &mut read) {
                        return fail(e);
                    }
                }
                if let Err(e) = worker.finish() {
                    fail(e);
                }
                let total = t_worker.elapsed().as_nanos() as u64;
                read_ns.fetch_add(worker_read_ns, Ordering::Relaxed);
                sink_ns.fetch_add(total.saturating_sub(worker_read_ns), Ordering::Relaxed);
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let files_direct = files.iter().filter(|f| f.direct.is_some()).count();
    Ok(LoadStats {
        bytes_read: bytes_read.into_inner(),
        seconds: start.elapsed().as_secs_f64(),
        read_seconds: read_ns.into_inner() as f64 / 1e9,
        sink_seconds: sink_ns.into_inner() as f64 / 1e9,
        files_direct,
        files_buffered: files.len() - files_direct,
        threads,
        ..LoadStats::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_follows_the_read_size_unless_set() {
        let o = LoadOptions::default();
        assert_eq!(o.staging_piece() as u64, DEFAULT_READ_BYTES);
        // Reads are rounded up to 4 KiB; the buffer holds the whole read.
        let o = LoadOptions {
            chunk_bytes: 5000,
            ..LoadOptions::default()
        };
        assert_eq!(o.staging_piece(), 8192);
        let o = LoadOptions {
            chunk_bytes: 32 << 20,
            staging_bytes: Some(1 << 20),
            ..LoadOptions::default()
        };
        assert_eq!(o.staging_piece(), 1 << 20);
    }
}
