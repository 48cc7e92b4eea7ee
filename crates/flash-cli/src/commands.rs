//! Store commands: pull, list, info, rm, verify, export, synth.

use crate::args::{PullArgs, SynthArgs};
use crate::ctx::{model_name, Ctx};
use crate::progress::bytes_bar;
use anyhow::{bail, Context, Result};
use flash_format::manifest::Source;
use flash_load::LoadOptions;
use flash_store::{DtypeChoice, ImportOptions, ModelName, Store};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn human_bytes(n: u64) -> String {
    indicatif::BinaryBytes(n).to_string()
}

/// `local/<folder>` with the folder name reduced to allowed characters.
fn default_local_name(dir: &Path) -> Result<ModelName> {
    let leaf = dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let clean: String = leaf
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    let clean = clean.trim_start_matches('.').to_string();
    if clean.is_empty() {
        bail!(
            "cannot derive a model name from {}; pass --name ORG/NAME",
            dir.display()
        );
    }
    model_name(&format!("local/{clean}"))
}

pub fn pull(ctx: &Ctx, a: PullArgs) -> Result<ExitCode> {
    let store = ctx.store()?;
    let dtype: DtypeChoice = a.dtype.parse().map_err(anyhow::Error::msg)?;
    let compress = a.compress_or(store.settings()?.compress_imports());
    let bar = bytes_bar("import", ctx.quiet);
    let progress = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
    };
    let report = match &a.from {
        Some(dir) => {
            let name = match (&a.name, &a.model) {
                (Some(n), _) | (None, Some(n)) => model_name(n)?,
                (None, None) => default_local_name(dir)?,
            };
            let abs = dir
                .canonicalize()
                .with_context(|| format!("{}: cannot open", dir.display()))?;
            if a.force {
                drop_daemon_copies(ctx, &store, &name)?;
            }
            let opts = ImportOptions {
                dtype,
                force: a.force,
                source: Source {
                    kind: "local".into(),
                    path: Some(abs.display().to_string()),
                    ..Default::default()
                },
                progress: Some(&progress),
                compress,
            };
            store.import_tp(&abs, &name, &opts, a.tp)?
        }
        None => {
            let Some(model) = &a.model else {
                bail!("name a model (ORG/NAME) or a folder with --from DIR");
            };
            let mut name = model_name(model)?;
            if a.revision.is_some() {
                name.revision = a.revision.clone();
            }
            if a.force {
                drop_daemon_copies(ctx, &store, &name)?;
            }
            let hub = flash_hub::HubClient::from_env().with_progress(!ctx.quiet);
            let opts = ImportOptions {
                dtype,
                force: a.force,
                progress: Some(&progress),
                compress,
                ..Default::default()
            };
            store.pull_tp(&hub, &name, &opts, a.tp)?
        }
    };
    bar.finish_and_clear();
    if a.json {
        print_json(&report)?;
    } else {
        let stored = if report.compressed {
            format!(
                "{} compressed to {} ({:.3})",
                human_bytes(report.tensor_bytes),
                human_bytes(report.bytes),
                report.bytes as f64 / report.tensor_bytes.max(1) as f64
            )
        } else {
            human_bytes(report.bytes)
        };
        let ranks = if report.ranks > 1 {
            format!(" in each of {} tensor-parallel ranks", report.ranks)
        } else {
            String::new()
        };
        println!(
            "{}: {} tensors{ranks} ({} identical to another, stored once), {stored} in {:.1}s -> {}",
            report.model_id,
            report.tensors + report.aliases,
            report.aliases,
            report.seconds,
            report.path.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn list(ctx: &Ctx, json: bool) -> Result<ExitCode> {
    let models = ctx.store()?.list()?;
    if json {
        print_json(&models)?;
        return Ok(ExitCode::SUCCESS);
    }
    if models.is_empty() {
        println!("no models (add one with `flash pull ORG/NAME` or `flash pull --from DIR`)");
        return Ok(ExitCode::SUCCESS);
    }
    let w = models
        .iter()
        .map(|m| m.model_id.len())
        .max()
        .unwrap_or(5)
        .max(5);
    println!(
        "{:<w$}  {:>10}  {:>10}  {:>6}  {:<6}  {:<24}  SOURCE",
        "MODEL", "SIZE", "ON DISK", "RATIO", "DTYPE", "ARCHITECTURE"
    );
    for m in &models {
        println!(
            "{:<w$}  {:>10}  {:>10}  {:>6.3}  {:<6}  {:<24}  {}",
            m.model_id,
            human_bytes(m.size),
            human_bytes(m.stored_bytes),
            m.stored_bytes as f64 / m.size.max(1) as f64,
            m.dtype.map(|d| d.to_string()).unwrap_or_default(),
            m.architecture.as_deref().unwrap_or("-"),
            m.source
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn info(ctx: &Ctx, model: &str, json: bool) -> Result<ExitCode> {
    let i = ctx.store()?.info(&model_name(model)?)?;
    if json {
        print_json(&i)?;
    } else {
        println!("model_id      {}", i.model_id);
        println!("size          {} ({} bytes)", human_bytes(i.size), i.size);
        println!(
            "on disk       {} ({} bytes, {:.3} of the size{})",
            human_bytes(i.stored_bytes),
            i.stored_bytes,
            i.stored_bytes as f64 / i.size.max(1) as f64,
            if i.compressed { ", compressed" } else { "" }
        );
        println!(
            "dtype         {}",
            i.dtype.map(|d| d.to_string()).unwrap_or_default()
        );
        println!("architecture  {}", i.architecture.as_deref().unwrap_or("-"));
        println!("tensors       {}", i.tensor_count);
        println!("ranks         {}", i.ranks);
        println!("source        {}", i.source);
        println!("revision      {}", i.revision.as_deref().unwrap_or("-"));
        println!("path          {}", i.path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// `flash config [KEY [VALUE]]`: the store's defaults.
pub fn config(ctx: &Ctx, key: Option<&str>, value: Option<&str>, json: bool) -> Result<ExitCode> {
    let store = ctx.store()?;
    let mut settings = store.settings()?;
    match (key, value) {
        (None, _) => {}
        (Some("compress"), None) => {}
        (Some("compress"), Some(v)) => {
            settings.compress = match v {
                "on" | "true" | "1" | "yes" => Some(true),
                "off" | "false" | "0" | "no" => Some(false),
                "auto" => None,
                other => bail!("compress takes on, off or auto, not {other:?}"),
            };
            store.set_settings(&settings)?;
        }
        (Some(other), _) => bail!("unknown setting {other:?} (settings: compress)"),
    }
    let imports_compress = settings.compress_imports();
    let (setting, why) = match settings.compress {
        Some(true) => ("on", "set"),
        Some(false) => ("off", "set"),
        None if imports_compress => ("auto", "this machine has an NVIDIA GPU"),
        None => ("auto", "no NVIDIA GPU here"),
    };
    if json {
        print_json(&serde_json::json!({
            "compress": setting,
            "imports_compress": imports_compress,
        }))?;
    } else {
        println!(
            "compress  {setting}: imports {} ({why}; `flash pull --compress` / `--no-compress` override; \
             auto compresses where a GPU decodes)",
            if imports_compress { "compress" } else { "store plain" },
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn rm(ctx: &Ctx, model: &str) -> Result<ExitCode> {
    let name = model_name(model)?;
    let store = ctx.store()?;
    // A daemon serving this store drops its copies first, and refuses while
    // a client holds one, before the files go.
    match flash_client::Client::connect(&ctx.home()) {
        Ok(c) if store.contains(&name) => {
            c.remove(&name.to_string())
                .with_context(|| format!("removing {name} through the daemon"))?;
        }
        _ => store.remove(&name)?,
    }
    println!("removed {name}");
    Ok(ExitCode::SUCCESS)
}

/// Before `name` is replaced in the store: a daemon serving it drops its
/// copies (and refuses, naming the lease, while a client holds one), so it
/// never serves the old weights.
fn drop_daemon_copies(ctx: &Ctx, store: &Store, name: &ModelName) -> Result<()> {
    if !store.contains(name) {
        return Ok(());
    }
    if let Ok(c) = flash_client::Client::connect(&ctx.home()) {
        c.unload(&name.to_string(), flash_client::Place::Auto)
            .with_context(|| {
                format!("{name} cannot be replaced while the daemon's copy is in use")
            })?;
    }
    Ok(())
}

pub fn verify(ctx: &Ctx, model: &str, json: bool) -> Result<ExitCode> {
    let name = model_name(model)?;
    let bar = bytes_bar("verify", ctx.quiet);
    let progress = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
    };
    let report = ctx
        .store()?
        .verify(&name, &LoadOptions::default(), Some(&progress))?;
    bar.finish_and_clear();
    if json {
        print_json(&report)?;
    } else if report.ok() {
        println!(
            "{}: ok, {} chunks, {} in {:.2}s",
            report.model_id,
            report.chunks,
            human_bytes(report.bytes),
            report.seconds
        );
    } else {
        for b in &report.bad {
            let what = if b.tensors.is_empty() {
                "padding only".to_string()
            } else {
                format!("tensor {}", b.tensors.join(", "))
            };
            eprintln!(
                "error: {}: checksum mismatch in {} bytes [{}, +{}): {what}",
                report.model_id, b.file, b.offset, b.len
            );
        }
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub fn export(
    ctx: &Ctx,
    model: &str,
    to: &Path,
    shard_size: u64,
    rank: Option<u32>,
) -> Result<ExitCode> {
    let name = model_name(model)?;
    let store = ctx.store()?;
    let opts = LoadOptions::default();
    let files = match rank {
        Some(r) => store.export_rank(&name, r, to, shard_size, &opts)?,
        None => store.export(&name, to, shard_size, &opts)?,
    };
    println!(
        "{name}: {} safetensors file(s) in {}",
        files.len(),
        to.display()
    );
    Ok(ExitCode::SUCCESS)
}

pub fn synth(ctx: &Ctx, a: SynthArgs) -> Result<ExitCode> {
    let arch: flash_synth::Arch = a.arch.parse()?;
    let mut spec = flash_synth::spec(arch, &a.size)?;
    if let Some(h) = a.head_dim {
        spec.shape.head_dim = h;
        spec.validate()?;
    }
    let dtype = match a.dtype.parse::<DtypeChoice>().map_err(anyhow::Error::msg)? {
        DtypeChoice::To(d) => d,
        DtypeChoice::Auto => flash_format::DType::BF16,
    };
    let bar = bytes_bar("synth", ctx.quiet);
    let b = bar.clone();
    let opts = flash_synth::SynthOptions {
        seed: a.seed,
        dtype,
        max_shard_bytes: a.shard_size,
        progress: Some(Arc::new(move |done, total| {
            b.set_length(total);
            b.set_position(done);
        })),
    };
    let report = flash_synth::synth(&spec, &a.out, &opts)?;
    bar.finish_and_clear();
    if a.json {
        print_json(&serde_json::json!({
            "dir": report.dir,
            "files": report.files,
            "total_bytes": report.total_bytes,
            "data_bytes": report.data_bytes,
            "tensors": report.tensors,
            "params": report.params,
            "seconds": report.elapsed.as_secs_f64(),
        }))?;
    } else {
        println!(
            "{} {}: {} tensors, {:.3}B params, {} in {:.1}s -> {}",
            arch.name(),
            a.size,
            report.tensors,
            report.params as f64 / 1e9,
            human_bytes(report.total_bytes),
            report.elapsed.as_secs_f64(),
            report.dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
