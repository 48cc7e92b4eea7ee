//! `flash run MODEL "prompt"`: generate text, streamed to stdout, with one
//! line of timings on stderr (or one JSON object with `--json`).
//!
//! A store model goes through the daemon (started when none runs, like
//! ollama), which keeps it resident between runs: see `run_remote`. With
//! `--no-daemon` (or a model folder, `--logits`, `--device cpu|cuda:N`) it
//! runs in this process: on the GPU engine (flash-engine's `GpuEngine`,
//! weights streamed from disk straight to the GPU by the loader) when
//! `--device` is `cuda:N`, or `auto` with a usable GPU and an all-bf16
//! model; else on the CPU engine (the f32 reference). Both sit behind
//! flash-engine's `Backend`, so generation, `--json` and `--logits` are the
//! same on either. The TTFT it prints is measured from this process's
//! start, as through the daemon.

use crate::args::RunArgs;
use crate::clock::ProcessClock;
use crate::ctx::{gpu, kernel_cache, model_dir, Ctx};
use anyhow::{bail, Context, Result};
use flash_engine::{
    generate, Backend, CpuModel, CpuOptions, GenerateOptions, Generation, GpuEngine, GpuOptions,
    Message, ModelConfig, SamplingParams, SamplingRequest, TextTokenizer, FUSED_MAX_TOKENS,
};
use flash_format::DType;
use flash_load::{LoadOptions, ModelSource};
use flash_sys::cuda::Gpu;
use flash_sys::os;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

/// Sampling from the flags, falling back on `generation_config.json` as the
/// daemon's API does ([`SamplingRequest::resolve`]).
fn sampling(a: &RunArgs, cfg: &ModelConfig) -> SamplingParams {
    SamplingRequest {
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        repetition_penalty: a.repetition_penalty,
        seed: a.seed,
    }
    .resolve(&cfg.generation)
}

fn read_prompt(a: &RunArgs) -> Result<String> {
    match a.prompt.as_deref() {
        Some(p) if p != "-" => Ok(p.to_string()),
        _ => {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                .context("cannot read the prompt from stdin")?;
            // `echo "..." | flash run MODEL`: the newline is echo's, not the prompt's.
            if s.ends_with('\n') {
                s.pop();
            }
            Ok(s)
        }
    }
}

/// The prompt's token ids: through the chat template unless `--raw` (or the
/// model has none, e.g. a base model: then raw, with a warning).
fn prompt_ids(a: &RunArgs, tok: &TextTokenizer, prompt: &str) -> Result<Vec<u32>> {
    if a.raw {
        return Ok(tok.encode(prompt, true)?);
    }
    if !tok.has_chat_template() {
        tracing::warn!("the model has no chat template; sending the prompt raw");
        return Ok(tok.encode(prompt, true)?);
    }
    let mut messages = Vec::new();
    if let Some(s) = &a.system {
        messages.push(Message::new("system", s));
    }
    messages.push(Message::new("user", prompt));
    let text = tok.apply_chat_template(&messages, true)?;
    Ok(tok.encode(&text, false)?)
}

/// Where `--device` asks to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DeviceChoice {
    /// GPU 0 when usable and the model is all bf16, else the CPU.
    Auto,
    Cpu,
    /// This GPU, or an error.
    Cuda(usize),
}

impl DeviceChoice {
    /// The GPU this choice opens (auto: GPU 0).
    fn ordinal(self) -> usize {
        match self {
            DeviceChoice::Cuda(n) => n,
            _ => 0,
        }
    }
}

/// The GPU, opened on a thread of its own as soon as the model's headers
/// say it is wanted ([`wants_gpu`]): CUDA's driver start and the GPU's
/// context take a few hundred milliseconds on a cold machine, which overlap
/// reading the config and the tokenizer.
type EarlyGpu = Option<std::thread::JoinHandle<Result<Gpu>>>;

fn open_gpu_early(choice: DeviceChoice, source: &ModelSource) -> EarlyGpu {
    wants_gpu(choice, source).then(|| std::thread::spawn(move || gpu(choice.ordinal())))
}

/// Whether to try the GPU: `cuda:N` always; `auto` for a model that is all
/// bf16 (the GPU engine reads bf16 weights), else the CPU with one info
/// line, as the daemon does.
fn wants_gpu(choice: DeviceChoice, source: &ModelSource) -> bool {
    match choice {
        DeviceChoice::Cpu => false,
        DeviceChoice::Cuda(_) => true,
        DeviceChoice::Auto => match source.tensors.iter().find(|t| t.dtype != DType::BF16) {
            Some(t) => {
                tracing::info!(
                    tensor = %t.name,
                    dtype = %t.dtype,
                    "the model is not all bf16: running on the CPU engine"
                );
                false
            }
            None => true,
        },
    }
}

