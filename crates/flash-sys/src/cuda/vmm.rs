//! Device memory through the CUDA virtual memory management (VMM) API,
//! shareable with another process as POSIX file descriptors.
//!
//! The exporter creates physical memory (`cuMemCreate`, one handle or several
//! chunks), reserves one virtual range (`cuMemAddressReserve`), maps the
//! chunks back to back into it (`cuMemMap`) and enables read/write access
//! (`cuMemSetAccess`); `cuMemExportToShareableHandle` turns each physical
//! handle into a file descriptor. The importer does
//! `cuMemImportFromShareableHandle` per descriptor and the same reserve, map
//! and access steps, timing each ([`VmmTimes`]).
//!
//! A [`VmmMemory`] owns its handles, its range and its mappings; its drop
//! waits for the GPU, then unmaps, releases the handles and frees the range,
//! in that order. It exists beside [`super::DeviceMemory`] (the legacy
//! `cuMemAlloc` + `cuIpcGetMemHandle` path) to measure which way of sharing a
//! large allocation between processes is faster (`flash bench-ipc`).
//!
//! The VMM entry points are not in the probe's list: [`Gpu::vmm_supported`]
//! checks that they exist (cudarc panics on a missing symbol) and that the GPU
//! supports VMM and POSIX descriptors before any of them is called.

use std::ffi::{c_int, c_void};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use cudarc::driver::sys;

use super::{download_sync, has_symbol, upload_sync, CudaError, During, Gpu};

/// Every VMM entry point used here, checked by [`Gpu::vmm_supported`].
const VMM_SYMBOLS: &[&str] = &[
    "cuMemCreate",
    "cuMemRelease",
    "cuMemAddressReserve",
    "cuMemAddressFree",
    "cuMemMap",
    "cuMemUnmap",
    "cuMemSetAccess",
    "cuMemGetAllocationGranularity",
    "cuMemExportToShareableHandle",
    "cuMemImportFromShareableHandle",
];

/// Which granularity of `cuMemGetAllocationGranularity` sizes and aligns
/// the allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    Minimum,
    Recommended,
}

impl Granularity {
    fn flag(self) -> sys::CUmemAllocationGranularity_flags {
        match self {
            Granularity::Minimum => {
                sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM
            }
            Granularity::Recommended => {
                sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_RECOMMENDED
            }
        }
    }
}

/// How [`Gpu::vmm_alloc_exportable_with`] lays out the physical memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmmOptions {
    pub granularity: Granularity,
    /// Bytes per physical handle (rounded up to the granularity); `None`:
    /// one handle for the whole length.
    pub chunk_bytes: Option<usize>,
}

impl Default for VmmOptions {
    fn default() -> Self {
        VmmOptions {
            granularity: Granularity::Recommended,
            chunk_bytes: None,
        }
    }
}

/// Wall time of each step that made a [`VmmMemory`] (all handles together
/// per step).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct VmmTimes {
    /// `cuMemCreate` (exporter) or `cuMemImportFromShareableHandle` (importer).
    pub handles: Duration,
    /// `cuMemAddressReserve`.
    pub reserve: Duration,
    /// `cuMemMap` of every chunk.
    pub map: Duration,
    /// `cuMemSetAccess` over the whole range.
    pub set_access: Duration,
}

impl VmmTimes {
    pub fn total(&self) -> Duration {
        self.handles + self.reserve + self.map + self.set_access
    }
}

#[derive(Debug)]
struct Chunk {
    handle: sys::CUmemGenericAllocationHandle,
    offset: usize,
    size: usize,
    mapped: bool,
}

/// Device memory made of one or more physical VMM handles mapped back to back
/// into one reserved virtual range. `Send + Sync` (only integers inside).
#[derive(Debug)]
pub struct VmmMemory {
    gpu: Gpu,
    /// Base of the reserved range; 0 until reserved.
    base: sys::CUdeviceptr,
    /// Bytes reserved (the sum of the chunk sizes).
    reserved: usize,
    /// Bytes asked for (≤ reserved).
    len: usize,
    chunks: Vec<Chunk>,
    times: VmmTimes,
}

