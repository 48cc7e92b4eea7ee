//! Streams tensors into flash-format data files: every tensor at an aligned
//! offset, padding zeroed, one checksum per chunk computed on the way.

use crate::dtype::DType;
use crate::manifest::{
    align_up, checksum_hex, ChunkCodec, ChunkRecord, DataFile, ElementLayout, ManifestError,
    TensorEncoding, TensorRecord, ALIGNMENT, CHUNK_ALIGN,
};
use crate::safetensors::TensorSpec;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use xxhash_rust::xxh3::Xxh3;

struct OpenFile {
    path: PathBuf,
    out: BufWriter<File>,
    record: DataFile,
    hasher: Xxh3,
    in_chunk: u64,
}

/// Writes the data files of one model into a folder (normally a temporary
/// folder that is renamed into place once the manifest is written); for a
/// model split into tensor-parallel ranks, one writer per rank
/// ([`DataWriter::for_rank`]) and [`concat_ranks`] to join their records.
pub struct DataWriter {
    dir: PathBuf,
    /// The rank recorded in every file this writer starts.
    rank: u32,
    /// File names are `<prefix><index:05>.bin`.
    prefix: String,
    chunk_size: u64,
    max_file_size: u64,
    files: Vec<DataFile>,
    tensors: Vec<TensorRecord>,
    open: Option<OpenFile>,
    /// Bytes the current tensor still expects.
    pending: u64,
    /// Checksum of the current tensor's bytes.
    tensor_hasher: Xxh3,
}

