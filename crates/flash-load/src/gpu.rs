//! The GPU sink: readers fill pinned staging buffers, each buffer is copied
//! to the device asynchronously on the worker's own stream, and a buffer is
//! reused once the event after its copy has completed.
//!
//! Per reader thread: one CUDA stream and up to `buffers_per_worker` pinned
//! buffers of `chunk_bytes`, allocated lazily (the first read starts after one
//! allocation, not all of them) or taken from a [`StagingPool`] allocated
//! once (the daemon's path: pinning is slow, so never on the load path).
//! Ownership of a buffer moves: worker (CPU writes) → `InFlight` (DMA reads)
//! → worker again after the event; `flash_sys::cuda` enforces it.

use crate::error::LoadError;
use crate::pipeline::{execute, LoadOptions, LoadStats, Sink, SinkWorker};
use crate::plan::{Job, LoadPlan, TensorView};
use crate::source::ModelSource;
use flash_sys::cuda::{CudaError, DeviceMemory, Gpu, InFlight, PinnedBuffer, Stream};
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

fn dev(e: CudaError) -> LoadError {
    LoadError::Device(e.to_string())
}

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
    chunk_bytes: usize,
    buffers_per_worker: usize,
}

impl<'d> CudaSink<'d> {
    /// Staging buffers are pinned lazily by each worker, `chunk_bytes` each.
    pub fn new(dest: &'d DeviceMemory, chunk_bytes: u64, buffers_per_worker: usize) -> Self {
        CudaSink {
            dest,
            pool: None,
            chunk_bytes: chunk_bytes as usize,
            buffers_per_worker: buffers_per_worker.max(1),
        }
    }

    /// Staging buffers come from `pool` (its buffers must hold a whole job).
    pub fn with_pool(
        dest: &'d DeviceMemory,
        pool: &'d StagingPool,
        buffers_per_worker: usize,
    ) -> Self {
        CudaSink {
            dest,
            pool: Some(pool),
            chunk_bytes: pool.buf_bytes,
            buffers_per_worker: buffers_per_worker.max(1),
        }
    }
}

pub struct CudaWorker<'s, 'd> {
    sink: &'s CudaSink<'d>,
    stream: Stream,
    free: Vec<PinnedBuffer>,
    in_flight: VecDeque<InFlight>,
    allocated: usize,
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
            allocated: 0,
        })
    }
}

impl CudaWorker<'_, '_> {
    /// A buffer the CPU may write: a free one, a new one while under the
    /// per-worker budget, else the oldest one in flight once its copy ended.
    fn buffer(&mut self) -> Result<PinnedBuffer, LoadError> {
        if let Some(b) = self.free.pop() {
            return Ok(b);
        }
        if self.allocated < self.sink.buffers_per_worker {
            let b = match self.sink.pool {
                Some(pool) => pool.take(),
                None => Some(
                    self.sink
                        .dest
                        .gpu()
                        .pinned(self.sink.chunk_bytes)
                        .map_err(dev)?,
                ),
            };
            if let Some(b) = b {
                self.allocated += 1;
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

impl SinkWorker for CudaWorker<'_, '_> {
    fn transfer(
        &mut self,
        job: &Job,
        read: &mut dyn FnMut(&mut [u8]) -> Result<usize, LoadError>,
    ) -> Result<(), LoadError> {
        let mut buf = self.buffer()?;
        if job.len as usize > buf.len() {
            let len = buf.len();
            self.free.push(buf);
            return Err(LoadError::Device(format!(
                "a read of {} bytes does not fit a {len}-byte staging buffer",
                job.len
            )));
        }
        let n = match read(&mut buf[..job.len as usize]) {
            Ok(n) => n,
            Err(e) => {
                self.free.push(buf);
                return Err(e);
            }
        };
        let t = self
            .sink
            .dest
            .copy_from_host_async(job.dest_offset as usize, buf, 0..n, &self.stream)
            .map_err(dev)?;
        self.in_flight.push_back(t);
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
        // On an error path copies may still be queued: wait for them (an
        // InFlight's drop does), then hand pooled buffers back.
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
    tensors: Vec<TensorView>,
    index: HashMap<String, usize>,
}

impl GpuModel {
    pub fn tensors(&self) -> &[TensorView] {
        &self.tensors
    }

    pub fn get(&self, name: &str) -> Option<&TensorView> {
        Some(&self.tensors[*self.index.get(name)?])
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
    let plan = LoadPlan::new(source, select)?;
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
        Some(pool) => {
            let opts = LoadOptions {
                chunk_bytes: pool.buf_bytes as u64,
                ..opts.clone()
            };
            execute(&plan, &CudaSink::with_pool(&mem, pool, 2), &opts)?
        }
        None => execute(&plan, &CudaSink::new(&mem, opts.chunk_bytes, 2), opts)?,
    };
    let index = plan
        .tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect();
    Ok((
        GpuModel {
            mem,
            tensors: plan.tensors,
            index,
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