fn pinned_device_prop(gpu: &Gpu) -> sys::CUmemAllocationProp {
    sys::CUmemAllocationProp {
        type_: sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED,
        requestedHandleTypes:
            sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
        location: device_location(gpu),
        win32HandleMetaData: std::ptr::null_mut(),
        allocFlags: sys::CUmemAllocationProp_st__bindgen_ty_1 {
            compressionType: 0,
            gpuDirectRDMACapable: 0,
            usage: 0,
            reserved: [0; 4],
        },
    }
}

fn device_location(gpu: &Gpu) -> sys::CUmemLocation {
    sys::CUmemLocation {
        type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
        id: gpu.ctx.cu_device(),
    }
}

fn round_up(n: usize, to: usize) -> Option<usize> {
    if to == 0 {
        return Some(n);
    }
    n.checked_add(to - 1).map(|x| x / to * to)
}

/// Sizes of the physical chunks for `len` bytes: each `chunk` bytes (rounded
/// up to `gran`), the last one smaller, every size a multiple of `gran`.
fn chunk_sizes(len: usize, gran: usize, chunk: Option<usize>) -> Option<Vec<usize>> {
    let total = round_up(len.max(1), gran)?;
    let per = match chunk {
        Some(c) if c > 0 => round_up(c, gran)?.min(total),
        _ => total,
    };
    let mut out = Vec::with_capacity(total.div_ceil(per));
    let mut left = total;
    while left > 0 {
        let n = per.min(left);
        out.push(n);
        left -= n;
    }
    Some(out)
}

/// Clears (or sets) `FD_CLOEXEC` on `fd`, so a child process started later
/// inherits it (or not).
pub fn set_fd_inheritable(fd: BorrowedFd<'_>, inheritable: bool) -> std::io::Result<()> {
    let raw = fd.as_raw_fd();
    // SAFETY: fcntl on a descriptor borrowed (open) for the call; F_GETFD
    // reads its flags and touches no memory.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFD) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let new = if inheritable {
        flags & !libc::FD_CLOEXEC
    } else {
        flags | libc::FD_CLOEXEC
    };
    // SAFETY: as above; F_SETFD only changes the descriptor's flags.
    if unsafe { libc::fcntl(raw, libc::F_SETFD, new) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Descriptor numbers already taken by [`take_inherited_fd`].
static TAKEN_FDS: std::sync::Mutex<Vec<RawFd>> = std::sync::Mutex::new(Vec::new());

/// Takes ownership of descriptor `raw`, which the parent process left open
/// for this one (a child started with it inheritable, its number passed on
/// the command line). Refuses standard input/output/error, a number that is
/// not an open descriptor, and a number taken before in this process; the
/// caller must not hand a descriptor this process opened itself.
pub fn take_inherited_fd(raw: RawFd) -> std::io::Result<OwnedFd> {
    if raw <= 2 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("descriptor {raw} is not an inherited one"),
        ));
    }
    let mut taken = TAKEN_FDS.lock().unwrap_or_else(|p| p.into_inner());
    if taken.contains(&raw) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("descriptor {raw} was taken already"),
        ));
    }
    // SAFETY: F_GETFD only checks that the number is an open descriptor.
    if unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    taken.push(raw);
    // SAFETY: the descriptor is open (checked) and was inherited from the
    // parent, so nothing else in this process owns it (the contract above);
    // the list above keeps it from being taken twice.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

impl Gpu {
    /// Whether this GPU and driver support VMM allocations shareable as POSIX
    /// file descriptors; `Err` says what is missing.
    pub fn vmm_supported(&self) -> Result<(), CudaError> {
        static MISSING: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
        let missing = MISSING.get_or_init(|| {
            VMM_SYMBOLS
                .iter()
                .copied()
                .filter(|s| !has_symbol(s))
                .collect()
        });
        if !missing.is_empty() {
            return Err(CudaError::Usage(format!(
                "the CUDA driver lacks the VMM entry points {}",
                missing.join(", ")
            )));
        }
        let vmm = self
            .ctx
            .attribute(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_VIRTUAL_ADDRESS_MANAGEMENT_SUPPORTED,
            )
            .during("reading the VMM support attribute")?;
        if vmm == 0 {
            return Err(CudaError::Usage(format!(
                "GPU {} does not support virtual memory management",
                self.ordinal()
            )));
        }
        let fd = self
            .ctx
            .attribute(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED,
            )
            .during("reading the POSIX handle support attribute")?;
        if fd == 0 {
            return Err(CudaError::Usage(format!(
                "GPU {} cannot share VMM memory as POSIX file descriptors",
                self.ordinal()
            )));
        }
        Ok(())
    }

