//! Memory shared between the daemon and its clients, and the few process
//! services the daemon needs (an exclusive lock file, `setsid`, signals).
//!
//! - [`HostPool`]: the daemon's memory tier. One region of host memory made
//!   at start (`flash start --mem-pool`): a file in shared memory (`/dev/shm`)
//!   mapped once, so that a client of the same user can map a model's image
//!   read-only by path (share mode on machines without a GPU), or an
//!   anonymous map when no such file can be made. On GPU machines the whole
//!   region is pinned once with `cuMemHostRegister` ([`HostPool::pin`]), so
//!   that no load ever pins. Model images are page-aligned ranges of it
//!   ([`PoolSlice`]), handed out by a best-fit allocator whose ranges never
//!   overlap.
//! - [`ShmView`]: a client's read-only map of a range of such a file.
//! - [`ShmFile`]: a file in shared memory that a client creates and maps
//!   read-write, for the daemon to fill (copy mode on machines without a GPU).
//!
//! The hazard of every shared map is another process truncating the file
//! while it is mapped (SIGBUS on access). The files here are created with
//! mode 0600 in folders of the user, and only flash truncates them (at
//! creation); a process of the same user that truncates them on purpose is
//! outside what any mapping can defend against, as for [`crate::os::Mapping`].

use crate::cuda::{CudaError, Gpu};
use std::collections::BTreeMap;
use std::ffi::c_void;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

/// Alignment (and length granularity) of pool ranges: a page, so that a
/// range can be mapped on its own by a client and read with O_DIRECT.
pub const POOL_ALIGN: usize = 4096;

fn round_up(n: usize, to: usize) -> Option<usize> {
    n.checked_add(to - 1).map(|v| v / to * to)
}

/// The folder for shared-memory files: `/dev/shm` when it exists (memory, not
/// disk), else the temporary folder.
pub fn default_shm_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// Bytes available to an unprivileged user on the file system of `path`.
pub fn available_bytes(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path with a NUL byte"))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated string and `st` a valid out
    // pointer for one statvfs.
    let r = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: initialised by the successful call above.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)] // u64 on 64-bit Linux, narrower elsewhere
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

fn create_0600(path: &Path, len: u64) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.set_len(len)?;
    Ok(file)
}

/// Reserves the pages of `[offset, offset + len)` of a file on a memory file
/// system, so that a write through a map cannot hit SIGBUS for lack of room:
/// returns `ErrorKind::OutOfMemory`-like `StorageFull` instead.
fn reserve(file: &File, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on a valid descriptor; no memory is passed.
    let r = unsafe { libc::posix_fallocate(file.as_raw_fd(), offset as i64, len as i64) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// Returns the pages of a range of a file to the system (the range reads as
/// zeros afterwards; the file keeps its size).
fn punch(file: &File, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on a valid descriptor; no memory is passed.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as i64,
            len as i64,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The pool
// ---------------------------------------------------------------------------

/// The daemon's host memory: one mapped region, carved into page-aligned
/// model images. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct HostPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    /// The shared file (`None` for an anonymous region).
    file: Option<(File, PathBuf)>,
    /// Keeps the map alive; `ptr` points into it.
    _map: memmap2::MmapRaw,
    ptr: NonNull<u8>,
    len: usize,
    /// Free ranges, offset → length; coalesced, never overlapping.
    free: Mutex<BTreeMap<usize, usize>>,
    pinned: Mutex<Option<Gpu>>,
}

// SAFETY: the raw pointer is the base of a map owned by the pool; access to
// its bytes goes through `PoolSlice`s, which own disjoint ranges (the
// allocator's invariant), and the free list is behind a mutex.
unsafe impl Send for PoolInner {}
// SAFETY: as above.
unsafe impl Sync for PoolInner {}

impl std::fmt::Debug for HostPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostPool")
            .field("path", &self.path())
            .field("len", &self.inner.len)
            .field("free", &self.free_bytes())
            .field("pinned", &self.is_pinned())
            .finish()
    }
}

