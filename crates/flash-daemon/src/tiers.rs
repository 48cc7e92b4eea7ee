//! The daemon's tiers: memory for each tier and the byte movers between
//! them, plugged into `flash-tier`'s [`TierManager`].
//!
//! - [`HostMemory`] allocates the memory tier's model images ([`HostImage`]):
//!   ranges of one host pool made at start (shared memory that clients can
//!   map; pinned once on GPU machines, so that memory → GPU copies run at
//!   PCIe speed and no load pins), or page-aligned anonymous maps without a
//!   pool.
//! - [`GpuMemory`] allocates one GPU's images with `cuMemAlloc` (shareable
//!   with clients through CUDA IPC later).
//! - [`StoreTransfers`] sizes and moves the models of a [`Store`]: disk →
//!   memory and disk → GPU with the `flash-load` pipeline, memory → GPU with
//!   one synchronous upload. A model's [`LoadPlan`] is made once and cached:
//!   its image has the same layout in every tier, so the plan's tensor views
//!   ([`StoreTransfers::tensors`]) locate the tensors in any copy.
//! - [`build_tiers`] probes CUDA and builds the manager: the memory tier and
//!   one GPU tier per device (budget = `gpu_mem_util` × its memory).
//!
//! Threads: the manager calls everything here on the requesting thread
//! without its lock held; [`StoreTransfers`] has one lock of its own, for the
//! plan cache, held only to look up or insert (planning reads the model's
//! manifest outside it).

use flash_kernels::decode::GpuDecoder;
use flash_load::gpu::{check_decode_status, decode_status, upload_image, GpuDecode};
use flash_load::{execute, CudaSink, HostSink, LoadOptions, LoadPlan, ModelSource, TensorView};
use flash_store::{RankedName, Store, StoreError};
use flash_sys::cuda::{self, Cuda, CudaError, DeviceMemory, Gpu};
use flash_sys::os::AlignedBuf;
use flash_sys::shm::{HostPool, PoolSlice};
use flash_tier::{
    GpuBuf, MemoryBuf, ModelId, Tier, TierBackend, TierError, TierManager, Transfers,
};
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The tier manager of the daemon.
pub type Tiers = TierManager<StoreTransfers>;

// ---------------------------------------------------------------------------
// Memory tier
// ---------------------------------------------------------------------------

/// A model image in the memory tier. Derefs to its bytes; tensors lie at the
/// offsets of the model's plan ([`StoreTransfers::tensors`]).
pub enum HostImage {
    /// Page-aligned anonymous memory of its own (no pool: tests, tools).
    Aligned(AlignedBuf),
    /// A range of the daemon's host pool: shared memory that clients can map
    /// (share mode), pinned once at start on GPU machines.
    Pooled(PoolSlice),
}

impl HostImage {
    /// Whether the DMA engine can read it directly (uploads at PCIe speed).
    pub fn is_pinned(&self) -> bool {
        match self {
            HostImage::Aligned(_) => false,
            HostImage::Pooled(s) => s.is_pinned(),
        }
    }

    /// The shared-memory file holding the image and its offset there, when
    /// clients can map it.
    pub fn shared_location(&self) -> Option<(&Path, u64)> {
        match self {
            HostImage::Aligned(_) => None,
            HostImage::Pooled(s) => s.path().map(|p| (p, s.offset() as u64)),
        }
    }
}

impl std::ops::Deref for HostImage {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            HostImage::Aligned(b) => b,
            HostImage::Pooled(b) => b,
        }
    }
}

impl std::ops::DerefMut for HostImage {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            HostImage::Aligned(b) => b,
            HostImage::Pooled(b) => b,
        }
    }
}

impl fmt::Debug for HostImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self {
            HostImage::Aligned(_) => "aligned",
            HostImage::Pooled(s) if s.is_pinned() => "pooled, pinned",
            HostImage::Pooled(_) => "pooled",
        };
        write!(f, "HostImage({kind}, {} bytes)", self.len())
    }
}