    /// The allocation granularity of pinned device memory on this GPU.
    pub fn vmm_granularity(&self, g: Granularity) -> Result<usize, CudaError> {
        self.vmm_supported()?;
        self.bind_to_thread()?;
        let prop = pinned_device_prop(self);
        let mut gran = 0usize;
        // SAFETY: writes one size_t through a valid pointer; prop is a fully
        // initialised struct borrowed for the call.
        unsafe { sys::cuMemGetAllocationGranularity(&mut gran, &prop, g.flag()) }
            .result()
            .during("cuMemGetAllocationGranularity")?;
        if gran == 0 || !gran.is_power_of_two() {
            return Err(CudaError::Usage(format!(
                "the driver reports an allocation granularity of {gran} bytes"
            )));
        }
        Ok(gran)
    }

    /// [`Gpu::vmm_alloc_exportable_with`] with one handle and the recommended
    /// granularity.
    pub fn vmm_alloc_exportable(&self, len: usize) -> Result<VmmMemory, CudaError> {
        self.vmm_alloc_exportable_with(len, VmmOptions::default())
    }

    /// Allocates at least `len` bytes of device memory with `cuMemCreate`
    /// (exportable as POSIX file descriptors), mapped read/write into one
    /// range of this context. The contents are undefined until written.
    pub fn vmm_alloc_exportable_with(
        &self,
        len: usize,
        opts: VmmOptions,
    ) -> Result<VmmMemory, CudaError> {
        let gran = self.vmm_granularity(opts.granularity)?;
        let sizes = chunk_sizes(len, gran, opts.chunk_bytes)
            .ok_or_else(|| CudaError::Usage(format!("VMM allocation of {len} bytes overflows")))?;
        let prop = pinned_device_prop(self);
        let mut mem = VmmMemory::empty(self, len);
        let t = Instant::now();
        let mut offset = 0usize;
        for size in sizes {
            let mut handle: sys::CUmemGenericAllocationHandle = 0;
            // SAFETY: writes one handle through a valid pointer; prop is
            // initialised and borrowed for the call. The handle is owned by
            // `mem` right after and released exactly once in its Drop.
            unsafe { sys::cuMemCreate(&mut handle, size, &prop, 0) }
                .result()
                .during_with(|| format!("cuMemCreate of {size} bytes on GPU {}", self.ordinal()))?;
            mem.chunks.push(Chunk {
                handle,
                offset,
                size,
                mapped: false,
            });
            offset += size;
        }
        mem.times.handles = t.elapsed();
        mem.reserve_map_access(offset, gran)?;
        Ok(mem)
    }

    /// Maps memory another process exported with [`VmmMemory::export_fd`]:
    /// `size` is the exported handle's size ([`VmmMemory::chunk_sizes`]),
    /// `len` the bytes used (≤ size). The descriptor is not consumed.
    pub fn vmm_import(
        &self,
        fd: BorrowedFd<'_>,
        size: usize,
        len: usize,
    ) -> Result<VmmMemory, CudaError> {
        self.vmm_import_chunks(&[(fd, size)], len, 0)
    }

