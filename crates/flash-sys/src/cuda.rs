//! The CUDA driver, loaded at run time through cudarc (`dynamic-loading`).
//!
//! One binary runs on machines with and without an NVIDIA driver: [`probe`]
//! checks that `libcuda` can be loaded and has every entry point this module
//! calls *before* anything else touches cudarc (cudarc panics when the library
//! or a symbol is missing), and says why CUDA is unusable instead of panicking.
//! Setting `FLASH_NO_CUDA=1` makes [`probe`] report CUDA as unavailable.
//!
//! # The surface
//! - [`probe`] → [`Cuda`] (driver version, device count) → [`Cuda::device`] → [`Gpu`].
//! - [`Gpu::alloc`] → [`DeviceMemory`] (plain `cuMemAlloc`, never the
//!   stream-ordered pool: `cuIpcGetMemHandle` refuses pool memory), shareable
//!   with other processes through [`DeviceMemory::ipc_handle`] / [`Gpu::open_ipc`].
//! - [`Gpu::pinned`] → [`PinnedBuffer`], the staging buffer (`cuMemHostAlloc`, portable).
//! - [`Gpu::stream`] → [`Stream`] (non-blocking), [`Gpu::event`] → [`Event`].
//!
//! # Threads
//! Every handle here is `Send + Sync`. CUDA binds a context to each CPU thread;
//! every method binds the primary context of its GPU to the calling thread
//! first, so a worker thread needs no set-up. [`Gpu::bind_to_thread`] exists
//! for code that wants to do it up front.
//!
//! # The asynchronous-copy invariant
//! A pinned buffer must not be written by the CPU while the GPU reads it (an
//! upload in flight), nor read or written while the GPU writes it (a download
//! in flight), and must not be freed before either ends. The safe surface
//! enforces this by ownership: an asynchronous copy *takes* the
//! [`PinnedBuffer`] by value and turns it into an [`InFlight`] token. The token
//! can enqueue more copies from (or into) the same buffer on the same stream,
//! gives shared read access while only uploads are queued ([`InFlight::peek`]),
//! and gives the buffer back only once an event recorded after the last copy
//! has completed ([`InFlight::wait`], or [`InFlight::try_take`] when
//! [`InFlight::is_complete`]). Dropping a token waits for its copies; if the
//! wait itself fails (a broken context) the buffer is leaked rather than freed
//! under a DMA engine. A staging ring is therefore: a pool of `PinnedBuffer`s,
//! readers fill one, `copy_from_host_async` turns it into an `InFlight`, and a
//! completion step `wait`s the oldest token and returns the buffer to the pool.
//!
//! Device memory is not host memory: a [`DeviceMemory`] can be dropped with
//! copies into it still queued, so its `Drop` synchronises the GPU's context
//! before `cuMemFree` (a free is rare; a load allocates once per model).
//! Synchronous copies ([`DeviceMemory::copy_to_host`], [`DeviceMemory::copy_from_host`],
//! [`DeviceMemory::fill`]) first wait for all work queued on the GPU, so they
//! see the results of earlier asynchronous copies on any stream.
//!
//! # For crates that launch work on the GPU
//! The GPU kernels (NVRTC, cuBLAS, the inference engine's ops) live in
//! flash-kernels, which makes its own driver calls in one module. What it
//! needs from here is exposed narrowly: [`Stream::cu_stream`] (the raw
//! stream to queue work on), [`Gpu::driver_has_symbol`] (entry points beyond
//! the ones [`probe`] checks), [`During`] (a driver error with what was being
//! done) and [`check_range`] (the bounds check every copy here uses).

use std::ffi::{c_char, c_void, CStr};
use std::mem::MaybeUninit;
use std::ops::Range;
use std::ptr::NonNull;
use std::sync::{Arc, OnceLock};

use cudarc::driver::result::{self, DriverError};
use cudarc::driver::sys;
use cudarc::driver::{CudaContext, CudaStream};

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Why CUDA cannot be used on this machine. Not an error of the program: the
/// CPU-only paths still work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CudaUnavailable {
    #[error("CUDA disabled by FLASH_NO_CUDA")]
    Disabled,
    #[error("no NVIDIA driver: the CUDA driver library (libcuda.so) cannot be loaded")]
    NoDriver,
    #[error("the NVIDIA driver is too old: libcuda lacks {}", .missing.join(", "))]
    DriverTooOld { missing: Vec<String> },
    #[error("the CUDA driver failed to initialise: {0}")]
    Init(String),
    #[error("the CUDA driver sees no GPU")]
    NoDevice,
    #[error("the CUDA driver library is unusable: {0}")]
    Broken(String),
}

/// A CUDA call that failed, or a request this module refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CudaError {
    /// A driver call returned an error: `what` was being done, `name` is the
    /// CUDA error name (`CUDA_ERROR_OUT_OF_MEMORY`), `message` its description.
    #[error("{what}: {name} ({message})")]
    Driver {
        what: String,
        name: String,
        message: String,
        code: u32,
    },
    /// A request refused before reaching the driver (out-of-bounds range,
    /// stream of another GPU, ...).
    #[error("{0}")]
    Usage(String),
}

impl CudaError {
    fn driver(e: DriverError, what: impl Into<String>) -> Self {
        let code = e.0 as u32;
        let name = e
            .error_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|_| format!("CUDA error {code}"));
        let message = e
            .error_string()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "no description".to_string());
        CudaError::Driver {
            what: what.into(),
            name,
            message,
            code,
        }
    }

    /// The CUDA error name, for driver errors.
    pub fn cuda_name(&self) -> Option<&str> {
        match self {
            CudaError::Driver { name, .. } => Some(name),
            CudaError::Usage(_) => None,
        }
    }

    /// Whether this is `CUDA_ERROR_OUT_OF_MEMORY`.
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, CudaError::Driver { code, .. }
            if *code == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY as u32)
    }
}

/// Turns a failed driver call into a [`CudaError::Driver`] that says what
/// was being done (`"cuModuleLoadData"`, `"launching rmsnorm_f32"`), with the
/// CUDA error's name and description. For this crate and for crates that
/// make their own driver calls through cudarc (flash-kernels).
pub trait During<T> {
    /// The error names `what`.
    fn during(self, what: &str) -> Result<T, CudaError>;
    /// The error names `what()`, built only on failure.
    fn during_with(self, what: impl FnOnce() -> String) -> Result<T, CudaError>;
}

impl<T> During<T> for Result<T, DriverError> {
    fn during(self, what: &str) -> Result<T, CudaError> {
        self.map_err(|e| CudaError::driver(e, what))
    }
    fn during_with(self, what: impl FnOnce() -> String) -> Result<T, CudaError> {
        self.map_err(|e| CudaError::driver(e, what()))
    }
}

/// Copies `src` to device memory `base + offset`, synchronously, after all
/// work queued on `gpu` (for [`DeviceMemory`]).
///
/// # Safety
/// `base..base + len` must be device memory of `gpu`, mapped for reading
/// and writing, that stays live for the call.
unsafe fn upload_sync(
    gpu: &Gpu,
    base: u64,
    len: usize,
    offset: usize,
    src: &[u8],
    what: &str,
) -> Result<(), CudaError> {
    check_range(&format!("upload into {what}"), offset, src.len(), len)?;
    if src.is_empty() {
        return Ok(());
    }
    gpu.synchronize()?;
    // SAFETY: the destination lies in the caller's live range (checked); src
    // is borrowed for the call, which returns only once the driver no longer
    // reads it (synchronous copy).
    unsafe {
        sys::cuMemcpyHtoD_v2(
            base + offset as u64,
            src.as_ptr() as *const c_void,
            src.len(),
        )
    }
    .result()
    .during_with(|| format!("cuMemcpyHtoD of {} bytes into {what}", src.len()))
}

