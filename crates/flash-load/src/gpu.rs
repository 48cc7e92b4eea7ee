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
//! A reader's buffer holds one read (two buffers a reader; all readers
//! together at most [`STAGING_LIMIT`]) and so one compressed window, whose
//! stored bytes are at most a read (one that does not fit lands in pageable
//! memory). The reads in flight are the pipeline's choice: 512 KiB reads since
//! 2026-12-05 (`DEFAULT_READ_BYTES`); with 32 MiB ones the GPU machine's disk
//! queued about 110 requests of 4 MiB and read 10-18 % slower. A pageable
//! staging path with synchronous copies was tried and was no faster cold
//! and slower for small models (first-touch faults of fresh buffers).

use crate::decode;
use crate::error::LoadError;
use crate::pipeline::{execute, LoadOptions, LoadStats, ReadFn, Sink, SinkWorker, STAGING_LIMIT};
use crate::plan::{Job, LoadPlan, TensorTable, TensorView};
use crate::source::ModelSource;
use flash_kernels::decode::{
    chunk_descriptor, read_status, DecodeChunk, GpuDecoder, STATUS_BYTES, STATUS_INIT,
};
use flash_kernels::DevView;
use flash_sys::cuda::{CudaError, DeviceMemory, Gpu, InFlight, PinnedBuffer, Stream};
use flash_sys::os::{AlignedBuf, SharedRegion};
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Instant;

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
    /// The GPU decoder for encoded windows (else they are decoded on the CPU).
    decode: Option<GpuDecode<'d>>,
    /// A host image that keeps the stored bytes as they pass through the
    /// staging buffers (see [`CudaSink::keeping_stored_image`]).
    keep: Option<SharedRegion<'d>>,
}

/// What a sink needs to decode on the GPU: the decoder, and the status
/// words of every launch (one slot of [`STATUS_BYTES`] per chunk of the
/// plan, set to [`STATUS_INIT`]; a launch uses the slot of its first chunk).
#[derive(Clone, Copy)]
pub struct GpuDecode<'d> {
    pub decoder: &'d GpuDecoder,
    pub status: &'d DeviceMemory,
}

/// The status slots a plan's GPU decodes need, initialised.
pub fn decode_status(gpu: &Gpu, plan: &LoadPlan) -> Result<DeviceMemory, LoadError> {
    let slots = plan.chunks.len().max(1);
    let mem = gpu.alloc(slots * STATUS_BYTES).map_err(dev)?;
    let init: Vec<u8> = STATUS_INIT
        .iter()
        .copied()
        .cycle()
        .take(slots * STATUS_BYTES)
        .collect();
    mem.copy_from_host(0, &init).map_err(dev)?;
    Ok(mem)
}

/// Reads the status slots after a load: the first chunk a GPU decode found
/// corrupt, as an error naming its tensor and chunk.
pub fn check_decode_status(plan: &LoadPlan, status: &DeviceMemory) -> Result<(), LoadError> {
    let mut words = vec![0u8; status.len()];
    status.copy_to_host(0, &mut words).map_err(dev)?;
    for (slot, w) in words.chunks_exact(STATUS_BYTES).enumerate() {
        if let Some((count, first)) = read_status(w) {
            let c = plan
                .chunks
                .get(slot + first as usize)
                .or(plan.chunks.get(slot))
                .ok_or_else(|| {
                    LoadError::Device(format!("decode status slot {slot} out of range"))
                })?;
            return Err(decode::chunk_error(
                plan,
                c,
                format!(
                    "the GPU decoder found its stream corrupt ({count} bad chunk(s) in that launch)"
                ),
            ));
        }
    }
    Ok(())
}

impl<'d> CudaSink<'d> {
    /// Pinned buffers of `piece` bytes are pinned lazily by each worker.
    pub fn new(dest: &'d DeviceMemory, piece: usize) -> Self {
        CudaSink {
            dest,
            pool: None,
            piece: piece.max(4096),
            per_worker: 2,
            decode: None,
            keep: None,
        }
    }

    /// Also copies every stored byte read into `image`, laid out as the
    /// plan's stored image ([`LoadPlan::stored_image`]: a compressed model
    /// stays compressed): the daemon's cold load fills its memory tier and
    /// the GPU in one pass over the disk. The copy is made from the pinned
    /// staging buffer each read lands in, on the reader's thread, while the
    /// disk serves the other readers. `image` must hold the plan's
    /// `image_len` bytes.
    pub fn keeping_stored_image(mut self, image: &'d mut [u8]) -> Self {
        self.keep = Some(SharedRegion::new(image));
        self
    }

