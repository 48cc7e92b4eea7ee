//! Sharding and the generate → write pipeline.
//!
//! Work is the list of 8 MiB chunks of every shard file, in file order (the
//! first chunk starts with the safetensors header, built by
//! `flash_format::safetensors::build_header`, so the bytes are those its
//! `Writer` would write). The calling thread fills batches of chunks in
//! parallel on its rayon pool, straight into 4 KiB-aligned buffers, and hands
//! each batch to a writer thread, which writes it with O_DIRECT while the
//! next batch is generated. Buffers go back to the producer, so steady state
//! allocates nothing; at most three batches exist at a time (one being
//! filled, one queued, one being written).
//!
//! Why not the `Writer` (a `BufWriter<File>`)? Through the page cache, this
//! VM wrote 16 GB at 257 MB/s with 60 s of kernel time (`dd`, and 185 MB/s
//! for synth); with O_DIRECT `dd` reached 875 MB/s with 3 s of kernel time.
//! Where O_DIRECT is refused (some file systems), files go through the page
//! cache with the same chunks.

use crate::random::{name_hash, Filler, BLOCK_ELEMS};
use crate::spec::{Init, SynthTensor};
use crate::{io_err, ProgressFn, SynthError};
use flash_format::safetensors::{build_header, TensorSpec};
use flash_format::DType;
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};

/// One safetensors file of the checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shard {
    /// File name inside the model folder.
    pub file: String,
    /// Indices into the tensor list, in file order.
    pub tensors: Vec<usize>,
    /// Bytes of tensor data (header excluded).
    pub data_bytes: u64,
}

/// Splits tensors the way `save_pretrained` does: in order, starting a new
/// shard when the next tensor would push the current one past `max_bytes`
/// (a tensor larger than `max_bytes` gets a shard of its own). One shard is
/// `model.safetensors`; several are `model-0000i-of-0000n.safetensors`.
pub fn plan_shards(tensors: &[SynthTensor], max_bytes: u64) -> Vec<Shard> {
    let mut groups: Vec<(Vec<usize>, u64)> = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        let b = t.bytes();
        match groups.last_mut() {
            Some((idx, sum)) if sum.saturating_add(b) <= max_bytes => {
                idx.push(i);
                *sum += b;
            }
            _ => groups.push((vec![i], b)),
        }
    }
    let n = groups.len();
    groups
        .into_iter()
        .enumerate()
        .map(|(k, (tensors, data_bytes))| Shard {
            file: if n == 1 {
                "model.safetensors".to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
            },
            tensors,
            data_bytes,
        })
        .collect()
}

/// Bytes per write: the unit of generation and of I/O. A multiple of
/// [`ALIGN`], so every write of a file but its last is aligned for O_DIRECT.
pub(crate) const CHUNK: usize = 8 << 20;
/// Alignment of O_DIRECT buffers, lengths and offsets (covers 512-byte and
/// 4 KiB logical blocks).
pub(crate) const ALIGN: usize = 4096;

/// Where a shard's header and tensors lie in its file.
struct Layout {
    /// The 8-byte length and the JSON header, as `flash_format` builds it.
    header: Vec<u8>,
    /// `(tensor index, file offset of its data, byte length)`, in file order.
    tensors: Vec<(usize, u64, u64)>,
    file_len: u64,
}

fn layouts(
    tensors: &[SynthTensor],
    shards: &[Shard],
    dir: &Path,
) -> Result<Vec<Layout>, SynthError> {
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    shards
        .iter()
        .map(|shard| {
            let specs: Vec<TensorSpec> = shard
                .tensors
                .iter()
                .map(|&t| tensors[t].spec.clone())
                .collect();
            let (json, lens) = build_header(&specs, &meta).map_err(|source| {
                flash_format::safetensors::Error::Header {
                    path: dir.join(&shard.file),
                    source,
                }
            })?;
            let mut header = (json.len() as u64).to_le_bytes().to_vec();
            header.extend_from_slice(&json);
            let mut at = header.len() as u64;
            let mut placed = Vec::with_capacity(lens.len());
            for (&t, len) in shard.tensors.iter().zip(lens) {
                placed.push((t, at, len));
                at += len;
            }
            Ok(Layout {
                header,
                tensors: placed,
                file_len: at,
            })
        })
        .collect()
}

/// One write: bytes `[offset, offset + len)` of a shard file.
struct Job {
    shard: usize,
    offset: u64,
    len: usize,
    /// Tensor data bytes in the range (the rest is header).
    data: u64,
    /// The last write of its file.
    last: bool,
}

type Batch = (Vec<Job>, Vec<Vec<u8>>);