impl HostPool {
    /// A pool of `len` bytes backed by a new file at `path` (mode 0600, must
    /// not exist), mapped shared. The file is sparse: pages are reserved when
    /// a range is handed out and returned when it is freed (unless pinned).
    /// The file is removed when the pool is dropped.
    pub fn create_shared(path: &Path, len: usize) -> io::Result<HostPool> {
        let len = round_up(len.max(POOL_ALIGN), POOL_ALIGN)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "pool size overflows"))?;
        let file = create_0600(path, len as u64)?;
        // Held while the pool lives (the file stays open): whoever finds the
        // file can tell it is in use, across pid namespaces too.
        let _ = try_lock_exclusive(&file);
        let map = match memmap2::MmapOptions::new().len(len).map_raw(&file) {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(e);
            }
        };
        Ok(Self::from_map(map, len, Some((file, path.to_path_buf()))))
    }

    /// A pool of `len` bytes of anonymous memory (not shareable by path).
    pub fn anonymous(len: usize) -> io::Result<HostPool> {
        let len = round_up(len.max(POOL_ALIGN), POOL_ALIGN)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "pool size overflows"))?;
        let map = memmap2::MmapOptions::new().len(len).map_anon()?;
        let map = memmap2::MmapRaw::from(map);
        Ok(Self::from_map(map, len, None))
    }

    fn from_map(map: memmap2::MmapRaw, len: usize, file: Option<(File, PathBuf)>) -> HostPool {
        let ptr = NonNull::new(map.as_mut_ptr()).expect("a map is never at address 0");
        let mut free = BTreeMap::new();
        free.insert(0, len);
        HostPool {
            inner: Arc::new(PoolInner {
                file,
                _map: map,
                ptr,
                len,
                free: Mutex::new(free),
                pinned: Mutex::new(None),
            }),
        }
    }

    /// The shared file, when the pool has one.
    pub fn path(&self) -> Option<&Path> {
        self.inner.file.as_ref().map(|(_, p)| p.as_path())
    }

    pub fn len(&self) -> usize {
        self.inner.len
    }

    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }

    /// Bytes not handed out.
    pub fn free_bytes(&self) -> usize {
        self.inner.lock_free().values().sum()
    }

    /// The largest range that can be handed out now.
    pub fn largest_free(&self) -> usize {
        self.inner.lock_free().values().copied().max().unwrap_or(0)
    }

    pub fn is_pinned(&self) -> bool {
        self.inner
            .pinned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Pins the whole pool for `gpu`'s driver (portable: every context can
    /// copy from it at full PCIe speed). Reserves every page first (a shared
    /// file's pages, so that the file system's room is checked once, here),
    /// then `cuMemHostRegister`: seconds for tens of GiB, done once at start.
    pub fn pin(&self, gpu: &Gpu) -> Result<(), CudaError> {
        let mut pinned = self.inner.pinned.lock().unwrap_or_else(|p| p.into_inner());
        if pinned.is_some() {
            return Ok(());
        }
        if let Some((file, path)) = &self.inner.file {
            reserve(file, 0, self.inner.len as u64).map_err(|e| {
                CudaError::Usage(format!(
                    "reserving {} bytes of shared memory in {}: {e}",
                    self.inner.len,
                    path.display()
                ))
            })?;
        }
        gpu.bind_to_thread()?;
        let (ptr, len) = (self.inner.ptr.as_ptr() as *mut c_void, self.inner.len);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // SAFETY: registers a live map owned by this pool; it is
            // unregistered in PoolInner's Drop, before the map is unmapped.
            unsafe {
                cudarc::driver::sys::cuMemHostRegister_v2(
                    ptr,
                    len,
                    cudarc::driver::sys::CU_MEMHOSTREGISTER_PORTABLE,
                )
            }
        }))
        .map_err(|_| CudaError::Usage("the driver lacks cuMemHostRegister".into()))?;
        r.result()
            .map_err(|e| driver_error(e, "cuMemHostRegister", len))?;
        *pinned = Some(gpu.clone());
        Ok(())
    }

    /// A range of `bytes` bytes (rounded up to [`POOL_ALIGN`]), best fit;
    /// `None` when no free range is large enough (fragmentation or
    /// exhaustion). Its pages are reserved first on a shared, unpinned pool:
    /// `Err` when the file system has no room for them.
    pub fn alloc(&self, bytes: usize) -> io::Result<Option<PoolSlice>> {
        let want = round_up(bytes.max(1), POOL_ALIGN)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "size overflows"))?;
        let offset = {
            let mut free = self.inner.lock_free();
            let best = free
                .iter()
                .filter(|(_, &l)| l >= want)
                .min_by_key(|(_, &l)| l)
                .map(|(&o, &l)| (o, l));
            let Some((o, l)) = best else {
                return Ok(None);
            };
            free.remove(&o);
            if l > want {
                free.insert(o + want, l - want);
            }
            o
        };
        let slice = PoolSlice {
            pool: self.inner.clone(),
            offset,
            len: bytes,
            span: want,
        };
        if let (Some((file, _)), false) = (&self.inner.file, self.is_pinned()) {
            // On failure the slice's drop returns the range.
            reserve(file, offset as u64, want as u64)?;
        }
        Ok(Some(slice))
    }
}