    /// Copies stored bytes read from the file into the kept image at `at`.
    fn keep_bytes(&self, at: u64, bytes: &[u8]) -> Result<(), LoadError> {
        if let Some(image) = &self.keep {
            image
                .claim(at as usize, bytes.len())
                .map_err(|e| LoadError::Device(format!("kept host image: {e}")))?
                .copy_from_slice(bytes);
        }
        Ok(())
    }

    /// Encoded windows are decoded on the GPU with `decode`.
    pub fn decoding_on_gpu(mut self, decode: GpuDecode<'d>) -> Self {
        self.decode = Some(decode);
        self
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
            decode: None,
            keep: None,
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
    /// encoded window decoded on the CPU).
    window: Option<AlignedBuf>,
    decoded: Option<AlignedBuf>,
    /// For GPU decodes: the device copy of the window being decoded, the
    /// device copy of its chunk descriptors, and pinned buffers for the
    /// descriptors (two, so that one is written while the other's copy is
    /// queued). Reused in stream order: the next upload into `scratch` is
    /// queued after the kernel that reads it.
    scratch: Option<DeviceMemory>,
    descs: Option<DeviceMemory>,
    desc_free: Vec<PinnedBuffer>,
    desc_in_flight: VecDeque<InFlight>,
}

/// Bytes of a worker's first descriptor buffers: a window of 32 MiB holds
/// a few hundred chunks of real weights; buffers grow when a window holds
/// more.
const DESC_BYTES: usize = 64 << 10;

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
            scratch: None,
            descs: None,
            desc_free: Vec::new(),
            desc_in_flight: VecDeque::new(),
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
    /// Copies `bytes` to offset `at` of the destination or of the worker's
    /// scratch memory through pinned buffers, asynchronously.
    fn upload_to(&mut self, bytes: &[u8], to: ScratchOrDest, at: u64) -> Result<(), LoadError> {
        for (k, piece) in bytes.chunks(self.sink.piece).enumerate() {
            let mut buf = self.pinned_buffer()?;
            buf[..piece.len()].copy_from_slice(piece);
            let off = at as usize + k * self.sink.piece;
            let target = match to {
                ScratchOrDest::Dest => self.sink.dest,
                ScratchOrDest::Scratch => self.scratch.as_ref().expect("made before staging"),
            };
            let t = target
                .copy_from_host_async(off, buf, 0..piece.len(), &self.stream)
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
                self.sink.keep_bytes(c.image_offset, stored)?;
                let at = (c.dest_offset - range.start) as usize;
                decode::decode_chunk(plan, c, stored, &mut d[at..at + c.decoded_len as usize])?;
            }
            Ok::<_, LoadError>(())
        })();
        // Only the chunks' bytes go up: a window spanning tensors has gaps
        // between them that other tensors may own.
        let uploaded = result.and_then(|_| {
            let d = decoded.as_ref().expect("made above");
            decode::job_dest_runs(plan, job)
                .into_iter()
                .try_for_each(|run| {
                    let at = (run.start - range.start) as usize;
                    self.upload_to(
                        &d[at..at + (run.end - run.start) as usize],
                        ScratchOrDest::Dest,
                        run.start,
                    )
                })
        });
        self.window = window;
        self.decoded = decoded;
        uploaded
    }
}

