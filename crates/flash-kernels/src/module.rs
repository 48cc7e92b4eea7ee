//! A generic API for any CUDA C source the binary carries: compiled by NVRTC
//! once per source × options × GPU architecture (or taken from the on-disk
//! cache, see [`crate::nvrtc`]), loaded into one GPU's context
//! ([`Module::load`]), its functions launched on a stream with typed
//! arguments ([`LaunchArgs`]) that are checked before anything is queued.
//!
//! The engine's kernels ([`crate::ops::Kernels`]) are one user; any other
//! source (a decoder for compressed weights, say) is another
//! [`CudaSource`], listed in [`crate::SOURCES`] so that `flash kernels
//! --compile-only` compiles it too.
//!
//! ```no_run
//! use flash_kernels::module::{CudaSource, LaunchArgs, LaunchConfig, Module};
//! use flash_kernels::DevView;
//! # fn demo(gpu: &flash_sys::cuda::Gpu) -> Result<(), flash_sys::cuda::CudaError> {
//! const FILL: CudaSource<'static> = CudaSource {
//!     name: "fill",
//!     code: r#"extern "C" __global__ void fill(float* x, float v, int n) {
//!         int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) x[i] = v; }"#,
//!     options: &[],
//!     functions: &["fill"],
//! };
//! let module = Module::load(gpu, &FILL, None)?;
//! let mem = gpu.alloc(1024 * 4)?;
//! let stream = gpu.stream()?;
//! let x = DevView::whole(&mem);
//! x.require("fill output", 1024 * 4)?; // the kernel writes 1024 floats
//! let mut args = LaunchArgs::new();
//! args.view(x).f32(1.0).i32(1024);
//! module.launch(&stream, 0, LaunchConfig::new((4, 1, 1), 256), &args)?;
//! stream.synchronize()?;
//! # Ok(()) }
//! ```

use crate::ffi::{LoadedModule, Param};
use crate::nvrtc::{self, nvrtc_version, ImageKind};
use crate::view::DevView;
use flash_sys::cuda::{CudaError, Gpu, Stream};
use std::path::{Path, PathBuf};

/// A CUDA C source and how to compile it.
#[derive(Debug, Clone, Copy)]
pub struct CudaSource<'a> {
    /// Names the program in NVRTC's messages and the cache files
    /// (`<name>-smXY-<hash>.bin`).
    pub name: &'a str,
    /// The CUDA C code; no headers (NVRTC gets no include path).
    pub code: &'a str,
    /// NVRTC options besides the architecture (`--std=c++17`).
    pub options: &'a [&'a str],
    /// The `extern "C"` kernels to look up, in the order
    /// [`Module::launch`] indexes them.
    pub functions: &'a [&'a str],
}

/// How a module's image was obtained at load.
#[derive(Debug, Clone)]
pub struct KernelInfo {
    pub cache_hit: bool,
    pub compile_seconds: f64,
    pub cache_seconds: f64,
    /// cuModuleLoadData and function lookups.
    pub load_seconds: f64,
    pub cache_file: Option<PathBuf>,
    pub arch: String,
    pub image_bytes: usize,
    /// NVRTC's version when it compiled the image now; `None` on a cache
    /// hit, which does not load NVRTC.
    pub nvrtc_version: Option<(i32, i32)>,
}

/// A source's kernels, loaded into one GPU's context; unloaded on drop
/// (after the GPU's queued work). `Send + Sync`.
pub struct Module {
    name: String,
    loaded: LoadedModule,
    info: KernelInfo,
}

impl std::fmt::Debug for Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Module")
            .field("name", &self.name)
            .field("info", &self.info)
            .finish()
    }
}