fn io_err(path: &Path, source: std::io::Error) -> ManifestError {
    ManifestError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl DataWriter {
    /// `chunk_size` must be a multiple of [`ALIGNMENT`]; a new data file is
    /// started when the next tensor would take the current one past
    /// `max_file_size` (a single larger tensor still gets a file of its own).
    pub fn new(dir: &Path, chunk_size: u64, max_file_size: u64) -> Self {
        assert!(chunk_size > 0 && chunk_size % ALIGNMENT == 0);
        DataWriter {
            dir: dir.to_path_buf(),
            rank: 0,
            prefix: "data-".into(),
            chunk_size,
            max_file_size,
            files: Vec::new(),
            tensors: Vec::new(),
            open: None,
            pending: 0,
            tensor_hasher: Xxh3::new(),
        }
    }

    /// A writer of rank `rank`'s data files, named
    /// `data-r<rank>-<index:05>.bin` so that the writers of several ranks
    /// can share a folder.
    pub fn for_rank(dir: &Path, chunk_size: u64, max_file_size: u64, rank: u32) -> Self {
        DataWriter {
            rank,
            prefix: format!("data-r{rank}-"),
            ..DataWriter::new(dir, chunk_size, max_file_size)
        }
    }

    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    fn start_file(&mut self) -> Result<(), ManifestError> {
        self.close_file()?;
        let name = format!(
            "{}{:05}.bin",
            self.prefix,
            self.files.len() + usize::from(self.open.is_some())
        );
        let path = self.dir.join(&name);
        let file = File::create(&path).map_err(|e| io_err(&path, e))?;
        self.open = Some(OpenFile {
            path,
            out: BufWriter::with_capacity(8 << 20, file),
            record: DataFile {
                name,
                size: 0,
                rank: self.rank,
                checksums: Vec::new(),
            },
            hasher: Xxh3::new(),
            in_chunk: 0,
        });
        Ok(())
    }

    fn emit(&mut self, mut bytes: &[u8]) -> Result<(), ManifestError> {
        let chunk = self.chunk_size;
        let f = self.open.as_mut().expect("a file is open");
        f.out.write_all(bytes).map_err(|e| io_err(&f.path, e))?;
        f.record.size += bytes.len() as u64;
        while !bytes.is_empty() {
            let take = (chunk - f.in_chunk).min(bytes.len() as u64) as usize;
            f.hasher.update(&bytes[..take]);
            f.in_chunk += take as u64;
            bytes = &bytes[take..];
            if f.in_chunk == chunk {
                f.record.checksums.push(checksum_hex(f.hasher.digest()));
                f.hasher.reset();
                f.in_chunk = 0;
            }
        }
        Ok(())
    }

    fn pad_to(&mut self, target: u64) -> Result<(), ManifestError> {
        const ZEROS: [u8; ALIGNMENT as usize] = [0; ALIGNMENT as usize];
        loop {
            let size = self.open.as_ref().expect("a file is open").record.size;
            if size >= target {
                return Ok(());
            }
            let n = (target - size).min(ALIGNMENT) as usize;
            self.emit(&ZEROS[..n])?;
        }
    }

    fn close_file(&mut self) -> Result<(), ManifestError> {
        let Some(size) = self.open.as_ref().map(|f| f.record.size) else {
            return Ok(());
        };
        self.pad_to(align_up(size, ALIGNMENT))?;
        let mut f = self.open.take().expect("checked above");
        if f.in_chunk > 0 {
            f.record.checksums.push(checksum_hex(f.hasher.digest()));
        }
        let file = f
            .out
            .into_inner()
            .map_err(|e| io_err(&f.path, e.into_error()))?;
        file.sync_all().map_err(|e| io_err(&f.path, e))?;
        self.files.push(f.record);
        Ok(())
    }

    fn byte_len(&self, name: &str, dtype: DType, shape: &[u64]) -> Result<u64, ManifestError> {
        dtype.byte_len(shape).ok_or_else(|| ManifestError::Invalid {
            path: self.dir.clone(),
            why: format!(
                "tensor {name:?}: shape {shape:?} of {dtype} is not a whole number of bytes"
            ),
        })
    }

    /// Moves to the aligned offset where a tensor of `stored` bytes starts
    /// (in a new file when it would take the current one past the limit)
    /// and returns it.
    fn place(&mut self, stored: u64) -> Result<u64, ManifestError> {
        let size = self.open.as_ref().map(|f| f.record.size);
        match size {
            None => self.start_file()?,
            Some(s) if s > 0 && align_up(s, ALIGNMENT) + stored > self.max_file_size => {
                self.start_file()?
            }
            Some(_) => {}
        }
        let offset = align_up(self.open.as_ref().expect("open").record.size, ALIGNMENT);
        self.pad_to(offset)?;
        Ok(offset)
    }

    /// Starts a tensor; its bytes follow through [`DataWriter::write`].
    pub fn begin_tensor(
        &mut self,
        name: &str,
        dtype: DType,
        shape: &[u64],
    ) -> Result<(), ManifestError> {
        assert_eq!(self.pending, 0, "previous tensor incomplete");
        let length = self.byte_len(name, dtype, shape)?;
        let offset = self.place(length)?;
        self.tensors.push(TensorRecord {
            name: name.to_string(),
            dtype,
            shape: shape.to_vec(),
            file: self.files.len() as u32,
            offset,
            length,
            checksum: String::new(),
            encoding: None,
            split_dim: None,
        });
        self.pending = length;
        self.tensor_hasher.reset();
        self.seal_if_complete();
        Ok(())
    }

    /// Writes a whole encoded tensor: its chunks' stored bytes in order,
    /// each at the next multiple of [`CHUNK_ALIGN`], with the codec and the
    /// checksum of the decoded bytes of each, and `checksum`, that of the
    /// tensor's decoded bytes.
    pub fn encoded_tensor(
        &mut self,
        spec: &TensorSpec,
        layout: ElementLayout,
        chunk_elems: u64,
        chunks: &[(ChunkCodec, &[u8], u64)],
        checksum: u64,
    ) -> Result<(), ManifestError> {
        assert_eq!(self.pending, 0, "previous tensor incomplete");
        let TensorSpec { name, dtype, shape } = spec;
        let length = self.byte_len(name, *dtype, shape)?;
        let mut stored_length = 0u64;
        for (i, (_, bytes, _)) in chunks.iter().enumerate() {
            if i > 0 {
                stored_length = align_up(stored_length, CHUNK_ALIGN);
            }
            stored_length += bytes.len() as u64;
        }
        let offset = self.place(stored_length)?;
        let mut at = 0u64;
        for (i, (_, bytes, _)) in chunks.iter().enumerate() {
            if i > 0 {
                let next = align_up(at, CHUNK_ALIGN);
                self.pad_to(offset + next)?;
                at = next;
            }
            self.emit(bytes)?;
            at += bytes.len() as u64;
        }
        self.tensors.push(TensorRecord {
            name: name.to_string(),
            dtype: *dtype,
            shape: shape.to_vec(),
            file: self.files.len() as u32,
            offset,
            length,
            checksum: checksum_hex(checksum),
            encoding: Some(TensorEncoding {
                layout,
                chunk_elems,
                stored_length,
                chunks: chunks
                    .iter()
                    .map(|&(codec, bytes, sum)| {
                        ChunkRecord(codec, bytes.len() as u64, checksum_hex(sum))
                    })
                    .collect(),
            }),
            split_dim: None,
        });
        Ok(())
    }

    /// Appends bytes of the current tensor.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), ManifestError> {
        if bytes.len() as u64 > self.pending {
            return Err(ManifestError::Invalid {
                path: self.dir.clone(),
                why: format!(
                    "tensor {:?}: more bytes than its shape holds",
                    self.tensors.last().map(|t| t.name.as_str()).unwrap_or("")
                ),
            });
        }
        self.pending -= bytes.len() as u64;
        self.tensor_hasher.update(bytes);
        self.emit(bytes)?;
        self.seal_if_complete();
        Ok(())
    }

    fn seal_if_complete(&mut self) {
        if self.pending == 0 {
            if let Some(t) = self.tensors.last_mut() {
                if t.checksum.is_empty() {
                    t.checksum = checksum_hex(self.tensor_hasher.digest());
                }
            }
        }
    }

    /// Closes the last file; returns the data files and tensor records.
    pub fn finish(mut self) -> Result<(Vec<DataFile>, Vec<TensorRecord>), ManifestError> {
        if self.pending != 0 {
            return Err(ManifestError::Invalid {
                path: self.dir.clone(),
                why: format!("{} bytes of the last tensor are missing", self.pending),
            });
        }
        self.close_file()?;
        Ok((self.files, self.tensors))
    }
}

