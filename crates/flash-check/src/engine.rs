//! The inference engine measured and checked:
//! - [`bench()`]: prefill and decode speed of the GPU engine with the model
//!   resident, against the roofline (weight bytes per token over the
//!   device-to-device bandwidth, measured as the doctor does);
//! - [`logits`]: teacher-forced logits of every position, for checking the
//!   engine against a reference (tests/gpu/test_engine_vs_transformers.py);
//! - [`selftest`]: every GPU op against the CPU, the kernel cache (compile
//!   vs. hit), and the GPU engine against the CPU reference forward on
//!   synthesized Qwen3 and Llama models.

use crate::{limits, CheckError, Result};
use flash_engine::gpu::{compare_logits, DecodeProfile, GpuEngine, GpuOptions, LogitsAgreement};
use flash_engine::{Backend, CpuModel, CpuOptions, ModelConfig};
use flash_kernels::ops::{self, check::check_ops, Kernels};
use flash_load::LoadOptions;
use flash_sys::cuda::Gpu;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Deterministic token ids in `0..vocab`.
pub fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = ops::check::Rng::new(seed);
    (0..n)
        .map(|_| (rng.next_u64() % vocab.max(1) as u64) as u32)
        .collect()
}

/// The index of the largest value (0 for none).
fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f32::MIN), |b, (j, &x)| if x > b.1 { (j, x) } else { b })
        .0
}

// ---------------------------------------------------------------------------
// bench
// ---------------------------------------------------------------------------

/// What to time.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Tokens of the timed prefill.
    pub prompt_len: usize,
    /// Tokens decoded one at a time after the prefill.
    pub decode: usize,
    /// Timed repetitions (the best is reported).
    pub repeat: usize,
    /// Decode with the fused kernels (else cuBLAS products only).
    pub fused_decode: bool,
    /// Where compiled kernels are cached.
    pub kernel_cache: Option<PathBuf>,
}

/// The report of `flash bench-engine` (its JSON).
#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub device: String,
    pub weight_bytes_per_token: u64,
    pub d2d_gbps: f64,
    pub roofline_tokens_per_s: f64,
    pub load_s: f64,
    pub setup_s: f64,
    pub kernels_cache_hit: bool,
    pub kernels_compile_s: f64,
    pub kernels_load_s: f64,
    pub prompt_len: usize,
    pub prefill_ms: f64,
    pub prefill_tokens_per_s: f64,
    pub ttft_short_prompt_ms: f64,
    pub decode_tokens: usize,
    pub decode_tokens_per_s: f64,
    pub decode_ms_per_token: f64,
    pub decode_fraction_of_roofline: f64,
    pub decode_with_logits_tokens_per_s: f64,
    /// Whether decode used the fused kernels (else cuBLAS only).
    pub decode_fused: bool,
    /// Decode tokens/s on the other path (cuBLAS when fused, and back),
    /// measured right after; absent when only one path can run.
    pub decode_other_path_tokens_per_s: Option<f64>,
    pub profile: DecodeProfile,
}