impl<'d> CudaWorker<'_, 'd> {
    /// A pinned descriptor buffer of at least `len` bytes the CPU may write
    /// (two at most; a smaller one is replaced).
    fn desc_buffer(&mut self, len: usize) -> Result<PinnedBuffer, LoadError> {
        let b = match self.desc_free.pop() {
            Some(b) => Some(b),
            None if self.desc_in_flight.len() < 2 => None,
            None => {
                let t = self.desc_in_flight.pop_front().expect("two in flight");
                Some(t.wait().map_err(dev)?)
            }
        };
        match b {
            Some(b) if b.len() >= len => Ok(b),
            _ => self
                .sink
                .dest
                .gpu()
                .pinned(len.max(DESC_BYTES))
                .map_err(dev),
        }
    }

    /// An encoded window read into pinned memory, its chunks checked on the
    /// host, uploaded to the worker's scratch memory and decoded there by the
    /// GPU straight into the destination.
    fn decode_on_gpu(
        &mut self,
        job: &Job,
        plan: &LoadPlan,
        read: &mut ReadFn,
        gd: GpuDecode<'d>,
    ) -> Result<(), LoadError> {
        let len = job.len as usize;
        let gpu = self.sink.dest.gpu();
        let room = len.max(self.sink.piece);
        if self.scratch.as_ref().is_none_or(|s| s.len() < room) {
            // A larger window than any before (small staging pieces): the
            // old scratch is freed after the GPU is idle (its drop syncs).
            self.scratch = Some(gpu.alloc(room).map_err(dev)?);
        }
        let desc_len = (job.chunks.1 - job.chunks.0) as usize * flash_codec::GPU_CHUNK_BYTES;
        if self.descs.as_ref().is_none_or(|d| d.len() < desc_len) {
            self.descs = Some(gpu.alloc(desc_len.max(DESC_BYTES)).map_err(dev)?);
        }
        // The window lands in one pinned buffer when it fits (uploaded from
        // there), else in pageable memory (uploaded through pinned pieces).
        let mut pinned = (len <= self.sink.piece)
            .then(|| self.pinned_buffer())
            .transpose()?;
        let mut window = self.window.take();
        let checked = (|| {
            let bytes: &mut [u8] = match &mut pinned {
                Some(p) => &mut p[..len],
                None => &mut decode::at_least(&mut window, len)?[..len],
            };
            let n = read(bytes, 0)?;
            let scratch = self.scratch.as_ref().expect("made above");
            let mut descs = Vec::with_capacity(
                (job.chunks.1 - job.chunks.0) as usize * flash_codec::GPU_CHUNK_BYTES,
            );
            for c in decode::job_chunks(plan, job) {
                let stored = decode::stored_bytes(plan, job, c, &bytes[..n])?;
                self.sink.keep_bytes(c.image_offset, stored)?;
                let layout = decode::codec_layout(plan.encoded[c.tensor as usize].layout);
                let at = (c.file_offset - job.file_offset) as usize;
                let chunk = DecodeChunk {
                    layout,
                    codec: decode::codec_kind(c.codec),
                    elems: (c.decoded_len / layout.elem_bytes() as u64) as u32,
                    stored,
                    src: DevView::new(scratch, at, stored.len()).map_err(dev)?,
                    dst: DevView::new(
                        self.sink.dest,
                        c.dest_offset as usize,
                        c.decoded_len as usize,
                    )
                    .map_err(dev)?,
                };
                chunk_descriptor(&chunk)
                    .map_err(|why| decode::chunk_error(plan, c, why))?
                    .write_to(&mut descs);
            }
            Ok::<_, LoadError>((n, descs))
        })();
        let (n, descs) = match checked {
            Ok(v) => v,
            Err(e) => {
                self.free.extend(pinned);
                self.window = window;
                return Err(e);
            }
        };
        let scratch = self.scratch.as_ref().expect("made above");
        let staged = match pinned {
            Some(buf) => scratch
                .copy_from_host_async(0, buf, 0..n, &self.stream)
                .map(|t| self.in_flight.push_back(t))
                .map_err(dev),
            None => {
                let w = window.as_ref().expect("read into it above");
                self.upload_to(&w[..n], ScratchOrDest::Scratch, 0)
            }
        };
        self.window = window;
        staged?;
        let mut d = self.desc_buffer(descs.len())?;
        d[..descs.len()].copy_from_slice(&descs);
        let descs_dev = self.descs.as_ref().expect("made above");
        let t = descs_dev
            .copy_from_host_async(0, d, 0..descs.len(), &self.stream)
            .map_err(dev)?;
        self.desc_in_flight.push_back(t);
        let status = DevView::new(
            gd.status,
            job.chunks.0 as usize * STATUS_BYTES,
            STATUS_BYTES,
        )
        .map_err(dev)?;
        gd.decoder
            .launch(
                &self.stream,
                DevView::whole(descs_dev),
                job.chunks.1 - job.chunks.0,
                status,
            )
            .map_err(dev)
    }
}

/// Where [`CudaWorker::upload_to`] copies: the worker's scratch memory or
/// the load's destination.
#[derive(Clone, Copy)]
enum ScratchOrDest {
    Scratch,
    Dest,
}

