//! `flash run MODEL "prompt"`: generate text, streamed to stdout, with one
//! line of timings on stderr (or one JSON object with `--json`).
//!
//! A store model goes through the daemon (started when none runs, like
//! ollama), which keeps it resident between runs: see `run_remote`. With
//! `--no-daemon` (or a model folder, `--logits`, `--device cpu`) it runs in
//! this process on the CPU engine (flash-engine's f32 reference); the GPU
//! backend here is marked `SEAM(gpu)`.

use crate::commands::{model_name, Ctx};
use anyhow::{bail, Context, Result};
use clap::Args;
use flash_engine::{
    generate, Backend, CpuModel, CpuOptions, GenerateOptions, Generation, Message, ModelConfig,
    SamplingParams, TextTokenizer,
};
use flash_load::LoadOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// A store model (ORG/NAME) or a model folder (Hugging Face or flash format)
    pub model: String,
    /// The prompt; read from stdin when absent or "-"
    pub prompt: Option<String>,
    /// Most tokens to generate
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 = greedy [default: the model's
    /// generation_config.json when it samples, else greedy]
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Nucleus sampling: keep the most likely tokens up to this probability
    /// [default: generation_config.json, else off]
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Keep only the K most likely tokens; 0 = off [default:
    /// generation_config.json, else off]
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Penalty on tokens already seen (1 = off) [default:
    /// generation_config.json, else off]
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    /// Seed of the sampler (same seed, same text)
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop before this text (repeatable)
    #[arg(long, value_name = "TEXT")]
    pub stop: Vec<String>,
    /// A system message before the prompt (chat template only)
    #[arg(long, value_name = "TEXT", conflicts_with = "raw")]
    pub system: Option<String>,
    /// Send the prompt as is, without the chat template
    #[arg(long)]
    pub raw: bool,
    /// Print one JSON object at the end instead of streaming text
    #[arg(long)]
    pub json: bool,
    /// With --json: add "last_logits", the logits at the prompt's last
    /// position (for checking the engine against a reference)
    #[arg(long, requires = "json")]
    pub logits: bool,
    /// Run in this process instead of through the flash daemon
    #[arg(long)]
    pub no_daemon: bool,
    /// auto or cpu (the GPU engine is not in this build yet)
    #[arg(long, default_value = "auto")]
    pub device: String,
}

/// The model folder of `model`: a folder path, else a store name.
fn model_dir(ctx: &Ctx, model: &str) -> Result<PathBuf> {
    let p = Path::new(model);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    let name = model_name(model).with_context(|| {
        format!("{model:?} is neither a folder nor a store model name (ORG/NAME)")
    })?;
    Ok(ctx.store()?.existing(&name)?)
}

/// Sampling from the flags, falling back on `generation_config.json` the way
/// Hugging Face's `generate` reads it: it samples only when `do_sample` is
/// true, with its temperature, top-k and top-p.
fn sampling(a: &RunArgs, cfg: &ModelConfig) -> SamplingParams {
    let g = &cfg.generation;
    let samples = g.do_sample == Some(true);
    let from_config = |x: Option<f32>, off: f32| if samples { x.unwrap_or(off) } else { off };
    SamplingParams {
        temperature: a
            .temperature
            .unwrap_or_else(|| from_config(g.temperature.or(Some(1.0)), 0.0)),
        top_k: a
            .top_k
            .unwrap_or(if samples { g.top_k.unwrap_or(0) } else { 0 }),
        top_p: a.top_p.unwrap_or_else(|| from_config(g.top_p, 1.0)),
        repetition_penalty: a
            .repetition_penalty
            .unwrap_or(g.repetition_penalty.unwrap_or(1.0)),
        seed: a.seed,
    }
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

pub fn run(ctx: &Ctx, a: RunArgs) -> Result<ExitCode> {
    let started = Instant::now();
    match a.device.as_str() {
        "auto" | "cpu" => {}
        other => bail!("--device {other}: this build runs models on the CPU only (auto, cpu)"),
    }
    if crate::run_remote::wanted(&a) {
        // Through the daemon (started if none runs): see run_remote.
        let prompt = read_prompt(&a)?;
        return crate::run_remote::run(ctx, &a, &prompt, started);
    }
    let prompt = read_prompt(&a)?;
    let dir = model_dir(ctx, &a.model)?;

    let t0 = Instant::now();
    let cfg = ModelConfig::from_dir(&dir)?;
    let tok = TextTokenizer::from_dir(&dir)?;
    // SEAM(gpu): with `--device auto` and a usable GPU, build the GPU
    // backend here (flash-engine's gpu module) instead of the CPU one.
    let (mut model, report) = CpuModel::load(&dir, &LoadOptions::default(), &CpuOptions::default())
        .with_context(|| format!("cannot load {}", dir.display()))?;
    let load_s = t0.elapsed().as_secs_f64();
    tracing::info!(
        read_s = report.read.as_secs_f64(),
        convert_s = report.convert.as_secs_f64(),
        bytes = report.bytes,
        "model loaded"
    );

    let ids = prompt_ids(&a, &tok, &prompt)?;
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
    let mut on_text = |piece: &str| {
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
    let g = generate(&mut model, &tok, &ids, &opts, &mut on_text)?;
    if let Some(e) = write_failed {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e).context("cannot write to stdout");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let device = model.device();
    if a.json {
        print_json(&a, &dir, &device, &opts, load_s, &g)?;
    } else {
        let _ = writeln!(stdout);
    }
    if !ctx.quiet {
        eprintln!(
            "load {load_s:.2}s · prompt {} tokens, TTFT {:.3}s ({:.0} tokens/s) · {} tokens at {:.1} tokens/s · {} ({})",
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

fn print_json(
    a: &RunArgs,
    dir: &Path,
    device: &str,
    opts: &GenerateOptions,
    load_s: f64,
    g: &Generation,
) -> Result<()> {
    let s = &opts.sampling;
    let mut v = serde_json::json!({
        "model": a.model,
        "path": dir,
        "device": device,
        "engine": "cpu-f32",
        "prompt_token_ids": g.prompt_token_ids,
        "token_ids": g.token_ids,
        "text": g.text,
        "finish_reason": g.finish_reason.as_str(),
        "load_s": load_s,
        "prefill_s": g.prefill_s,
        "ttft_s": g.ttft_s,
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
