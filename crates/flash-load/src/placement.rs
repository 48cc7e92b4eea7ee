//! Placement: which tensors go to which device, as `device_map` says it in
//! transformers and accelerate.
//!
//! - `{"": 0}`: everything on GPU 0;
//! - `{"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1,
//!   "lm_head": "cpu"}`: each tensor goes where its longest matching prefix
//!   says; a prefix matches whole dotted components (`model.layers.1`
//!   matches `model.layers.1.mlp.up_proj.weight`, not `model.layers.10...`);
//! - `"auto"`: decoder blocks (`*.layers.N.*`) kept whole and spread over the
//!   GPUs in order, each GPU taking a share of the bytes proportional to its
//!   free memory.
//!
//! Loads to several devices run in parallel, one pipeline per device, the
//! reader threads split between them.

use crate::error::LoadError;
use crate::gpu::{load_to_gpu, GpuModel};
use crate::host::{load_to_host, HostModel};
use crate::pipeline::{LoadOptions, LoadStats};
use crate::source::ModelSource;
use flash_sys::cuda::Gpu;
use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// A device a tensor can be placed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Device {
    Cpu,
    Gpu(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Gpu(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = String;
    /// `0`, `cuda:0`, `cuda` (= GPU 0) or `cpu`.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "cpu" {
            return Ok(Device::Cpu);
        }
        if s == "cuda" {
            return Ok(Device::Gpu(0));
        }
        let n = s.strip_prefix("cuda:").unwrap_or(s);
        n.parse()
            .map(Device::Gpu)
            .map_err(|_| format!("unknown device {s:?} (a GPU number, cuda:N, or cpu)"))
    }
}

/// `device_map`: explicit prefixes, or `auto`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceMap {
    Auto,
    Prefixes(BTreeMap<String, Device>),
}

impl DeviceMap {
    /// Everything on one device (`{"": device}`).
    pub fn single(device: Device) -> Self {
        DeviceMap::Prefixes(BTreeMap::from([(String::new(), device)]))
    }

    /// Parses the JSON form: `"auto"`, or an object of prefix to a GPU
    /// number, `"cuda:N"` or `"cpu"`.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("device_map is not JSON: {e}"))?;
        match v {
            serde_json::Value::String(s) if s == "auto" => Ok(DeviceMap::Auto),
            serde_json::Value::Object(map) => {
                let mut out = BTreeMap::new();
                for (k, v) in map {
                    let d = match &v {
                        serde_json::Value::Number(n) => n
                            .as_u64()
                            .map(|n| Device::Gpu(n as usize))
                            .ok_or_else(|| format!("device_map[{k:?}]: {n} is not a GPU number"))?,
                        serde_json::Value::String(s) => {
                            s.parse().map_err(|e| format!("device_map[{k:?}]: {e}"))?
                        }
                        other => return Err(format!("device_map[{k:?}]: {other} is not a device")),
                    };
                    out.insert(k, d);
                }
                Ok(DeviceMap::Prefixes(out))
            }
            other => Err(format!(
                "device_map must be \"auto\" or an object, not {other}"
            )),
        }
    }

    /// The device of each tensor. `tensors` are (name, bytes) in the
    /// source's order; `gpu_free` is the free memory of each GPU (its length
    /// is the number of GPUs).
    pub fn assign(
        &self,
        tensors: &[(String, u64)],
        gpu_free: &[u64],
    ) -> Result<HashMap<String, Device>, String> {
        let out = match self {
            DeviceMap::Prefixes(map) => assign_prefixes(map, tensors)?,
            DeviceMap::Auto => assign_auto(tensors, gpu_free)?,
        };
        if let Some(Device::Gpu(i)) = out
            .values()
            .copied()
            .find(|d| matches!(d, Device::Gpu(i) if *i >= gpu_free.len()))
        {
            return Err(format!(
                "device_map names cuda:{i} but this machine has {} GPU(s)",
                gpu_free.len()
            ));
        }
        Ok(out)
    }
}