impl SinkWorker for CudaWorker<'_, '_> {
    fn transfer(&mut self, job: &Job, plan: &LoadPlan, read: &mut ReadFn) -> Result<(), LoadError> {
        if job.decodes() {
            return match self.sink.decode {
                Some(gd) => self.decode_on_gpu(job, plan, read, gd),
                None => self.decode_on_cpu(job, plan, read),
            };
        }
        let piece = self.sink.piece as u64;
        let mut at = 0u64;
        while at < job.len {
            let mut buf = self.pinned_buffer()?;
            let want = piece.min(job.len - at) as usize;
            let n = match read(&mut buf[..want], at).and_then(|n| {
                self.sink
                    .keep_bytes(job.image_offset + at, &buf[..n])
                    .map(|_| n)
            }) {
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
        while let Some(t) = self.desc_in_flight.pop_front() {
            let b = t.wait().map_err(dev)?;
            self.desc_free.push(b);
        }
        // Decode kernels queued after the last copies.
        if self.scratch.is_some() {
            self.stream.synchronize().map_err(dev)?;
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
        for t in self.desc_in_flight.drain(..) {
            let _ = t.wait();
        }
        // Kernels may still read the scratch memory: finish them before it
        // is freed (DeviceMemory's drop synchronises the context anyway).
        if self.scratch.is_some() {
            let _ = self.stream.synchronize();
        }
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
/// Compressed tensors are decoded on the GPU when the decoder can be had
/// (`decoder`, else compiled or taken from the kernel cache now), else on
/// the CPU.
pub fn load_to_gpu(
    source: &ModelSource,
    select: Option<&dyn Fn(&str) -> bool>,
    gpu: &Gpu,
    opts: &LoadOptions,
    pool: Option<&StagingPool>,
) -> Result<(GpuModel, LoadStats), LoadError> {
    load_to_gpu_with(source, select, gpu, opts, pool, None)
}

/// [`load_to_gpu`] with the GPU decoder given (the daemon loads it once).
pub fn load_to_gpu_with(
    source: &ModelSource,
    select: Option<&dyn Fn(&str) -> bool>,
    gpu: &Gpu,
    opts: &LoadOptions,
    pool: Option<&StagingPool>,
    decoder: Option<&GpuDecoder>,
) -> Result<(GpuModel, LoadStats), LoadError> {
    let started = Instant::now();
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
    let loaded;
    let decoder = match (plan.is_encoded(), decoder) {
        (false, _) => None,
        (true, Some(d)) => Some(d),
        (true, None) => {
            loaded = gpu_decoder(gpu);
            loaded.as_ref()
        }
    };
    let status = match decoder {
        Some(_) => Some(decode_status(gpu, &plan)?),
        None => None,
    };
    let mut sink = match pool {
        Some(pool) => CudaSink::with_pool(&mem, pool),
        None => {
            CudaSink::new(&mem, opts.staging_piece()).buffers(opts.staging_buffers, opts.threads)
        }
    };
    if let (Some(decoder), Some(status)) = (decoder, &status) {
        sink = sink.decoding_on_gpu(GpuDecode { decoder, status });
    }
    let setup_seconds = started.elapsed().as_secs_f64();
    let mut stats = execute(&plan, &sink, opts)?;
    let finishing = Instant::now();
    if let Some(status) = &status {
        check_decode_status(&plan, status)?;
    }
    stats.setup_seconds = setup_seconds;
    stats.finish_seconds = finishing.elapsed().as_secs_f64();
    Ok((
        GpuModel {
            mem,
            table: TensorTable::new(plan.tensors),
        },
        stats,
    ))
}

/// The GPU decoder for `gpu` from the kernel cache (compiled by NVRTC on a
/// cold cache), or `None` with a warning: compressed tensors are then
/// decoded on the CPU.
pub fn gpu_decoder(gpu: &Gpu) -> Option<GpuDecoder> {
    let cache = flash_kernels::default_kernel_cache(None);
    match GpuDecoder::load(gpu, cache.as_deref()) {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::warn!("no GPU decoder ({e}): compressed tensors are decoded on the CPU");
            None
        }
    }
}

/// Stored bytes decoded per launch by [`upload_image`]: large batches keep
/// the GPU busy; two are in flight (one copied while the other decodes).
pub const UPLOAD_BATCH: u64 = 256 << 20;

/// Uploads a stored image (the memory tier's copy of a model: `image_len`
/// bytes, laid out as [`LoadPlan::stored_image`]) into `dest` (the plan's
/// destination layout, `dest_len` bytes), and returns once it is there.
/// Verbatim ranges are copied; compressed tensors are copied in batches of
/// about [`UPLOAD_BATCH`] stored bytes to device scratch memory and decoded
/// there by `decoder` into place, a batch copied on one stream while the
/// previous one decodes on the other. Every chunk is checked on the host
/// before the GPU sees it. Without a decoder, compressed tensors are
/// decoded on the CPU first.
pub fn upload_image(
    plan: &LoadPlan,
    image: &[u8],
    dest: &DeviceMemory,
    decoder: Option<&GpuDecoder>,
) -> Result<(), LoadError> {
    if (image.len() as u64) < plan.image_len || (dest.len() as u64) < plan.dest_len {
        return Err(LoadError::Device(format!(
            "upload of an image of {} bytes into {} bytes: the plan needs {} and {}",
            image.len(),
            dest.len(),
            plan.image_len,
            plan.dest_len
        )));
    }
    let gpu = dest.gpu();
    let Some(decoder) = decoder.filter(|_| plan.is_encoded()) else {
        if !plan.is_encoded() {
            let stream = gpu.stream().map_err(dev)?;
            return stream
                .scoped_uploads(|up| {
                    for s in &plan.segments {
                        let (a, d) = (s.image_offset as usize, s.dest_offset as usize);
                        up.copy(&image[a..a + s.len as usize], dest, d)?;
                    }
                    Ok(())
                })
                .map_err(dev);
        }
        let mut decoded = vec![0u8; plan.dest_len as usize];
        decode::decode_image(plan, image, &mut decoded)?;
        return dest.copy_from_host(0, &decoded).map_err(dev);
    };
    // Batches of consecutive chunks of one tensor, with their descriptors
    // made and checked now (scratch buffer k % 2 holds batch k).
    let batch_bytes = UPLOAD_BATCH.min(plan.image_len.max(1));
    let scratch = [
        gpu.alloc(batch_bytes as usize + 4096).map_err(dev)?,
        gpu.alloc(batch_bytes as usize + 4096).map_err(dev)?,
    ];
    struct Batch {
        image: std::ops::Range<usize>,
        chunks: (u32, u32),
        descs: Vec<u8>,
    }
    // Batch boundaries first (cheap), then every batch's descriptors made
    // and checked in parallel (a 16 GB model has some 10^5 chunks).
    let mut bounds: Vec<(std::ops::Range<usize>, usize, usize)> = Vec::new();
    for t in &plan.encoded {
        let end = t.first_chunk + t.chunk_count;
        let mut first = t.first_chunk;
        while first < end {
            let start = plan.chunks[first].image_offset & !15;
            let mut last = first + 1;
            while last < end {
                let c = &plan.chunks[last];
                if c.image_offset + c.stored_len - start > batch_bytes {
                    break;
                }
                last += 1;
            }
            let c = &plan.chunks[last - 1];
            bounds.push((
                start as usize..(c.image_offset + c.stored_len) as usize,
                first,
                last,
            ));
            first = last;
        }
    }
    let batches: Vec<Batch> = {
        use rayon::prelude::*;
        bounds
            .into_par_iter()
            .enumerate()
            .map(|(k, (range, first, last))| {
                let on = &scratch[k % 2];
                let mut descs = Vec::with_capacity((last - first) * flash_codec::GPU_CHUNK_BYTES);
                for c in &plan.chunks[first..last] {
                    let at = c.image_offset as usize;
                    let stored = &image[at..at + c.stored_len as usize];
                    let layout = decode::codec_layout(plan.encoded[c.tensor as usize].layout);
                    let chunk = DecodeChunk {
                        layout,
                        codec: decode::codec_kind(c.codec),
                        elems: (c.decoded_len / layout.elem_bytes() as u64) as u32,
                        stored,
                        src: DevView::new(on, at - range.start, stored.len()).map_err(dev)?,
                        dst: DevView::new(dest, c.dest_offset as usize, c.decoded_len as usize)
                            .map_err(dev)?,
                    };
                    chunk_descriptor(&chunk)
                        .map_err(|why| decode::chunk_error(plan, c, why))?
                        .write_to(&mut descs);
                }
                Ok(Batch {
                    image: range,
                    chunks: (first as u32, last as u32),
                    descs,
                })
            })
            .collect::<Result<_, LoadError>>()?
    };
    let status = decode_status(gpu, plan)?;
    let desc_len = batches
        .iter()
        .map(|b| b.descs.len())
        .max()
        .unwrap_or(0)
        .max(8);
    let desc_dev = [
        gpu.alloc(desc_len).map_err(dev)?,
        gpu.alloc(desc_len).map_err(dev)?,
    ];
    let streams = [gpu.stream().map_err(dev)?, gpu.stream().map_err(dev)?];
    let batches = &batches;
    // Verbatim ranges and the even batches on one stream, odd batches on
    // the other: each stream copies its batch, then decodes it, in order.
    streams[0]
        .scoped_uploads(|up0| {
            streams[1].scoped_uploads(|up1| {
                let ups = [up0, up1];
                for s in &plan.segments {
                    let (a, d) = (s.image_offset as usize, s.dest_offset as usize);
                    up0.copy(&image[a..a + s.len as usize], dest, d)?;
                }
                for (k, b) in batches.iter().enumerate() {
                    let i = k % 2;
                    ups[i].copy(&image[b.image.clone()], &scratch[i], 0)?;
                    ups[i].copy(&b.descs, &desc_dev[i], 0)?;
                    let slot =
                        DevView::new(&status, b.chunks.0 as usize * STATUS_BYTES, STATUS_BYTES)?;
                    decoder.launch(
                        &streams[i],
                        DevView::new(&desc_dev[i], 0, b.descs.len())?,
                        b.chunks.1 - b.chunks.0,
                        slot,
                    )?;
                }
                Ok(())
            })
        })
        .map_err(dev)?;
    check_decode_status(plan, &status)
}

/// The GPU decoder's speed alone: the stored image already in device
/// memory, every chunk of the plan decoded in one launch into a decoded
/// destination, `repeat` times after a warm-up; returns the seconds of each
/// launch (decoded bytes: `plan.dest_len`).
pub fn time_gpu_decode(
    plan: &LoadPlan,
    image: &[u8],
    gpu: &Gpu,
    decoder: &GpuDecoder,
    repeat: usize,
) -> Result<Vec<f64>, LoadError> {
    let src = gpu.alloc(plan.image_len.max(1) as usize).map_err(dev)?;
    src.copy_from_host(0, &image[..plan.image_len as usize])
        .map_err(dev)?;
    let dest = gpu.alloc(plan.dest_len.max(1) as usize).map_err(dev)?;
    let mut descs = Vec::with_capacity(plan.chunks.len() * flash_codec::GPU_CHUNK_BYTES);
    for c in &plan.chunks {
        let at = c.image_offset as usize;
        let layout = decode::codec_layout(plan.encoded[c.tensor as usize].layout);
        let chunk = DecodeChunk {
            layout,
            codec: decode::codec_kind(c.codec),
            elems: (c.decoded_len / layout.elem_bytes() as u64) as u32,
            stored: &image[at..at + c.stored_len as usize],
            src: DevView::new(&src, at, c.stored_len as usize).map_err(dev)?,
            dst: DevView::new(&dest, c.dest_offset as usize, c.decoded_len as usize)
                .map_err(dev)?,
        };
        chunk_descriptor(&chunk)
            .map_err(|why| decode::chunk_error(plan, c, why))?
            .write_to(&mut descs);
    }
    let desc_dev = gpu.alloc(descs.len().max(8)).map_err(dev)?;
    desc_dev.copy_from_host(0, &descs).map_err(dev)?;
    let status = gpu.alloc(STATUS_BYTES).map_err(dev)?;
    let stream = gpu.stream().map_err(dev)?;
    let n = plan.chunks.len() as u32;
    let mut times = Vec::new();
    for i in 0..=repeat {
        status.copy_from_host(0, &STATUS_INIT).map_err(dev)?;
        let t = std::time::Instant::now();
        decoder
            .launch(
                &stream,
                DevView::whole(&desc_dev),
                n,
                DevView::whole(&status),
            )
            .map_err(dev)?;
        stream.synchronize().map_err(dev)?;
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
        let mut w = [0u8; STATUS_BYTES];
        status.copy_to_host(0, &mut w).map_err(dev)?;
        if let Some((count, first)) = read_status(&w) {
            let c = &plan.chunks[(first as usize).min(plan.chunks.len() - 1)];
            return Err(decode::chunk_error(
                plan,
                c,
                format!("the GPU decoder found {count} corrupt chunk(s)"),
            ));
        }
    }
    Ok(times)
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
