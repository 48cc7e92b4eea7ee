//! NVRTC, loaded at run time, and the on-disk cache of compiled kernels.
//!
//! A start with a warm cache loads the cached image and never compiles. The
//! cache key is a hash of the kernel source, the compile options and the
//! GPU's compute capability; the file also records the NVRTC version that
//! wrote it, and a different NVRTC (when one is present) recompiles. A
//! machine without `libnvrtc` still runs from a warm cache. Files are
//! written to a temporary name and renamed, and carry a checksum of their
//! payload, so a torn or corrupt file is recompiled, never loaded.

use crate::ffi;
use flash_sys::cuda::CudaError;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Whether NVRTC can be used, and its version; checked once per process.
pub fn nvrtc_version() -> Result<(i32, i32), CudaError> {
    ffi::nvrtc_version()
}

/// What the driver loads: a cubin for the GPU's own architecture, or PTX
/// (NUL-terminated) when NVRTC does not know the architecture yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    Cubin,
    Ptx,
}

/// A compiled (or cached) kernel image and how it was obtained.
#[derive(Debug, Clone)]
pub struct KernelImage {
    pub kind: ImageKind,
    pub bytes: Vec<u8>,
    /// Whether it came from the disk cache.
    pub cache_hit: bool,
    /// Seconds spent compiling (0 on a cache hit) and reading the cache.
    pub compile_seconds: f64,
    pub cache_seconds: f64,
    /// The cache file, when a cache folder was given.
    pub path: Option<PathBuf>,
    /// The architecture compiled for ("sm_90" or "compute_90").
    pub arch: String,
}

/// FNV-1a, 64 bits: a stable hash for cache keys and the file checksum.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Separate the parts, so ("ab", "c") and ("a", "bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

const MAGIC: &[u8; 8] = b"FLKERN01";
const HEADER: usize = 8 + 4 + 4 + 4 + 4 + 8 + 8;

