//! The load path's self-check (`flash selftest`): synthesizes models, loads
//! them through every path to every GPU (and to host memory) and checks
//! every tensor's bytes against the checksums the import recorded. The
//! binary runs it on machines that have no Rust toolchain.
//!
//! Per model (Qwen3 and Llama `tiny` in many small shards, which exercise
//! the planner's edges; on GPU machines also Qwen3 0.6B in one shard, which
//! exercises long pipelines):
//! - the flash format, the same model compressed, and the plain
//!   safetensors, each with O_DIRECT and buffered reads, whole and a
//!   subset of tensors, to host memory and to every GPU;
//! - placement through a device map (`auto`; a mixed GPU + host map on GPU
//!   machines);
//! - a corrupted compressed chunk, which every decoder (CPU, each GPU) must
//!   refuse naming the tensor and the chunk.

use crate::{CheckError, Result};
use flash_format::manifest::{checksum_hex, chunk_checksum, ChunkCodec, Manifest};
use flash_load::{
    load_placed, load_to_gpu, load_to_host, DeviceMap, IoMode, LoadOptions, ModelSource, TensorView,
};
use flash_store::{ImportOptions, ModelName, Store, StoreError};
use flash_sys::cuda::{self, Gpu};
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// One load checked: an element of the `checks` list of `flash selftest
/// --json`.
#[derive(Debug, Serialize)]
pub struct Check {
    pub model: String,
    pub device: String,
    pub source: String,
    pub io: String,
    pub subset: bool,
    pub tensors: usize,
    pub bytes: u64,
    pub seconds: f64,
    pub ok: bool,
    /// The tensors whose bytes were wrong, or what went wrong.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub wrong: Vec<String>,
}

/// Every GPU of this machine; none (and why) without a usable driver.
pub fn gpus() -> Result<(Vec<Gpu>, Option<String>)> {
    match cuda::probe() {
        Ok(c) => Ok((
            (0..c.device_count())
                .map(|i| c.device(i))
                .collect::<Result<_, _>>()?,
            None,
        )),
        Err(why) => Ok((Vec::new(), Some(why.to_string()))),
    }
}

/// The models the check synthesizes: (arch, size, largest shard).
fn models(gpus: &[Gpu]) -> Vec<(&'static str, &'static str, u64)> {
    let mut models = vec![("qwen3", "tiny", 64 << 10), ("llama", "tiny", 48 << 10)];
    if !gpus.is_empty() {
        models.push(("qwen3", "0.6b", 5_000_000_000));
    }
    models
}

/// Runs every load check in `scratch` (a folder of its own, emptied by the
/// caller) on the host and `gpus`. `on_model(label)` hears of each model
/// before its checks.
pub fn load_checks(
    scratch: &Path,
    gpus: &[Gpu],
    mut on_model: impl FnMut(&str),
) -> Result<Vec<Check>> {
    let store = Store::open(&scratch.join("store"))?;
    let mut checks = Vec::new();
    for (arch, size, shard) in models(gpus) {
        let label = format!("{arch}-{size}");
        on_model(&label);
        let m = prepare(&store, scratch, &label, (arch, size, shard))?;
        checks.extend(load_paths(&m, gpus)?);
        checks.extend(placements(&m, gpus)?);
        checks.extend(corruptions(&m, scratch, gpus));
        store.remove(&m.name)?;
        store.remove(&m.packed_name)?;
        let _ = std::fs::remove_dir_all(&m.src);
    }
    Ok(checks)
}

/// One synthesized model in its three forms, and the checksum every tensor
/// must have.
struct Prepared {
    label: String,
    /// Tiny (several staging pieces per read, small chunks) or real-sized.
    tiny: bool,
    /// The safetensors checkpoint.
    src: PathBuf,
    name: ModelName,
    /// The store's flash copy.
    flash_dir: PathBuf,
    packed_name: ModelName,
    /// The store's compressed copy: decoded on the CPU for host loads, by
    /// the GPU decoder for GPU loads.
    packed_dir: PathBuf,
    want: HashMap<String, String>,
}

