//! The GPU engine from the command line:
//! - `flash bench-engine MODEL`: prefill and decode speed of the GPU engine
//!   with the model resident, against the roofline (weight bytes per token
//!   over the device-to-device bandwidth, measured as `flash doctor` does);
//! - `flash engine-logits MODEL --tokens ...` (hidden): teacher-forced
//!   logits of every position, for checking the engine against a reference
//!   (tests/gpu/test_engine_vs_transformers.py);
//! - the engine part of `flash selftest`: every GPU op against the CPU, the
//!   kernel cache (compile vs. hit), and the GPU engine against the CPU
//!   reference forward on synthesized Qwen3 and Llama models.

use crate::commands::{model_name, Ctx};
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use flash_engine::gpu::{compare_logits, GpuEngine, GpuOptions, LogitsAgreement};
use flash_engine::{Backend, CpuModel, CpuOptions, ModelConfig};
use flash_kernels::ops::{self, check::check_ops, Kernels};
use flash_load::LoadOptions;
use flash_sys::cuda::{self, Gpu};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct BenchEngineArgs {
    /// A store model (ORG/NAME) or a model folder
    pub model: String,
    /// Tokens of the timed prefill
    #[arg(long, default_value_t = 512)]
    pub prompt_len: usize,
    /// Tokens decoded one at a time after the prefill
    #[arg(long, default_value_t = 128)]
    pub decode: usize,
    /// Timed repetitions (the best is reported)
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// GPU ordinal
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
    /// Decode with cuBLAS products only (not the fused decode kernels)
    #[arg(long)]
    pub no_fused_decode: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct EngineLogitsArgs {
    /// A store model (ORG/NAME) or a model folder
    pub model: String,
    /// Token ids, comma-separated
    #[arg(long, value_delimiter = ',', required = true)]
    pub tokens: Vec<u32>,
    /// File to write: little-endian f32 [tokens, vocab]
    #[arg(long)]
    pub out: PathBuf,
    /// gpu or cpu (the f32 reference)
    #[arg(long, default_value = "gpu")]
    pub device: String,
    /// Decode one token at a time after a prefill of this many (0: one
    /// batched pass over all tokens)
    #[arg(long, default_value_t = 0)]
    pub prefill: usize,
    /// GPU: logits rounded to bf16, as transformers' bf16 lm_head gives them
    #[arg(long)]
    pub bf16_logits: bool,
    /// GPU: round like transformers' bf16 forward (bf16 residual stream, bf16 RoPE)
    #[arg(long)]
    pub hf_rounding: bool,
}

// Shared with `flash run` (in-process): one resolution of a model, a GPU
// and the kernel cache for every command that builds an engine.

/// The model folder of `model`: a folder path, else a store name (ORG/NAME).
pub(crate) fn model_dir(ctx: &Ctx, model: &str) -> Result<PathBuf> {
    let p = Path::new(model);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    let name = model_name(model).with_context(|| {
        format!("{model:?} is neither a folder nor a store model name (ORG/NAME)")
    })?;
    Ok(ctx.store()?.existing(&name)?)
}

/// GPU `ordinal`, or an error that names it (`cuda:N`) and says why it is
/// not usable (no driver, no such GPU). Never panics without a driver.
pub(crate) fn gpu(ordinal: usize) -> Result<Gpu> {
    let c = cuda::probe().map_err(|why| anyhow!("cuda:{ordinal}: no usable GPU: {why}"))?;
    c.device(ordinal)
        .with_context(|| format!("cuda:{ordinal} is not usable"))
}

/// Where compiled kernels are cached: `$FLASH_KERNEL_CACHE`, else the
/// store's `kernels` folder (the daemon's too, so a warm start hits it).
pub(crate) fn kernel_cache(ctx: &Ctx) -> Option<PathBuf> {
    flash_kernels::default_kernel_cache(Some(&ctx.home()))
}

/// The device-to-device bandwidth (bytes read + written per second), as
/// `flash doctor` measures it: the best of 3 copies of up to 1 GiB.
fn d2d_gbps(gpu: &Gpu) -> Result<f64> {
    let (free, _) = gpu.mem_info()?;
    let bytes = (1usize << 30).min((free as usize / 4) & !((1 << 20) - 1));
    anyhow::ensure!(bytes >= 1 << 20, "only {free} bytes free on the GPU");
    let (a, b) = (gpu.alloc(bytes)?, gpu.alloc(bytes)?);
    let s = gpu.stream()?;
    let (start, end) = (gpu.event(true)?, gpu.event(true)?);
    let mut best = f32::MAX;
    for _ in 0..3 {
        start.record(&s)?;
        a.copy_to_device(0, &b, 0, bytes, &s)?;
        end.record(&s)?;
        best = best.min(start.elapsed_ms(&end)?);
    }
    Ok(2.0 * bytes as f64 / (best as f64 / 1e3) / 1e9)
}

/// Deterministic token ids in `0..vocab`.
fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = ops::check::Rng::new(seed);
    (0..n)
        .map(|_| (rng.next_u64() % vocab as u64) as u32)
        .collect()
}