/// The memory tier's [`TierBackend`].
///
/// The daemon gives it a [`HostPool`] made at start: one region of shared
/// memory the size of the tier's budget, pinned once when there is a GPU
/// (pinning runs at about 2 GB/s, so it never happens on a load path).
/// Images are ranges of the pool; a pool too fragmented for an image returns
/// [`TierError::OutOfMemory`], and the manager evicts and tries again.
/// Without a pool (tests, tools), each image is its own aligned map.
#[derive(Debug, Clone)]
pub struct HostMemory {
    pool: Option<HostPool>,
}

impl HostMemory {
    /// Page-aligned, unpinned images, each its own map.
    pub fn aligned() -> Self {
        HostMemory { pool: None }
    }

    /// Images carved from `pool`.
    pub fn pooled(pool: HostPool) -> Self {
        HostMemory { pool: Some(pool) }
    }

    pub fn pool(&self) -> Option<&HostPool> {
        self.pool.as_ref()
    }

    pub fn is_pinned(&self) -> bool {
        self.pool.as_ref().is_some_and(|p| p.is_pinned())
    }

    /// Whether clients can map the images (a pool in a shared file).
    pub fn is_shareable(&self) -> bool {
        self.pool.as_ref().is_some_and(|p| p.path().is_some())
    }
}

fn host_len(bytes: u64) -> Result<usize, TierError> {
    usize::try_from(bytes)
        .map_err(|_| TierError::out_of_memory(format!("{bytes} bytes exceed the address space")))
}

impl TierBackend for HostMemory {
    type Buf = HostImage;

    fn alloc(&self, bytes: u64) -> Result<HostImage, TierError> {
        let len = host_len(bytes)?;
        match &self.pool {
            Some(pool) => match pool.alloc(len) {
                Ok(Some(s)) => Ok(HostImage::Pooled(s)),
                Ok(None) => Err(TierError::out_of_memory(format!(
                    "no free range of {bytes} bytes in the host pool (largest free: {} bytes)",
                    pool.largest_free()
                ))),
                Err(e) => Err(TierError::out_of_memory(format!(
                    "shared memory for {bytes} bytes: {e}"
                ))),
            },
            None => AlignedBuf::new(len).map(HostImage::Aligned).map_err(|e| {
                if e.kind() == io::ErrorKind::OutOfMemory {
                    TierError::out_of_memory(e.to_string())
                } else {
                    TierError::backend(e.to_string())
                }
            }),
        }
    }
}

// ---------------------------------------------------------------------------
// GPU tiers
// ---------------------------------------------------------------------------

/// One GPU's [`TierBackend`]: each image is one `cuMemAlloc` allocation
/// (never the stream-ordered pool, so that it can be shared through CUDA
/// IPC). Dropping an image synchronises the GPU's context before freeing it.
#[derive(Debug, Clone)]
pub struct GpuMemory {
    gpu: Gpu,
}

impl GpuMemory {
    pub fn new(gpu: Gpu) -> Self {
        GpuMemory { gpu }
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }
}

impl TierBackend for GpuMemory {
    type Buf = DeviceMemory;

    fn alloc(&self, bytes: u64) -> Result<DeviceMemory, TierError> {
        let len = host_len(bytes)?;
        self.gpu.alloc(len).map_err(|e| {
            let msg = format!("GPU {}: {e}", self.gpu.ordinal());
            if e.is_out_of_memory() {
                TierError::out_of_memory(msg)
            } else {
                TierError::backend(msg)
            }
        })
    }
}

// ---------------------------------------------------------------------------
// Transfers
// ---------------------------------------------------------------------------