fn driver_error(e: cudarc::driver::result::DriverError, what: &str, len: usize) -> CudaError {
    let code = e.0 as u32;
    CudaError::Driver {
        what: format!("{what} of {len} bytes"),
        name: e
            .error_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|_| format!("CUDA error {code}")),
        message: e
            .error_string()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        code,
    }
}

impl PoolInner {
    fn lock_free(&self) -> std::sync::MutexGuard<'_, BTreeMap<usize, usize>> {
        self.free.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn give_back(&self, offset: usize, span: usize) {
        let pinned = self
            .pinned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some();
        if !pinned {
            if let Some((file, _)) = &self.file {
                if let Err(e) = punch(file, offset as u64, span as u64) {
                    tracing::debug!("returning shared pages: {e}");
                }
            }
        }
        let mut free = self.lock_free();
        let (mut o, mut l) = (offset, span);
        if let Some((&po, &pl)) = free.range(..o).next_back() {
            if po + pl == o {
                free.remove(&po);
                o = po;
                l += pl;
            }
        }
        if let Some(&nl) = free.get(&(offset + span)) {
            free.remove(&(offset + span));
            l += nl;
        }
        free.insert(o, l);
    }
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        if let Some(gpu) = self
            .pinned
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let ptr = self.ptr.as_ptr() as *mut c_void;
            let ok = gpu.bind_to_thread().is_ok()
                && std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    // SAFETY: `ptr` was registered by `pin` and is unregistered
                    // once, before the map goes.
                    unsafe { cudarc::driver::sys::cuMemHostUnregister(ptr) }
                }))
                .is_ok_and(|r| r.result().is_ok());
            if !ok {
                tracing::warn!("cuMemHostUnregister of the host pool failed");
            }
        }
        if let Some((_, path)) = &self.file {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A model image in a [`HostPool`]: `len` bytes at a page-aligned `offset`.
/// Owns its range; gives it back (and its pages, on a shared unpinned pool)
/// when dropped. Derefs to its bytes.
pub struct PoolSlice {
    pool: Arc<PoolInner>,
    offset: usize,
    len: usize,
    /// `len` rounded up to the alignment: the range owned.
    span: usize,
}

impl PoolSlice {
    /// Offset in the pool (and in its shared file).
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// The pool's shared file, if it has one.
    pub fn path(&self) -> Option<&Path> {
        self.pool.file.as_ref().map(|(_, p)| p.as_path())
    }

    /// Whether the pool is pinned (uploads run at PCIe speed).
    pub fn is_pinned(&self) -> bool {
        self.pool
            .pinned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }
}

impl std::fmt::Debug for PoolSlice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PoolSlice({} bytes at {})", self.len, self.offset)
    }
}