/// Copies device memory `base + offset` into `dst`, synchronously, after
/// all work queued on `gpu`.
///
/// # Safety
/// As [`upload_sync`]: `base..base + len` is live, mapped memory of `gpu`.
unsafe fn download_sync(
    gpu: &Gpu,
    base: u64,
    len: usize,
    offset: usize,
    dst: &mut [u8],
    what: &str,
) -> Result<(), CudaError> {
    check_range(&format!("download from {what}"), offset, dst.len(), len)?;
    if dst.is_empty() {
        return Ok(());
    }
    gpu.synchronize()?;
    // SAFETY: the source lies in the caller's live range (checked); dst is
    // borrowed mutably for the call, which returns once the copy ended.
    unsafe {
        sys::cuMemcpyDtoH_v2(
            dst.as_mut_ptr() as *mut c_void,
            base + offset as u64,
            dst.len(),
        )
    }
    .result()
    .during_with(|| format!("cuMemcpyDtoH of {} bytes from {what}", dst.len()))
}

/// Refuses (with [`CudaError::Usage`] naming `what`) a range
/// `[offset, offset + len)` that does not lie inside `total` bytes, overflow
/// included. The check of every copy here; public for views into device
/// memory built elsewhere (flash-kernels' `DevView`).
pub fn check_range(what: &str, offset: usize, len: usize, total: usize) -> Result<(), CudaError> {
    match offset.checked_add(len) {
        Some(end) if end <= total => Ok(()),
        _ => Err(CudaError::Usage(format!(
            "{what}: range [{offset}, +{len}) outside a buffer of {total} bytes"
        ))),
    }
}

fn check_host_range(what: &str, r: &Range<usize>, total: usize) -> Result<(), CudaError> {
    if r.start > r.end {
        return Err(CudaError::Usage(format!("{what}: reversed range {r:?}")));
    }
    check_range(what, r.start, r.end - r.start, total)
}

// ---------------------------------------------------------------------------
// Probe
// ---------------------------------------------------------------------------

/// Every driver entry point this module (and the parts of cudarc it uses)
/// calls. Checked once by [`probe`], so that no later call can hit cudarc's
/// "missing symbol" panic. The elapsed-time entry point is looked up apart
/// (`_v2` since CUDA 12.8, the v1 before; see [`Event::elapsed_ms`]).
const REQUIRED_SYMBOLS: &[&str] = &[
    "cuInit",
    "cuDriverGetVersion",
    "cuGetErrorName",
    "cuGetErrorString",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDeviceGetName",
    "cuDeviceGetUuid_v2",
    "cuDeviceTotalMem_v2",
    "cuDeviceGetAttribute",
    "cuDeviceGetPCIBusId",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuCtxSetCurrent",
    "cuCtxGetCurrent",
    "cuCtxSynchronize",
    "cuMemGetInfo_v2",
    "cuMemAlloc_v2",
    "cuMemFree_v2",
    "cuMemHostAlloc",
    "cuMemFreeHost",
    "cuMemGetAddressRange_v2",
    "cuMemcpyHtoD_v2",
    "cuMemcpyDtoH_v2",
    "cuMemcpyHtoDAsync_v2",
    "cuMemcpyDtoHAsync_v2",
    "cuMemcpyDtoDAsync_v2",
    "cuMemcpyPeerAsync",
    "cuMemsetD8_v2",
    "cuIpcGetMemHandle",
    "cuIpcOpenMemHandle_v2",
    "cuIpcCloseMemHandle",
    "cuStreamCreate",
    "cuStreamSynchronize",
    "cuStreamDestroy_v2",
    "cuStreamWaitEvent",
    "cuEventCreate",
    "cuEventRecord",
    "cuEventQuery",
    "cuEventSynchronize",
    "cuEventDestroy_v2",
];

/// The CUDA driver, initialised. Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cuda {
    api_version: i32,
    device_count: usize,
    driver_version: Option<String>,
}

static PROBE: OnceLock<Result<Cuda, CudaUnavailable>> = OnceLock::new();

/// Loads and initialises the CUDA driver once per process (the result is
/// cached). Never panics: a machine without a usable driver gets the reason.
pub fn probe() -> Result<Cuda, CudaUnavailable> {
    PROBE.get_or_init(probe_uncached).clone()
}

fn probe_uncached() -> Result<Cuda, CudaUnavailable> {
    if std::env::var("FLASH_NO_CUDA").is_ok_and(|v| !v.is_empty() && v != "0") {
        return Err(CudaUnavailable::Disabled);
    }
    // SAFETY: is_culib_present only dlopens the candidate library names and
    // closes them again; loading runs the driver library's initialisers, as
    // any use of CUDA does.
    if !unsafe { sys::is_culib_present() } {
        return Err(CudaUnavailable::NoDriver);
    }
    // Last resort: cudarc panics on surprises (a symbol missing after all);
    // turn any panic into a reason. The release profile unwinds.
    match std::panic::catch_unwind(probe_driver) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic while loading the driver".to_string());
            Err(CudaUnavailable::Broken(msg))
        }
    }
}

fn has_symbol(name: &str) -> bool {
    // SAFETY: the library is present (checked by the caller); culib() loads it
    // once and keeps it for the process. `get` only looks the symbol up; the
    // returned pointer is never called here.
    unsafe { sys::culib().get::<*const c_void>(name).is_ok() }
}

fn probe_driver() -> Result<Cuda, CudaUnavailable> {
    let missing: Vec<String> = REQUIRED_SYMBOLS
        .iter()
        .filter(|s| !has_symbol(s))
        .map(|s| s.to_string())
        .collect();
    if !missing.is_empty() {
        return Err(CudaUnavailable::DriverTooOld { missing });
    }
    result::init()
        .map_err(|e| CudaUnavailable::Init(CudaError::driver(e, "cuInit").to_string()))?;
    let mut api_version = 0i32;
    // SAFETY: writes one int through a valid pointer.
    unsafe { sys::cuDriverGetVersion(&mut api_version) }
        .result()
        .map_err(|e| {
            CudaUnavailable::Init(CudaError::driver(e, "cuDriverGetVersion").to_string())
        })?;
    let count = result::device::get_count()
        .map_err(|e| CudaUnavailable::Init(CudaError::driver(e, "cuDeviceGetCount").to_string()))?;
    if count <= 0 {
        return Err(CudaUnavailable::NoDevice);
    }
    Ok(Cuda {
        api_version,
        device_count: count as usize,
        driver_version: kernel_driver_version(),
    })
}

/// The kernel module's version ("580.159.04"), from procfs or sysfs.
fn kernel_driver_version() -> Option<String> {
    if let Ok(s) = std::fs::read_to_string("/proc/driver/nvidia/version") {
        if let Some(v) = parse_proc_driver_version(&s) {
            return Some(v);
        }
    }
    std::fs::read_to_string("/sys/module/nvidia/version")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn parse_proc_driver_version(s: &str) -> Option<String> {
    let line = s.lines().find(|l| l.contains("Kernel Module"))?;
    let after = line.split("Kernel Module").nth(1)?;
    let tok = after.split_whitespace().find(|t| t.contains('.'))?;
    Some(tok.to_string())
}

impl Cuda {
    /// The driver API version from `cuDriverGetVersion` (13000 for CUDA 13.0).
    pub fn api_version(&self) -> i32 {
        self.api_version
    }

    /// The newest CUDA version the driver supports, as "13.0".
    pub fn cuda_version(&self) -> String {
        format!(
            "{}.{}",
            self.api_version / 1000,
            (self.api_version % 1000) / 10
        )
    }

    /// The kernel driver's version ("580.159.04"), when the system shows it.
    pub fn driver_version(&self) -> Option<&str> {
        self.driver_version.as_deref()
    }

    pub fn device_count(&self) -> usize {
        self.device_count
    }

    /// Retains the primary context of GPU `ordinal` and binds it to the
    /// calling thread.
    pub fn device(&self, ordinal: usize) -> Result<Gpu, CudaError> {
        if ordinal >= self.device_count {
            return Err(CudaError::Usage(format!(
                "no GPU {ordinal}: the driver sees {} GPU(s)",
                self.device_count
            )));
        }
        let ctx = CudaContext::new(ordinal)
            .during_with(|| format!("retaining the primary context of GPU {ordinal}"))?;
        Ok(Gpu { ctx })
    }
}

// ---------------------------------------------------------------------------
// Gpu
// ---------------------------------------------------------------------------

/// A static description of one GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    /// "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx", as nvidia-smi prints it.
    pub uuid: String,
    pub total_bytes: u64,
    pub free_bytes: u64,
    /// (major, minor): (9, 0) for Hopper.
    pub compute_capability: (u32, u32),
    /// "0000:01:00.0" (lower-case, the form sysfs uses).
    pub pci_bus_id: String,
    /// From `/sys/bus/pci/devices/<bus id>/current_link_speed`; None when absent.
    pub pcie_link_gen: Option<u8>,
    /// From `/sys/bus/pci/devices/<bus id>/current_link_width`; None when absent.
    pub pcie_link_width: Option<u8>,
}