/// Sizes and moves the models of a [`Store`]; a model's id is its store name
/// (`org/name[:revision]`).
///
/// Plans are cached per model. A cached plan is checked against the sizes of
/// its files before each use and made again when they changed; the daemon
/// should still call [`StoreTransfers::forget`] after it removes or
/// re-imports a model (and unload that model's copies, which hold the old
/// bytes).
pub struct StoreTransfers {
    store: Store,
    opts: LoadOptions,
    plans: Mutex<HashMap<ModelId, Arc<LoadPlan>>>,
    /// The GPU decoder of compressed models, per GPU ordinal: loaded once
    /// (from the kernel cache, or compiled) by [`StoreTransfers::decoder`],
    /// which the daemon calls at start in the background; `None` inside
    /// when it cannot be had (compressed models then decode on the CPU).
    decoders: Mutex<HashMap<usize, Arc<std::sync::OnceLock<Option<GpuDecoder>>>>>,
}

impl fmt::Debug for StoreTransfers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreTransfers")
            .field("store", &self.store.root())
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl StoreTransfers {
    /// Loads use `opts` (reader threads, chunk size, I/O mode, staging size).
    pub fn new(store: Store, opts: LoadOptions) -> Self {
        StoreTransfers {
            store,
            opts,
            plans: Mutex::new(HashMap::new()),
            decoders: Mutex::new(HashMap::new()),
        }
    }

    /// The GPU decoder on `gpu`, loaded on first use.
    pub fn decoder(&self, gpu: &Gpu) -> Arc<std::sync::OnceLock<Option<GpuDecoder>>> {
        let cell = self
            .decoders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(gpu.ordinal())
            .or_default()
            .clone();
        cell.get_or_init(|| {
            let cache = flash_kernels::default_kernel_cache(Some(self.store.root()));
            match GpuDecoder::load(gpu, cache.as_deref()) {
                Ok(d) => Some(d),
                Err(e) => {
                    tracing::warn!(
                        gpu = gpu.ordinal(),
                        "no GPU decoder ({e}): compressed models decode on the CPU"
                    );
                    None
                }
            }
        });
        cell
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn options(&self) -> &LoadOptions {
        &self.opts
    }

    /// The load plan of `model` (every tensor), made on first use and cached.
    pub fn plan(&self, model: &ModelId) -> Result<Arc<LoadPlan>, TierError> {
        if let Some(plan) = self.cached(model) {
            if files_unchanged(&plan) {
                return Ok(plan);
            }
            tracing::info!(%model, "the model's files changed in the store: planning again");
        }
        let plan = Arc::new(self.make_plan(model)?);
        let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        plans.insert(model.clone(), plan.clone());
        Ok(plan)
    }

    /// The tensors of `model` as they lie in its decoded image: a GPU
    /// copy, or the memory copy of a model that is not compressed (a
    /// compressed one keeps its stored bytes there; see
    /// [`flash_load::decode::decode_range`]).
    pub fn tensors(&self, model: &ModelId) -> Result<Vec<TensorView>, TierError> {
        Ok(self.plan(model)?.tensors.clone())
    }

    /// Whether `model` is stored compressed (its memory copy then holds the
    /// stored bytes, smaller than its decoded image).
    pub fn is_compressed(&self, model: &ModelId) -> Result<bool, TierError> {
        Ok(self.plan(model)?.is_encoded())
    }

    /// The bytes of the decoded image: the layout tensor views and copy-mode
    /// regions refer to.
    pub fn decoded_bytes(&self, model: &ModelId) -> Result<u64, TierError> {
        Ok(self.plan(model)?.dest_len)
    }

    /// Drops the cached plan of `model` (after `rm` or a forced re-import).
    pub fn forget(&self, model: &ModelId) {
        self.plans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(model);
    }

    fn cached(&self, model: &ModelId) -> Option<Arc<LoadPlan>> {
        self.plans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(model)
            .cloned()
    }

    fn make_plan(&self, model: &ModelId) -> Result<LoadPlan, TierError> {
        let ranked: RankedName =
            model
                .as_str()
                .parse()
                .map_err(|e: flash_store::name::NameError| {
                    TierError::model(model, format!("not a model name: {}", e.why))
                })?;
        let dir = self.store.existing(&ranked.name).map_err(|e| match e {
            StoreError::NotFound(_) => {
                TierError::model(model, "not in the store (see `flash list`)")
            }
            e => TierError::model(model, e.to_string()),
        })?;
        // A rank of a split model is its own image: that rank's tensors,
        // with their shard shapes.
        let source = match ranked.rank {
            Some(rank) => ModelSource::open_rank(&dir, rank),
            None => ModelSource::open(&dir),
        }
        .map_err(|e| TierError::model(model, format!("cannot open it: {e}")))?;
        LoadPlan::new(&source, None)
            .map_err(|e| TierError::model(model, format!("cannot plan its load: {e}")))
    }
}

/// A test hook: `FLASH_TEST_LOAD_DELAY_MS` makes every disk → memory load
/// wait that long first, so that tests can kill the daemon mid-load.
fn test_delay() {
    if let Some(ms) = std::env::var("FLASH_TEST_LOAD_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// Whether every file of `plan` still has the size it was planned with.
fn files_unchanged(plan: &LoadPlan) -> bool {
    plan.files
        .iter()
        .all(|f| std::fs::metadata(&f.path).is_ok_and(|m| m.len() == f.len))
}

fn fits(what: &str, have: usize, need: u64) -> Result<(), TierError> {
    if (have as u64) < need {
        return Err(TierError::backend(format!(
            "{what} of {have} bytes is smaller than the model's image of {need} bytes"
        )));
    }
    Ok(())
}

impl Transfers for StoreTransfers {
    type Memory = HostMemory;
    type Gpu = GpuMemory;

    fn image_bytes(&self, model: &ModelId, tier: Tier) -> Result<u64, TierError> {
        let plan = self.plan(model)?;
        Ok(match tier {
            // A compressed model stays compressed in memory.
            Tier::Memory => plan.image_len,
            Tier::Gpu(_) | Tier::Disk => plan.dest_len,
        })
    }

    fn disk_to_memory(&self, model: &ModelId, dst: &mut MemoryBuf<Self>) -> Result<(), TierError> {
        let plan = self.plan(model)?;
        test_delay();
        fits("the host buffer", dst.len(), plan.image_len)?;
        let stats = execute(
            &plan.stored_image(),
            &HostSink::new(&mut dst[..]),
            &self.opts,
        )
        .map_err(|e| TierError::backend(e.to_string()))?;
        tracing::debug!(
            %model,
            bytes = stats.bytes_read,
            seconds = stats.seconds,
            "disk -> memory"
        );
        Ok(())
    }

    fn memory_to_gpu(
        &self,
        model: &ModelId,
        src: &MemoryBuf<Self>,
        gpu: u16,
        dst: &mut GpuBuf<Self>,
    ) -> Result<(), TierError> {
        let plan = self.plan(model)?;
        fits("the device buffer", dst.len(), plan.dest_len)?;
        // Returns once the bytes are on the device, as the trait requires
        // (`src` may be evicted right after). From pinned memory it runs at
        // PCIe speed; a compressed model is decoded on the GPU as it lands.
        let decoder = match plan.is_encoded() {
            true => Some(self.decoder(dst.gpu())),
            false => None,
        };
        let decoder = decoder
            .as_ref()
            .and_then(|d| d.get())
            .and_then(Option::as_ref);
        upload_image(&plan, &src[..plan.image_len as usize], dst, decoder)
            .map_err(|e| TierError::backend(format!("upload to GPU {gpu}: {e}")))?;
        tracing::debug!(%model, gpu, bytes = src.len(), "memory -> gpu");
        Ok(())
    }

    fn disk_to_gpu(
        &self,
        model: &ModelId,
        gpu: u16,
        dst: &mut GpuBuf<Self>,
        keep: Option<&mut MemoryBuf<Self>>,
    ) -> Result<(), TierError> {
        let plan = self.plan(model)?;
        fits("the device buffer", dst.len(), plan.dest_len)?;
        // Staging buffers are pinned lazily by each reader (one read each).
        // A `StagingPool` pinned at start would keep pinning off this path,
        // but a pool shared by concurrent loads must be sized so that every
        // reader gets a buffer; left for the daemon's start-up code.
        let mut sink = CudaSink::new(dst, self.opts.staging_piece())
            .buffers(self.opts.staging_buffers, self.opts.threads);
        if let Some(host) = keep {
            fits("the host buffer", host.len(), plan.image_len)?;
            // The memory copy is made from the staging buffers as the reads
            // land: the disk is read once for both tiers.
            sink = sink.keeping_stored_image(&mut host[..plan.image_len as usize]);
        }
        let cell = plan.is_encoded().then(|| self.decoder(dst.gpu()));
        let decoder = cell.as_ref().and_then(|d| d.get()).and_then(Option::as_ref);
        let status = match decoder {
            Some(_) => Some(
                decode_status(dst.gpu(), &plan)
                    .map_err(|e| TierError::backend(format!("GPU {gpu}: {e}")))?,
            ),
            None => None,
        };
        if let (Some(decoder), Some(status)) = (decoder, &status) {
            sink = sink.decoding_on_gpu(GpuDecode { decoder, status });
        }
        let stats = execute(&plan, &sink, &self.opts)
            .map_err(|e| TierError::backend(format!("GPU {gpu}: {e}")))?;
        if let Some(status) = &status {
            check_decode_status(&plan, status)
                .map_err(|e| TierError::backend(format!("GPU {gpu}: {e}")))?;
        }
        tracing::debug!(
            %model,
            gpu,
            bytes = stats.bytes_read,
            seconds = stats.seconds,
            "disk -> gpu"
        );
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Assembly
// ---------------------------------------------------------------------------

/// The tiers' configuration (`flash start --mem-pool --gpu-mem-util
/// --threads --chunk-size`).
#[derive(Debug, Clone)]
pub struct TierConfig {
    /// Budget of the memory tier in bytes (0: no memory tier).
    pub memory_budget: u64,
    /// Share of each GPU's total memory given to its tier, in (0, 1].
    pub gpu_mem_util: f64,
    /// Bytes of each GPU's tier, instead of `gpu_mem_util` (`flash start
    /// --gpu-budget`; benchmarks use it to hold a given number of models).
    pub gpu_budget: Option<u64>,
    /// How models are read from the store.
    pub load: LoadOptions,
    /// The host pool: `Some(file)` makes the memory tier one region of
    /// `memory_budget` bytes in this new shared-memory file (the daemon:
    /// clients map images from it), pinned at once when there is a GPU.
    /// `None`: an anonymous pool pinned at once with a GPU, else one aligned
    /// map per image.
    pub pool_file: Option<PathBuf>,
    /// The half-life of a request's weight in a model's popularity, which
    /// orders evictions ([`flash_tier::popularity`]).
    pub popularity_half_life: std::time::Duration,
    /// Loads reading the store's disk at once (0: no limit).
    pub disk_loads: usize,
}

impl TierConfig {
    /// A memory tier of `memory_budget` bytes, 90 % of each GPU, default
    /// load options, popularity half-life and disk turns.
    pub fn new(memory_budget: u64) -> Self {
        TierConfig {
            memory_budget,
            gpu_mem_util: 0.9,
            gpu_budget: None,
            load: LoadOptions::default(),
            pool_file: None,
            popularity_half_life: flash_tier::popularity::DEFAULT_HALF_LIFE,
            disk_loads: flash_tier::DEFAULT_DISK_LOADS,
        }
    }
}

/// Why the tiers could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    #[error("the GPU memory share must be a number in (0, 1], not {0}")]
    GpuMemUtil(f64),
    #[error("setting up the GPU tiers: {0}")]
    Cuda(#[from] CudaError),
    #[error("making the host memory pool of {bytes} bytes: {why}")]
    Pool { bytes: u64, why: String },
    #[error("pinning the host memory pool of {bytes} bytes (lower --mem-pool): {cause}")]
    Pin { bytes: u64, cause: CudaError },
}

/// The memory tier's backend for `cfg`, pinned through `gpu` if any.
fn host_memory(cfg: &TierConfig, gpu: Option<&Gpu>) -> Result<HostMemory, SetupError> {
    let bytes = cfg.memory_budget;
    if bytes == 0 || (cfg.pool_file.is_none() && gpu.is_none()) {
        return Ok(HostMemory::aligned());
    }
    let len = usize::try_from(bytes).map_err(|_| SetupError::Pool {
        bytes,
        why: "larger than the address space".into(),
    })?;
    let pool = match &cfg.pool_file {
        Some(path) => HostPool::create_shared(path, len).map_err(|e| SetupError::Pool {
            bytes,
            why: format!("{}: {e}", path.display()),
        })?,
        None => HostPool::anonymous(len).map_err(|e| SetupError::Pool {
            bytes,
            why: e.to_string(),
        })?,
    };
    if let Some(gpu) = gpu {
        let t = std::time::Instant::now();
        pool.pin(gpu)
            .map_err(|cause| SetupError::Pin { bytes, cause })?;
        tracing::info!(
            bytes,
            seconds = t.elapsed().as_secs_f64(),
            "host pool pinned"
        );
    }
    Ok(HostMemory::pooled(pool))
}

/// Probes CUDA and builds the tiers: the memory tier (pinned pool when
/// there is a GPU) and one GPU tier per device. Without a usable driver (or
/// with `FLASH_NO_CUDA=1`) the memory tier alone, with the reason logged.
pub fn build_tiers(store: Store, cfg: &TierConfig) -> Result<Tiers, SetupError> {
    match cuda::probe() {
        Ok(c) => build_tiers_on(store, cfg, Some(&c)),
        Err(why) => {
            tracing::info!("no GPU tier: {why}");
            build_tiers_on(store, cfg, None)
        }
    }
}

/// [`build_tiers`] on a given driver (`None`: CPU only, whatever the machine
/// has). GPU `i`'s tier is `Tier::Gpu(i)`, with a budget of `gpu_mem_util`
/// × its total memory.
pub fn build_tiers_on(
    store: Store,
    cfg: &TierConfig,
    cuda: Option<&Cuda>,
) -> Result<Tiers, SetupError> {
    build_tiers_with(store, cfg, cuda).map(|(t, _)| t)
}

/// [`build_tiers_on`], also returning the memory tier's backend (to ask
/// whether its images are shareable and pinned).
pub fn build_tiers_with(
    store: Store,
    cfg: &TierConfig,
    cuda: Option<&Cuda>,
) -> Result<(Tiers, HostMemory), SetupError> {
    let util = cfg.gpu_mem_util;
    if !(util > 0.0 && util <= 1.0) {
        return Err(SetupError::GpuMemUtil(util));
    }
    let gpus = match cuda {
        Some(c) => (0..c.device_count())
            .map(|i| c.device(i))
            .collect::<Result<Vec<Gpu>, CudaError>>()?,
        None => Vec::new(),
    };
    let host = host_memory(cfg, gpus.first())?;
    let transfers = StoreTransfers::new(store, cfg.load.clone());
    let mut builder = TierManager::builder(transfers, host.clone(), cfg.memory_budget)
        .popularity_half_life(cfg.popularity_half_life)
        .disk_loads(cfg.disk_loads);
    for gpu in gpus {
        let (_, total) = gpu.mem_info()?;
        let budget = cfg.gpu_budget.unwrap_or((total as f64 * util) as u64);
        tracing::info!(gpu = gpu.ordinal(), budget, total, "GPU tier");
        builder = builder.gpu(GpuMemory::new(gpu), budget);
    }
    Ok((builder.build(), host))
}
