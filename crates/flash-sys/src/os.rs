//! Operating-system services the load path needs beyond `std`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Alignment of [`AlignedBuf`]: O_DIRECT needs buffers, offsets and lengths
/// aligned to the logical block size, which is at most 4096 on the disks we meet.
pub const DIRECT_ALIGN: usize = 4096;

/// A zero-initialised, page-aligned buffer (so a valid O_DIRECT read
/// target), from an anonymous memory map.
///
/// Why a map and not the heap: the heap's aligned `alloc_zeroed` writes
/// every byte at allocation (touching every page before the load does), while
/// an anonymous map is zero-filled lazily by the kernel; and the map is asked
/// for transparent huge pages, so filling a large buffer takes one page fault
/// per 2 MiB instead of one per 4 KiB.
pub struct AlignedBuf {
    map: Option<memmap2::MmapMut>,
}

impl AlignedBuf {
    /// Maps `len` zeroed bytes (`len` may be 0). Fails instead of aborting
    /// when the memory cannot be had.
    pub fn new(len: usize) -> io::Result<Self> {
        if len == 0 {
            return Ok(AlignedBuf { map: None });
        }
        let map = memmap2::MmapMut::map_anon(len)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot map {len} bytes: {e}")))?;
        // A hint: without transparent huge pages the buffer still works.
        let _ = map.advise(memmap2::Advice::HugePage);
        Ok(AlignedBuf { map: Some(map) })
    }

    pub fn len(&self) -> usize {
        self.map.as_ref().map_or(0, |m| m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.map
            .as_ref()
            .map_or(DIRECT_ALIGN as *const u8, |m| m.as_ptr())
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.map
            .as_mut()
            .map_or(DIRECT_ALIGN as *mut u8, |m| m.as_mut_ptr())
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.map.as_deref_mut().unwrap_or(&mut [])
    }
}

/// A buffer that several threads fill at once, each through a range it
/// claimed: the destination of a parallel load.
///
/// `&mut [u8]` has one owner; a load needs many workers writing disjoint
/// ranges at once, in an order known only at run time. Claims are checked
/// against each other (a claim that overlaps a live claim is refused), so the
/// views handed out never alias and the API is safe.
pub struct SharedRegion<'a> {
    base: *mut u8,
    len: usize,
    /// Live claims: start -> end.
    claims: std::sync::Mutex<std::collections::BTreeMap<usize, usize>>,
    _buf: std::marker::PhantomData<&'a mut [u8]>,
}

// SAFETY: writes happen only through claims, which never overlap; the
// borrowed buffer outlives the region ('a).
unsafe impl Send for SharedRegion<'_> {}
// SAFETY: as above; the claim table is behind a mutex.
unsafe impl Sync for SharedRegion<'_> {}

/// A mutable view of one claimed range; the claim ends when it drops.
pub struct RegionSlice<'r, 'a> {
    region: &'r SharedRegion<'a>,
    offset: usize,
    slice: &'r mut [u8],
}

impl std::ops::Deref for RegionSlice<'_, '_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.slice
    }
}

impl std::ops::DerefMut for RegionSlice<'_, '_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.slice
    }
}

impl Drop for RegionSlice<'_, '_> {
    fn drop(&mut self) {
        let mut claims = self.region.claims.lock().unwrap_or_else(|e| e.into_inner());
        claims.remove(&self.offset);
    }
}

impl<'a> SharedRegion<'a> {
    /// Lends `buf` out for the duration of a load.
    pub fn new(buf: &'a mut [u8]) -> Self {
        SharedRegion {
            base: buf.as_mut_ptr(),
            len: buf.len(),
            claims: Default::default(),
            _buf: std::marker::PhantomData,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Claims `[offset, offset + len)` for writing. Refused when the range
    /// lies outside the region or overlaps a claim still alive.
    pub fn claim(&self, offset: usize, len: usize) -> io::Result<RegionSlice<'_, 'a>> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.len)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "range [{offset}, +{len}) outside a region of {} bytes",
                        self.len
                    ),
                )
            })?;
        let mut claims = self.claims.lock().unwrap_or_else(|e| e.into_inner());
        let before = claims
            .range(..=offset)
            .next_back()
            .map(|(_, &e)| e > offset);
        let after = claims.range(offset..end.max(offset + 1)).next().is_some();
        if (len > 0 && (before == Some(true) || after)) || claims.contains_key(&offset) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("range [{offset}, +{len}) overlaps a range being written"),
            ));
        }
        claims.insert(offset, end);
        drop(claims);
        // SAFETY: [offset, end) is inside the borrowed buffer (checked above)
        // and overlaps no other live claim (checked under the lock, and the
        // claim stays registered until this view drops), so this is the only
        // reference to these bytes. The buffer lives for 'a, beyond 'r.
        let slice = unsafe { std::slice::from_raw_parts_mut(self.base.add(offset), len) };
        Ok(RegionSlice {
            region: self,
            offset,
            slice,
        })
    }
}