impl GpuInfo {
    /// The link's payload limit in GB/s (10^9 bytes) per direction, from its
    /// generation and width, before protocol overhead (TLP headers take
    /// another ~10-15 %). None when either is unknown.
    pub fn pcie_link_gbps(&self) -> Option<f64> {
        let gen = self.pcie_link_gen?;
        let width = self.pcie_link_width? as f64;
        let per_lane = match gen {
            1 => 2.5 * 8.0 / 10.0,
            2 => 5.0 * 8.0 / 10.0,
            3 => 8.0 * 128.0 / 130.0,
            4 => 16.0 * 128.0 / 130.0,
            5 => 32.0 * 128.0 / 130.0,
            6 => 64.0 * 242.0 / 256.0,
            _ => return None,
        };
        Some(per_lane * width / 8.0)
    }
}

/// One GPU: its primary context. Cheap to clone; `Send + Sync`.
#[derive(Debug, Clone)]
pub struct Gpu {
    ctx: Arc<CudaContext>,
}

impl PartialEq for Gpu {
    fn eq(&self, other: &Self) -> bool {
        self.ctx.cu_ctx() == other.ctx.cu_ctx()
    }
}
impl Eq for Gpu {}

impl Gpu {
    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    /// Whether the loaded driver library has the entry point `name`
    /// (`"cuFuncGetParamInfo"`), for callers of driver functions beyond the
    /// ones [`probe`] requires: cudarc panics when a missing one is called,
    /// so check first. Only looks the symbol up.
    pub fn driver_has_symbol(&self, name: &str) -> bool {
        // A Gpu exists only after probe() found the library and its
        // required symbols, which is has_symbol's precondition.
        has_symbol(name)
    }

    /// Makes this GPU's primary context current on the calling thread. Every
    /// method does this itself; calling it is never required.
    pub fn bind_to_thread(&self) -> Result<(), CudaError> {
        self.ctx
            .bind_to_thread()
            .during_with(|| format!("binding GPU {}'s context to this thread", self.ordinal()))
    }

    /// (free, total) bytes of device memory.
    pub fn mem_info(&self) -> Result<(u64, u64), CudaError> {
        let (free, total) = self.ctx.mem_get_info().during("cuMemGetInfo")?;
        Ok((free as u64, total as u64))
    }

    /// Name, UUID, memory, compute capability and PCIe link of this GPU.
    pub fn info(&self) -> Result<GpuInfo, CudaError> {
        let name = self.ctx.name().during("cuDeviceGetName")?;
        let uuid = format_uuid(&self.ctx.uuid().during("cuDeviceGetUuid")?.bytes);
        let (free_bytes, total_bytes) = self.mem_info()?;
        let (major, minor) = self
            .ctx
            .compute_capability()
            .during("reading the compute capability")?;
        let mut buf = [0 as c_char; 64];
        // SAFETY: the driver writes at most `len` bytes (NUL included) into buf,
        // which is 64 bytes; cu_device is a valid device of a live context.
        unsafe {
            sys::cuDeviceGetPCIBusId(buf.as_mut_ptr(), buf.len() as i32, self.ctx.cu_device())
        }
        .result()
        .during("cuDeviceGetPCIBusId")?;
        // SAFETY: buf is NUL-terminated: it was zeroed and the driver writes
        // fewer than 64 bytes, terminated.
        let raw_bus = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy();
        let pci_bus_id = normalize_bus_id(&raw_bus);
        let dir = std::path::Path::new("/sys/bus/pci/devices").join(&pci_bus_id);
        let pcie_link_gen = std::fs::read_to_string(dir.join("current_link_speed"))
            .ok()
            .and_then(|s| parse_link_gen(&s));
        let pcie_link_width = std::fs::read_to_string(dir.join("current_link_width"))
            .ok()
            .and_then(|s| s.trim().parse::<u8>().ok())
            .filter(|&w| w > 0);
        Ok(GpuInfo {
            ordinal: self.ordinal(),
            name,
            uuid,
            total_bytes,
            free_bytes,
            compute_capability: (major.max(0) as u32, minor.max(0) as u32),
            pci_bus_id,
            pcie_link_gen,
            pcie_link_width,
        })
    }

