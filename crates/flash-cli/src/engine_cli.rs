//! The GPU engine from the command line: `flash bench-engine MODEL` and
//! the hidden `flash engine-logits MODEL --tokens ...` (the model, the GPU
//! and the kernel cache resolved as `flash run` resolves them, `ctx`), and
//! the text of the engine part of `flash selftest`. The measurements are
//! flash-check's `engine` module.

use crate::args::{BenchEngineArgs, EngineLogitsArgs};
use crate::ctx::{gpu, kernel_cache, model_dir, Ctx};
use anyhow::{bail, Context, Result};
use flash_check::engine::{self, BenchOptions, EngineSelftest, LogitsEngine, Progress};
use std::process::ExitCode;

pub fn bench(ctx: &Ctx, a: BenchEngineArgs) -> Result<ExitCode> {
    let dir = model_dir(ctx, &a.model)?;
    let gpu = gpu(a.gpu)?;
    let opts = BenchOptions {
        prompt_len: a.prompt_len,
        decode: a.decode,
        repeat: a.repeat,
        fused_decode: !a.no_fused_decode,
        kernel_cache: kernel_cache(ctx),
    };
    let r = engine::bench(&dir, &a.model, &gpu, &opts)
        .with_context(|| format!("cannot bench {} on GPU {}", dir.display(), a.gpu))?;
    let (bytes, d2d) = (r.weight_bytes_per_token, r.d2d_gbps);
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{} on {}\n  prefill {} tokens: {:.1} ms ({:.0} tokens/s)\n  \
             TTFT (32-token prompt, resident): {:.1} ms\n  \
             decode: {:.1} tokens/s ({:.2} ms/token), {:.0} % of the roofline {:.1} tokens/s \
             ({:.2} GB/token at {:.0} GB/s D2D)\n  decode with logits to host: {:.1} tokens/s\n  \
             kernels: {} ({:.3} s compile, {:.3} s load)",
            r.model,
            r.device,
            r.prompt_len,
            r.prefill_ms,
            r.prefill_tokens_per_s,
            r.ttft_short_prompt_ms,
            r.decode_tokens_per_s,
            r.decode_ms_per_token,
            100.0 * r.decode_fraction_of_roofline,
            r.roofline_tokens_per_s,
            bytes as f64 / 1e9,
            d2d,
            r.decode_with_logits_tokens_per_s,
            if r.kernels_cache_hit {
                "from the cache"
            } else {
                "compiled"
            },
            r.kernels_compile_s,
            r.kernels_load_s,
        );
        let path = |fused: bool| if fused { "fused kernels" } else { "cuBLAS" };
        if let Some(other) = r.decode_other_path_tokens_per_s {
            println!(
                "  decode products: {} ({:.1} tokens/s with {})",
                path(r.decode_fused),
                other,
                path(!r.decode_fused)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn logits(ctx: &Ctx, a: EngineLogitsArgs) -> Result<ExitCode> {
    let dir = model_dir(ctx, &a.model)?;
    let on = match a.device.as_str() {
        "cpu" => LogitsEngine::Cpu,
        "gpu" | "cuda" => LogitsEngine::Gpu {
            gpu: gpu(0)?,
            kernel_cache: kernel_cache(ctx),
            bf16_logits: a.bf16_logits,
            hf_rounding: a.hf_rounding,
        },
        other => bail!("--device {other}: gpu or cpu"),
    };
    let l = engine::logits(&dir, &a.tokens, a.prefill, &on)?;
    let bytes: Vec<u8> = l.logits.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(&a.out, bytes).with_context(|| format!("cannot write {}", a.out.display()))?;
    println!(
        "{}",
        serde_json::json!({
            "device": l.device,
            "positions": a.tokens.len(),
            "vocab_size": l.vocab_size,
            "out": a.out,
            "load_s": l.load_s,
            "forward_s": l.forward_s,
        })
    );
    Ok(ExitCode::SUCCESS)
}

/// The engine checks' progress lines on stderr.
pub fn print_progress(p: &Progress<'_>) {
    match p {
        Progress::Ops {
            checks,
            failed,
            compile_s,
            cache_hit_s,
        } => eprintln!(
            "engine: {checks} op checks, {failed} failed; kernels compiled in {compile_s:.3} s, cache hit in {cache_hit_s:.4} s"
        ),
        Progress::Model {
            label,
            result: m,
            seconds,
        } => eprintln!(
            "engine: {label} {}: top-1 {:.3}, min cos {:.6}, {} ({seconds:.1} s)",
            m.what,
            m.top1_fraction,
            m.agreement.min_cosine,
            if m.ok { "ok" } else { "FAIL" },
        ),
    }
}

/// Text lines of the engine checks.
pub fn print(r: &EngineSelftest) {
    if let Some(s) = &r.skipped {
        println!("engine: skipped ({s})");
        return;
    }
    for o in &r.ops {
        println!(
            "{:<4} op {:<24} {:<40} max abs {:.3e} rel {:.3e} (tol {:.0e})",
            if o.ok { "ok" } else { "FAIL" },
            o.op,
            o.shape,
            o.max_abs,
            o.max_rel,
            o.tolerance
        );
    }
    for m in &r.models {
        println!(
            "{:<4} engine {:<12} {:<52} top-1 {:>5.1} % min cos {:.6} max |d| {:.3e}",
            if m.ok { "ok" } else { "FAIL" },
            m.model,
            m.what,
            100.0 * m.top1_fraction,
            m.agreement.min_cosine,
            m.agreement.max_abs_diff
        );
    }
    println!(
        "engine: kernels compiled in {:.3} s, loaded from the cache in {:.4} s{}",
        r.kernels_compile_s,
        r.kernels_cache_hit_s,
        r.error
            .as_ref()
            .map(|e| format!("; ERROR: {e}"))
            .unwrap_or_default()
    );
}