/// Loads the model of `dir` onto `gpu` and times it: prefill, a chat-sized
/// prompt, decode on both product paths, decode with the logits copied to
/// the host; `label` names the model in the report.
pub fn bench(dir: &Path, label: &str, gpu: &Gpu, o: &BenchOptions) -> Result<BenchReport> {
    let d2d = limits::d2d_gbps(gpu).map_err(|e| {
        CheckError::Failed(format!("measuring the device-to-device bandwidth: {e}"))
    })?;
    let opts = GpuOptions {
        max_seq_len: Some((o.prompt_len + o.decode + 1).max(64)),
        batch_tokens: o.prompt_len.clamp(1, 2048),
        kernel_cache: o.kernel_cache.clone(),
        fused_decode: o.fused_decode,
        ..Default::default()
    };
    let t0 = Instant::now();
    let (mut e, report) = GpuEngine::load(dir, gpu, &LoadOptions::default(), &opts)?;
    let load_s = t0.elapsed().as_secs_f64();
    let prompt = tokens(o.prompt_len.max(1), e.config().vocab_size, 1);
    let repeat = o.repeat.max(1);
    let n = o.decode.max(1);

    // Warm up (cuBLAS picks its kernels on first use).
    e.forward_greedy(&prompt[..prompt.len().min(16)], 0)?;
    e.forward_greedy(&prompt, 0)?;
    e.forward_greedy(&[1], prompt.len())?;
    let (prefill, next) = time_prefill(&mut e, &prompt, repeat)?;
    // A chat-sized prompt: prefill + the first token, model resident.
    let (ttft, _) = time_prefill(&mut e, &prompt[..prompt.len().min(32)], repeat)?;
    let decode = time_decode(&mut e, &prompt, next, n, repeat, Argmax::Device)?;
    let fused = e.set_fused_decode(o.fused_decode);
    // The other product path, same engine, same run (an A/B of the fused
    // decode kernels against cuBLAS).
    let other_path = e.set_fused_decode(!o.fused_decode);
    let decode_other = if other_path != fused {
        Some(n as f64 / time_decode(&mut e, &prompt, next, n, repeat, Argmax::Device)?)
    } else {
        None
    };
    e.set_fused_decode(o.fused_decode);
    let decode_logits = time_decode(&mut e, &prompt, next, n, repeat, Argmax::Host)?;
    let profile = e.profile_decode(prompt.len(), repeat.max(3))?;
    let bytes = e.decode_weight_bytes();
    let roofline = d2d * 1e9 / bytes.max(1) as f64;
    let tps = n as f64 / decode;
    let k = e.kernel_info();
    Ok(BenchReport {
        model: label.to_string(),
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
    })
}