    /// Waits for all work queued on this GPU's context.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.ctx
            .synchronize()
            .during_with(|| format!("synchronising GPU {}", self.ordinal()))
    }

    /// Allocates `bytes` of device memory with `cuMemAlloc` (shareable through
    /// CUDA IPC). The contents are undefined until written.
    pub fn alloc(&self, bytes: usize) -> Result<DeviceMemory, CudaError> {
        self.bind_to_thread()?;
        let ptr = if bytes == 0 {
            0
        } else {
            let physical = alloc_size(bytes);
            // SAFETY: a plain allocation; the pointer is owned by the returned
            // DeviceMemory and freed exactly once in its Drop.
            unsafe { result::malloc_sync(physical) }.during_with(|| {
                format!("cuMemAlloc of {physical} bytes on GPU {}", self.ordinal())
            })?
        };
        Ok(DeviceMemory {
            gpu: self.clone(),
            ptr,
            len: bytes,
            origin: Origin::Owned,
        })
    }

    /// Maps device memory that another process exported with
    /// [`DeviceMemory::ipc_handle`]; `len` must not exceed the exported
    /// allocation (checked with `cuMemGetAddressRange`). Unmapped on drop.
    /// CUDA refuses to open a handle in the process that exported it.
    pub fn open_ipc(&self, handle: &IpcHandle, len: usize) -> Result<DeviceMemory, CudaError> {
        self.bind_to_thread()?;
        let mut h = sys::CUipcMemHandle {
            reserved: [0 as c_char; 64],
        };
        for (d, s) in h.reserved.iter_mut().zip(handle.iter()) {
            *d = *s as c_char;
        }
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: writes one device pointer through a valid pointer; the handle
        // is passed by value. On success the mapping is owned by the returned
        // DeviceMemory and closed exactly once in its Drop (or below).
        unsafe {
            sys::cuIpcOpenMemHandle_v2(
                &mut ptr,
                h,
                sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
            )
        }
        .result()
        .during("cuIpcOpenMemHandle")?;
        let mem = DeviceMemory {
            gpu: self.clone(),
            ptr,
            len,
            origin: Origin::Ipc,
        };
        let mut base: sys::CUdeviceptr = 0;
        let mut size: usize = 0;
        // SAFETY: writes a pointer and a size through valid pointers; ptr is
        // a live mapping in this context.
        unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut size, ptr) }
            .result()
            .during("cuMemGetAddressRange of an IPC mapping")?;
        let available = (base + size as u64).saturating_sub(ptr);
        if len as u64 > available {
            return Err(CudaError::Usage(format!(
                "IPC handle maps {available} bytes, {len} were asked for"
            )));
        }
        Ok(mem)
    }

    /// Allocates `bytes` of pinned (page-locked), portable, zeroed host
    /// memory, the way [`PinMethod::current`] says. Pinning is slow (about
    /// 2 GB/s with `cuMemHostAlloc`): pin at start, never on a load path.
    pub fn pinned(&self, bytes: usize) -> Result<PinnedBuffer, CudaError> {
        self.pinned_with(bytes, PinMethod::current())
    }

    /// [`Gpu::pinned`] with an explicit method (`flash doctor` measures both).
    pub fn pinned_with(&self, bytes: usize, method: PinMethod) -> Result<PinnedBuffer, CudaError> {
        self.bind_to_thread()?;
        if bytes == 0 {
            return Ok(PinnedBuffer {
                ptr: NonNull::dangling(),
                len: 0,
                gpu: self.clone(),
                event: None,
                mapped: None,
            });
        }
        if method == PinMethod::HugePages {
            return self.pinned_huge(bytes);
        }
        // SAFETY: a plain allocation; the pointer is owned by the returned
        // PinnedBuffer and freed exactly once in its Drop.
        let raw = unsafe { result::malloc_host(bytes, sys::CU_MEMHOSTALLOC_PORTABLE) }
            .during_with(|| format!("cuMemHostAlloc of {bytes} bytes"))?;
        let ptr = NonNull::new(raw as *mut u8).ok_or_else(|| {
            CudaError::Usage(format!("cuMemHostAlloc of {bytes} bytes returned null"))
        })?;
        zero_parallel(ptr.as_ptr() as usize, bytes);
        Ok(PinnedBuffer {
            ptr,
            len: bytes,
            gpu: self.clone(),
            event: None,
            mapped: None,
        })
    }

    /// Anonymous memory aligned to 2 MiB, advised to be backed by transparent
    /// huge pages, then pinned with `cuMemHostRegister` (which faults it in:
    /// fresh anonymous pages are zero). Fewer, larger pages to fault, zero
    /// and pin than `cuMemHostAlloc`'s.
    fn pinned_huge(&self, bytes: usize) -> Result<PinnedBuffer, CudaError> {
        const HUGE: usize = 2 << 20;
        let map_len = bytes
            .checked_next_multiple_of(HUGE)
            .ok_or_else(|| CudaError::Usage(format!("pinning {bytes} bytes overflows")))?;
        let over = map_len + HUGE;
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                over,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(CudaError::Usage(format!(
                "mmap of {over} bytes for pinned memory: {}",
                std::io::Error::last_os_error()
            )));
        }
        let base = raw as usize;
        let start = base.next_multiple_of(HUGE);
        // SAFETY: both ranges lie inside the mapping just made and outside
        // [start, start + map_len), which is kept; unmapping a zero-length
        // range is skipped.
        unsafe {
            if start > base {
                libc::munmap(raw, start - base);
            }
            let tail = base + over - (start + map_len);
            if tail > 0 {
                libc::munmap((start + map_len) as *mut c_void, tail);
            }
            // Advice only: without THP the memory is pinned in 4 KiB pages.
            libc::madvise(start as *mut c_void, map_len, libc::MADV_HUGEPAGE);
        }
        // SAFETY: registers the live mapping [start, start + map_len), owned
        // by the returned buffer, which unregisters it before unmapping it.
        let r = unsafe {
            sys::cuMemHostRegister_v2(
                start as *mut c_void,
                map_len,
                sys::CU_MEMHOSTREGISTER_PORTABLE,
            )
        }
        .result();
        if let Err(e) = r {
            // SAFETY: the mapping is ours and was not registered.
            unsafe { libc::munmap(start as *mut c_void, map_len) };
            return Err(CudaError::driver(
                e,
                format!("cuMemHostRegister of {map_len} bytes"),
            ));
        }
        Ok(PinnedBuffer {
            ptr: NonNull::new(start as *mut u8)
                .ok_or_else(|| CudaError::Usage("mmap returned null".into()))?,
            len: bytes,
            gpu: self.clone(),
            event: None,
            mapped: Some(map_len),
        })
    }

    /// A new non-blocking stream (no implicit synchronisation with the legacy
    /// default stream).
    pub fn stream(&self) -> Result<Stream, CudaError> {
        let inner = self.ctx.new_stream().during("cuStreamCreate")?;
        Ok(Stream {
            inner,
            gpu: self.clone(),
        })
    }

    /// A new event. `timing: true` gives an event that can be passed to
    /// [`Event::elapsed_ms`] and whose `synchronize` spins (lowest latency);
    /// `false` gives a cheaper event whose `synchronize` yields the CPU
    /// (`CU_EVENT_BLOCKING_SYNC`), the kind the staging ring uses.
    pub fn event(&self, timing: bool) -> Result<Event, CudaError> {
        Event::new(self, timing)
    }
}

fn format_uuid(bytes: &[c_char; 16]) -> String {
    let b: Vec<u8> = bytes.iter().map(|&c| c as u8).collect();
    let hex = |r: Range<usize>| b[r].iter().map(|x| format!("{x:02x}")).collect::<String>();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        hex(0..4),
        hex(4..6),
        hex(6..8),
        hex(8..10),
        hex(10..16)
    )
}

/// "00000000:1B:00.0" or "0000:1b:00.0" → "0000:1b:00.0".
fn normalize_bus_id(raw: &str) -> String {
    let raw = raw.trim();
    let parts: Vec<&str> = raw.split(':').collect();
    if parts.len() == 3 {
        if let (Ok(dom), Ok(bus)) = (
            u32::from_str_radix(parts[0], 16),
            u32::from_str_radix(parts[1], 16),
        ) {
            if let Some((dev, func)) = parts[2].split_once('.') {
                if let (Ok(dev), Ok(func)) =
                    (u32::from_str_radix(dev, 16), u32::from_str_radix(func, 16))
                {
                    return format!("{dom:04x}:{bus:02x}:{dev:02x}.{func:x}");
                }
            }
        }
    }
    raw.to_ascii_lowercase()
}

/// "32.0 GT/s PCIe" → 5.
fn parse_link_gen(s: &str) -> Option<u8> {
    let gts: f64 = s.split_whitespace().next()?.parse().ok()?;
    let gen = match gts {
        x if (x - 2.5).abs() < 0.1 => 1,
        x if (x - 5.0).abs() < 0.1 => 2,
        x if (x - 8.0).abs() < 0.1 => 3,
        x if (x - 16.0).abs() < 0.1 => 4,
        x if (x - 32.0).abs() < 0.1 => 5,
        x if (x - 64.0).abs() < 0.1 => 6,
        _ => return None,
    };
    Some(gen)
}

/// Zeroes `len` bytes at `addr` (a fresh allocation nobody else can see yet),
/// with several threads when it is large.
fn zero_parallel(addr: usize, len: usize) {
    const PIECE: usize = 256 << 20;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 8)
        .min(len.div_ceil(PIECE));
    if threads <= 1 {
        // SAFETY: addr..addr+len is a live allocation owned by the caller and
        // not yet shared with anyone.
        unsafe { std::ptr::write_bytes(addr as *mut u8, 0, len) };
        return;
    }
    let per = len.div_ceil(threads);
    std::thread::scope(|s| {
        for i in 0..threads {
            let start = i * per;
            let n = per.min(len.saturating_sub(start));
            if n == 0 {
                continue;
            }
            s.spawn(move || {
                // SAFETY: [start, start+n) lies inside the allocation; the
                // threads' ranges are disjoint and the scope ends before the
                // caller uses the memory.
                unsafe { std::ptr::write_bytes((addr + start) as *mut u8, 0, n) };
            });
        }
    });
}

// ---------------------------------------------------------------------------
// Streams and events
// ---------------------------------------------------------------------------

/// A non-blocking CUDA stream. Cheap to clone (shared); `Send + Sync`.
#[derive(Debug, Clone)]
pub struct Stream {
    inner: Arc<CudaStream>,
    gpu: Gpu,
}

impl Stream {
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    fn raw(&self) -> sys::CUstream {
        self.inner.cu_stream()
    }

    /// The raw `CUstream`, for crates that queue work on this stream with
    /// their own driver or library calls (flash-kernels: kernel launches,
    /// cuBLAS). Valid while `self` or a clone of it lives; the stream belongs
    /// to [`Stream::gpu`]'s context and must never be destroyed by the
    /// caller. Getting it is safe; using it is the caller's `unsafe`.
    pub fn cu_stream(&self) -> sys::CUstream {
        self.raw()
    }

