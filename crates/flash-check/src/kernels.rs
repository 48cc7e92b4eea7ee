//! Every CUDA source the binary carries (`flash_kernels::SOURCES`) compiled
//! with NVRTC, without a GPU and without the kernel cache, each checked to
//! export its kernels (`flash kernels --compile-only`). CI installs the
//! NVRTC wheel and runs it, so a kernel that does not compile fails before
//! a GPU machine sees it.

use serde::Serialize;

/// One source compiled (an element of `sources` in the JSON report).
#[derive(Debug, Serialize)]
pub struct SourceResult {
    pub source: String,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// "cubin", or "ptx" for an architecture this NVRTC does not know.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<&'static str>,
    pub image_bytes: usize,
    pub functions: usize,
    pub seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Compiles every source for compute capability `cc` (see
/// `flash_kernels::parse_arch`); `on_source` hears of each as it is done.
pub fn compile_all(cc: (u32, u32), mut on_source: impl FnMut(&SourceResult)) -> Vec<SourceResult> {
    let mut results = Vec::new();
    for source in flash_kernels::SOURCES {
        let r = match flash_kernels::compile_only(source, cc) {
            Ok(r) => SourceResult {
                source: r.name,
                ok: true,
                arch: Some(r.arch),
                image: Some(match r.kind {
                    flash_kernels::nvrtc::ImageKind::Cubin => "cubin",
                    flash_kernels::nvrtc::ImageKind::Ptx => "ptx",
                }),
                image_bytes: r.image_bytes,
                functions: r.functions,
                seconds: r.seconds,
                error: None,
            },
            Err(e) => SourceResult {
                source: source.name.to_string(),
                ok: false,
                arch: None,
                image: None,
                image_bytes: 0,
                functions: source.functions.len(),
                seconds: 0.0,
                error: Some(e.to_string()),
            },
        };
        on_source(&r);
        results.push(r);
    }
    results
}