// SAFETY: a PoolSlice is the only owner of its range (the allocator never
// hands out overlapping ranges), so it is shared or sent like a `Vec<u8>`.
unsafe impl Send for PoolSlice {}
// SAFETY: as above; `&PoolSlice` gives only shared access to the bytes.
unsafe impl Sync for PoolSlice {}

impl std::ops::Deref for PoolSlice {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: [offset, offset + len) lies inside the live map (the
        // allocator only hands out ranges of it) and no other slice covers
        // it; `&self` gives shared access only.
        unsafe { std::slice::from_raw_parts(self.pool.ptr.as_ptr().add(self.offset), self.len) }
    }
}

impl std::ops::DerefMut for PoolSlice {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes this access exclusive
        // within the process (clients only ever map the file read-only).
        unsafe { std::slice::from_raw_parts_mut(self.pool.ptr.as_ptr().add(self.offset), self.len) }
    }
}

impl Drop for PoolSlice {
    fn drop(&mut self) {
        self.pool.give_back(self.offset, self.span);
    }
}

// ---------------------------------------------------------------------------
// Client side
// ---------------------------------------------------------------------------

/// A read-only map of `[offset, offset + len)` of a shared file: how a
/// client sees a memory-tier copy in share mode. Stays valid after the
/// daemon evicts the copy (the pages live until unmapped), but then reads
/// zeros or another model's bytes: hold the lease while using it.
pub struct ShmView {
    map: Option<memmap2::Mmap>,
}

impl ShmView {
    pub fn open(path: &Path, offset: u64, len: usize) -> io::Result<ShmView> {
        let file = File::open(path)?;
        let size = file.metadata()?.len();
        if offset.checked_add(len as u64).is_none_or(|end| end > size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: range [{offset}, +{len}) outside the file of {size} bytes",
                    path.display()
                ),
            ));
        }
        if len == 0 {
            return Ok(ShmView { map: None });
        }
        // SAFETY: a read-only shared map of a file of the daemon, checked to
        // cover the range; see the module's note on truncation.
        let map = unsafe {
            memmap2::MmapOptions::new()
                .offset(offset)
                .len(len)
                .map(&file)?
        };
        Ok(ShmView { map: Some(map) })
    }
}

impl std::ops::Deref for ShmView {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }
}

/// A new file of `len` bytes in shared memory (mode 0600), mapped
/// read-write: a client's buffer that the daemon fills in copy mode (it
/// writes the file; the client reads the map). Removed when dropped.
pub struct ShmFile {
    path: PathBuf,
    map: Option<memmap2::MmapMut>,
    /// Open, with an exclusive `flock`, while the buffer lives: in use.
    file: File,
}

impl ShmFile {
    /// Creates `path` (must not exist) and reserves its pages.
    pub fn create(path: &Path, len: usize) -> io::Result<ShmFile> {
        let file = create_0600(path, len as u64)?;
        let _ = try_lock_exclusive(&file);
        let mut out = ShmFile {
            path: path.to_path_buf(),
            map: None,
            file,
        };
        if len == 0 {
            return Ok(out);
        }
        // On an error, `out` removes the file.
        reserve(&out.file, 0, len as u64)?;
        // SAFETY: a shared map of a file this process just created (0600);
        // see the module's note on truncation.
        out.map = Some(unsafe { memmap2::MmapOptions::new().len(len).map_mut(&out.file)? });
        Ok(out)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl std::ops::Deref for ShmFile {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }
}

impl std::ops::DerefMut for ShmFile {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.map.as_deref_mut().unwrap_or(&mut [])
    }
}

impl Drop for ShmFile {
    fn drop(&mut self) {
        drop(self.map.take());
        let _ = std::fs::remove_file(&self.path);
    }
}