fn round_up(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

fn jobs(layouts: &[Layout]) -> Vec<Vec<Job>> {
    let per_batch = rayon::current_num_threads().clamp(2, 8);
    let mut all = Vec::new();
    for (s, l) in layouts.iter().enumerate() {
        let header = l.header.len() as u64;
        let mut offset = 0u64;
        while offset < l.file_len {
            let len = (l.file_len - offset).min(CHUNK as u64);
            let end = offset + len;
            let data = end.saturating_sub(header.max(offset));
            all.push(Job {
                shard: s,
                offset,
                len: len as usize,
                data,
                last: end == l.file_len,
            });
            offset = end;
        }
    }
    let mut batches = Vec::new();
    let mut it = all.into_iter().peekable();
    while it.peek().is_some() {
        batches.push(it.by_ref().take(per_batch).collect());
    }
    batches
}

/// A filler per tensor, shared between tensors of the same init.
pub(crate) struct Fillers {
    fillers: Vec<(Init, DType, Filler)>,
    of_tensor: Vec<usize>,
    hashes: Vec<u64>,
    elem_bytes: Vec<u64>,
}

impl Fillers {
    pub(crate) fn new(tensors: &[SynthTensor]) -> Result<Self, SynthError> {
        let mut fillers: Vec<(Init, DType, Filler)> = Vec::new();
        let mut of_tensor = Vec::with_capacity(tensors.len());
        for t in tensors {
            let key = (t.init, t.spec.dtype);
            let pos = fillers.iter().position(|(i, d, _)| (*i, *d) == key);
            let pos = match pos {
                Some(p) => p,
                None => {
                    fillers.push((t.init, t.spec.dtype, Filler::new(t.init, t.spec.dtype)?));
                    fillers.len() - 1
                }
            };
            of_tensor.push(pos);
        }
        Ok(Fillers {
            fillers,
            of_tensor,
            hashes: tensors.iter().map(|t| name_hash(&t.spec.name)).collect(),
            elem_bytes: tensors.iter().map(|t| t.spec.dtype.bits() / 8).collect(),
        })
    }

    /// Fills `out` with the tensor's bytes starting at byte `at` of its data
    /// (`at` and `out.len()` whole elements), crossing RNG blocks as needed.
    pub(crate) fn fill(&self, seed: u64, tensor: usize, at: u64, out: &mut [u8]) {
        let e = self.elem_bytes[tensor];
        let filler = &self.fillers[self.of_tensor[tensor]].2;
        let mut elem = at / e;
        let mut out = out;
        while !out.is_empty() {
            let (block, first) = (elem / BLOCK_ELEMS, elem % BLOCK_ELEMS);
            let n = ((BLOCK_ELEMS - first) * e).min(out.len() as u64) as usize;
            let (head, rest) = out.split_at_mut(n);
            filler.fill_range(seed, self.hashes[tensor], block, first, head);
            elem += n as u64 / e;
            out = rest;
        }
    }
}

/// Fills `out` with the bytes `[job.offset, job.offset + out.len())` of the
/// shard file.
fn fill_chunk(layout: &Layout, fillers: &Fillers, seed: u64, offset: u64, out: &mut [u8]) {
    let end = offset + out.len() as u64;
    let header = layout.header.len() as u64;
    if offset < header {
        let n = (header.min(end) - offset) as usize;
        out[..n].copy_from_slice(&layout.header[offset as usize..offset as usize + n]);
    }
    // The first tensor that ends after `offset`.
    let first = layout
        .tensors
        .partition_point(|&(_, start, len)| start + len <= offset);
    for &(t, start, len) in &layout.tensors[first..] {
        if start >= end {
            break;
        }
        let lo = start.max(offset);
        let hi = (start + len).min(end);
        if lo < hi {
            let dst = &mut out[(lo - offset) as usize..(hi - offset) as usize];
            fillers.fill(seed, t, lo - start, dst);
        }
    }
}

/// An aligned window of `len` bytes inside `buf` (grown as needed), for
/// O_DIRECT. `buf` is kept, so the offset is found again on reuse.
fn aligned(buf: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if buf.len() < len + ALIGN {
        *buf = vec![0u8; len + ALIGN];
    }
    let off = buf.as_ptr().align_offset(ALIGN);
    &mut buf[off..off + len]
}

fn produce(
    batches: Vec<Vec<Job>>,
    layouts: &[Layout],
    fillers: &Fillers,
    seed: u64,
    tx: SyncSender<Batch>,
    recycled: Receiver<Vec<u8>>,
) {
    for batch in batches {
        let mut bufs: Vec<Vec<u8>> = batch
            .iter()
            .map(|_| recycled.try_recv().unwrap_or_default())
            .collect();
        bufs.par_iter_mut()
            .zip(batch.par_iter())
            .for_each(|(b, j)| {
                let win = aligned(b, round_up(j.len));
                let (data, pad) = win.split_at_mut(j.len);
                pad.fill(0);
                fill_chunk(&layouts[j.shard], fillers, seed, j.offset, data);
            });
        if tx.send((batch, bufs)).is_err() {
            return; // the writer stopped on an error
        }
    }
}

/// Everything the writer needs to stream one checkpoint.
pub(crate) struct WriteJob<'a> {
    pub dir: &'a Path,
    pub tensors: &'a [SynthTensor],
    pub shards: &'a [Shard],
    pub seed: u64,
    pub progress: Option<&'a ProgressFn>,
    /// Try O_DIRECT (false: always through the page cache).
    pub direct_io: bool,
}