    /// Waits until all work queued on this stream has completed.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.inner.synchronize().during("cuStreamSynchronize")
    }

    /// Uploads from borrowed host memory, queued on this stream without
    /// waiting for each: `f` queues them with [`Uploads::copy`], and this
    /// returns only once the stream has finished every queued copy (also
    /// when `f` fails or panics), so the host memory, borrowed for the whole
    /// call, outlives them. From pinned memory (the daemon's host pool) the
    /// copies run at PCIe speed while kernels run on other streams.
    pub fn scoped_uploads<'env, R>(
        &self,
        f: impl for<'scope> FnOnce(&'scope Uploads<'scope, 'env>) -> Result<R, CudaError>,
    ) -> Result<R, CudaError> {
        /// Waits for the stream however the scope ends.
        struct Drain<'a>(&'a Stream);
        impl Drop for Drain<'_> {
            fn drop(&mut self) {
                if self.0.synchronize().is_err() && self.0.gpu.synchronize().is_err() {
                    // Neither the stream nor the context can say whether the
                    // DMA engine still reads memory this scope borrowed:
                    // returning would let it be reused under the copy.
                    eprintln!(
                        "flash: the CUDA context failed with uploads in flight from borrowed memory; aborting"
                    );
                    std::process::abort();
                }
            }
        }
        let uploads = Uploads {
            stream: self,
            _env: std::marker::PhantomData,
        };
        let drain = Drain(self);
        let r = f(&uploads);
        drop(drain);
        let synced = self.synchronize();
        r.and_then(|v| synced.map(|_| v))
    }

    /// Makes later work on this stream wait for `event` (on the GPU; the CPU
    /// does not block).
    pub fn wait_event(&self, event: &Event) -> Result<(), CudaError> {
        self.gpu.bind_to_thread()?;
        // SAFETY: both handles are live (owned by self and event).
        unsafe {
            result::stream::wait_event(
                self.raw(),
                event.raw,
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        }
        .during("cuStreamWaitEvent")
    }
}

/// Copies queued by [`Stream::scoped_uploads`]: host memory borrowed for
/// `'env`, which outlives the scope that waits for them.
pub struct Uploads<'scope, 'env> {
    stream: &'scope Stream,
    /// Invariant in `'env`: only memory borrowed from outside the scope.
    _env: std::marker::PhantomData<fn(&'env ()) -> &'env ()>,
}

impl<'env> Uploads<'_, 'env> {
    /// Queues the upload of `src` to `dst[dst_offset..]`.
    pub fn copy(
        &self,
        src: &'env [u8],
        dst: &DeviceMemory,
        dst_offset: usize,
    ) -> Result<(), CudaError> {
        check_range("upload destination", dst_offset, src.len(), dst.len)?;
        if dst.gpu != self.stream.gpu {
            return Err(CudaError::Usage(
                "an upload to memory of another GPU than its stream's".into(),
            ));
        }
        if src.is_empty() {
            return Ok(());
        }
        self.stream.gpu.bind_to_thread()?;
        // SAFETY: the destination lies in a live allocation (checked), kept
        // until the GPU is idle (DeviceMemory's drop synchronises); `src` is
        // borrowed for `'env`, longer than the scope, which waits for the
        // stream before it returns (or aborts if it cannot know).
        unsafe {
            sys::cuMemcpyHtoDAsync_v2(
                dst.ptr + dst_offset as u64,
                src.as_ptr() as *const c_void,
                src.len(),
                self.stream.raw(),
            )
        }
        .result()
        .during_with(|| format!("cuMemcpyHtoDAsync of {} bytes", src.len()))
    }
}

/// A CUDA event. `Send + Sync`.
#[derive(Debug)]
pub struct Event {
    raw: sys::CUevent,
    gpu: Gpu,
    timing: bool,
}

// SAFETY: a CUevent is a handle into the driver, whose API is thread-safe;
// the event is destroyed once, in Drop, with its context bound.
unsafe impl Send for Event {}
// SAFETY: as above; no method hands out interior references.
unsafe impl Sync for Event {}

impl Event {
    fn new(gpu: &Gpu, timing: bool) -> Result<Event, CudaError> {
        gpu.bind_to_thread()?;
        let flags = if timing {
            sys::CUevent_flags::CU_EVENT_DEFAULT as u32
        } else {
            sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC as u32
                | sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32
        };
        let mut raw = MaybeUninit::uninit();
        // SAFETY: writes one event handle through a valid pointer; the handle
        // is owned by the returned Event and destroyed once in its Drop.
        unsafe { sys::cuEventCreate(raw.as_mut_ptr(), flags) }
            .result()
            .during("cuEventCreate")?;
        Ok(Event {
            // SAFETY: initialised by the successful call above.
            raw: unsafe { raw.assume_init() },
            gpu: gpu.clone(),
            timing,
        })
    }

    /// Captures the work queued on `stream` so far.
    pub fn record(&self, stream: &Stream) -> Result<(), CudaError> {
        if stream.gpu != self.gpu {
            return Err(CudaError::Usage(format!(
                "event of GPU {} recorded on a stream of GPU {}",
                self.gpu.ordinal(),
                stream.gpu.ordinal()
            )));
        }
        self.gpu.bind_to_thread()?;
        // SAFETY: both handles are live and belong to the same context.
        unsafe { result::event::record(self.raw, stream.raw()) }.during("cuEventRecord")
    }

    /// Waits until the captured work has completed (immediately if the event
    /// was never recorded).
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.gpu.bind_to_thread()?;
        // SAFETY: the handle is live.
        unsafe { result::event::synchronize(self.raw) }.during("cuEventSynchronize")
    }

    /// Whether the captured work has completed, without waiting.
    pub fn is_complete(&self) -> Result<bool, CudaError> {
        self.gpu.bind_to_thread()?;
        // SAFETY: the handle is live.
        match unsafe { result::event::query(self.raw) } {
            Ok(()) => Ok(true),
            Err(DriverError(sys::CUresult::CUDA_ERROR_NOT_READY)) => Ok(false),
            Err(e) => Err(CudaError::driver(e, "cuEventQuery")),
        }
    }

    /// Milliseconds between `self` (start) and `end`, both recorded timing
    /// events of one GPU; waits for `end`.
    pub fn elapsed_ms(&self, end: &Event) -> Result<f32, CudaError> {
        if !self.timing || !end.timing {
            return Err(CudaError::Usage(
                "elapsed_ms needs events made with Gpu::event(true)".into(),
            ));
        }
        if self.gpu != end.gpu {
            return Err(CudaError::Usage("elapsed_ms across GPUs".into()));
        }
        end.synchronize()?;
        static HAS_V2: OnceLock<bool> = OnceLock::new();
        let v2 = *HAS_V2.get_or_init(|| has_symbol("cuEventElapsedTime_v2"));
        if v2 {
            // SAFETY: both handles are live events of the bound context.
            unsafe { result::event::elapsed(self.raw, end.raw) }.during("cuEventElapsedTime")
        } else {
            // Drivers before CUDA 12.8 have only the v1 entry point, which the
            // CUDA 13 bindings no longer declare: look it up by hand.
            type ElapsedV1 =
                unsafe extern "C" fn(*mut f32, sys::CUevent, sys::CUevent) -> sys::CUresult;
            let mut ms = 0f32;
            // SAFETY: the library is loaded (probe succeeded, since a Gpu
            // exists); a missing symbol is an error, not a call. The C
            // signature of cuEventElapsedTime is `CUresult (float*, CUevent, CUevent)`; it writes
            // one float through a valid pointer, and both events are live.
            unsafe {
                let f = sys::culib()
                    .get::<ElapsedV1>("cuEventElapsedTime")
                    .map_err(|e| CudaError::Usage(format!("cuEventElapsedTime: {e}")))?;
                f(&mut ms, self.raw, end.raw)
            }
            .result()
            .during("cuEventElapsedTime")?;
            Ok(ms)
        }
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        let _ = self.gpu.bind_to_thread();
        // SAFETY: the handle is live and destroyed exactly once; CUDA defers
        // the release of an event still pending.
        if let Err(e) = unsafe { result::event::destroy(self.raw) } {
            tracing::warn!("cuEventDestroy: {e}");
        }
    }
}

// ---------------------------------------------------------------------------
// Pinned host memory
// ---------------------------------------------------------------------------