fn parse_device(s: &str) -> Result<DeviceChoice> {
    Ok(match s {
        "auto" => DeviceChoice::Auto,
        "cpu" => DeviceChoice::Cpu,
        "cuda" | "gpu" => DeviceChoice::Cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => DeviceChoice::Cuda(n),
            _ => bail!("--device {other:?}: expected auto, cpu or cuda:N"),
        },
    })
}

/// The GPU to run on, `None` for the CPU: the early GPU once open.
/// `cuda:N` must be usable (the error names it); `auto` falls back to the
/// CPU quietly (one info line) without a usable GPU 0.
fn pick_gpu(choice: DeviceChoice, early: EarlyGpu) -> Result<Option<Gpu>> {
    let Some(h) = early else {
        return Ok(None);
    };
    let opened = h
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("opening the GPU panicked")));
    match (choice, opened) {
        (_, Ok(g)) => Ok(Some(g)),
        (DeviceChoice::Auto, Err(e)) => {
            tracing::info!("{e:#}: running on the CPU engine");
            Ok(None)
        }
        (_, Err(e)) => Err(e),
    }
}

/// Where a load reads the model from: "page cache" when most of its bytes
/// are cached (the loader then reads buffered), else "disk" (O_DIRECT).
fn load_source(source: &ModelSource) -> &'static str {
    let (mut cached, mut total) = (0.0, 0.0);
    for f in &source.files {
        let residency = std::fs::File::open(&f.path)
            .and_then(|file| os::page_cache_residency(&file))
            .unwrap_or(0.0);
        cached += residency * f.len as f64;
        total += f.len as f64;
    }
    if total > 0.0 && cached >= 0.5 * total {
        "page cache"
    } else {
        "disk"
    }
}

/// The model loaded in this process, ready to generate.
struct Loaded {
    backend: Box<dyn Backend>,
    /// "gpu-bf16" or "cpu-f32" (the `engine` field of `--json`).
    engine: &'static str,
    /// "disk" or "page cache".
    from: &'static str,
}

/// Loads the model of `dir` (its `source` and `cfg` already read) on
/// `gpu`, else on the CPU; `opts` are the GPU engine's.
fn load(
    dir: &Path,
    source: &ModelSource,
    cfg: &ModelConfig,
    (choice, gpu): (DeviceChoice, Option<Gpu>),
    opts: &GpuOptions,
    clock: &ProcessClock,
) -> Result<Loaded> {
    let from = load_source(source);
    let lo = LoadOptions::default();
    match gpu {
        Some(gpu) => {
            let ordinal = gpu.ordinal();
            // From the process start to here: reading the prompt, config and
            // tokenizer, opening the GPU (overlapped), the model's headers.
            let load_from_s = clock.now();
            let loaded = GpuEngine::load_from(cfg.clone(), source, &gpu, &lo, opts);
            let (engine, report) = loaded.with_context(|| {
                let hint = if choice == DeviceChoice::Auto {
                    " (--device cpu runs it on the CPU)"
                } else {
                    ""
                };
                format!("cannot load {} onto cuda:{ordinal}{hint}", dir.display())
            })?;
            let k = engine.kernel_info();
            tracing::info!(
                load_from_s,
                read_s = report.load.as_secs_f64(),
                gbps = report.stats.gbps(),
                setup_s = report.setup.as_secs_f64(),
                kernels_cached = k.cache_hit,
                from,
                "model loaded onto the GPU"
            );
            Ok(Loaded {
                backend: Box::new(engine),
                engine: "gpu-bf16",
                from,
            })
        }
        None => {
            let (model, report) = CpuModel::load(dir, &lo, &CpuOptions::default())
                .with_context(|| format!("cannot load {}", dir.display()))?;
            tracing::info!(
                read_s = report.read.as_secs_f64(),
                convert_s = report.convert.as_secs_f64(),
                bytes = report.bytes,
                from,
                "model loaded"
            );
            Ok(Loaded {
                backend: Box::new(model),
                engine: "cpu-f32",
                from,
            })
        }
    }
}