/// Opens `path` for reading with O_DIRECT. Returns `Ok(None)` when the file
/// system refuses O_DIRECT (tmpfs, some overlay and network file systems), so
/// the caller falls back to buffered reads.
pub fn open_direct(path: &Path) -> io::Result<Option<File>> {
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Asks the kernel to drop the file's pages from the page cache
/// (`posix_fadvise(DONTNEED)`). Dirty pages are written first (`fdatasync`),
/// since DONTNEED leaves dirty pages in place.
pub fn evict_page_cache(file: &File) -> io::Result<()> {
    file.sync_data()?;
    // SAFETY: the fd is valid for the duration of the call; fadvise only
    // gives the kernel a hint and touches no memory of ours.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Tells the kernel the file will be read sequentially soon (`WILLNEED` is
/// not used: it would start a synchronous readahead of the whole file).
pub fn advise_sequential(file: &File) -> io::Result<()> {
    // SAFETY: as in evict_page_cache.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Asks the kernel to start reading `len` bytes at `offset` into the page
/// cache now (`POSIX_FADV_WILLNEED`): asynchronous readahead of a window a
/// reader will ask for next.
pub fn advise_willneed(file: &File, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: as in evict_page_cache.
    let rc = unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            offset as libc::off_t,
            len as libc::off_t,
            libc::POSIX_FADV_WILLNEED,
        )
    };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Fraction (0.0..=1.0) of the file's pages that are in the page cache, from
/// `mincore` over a read-only mapping. An empty file counts as fully resident.
pub fn page_cache_residency(file: &File) -> io::Result<f64> {
    let len = file.metadata()?.len() as usize;
    if len == 0 {
        return Ok(1.0);
    }
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    // Map in windows so a huge file does not need a huge residency vector at once.
    const WINDOW: usize = 1 << 30;
    let mut resident = 0usize;
    let mut pages_total = 0usize;
    let mut vec = vec![0u8; WINDOW / page];
    let mut off = 0usize;
    while off < len {
        let n = (len - off).min(WINDOW);
        // SAFETY: a fresh shared read-only mapping of a valid fd; offset is a
        // multiple of the window size (a multiple of the page size). The
        // mapping is never read through, only passed to mincore, then unmapped.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                n,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                off as libc::off_t,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let pages = n.div_ceil(page);
        // SAFETY: addr..addr+n is the mapping made above; vec holds at least
        // `pages` bytes as mincore requires.
        let rc = unsafe { libc::mincore(addr, n, vec.as_mut_ptr()) };
        let err = io::Error::last_os_error();
        // SAFETY: unmapping exactly the mapping made above.
        unsafe { libc::munmap(addr, n) };
        if rc != 0 {
            return Err(err);
        }
        resident += vec[..pages].iter().filter(|&&b| b & 1 == 1).count();
        pages_total += pages;
        off += n;
    }
    Ok(resident as f64 / pages_total as f64)
}

/// Whether this process may create an io_uring (containers and seccomp
/// profiles often forbid it).
pub fn io_uring_allowed() -> bool {
    #[repr(C)]
    struct Params([u32; 30]);
    let mut params = Params([0; 30]);
    // SAFETY: io_uring_setup(entries, params) reads and writes only the
    // 120-byte params struct we pass; on success we close the returned fd.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, &mut params as *mut Params) };
    if fd >= 0 {
        // SAFETY: fd was just returned to us and is closed once.
        unsafe { libc::close(fd as libc::c_int) };
        true
    } else {
        false
    }
}

/// A read-only memory map of a whole file: the way most loaders read
/// safetensors, kept here as the baseline `flash bench` compares against.
pub struct Mapping {
    map: Option<memmap2::Mmap>,
}

impl Mapping {
    pub fn new(file: &File) -> io::Result<Self> {
        if file.metadata()?.len() == 0 {
            return Ok(Mapping { map: None });
        }
        // SAFETY: the mapping is read-only and private to this process. The
        // one hazard of mmap, another process truncating the file while it is
        // mapped (SIGBUS), is accepted as every mmap-based loader accepts it;
        // flash maps only files of its own store or ones the user named.
        let map = unsafe { memmap2::Mmap::map(file)? };
        Ok(Mapping { map: Some(map) })
    }
}

impl std::ops::Deref for Mapping {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }
}

/// Bytes of physical memory, from sysconf.
pub fn physical_memory() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    (pages.max(0) as u64) * (size.max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    #[test]
    fn aligned_buf_is_aligned_and_zeroed() {
        let b = AlignedBuf::new(10_000).unwrap();
        assert_eq!(b.as_ptr() as usize % DIRECT_ALIGN, 0);
        assert!(b.iter().all(|&x| x == 0));
        assert!(AlignedBuf::new(0).unwrap().is_empty());
    }

    #[test]
    fn direct_read_or_fallback() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let mut f = File::create(&p).unwrap();
        f.write_all(&vec![7u8; 3 * 4096]).unwrap();
        drop(f);
        let file = match open_direct(&p).unwrap() {
            Some(f) => f,
            None => File::open(&p).unwrap(),
        };
        let mut buf = AlignedBuf::new(8192).unwrap();
        file.read_exact_at(&mut buf, 4096).unwrap();
        assert!(buf.iter().all(|&x| x == 7));
        let r = page_cache_residency(&file).unwrap();
        assert!((0.0..=1.0).contains(&r));
        evict_page_cache(&File::open(&p).unwrap()).unwrap();
    }

    #[test]
    fn shared_region_disjoint_writes() {
        let mut b = AlignedBuf::new(8).unwrap();
        let r = SharedRegion::new(&mut b);
        std::thread::scope(|s| {
            s.spawn(|| r.claim(0, 4).unwrap().fill(1));
            s.spawn(|| r.claim(4, 4).unwrap().fill(2));
        });
        let held = r.claim(2, 4).unwrap();
        assert!(r.claim(0, 3).is_err());
        assert!(r.claim(5, 3).is_err());
        assert!(r.claim(2, 1).is_err());
        assert!(r.claim(6, 3).is_err(), "out of bounds");
        assert!(r.claim(0, 2).is_ok());
        drop(held);
        assert!(r.claim(0, 8).is_ok());
        drop(r);
        assert_eq!(&b[..], &[1, 1, 1, 1, 2, 2, 2, 2]);
    }
}
