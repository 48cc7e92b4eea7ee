//! Sinks on the CPU side: a whole model into host memory ([`HostSink`]), or
//! each read handed to a function and dropped ([`ScanSink`], for verify and
//! export, which must not hold a whole model in memory).

use crate::decode;
use crate::error::LoadError;
use crate::pipeline::{execute, LoadOptions, LoadStats, ReadFn, Sink, SinkWorker};
use crate::plan::{Job, LoadPlan, TensorTable, TensorView};
use crate::source::ModelSource;
use flash_sys::os::{AlignedBuf, SharedRegion};

/// Fills host memory in place: each reader writes its window of the
/// destination directly (O_DIRECT straight into it when the file allows),
/// no staging copy.
pub struct HostSink<'a> {
    region: SharedRegion<'a>,
}

impl<'a> HostSink<'a> {
    /// `dest` must be at least the plan's `dest_len` and 4 KiB-aligned for
    /// O_DIRECT to be used (an unaligned one is read into buffered).
    pub fn new(dest: &'a mut [u8]) -> Self {
        HostSink {
            region: SharedRegion::new(dest),
        }
    }
}

pub struct HostWorker<'s, 'a> {
    sink: &'s HostSink<'a>,
    /// Where encoded windows are read before they are decoded into place
    /// (made on the first one).
    staging: Option<AlignedBuf>,
}

impl<'a> Sink for HostSink<'a> {
    type Worker<'s>
        = HostWorker<'s, 'a>
    where
        Self: 's;
    fn worker(&self) -> Result<HostWorker<'_, 'a>, LoadError> {
        Ok(HostWorker {
            sink: self,
            staging: None,
        })
    }
}

impl SinkWorker for HostWorker<'_, '_> {
    fn transfer(&mut self, job: &Job, plan: &LoadPlan, read: &mut ReadFn) -> Result<(), LoadError> {
        if job.decodes() {
            return self.decode(job, plan, read);
        }
        let mut window = self
            .sink
            .region
            .claim(job.dest_offset as usize, job.len as usize)
            .map_err(|e| LoadError::Device(format!("host destination: {e}")))?;
        read(&mut window, 0)?;
        Ok(())
    }
    fn finish(self) -> Result<(), LoadError> {
        Ok(())
    }
}

impl HostWorker<'_, '_> {
    /// Reads an encoded window into the staging buffer and decodes each of
    /// its chunks into the destination.
    fn decode(&mut self, job: &Job, plan: &LoadPlan, read: &mut ReadFn) -> Result<(), LoadError> {
        let need = job.len as usize;
        let buf = decode::at_least(&mut self.staging, need)?;
        let n = read(&mut buf[..need], 0)?;
        let window = &buf[..n];
        for c in decode::job_chunks(plan, job) {
            let stored = decode::stored_bytes(plan, job, c, window)?;
            let mut out = self
                .sink
                .region
                .claim(c.dest_offset as usize, c.decoded_len as usize)
                .map_err(|e| LoadError::Device(format!("host destination: {e}")))?;
            decode::decode_chunk(plan, c, stored, &mut out)?;
        }
        Ok(())
    }
}

/// Hands the bytes of each job to `f` from a per-worker staging buffer.
/// Jobs arrive on several threads, in no particular order.
pub struct ScanSink<F> {
    f: F,
    chunk_bytes: usize,
}

impl<F> ScanSink<F>
where
    F: Fn(&Job, &[u8]) -> Result<(), LoadError> + Sync,
{
    pub fn new(chunk_bytes: u64, f: F) -> Self {
        ScanSink {
            f,
            chunk_bytes: chunk_bytes as usize,
        }
    }
}

pub struct ScanWorker<'s, F> {
    sink: &'s ScanSink<F>,
    buf: AlignedBuf,
}

impl<F> Sink for ScanSink<F>
where
    F: Fn(&Job, &[u8]) -> Result<(), LoadError> + Sync,
{
    type Worker<'s>
        = ScanWorker<'s, F>
    where
        Self: 's;
    fn worker(&self) -> Result<ScanWorker<'_, F>, LoadError> {
        let buf = AlignedBuf::new(self.chunk_bytes)
            .map_err(|e| LoadError::Device(format!("staging buffer: {e}")))?;
        Ok(ScanWorker { sink: self, buf })
    }

    /// Scans see whole chunks (checksums are per chunk).
    fn fixed_windows(&self) -> bool {
        true
    }
}

impl<F> SinkWorker for ScanWorker<'_, F>
where
    F: Fn(&Job, &[u8]) -> Result<(), LoadError> + Sync,
{
    fn transfer(
        &mut self,
        job: &Job,
        _plan: &LoadPlan,
        read: &mut ReadFn,
    ) -> Result<(), LoadError> {
        if job.len as usize > self.buf.len() {
            return Err(LoadError::Device(format!(
                "job of {} bytes exceeds the {}-byte staging buffer",
                job.len,
                self.buf.len()
            )));
        }
        let n = read(&mut self.buf[..job.len as usize], 0)?;
        (self.sink.f)(job, &self.buf[..n])
    }
    fn finish(self) -> Result<(), LoadError> {
        Ok(())
    }
}

/// A model loaded into host memory.
pub struct HostModel {
    buf: AlignedBuf,
    table: TensorTable,
}

impl HostModel {
    pub fn tensors(&self) -> &[TensorView] {
        self.table.all()
    }

    /// The view and bytes of tensor `name`.
    pub fn get(&self, name: &str) -> Option<(&TensorView, &[u8])> {
        let t = self.table.get(name)?;
        Some((t, self.bytes(t)))
    }

    pub fn bytes(&self, t: &TensorView) -> &[u8] {
        &self.buf[t.offset as usize..(t.offset + t.length) as usize]
    }

    /// The whole destination buffer (tensors at their views' offsets).
    pub fn buffer(&self) -> &[u8] {
        &self.buf
    }
}

/// Loads the tensors of `source` selected by `select` into host memory.
pub fn load_to_host(
    source: &ModelSource,
    select: Option<&dyn Fn(&str) -> bool>,
    opts: &LoadOptions,
) -> Result<(HostModel, LoadStats), LoadError> {
    let plan = LoadPlan::new(source, select)?;
    let mut buf = AlignedBuf::new(plan.dest_len as usize).map_err(|e| {
        LoadError::model(
            &source.dir,
            format!("cannot allocate {} bytes: {e}", plan.dest_len),
        )
    })?;
    let stats = execute(&plan, &HostSink::new(&mut buf), opts)?;
    Ok((
        HostModel {
            buf,
            table: TensorTable::new(plan.tensors),
        },
        stats,
    ))
}