fn prepare(
    store: &Store,
    scratch: &Path,
    label: &str,
    (arch, size, shard): (&str, &str, u64),
) -> Result<Prepared> {
    let src = scratch.join(label);
    let spec = flash_synth::spec(arch.parse()?, size)?;
    let opts = flash_synth::SynthOptions {
        seed: 7,
        max_shard_bytes: shard,
        ..Default::default()
    };
    flash_synth::synth(&spec, &src, &opts)?;
    let name = store_name(&format!("selftest/{label}"))?;
    store.import(&src, &name, &ImportOptions::default())?;
    let flash_dir = store.existing(&name)?;
    let want = expected(&Manifest::read(&flash_dir)?);
    let packed_name = store_name(&format!("selftest/{label}-packed"))?;
    store.import(
        &src,
        &packed_name,
        &ImportOptions {
            compress: true,
            ..ImportOptions::default()
        },
    )?;
    let packed_dir = store.existing(&packed_name)?;
    Ok(Prepared {
        label: label.to_string(),
        tiny: size == "tiny",
        src,
        name,
        flash_dir,
        packed_name,
        packed_dir,
        want,
    })
}

fn store_name(s: &str) -> Result<ModelName> {
    s.parse::<ModelName>()
        .map_err(|e| CheckError::Store(StoreError::from(e)))
}

fn device_name(gpu: Option<&Gpu>) -> String {
    gpu.map_or("cpu".into(), |g| format!("cuda:{}", g.ordinal()))
}

