//! The GPU sink: readers fill small pinned staging buffers, each buffer is
//! copied to the device asynchronously on the worker's own stream, and a
//! buffer is reused once the event after its copy has completed.
//!
//! Per reader thread: one CUDA stream and up to `LoadOptions::staging_buffers`
//! pinned buffers of `LoadOptions::staging_bytes`, pinned lazily (a new one only while the
//! previous copy has not ended) or taken from a [`StagingPool`] pinned once
//! (the daemon's path: never pin on the load path). A job (a read window of
//! `LoadOptions::chunk_bytes`) is read and copied piece by piece. Ownership
//! of a buffer moves worker (CPU writes) → `InFlight` (DMA reads) → worker,
//! enforced by `flash_sys::cuda`.
//!
//! Measured on the GPU machine (bench/results, `bench/tune.sh`): the disk
//! wants about 1 GiB of reads in flight, so a reader's buffer holds a whole
//! read (32 MiB, two a reader, 16 readers: at most [`STAGING_LIMIT`]); with
//! 2 MiB pieces the cold load ran 10-15 % below the raw disk. A pageable
//! staging path with synchronous copies was tried and was no faster cold
//! and slower for small models (first-touch faults of fresh buffers).

use crate::decode;
use crate::error::LoadError;
use crate::pipeline::{execute, LoadOptions, LoadStats, ReadFn, Sink, SinkWorker, STAGING_LIMIT};
use crate::plan::{Job, LoadPlan, TensorTable, TensorView};
use crate::source::ModelSource;
use flash_sys::cuda::{CudaError, DeviceMemory, Gpu, InFlight, PinnedBuffer, Stream};
use flash_sys::os::AlignedBuf;
use std::collections::VecDeque;
use std::sync::Mutex;

fn dev(e: CudaError) -> LoadError {
    LoadError::Device(e.to_string())
}

/// Where [`load_to_gpu`] puts each tensor: a multiple of this many bytes.
pub const DEVICE_ALIGN: u64 = 256;

/// Pinned staging buffers allocated once and lent to loads.
pub struct StagingPool {
    buf_bytes: usize,
    bufs: Mutex<Vec<PinnedBuffer>>,
}

impl StagingPool {
    /// `count` buffers of `buf_bytes` each, pinned now.
    pub fn new(gpu: &Gpu, count: usize, buf_bytes: usize) -> Result<Self, LoadError> {
        let bufs = (0..count)
            .map(|_| gpu.pinned(buf_bytes).map_err(dev))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(StagingPool {
            buf_bytes,
            bufs: Mutex::new(bufs),
        })
    }

    fn take(&self) -> Option<PinnedBuffer> {
        self.bufs.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    fn give_back(&self, bufs: impl IntoIterator<Item = PinnedBuffer>) {
        self.bufs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(bufs);
    }
}

/// Loads into one device allocation.
pub struct CudaSink<'d> {
    dest: &'d DeviceMemory,
    pool: Option<&'d StagingPool>,
    piece: usize,
    /// Pinned buffers a reader may hold.
    per_worker: usize,
}

impl<'d> CudaSink<'d> {
    /// Pinned buffers of `piece` bytes are pinned lazily by each worker.
    pub fn new(dest: &'d DeviceMemory, piece: usize) -> Self {
        CudaSink {
            dest,
            pool: None,
            piece: piece.max(4096),
            per_worker: 2,
        }
    }

    /// At most `buffers` pinned buffers a reader (at least one), and at most
    /// [`STAGING_LIMIT`] bytes for `threads` readers together.
    pub fn buffers(mut self, buffers: usize, threads: usize) -> Self {
        let fit = STAGING_LIMIT / (self.piece as u64 * threads.max(1) as u64);
        self.per_worker = buffers.min(fit as usize).max(1);
        self
    }

    /// Pinned buffers come from `pool`.
    pub fn with_pool(dest: &'d DeviceMemory, pool: &'d StagingPool) -> Self {
        CudaSink {
            dest,
            pool: Some(pool),
            piece: pool.buf_bytes,
            per_worker: 2,
        }
    }
}