#[derive(Serialize)]
struct BenchReport {
    model: String,
    device: String,
    weight_bytes_per_token: u64,
    d2d_gbps: f64,
    roofline_tokens_per_s: f64,
    load_s: f64,
    setup_s: f64,
    kernels_cache_hit: bool,
    kernels_compile_s: f64,
    kernels_load_s: f64,
    prompt_len: usize,
    prefill_ms: f64,
    prefill_tokens_per_s: f64,
    ttft_short_prompt_ms: f64,
    decode_tokens: usize,
    decode_tokens_per_s: f64,
    decode_ms_per_token: f64,
    decode_fraction_of_roofline: f64,
    decode_with_logits_tokens_per_s: f64,
    /// Whether decode used the fused kernels (else cuBLAS only).
    decode_fused: bool,
    /// Decode tokens/s on the other path (cuBLAS when fused, and back),
    /// measured right after; absent when only one path can run.
    decode_other_path_tokens_per_s: Option<f64>,
    profile: flash_engine::gpu::DecodeProfile,
}

pub fn bench(ctx: &Ctx, a: BenchEngineArgs) -> Result<ExitCode> {
    let dir = model_dir(ctx, &a.model)?;
    let gpu = gpu(a.gpu)?;
    let d2d = d2d_gbps(&gpu).context("measuring the device-to-device bandwidth")?;
    let opts = GpuOptions {
        max_seq_len: Some((a.prompt_len + a.decode + 1).max(64)),
        batch_tokens: a.prompt_len.clamp(1, 2048),
        kernel_cache: kernel_cache(ctx),
        fused_decode: !a.no_fused_decode,
        ..Default::default()
    };
    let t0 = Instant::now();
    let (mut e, report) = GpuEngine::load(&dir, &gpu, &LoadOptions::default(), &opts)
        .with_context(|| format!("cannot load {} onto GPU {}", dir.display(), a.gpu))?;
    let load_s = t0.elapsed().as_secs_f64();
    let vocab = e.config().vocab_size;
    let prompt = tokens(a.prompt_len.max(1), vocab, 1);
    let repeat = a.repeat.max(1);

    // Warm up (cuBLAS picks its kernels on first use).
    e.forward_greedy(&prompt[..prompt.len().min(16)], 0)?;
    e.forward_greedy(&prompt, 0)?;
    let mut next = e.forward_greedy(&[1], prompt.len())?;

    let mut prefill = f64::MAX;
    for _ in 0..repeat {
        let t = Instant::now();
        next = e.forward_greedy(&prompt, 0)?;
        prefill = prefill.min(t.elapsed().as_secs_f64());
    }
    // A chat-sized prompt: prefill + the first token, model resident.
    let short = &prompt[..prompt.len().min(32)];
    let mut ttft = f64::MAX;
    for _ in 0..repeat {
        let t = Instant::now();
        e.forward_greedy(short, 0)?;
        ttft = ttft.min(t.elapsed().as_secs_f64());
    }

    let n = a.decode.max(1);
    // Greedy decode of n tokens after the prompt (best of `repeat`).
    let time_decode = |e: &mut GpuEngine| -> Result<f64> {
        let mut best = f64::MAX;
        for _ in 0..repeat {
            e.forward_greedy(&prompt, 0)?;
            let t = Instant::now();
            let mut tok = next;
            for i in 0..n {
                tok = e.forward_greedy(&[tok], prompt.len() + i)?;
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        Ok(best)
    };
    let decode = time_decode(&mut e)?;
    let fused = e.set_fused_decode(!a.no_fused_decode);
    // The other product path, same engine, same run (an A/B of the fused
    // decode kernels against cuBLAS).
    let other_path = e.set_fused_decode(a.no_fused_decode);
    let decode_other = if other_path != fused {
        Some(n as f64 / time_decode(&mut e)?)
    } else {
        None
    };
    e.set_fused_decode(!a.no_fused_decode);
    let mut decode_logits = f64::MAX;
    for _ in 0..repeat {
        // With the logits copied to the host (what sampling needs).
        e.forward_greedy(&prompt, 0)?;
        let t = Instant::now();
        let mut tok = next;
        for i in 0..n {
            let l = e.forward(&[tok], prompt.len() + i)?;
            tok = l
                .iter()
                .enumerate()
                .fold((0, f32::MIN), |b, (j, &v)| if v > b.1 { (j, v) } else { b })
                .0 as u32;
        }
        decode_logits = decode_logits.min(t.elapsed().as_secs_f64());
    }
    let profile = e.profile_decode(prompt.len(), repeat.max(3))?;
    let bytes = e.decode_weight_bytes();
    let roofline = d2d * 1e9 / bytes.max(1) as f64;
    let tps = n as f64 / decode;
    let k = e.kernel_info();
    let r = BenchReport {
        model: a.model.clone(),
        device: e.device(),
        weight_bytes_per_token: bytes,
        d2d_gbps: d2d,
        roofline_tokens_per_s: roofline,
        load_s,
        setup_s: report.setup.as_secs_f64(),
        kernels_cache_hit: k.cache_hit,
        kernels_compile_s: k.compile_seconds,
        kernels_load_s: k.cache_seconds + k.load_seconds,
        prompt_len: prompt.len(),
        prefill_ms: prefill * 1e3,
        prefill_tokens_per_s: prompt.len() as f64 / prefill,
        ttft_short_prompt_ms: ttft * 1e3,
        decode_tokens: n,
        decode_tokens_per_s: tps,
        decode_ms_per_token: decode * 1e3 / n as f64,
        decode_fraction_of_roofline: tps / roofline,
        decode_with_logits_tokens_per_s: n as f64 / decode_logits,
        decode_fused: fused,
        decode_other_path_tokens_per_s: decode_other,
        profile,
    };
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
    let lo = LoadOptions::default();
    let t = Instant::now();
    let (mut model, device): (Box<dyn Backend>, String) = match a.device.as_str() {
        "cpu" => {
            let (m, _) = CpuModel::load(&dir, &lo, &CpuOptions::default())?;
            (Box::new(m), "cpu".into())
        }
        "gpu" | "cuda" => {
            let opts = GpuOptions {
                max_seq_len: Some(a.tokens.len().max(1)),
                kernel_cache: kernel_cache(ctx),
                bf16_logits: a.bf16_logits,
                hf_rounding: a.hf_rounding,
                ..Default::default()
            };
            let (m, _) = GpuEngine::load(&dir, &gpu(0)?, &lo, &opts)?;
            let d = m.device();
            (Box::new(m), d)
        }
        other => bail!("--device {other}: gpu or cpu"),
    };
    let load_s = t.elapsed().as_secs_f64();
    let v = model.config().vocab_size;
    let t = Instant::now();
    let out = if a.prefill == 0 || a.prefill >= a.tokens.len() {
        model.forward_all(&a.tokens, 0)?
    } else {
        let mut out = model.forward_all(&a.tokens[..a.prefill], 0)?;
        for i in a.prefill..a.tokens.len() {
            out.extend_from_slice(model.forward(&a.tokens[i..i + 1], i)?);
        }
        out
    };
    let forward_s = t.elapsed().as_secs_f64();
    let bytes: Vec<u8> = out.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(&a.out, bytes).with_context(|| format!("cannot write {}", a.out.display()))?;
    println!(
        "{}",
        serde_json::json!({
            "device": device,
            "positions": a.tokens.len(),
            "vocab_size": v,
            "out": a.out,
            "load_s": load_s,
            "forward_s": forward_s,
        })
    );
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------
// selftest
// ---------------------------------------------------------------------------

#[derive(Debug, Serialize)]
pub struct OpResult {
    op: String,
    shape: String,
    max_abs: f64,
    max_rel: f64,
    tolerance: f64,
    ok: bool,
}

#[derive(Debug, Serialize)]
pub struct ModelResult {
    model: String,
    what: String,
    #[serde(flatten)]
    agreement: LogitsAgreement,
    top1_fraction: f64,
    ok: bool,
}

#[derive(Debug, Serialize, Default)]
pub struct EngineSelftest {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub kernels_compile_s: f64,
    pub kernels_cache_hit_s: f64,
    pub ops: Vec<OpResult>,
    pub models: Vec<ModelResult>,
}

/// The engine checks of `flash selftest`. Without a GPU: skipped (ok).
pub fn selftest(scratch: &Path, gpu: Option<&Gpu>, big: bool) -> EngineSelftest {
    let Some(gpu) = gpu else {
        return EngineSelftest {
            ok: true,
            skipped: Some("no GPU".into()),
            ..Default::default()
        };
    };
    let mut r = EngineSelftest::default();
    if let Err(e) = selftest_gpu(scratch, gpu, big, &mut r) {
        r.error = Some(format!("{e:#}"));
    }
    r.ok = r.error.is_none()
        && !r.ops.is_empty()
        && r.ops.iter().all(|o| o.ok)
        && r.models.iter().all(|m| m.ok);
    r
}

fn selftest_gpu(scratch: &Path, gpu: &Gpu, big: bool, r: &mut EngineSelftest) -> Result<()> {
    let cache = scratch.join("kernels");
    let _ = std::fs::remove_dir_all(&cache);
    let (checks, info) = check_ops(gpu, Some(&cache))?;
    r.kernels_compile_s = info.compile_seconds;
    let t = Instant::now();
    let again = Kernels::load(gpu, Some(&cache))?;
    r.kernels_cache_hit_s = t.elapsed().as_secs_f64();
    if !again.info().cache_hit {
        bail!("the kernel cache was not used on the second load");
    }
    eprintln!(
        "engine: {} op checks, {} failed; kernels compiled in {:.3} s, cache hit in {:.4} s",
        checks.len(),
        checks.iter().filter(|c| !c.ok).count(),
        r.kernels_compile_s,
        r.kernels_cache_hit_s
    );
    r.ops = checks
        .into_iter()
        .map(|c| OpResult {
            op: c.op,
            shape: c.shape,
            max_abs: c.max_abs,
            max_rel: c.max_rel,
            tolerance: c.tolerance,
            ok: c.ok,
        })
        .collect();
    let mut models = vec![("qwen3", "tiny"), ("llama", "tiny")];
    if big {
        models.extend([("qwen3", "0.6b"), ("llama", "1b")]);
    }
    for (arch, size) in models {
        let label = format!("{arch}-{size}");
        let dir = scratch.join(format!("engine-{label}"));
        let _ = std::fs::remove_dir_all(&dir);
        let spec = flash_synth::spec(arch.parse()?, size)?;
        flash_synth::synth(&spec, &dir, &flash_synth::SynthOptions::default())
            .with_context(|| format!("synthesizing {label}"))?;
        let t = Instant::now();
        let res = compare_model(&dir, gpu, &cache, &label);
        let _ = std::fs::remove_dir_all(&dir);
        let res = res?;
        for m in &res {
            eprintln!(
                "engine: {label} {}: top-1 {:.3}, min cos {:.6}, {} ({:.1} s)",
                m.what,
                m.top1_fraction,
                m.agreement.min_cosine,
                if m.ok { "ok" } else { "FAIL" },
                t.elapsed().as_secs_f64()
            );
        }
        r.models.extend(res);
    }
    Ok(())
}

fn model_result(label: &str, what: &str, a: LogitsAgreement, top1: f64, cos: f64) -> ModelResult {
    ModelResult {
        model: label.into(),
        what: what.into(),
        top1_fraction: a.top1_fraction(),
        ok: a.passes(top1, cos),
        agreement: a,
    }
}

/// GPU vs. CPU on 64 teacher-forced positions; the GPU's decode path and
/// chunked prefill against its own batched pass; short chunks (the fused
/// products) against the CPU; greedy argmax on the device against the
/// logits.
fn compare_model(dir: &Path, gpu: &Gpu, cache: &Path, label: &str) -> Result<Vec<ModelResult>> {
    let lo = LoadOptions::default();
    let cfg = ModelConfig::from_dir(dir)?;
    let v = cfg.vocab_size;
    let ids = tokens(64, v, 7);
    let want = {
        let (mut cpu, _) = CpuModel::load(dir, &lo, &CpuOptions::default())?;
        cpu.forward_all(&ids, 0)?
    };
    let opts = GpuOptions {
        max_seq_len: Some(128),
        kernel_cache: Some(cache.to_path_buf()),
        ..Default::default()
    };
    let (mut g, _) = GpuEngine::load(dir, gpu, &lo, &opts)?;
    let got = g.forward_all(&ids, 0)?;
    // The GPU's logits are bf16 (as transformers'): compare with the
    // reference's rounded the same way.
    let want: Vec<f32> = if opts.bf16_logits {
        want.iter().map(|&x| ops::check::round_bf16(x)).collect()
    } else {
        want
    };
    let mut out = vec![model_result(
        label,
        "gpu vs cpu reference, 64 positions teacher-forced",
        compare_logits(&got, &want, v),
        0.95,
        0.999,
    )];
    // Prefill 40, then 24 single-token decode steps.
    let mut inc = g.forward_all(&ids[..40], 0)?;
    for i in 40..ids.len() {
        inc.extend_from_slice(g.forward(&ids[i..i + 1], i)?);
    }
    out.push(model_result(
        label,
        "gpu decode steps vs gpu batched",
        compare_logits(&inc, &got, v),
        0.9,
        0.999,
    ));
    // Chunks of 13 tokens: the fused kernels' multi-token path (a launch of
    // 8 tokens and one of 5 per product, lm_head included).
    let mut short = Vec::with_capacity(got.len());
    for (c, chunk) in ids.chunks(13).enumerate() {
        short.extend_from_slice(&g.forward_all(chunk, c * 13)?);
    }
    out.push(model_result(
        label,
        "gpu chunks of 13 tokens (fused products) vs cpu reference",
        compare_logits(&short, &want, v),
        0.9,
        0.999,
    ));
    // Rewind and greedy: the device argmax equals the host argmax.
    let l = g.forward(&ids[..10], 0)?.to_vec();
    let greedy = g.forward_greedy(&ids[..10], 0)?;
    let host = compare_logits(&l, &want[9 * v..10 * v], v);
    let host_top = l
        .iter()
        .enumerate()
        .fold(
            (0usize, f32::MIN),
            |b, (j, &x)| if x > b.1 { (j, x) } else { b },
        )
        .0;
    let same = LogitsAgreement {
        positions: 1,
        top1_agree: usize::from(host_top == greedy as usize),
        min_cosine: 1.0,
        mean_cosine: 1.0,
        max_abs_diff: 0.0,
    };
    out.push(model_result(
        label,
        "device argmax vs host argmax",
        same,
        1.0,
        0.0,
    ));
    out.push(model_result(
        label,
        "gpu rewind to position 0 vs cpu",
        host,
        0.0,
        0.999,
    ));
    // Small chunks (prefill in pieces of 16) against the batched pass.
    let opts16 = GpuOptions {
        batch_tokens: 16,
        ..opts
    };
    drop(g);
    let (mut g16, _) = GpuEngine::load(dir, gpu, &lo, &opts16)?;
    let chunked = g16.forward_all(&ids, 0)?;
    out.push(model_result(
        label,
        "gpu prefill in chunks of 16 vs one pass",
        compare_logits(&chunked, &got, v),
        0.9,
        0.999,
    ));
    Ok(out)
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
