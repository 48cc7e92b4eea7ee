//! `flash kernels --compile-only [--arch sm_90]` (hidden): compiles every
//! CUDA source the binary carries (`flash_kernels::SOURCES`) with NVRTC,
//! without a GPU and without the kernel cache, and says per source whether
//! it compiled and exports its kernels. CI installs the NVRTC wheel and runs
//! it, so a kernel that does not compile fails before a GPU machine sees it.

use anyhow::{anyhow, Result};
use clap::Args;
use serde::Serialize;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct KernelsArgs {
    /// Compile every source with NVRTC, load nothing (the only mode so far)
    #[arg(long, required = true)]
    pub compile_only: bool,
    /// Target architecture (sm_90, sm_100, 8.9, ...)
    #[arg(long, default_value = "sm_90")]
    pub arch: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct SourceResult {
    source: String,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    arch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    image: Option<&'static str>,
    image_bytes: usize,
    functions: usize,
    seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

pub fn run(a: KernelsArgs) -> Result<ExitCode> {
    let cc = flash_kernels::parse_arch(&a.arch)
        .ok_or_else(|| anyhow!("--arch {:?}: expected sm_XY (sm_90) or X.Y", a.arch))?;
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
        if !a.json {
            match &r.error {
                None => println!(
                    "{}: ok ({} {}, {} bytes, {} kernels, {:.2} s)",
                    r.source,
                    r.arch.as_deref().unwrap_or("?"),
                    r.image.unwrap_or("?"),
                    r.image_bytes,
                    r.functions,
                    r.seconds
                ),
                Some(e) => println!("{}: FAILED: {e}", r.source),
            }
        }
        results.push(r);
    }
    let ok = results.iter().all(|r| r.ok);
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "arch": a.arch,
                "ok": ok,
                "sources": results,
            }))?
        );
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
