//! The GPU kernels of flashtensors, above the CUDA driver that flash-sys
//! wraps: everything that compiles CUDA C, loads it and launches it.
//!
//! - [`nvrtc`]: NVRTC, loaded at run time, and the on-disk cache of compiled
//!   images (`<cache>/<name>-smXY-<hash>.bin`, checksummed, written by
//!   rename; a warm cache needs no NVRTC).
//! - [`module`]: the generic API for any CUDA C source: [`CudaSource`] →
//!   [`Module::load`] → [`Module::launch`] with typed [`LaunchArgs`] (device
//!   memory only as [`DevView`]s), [`Module::set_max_dynamic_shared_bytes`];
//!   [`compile_only`] compiles a source without a GPU.
//! - [`view`]: [`DevView`], a bounds-checked byte range of device memory.
//! - [`blas`]: cuBLAS (bf16 GEMMs with f32 accumulation), loaded only when a
//!   handle is made.
//! - [`decode`]: the GPU decoder of compressed tensors (flash-codec's CUDA
//!   source), checked descriptors and status words.
//! - [`ops`]: the inference engine's ops (kernels.cu on the module API, and
//!   cuBLAS) and [`ops::check`], every op against a CPU computation.
//! - [`SOURCES`]: every CUDA source the binary carries, for `flash kernels
//!   --compile-only`.
//!
//! Why a crate of its own: flash-sys is the OS and the driver and knows
//! nothing about models; the kernels (and the checks that they compute what
//! the models need) change with the engine and the loader's decoders.
//!
//! # `unsafe`
//! Every `unsafe` block is in one private module, `ffi` (the NVRTC,
//! driver-module, launch and cuBLAS calls, and two byte views), each with a
//! `SAFETY:` comment. The crate denies `unsafe_code` and allows it there
//! alone, so the compiler enforces it; a test checks that no other module
//! allows it. Errors are flash-sys's [`CudaError`]: a driver call that
//! failed, or a request refused before reaching the driver (a view too
//! short for its shape, a missing library).
#![deny(unsafe_code)]

#[allow(unsafe_code)]
mod ffi;

pub mod blas;
pub mod decode;
pub mod module;
pub mod nvrtc;
pub mod ops;
pub mod view;

pub use flash_sys::cuda::CudaError;
pub use module::{
    compile_only, parse_arch, CompileReport, CudaSource, KernelInfo, LaunchArgs, LaunchConfig,
    Module,
};
pub use view::DevView;

use std::path::{Path, PathBuf};

/// Every CUDA C source this binary carries: what `flash kernels
/// --compile-only` compiles. A new source is added here.
pub const SOURCES: &[CudaSource<'static>] = &[ops::ENGINE_SOURCE, decode::DECODE_SOURCE];

/// The folder compiled kernels are cached in: `$FLASH_KERNEL_CACHE`, else
/// `<store>/kernels` for a store root, else `$FLASH_HOME/kernels`, else
/// `<cache dir>/flashtensors/kernels`.
pub fn default_kernel_cache(store_root: Option<&Path>) -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("FLASH_KERNEL_CACHE").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d));
    }
    if let Some(r) = store_root {
        return Some(r.join("kernels"));
    }
    if let Some(h) = std::env::var_os("FLASH_HOME").filter(|h| !h.is_empty()) {
        return Some(PathBuf::from(h).join("kernels"));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("flashtensors").join("kernels"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_cache_folder() {
        // Only the store-root branch is deterministic under any environment.
        if std::env::var_os("FLASH_KERNEL_CACHE").is_none() {
            assert_eq!(
                default_kernel_cache(Some(Path::new("/s"))),
                Some(PathBuf::from("/s/kernels"))
            );
        }
    }

    #[test]
    fn every_source_names_its_functions() {
        let mut names = std::collections::HashSet::new();
        for s in SOURCES {
            assert!(names.insert(s.name), "two sources named {}", s.name);
            assert!(!s.functions.is_empty(), "{} has no functions", s.name);
            // The textual check only; that each is an exported (extern "C")
            // kernel is compile_only's, run by `flash kernels --compile-only`
            // and every_source_compiles_for_sm_90.
            assert!(s.code.contains("extern \"C\""), "{}", s.name);
            for f in s.functions {
                assert!(
                    s.code.contains(&format!("{f}(")),
                    "{f} is not a function of {}",
                    s.name
                );
            }
        }
    }

    /// The rule of the crate docs: `unsafe` is allowed in `ffi` alone. The
    /// compiler denies it elsewhere; this catches a second `allow`.
    #[test]
    fn unsafe_is_allowed_in_ffi_alone() {
        // Built here so that this test's own text matches neither.
        let allow = ["allow(", "unsafe_code)"].concat();
        let keyword = ["un", "safe "].concat();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut stack = vec![src.clone()];
        let mut allows = Vec::new();
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    let text = std::fs::read_to_string(&p).unwrap();
                    let rel = p.strip_prefix(&src).unwrap().to_string_lossy().into_owned();
                    for (i, line) in text.lines().enumerate() {
                        let code = line.split("//").next().unwrap_or("");
                        if code.contains(&allow) {
                            allows.push(format!("{rel}:{}", i + 1));
                        }
                        assert!(
                            rel == "ffi.rs" || !code.contains(&keyword),
                            "{rel}:{}: {keyword}outside ffi.rs",
                            i + 1
                        );
                    }
                }
            }
        }
        assert_eq!(allows.len(), 1, "{allow} at {allows:?}");
        let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
        assert!(lib.contains(&["#![deny(", "unsafe_code)]"].concat()));
        assert!(lib.contains(&format!("#[{allow}]\nmod ffi;")));
    }

    /// Needs libnvrtc, no GPU: `cargo test -p flash-kernels -- --ignored
    /// compile` (with `LD_LIBRARY_PATH` at a libnvrtc).
    #[test]
    #[ignore = "needs libnvrtc"]
    fn every_source_compiles_for_sm_90() {
        for s in SOURCES {
            let r = compile_only(s, (9, 0)).unwrap_or_else(|e| panic!("{}: {e}", s.name));
            assert_eq!(r.functions_found, s.functions.len());
            eprintln!(
                "{}: {} {:?}, {} bytes, {:.2} s",
                r.name, r.arch, r.kind, r.image_bytes, r.seconds
            );
        }
        // A kernel without extern "C" compiles, but under a mangled name.
        let mangled = CudaSource {
            name: "mangled",
            code: "__global__ void k(int* x) { *x = 1; }",
            options: &[],
            functions: &["k"],
        };
        let e = compile_only(&mangled, (9, 0)).unwrap_err().to_string();
        assert!(e.contains("lacks k"), "{e}");
    }
}