pub struct CudaWorker<'s, 'd> {
    sink: &'s CudaSink<'d>,
    stream: Stream,
    free: Vec<PinnedBuffer>,
    in_flight: VecDeque<InFlight>,
    pinned: usize,
    /// Encoded windows as read, and their decoded bytes (made on the first
    /// encoded window).
    window: Option<AlignedBuf>,
    decoded: Option<AlignedBuf>,
}

impl<'d> Sink for CudaSink<'d> {
    type Worker<'s>
        = CudaWorker<'s, 'd>
    where
        Self: 's;
    fn worker(&self) -> Result<CudaWorker<'_, 'd>, LoadError> {
        let stream = self.dest.gpu().stream().map_err(dev)?;
        Ok(CudaWorker {
            sink: self,
            stream,
            free: Vec::new(),
            in_flight: VecDeque::new(),
            pinned: 0,
            window: None,
            decoded: None,
        })
    }
}

impl CudaWorker<'_, '_> {
    /// A pinned buffer the CPU may write: a free one, the oldest in flight if
    /// its copy already ended, a new one while under the budget, else the
    /// oldest in flight once its copy ends.
    fn pinned_buffer(&mut self) -> Result<PinnedBuffer, LoadError> {
        if let Some(b) = self.free.pop() {
            return Ok(b);
        }
        if let Some(t) = self.in_flight.pop_front() {
            match t.try_take().map_err(dev)? {
                Ok(b) => return Ok(b),
                Err(t) => self.in_flight.push_front(t),
            }
        }
        if self.pinned < self.sink.per_worker {
            let b = match self.sink.pool {
                Some(pool) => pool.take(),
                None => Some(self.sink.dest.gpu().pinned(self.sink.piece).map_err(dev)?),
            };
            if let Some(b) = b {
                self.pinned += 1;
                return Ok(b);
            }
        }
        match self.in_flight.pop_front() {
            Some(t) => t.wait().map_err(dev),
            None => Err(LoadError::Device(
                "the staging pool has no buffer left for this reader".into(),
            )),
        }
    }
}

impl CudaWorker<'_, '_> {
    /// Copies `bytes` to `dest_offset` of the destination through pinned
    /// buffers, asynchronously.
    fn upload(&mut self, bytes: &[u8], dest_offset: u64) -> Result<(), LoadError> {
        for (k, piece) in bytes.chunks(self.sink.piece).enumerate() {
            let mut buf = self.pinned_buffer()?;
            buf[..piece.len()].copy_from_slice(piece);
            let at = dest_offset as usize + k * self.sink.piece;
            let t = self
                .sink
                .dest
                .copy_from_host_async(at, buf, 0..piece.len(), &self.stream)
                .map_err(dev)?;
            self.in_flight.push_back(t);
        }
        Ok(())
    }

    /// An encoded window decoded on the CPU, then uploaded.
    fn decode_on_cpu(
        &mut self,
        job: &Job,
        plan: &LoadPlan,
        read: &mut ReadFn,
    ) -> Result<(), LoadError> {
        let range = decode::job_dest_range(plan, job);
        let mut window = self.window.take();
        let mut decoded = self.decoded.take();
        let result = (|| {
            let w = decode::at_least(&mut window, job.len as usize)?;
            let n = read(&mut w[..job.len as usize], 0)?;
            let d = decode::at_least(&mut decoded, (range.end - range.start) as usize)?;
            for c in decode::job_chunks(plan, job) {
                let stored = decode::stored_bytes(plan, job, c, &w[..n])?;
                let at = (c.dest_offset - range.start) as usize;
                decode::decode_chunk(plan, c, stored, &mut d[at..at + c.decoded_len as usize])?;
            }
            Ok::<_, LoadError>(())
        })();
        let uploaded = result.and_then(|_| {
            let d = decoded.as_ref().expect("made above");
            self.upload(&d[..(range.end - range.start) as usize], range.start)
        });
        self.window = window;
        self.decoded = decoded;
        uploaded
    }
}