/// Every form × read mode × subset, to the host and to each GPU.
fn load_paths(m: &Prepared, gpus: &[Gpu]) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    let chunk = if m.tiny { 8 << 10 } else { 8 << 20 };
    for gpu in std::iter::once(None).chain(gpus.iter().map(Some)) {
        for (kind, dir) in [
            ("flash", &m.flash_dir),
            ("compressed", &m.packed_dir),
            ("safetensors", &m.src),
        ] {
            for io in [IoMode::Direct, IoMode::Buffered] {
                for subset in [false, true] {
                    let opts = LoadOptions {
                        threads: 4,
                        chunk_bytes: chunk,
                        io,
                        // Tiny models: several staging pieces per read.
                        staging_bytes: Some(if m.tiny { 4096 } else { 2 << 20 }),
                        staging_buffers: 3,
                        ..LoadOptions::default()
                    };
                    let t = Instant::now();
                    let (tensors, bytes, wrong) = check_one(dir, &m.want, gpu, &opts, subset)?;
                    checks.push(Check {
                        model: m.label.clone(),
                        device: device_name(gpu),
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
    Ok(checks)
}

/// Placement: a mixed GPU + host device map on any GPU machine, and `auto`
/// (over every GPU, or the host without one).
fn placements(m: &Prepared, gpus: &[Gpu]) -> Result<Vec<Check>> {
    let mut maps = vec![("auto", DeviceMap::Auto)];
    if !gpus.is_empty() {
        let mixed = DeviceMap::from_json(r#"{"": 0, "model.layers.1": "cpu"}"#)
            .map_err(CheckError::Invalid)?;
        maps.push(("{\"\": 0, \"model.layers.1\": \"cpu\"}", mixed));
    }
    let mut checks = Vec::new();
    for (label_map, map) in maps {
        let t = Instant::now();
        let (tensors, bytes, wrong) = check_placed(&m.flash_dir, &m.want, &map, gpus)?;
        checks.push(Check {
            model: m.label.clone(),
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
    Ok(checks)
}

/// A corrupted compressed chunk is refused by name, by the GPU decoder as
/// by the CPU one.
fn corruptions(m: &Prepared, scratch: &Path, gpus: &[Gpu]) -> Vec<Check> {
    std::iter::once(None)
        .chain(gpus.iter().map(Some))
        .map(|gpu| {
            let t = Instant::now();
            let outcome = check_corrupted(&m.packed_dir, &scratch.join("corrupt"), gpu);
            Check {
                model: m.label.clone(),
                device: device_name(gpu),
                source: "corrupted".into(),
                io: "auto".into(),
                subset: false,
                tensors: 1,
                bytes: 0,
                seconds: t.elapsed().as_secs_f64(),
                ok: outcome.is_ok(),
                wrong: outcome.err().into_iter().collect(),
            }
        })
        .collect()
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
    bytes_of: impl Fn(&TensorView) -> Option<&'a [u8]>,
) -> Vec<String> {
    views
        .iter()
        .filter(|t| {
            let got = bytes_of(t).map(|b| checksum_hex(chunk_checksum(b)));
            got.is_none() || want.get(&t.name) != got.as_ref()
        })
        .map(|t| t.name.clone())
        .collect()
}

/// The bytes of `t` in a device image copied back to the host.
fn in_image<'a>(image: &'a [u8], t: &TensorView) -> Option<&'a [u8]> {
    image.get(t.offset as usize..(t.offset + t.length) as usize)
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
            let wrong = wrong_tensors(model.tensors(), want, |t| Some(model.bytes(t)));
            Ok((model.tensors().len(), stats.bytes_read, wrong))
        }
        Some(gpu) => {
            let (model, stats) = load_to_gpu(&source, select, gpu, opts, None)?;
            let mut host = vec![0u8; model.mem.len()];
            model.mem.copy_to_host(0, &mut host)?;
            let wrong = wrong_tensors(model.tensors(), want, |t| in_image(&host, t));
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
    let result = corrupt_and_load(packed, copy, gpu);
    let _ = std::fs::remove_dir_all(copy);
    let (tensor, chunk, outcome) = result?;
    match outcome {
        Err(flash_load::LoadError::Decode {
            tensor: t,
            chunk: c,
            ..
        }) if t == tensor && c as usize == chunk => Ok(()),
        Err(e) => Err(format!(
            "corrupted chunk {chunk} of {tensor}: wrong error: {e}"
        )),
        Ok(()) => Err(format!(
            "corrupted chunk {chunk} of {tensor} loaded without an error"
        )),
    }
}

/// The load's outcome on a copy of `packed` with one coded chunk corrupted:
/// (the tensor, the chunk, the load's result).
type Corrupted = (String, usize, Result<(), flash_load::LoadError>);

fn corrupt_and_load(packed: &Path, copy: &Path, gpu: Option<&Gpu>) -> Result<Corrupted, String> {
    std::fs::create_dir_all(copy).map_err(|e| e.to_string())?;
    for e in std::fs::read_dir(packed)
        .map_err(|e| e.to_string())?
        .flatten()
    {
        std::fs::copy(e.path(), copy.join(e.file_name())).map_err(|e| e.to_string())?;
    }
    let m = Manifest::read(copy).map_err(|e| e.to_string())?;
    let (t, chunk, span) = m
        .tensors
        .iter()
        .find_map(|t| {
            let e = t.encoding.as_ref()?;
            let i = e.chunks.iter().position(|c| c.0 == ChunkCodec::Rans)?;
            let width = t.dtype.bits() / 8;
            let span = *e.spans(t.length / width.max(1), width).get(i)?;
            Some((t, i, span))
        })
        .ok_or("the compressed model has no coded chunk")?;
    let at = (t.offset + span.0 + 9) as usize;
    let file = m
        .files
        .get(t.file as usize)
        .ok_or("the manifest names a file it does not list")?;
    let path = copy.join(&file.name);
    let mut data = std::fs::read(&path).map_err(|e| e.to_string())?;
    let byte = data
        .get_mut(at)
        .ok_or("the coded chunk lies outside its file")?;
    *byte ^= 0x40;
    std::fs::write(&path, &data).map_err(|e| e.to_string())?;
    let source = ModelSource::open(copy).map_err(|e| e.to_string())?;
    let opts = LoadOptions::default();
    let result = match gpu {
        None => load_to_host(&source, None, &opts).map(|_| ()),
        Some(g) => load_to_gpu(&source, None, g, &opts, None).map(|_| ()),
    };
    Ok((t.name.clone(), chunk, result))
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
        wrong.extend(wrong_tensors(host.tensors(), want, |t| Some(host.bytes(t))));
    }
    for (_, model) in &placed.gpus {
        let mut bytes = vec![0u8; model.mem.len()];
        model.mem.copy_to_host(0, &mut bytes)?;
        tensors += model.tensors().len();
        wrong.extend(wrong_tensors(model.tensors(), want, |t| {
            in_image(&bytes, t)
        }));
    }
    let read = placed.stats.iter().map(|(_, s)| s.bytes_read).sum();
    if tensors != want.len() {
        wrong.push(format!("{} of {} tensors placed", tensors, want.len()));
    }
    Ok((tensors, read, wrong))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_checks_pass() {
        let tmp = tempfile::tempdir().unwrap();
        let mut seen = Vec::new();
        let checks = load_checks(tmp.path(), &[], |m| seen.push(m.to_string())).unwrap();
        assert_eq!(seen, ["qwen3-tiny", "llama-tiny"]);
        // Per model: 3 forms × 2 read modes × 2 subsets, one map, one
        // corrupted chunk.
        assert_eq!(checks.len(), 2 * (12 + 1 + 1));
        let failed: Vec<_> = checks.iter().filter(|c| !c.ok).collect();
        assert!(failed.is_empty(), "{failed:?}");
        let v = serde_json::to_value(&checks[0]).unwrap();
        assert!(v.get("wrong").is_none() && v["device"] == "cpu");
    }
}
