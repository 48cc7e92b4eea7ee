//! Reads through io_uring: one thread keeps many reads of one file in flight
//! without a thread per read, into buffers registered with the ring once
//! (`IORING_REGISTER_BUFFERS`, so the kernel does not pin and unpin the
//! pages of every read).
//!
//! Used by the disk probe (`flash doctor`, `flash bench-disk`) as one of the
//! read patterns it compares; the safe interface owns its buffers, so no read
//! can outlive the memory it writes.

use crate::os::AlignedBuf;
use io_uring::{opcode, types, IoUring};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// A ring and `depth` aligned buffers of `buf_bytes` each.
pub struct UringReader {
    ring: IoUring,
    bufs: Vec<AlignedBuf>,
    registered: bool,
    /// Reads submitted and not yet reaped (non-zero only after an error of
    /// the ring itself; `Drop` waits for them).
    in_flight: usize,
}

/// One read asked of [`UringReader::read_all`]: `len` bytes at `offset`
/// (both aligned for O_DIRECT when the file is opened so).
#[derive(Debug, Clone, Copy)]
pub struct ReadRange {
    pub offset: u64,
    pub len: usize,
}

impl UringReader {
    /// A ring with `depth` reads in flight at most, each into its own buffer
    /// of `buf_bytes`; the buffers are registered with the ring when
    /// `register` (falling back to plain reads if the kernel refuses).
    pub fn new(depth: usize, buf_bytes: usize, register: bool) -> io::Result<Self> {
        let depth = depth.clamp(1, 4096);
        let ring = IoUring::new(depth.next_power_of_two() as u32)?;
        let bufs = (0..depth)
            .map(|_| AlignedBuf::new(buf_bytes.max(1)))
            .collect::<io::Result<Vec<_>>>()?;
        let mut reader = UringReader {
            ring,
            bufs,
            registered: false,
            in_flight: 0,
        };
        if register {
            let iovecs: Vec<libc::iovec> = reader
                .bufs
                .iter_mut()
                .map(|b| libc::iovec {
                    iov_base: b.as_mut_ptr().cast(),
                    iov_len: b.len(),
                })
                .collect();
            // SAFETY: the iovecs describe buffers owned by `reader`, which
            // live as long as the ring (fields drop in declaration order:
            // the ring, which unregisters them, before the buffers) and are
            // never moved (AlignedBuf is a memory map; moving the struct does
            // not move the mapping).
            reader.registered =
                unsafe { reader.ring.submitter().register_buffers(&iovecs) }.is_ok();
        }
        Ok(reader)
    }

    /// Whether the buffers are registered with the ring.
    pub fn registered(&self) -> bool {
        self.registered
    }

    /// Reads every range of `file`, keeping up to `depth` in flight, and
    /// hands each completed read to `done(index into ranges, bytes)` (in
    /// completion order). A short read (the end of the file) hands over
    /// what was read; an error stops the reads and is returned once every
    /// read in flight has completed.
    pub fn read_all(
        &mut self,
        file: &File,
        ranges: &[ReadRange],
        mut done: impl FnMut(usize, &[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let fd = types::Fd(file.as_raw_fd());
        let depth = self.bufs.len();
        // Which range each buffer holds while in flight.
        let mut holding: Vec<Option<usize>> = vec![None; depth];
        let mut free: Vec<usize> = (0..depth).rev().collect();
        let mut next = 0usize;
        let in_flight = &mut self.in_flight;
        let mut first_error: Option<io::Error> = None;
        loop {
            while first_error.is_none() && next < ranges.len() {
                let Some(b) = free.pop() else { break };
                let r = ranges[next];
                if r.len > self.bufs[b].len() {
                    free.push(b);
                    first_error = Some(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "read of {} bytes exceeds the {}-byte ring buffer",
                            r.len,
                            self.bufs[b].len()
                        ),
                    ));
                    break;
                }
                let ptr = self.bufs[b].as_mut_ptr();
                let entry = if self.registered {
                    opcode::ReadFixed::new(fd, ptr, r.len as u32, b as u16)
                        .offset(r.offset)
                        .build()
                } else {
                    opcode::Read::new(fd, ptr, r.len as u32)
                        .offset(r.offset)
                        .build()
                }
                .user_data(b as u64);
                // SAFETY: the entry reads into buffer `b`, which `self` owns
                // and which is not handed out again (it left `free`) until
                // its completion has been reaped below; `file` outlives this
                // call, which waits for every read in flight before returning.
                let pushed = unsafe { self.ring.submission().push(&entry) };
                if pushed.is_err() {
                    free.push(b);
                    break; // queue full: reap first
                }
                holding[b] = Some(next);
                next += 1;
                *in_flight += 1;
            }
            if *in_flight == 0 {
                break;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The ring itself failed: reads may still be in flight into
                // buffers `self` owns and keeps (they are freed only with
                // the ring, after the kernel has let go of them).
                Err(e) => return Err(e),
            }
            let completed: Vec<(usize, i32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data() as usize, c.result()))
                .collect();
            for (b, res) in completed {
                *in_flight -= 1;
                let Some(i) = holding.get_mut(b).and_then(Option::take) else {
                    continue;
                };
                free.push(b);
                if first_error.is_some() {
                    continue;
                }
                if res < 0 {
                    first_error = Some(io::Error::from_raw_os_error(-res));
                    continue;
                }
                if let Err(e) = done(i, &self.bufs[b][..res as usize]) {
                    first_error = Some(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for UringReader {
    fn drop(&mut self) {
        // Reads left in flight by a failed ring write into our buffers:
        // wait for them; if the ring cannot tell, never free the buffers.
        while self.in_flight > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => self.in_flight -= self.ring.completion().count().min(self.in_flight),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    std::mem::forget(std::mem::take(&mut self.bufs));
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_every_range_once() {
        if !crate::os::io_uring_allowed() {
            eprintln!("io_uring is not allowed here; nothing to test");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&data)
            .unwrap();
        let file = File::open(&path).unwrap();
        for register in [false, true] {
            let mut r = UringReader::new(3, 65536, register).unwrap();
            let ranges: Vec<ReadRange> = (0..data.len() as u64)
                .step_by(65536)
                .map(|offset| ReadRange { offset, len: 65536 })
                .collect();
            let mut got = vec![0u8; data.len()];
            let mut seen = vec![0; ranges.len()];
            r.read_all(&file, &ranges, |i, bytes| {
                seen[i] += 1;
                let at = ranges[i].offset as usize;
                got[at..at + bytes.len()].copy_from_slice(bytes);
                Ok(())
            })
            .unwrap();
            assert!(seen.iter().all(|&n| n == 1), "{seen:?}");
            assert_eq!(got, data);
        }
        // A range larger than a buffer is an error, not an overrun.
        let mut r = UringReader::new(2, 4096, false).unwrap();
        let err = r
            .read_all(
                &file,
                &[ReadRange {
                    offset: 0,
                    len: 8192,
                }],
                |_, _| Ok(()),
            )
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