impl SinkWorker for CudaWorker<'_, '_> {
    fn transfer(&mut self, job: &Job, plan: &LoadPlan, read: &mut ReadFn) -> Result<(), LoadError> {
        if job.decodes() {
            return self.decode_on_cpu(job, plan, read);
        }
        let piece = self.sink.piece as u64;
        let mut at = 0u64;
        while at < job.len {
            let mut buf = self.pinned_buffer()?;
            let want = piece.min(job.len - at) as usize;
            let n = match read(&mut buf[..want], at) {
                Ok(n) => n,
                Err(e) => {
                    self.free.push(buf);
                    return Err(e);
                }
            };
            let t = self
                .sink
                .dest
                .copy_from_host_async((job.dest_offset + at) as usize, buf, 0..n, &self.stream)
                .map_err(dev)?;
            self.in_flight.push_back(t);
            if n < want {
                break; // end of file
            }
            at += n as u64;
        }
        Ok(())
    }

    fn finish(mut self) -> Result<(), LoadError> {
        while let Some(t) = self.in_flight.pop_front() {
            let b = t.wait().map_err(dev)?;
            self.free.push(b);
        }
        Ok(())
    }
}

impl Drop for CudaWorker<'_, '_> {
    fn drop(&mut self) {
        // On an error path copies may still be queued: wait for them, then
        // hand pooled buffers back.
        let done: Vec<PinnedBuffer> = self
            .in_flight
            .drain(..)
            .filter_map(|t| t.wait().ok())
            .collect();
        self.free.extend(done);
        if let Some(pool) = self.sink.pool {
            pool.give_back(self.free.drain(..));
        }
    }
}

/// A model resident in one device allocation.
pub struct GpuModel {
    pub mem: DeviceMemory,
    table: TensorTable,
}

impl GpuModel {
    pub fn tensors(&self) -> &[TensorView] {
        self.table.all()
    }

    pub fn get(&self, name: &str) -> Option<&TensorView> {
        self.table.get(name)
    }

    /// Device address of a tensor.
    pub fn device_ptr(&self, t: &TensorView) -> u64 {
        self.mem.device_ptr() + t.offset
    }
}

/// Loads the selected tensors of `source` into one new allocation on `gpu`.
pub fn load_to_gpu(
    source: &ModelSource,
    select: Option<&dyn Fn(&str) -> bool>,
    gpu: &Gpu,
    opts: &LoadOptions,
    pool: Option<&StagingPool>,
) -> Result<(GpuModel, LoadStats), LoadError> {
    // Tensors on 256-byte boundaries, whatever the files' header lengths
    // (the engine's kernels read whole 16-byte vectors).
    let plan = LoadPlan::new(source, select)?.aligned_for_device(DEVICE_ALIGN);
    let mem = gpu.alloc(plan.dest_len.max(1) as usize).map_err(|e| {
        LoadError::model(
            &source.dir,
            format!(
                "cannot allocate {} bytes on GPU {}: {e}",
                plan.dest_len,
                gpu.ordinal()
            ),
        )
    })?;
    let stats = match pool {
        Some(pool) => execute(&plan, &CudaSink::with_pool(&mem, pool), opts)?,
        None => execute(
            &plan,
            &CudaSink::new(&mem, opts.staging_bytes as usize)
                .buffers(opts.staging_buffers, opts.threads),
            opts,
        )?,
    };
    Ok((
        GpuModel {
            mem,
            table: TensorTable::new(plan.tensors),
        },
        stats,
    ))
}

/// Copies a whole host image (already in pinned memory, the daemon's memory
/// tier) to `dest` in pieces of `piece` bytes on `stream`, and waits.
pub fn upload_pinned(
    src: PinnedBuffer,
    dest: &DeviceMemory,
    stream: &Stream,
    piece: usize,
) -> Result<PinnedBuffer, LoadError> {
    let n = src.len().min(dest.len());
    let mut t = src.lend(stream);
    let piece = piece.max(1 << 20);
    let mut off = 0;
    while off < n {
        let len = piece.min(n - off);
        t.copy_to_device(off..off + len, dest, off).map_err(dev)?;
        off += len;
    }
    t.wait().map_err(dev)
}