/// The size [`Gpu::alloc`] asks the driver for: `bytes` rounded up to a
/// multiple of 2 MiB (the GPU's large page) from 2 MiB on. Why: measured on
/// an H200 (bench/results, attach-fixed), another process opened a 15.26
/// GiB export through CUDA IPC in 92-95 ms when it was allocated as asked
/// (not a multiple of 2 MiB) and in 0.45-0.50 ms rounded up, which is what
/// makes the daemon's share-mode attach of an 8B model take 1 ms, not 100.
fn alloc_size(bytes: usize) -> usize {
    const LARGE_PAGE: usize = 2 << 20;
    if bytes >= LARGE_PAGE {
        bytes.checked_next_multiple_of(LARGE_PAGE).unwrap_or(bytes)
    } else {
        bytes
    }
}

/// How [`Gpu::pinned`] gets page-locked memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinMethod {
    /// `cuMemHostAlloc` (portable), then zeroed.
    HostAlloc,
    /// An anonymous mapping advised to use transparent huge pages, pinned
    /// with `cuMemHostRegister` (portable).
    HugePages,
}

impl PinMethod {
    /// `$FLASH_PINNED` (`alloc` or `huge`), else [`PinMethod::HugePages`]:
    /// measured on an H200 host (bench/results, `probe` stage), a cold load
    /// of a Qwen3-0.6B-shaped checkpoint took 0.66-0.73 s with it and
    /// 0.91-1.05 s with `cuMemHostAlloc`, alternating in one run (pinning
    /// the staging buffers is on that path).
    pub fn current() -> PinMethod {
        static METHOD: OnceLock<PinMethod> = OnceLock::new();
        *METHOD.get_or_init(|| match std::env::var("FLASH_PINNED").as_deref() {
            Ok("alloc") => PinMethod::HostAlloc,
            Ok("huge") | Err(_) => PinMethod::HugePages,
            Ok(other) => {
                tracing::warn!("FLASH_PINNED={other:?}: expected alloc or huge; using huge");
                PinMethod::HugePages
            }
        })
    }
}

/// Page-locked host memory from `cuMemHostAlloc` or a registered mapping
/// (see [`PinMethod`]; portable to every context):
/// the staging buffer of uploads. Derefs to `[u8]`; `Send + Sync`.
///
/// Asynchronous copies take the buffer by value (see the module docs), so the
/// CPU can never touch it while a copy is in flight.
pub struct PinnedBuffer {
    ptr: NonNull<u8>,
    len: usize,
    gpu: Gpu,
    /// Completion event reused from one lending to the next.
    event: Option<Event>,
    /// `Some(length of the mapping)`: an mmap registered with
    /// `cuMemHostRegister` ([`PinMethod::HugePages`]); `None`: `cuMemHostAlloc`.
    mapped: Option<usize>,
}

// SAFETY: PinnedBuffer owns its allocation exclusively, like a Vec<u8>; the
// GPU can only reach it through an InFlight, which owns the buffer meanwhile.
unsafe impl Send for PinnedBuffer {}
// SAFETY: shared references only give out `&[u8]`.
unsafe impl Sync for PinnedBuffer {}

impl std::fmt::Debug for PinnedBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedBuffer")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .finish()
    }
}

impl PinnedBuffer {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Lends the buffer to the GPU for copies on `stream`; see [`InFlight`].
    pub fn lend(self, stream: &Stream) -> InFlight {
        InFlight {
            buf: Some(self),
            stream: stream.clone(),
            event: None,
            gpu_writes: false,
            broken: false,
            bytes: 0,
        }
    }
}

impl std::ops::Deref for PinnedBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised (zeroed at allocation)
        // bytes while self lives, and no copy is in flight (an InFlight would
        // own self). For len 0 the pointer is dangling but aligned.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for PinnedBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in Deref; &mut self is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        let _ = self.gpu.bind_to_thread();
        if let Some(map_len) = self.mapped {
            // SAFETY: ptr is the start of a mapping of map_len bytes that
            // was registered once and is unregistered, then unmapped, exactly
            // once here; no copy is in flight (as below).
            unsafe {
                if let Err(e) = sys::cuMemHostUnregister(self.ptr.as_ptr() as *mut c_void).result()
                {
                    tracing::warn!("cuMemHostUnregister: {e}");
                }
                libc::munmap(self.ptr.as_ptr() as *mut c_void, map_len);
            }
            return;
        }
        // SAFETY: ptr came from cuMemHostAlloc and is freed exactly once; no
        // copy is in flight (an InFlight would own self, and it gives the
        // buffer back only after its event completed).
        if let Err(e) = unsafe { result::free_host(self.ptr.as_ptr() as *mut c_void) } {
            tracing::warn!("cuMemFreeHost: {e}");
        }
    }
}

/// A pinned buffer lent to the GPU: the copies enqueued from or into it on one
/// stream, and the event that says they ended. Gives the buffer back through
/// [`InFlight::wait`] / [`InFlight::try_take`]; dropping it waits.
pub struct InFlight {
    buf: Option<PinnedBuffer>,
    stream: Stream,
    /// Recorded on `stream` after the last enqueued copy.
    event: Option<Event>,
    /// A device-to-host copy into the buffer is queued.
    gpu_writes: bool,
    /// A copy was enqueued but no event covers it and the stream could not
    /// be synchronised: the buffer can never be proven idle and is leaked.
    broken: bool,
    bytes: usize,
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlight")
            .field("bytes", &self.bytes)
            .field("gpu_writes", &self.gpu_writes)
            .finish()
    }
}

impl InFlight {
    fn buf(&self) -> &PinnedBuffer {
        self.buf
            .as_ref()
            .expect("InFlight holds its buffer until consumed")
    }

    /// Bytes enqueued so far.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The buffer's length.
    pub fn len(&self) -> usize {
        self.buf().len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf().is_empty()
    }

    /// Read access while only uploads are queued (the GPU only reads then);
    /// None while a download into the buffer may be running.
    pub fn peek(&self) -> Option<&[u8]> {
        if self.gpu_writes {
            None
        } else {
            Some(self.buf())
        }
    }

    fn event(&mut self) -> Result<&Event, CudaError> {
        if self.event.is_none() {
            let gpu = &self.stream.gpu;
            let buf = self.buf.as_mut().expect("buffer present");
            let ev = match buf.event.take() {
                Some(e) if &e.gpu == gpu => e,
                _ => Event::new(gpu, false)?,
            };
            self.event = Some(ev);
        }
        Ok(self.event.as_ref().expect("just set"))
    }

    /// After a successful enqueue: move the event past it. If that fails, the
    /// copy is not covered; synchronise the stream instead, or give up on the
    /// buffer.
    fn cover(&mut self) -> Result<(), CudaError> {
        let stream = self.stream.clone();
        let r = self
            .event
            .as_ref()
            .expect("created before enqueue")
            .record(&stream);
        if let Err(e) = r {
            if stream.synchronize().is_err() {
                self.broken = true;
            }
            return Err(e);
        }
        Ok(())
    }

    /// Enqueues an upload of `buf[src_range]` to `dst[dst_offset..]`.
    /// `dst` must be memory of the stream's GPU. Bounds are checked.
    pub fn copy_to_device(
        &mut self,
        src_range: Range<usize>,
        dst: &DeviceMemory,
        dst_offset: usize,
    ) -> Result<(), CudaError> {
        check_host_range("upload source", &src_range, self.buf().len())?;
        let n = src_range.end - src_range.start;
        check_range("upload destination", dst_offset, n, dst.len)?;
        if dst.gpu != self.stream.gpu {
            return Err(CudaError::Usage(format!(
                "upload to GPU {} on a stream of GPU {}",
                dst.gpu.ordinal(),
                self.stream.gpu.ordinal()
            )));
        }
        if n == 0 {
            return Ok(());
        }
        self.event()?;
        self.stream.gpu.bind_to_thread()?;
        let src = self.buf().as_ptr() as usize + src_range.start;
        // SAFETY: src..src+n lies in the pinned buffer (checked), which this
        // token owns until the event recorded after this copy completes (or
        // leaks it); dst.ptr+dst_offset..+n lies in a live allocation
        // (checked), which stays allocated until the GPU is idle (its Drop
        // synchronises). The stream is live (held by self).
        unsafe {
            sys::cuMemcpyHtoDAsync_v2(
                dst.ptr + dst_offset as u64,
                src as *const c_void,
                n,
                self.stream.raw(),
            )
        }
        .result()
        .during_with(|| format!("cuMemcpyHtoDAsync of {n} bytes"))?;
        self.bytes += n;
        self.cover()
    }