// ---------------------------------------------------------------------------
// Process services
// ---------------------------------------------------------------------------

/// Takes an exclusive `flock` on `file` without waiting: `Ok(false)` when
/// another process holds it. The lock lasts until the file is closed (or the
/// process dies, which is what makes it safe against stale pid files).
pub fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    // SAFETY: plain syscall on a valid descriptor.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Starts a new session (detaches from the controlling terminal). Fails when
/// the process already leads a process group.
pub fn setsid() -> io::Result<()> {
    // SAFETY: no arguments, no memory.
    if unsafe { libc::setsid() } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether a process with this pid exists (and is not a zombie we could see).
pub fn pid_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name in parentheses: Z is a zombie.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, r)| r.split_whitespace().next());
    state != Some("Z")
}

/// Sends `SIGTERM` to `pid`.
pub fn terminate(pid: u32) -> io::Result<()> {
    let pid = i32::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: plain syscall; sends a signal, touches no memory.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_hands_out_disjoint_ranges_and_coalesces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool");
        let pool = HostPool::create_shared(&path, 16 * POOL_ALIGN).unwrap();
        assert_eq!(pool.len(), 16 * POOL_ALIGN);
        let mut a = pool.alloc(3 * POOL_ALIGN).unwrap().unwrap();
        let mut b = pool.alloc(100).unwrap().unwrap();
        assert_eq!(a.offset() % POOL_ALIGN, 0);
        assert_eq!(b.offset() % POOL_ALIGN, 0);
        assert_eq!(b.len(), 100);
        assert!(a.offset() + 3 * POOL_ALIGN <= b.offset() || b.offset() + POOL_ALIGN <= a.offset());
        a.fill(7);
        b.fill(9);
        assert_eq!(pool.free_bytes(), 12 * POOL_ALIGN);
        assert!(pool.alloc(13 * POOL_ALIGN).unwrap().is_none());
        // A client sees the bytes through the file.
        let view = ShmView::open(&path, b.offset() as u64, 100).unwrap();
        assert!(view.iter().all(|&x| x == 9));
        assert!(ShmView::open(&path, 15 * POOL_ALIGN as u64, 2 * POOL_ALIGN).is_err());
        drop(a);
        drop(b);
        assert_eq!(pool.largest_free(), 16 * POOL_ALIGN, "free ranges coalesce");
        let c = pool.alloc(16 * POOL_ALIGN).unwrap().unwrap();
        assert!(c.iter().all(|&x| x == 0), "freed pages were returned");
        drop(c);
        drop(pool);
        assert!(!path.exists(), "the file goes with the pool");
    }

    #[test]
    fn anonymous_pool_and_client_file() {
        let pool = HostPool::anonymous(8192).unwrap();
        assert!(pool.path().is_none());
        let s = pool.alloc(8192).unwrap().unwrap();
        assert!(s.path().is_none());
        assert!(pool.alloc(1).unwrap().is_none());
        drop(s);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("client");
        let mut f = ShmFile::create(&p, 5000).unwrap();
        f[4999] = 3;
        std::os::unix::fs::FileExt::write_all_at(
            &File::options().write(true).open(&p).unwrap(),
            &[1, 2],
            10,
        )
        .unwrap();
        assert_eq!(&f[10..12], &[1, 2], "writes to the file show in the map");
        assert!(ShmFile::create(&p, 10).is_err(), "never replaces a file");
        drop(f);
        assert!(!p.exists());
    }

    #[test]
    fn lock_is_exclusive_between_descriptors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lock");
        let a = File::create(&p).unwrap();
        let b = File::open(&p).unwrap();
        assert!(try_lock_exclusive(&a).unwrap());
        assert!(!try_lock_exclusive(&b).unwrap());
        drop(a);
        assert!(try_lock_exclusive(&b).unwrap());
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(u32::MAX - 1));
    }
}