fn encode(kind: ImageKind, nvrtc: (i32, i32), bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + bytes.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(nvrtc.0 as u32).to_le_bytes());
    out.extend_from_slice(&(nvrtc.1 as u32).to_le_bytes());
    out.extend_from_slice(&((kind == ImageKind::Ptx) as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(&fnv1a(&[bytes]).to_le_bytes());
    out.extend_from_slice(bytes);
    out
}

/// (kind, NVRTC version, payload), or None when the file is not a complete,
/// intact cache file.
fn decode(file: &[u8]) -> Option<(ImageKind, (i32, i32), &[u8])> {
    if file.len() < HEADER || &file[..8] != MAGIC {
        return None;
    }
    let u32_at = |o: usize| u32::from_le_bytes(file[o..o + 4].try_into().unwrap_or([0; 4]));
    let u64_at = |o: usize| u64::from_le_bytes(file[o..o + 8].try_into().unwrap_or([0; 8]));
    let version = (u32_at(8) as i32, u32_at(12) as i32);
    let kind = match u32_at(16) {
        0 => ImageKind::Cubin,
        1 => ImageKind::Ptx,
        _ => return None,
    };
    let len = u64_at(24) as usize;
    let sum = u64_at(32);
    let payload = &file[HEADER..];
    if payload.len() != len || fnv1a(&[payload]) != sum {
        return None;
    }
    Some((kind, version, payload))
}

/// The architecture to compile for: the GPU's own (cubin) when NVRTC knows
/// it, else PTX for the newest architecture NVRTC knows below it.
fn pick_arch(cc: (u32, u32)) -> Result<(ImageKind, String), CudaError> {
    let want = (cc.0 * 10 + cc.1) as i32;
    let archs = ffi::nvrtc_supported_archs()?;
    if archs.contains(&want) {
        return Ok((ImageKind::Cubin, format!("sm_{want}")));
    }
    match archs.iter().copied().filter(|&a| a < want).max() {
        Some(a) => Ok((ImageKind::Ptx, format!("compute_{a}"))),
        None => Err(CudaError::Usage(format!(
            "this NVRTC supports none of the architectures up to sm_{want} (it knows {archs:?})"
        ))),
    }
}

/// Compiles `src` (named `name` in NVRTC's messages) with `opts` for a GPU
/// of compute capability `cc`: a cubin for that architecture when NVRTC
/// knows it, else PTX (see [`ImageKind`]). Needs NVRTC, not a GPU.
pub fn compile(
    src: &str,
    name: &str,
    opts: &[&str],
    cc: (u32, u32),
) -> Result<(ImageKind, String, Vec<u8>), CudaError> {
    nvrtc_version()?;
    let (kind, arch) = pick_arch(cc)?;
    let bytes = ffi::nvrtc_compile(src, name, &arch, opts, kind == ImageKind::Ptx)?;
    Ok((kind, arch, bytes))
}

/// The cache file of `src` compiled with `opts` for compute capability `cc`.
pub fn cache_path(dir: &Path, name: &str, src: &str, opts: &[&str], cc: (u32, u32)) -> PathBuf {
    let joined = opts.join("\u{1f}");
    let cc_s = format!("{}.{}", cc.0, cc.1);
    let key = fnv1a(&[src.as_bytes(), joined.as_bytes(), cc_s.as_bytes()]);
    dir.join(format!("{name}-sm{}{}-{key:016x}.bin", cc.0, cc.1))
}

/// The image of `src` for a GPU of compute capability `cc`: from `cache_dir`
/// when an intact file made by the same NVRTC (or any, when NVRTC is absent)
/// is there, else compiled and written there (best effort: a cache folder
/// that cannot be written only costs the next start a compile).
pub fn image(
    src: &str,
    name: &str,
    opts: &[&str],
    cc: (u32, u32),
    cache_dir: Option<&Path>,
) -> Result<KernelImage, CudaError> {
    let t0 = Instant::now();
    let path = cache_dir.map(|d| cache_path(d, name, src, opts, cc));
    if let Some(p) = &path {
        if let Ok(file) = std::fs::read(p) {
            if let Some((kind, version, payload)) = decode(&file) {
                // A cubin is machine code for this architecture, valid
                // whatever NVRTC made it: a hit never loads NVRTC (its
                // libraries are ~100 MB, read from disk on a cold start).
                // PTX is JIT-compiled by the driver from a version NVRTC
                // chose: an NVRTC that is present and differs recompiles.
                let same = kind == ImageKind::Cubin
                    || match nvrtc_version() {
                        Ok(v) => v == version,
                        Err(_) => true,
                    };
                if same {
                    let arch = match kind {
                        ImageKind::Cubin => format!("sm_{}{}", cc.0, cc.1),
                        ImageKind::Ptx => "ptx".to_string(),
                    };
                    return Ok(KernelImage {
                        kind,
                        bytes: payload.to_vec(),
                        cache_hit: true,
                        compile_seconds: 0.0,
                        cache_seconds: t0.elapsed().as_secs_f64(),
                        path,
                        arch,
                    });
                }
            } else {
                tracing::warn!("kernel cache file {} is damaged; recompiling", p.display());
            }
        }
    }
    let cache_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let (kind, arch, bytes) = compile(src, name, opts, cc)?;
    let compile_seconds = t1.elapsed().as_secs_f64();
    if let Some(p) = &path {
        let version = nvrtc_version().unwrap_or((0, 0));
        if let Err(e) = write_atomic(p, &encode(kind, version, &bytes)) {
            tracing::warn!("cannot write the kernel cache {}: {e}", p.display());
        }
    }
    Ok(KernelImage {
        kind,
        bytes,
        cache_hit: false,
        compile_seconds,
        cache_seconds,
        path,
        arch,
    })
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tmp = dir.join(format!(
        ".tmp-{}-{}-{nanos}",
        std::process::id(),
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_files_round_trip_and_reject_damage() {
        let payload = b"\x7fELF some cubin bytes".to_vec();
        let f = encode(ImageKind::Cubin, (13, 0), &payload);
        let (k, v, p) = decode(&f).expect("intact file decodes");
        assert_eq!((k, v, p), (ImageKind::Cubin, (13, 0), &payload[..]));
        let f2 = encode(ImageKind::Ptx, (12, 8), &payload);
        assert_eq!(decode(&f2).map(|d| d.0), Some(ImageKind::Ptx));
        // Truncated, flipped, wrong magic.
        assert!(decode(&f[..f.len() - 1]).is_none());
        let mut bad = f.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(decode(&bad).is_none());
        let mut bad = f.clone();
        bad[0] = b'X';
        assert!(decode(&bad).is_none());
        assert!(decode(&[]).is_none());
    }

    #[test]
    fn cache_key_depends_on_source_options_and_arch() {
        let d = Path::new("/c");
        let a = cache_path(d, "k", "src", &["-O3"], (9, 0));
        assert_eq!(a, cache_path(d, "k", "src", &["-O3"], (9, 0)));
        assert_ne!(a, cache_path(d, "k", "src2", &["-O3"], (9, 0)));
        assert_ne!(a, cache_path(d, "k", "src", &["-O2"], (9, 0)));
        assert_ne!(a, cache_path(d, "k", "src", &["-O3"], (8, 0)));
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
    }

    /// The key and the file name are what flash-sys wrote before the
    /// kernels moved here: a warm cache from then still hits.
    #[test]
    fn cache_file_names_are_stable() {
        assert_eq!(
            cache_path(Path::new("/c"), "k", "src", &["-O3"], (9, 0)),
            Path::new("/c/k-sm90-de4cd0a44c7d9016.bin")
        );
    }

    #[test]
    fn a_missing_nvrtc_is_an_error_not_a_panic() {
        // On machines with NVRTC this returns its version; without, a reason.
        match nvrtc_version() {
            Ok((major, _)) => assert!(major >= 11),
            Err(e) => assert!(e.to_string().contains("NVRTC") || e.to_string().contains("nvrtc")),
        }
    }

    #[test]
    fn a_warm_cache_is_used_without_compiling() {
        let dir = tempfile::tempdir().unwrap();
        let src = "extern \"C\" __global__ void k() {}";
        let p = cache_path(dir.path(), "t", src, &[], (9, 0));
        let version = nvrtc_version().unwrap_or((0, 0));
        write_atomic(&p, &encode(ImageKind::Cubin, version, b"cached image")).unwrap();
        let img = image(src, "t", &[], (9, 0), Some(dir.path())).unwrap();
        assert!(img.cache_hit);
        assert_eq!(img.bytes, b"cached image");
        assert_eq!(img.compile_seconds, 0.0);
    }
}