/// Joins the `(files, tensors)` that [`DataWriter::finish`] returned for
/// each rank, in rank order, into one list of each: the tensors' `file`
/// indices are renumbered into the joined file list.
pub fn concat_ranks(
    parts: Vec<(Vec<DataFile>, Vec<TensorRecord>)>,
) -> (Vec<DataFile>, Vec<TensorRecord>) {
    let mut files = Vec::new();
    let mut tensors = Vec::new();
    for (f, t) in parts {
        let base = files.len() as u32;
        files.extend(f);
        tensors.extend(t.into_iter().map(|t| TensorRecord {
            file: t.file + base,
            ..t
        }));
    }
    (files, tensors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::chunk_checksum;

    #[test]
    fn aligns_and_checksums() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = DataWriter::new(dir.path(), 8192, 1 << 30);
        w.begin_tensor("a", DType::U8, &[5]).unwrap();
        w.write(&[1, 2, 3]).unwrap();
        w.write(&[4, 5]).unwrap();
        w.begin_tensor("b", DType::F32, &[3000]).unwrap();
        w.write(&vec![7u8; 12000]).unwrap();
        w.begin_tensor("c", DType::BF16, &[0]).unwrap();
        let (files, tensors) = w.finish().unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(tensors[1].offset, 4096);
        assert_eq!(files[0].size, align_up(4096 + 12000, 4096));
        let bytes = std::fs::read(dir.path().join(&files[0].name)).unwrap();
        assert_eq!(bytes.len() as u64, files[0].size);
        assert_eq!(&bytes[..6], &[1, 2, 3, 4, 5, 0]);
        assert_eq!(files[0].checksums.len(), 2);
        assert_eq!(
            files[0].checksums[1],
            checksum_hex(chunk_checksum(&bytes[8192..]))
        );
        assert_eq!(
            tensors[0].checksum,
            checksum_hex(chunk_checksum(&[1, 2, 3, 4, 5]))
        );
        assert_eq!(tensors[2].checksum, checksum_hex(chunk_checksum(&[])));
    }

    #[test]
    fn rank_writers_share_a_folder() {
        let dir = tempfile::tempdir().unwrap();
        let parts = (0..2u32)
            .map(|r| {
                let mut w = DataWriter::for_rank(dir.path(), 4096, 6000, r);
                for name in ["a", "b"] {
                    w.begin_tensor(name, DType::U8, &[4096]).unwrap();
                    w.write(&[r as u8 + 1; 4096]).unwrap();
                }
                w.finish().unwrap()
            })
            .collect();
        let (files, tensors) = concat_ranks(parts);
        let names: Vec<(&str, u32)> = files.iter().map(|f| (f.name.as_str(), f.rank)).collect();
        assert_eq!(
            names,
            [
                ("data-r0-00000.bin", 0),
                ("data-r0-00001.bin", 0),
                ("data-r1-00000.bin", 1),
                ("data-r1-00001.bin", 1)
            ]
        );
        let at: Vec<(&str, u32)> = tensors.iter().map(|t| (t.name.as_str(), t.file)).collect();
        assert_eq!(at, [("a", 0), ("b", 1), ("a", 2), ("b", 3)]);
        for t in &tensors {
            let bytes = std::fs::read(dir.path().join(&files[t.file as usize].name)).unwrap();
            assert_eq!(bytes[0], files[t.file as usize].rank as u8 + 1);
        }
    }

    #[test]
    fn splits_files_at_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = DataWriter::new(dir.path(), 4096, 10_000);
        for name in ["a", "b", "c"] {
            w.begin_tensor(name, DType::U8, &[4096]).unwrap();
            w.write(&[1; 4096]).unwrap();
        }
        let (files, tensors) = w.finish().unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(tensors[2].file, 1);
        assert_eq!(tensors[2].offset, 0);
    }
}