fn prefix_matches(prefix: &str, name: &str) -> bool {
    prefix.is_empty()
        || name == prefix
        || (name.starts_with(prefix) && name.as_bytes().get(prefix.len()) == Some(&b'.'))
}

fn assign_prefixes(
    map: &BTreeMap<String, Device>,
    tensors: &[(String, u64)],
) -> Result<HashMap<String, Device>, String> {
    tensors
        .iter()
        .map(|(name, _)| {
            map.iter()
                .filter(|(p, _)| prefix_matches(p, name))
                .max_by_key(|(p, _)| p.len())
                .map(|(_, &d)| (name.clone(), d))
                .ok_or_else(|| format!("device_map places no prefix of tensor {name:?}"))
        })
        .collect()
}

/// `prefix.layers.N` of a decoder block's tensor, the unit `auto` keeps whole.
fn block_of(name: &str) -> Option<&str> {
    let parts: Vec<&str> = name.split('.').collect();
    let i = parts
        .windows(2)
        .position(|w| w[0] == "layers" && w[1].parse::<u64>().is_ok())?;
    let len: usize = parts[..i + 2].iter().map(|p| p.len() + 1).sum::<usize>() - 1;
    Some(&name[..len])
}

fn assign_auto(
    tensors: &[(String, u64)],
    gpu_free: &[u64],
) -> Result<HashMap<String, Device>, String> {
    if gpu_free.is_empty() {
        return Ok(tensors
            .iter()
            .map(|(n, _)| (n.clone(), Device::Cpu))
            .collect());
    }
    // Groups in source order: a decoder block, or a single other tensor.
    let mut groups: Vec<(String, u64, Vec<&str>)> = Vec::new();
    for (name, bytes) in tensors {
        let key = block_of(name).unwrap_or(name).to_string();
        match groups.iter_mut().find(|g| g.0 == key) {
            Some(g) => {
                g.1 += bytes;
                g.2.push(name);
            }
            None => groups.push((key, *bytes, vec![name])),
        }
    }
    let total: u64 = groups.iter().map(|g| g.1).sum();
    let free_sum: u64 = gpu_free.iter().sum::<u64>().max(1);
    if total > free_sum {
        return Err(format!(
            "the model needs {total} bytes but the GPUs have {free_sum} bytes free together"
        ));
    }
    // GPU i ends where the cumulative share of free memory ends.
    let mut bounds = Vec::with_capacity(gpu_free.len());
    let mut acc = 0u128;
    for f in gpu_free {
        acc += *f as u128;
        bounds.push((total as u128 * acc / free_sum as u128) as u64);
    }
    let mut out = HashMap::new();
    let mut cursor = 0u64;
    let mut gpu = 0usize;
    for (_, bytes, names) in &groups {
        // A group goes to the GPU whose share its middle falls into.
        let middle = cursor + bytes / 2;
        while gpu + 1 < bounds.len() && middle >= bounds[gpu] {
            gpu += 1;
        }
        for n in names {
            out.insert(n.to_string(), Device::Gpu(gpu));
        }
        cursor += bytes;
    }
    Ok(out)
}

/// A model spread over devices.
#[derive(Default)]
pub struct PlacedModel {
    pub gpus: Vec<(usize, GpuModel)>,
    pub host: Option<HostModel>,
    /// One entry per device load, in device order.
    pub stats: Vec<(Device, LoadStats)>,
}

