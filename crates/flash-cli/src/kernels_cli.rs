//! `flash kernels --compile-only [--arch sm_90]` (hidden): every CUDA source
//! the binary carries compiled with NVRTC, without a GPU (flash-check's
//! `kernels`), one line per source or one JSON object.

use crate::args::KernelsArgs;
use anyhow::{anyhow, Result};
use std::process::ExitCode;

pub fn run(a: KernelsArgs) -> Result<ExitCode> {
    let cc = flash_kernels::parse_arch(&a.arch)
        .ok_or_else(|| anyhow!("--arch {:?}: expected sm_XY (sm_90) or X.Y", a.arch))?;
    let results = flash_check::kernels::compile_all(cc, |r| {
        if a.json {
            return;
        }
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
    });
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