/// Opens a new file for writing, with O_DIRECT where the file system takes
/// it (the page cache would otherwise hold, and slowly evict, the whole
/// checkpoint).
fn create(path: &Path, try_direct: bool) -> Result<(File, bool), SynthError> {
    let mut opts = OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(target_os = "linux")]
    if try_direct {
        use std::os::unix::fs::OpenOptionsExt;
        let mut direct = opts.clone();
        direct.custom_flags(libc::O_DIRECT);
        match direct.open(path) {
            Ok(f) => return Ok((f, true)),
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "no O_DIRECT; writing through the page cache")
            }
        }
    }
    let f = opts.open(path).map_err(io_err(path))?;
    Ok((f, false))
}

struct Sink<'a> {
    job: &'a WriteJob<'a>,
    layouts: &'a [Layout],
    /// The shard being written.
    current: Option<(usize, File, bool)>,
    done: u64,
    total: u64,
}

impl Sink<'_> {
    fn write(&mut self, j: &Job, buf: &mut Vec<u8>) -> Result<(), SynthError> {
        let path = self.job.dir.join(&self.job.shards[j.shard].file);
        let (file, direct) = match &mut self.current {
            Some((s, f, d)) if *s == j.shard => (f, d),
            slot => {
                let (f, d) = create(&path, self.job.direct_io)?;
                let c = slot.insert((j.shard, f, d));
                (&mut c.1, &mut c.2)
            }
        };
        let padded = round_up(j.len);
        let chunk = aligned(buf, padded);
        let mut result = if *direct {
            file.write_all(chunk)
        } else {
            file.write_all(&chunk[..j.len])
        };
        if let Err(e) = &result {
            // A device that wants more than 4 KiB alignment: start this file
            // again through the page cache.
            if *direct && j.offset == 0 && e.kind() == std::io::ErrorKind::InvalidInput {
                tracing::debug!(path = %path.display(), error = %e, "O_DIRECT write refused; writing through the page cache");
                *file = create(&path, false)?.0;
                *direct = false;
                result = file.write_all(&chunk[..j.len]);
            }
        }
        result.map_err(io_err(&path))?;
        if j.last {
            let len = self.layouts[j.shard].file_len;
            file.set_len(len).map_err(io_err(&path))?;
            file.sync_all().map_err(io_err(&path))?;
            tracing::debug!(shard = %self.job.shards[j.shard].file, bytes = len, "shard written");
            self.current = None;
        }
        self.done += j.data;
        if let Some(p) = self.job.progress {
            p(self.done, self.total);
        }
        Ok(())
    }

    fn consume(&mut self, rx: Receiver<Batch>, recycle: Sender<Vec<u8>>) -> Result<(), SynthError> {
        for (batch, mut bufs) in rx {
            for (j, b) in batch.iter().zip(bufs.iter_mut()) {
                self.write(j, b)?;
            }
            for b in bufs {
                // The producer may be done and gone: nothing to recycle then.
                let _ = recycle.send(b);
            }
        }
        Ok(())
    }
}