/// Loads `source` according to `map` onto `gpus` (index = ordinal) and host
/// memory, the devices in parallel.
pub fn load_placed(
    source: &ModelSource,
    map: &DeviceMap,
    gpus: &[Gpu],
    opts: &LoadOptions,
) -> Result<PlacedModel, LoadError> {
    let mut free = Vec::with_capacity(gpus.len());
    for g in gpus {
        let (f, _) = g.mem_info().map_err(|e| LoadError::Device(e.to_string()))?;
        free.push(f);
    }
    let mut names: Vec<(String, u64)> = source
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.length))
        .collect();
    for (alias, target) in &source.aliases {
        let len = source
            .tensors
            .iter()
            .find(|t| &t.name == target)
            .map_or(0, |t| t.length);
        names.push((alias.clone(), len));
    }
    let placement = map
        .assign(&names, &free)
        .map_err(|why| LoadError::model(&source.dir, why))?;
    let mut devices: Vec<Device> = placement.values().copied().collect();
    devices.sort();
    devices.dedup();
    let per_device = LoadOptions {
        threads: (opts.threads / devices.len().max(1)).max(4),
        ..opts.clone()
    };
    /// What one device's load gave.
    enum Landed {
        Gpu(usize, GpuModel),
        Host(HostModel),
    }
    type DeviceLoad = Result<(Device, Landed, LoadStats), LoadError>;
    let results: Vec<DeviceLoad> = std::thread::scope(|s| {
        let handles: Vec<_> = devices
            .iter()
            .map(|&d| {
                let placement = &placement;
                let per_device = &per_device;
                s.spawn(move || -> DeviceLoad {
                    let select = |n: &str| placement.get(n) == Some(&d);
                    Ok(match d {
                        Device::Cpu => {
                            let (m, st) = load_to_host(source, Some(&select), per_device)?;
                            (d, Landed::Host(m), st)
                        }
                        Device::Gpu(i) => {
                            let (m, st) =
                                load_to_gpu(source, Some(&select), &gpus[i], per_device, None)?;
                            (d, Landed::Gpu(i, m), st)
                        }
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(LoadError::Device("a loader thread panicked".into())))
            })
            .collect()
    });
    let mut out = PlacedModel::default();
    for r in results {
        let (d, landed, stats) = r?;
        match landed {
            Landed::Gpu(i, m) => out.gpus.push((i, m)),
            Landed::Host(m) => out.host = Some(m),
        }
        out.stats.push((d, stats));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> Vec<(String, u64)> {
        let mut v = vec![("model.embed_tokens.weight".to_string(), 100)];
        for l in 0..12 {
            for p in ["self_attn.q_proj.weight", "mlp.up_proj.weight"] {
                v.push((format!("model.layers.{l}.{p}"), 50));
            }
        }
        v.push(("model.norm.weight".into(), 1));
        v.push(("lm_head.weight".into(), 100));
        v
    }

    #[test]
    fn parses_the_forms_users_write() {
        assert_eq!(
            DeviceMap::from_json(r#"{"": 0}"#).unwrap(),
            DeviceMap::single(Device::Gpu(0))
        );
        assert_eq!(DeviceMap::from_json(r#""auto""#).unwrap(), DeviceMap::Auto);
        let m =
            DeviceMap::from_json(r#"{"model.layers.1": "cuda:1", "lm_head": "cpu", "": "cuda"}"#)
                .unwrap();
        let DeviceMap::Prefixes(p) = m else { panic!() };
        assert_eq!(p["model.layers.1"], Device::Gpu(1));
        assert_eq!(p["lm_head"], Device::Cpu);
        assert_eq!(p[""], Device::Gpu(0));
        assert!(DeviceMap::from_json(r#"{"": "tpu"}"#).is_err());
        assert!(DeviceMap::from_json(r#"{"": -1}"#).is_err());
        assert!(DeviceMap::from_json("[0]").is_err());
    }

    #[test]
    fn longest_whole_component_prefix_wins() {
        let map =
            DeviceMap::from_json(r#"{"": 0, "model.layers.1": 1, "lm_head": "cpu"}"#).unwrap();
        let mut tensors = model();
        tensors.push(("model.layers.10.mlp.up_proj.weight".into(), 1));
        let a = map.assign(&tensors, &[10_000, 10_000]).unwrap();
        assert_eq!(a["model.layers.1.mlp.up_proj.weight"], Device::Gpu(1));
        assert_eq!(a["model.layers.10.mlp.up_proj.weight"], Device::Gpu(0));
        assert_eq!(a["lm_head.weight"], Device::Cpu);
        assert_eq!(a["model.embed_tokens.weight"], Device::Gpu(0));
    }

    #[test]
    fn refuses_missing_prefixes_and_devices() {
        let map = DeviceMap::from_json(r#"{"model.layers": 0}"#).unwrap();
        let e = map.assign(&model(), &[1000]).unwrap_err();
        assert!(e.contains("model.embed_tokens.weight"), "{e}");
        let map = DeviceMap::single(Device::Gpu(2));
        let e = map.assign(&model(), &[1000, 1000]).unwrap_err();
        assert!(e.contains("cuda:2") && e.contains("2 GPU(s)"), "{e}");
    }

    #[test]
    fn auto_keeps_blocks_whole_and_follows_free_memory() {
        let tensors = model(); // 100 + 12*100 + 1 + 100 = 1401 bytes
        let a = DeviceMap::Auto.assign(&tensors, &[3000, 1000]).unwrap();
        for l in 0..12 {
            assert_eq!(
                a[&format!("model.layers.{l}.self_attn.q_proj.weight")],
                a[&format!("model.layers.{l}.mlp.up_proj.weight")],
                "block {l} split"
            );
        }
        let on0: u64 = tensors
            .iter()
            .filter(|(n, _)| a[n] == Device::Gpu(0))
            .map(|(_, b)| b)
            .sum();
        // GPU 0 has 3/4 of the free memory: about 3/4 of the bytes.
        assert!((950..=1150).contains(&on0), "{on0}");
        assert_eq!(a["model.embed_tokens.weight"], Device::Gpu(0));
        assert_eq!(a["lm_head.weight"], Device::Gpu(1));
        assert!(DeviceMap::Auto
            .assign(&tensors, &[100, 100])
            .unwrap_err()
            .contains("free"));
        let cpu = DeviceMap::Auto.assign(&tensors, &[]).unwrap();
        assert!(cpu.values().all(|d| *d == Device::Cpu));
    }

    #[test]
    fn host_placement_loads_every_tensor() {
        use flash_format::safetensors::{write_file, TensorSpec};
        use flash_format::DType;
        let dir = tempfile::tempdir().unwrap();
        let a = TensorSpec {
            name: "model.layers.0.w".into(),
            dtype: DType::U8,
            shape: vec![5000],
        };
        let b = TensorSpec {
            name: "lm_head.weight".into(),
            dtype: DType::F32,
            shape: vec![3],
        };
        let (ab, bb) = (vec![7u8; 5000], vec![1u8; 12]);
        write_file(
            &dir.path().join("model.safetensors"),
            &[(a, &ab[..]), (b, &bb[..])],
            &Default::default(),
        )
        .unwrap();
        let source = ModelSource::open(dir.path()).unwrap();
        let opts = LoadOptions {
            threads: 2,
            chunk_bytes: 4096,
            ..Default::default()
        };
        for map in [DeviceMap::single(Device::Cpu), DeviceMap::Auto] {
            let placed = load_placed(&source, &map, &[], &opts).unwrap();
            let host = placed.host.expect("all on the host");
            assert_eq!(host.get("model.layers.0.w").unwrap().1, &ab[..]);
            assert_eq!(host.get("lm_head.weight").unwrap().1, &bb[..]);
            assert!(placed.gpus.is_empty());
        }
        let err = load_placed(&source, &DeviceMap::single(Device::Gpu(0)), &[], &opts)
            .err()
            .unwrap();
        assert!(err.to_string().contains("cuda:0"), "{err}");
    }

    #[test]
    fn block_names() {
        assert_eq!(
            block_of("model.layers.3.mlp.up_proj.weight"),
            Some("model.layers.3")
        );
        assert_eq!(block_of("model.norm.weight"), None);
        assert_eq!(block_of("transformer.h.layers.x.w"), None);
    }
}