impl Module {
    /// Compiles `source` for `gpu` (or takes it from `cache_dir`), loads it
    /// and looks up its functions.
    pub fn load(
        gpu: &Gpu,
        source: &CudaSource<'_>,
        cache_dir: Option<&Path>,
    ) -> Result<Module, CudaError> {
        let cc = gpu.info()?.compute_capability;
        let img = nvrtc::image(source.code, source.name, source.options, cc, cache_dir)?;
        let t0 = std::time::Instant::now();
        let loaded = LoadedModule::load(
            gpu,
            &img.bytes,
            img.kind == ImageKind::Ptx,
            source.functions,
            &format!("the kernels of {}", source.name),
        )?;
        let info = KernelInfo {
            cache_hit: img.cache_hit,
            compile_seconds: img.compile_seconds,
            cache_seconds: img.cache_seconds,
            load_seconds: t0.elapsed().as_secs_f64(),
            cache_file: img.path,
            arch: img.arch,
            image_bytes: img.bytes.len(),
            // Only when NVRTC was needed anyway: a cache hit leaves it unloaded.
            nvrtc_version: if img.cache_hit {
                None
            } else {
                nvrtc_version().ok()
            },
        };
        tracing::debug!(
            "kernels of {}: cache hit {}, compile {:.3} s, load {:.4} s",
            source.name,
            info.cache_hit,
            info.compile_seconds,
            info.load_seconds
        );
        Ok(Module {
            name: source.name.to_string(),
            loaded,
            info,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn gpu(&self) -> &Gpu {
        self.loaded.gpu()
    }

    pub fn info(&self) -> &KernelInfo {
        &self.info
    }

    /// The sizes in bytes of function `function`'s parameters, as the driver
    /// reports them (CUDA 12.4 and later; None before). Launches are checked
    /// against them.
    pub fn param_sizes(&self, function: usize) -> Option<&[usize]> {
        self.loaded.param_sizes(function)
    }

    /// Lets `function` use up to `bytes` of dynamic shared memory per block
    /// (needed above 48 KiB).
    pub fn set_max_dynamic_shared_bytes(
        &self,
        function: usize,
        bytes: u32,
    ) -> Result<(), CudaError> {
        self.loaded.set_max_dynamic_shared_bytes(function, bytes)
    }

    /// Queues `function` (its index in [`CudaSource::functions`]) on
    /// `stream` with `args`.
    ///
    /// Refused before reaching the driver: a stream or a view of another
    /// GPU, an empty grid or block, a block over 1024 threads, and, where
    /// the driver reports the kernel's parameters (CUDA 12.4 and later), a
    /// count or size of `args` that differs from them.
    ///
    /// The contract this cannot check: the kernel, run with these
    /// arguments, must touch only the bytes of the views passed. The caller
    /// checks each view against the shapes it passes (as every op of
    /// [`crate::ops`] does with [`DevView::require`]).
    pub fn launch(
        &self,
        stream: &Stream,
        function: usize,
        config: LaunchConfig,
        args: &LaunchArgs<'_>,
    ) -> Result<(), CudaError> {
        config.validate()?;
        let gpu = self.loaded.gpu();
        if args.mixed_gpus || args.gpu.is_some_and(|g| g != gpu) {
            return Err(CudaError::Usage(format!(
                "{} function {function}: a view argument is memory of another GPU than the \
                 module's (GPU {})",
                self.name,
                gpu.ordinal()
            )));
        }
        self.loaded.launch(
            function,
            stream,
            config.grid,
            config.block,
            config.shared_mem_bytes,
            args.params(),
        )
    }
}

/// The shape of a launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchConfig {
    /// Blocks in x, y, z.
    pub grid: (u32, u32, u32),
    /// Threads per block in x, y, z (at most 1024 in all).
    pub block: (u32, u32, u32),
    /// Dynamic shared memory per block, in bytes (above 48 KiB, see
    /// [`Module::set_max_dynamic_shared_bytes`]).
    pub shared_mem_bytes: u32,
}

impl LaunchConfig {
    /// `grid` blocks of `threads` threads (one dimension), no dynamic shared
    /// memory.
    pub fn new(grid: (u32, u32, u32), threads: u32) -> Self {
        LaunchConfig {
            grid,
            block: (threads, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// The same with `bytes` of dynamic shared memory per block.
    pub fn with_shared_mem(self, bytes: u32) -> Self {
        LaunchConfig {
            shared_mem_bytes: bytes,
            ..self
        }
    }

    fn validate(&self) -> Result<(), CudaError> {
        let (g, b) = (self.grid, self.block);
        let threads = b.0 as u64 * b.1 as u64 * b.2 as u64;
        if g.0 == 0 || g.1 == 0 || g.2 == 0 || threads == 0 || threads > 1024 {
            return Err(CudaError::Usage(format!(
                "a launch of {g:?} blocks of {b:?} threads: every dimension must be at least 1, \
                 a block at most 1024 threads"
            )));
        }
        Ok(())
    }
}

/// A kernel's arguments in order, each with the size of its C type: device
/// memory only as [`DevView`]s (the kernel gets the view's first address;
/// [`Module::launch`] refuses views of another GPU), a null pointer, or
/// scalars. The values live here until the launch has copied them; up to
/// [`INLINE_ARGS`] of them without allocating (a decode step launches
/// hundreds of kernels).
#[derive(Debug, Clone)]
pub struct LaunchArgs<'a> {
    inline: [Param; INLINE_ARGS],
    len: usize,
    /// Every argument, once there are more than [`INLINE_ARGS`].
    spilled: Vec<Param>,
    /// The GPU of the first view, and whether a later one differs.
    gpu: Option<&'a Gpu>,
    mixed_gpus: bool,
}

/// Arguments a [`LaunchArgs`] holds without allocating.
pub const INLINE_ARGS: usize = 24;

impl Default for LaunchArgs<'_> {
    fn default() -> Self {
        LaunchArgs {
            inline: [Param::ZERO; INLINE_ARGS],
            len: 0,
            spilled: Vec::new(),
            gpu: None,
            mixed_gpus: false,
        }
    }
}

impl<'a> LaunchArgs<'a> {
    pub fn new() -> Self {
        Self::default()
    }

    fn push(&mut self, p: Param) -> &mut Self {
        if self.spilled.is_empty() && self.len < INLINE_ARGS {
            self.inline[self.len] = p;
        } else {
            if self.spilled.is_empty() {
                self.spilled.extend_from_slice(&self.inline[..self.len]);
            }
            self.spilled.push(p);
        }
        self.len += 1;
        self
    }

    fn params(&self) -> &[Param] {
        if self.spilled.is_empty() {
            &self.inline[..self.len]
        } else {
            &self.spilled
        }
    }

    /// A `T*` parameter: the view's first byte.
    pub fn view(&mut self, v: DevView<'a>) -> &mut Self {
        match self.gpu {
            None => self.gpu = Some(v.gpu()),
            Some(g) => self.mixed_gpus |= g != v.gpu(),
        }
        self.push(Param::bits64(v.device_ptr().to_ne_bytes()))
    }

    /// A `T*` parameter that is null (an absent optional input).
    pub fn null(&mut self) -> &mut Self {
        self.push(Param::bits64(0u64.to_ne_bytes()))
    }

    /// An `int` parameter.
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.push(Param::bits32(v.to_ne_bytes()))
    }

    /// An `unsigned int` parameter.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.push(Param::bits32(v.to_ne_bytes()))
    }

    /// A `long long` parameter.
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.push(Param::bits64(v.to_ne_bytes()))
    }