    /// Maps the handles of `chunks` (descriptor, handle size) back to back
    /// into one range aligned to `align` bytes (0: the driver's choice),
    /// exposing its first `len` bytes. The descriptors are not consumed.
    pub fn vmm_import_chunks(
        &self,
        chunks: &[(BorrowedFd<'_>, usize)],
        len: usize,
        align: usize,
    ) -> Result<VmmMemory, CudaError> {
        self.vmm_supported()?;
        if chunks.is_empty() {
            return Err(CudaError::Usage("VMM import of no handle".into()));
        }
        if align != 0 && !align.is_power_of_two() {
            return Err(CudaError::Usage(format!(
                "VMM alignment {align} is not a power of two"
            )));
        }
        let total = chunks
            .iter()
            .try_fold(0usize, |a, (_, s)| a.checked_add(*s))
            .ok_or_else(|| CudaError::Usage("VMM import sizes overflow".into()))?;
        if len > total {
            return Err(CudaError::Usage(format!(
                "VMM import of {len} bytes from handles of {total} bytes"
            )));
        }
        self.bind_to_thread()?;
        let mut mem = VmmMemory::empty(self, len);
        let t = Instant::now();
        let mut offset = 0usize;
        for (fd, size) in chunks {
            let mut handle: sys::CUmemGenericAllocationHandle = 0;
            let os_handle = std::ptr::without_provenance_mut::<c_void>(fd.as_raw_fd() as usize);
            // SAFETY: writes one handle through a valid pointer; for POSIX
            // descriptors the driver reads the descriptor number from the
            // pointer's value (never dereferenced); the descriptor is open
            // (borrowed) for the call. The handle is owned by `mem` right
            // after and released exactly once in its Drop.
            unsafe {
                sys::cuMemImportFromShareableHandle(
                    &mut handle,
                    os_handle,
                    sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
                )
            }
            .result()
            .during_with(|| {
                format!(
                    "cuMemImportFromShareableHandle of descriptor {}",
                    fd.as_raw_fd()
                )
            })?;
            mem.chunks.push(Chunk {
                handle,
                offset,
                size: *size,
                mapped: false,
            });
            offset += size;
        }
        mem.times.handles = t.elapsed();
        mem.reserve_map_access(total, align)?;
        Ok(mem)
    }
}

impl VmmMemory {
    fn empty(gpu: &Gpu, len: usize) -> VmmMemory {
        VmmMemory {
            gpu: gpu.clone(),
            base: 0,
            reserved: 0,
            len,
            chunks: Vec::new(),
            times: VmmTimes::default(),
        }
    }

    /// Reserves `total` bytes, maps every chunk at its offset and enables
    /// read/write access from this GPU. On error, Drop undoes what was done.
    fn reserve_map_access(&mut self, total: usize, align: usize) -> Result<(), CudaError> {
        self.gpu.bind_to_thread()?;
        let t = Instant::now();
        let mut base: sys::CUdeviceptr = 0;
        // SAFETY: writes one device pointer through a valid pointer; the
        // range is owned by self right after and freed exactly once in Drop.
        unsafe { sys::cuMemAddressReserve(&mut base, total, align, 0, 0) }
            .result()
            .during_with(|| format!("cuMemAddressReserve of {total} bytes"))?;
        self.base = base;
        self.reserved = total;
        self.times.reserve = t.elapsed();

        let t = Instant::now();
        for c in &mut self.chunks {
            // SAFETY: [base+offset, +size) lies inside the range reserved
            // above (the chunks tile it) and is not mapped yet; the handle is
            // live and exactly `size` bytes. Unmapped exactly once in Drop.
            unsafe { sys::cuMemMap(base + c.offset as u64, c.size, 0, c.handle, 0) }
                .result()
                .during_with(|| format!("cuMemMap of {} bytes at +{}", c.size, c.offset))?;
            c.mapped = true;
        }
        self.times.map = t.elapsed();

        let t = Instant::now();
        let desc = sys::CUmemAccessDesc {
            location: device_location(&self.gpu),
            flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        };
        // SAFETY: the whole range is mapped (above); desc is one initialised
        // descriptor borrowed for the call.
        unsafe { sys::cuMemSetAccess(base, total, &desc, 1) }
            .result()
            .during_with(|| format!("cuMemSetAccess of {total} bytes"))?;
        self.times.set_access = t.elapsed();
        Ok(())
    }

    /// The device address of the first byte. Valid while `self` lives.
    pub fn ptr(&self) -> u64 {
        self.base
    }

    /// Bytes usable (as asked for).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes reserved and mapped (the physical size, ≥ `len`).
    pub fn reserved(&self) -> usize {
        self.reserved
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// The size of each physical handle, in mapping order.
    pub fn chunk_sizes(&self) -> Vec<usize> {
        self.chunks.iter().map(|c| c.size).collect()
    }

    /// How long each step that made this memory took.
    pub fn times(&self) -> VmmTimes {
        self.times
    }

    /// The POSIX file descriptor of the single physical handle, for another
    /// process to map with [`Gpu::vmm_import`]. Fails for chunked memory
    /// (use [`VmmMemory::export_fds`]).
    pub fn export_fd(&self) -> Result<OwnedFd, CudaError> {
        if self.chunks.len() != 1 {
            return Err(CudaError::Usage(format!(
                "export_fd of VMM memory with {} handles",
                self.chunks.len()
            )));
        }
        Ok(self.export_fds()?.remove(0).0)
    }

    /// One POSIX file descriptor per physical handle, with its size, in
    /// mapping order. The descriptors are close-on-exec as the driver made
    /// them; see [`set_fd_inheritable`].
    pub fn export_fds(&self) -> Result<Vec<(OwnedFd, usize)>, CudaError> {
        self.gpu.bind_to_thread()?;
        let mut out = Vec::with_capacity(self.chunks.len());
        for c in &self.chunks {
            let mut fd: c_int = -1;
            // SAFETY: for POSIX descriptors the driver writes one int through
            // the pointer, which points at `fd`; the handle is live.
            unsafe {
                sys::cuMemExportToShareableHandle(
                    (&mut fd as *mut c_int).cast::<c_void>(),
                    c.handle,
                    sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
                    0,
                )
            }
            .result()
            .during("cuMemExportToShareableHandle")?;
            if fd < 0 {
                return Err(CudaError::Usage(format!(
                    "cuMemExportToShareableHandle returned descriptor {fd}"
                )));
            }
            // SAFETY: the driver created this descriptor for the caller, who
            // owns it from now on; nothing else closes it.
            out.push((unsafe { OwnedFd::from_raw_fd(fd) }, c.size));
        }
        Ok(out)
    }

    /// Sets every byte to `value` (touches every page), after all queued
    /// work on this GPU.
    pub fn fill(&self, value: u8) -> Result<(), CudaError> {
        if self.len == 0 {
            return Ok(());
        }
        self.gpu.synchronize()?;
        // SAFETY: the whole live, mapped, read/write range is written;
        // nothing on the host is touched.
        unsafe { sys::cuMemsetD8_v2(self.base, value, self.len) }
            .result()
            .during("cuMemsetD8 of VMM memory")?;
        self.gpu.synchronize()
    }

    /// Synchronous upload from host memory, after all queued work on this GPU.
    pub fn copy_from_host(&self, dst_offset: usize, src: &[u8]) -> Result<(), CudaError> {
        // SAFETY: `base..base + len` is this live, mapped, read/write range.
        unsafe {
            upload_sync(
                &self.gpu,
                self.base,
                self.len,
                dst_offset,
                src,
                "VMM memory",
            )
        }
    }

    /// Synchronous download into host memory, after all queued work on this GPU.
    pub fn copy_to_host(&self, offset: usize, dst: &mut [u8]) -> Result<(), CudaError> {
        // SAFETY: `base..base + len` is this live, mapped range.
        unsafe { download_sync(&self.gpu, self.base, self.len, offset, dst, "VMM memory") }
    }
}

impl Drop for VmmMemory {
    fn drop(&mut self) {
        if self.chunks.is_empty() && self.base == 0 {
            return;
        }
        if let Err(e) = self.gpu.bind_to_thread() {
            tracing::warn!("before freeing VMM memory: {e}");
        }
        if self.chunks.iter().any(|c| c.mapped) {
            // Work touching this memory may still be queued.
            if let Err(e) = self.gpu.synchronize() {
                tracing::warn!("before unmapping VMM memory: {e}");
            }
        }
        for c in &mut self.chunks {
            if c.mapped {
                // SAFETY: this exact range was mapped by reserve_map_access
                // and is unmapped once; the GPU is idle.
                let r = unsafe { sys::cuMemUnmap(self.base + c.offset as u64, c.size) }.result();
                if let Err(e) = r {
                    tracing::warn!("cuMemUnmap: {e}");
                }
                c.mapped = false;
            }
        }
        for c in self.chunks.drain(..) {
            // SAFETY: the handle came from cuMemCreate or an import, is no
            // longer mapped here, and is released exactly once.
            if let Err(e) = unsafe { sys::cuMemRelease(c.handle) }.result() {
                tracing::warn!("cuMemRelease: {e}");
            }
        }
        if self.base != 0 {
            // SAFETY: the range came from cuMemAddressReserve with this size,
            // nothing is mapped in it any more, and it is freed once.
            if let Err(e) = unsafe { sys::cuMemAddressFree(self.base, self.reserved) }.result() {
                tracing::warn!("cuMemAddressFree: {e}");
            }
            self.base = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunking() {
        const G: usize = 2 << 20;
        assert_eq!(chunk_sizes(1, G, None), Some(vec![G]));
        assert_eq!(chunk_sizes(0, G, None), Some(vec![G]));
        assert_eq!(chunk_sizes(3 * G, G, None), Some(vec![3 * G]));
        assert_eq!(
            chunk_sizes(3 * G + 1, G, Some(2 * G)),
            Some(vec![2 * G, 2 * G])
        );
        assert_eq!(
            chunk_sizes(5 * G, G, Some(2 * G)),
            Some(vec![2 * G, 2 * G, G])
        );
        // A chunk smaller than the granularity is rounded up to it.
        assert_eq!(chunk_sizes(2 * G, G, Some(1)), Some(vec![G, G]));
        // A chunk larger than the whole is the whole.
        assert_eq!(chunk_sizes(G, G, Some(8 * G)), Some(vec![G]));
        assert_eq!(chunk_sizes(usize::MAX, G, None), None);
        for s in chunk_sizes(17 * G + 5, G, Some(3 * G)).unwrap() {
            assert_eq!(s % G, 0);
        }
    }

    #[test]
    fn fd_inheritance_flag() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let get = |f: &std::fs::File| {
            // SAFETY: F_GETFD on an open descriptor reads its flags only.
            unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFD) }
        };
        assert_ne!(get(&f) & libc::FD_CLOEXEC, 0, "std opens close-on-exec");
        set_fd_inheritable(std::os::fd::AsFd::as_fd(&f), true).unwrap();
        assert_eq!(get(&f) & libc::FD_CLOEXEC, 0);
        set_fd_inheritable(std::os::fd::AsFd::as_fd(&f), false).unwrap();
        assert_ne!(get(&f) & libc::FD_CLOEXEC, 0);
    }

    #[test]
    fn vmm_memory_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<VmmMemory>();
    }

    /// Runs only where a GPU is present (the device machine).
    #[test]
    fn vmm_round_trip_when_present() {
        let Ok(cuda) = super::super::probe() else {
            return;
        };
        let gpu = cuda.device(0).unwrap();
        if gpu.vmm_supported().is_err() {
            return;
        }
        let gran = gpu.vmm_granularity(Granularity::Minimum).unwrap();
        let mem = gpu
            .vmm_alloc_exportable_with(
                3 * gran + 7,
                VmmOptions {
                    granularity: Granularity::Minimum,
                    chunk_bytes: Some(gran),
                },
            )
            .unwrap();
        assert_eq!(mem.chunk_sizes(), vec![gran; 4]);
        let data: Vec<u8> = (0..mem.len()).map(|i| (i * 13 % 251) as u8).collect();
        mem.copy_from_host(0, &data).unwrap();
        let mut back = vec![0u8; mem.len()];
        mem.copy_to_host(0, &mut back).unwrap();
        assert_eq!(back, data);
        assert_eq!(mem.export_fds().unwrap().len(), 4);
        assert!(mem.export_fd().is_err());
        assert!(mem.copy_to_host(mem.len(), &mut [0u8; 1]).is_err());
    }
}