/// Writes every shard of `job` into `job.dir`: the same bytes as
/// `flash_format::safetensors::Writer` (its header builder is used), but
/// generated straight into aligned chunks and written with O_DIRECT.
pub(crate) fn write_shards(job: &WriteJob<'_>) -> Result<(), SynthError> {
    let fillers = Fillers::new(job.tensors)?;
    let layouts = layouts(job.tensors, job.shards, job.dir)?;
    let batches = jobs(&layouts);
    let total = job.shards.iter().map(|s| s.data_bytes).sum();
    let (tx, rx) = sync_channel::<Batch>(1);
    let (recycle_tx, recycle_rx) = channel::<Vec<u8>>();
    let mut sink = Sink {
        job,
        layouts: &layouts,
        current: None,
        done: 0,
        total,
    };
    // Generation runs on the calling thread, so `par_iter` uses the rayon
    // pool the caller runs in (`ThreadPool::install`); writing gets a thread.
    std::thread::scope(|s| {
        let writer = s.spawn(move || sink.consume(rx, recycle_tx));
        produce(batches, &layouts, &fillers, job.seed, tx, recycle_rx);
        match writer.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// The bytes of one whole tensor, exactly as [`crate::synth`] writes them.
pub fn tensor_data(seed: u64, tensor: &SynthTensor) -> Result<Vec<u8>, SynthError> {
    let fillers = Fillers::new(std::slice::from_ref(tensor))?;
    let block_bytes = (BLOCK_ELEMS * tensor.spec.dtype.bits() / 8) as usize;
    let mut out = vec![0u8; tensor.bytes() as usize];
    out.par_chunks_mut(block_bytes)
        .enumerate()
        .for_each(|(i, c)| fillers.fill(seed, 0, (i * block_bytes) as u64, c));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{spec, Arch};

    #[test]
    fn shards_are_greedy_and_cover_everything() {
        let s = spec(Arch::Qwen3, "8b").unwrap();
        let t = s.tensors(DType::BF16);
        let shards = plan_shards(&t, 5_000_000_000);
        assert_eq!(shards.len(), 4);
        assert_eq!(shards[0].file, "model-00001-of-00004.safetensors");
        assert!(shards.iter().all(|s| s.data_bytes <= 5_000_000_000));
        let all: Vec<usize> = shards.iter().flat_map(|s| s.tensors.clone()).collect();
        assert_eq!(all, (0..t.len()).collect::<Vec<_>>());
        assert_eq!(
            shards.iter().map(|s| s.data_bytes).sum::<u64>(),
            s.data_bytes(DType::BF16)
        );
        let one = plan_shards(&t, u64::MAX);
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].file, "model.safetensors");
        // A tensor larger than the limit gets a shard of its own.
        let each = plan_shards(&t, 1);
        assert_eq!(each.len(), t.len());
    }

    #[test]
    fn page_cache_and_direct_writes_are_identical() {
        let tmp = tempfile::tempdir().unwrap();
        let s = spec(Arch::Llama, "tiny").unwrap();
        let t = s.tensors(DType::BF16);
        let shards = plan_shards(&t, 100_000);
        assert!(shards.len() > 1);
        let mut files = Vec::new();
        for direct_io in [true, false] {
            let dir = tmp.path().join(direct_io.to_string());
            std::fs::create_dir(&dir).unwrap();
            let job = WriteJob {
                dir: &dir,
                tensors: &t,
                shards: &shards,
                seed: 1,
                progress: None,
                direct_io,
            };
            write_shards(&job).unwrap();
            let bytes: Vec<Vec<u8>> = shards
                .iter()
                .map(|s| std::fs::read(dir.join(&s.file)).unwrap())
                .collect();
            for (b, sh) in bytes.iter().zip(&shards) {
                let h = flash_format::safetensors::parse_bytes(b).unwrap();
                assert_eq!(h.data_len(), sh.data_bytes);
            }
            files.push(bytes);
        }
        assert!(files[0] == files[1]);
    }

    #[test]
    fn jobs_tile_every_file() {
        let s = spec(Arch::Llama, "1b").unwrap();
        let t = s.tensors(DType::BF16);
        let shards = plan_shards(&t, 1_000_000_000);
        let l = layouts(&t, &shards, Path::new("/x")).unwrap();
        let flat: Vec<Job> = jobs(&l).into_iter().flatten().collect();
        let data: u64 = flat.iter().map(|j| j.data).sum();
        assert_eq!(data, s.data_bytes(DType::BF16));
        for (k, layout) in l.iter().enumerate() {
            let mine: Vec<&Job> = flat.iter().filter(|j| j.shard == k).collect();
            assert_eq!(mine[0].offset, 0);
            assert!(mine
                .windows(2)
                .all(|w| w[0].offset + w[0].len as u64 == w[1].offset));
            assert!(mine.iter().all(|j| j.offset % ALIGN as u64 == 0));
            let last = mine.last().unwrap();
            assert!(last.last && mine.iter().filter(|j| j.last).count() == 1);
            assert_eq!(last.offset + last.len as u64, layout.file_len);
        }
    }

    #[test]
    fn chunks_of_a_file_match_whole_tensors() {
        // Tiny chunks that split the header and the tensors anywhere.
        let s = spec(Arch::Qwen3, "tiny").unwrap();
        let t = s.tensors(DType::F16);
        let shards = plan_shards(&t, u64::MAX);
        let l = &layouts(&t, &shards, Path::new("/x")).unwrap()[0];
        let fillers = Fillers::new(&t).unwrap();
        let mut whole = l.header.clone();
        for &(ti, _, _) in &l.tensors {
            whole.extend(tensor_data(5, &t[ti]).unwrap());
        }
        assert_eq!(whole.len() as u64, l.file_len);
        for step in [2usize, 6, 998, 4096, 70_000] {
            let mut pieced = vec![0u8; whole.len()];
            for (k, c) in pieced.chunks_mut(step).enumerate() {
                fill_chunk(l, &fillers, 5, (k * step) as u64, c);
            }
            assert!(pieced == whole, "step {step}");
        }
    }
}