    /// An `unsigned long long` parameter (a count, never an address: pass
    /// memory as a view).
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.push(Param::bits64(v.to_ne_bytes()))
    }

    /// A `float` parameter.
    pub fn f32(&mut self, v: f32) -> &mut Self {
        self.push(Param::bits32(v.to_ne_bytes()))
    }

    /// The number of arguments.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Each argument's size in bytes, in order.
    pub fn sizes(&self) -> Vec<usize> {
        self.params().iter().map(Param::size).collect()
    }
}

/// What compiling one source for an architecture gave (no GPU needed).
#[derive(Debug, Clone)]
pub struct CompileReport {
    pub name: String,
    /// "sm_90" (a cubin) or "compute_90" (PTX, for an architecture this
    /// NVRTC does not know).
    pub arch: String,
    pub kind: ImageKind,
    pub image_bytes: usize,
    pub seconds: f64,
    /// The source's functions, each found in the image by its unmangled
    /// name (a missing `extern "C"` or a renamed kernel shows here).
    pub functions_found: usize,
    pub functions: usize,
}

/// Compiles `source` for compute capability `cc` with NVRTC, without a GPU
/// and without the cache: proves the source compiles and exports its
/// functions (`flash kernels --compile-only`).
pub fn compile_only(source: &CudaSource<'_>, cc: (u32, u32)) -> Result<CompileReport, CudaError> {
    let t0 = std::time::Instant::now();
    let (kind, arch, bytes) = nvrtc::compile(source.code, source.name, source.options, cc)?;
    let seconds = t0.elapsed().as_secs_f64();
    let missing: Vec<&str> = source
        .functions
        .iter()
        .copied()
        .filter(|f| !image_exports(kind, &bytes, f))
        .collect();
    if !missing.is_empty() {
        return Err(CudaError::Usage(format!(
            "{} compiled for {arch}, but its image lacks {} (extern \"C\"?)",
            source.name,
            missing.join(", ")
        )));
    }
    Ok(CompileReport {
        name: source.name.to_string(),
        arch,
        kind,
        image_bytes: bytes.len(),
        seconds,
        functions_found: source.functions.len(),
        functions: source.functions.len(),
    })
}

