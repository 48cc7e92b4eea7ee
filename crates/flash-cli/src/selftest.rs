//! `flash selftest`: synthesizes models, loads them through every path to
//! every GPU (and to host memory) and checks every tensor's bytes against the
//! checksums the import recorded. The binary checks itself on machines that
//! have no Rust toolchain; the exit code says it all.

use crate::commands::Ctx;
use anyhow::{Context, Result};
use flash_format::manifest::{checksum_hex, chunk_checksum, Manifest};
use flash_load::{
    load_placed, load_to_gpu, load_to_host, DeviceMap, IoMode, LoadOptions, ModelSource, TensorView,
};
use flash_store::{ImportOptions, ModelName, Store};
use flash_sys::cuda::{self, Gpu};
use serde::Serialize;
use std::collections::HashMap;
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

#[derive(Debug, Serialize)]
struct Check {
    model: String,
    device: String,
    source: String,
    io: String,
    subset: bool,
    tensors: usize,
    bytes: u64,
    seconds: f64,
    ok: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    wrong: Vec<String>,
}

/// Expected checksum of every tensor name (aliases take their target's).
fn expected(m: &Manifest) -> HashMap<String, String> {
    let mut map: HashMap<String, String> = m
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.checksum.clone()))
        .collect();
    for (alias, target) in &m.aliases {
        if let Some(sum) = map.get(target).cloned() {
            map.insert(alias.clone(), sum);
        }
    }
    map
}

fn wrong_tensors<'a>(
    views: &'a [TensorView],
    want: &HashMap<String, String>,
    bytes_of: impl Fn(&TensorView) -> &'a [u8],
) -> Vec<String> {
    views
        .iter()
        .filter(|t| want.get(&t.name) != Some(&checksum_hex(chunk_checksum(bytes_of(t)))))
        .map(|t| t.name.clone())
        .collect()
}

fn check_one(
    dir: &Path,
    want: &HashMap<String, String>,
    gpu: Option<&Gpu>,
    opts: &LoadOptions,
    subset: bool,
) -> Result<(usize, u64, Vec<String>)> {
    let source = ModelSource::open(dir)?;
    let every_other = |name: &str| name.len() % 2 == 0;
    let select: Option<&dyn Fn(&str) -> bool> = if subset { Some(&every_other) } else { None };
    match gpu {
        None => {
            let (model, stats) = load_to_host(&source, select, opts)?;
            let wrong = wrong_tensors(model.tensors(), want, |t| model.bytes(t));
            Ok((model.tensors().len(), stats.bytes_read, wrong))
        }
        Some(gpu) => {
            let (model, stats) = load_to_gpu(&source, select, gpu, opts, None)?;
            let mut host = vec![0u8; model.mem.len()];
            model.mem.copy_to_host(0, &mut host)?;
            let wrong = wrong_tensors(model.tensors(), want, |t| {
                &host[t.offset as usize..(t.offset + t.length) as usize]
            });
            Ok((model.tensors().len(), stats.bytes_read, wrong))
        }
    }
}

/// Copies a compressed model, flips a byte of a lane state of its first
/// coded chunk (the stream can no longer end in the state it must) and
/// loads it: the load must fail with an error naming that tensor and chunk.
/// `Err` says what went wrong instead.
fn check_corrupted(packed: &Path, copy: &Path, gpu: Option<&Gpu>) -> Result<(), String> {
    let _ = std::fs::remove_dir_all(copy);
    std::fs::create_dir_all(copy).map_err(|e| e.to_string())?;
    for e in std::fs::read_dir(packed)
        .map_err(|e| e.to_string())?
        .flatten()
    {
        std::fs::copy(e.path(), copy.join(e.file_name())).map_err(|e| e.to_string())?;
    }
    let m = Manifest::read(copy).map_err(|e| e.to_string())?;
    let (t, chunk) = m
        .tensors
        .iter()
        .find_map(|t| {
            let e = t.encoding.as_ref()?;
            let i = e
                .chunks
                .iter()
                .position(|c| c.0 == flash_format::manifest::ChunkCodec::Rans)?;
            Some((t, i))
        })
        .ok_or("the compressed model has no coded chunk")?;
    let e = t.encoding.as_ref().expect("found above");
    let at = t.offset + e.spans(t.length / (t.dtype.bits() / 8), t.dtype.bits() / 8)[chunk].0;
    let path = copy.join(&m.files[t.file as usize].name);
    let mut data = std::fs::read(&path).map_err(|e| e.to_string())?;
    data[(at + 9) as usize] ^= 0x40;
    std::fs::write(&path, &data).map_err(|e| e.to_string())?;
    let source = ModelSource::open(copy).map_err(|e| e.to_string())?;
    let opts = LoadOptions::default();
    let result = match gpu {
        None => load_to_host(&source, None, &opts).map(|_| ()),
        Some(g) => load_to_gpu(&source, None, g, &opts, None).map(|_| ()),
    };
    let _ = std::fs::remove_dir_all(copy);
    match result {
        Err(flash_load::LoadError::Decode {
            tensor, chunk: c, ..
        }) if tensor == t.name && c as usize == chunk => Ok(()),
        Err(e) => Err(format!(
            "corrupted chunk {chunk} of {}: wrong error: {e}",
            t.name
        )),
        Ok(()) => Err(format!(
            "corrupted chunk {chunk} of {} loaded without an error",
            t.name
        )),
    }
}