pub fn run(ctx: &Ctx, a: RunArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let choice = parse_device(&a.device)?;
    if crate::run_remote::wanted(&a) {
        // Through the daemon (started if none runs): see run_remote.
        let prompt = read_prompt(&a)?;
        return crate::run_remote::run(ctx, &a, &prompt, started);
    }
    let clock = ProcessClock::new(started);
    let prompt = read_prompt(&a)?;
    let dir = model_dir(ctx, &a.model)?;
    let source =
        ModelSource::open(&dir).with_context(|| format!("cannot open {}", dir.display()))?;
    let early = open_gpu_early(choice, &source);

    let t0 = Instant::now();
    let cfg = ModelConfig::from_dir(&dir)?;
    let tok = TextTokenizer::from_dir(&dir)?;
    let ids = prompt_ids(&a, &tok, &prompt)?;
    // A short prompt runs on the fused kernels alone (decode always does):
    // cuBLAS's ~600 MB of libraries are then not read from a cold disk
    // while the weights are (anything later that needs it loads it).
    let blas_at_load = ids.len() > FUSED_MAX_TOKENS;
    // `--logits` works on either engine (the prompt's last logits come back
    // through `Backend::forward`); the GPU's come from bf16 weights, so a
    // check against an f32 reference wants `--device cpu`.
    let Loaded {
        backend: mut model,
        engine,
        from,
    } = load(
        &dir,
        &source,
        &cfg,
        (choice, pick_gpu(choice, early)?),
        &GpuOptions {
            // Prompt + tokens to generate: the KV cache, allocated up front.
            max_seq_len: Some(
                (ids.len() + a.max_tokens).clamp(1, cfg.max_position_embeddings.max(1)),
            ),
            kernel_cache: kernel_cache(ctx),
            blas_at_load,
            ..Default::default()
        },
        &clock,
    )?;
    drop(source);
    let load_s = t0.elapsed().as_secs_f64();

    let mut eos = cfg.eos_token_ids.clone();
    let opts = GenerateOptions {
        max_tokens: a.max_tokens,
        sampling: sampling(&a, &cfg),
        stop_strings: a.stop.clone(),
        eos_token_ids: std::mem::take(&mut eos),
        keep_prompt_logits: a.logits,
    };
    let stream = !a.json;
    let mut stdout = std::io::stdout().lock();
    let mut write_failed = None;
    let mut first_text: Option<f64> = None;
    let mut on_text = |piece: &str| {
        first_text.get_or_insert_with(|| clock.now());
        if !stream {
            return true;
        }
        match stdout
            .write_all(piece.as_bytes())
            .and_then(|_| stdout.flush())
        {
            Ok(()) => true,
            Err(e) => {
                // A closed pipe (`| head`) ends generation quietly.
                write_failed = Some(e);
                false
            }
        }
    };
    let g = generate(model.as_mut(), &tok, &ids, &opts, &mut on_text)?;
    // No text at all (an end-of-sequence first): the first token came at
    // the end.
    let ttft_s = first_text.unwrap_or_else(|| clock.now());
    if let Some(e) = write_failed {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e).context("cannot write to stdout");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let device = model.device();
    let t = Timings {
        engine,
        from,
        load_s,
        ttft_s,
    };
    if a.json {
        print_json(&a, &dir, &device, &opts, &t, &g)?;
    } else {
        let _ = writeln!(stdout);
    }
    if !ctx.quiet {
        eprintln!(
            "load {load_s:.2}s (from {from}) · prompt {} tokens, TTFT {ttft_s:.3}s from process start \
             ({:.3}s after the load, prefill {:.0} tokens/s) · {} tokens at {:.1} tokens/s · {} ({})",
            g.prompt_token_ids.len(),
            g.ttft_s,
            g.prefill_tokens_per_s(),
            g.token_ids.len(),
            g.tokens_per_s(),
            device,
            g.finish_reason.as_str(),
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// What `flash run` measured around the generation.
struct Timings {
    engine: &'static str,
    from: &'static str,
    load_s: f64,
    /// From the process start to the first text.
    ttft_s: f64,
}

fn print_json(
    a: &RunArgs,
    dir: &Path,
    device: &str,
    opts: &GenerateOptions,
    t: &Timings,
    g: &Generation,
) -> Result<()> {
    let s = &opts.sampling;
    let mut v = serde_json::json!({
        "model": a.model,
        "path": dir,
        "device": device,
        "engine": t.engine,
        "prompt_token_ids": g.prompt_token_ids,
        "token_ids": g.token_ids,
        "text": g.text,
        "finish_reason": g.finish_reason.as_str(),
        "load_s": t.load_s,
        "served_from": t.from,
        "prefill_s": g.prefill_s,
        "ttft_s": t.ttft_s,
        "engine_ttft_s": g.ttft_s,
        "decode_s": g.decode_s,
        "tokens_per_s": g.tokens_per_s(),
        "sampling": {
            "temperature": short(s.temperature),
            "top_k": s.top_k,
            "top_p": short(s.top_p),
            "repetition_penalty": short(s.repetition_penalty),
            "seed": g.seed,
        },
    });
    if let (Some(l), Some(o)) = (&g.prompt_logits, v.as_object_mut()) {
        o.insert("last_logits".into(), serde_json::json!(l));
    }
    println!("{}", serde_json::to_string(&v)?);
    Ok(())
}

/// An f32 as the f64 of its shortest decimal form (0.6, not 0.6000000238418579).
fn short(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::from(x))
}