/// Whether `image` defines a kernel called exactly `name`: in a cubin, a
/// NUL-delimited symbol name; in PTX, an `.entry name(`.
fn image_exports(kind: ImageKind, image: &[u8], name: &str) -> bool {
    let needle: Vec<u8> = match kind {
        ImageKind::Cubin => [&[0u8][..], name.as_bytes(), &[0u8]].concat(),
        ImageKind::Ptx => format!(".entry {name}(").into_bytes(),
    };
    !needle.is_empty() && image.windows(needle.len()).any(|w| w == needle)
}

/// "sm_90", "sm_90a", "compute_90", "90" or "9.0" → (9, 0); "sm_120" → (12, 0).
pub fn parse_arch(s: &str) -> Option<(u32, u32)> {
    let s = s.trim();
    if let Some((major, minor)) = s.split_once('.') {
        return Some((major.parse().ok()?, minor.parse().ok()?));
    }
    let digits = s
        .strip_prefix("sm_")
        .or_else(|| s.strip_prefix("compute_"))
        .unwrap_or(s);
    let digits = digits.strip_suffix(['a', 'f']).unwrap_or(digits);
    if digits.len() < 2 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (major, minor) = digits.split_at(digits.len() - 1);
    Some((major.parse().ok()?, minor.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn architectures_parse() {
        assert_eq!(parse_arch("sm_90"), Some((9, 0)));
        assert_eq!(parse_arch("sm_90a"), Some((9, 0)));
        assert_eq!(parse_arch("compute_89"), Some((8, 9)));
        assert_eq!(parse_arch("sm_120"), Some((12, 0)));
        assert_eq!(parse_arch("100"), Some((10, 0)));
        assert_eq!(parse_arch("9.0"), Some((9, 0)));
        assert_eq!(parse_arch("sm_"), None);
        assert_eq!(parse_arch("sm_9"), None);
        assert_eq!(parse_arch("hopper"), None);
        assert_eq!(parse_arch(""), None);
    }

    #[test]
    fn launch_arguments_keep_their_c_sizes() {
        let mut a = LaunchArgs::new();
        a.null().i32(-1).u32(1).i64(2).u64(3).f32(0.5);
        assert_eq!(a.sizes(), vec![8, 4, 4, 8, 8, 4]);
        assert_eq!(a.len(), 6);
        assert!(a.gpu.is_none() && !a.mixed_gpus);
        // Past the inline storage, every argument is kept, in order.
        let mut many = LaunchArgs::new();
        for i in 0..(INLINE_ARGS + 5) {
            if i % 2 == 0 {
                many.i32(i as i32);
            } else {
                many.i64(i as i64);
            }
        }
        assert_eq!(many.len(), INLINE_ARGS + 5);
        let want: Vec<usize> = (0..INLINE_ARGS + 5)
            .map(|i| if i % 2 == 0 { 4 } else { 8 })
            .collect();
        assert_eq!(many.sizes(), want);
        assert_eq!(many.params()[3], Param::bits64(3i64.to_ne_bytes()));
        assert_eq!(
            many.params()[INLINE_ARGS + 4],
            Param::bits32(((INLINE_ARGS + 4) as i32).to_ne_bytes())
        );
    }

    #[test]
    fn handles_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Module>();
        check::<crate::ops::Ops>();
        check::<crate::ops::Kernels>();
        check::<crate::blas::Blas>();
        check::<LaunchArgs<'static>>();
    }

    #[test]
    fn launch_shapes_are_checked() {
        assert!(LaunchConfig::new((1, 1, 1), 1024).validate().is_ok());
        assert!(LaunchConfig::new((1, 1, 1), 1025).validate().is_err());
        assert!(LaunchConfig::new((0, 1, 1), 32).validate().is_err());
        let c = LaunchConfig {
            grid: (1, 1, 1),
            block: (32, 32, 2),
            shared_mem_bytes: 0,
        };
        assert!(c.validate().is_err());
        assert_eq!(
            LaunchConfig::new((2, 1, 1), 64)
                .with_shared_mem(4096)
                .shared_mem_bytes,
            4096
        );
    }

    /// Runs where a GPU and NVRTC are present:
    /// `cargo test -p flash-kernels -- --ignored gpu`.
    #[test]
    #[ignore = "needs a GPU"]
    fn gpu_launches_are_checked() {
        const SRC: CudaSource<'static> = CudaSource {
            name: "flash-kernels-test",
            code: "extern \"C\" __global__ void fill(float* x, float v, int n) {\n\
                   int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) x[i] = v; }\n\
                   extern \"C\" __global__ void shared_sum(float* x) {\n\
                   extern __shared__ float s[]; s[threadIdx.x] = 1.0f; __syncthreads();\n\
                   if (threadIdx.x == 0) x[0] = s[0] + s[blockDim.x - 1]; }\n",
            options: &[],
            functions: &["fill", "shared_sum"],
        };
        let cuda = flash_sys::cuda::probe().expect("a GPU");
        let gpu = cuda.device(0).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let m = Module::load(&gpu, &SRC, Some(dir.path())).unwrap();
        assert!(!m.info().cache_hit);
        let sizes = m.param_sizes(0).map(<[usize]>::to_vec);
        eprintln!("fill takes {sizes:?}, shared_sum {:?}", m.param_sizes(1));
        if let Some(s) = &sizes {
            assert_eq!(s, &[8, 4, 4]);
        }
        let mem = gpu.alloc(4096).unwrap();
        let x = DevView::whole(&mem);
        let stream = gpu.stream().unwrap();
        let cfg = LaunchConfig::new((4, 1, 1), 256);
        let mut a = LaunchArgs::new();
        a.view(x).f32(2.5).i32(1024);
        m.launch(&stream, 0, cfg, &a).unwrap();
        let mut back = vec![0f32; 1024];
        x.copy_to_host_f32(&mut back).unwrap();
        assert!(back.iter().all(|&v| v == 2.5));
        // Refused before the driver: no such function, an empty grid, and
        // (where the driver reports parameters) a wrong count or size.
        assert!(m.launch(&stream, 2, cfg, &a).is_err());
        assert!(m
            .launch(&stream, 0, LaunchConfig::new((0, 1, 1), 1), &a)
            .is_err());
        if sizes.is_some() {
            let mut short = LaunchArgs::new();
            short.view(x).f32(1.0);
            assert!(m.launch(&stream, 0, cfg, &short).is_err());
            let mut wide = LaunchArgs::new();
            wide.view(x).f32(1.0).i64(1024);
            let e = m.launch(&stream, 0, cfg, &wide).unwrap_err();
            assert!(e.to_string().contains("parameters"), "{e}");
        }
        // 64 KiB of dynamic shared memory needs the attribute.
        let big = LaunchConfig::new((1, 1, 1), 1024).with_shared_mem(64 << 10);
        let mut b = LaunchArgs::new();
        b.view(x);
        assert!(m.launch(&stream, 1, big, &b).is_err());
        m.set_max_dynamic_shared_bytes(1, 64 << 10).unwrap();
        m.launch(&stream, 1, big, &b).unwrap();
        let mut first = [0f32; 1];
        x.copy_to_host_f32(&mut first).unwrap();
        assert_eq!(first[0], 2.0);
        drop(m);
        let again = Module::load(&gpu, &SRC, Some(dir.path())).unwrap();
        assert!(again.info().cache_hit);
    }

    #[test]
    fn exported_names_are_found_exactly() {
        let cubin = b"\x7fELF..\0.text.embed_f32\0embed_f32\0_Z3fooi\0";
        assert!(image_exports(ImageKind::Cubin, cubin, "embed_f32"));
        assert!(!image_exports(ImageKind::Cubin, cubin, "embed"));
        assert!(!image_exports(ImageKind::Cubin, cubin, "foo"));
        let ptx = b".visible .entry swiglu(\n.param .u64 swiglu_param_0";
        assert!(image_exports(ImageKind::Ptx, ptx, "swiglu"));
        assert!(!image_exports(ImageKind::Ptx, ptx, "swig"));
    }
}