/// Loads through a device_map and checks every tensor where it landed.
fn check_placed(
    dir: &Path,
    want: &HashMap<String, String>,
    map: &DeviceMap,
    gpus: &[Gpu],
) -> Result<(usize, u64, Vec<String>)> {
    let source = ModelSource::open(dir)?;
    let placed = load_placed(&source, map, gpus, &LoadOptions::default())?;
    let mut tensors = 0;
    let mut wrong = Vec::new();
    if let Some(host) = &placed.host {
        tensors += host.tensors().len();
        wrong.extend(wrong_tensors(host.tensors(), want, |t| host.bytes(t)));
    }
    for (_, model) in &placed.gpus {
        let mut bytes = vec![0u8; model.mem.len()];
        model.mem.copy_to_host(0, &mut bytes)?;
        tensors += model.tensors().len();
        wrong.extend(wrong_tensors(model.tensors(), want, |t| {
            &bytes[t.offset as usize..(t.offset + t.length) as usize]
        }));
    }
    let read = placed.stats.iter().map(|(_, s)| s.bytes_read).sum();
    if tensors != want.len() {
        wrong.push(format!("{} of {} tensors placed", tensors, want.len()));
    }
    Ok((tensors, read, wrong))
}

pub fn run(ctx: &Ctx, require_gpu: bool, json: bool, engine_only: bool) -> Result<ExitCode> {
    let store_root = ctx.store()?.root().to_path_buf();
    let scratch = store_root
        .join("tmp")
        .join(format!("selftest-{}-0", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    let result = run_in(&scratch, require_gpu, json, engine_only);
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

fn run_in(scratch: &Path, require_gpu: bool, json: bool, engine_only: bool) -> Result<ExitCode> {
    let gpus: Vec<Gpu> = match cuda::probe() {
        Ok(c) => (0..c.device_count())
            .map(|i| c.device(i))
            .collect::<Result<_, _>>()?,
        Err(why) => {
            eprintln!("selftest: no GPU ({why}); checking the host paths only");
            Vec::new()
        }
    };
    // Small models in many small shards exercise the planner's edges; a
    // real-sized one (GPU machines only) exercises long pipelines.
    let mut models = vec![("qwen3", "tiny", 64 << 10), ("llama", "tiny", 48 << 10)];
    if engine_only {
        models.clear();
    } else if !gpus.is_empty() {
        models.push(("qwen3", "0.6b", 5_000_000_000));
    }
    let store = Store::open(&scratch.join("store"))?;
    let mut checks = Vec::new();
    for (arch, size, shard) in models {
        let label = format!("{arch}-{size}");
        let src = scratch.join(&label);
        let spec = flash_synth::spec(arch.parse()?, size)?;
        let opts = flash_synth::SynthOptions {
            seed: 7,
            max_shard_bytes: shard,
            ..Default::default()
        };
        flash_synth::synth(&spec, &src, &opts).with_context(|| format!("synthesizing {label}"))?;
        let name: ModelName = format!("selftest/{label}").parse()?;
        store.import(&src, &name, &ImportOptions::default())?;
        let flash_dir = store.existing(&name)?;
        let want = expected(&Manifest::read(&flash_dir)?);
        // The same model stored compressed: decoded on the CPU for host
        // loads, by the GPU decoder for GPU loads.
        let packed: ModelName = format!("selftest/{label}-packed").parse()?;
        store.import(
            &src,
            &packed,
            &ImportOptions {
                compress: true,
                ..ImportOptions::default()
            },
        )?;
        let packed_dir = store.existing(&packed)?;
        let chunk = if size == "tiny" { 8 << 10 } else { 8 << 20 };
        let devices: Vec<Option<&Gpu>> =
            std::iter::once(None).chain(gpus.iter().map(Some)).collect();
        for gpu in devices {
            for (kind, dir) in [
                ("flash", &flash_dir),
                ("compressed", &packed_dir),
                ("safetensors", &src),
            ] {
                for io in [IoMode::Direct, IoMode::Buffered] {
                    for subset in [false, true] {
                        let lopts = LoadOptions {
                            threads: 4,
                            chunk_bytes: chunk,
                            io,
                            // Tiny models: several staging pieces per read.
                            staging_bytes: if size == "tiny" { 4096 } else { 2 << 20 },
                            staging_buffers: 3,
                            ..LoadOptions::default()
                        };
                        let t = Instant::now();
                        let (tensors, bytes, wrong) = check_one(dir, &want, gpu, &lopts, subset)?;
                        checks.push(Check {
                            model: label.clone(),
                            device: gpu.map_or("cpu".into(), |g| format!("cuda:{}", g.ordinal())),
                            source: kind.into(),
                            io: format!("{io:?}").to_lowercase(),
                            subset,
                            tensors,
                            bytes,
                            seconds: t.elapsed().as_secs_f64(),
                            ok: wrong.is_empty() && tensors > 0,
                            wrong,
                        });
                    }
                }
            }
        }
        // Placement: a mixed GPU + host device_map on any GPU machine, and
        // `auto` (over every GPU, or the host without one).
        let mut maps = vec![("auto", DeviceMap::Auto)];
        if !gpus.is_empty() {
            let mixed = DeviceMap::from_json(r#"{"": 0, "model.layers.1": "cpu"}"#)
                .map_err(anyhow::Error::msg)?;
            maps.push(("{\"\": 0, \"model.layers.1\": \"cpu\"}", mixed));
        }
        for (label_map, map) in maps {
            let t = Instant::now();
            let (tensors, bytes, wrong) = check_placed(&flash_dir, &want, &map, &gpus)?;
            checks.push(Check {
                model: label.clone(),
                device: format!("map {label_map}"),
                source: "flash".into(),
                io: "auto".into(),
                subset: false,
                tensors,
                bytes,
                seconds: t.elapsed().as_secs_f64(),
                ok: wrong.is_empty() && tensors > 0,
                wrong,
            });
        }
        // A corrupted compressed chunk is refused by name, by the GPU
        // decoder as by the CPU one.
        for gpu in std::iter::once(None).chain(gpus.iter().map(Some)) {
            let t = Instant::now();
            let outcome = check_corrupted(&packed_dir, &scratch.join("corrupt"), gpu);
            checks.push(Check {
                model: label.clone(),
                device: gpu.map_or("cpu".into(), |g| format!("cuda:{}", g.ordinal())),
                source: "corrupted".into(),
                io: "auto".into(),
                subset: false,
                tensors: 1,
                bytes: 0,
                seconds: t.elapsed().as_secs_f64(),
                ok: outcome.is_ok(),
                wrong: outcome.err().into_iter().collect(),
            });
        }
        store.remove(&name)?;
        store.remove(&packed)?;
        std::fs::remove_dir_all(&src).ok();
    }
    // The inference engine: ops vs. CPU, kernel cache, GPU vs. CPU forward.
    let engine = crate::engine_cli::selftest(scratch, gpus.first(), true);
    let failed = checks.iter().filter(|c| !c.ok).count() + usize::from(!engine.ok);
    let gpu_missing = require_gpu && gpus.is_empty();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "ok": failed == 0 && !gpu_missing,
                "gpus": gpus.len(),
                "checks": checks,
                "engine": engine,
            }))?
        );
    } else {
        for c in &checks {
            println!(
                "{:<4} {:<11} {:<7} {:<11} {:<8} {:<6} {:>4} tensors {:>12} bytes {:>7.3}s{}",
                if c.ok { "ok" } else { "FAIL" },
                c.model,
                c.device,
                c.source,
                c.io,
                if c.subset { "subset" } else { "all" },
                c.tensors,
                c.bytes,
                c.seconds,
                if c.wrong.is_empty() {
                    String::new()
                } else {
                    format!("  wrong: {}", c.wrong.join(", "))
                }
            );
        }
        crate::engine_cli::print(&engine);
        println!(
            "selftest: {} checks, {failed} failed, {} GPU(s)",
            checks.len(),
            gpus.len()
        );
    }
    if gpu_missing {
        eprintln!("selftest: --require-gpu given but no GPU is usable");
    }
    Ok(if failed == 0 && !gpu_missing {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