/// The best of `repeat` greedy passes over `prompt` from position 0
/// (seconds), and the token the last one picked.
fn time_prefill(e: &mut GpuEngine, prompt: &[u32], repeat: usize) -> Result<(f64, u32)> {
    let (mut best, mut next) = (f64::MAX, 0);
    for _ in 0..repeat {
        let t = Instant::now();
        next = e.forward_greedy(prompt, 0)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok((best, next))
}

/// How a timed decode step picks the next token.
#[derive(Clone, Copy)]
enum Argmax {
    /// On the device (`forward_greedy`): one token crosses to the host.
    Device,
    /// On the host, with the logits copied there each step (what sampling
    /// needs).
    Host,
}

/// Greedy decode of `n` tokens after the prompt (best of `repeat`,
/// seconds).
fn time_decode(
    e: &mut GpuEngine,
    prompt: &[u32],
    next: u32,
    n: usize,
    repeat: usize,
    argmax_on: Argmax,
) -> Result<f64> {
    let mut best = f64::MAX;
    for _ in 0..repeat {
        e.forward_greedy(prompt, 0)?;
        let t = Instant::now();
        let mut tok = next;
        for i in 0..n {
            let pos = prompt.len() + i;
            tok = match argmax_on {
                Argmax::Device => e.forward_greedy(&[tok], pos)?,
                Argmax::Host => argmax(e.forward(&[tok], pos)?) as u32,
            };
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

// ---------------------------------------------------------------------------
// logits
// ---------------------------------------------------------------------------

/// Which engine computes teacher-forced logits.
#[derive(Clone, Debug)]
pub enum LogitsEngine {
    /// The f32 CPU reference.
    Cpu,
    /// The GPU engine (bf16 weights).
    Gpu {
        gpu: Gpu,
        kernel_cache: Option<PathBuf>,
        /// Logits rounded to bf16, as transformers' bf16 lm_head gives them.
        bf16_logits: bool,
        /// Round like transformers' bf16 forward (bf16 residual stream, bf16 RoPE).
        hf_rounding: bool,
    },
}

/// Teacher-forced logits of a token sequence.
pub struct Logits {
    /// `[positions, vocab]`, row-major.
    pub logits: Vec<f32>,
    pub device: String,
    pub vocab_size: usize,
    pub load_s: f64,
    pub forward_s: f64,
}

/// The logits of every position of `tokens` on `engine`: one batched pass,
/// or (`prefill` between 1 and the length) a prefill of that many tokens
/// and then one token at a time.
pub fn logits(dir: &Path, tokens: &[u32], prefill: usize, engine: &LogitsEngine) -> Result<Logits> {
    let lo = LoadOptions::default();
    let t = Instant::now();
    let (mut model, device): (Box<dyn Backend>, String) = match engine {
        LogitsEngine::Cpu => {
            let (m, _) = CpuModel::load(dir, &lo, &CpuOptions::default())?;
            (Box::new(m), "cpu".into())
        }
        LogitsEngine::Gpu {
            gpu,
            kernel_cache,
            bf16_logits,
            hf_rounding,
        } => {
            let opts = GpuOptions {
                max_seq_len: Some(tokens.len().max(1)),
                kernel_cache: kernel_cache.clone(),
                bf16_logits: *bf16_logits,
                hf_rounding: *hf_rounding,
                ..Default::default()
            };
            let (m, _) = GpuEngine::load(dir, gpu, &lo, &opts)?;
            let d = m.device();
            (Box::new(m), d)
        }
    };
    let load_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let logits = if prefill == 0 || prefill >= tokens.len() {
        model.forward_all(tokens, 0)?
    } else {
        let mut out = model.forward_all(&tokens[..prefill], 0)?;
        for i in prefill..tokens.len() {
            out.extend_from_slice(model.forward(&tokens[i..i + 1], i)?);
        }
        out
    };
    Ok(Logits {
        logits,
        device,
        vocab_size: model.config().vocab_size,
        load_s,
        forward_s: t.elapsed().as_secs_f64(),
    })
}

// ---------------------------------------------------------------------------
// selftest
// ---------------------------------------------------------------------------

/// One GPU op against its CPU computation.
#[derive(Debug, Serialize)]
pub struct OpResult {
    pub op: String,
    pub shape: String,
    pub max_abs: f64,
    pub max_rel: f64,
    pub tolerance: f64,
    pub ok: bool,
}

/// One comparison of the GPU engine on a synthesized model.
#[derive(Debug, Serialize)]
pub struct ModelResult {
    pub model: String,
    pub what: String,
    #[serde(flatten)]
    pub agreement: LogitsAgreement,
    pub top1_fraction: f64,
    pub ok: bool,
}

/// The engine part of `flash selftest` (its `engine` object).
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

/// What the engine checks have done so far, as they go.
pub enum Progress<'a> {
    /// The op checks ran and the kernels were loaded again from the cache.
    Ops {
        checks: usize,
        failed: usize,
        compile_s: f64,
        cache_hit_s: f64,
    },
    /// One comparison on a model, `seconds` into that model's checks.
    Model {
        label: &'a str,
        result: &'a ModelResult,
        seconds: f64,
    },
}

/// The engine checks of `flash selftest` in `scratch`; `big` adds Qwen3
/// 0.6B and Llama 1B to the tiny models. Without a GPU: skipped (ok).
pub fn selftest(
    scratch: &Path,
    gpu: Option<&Gpu>,
    big: bool,
    mut progress: impl FnMut(Progress<'_>),
) -> EngineSelftest {
    let Some(gpu) = gpu else {
        return EngineSelftest {
            ok: true,
            skipped: Some("no GPU".into()),
            ..Default::default()
        };
    };
    let mut r = EngineSelftest::default();
    if let Err(e) = selftest_gpu(scratch, gpu, big, &mut r, &mut progress) {
        r.error = Some(e.to_string());
    }
    r.ok = r.error.is_none()
        && !r.ops.is_empty()
        && r.ops.iter().all(|o| o.ok)
        && r.models.iter().all(|m| m.ok);
    r
}

fn selftest_gpu(
    scratch: &Path,
    gpu: &Gpu,
    big: bool,
    r: &mut EngineSelftest,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<()> {
    let cache = scratch.join("kernels");
    let _ = std::fs::remove_dir_all(&cache);
    let (checks, info) = check_ops(gpu, Some(&cache))?;
    r.kernels_compile_s = info.compile_seconds;
    let t = Instant::now();
    let again = Kernels::load(gpu, Some(&cache))?;
    r.kernels_cache_hit_s = t.elapsed().as_secs_f64();
    if !again.info().cache_hit {
        return Err(CheckError::Failed(
            "the kernel cache was not used on the second load".into(),
        ));
    }
    progress(Progress::Ops {
        checks: checks.len(),
        failed: checks.iter().filter(|c| !c.ok).count(),
        compile_s: r.kernels_compile_s,
        cache_hit_s: r.kernels_cache_hit_s,
    });
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
        flash_synth::synth(&spec, &dir, &flash_synth::SynthOptions::default())?;
        let t = Instant::now();
        let res = compare_model(&dir, gpu, &cache, &label);
        let _ = std::fs::remove_dir_all(&dir);
        let res = res?;
        for m in &res {
            progress(Progress::Model {
                label: &label,
                result: m,
                seconds: t.elapsed().as_secs_f64(),
            });
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
    out.extend(decode_paths(&mut g, &ids, &got, &want, v, label)?);
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

/// The GPU's other ways through the same positions, against its batched
/// pass (`got`) or the CPU reference (`want`): decode steps, chunks of 13
/// tokens, the device argmax, a rewind to position 0.
fn decode_paths(
    g: &mut GpuEngine,
    ids: &[u32],
    got: &[f32],
    want: &[f32],
    v: usize,
    label: &str,
) -> Result<Vec<ModelResult>> {
    let mut out = Vec::new();
    // Prefill 40, then 24 single-token decode steps.
    let mut inc = g.forward_all(&ids[..40], 0)?;
    for i in 40..ids.len() {
        inc.extend_from_slice(g.forward(&ids[i..i + 1], i)?);
    }
    out.push(model_result(
        label,
        "gpu decode steps vs gpu batched",
        compare_logits(&inc, got, v),
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
        compare_logits(&short, want, v),
        0.9,
        0.999,
    ));
    // Rewind and greedy: the device argmax equals the host argmax.
    let l = g.forward(&ids[..10], 0)?.to_vec();
    let greedy = g.forward_greedy(&ids[..10], 0)?;
    let tenth = want.get(9 * v..10 * v).unwrap_or_default();
    let host = compare_logits(&l, tenth, v);
    let same = LogitsAgreement {
        positions: 1,
        top1_agree: usize::from(argmax(&l) == greedy as usize),
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
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selftest_without_a_gpu_is_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let r = selftest(tmp.path(), None, false, |_| {});
        assert!(r.ok && r.skipped.as_deref() == Some("no GPU"));
        let v = serde_json::to_value(&r).unwrap();
        assert!(v.get("error").is_none() && v["ops"].as_array().unwrap().is_empty());
    }

    #[test]
    fn token_ids_are_in_range_and_repeatable() {
        let a = tokens(100, 7, 3);
        assert!(a.iter().all(|&t| t < 7));
        assert_eq!(a, tokens(100, 7, 3));
        assert_eq!(argmax(&[0.5, 2.0, -1.0]), 1);
    }

    #[test]
    fn cpu_logits_have_every_position() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        let spec = flash_synth::spec(flash_synth::Arch::Qwen3, "tiny").unwrap();
        flash_synth::synth(&spec, &dir, &flash_synth::SynthOptions::default()).unwrap();
        let ids = [1, 2, 3, 4];
        let all = logits(&dir, &ids, 0, &LogitsEngine::Cpu).unwrap();
        assert_eq!(all.logits.len(), ids.len() * all.vocab_size);
        let stepped = logits(&dir, &ids, 2, &LogitsEngine::Cpu).unwrap();
        let close = all
            .logits
            .iter()
            .zip(&stepped.logits)
            .all(|(a, b)| (a - b).abs() < 1e-3);
        assert!(close && all.device == "cpu");
    }
}