    /// Enqueues a download of `src[src_offset..]` into `buf[dst_range]`.
    /// While it may run, [`InFlight::peek`] returns None.
    pub fn copy_from_device(
        &mut self,
        src: &DeviceMemory,
        src_offset: usize,
        dst_range: Range<usize>,
    ) -> Result<(), CudaError> {
        check_host_range("download destination", &dst_range, self.buf().len())?;
        let n = dst_range.end - dst_range.start;
        check_range("download source", src_offset, n, src.len)?;
        if src.gpu != self.stream.gpu {
            return Err(CudaError::Usage(format!(
                "download from GPU {} on a stream of GPU {}",
                src.gpu.ordinal(),
                self.stream.gpu.ordinal()
            )));
        }
        if n == 0 {
            return Ok(());
        }
        self.event()?;
        self.stream.gpu.bind_to_thread()?;
        let dst = self.buf().as_ptr() as usize + dst_range.start;
        // Set before the enqueue: from here on the CPU must not read.
        self.gpu_writes = true;
        // SAFETY: as in copy_to_device, with the roles swapped: the token
        // owns the buffer and hands out no reference to it (peek refuses)
        // until the copy is known to have ended.
        unsafe {
            sys::cuMemcpyDtoHAsync_v2(
                dst as *mut c_void,
                src.ptr + src_offset as u64,
                n,
                self.stream.raw(),
            )
        }
        .result()
        .during_with(|| format!("cuMemcpyDtoHAsync of {n} bytes"))?;
        self.bytes += n;
        self.cover()
    }

    /// Whether every enqueued copy has ended.
    pub fn is_complete(&self) -> Result<bool, CudaError> {
        if self.broken {
            return Ok(false);
        }
        match &self.event {
            None => Ok(true),
            Some(e) => e.is_complete(),
        }
    }

    /// Gives the buffer back if every copy has ended, else the token.
    pub fn try_take(self) -> Result<Result<PinnedBuffer, InFlight>, CudaError> {
        if self.is_complete()? {
            self.wait().map(Ok)
        } else {
            Ok(Err(self))
        }
    }

    /// Waits for every enqueued copy and gives the buffer back. On error the
    /// buffer's state is unknown and it is leaked, never freed or reused.
    pub fn wait(mut self) -> Result<PinnedBuffer, CudaError> {
        self.finish()
    }

    fn finish(&mut self) -> Result<PinnedBuffer, CudaError> {
        if self.broken {
            if let Some(b) = self.buf.take() {
                std::mem::forget(b);
            }
            return Err(CudaError::Usage(
                "a copy from this staging buffer could not be tracked; the buffer was leaked"
                    .into(),
            ));
        }
        if let Some(ev) = &self.event {
            if let Err(e) = ev.synchronize() {
                if let Some(b) = self.buf.take() {
                    std::mem::forget(b);
                }
                return Err(e);
            }
        }
        let mut buf = self.buf.take().expect("buffer present");
        buf.event = self.event.take();
        Ok(buf)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.buf.is_some() {
            if let Err(e) = self.finish() {
                tracing::error!("waiting for a staging buffer's copies: {e}");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Device memory
// ---------------------------------------------------------------------------

/// The 64 opaque bytes of a `CUipcMemHandle`.
pub type IpcHandle = [u8; 64];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Owned,
    Ipc,
}

/// A range of device memory: an allocation of this process (`cuMemAlloc`,
/// freed on drop) or a mapping of another's (`cuIpcOpenMemHandle`, closed on
/// drop). `Send + Sync`.
#[derive(Debug)]
pub struct DeviceMemory {
    gpu: Gpu,
    ptr: sys::CUdeviceptr,
    len: usize,
    origin: Origin,
}

impl DeviceMemory {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// The device address (for kernels, DLPack). Valid while `self` lives.
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }

    /// Whether this maps another process's memory.
    pub fn is_ipc(&self) -> bool {
        self.origin == Origin::Ipc
    }

    /// Enqueues an upload of `src[src_range]` to `self[dst_offset..]` on
    /// `stream`; the buffer travels inside the returned token until the copy
    /// ends. More copies from the same buffer: [`InFlight::copy_to_device`].
    /// On error the buffer is dropped (after any queued copy ended); use
    /// [`PinnedBuffer::lend`] + [`InFlight::copy_to_device`] to keep it.
    pub fn copy_from_host_async(
        &self,
        dst_offset: usize,
        src: PinnedBuffer,
        src_range: Range<usize>,
        stream: &Stream,
    ) -> Result<InFlight, CudaError> {
        let mut t = src.lend(stream);
        t.copy_to_device(src_range, self, dst_offset)?;
        Ok(t)
    }

    /// Synchronous upload from any host memory (pageable or pinned), after
    /// all queued work on this GPU.
    pub fn copy_from_host(&self, dst_offset: usize, src: &[u8]) -> Result<(), CudaError> {
        // SAFETY: `ptr..ptr + len` is this live allocation of `gpu`.
        unsafe {
            upload_sync(
                &self.gpu,
                self.ptr,
                self.len,
                dst_offset,
                src,
                "device memory",
            )
        }
    }

    /// Synchronous download into any host memory, after all queued work on
    /// this GPU.
    pub fn copy_to_host(&self, offset: usize, dst: &mut [u8]) -> Result<(), CudaError> {
        // SAFETY: `ptr..ptr + len` is this live allocation of `gpu`.
        unsafe { download_sync(&self.gpu, self.ptr, self.len, offset, dst, "device memory") }
    }

    /// Enqueues a device-to-device copy of `self[src_offset..+len]` to
    /// `dst[dst_offset..]` on `stream`, which must belong to the GPU of
    /// `self` or of `dst` (copies between GPUs go through `cuMemcpyPeerAsync`).
    pub fn copy_to_device(
        &self,
        src_offset: usize,
        dst: &DeviceMemory,
        dst_offset: usize,
        len: usize,
        stream: &Stream,
    ) -> Result<(), CudaError> {
        check_range("device copy source", src_offset, len, self.len)?;
        check_range("device copy destination", dst_offset, len, dst.len)?;
        if stream.gpu != self.gpu && stream.gpu != dst.gpu {
            return Err(CudaError::Usage(
                "device copy on a stream of a third GPU".into(),
            ));
        }
        if len == 0 {
            return Ok(());
        }
        stream.gpu.bind_to_thread()?;
        let (s, d) = (self.ptr + src_offset as u64, dst.ptr + dst_offset as u64);
        if self.gpu == dst.gpu {
            // SAFETY: both ranges lie in live allocations (checked), which
            // stay allocated until the GPU is idle (their Drop synchronises).
            unsafe { result::memcpy_dtod_async(d, s, len, stream.raw()) }
                .during_with(|| format!("cuMemcpyDtoDAsync of {len} bytes"))
        } else {
            // SAFETY: as above; both contexts are live (held by the Gpus).
            unsafe {
                result::memcpy_peer_async(
                    dst.gpu.ctx.cu_ctx(),
                    d,
                    self.gpu.ctx.cu_ctx(),
                    s,
                    len,
                    stream.raw(),
                )
            }
            .during_with(|| format!("cuMemcpyPeerAsync of {len} bytes"))
        }
    }

    /// Sets every byte to `value`, after all queued work on this GPU.
    pub fn fill(&self, value: u8) -> Result<(), CudaError> {
        if self.len == 0 {
            return Ok(());
        }
        self.gpu.synchronize()?;
        // SAFETY: the whole live allocation is written; nothing on the host
        // is touched.
        unsafe { result::memset_d8_sync(self.ptr, value, self.len) }.during("cuMemsetD8")?;
        self.gpu.synchronize()
    }

    /// The CUDA IPC handle of this allocation, for another process to map
    /// with [`Gpu::open_ipc`]. The allocation must outlive the other
    /// process's use of it.
    pub fn ipc_handle(&self) -> Result<IpcHandle, CudaError> {
        if self.len == 0 {
            return Err(CudaError::Usage(
                "no IPC handle for an empty allocation".into(),
            ));
        }
        self.gpu.bind_to_thread()?;
        let mut h = MaybeUninit::<sys::CUipcMemHandle>::uninit();
        // SAFETY: writes one 64-byte handle through a valid pointer; ptr is
        // the base of a live cuMemAlloc allocation of the bound context.
        unsafe { sys::cuIpcGetMemHandle(h.as_mut_ptr(), self.ptr) }
            .result()
            .during("cuIpcGetMemHandle")?;
        // SAFETY: initialised by the successful call above.
        let h = unsafe { h.assume_init() };
        let mut out = [0u8; 64];
        for (d, s) in out.iter_mut().zip(h.reserved.iter()) {
            *d = *s as u8;
        }
        Ok(out)
    }
}

impl Drop for DeviceMemory {
    fn drop(&mut self) {
        if self.len == 0 && self.ptr == 0 {
            return;
        }
        // Copies into this memory may still be queued on some stream: wait
        // for the whole context before giving the memory back.
        if let Err(e) = self.gpu.synchronize() {
            tracing::warn!("before freeing device memory: {e}");
        }
        let r = match self.origin {
            // SAFETY: ptr came from cuMemAlloc and is freed exactly once, with
            // no work left on the context.
            Origin::Owned => unsafe { result::free_sync(self.ptr) },
            // SAFETY: ptr came from cuIpcOpenMemHandle and is closed exactly once.
            Origin::Ipc => unsafe { sys::cuIpcCloseMemHandle(self.ptr) }.result(),
        };
        if let Err(e) = r {
            tracing::warn!("freeing device memory: {e}");
        }
    }
}

// ---------------------------------------------------------------------------
// Measuring
// ---------------------------------------------------------------------------

/// Which way [`timed_pinned_copies`] moves bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    HostToDevice,
    DeviceToHost,
}

/// Copies every buffer of `bufs` to (or fills it from) consecutive ranges of
/// `mem`, buffer `i` on `streams[i % streams.len()]`, in pieces of `piece`
/// bytes, and returns the wall time from the first enqueue until the last
/// copy ended, with the buffers. The bandwidth probe of `flash doctor` and
/// the smoke test.
pub fn timed_pinned_copies(
    direction: Direction,
    mem: &DeviceMemory,
    bufs: Vec<PinnedBuffer>,
    streams: &[Stream],
    piece: usize,
) -> Result<(std::time::Duration, Vec<PinnedBuffer>), CudaError> {
    if streams.is_empty() || piece == 0 {
        return Err(CudaError::Usage(
            "timed_pinned_copies needs streams and a piece size".into(),
        ));
    }
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    check_range("timed copies", 0, total, mem.len())?;
    mem.gpu().synchronize()?;
    let start = std::time::Instant::now();
    let mut tokens = Vec::with_capacity(bufs.len());
    let mut offset = 0usize;
    for (i, buf) in bufs.into_iter().enumerate() {
        let len = buf.len();
        let mut t = buf.lend(&streams[i % streams.len()]);
        let mut at = 0usize;
        while at < len {
            let n = piece.min(len - at);
            match direction {
                Direction::HostToDevice => t.copy_to_device(at..at + n, mem, offset + at)?,
                Direction::DeviceToHost => t.copy_from_device(mem, offset + at, at..at + n)?,
            }
            at += n;
        }
        offset += len;
        tokens.push(t);
    }
    let mut back = Vec::with_capacity(tokens.len());
    for t in tokens {
        back.push(t.wait()?);
    }
    Ok((start.elapsed(), back))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_never_panics_and_is_cached() {
        let a = probe();
        let b = probe();
        assert_eq!(a, b);
        match a {
            Ok(c) => {
                assert!(c.device_count() > 0);
                assert!(c.api_version() >= 11000);
            }
            Err(reason) => assert!(!reason.to_string().is_empty()),
        }
    }

    #[test]
    fn handles_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Cuda>();
        check::<Gpu>();
        check::<Stream>();
        check::<Event>();
        check::<PinnedBuffer>();
        check::<InFlight>();
        check::<DeviceMemory>();
        check::<CudaError>();
        check::<CudaUnavailable>();
    }

    #[test]
    fn bus_id_normalisation() {
        assert_eq!(normalize_bus_id("00000000:1B:00.0"), "0000:1b:00.0");
        assert_eq!(normalize_bus_id("0000:01:00.0\n"), "0000:01:00.0");
        assert_eq!(normalize_bus_id("weird"), "weird");
    }

    #[test]
    fn link_speed_parsing() {
        assert_eq!(parse_link_gen("32.0 GT/s PCIe\n"), Some(5));
        assert_eq!(parse_link_gen("16.0 GT/s PCIe"), Some(4));
        assert_eq!(parse_link_gen("8.0 GT/s PCIe"), Some(3));
        assert_eq!(parse_link_gen("2.5 GT/s"), Some(1));
        assert_eq!(parse_link_gen("Unknown"), None);
        let mut info = GpuInfo {
            ordinal: 0,
            name: String::new(),
            uuid: String::new(),
            total_bytes: 0,
            free_bytes: 0,
            compute_capability: (9, 0),
            pci_bus_id: String::new(),
            pcie_link_gen: Some(5),
            pcie_link_width: Some(16),
        };
        let gbps = info.pcie_link_gbps().unwrap();
        assert!((gbps - 63.0).abs() < 0.1, "{gbps}");
        info.pcie_link_width = None;
        assert_eq!(info.pcie_link_gbps(), None);
    }

    #[test]
    fn driver_version_parsing() {
        let s = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release Build  (dvs-builder@U22)  Thu\nGCC version:  gcc version 12\n";
        assert_eq!(parse_proc_driver_version(s).as_deref(), Some("580.159.04"));
        let s = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n";
        assert_eq!(parse_proc_driver_version(s).as_deref(), Some("550.54.15"));
        assert_eq!(parse_proc_driver_version("garbage"), None);
    }

    #[test]
    fn uuid_format() {
        let mut b = [0 as c_char; 16];
        for (i, x) in b.iter_mut().enumerate() {
            *x = (i as u8 * 17) as c_char;
        }
        assert_eq!(format_uuid(&b), "GPU-00112233-4455-6677-8899-aabbccddeeff");
    }

    #[test]
    fn ranges() {
        assert!(check_range("t", 0, 10, 10).is_ok());
        assert!(check_range("t", 1, 10, 10).is_err());
        assert!(check_range("t", usize::MAX, 2, 10).is_err());
        assert!(check_host_range("t", &Range { start: 3, end: 2 }, 10).is_err());
        assert!(check_host_range("t", &(2..10), 10).is_ok());
    }

    #[test]
    fn zeroing_in_pieces() {
        let mut v = vec![0xAAu8; (600 << 20) + 3];
        zero_parallel(v.as_mut_ptr() as usize, v.len());
        assert!(v.iter().all(|&b| b == 0));
    }

    /// Runs only where a GPU is present (the device machine).
    #[test]
    fn gpu_round_trip_when_present() {
        let Ok(cuda) = probe() else { return };
        let gpu = cuda.device(0).unwrap();
        let info = gpu.info().unwrap();
        assert!(info.total_bytes > 0);
        let mem = gpu.alloc(1 << 20).unwrap();
        let stream = gpu.stream().unwrap();
        let mut buf = gpu.pinned(1 << 20).unwrap();
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i * 7 % 251) as u8;
        }
        let expect = buf.to_vec();
        let mut t = mem
            .copy_from_host_async(0, buf, 0..(1 << 19), &stream)
            .unwrap();
        t.copy_to_device((1 << 19)..(1 << 20), &mem, 1 << 19)
            .unwrap();
        assert!(t.copy_to_device(0..1, &mem, 1 << 20).is_err());
        let buf = t.wait().unwrap();
        let mut back = vec![0u8; 1 << 20];
        mem.copy_to_host(0, &mut back).unwrap();
        assert_eq!(back, expect);
        let mut t = buf.lend(&stream);
        t.copy_from_device(&mem, 0, 0..(1 << 20)).unwrap();
        assert!(t.peek().is_none());
        let buf = t.wait().unwrap();
        assert_eq!(&buf[..], &expect[..]);
        assert!(mem.ipc_handle().is_ok());
    }
}
