//! The daemon's check (`flash selftest --daemon`), for machines without a
//! Rust toolchain (the GPU machine). On a scratch store it starts a real
//! daemon (the `flash` binary the caller names, in the background), then,
//! with a GPU:
//! 1. loads a tiny model to `gpu:0` (disk → pinned memory pool → GPU);
//! 2. share mode from this process: leases the GPU copy, opens its CUDA IPC
//!    handle, reads every tensor back and compares it with the store;
//! 3. share mode from a second process (`flash attach --verify`);
//! 4. copy mode: fills a `cuMemAlloc` buffer of this process from the GPU
//!    tier (device to device) and from the memory tier (host to device);
//! 5. stops the daemon and checks that it released everything.
//!
//! Without a GPU the same steps run on the memory tier (shared-memory maps and
//! files), unless a GPU is required.
//!
//! [`reference()`] and [`compare()`] check any image a daemon hands out (a
//! lease's mapping, a filled buffer) against the store's bytes.

use crate::{CheckError, Result, ScratchDir};
use flash_client::{Client, Place, Region, Target, TensorInfo};
use flash_load::{HostModel, LoadOptions, ModelSource};
use flash_store::{ImportOptions, ModelName, Store, StoreError};
use flash_sys::cuda::Gpu;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

const MODEL: &str = "selftest/daemon-tiny";
/// The same model, compressed: its memory copy holds the stored bytes.
const PACKED: &str = "selftest/daemon-tiny-packed";

/// One step of the daemon's check (an element of `checks` in the JSON
/// report).
#[derive(Debug, Serialize)]
pub struct Step {
    #[serde(rename = "check")]
    pub name: String,
    /// What it measured, or what went wrong.
    pub detail: String,
    pub ok: bool,
}

/// The model's bytes as the store at `home` gives them, tensor by tensor.
pub fn reference(home: &Path, model: &str) -> Result<HostModel> {
    let store = Store::open(home)?;
    let name: ModelName = model
        .parse()
        .map_err(|e| CheckError::Store(StoreError::from(e)))?;
    let dir = store.existing(&name)?;
    let src = ModelSource::open(&dir)?;
    Ok(flash_load::load_to_host(&src, None, &LoadOptions::default())?.0)
}

/// Checks that `image` holds every tensor the daemon lists (`tensors`, at
/// their offsets) with the bytes of `want`, and that both list the same
/// tensors.
pub fn compare(model: &str, tensors: &[TensorInfo], image: &[u8], want: &HostModel) -> Result<()> {
    let fail = |why: String| Err(CheckError::Failed(format!("{model}: {why}")));
    for t in tensors {
        let Some(got) = image.get(t.offset as usize..(t.offset + t.length) as usize) else {
            return fail(format!("tensor {} lies outside the image", t.name));
        };
        let Some(w) = want.tensors().iter().find(|x| x.name == t.name) else {
            return fail(format!(
                "the daemon names a tensor {} the store lacks",
                t.name
            ));
        };
        if got != want.bytes(w) {
            return fail(format!("tensor {} differs from the store's bytes", t.name));
        }
    }
    if tensors.len() != want.tensors().len() {
        return fail(format!(
            "the daemon lists {} tensors, the store {}",
            tensors.len(),
            want.tensors().len()
        ));
    }
    Ok(())
}

/// A daemon started from `flash` on a scratch store; stopped (whatever
/// happened) and its scratch folder removed on drop.
struct ScratchDaemon {
    flash: PathBuf,
    home: PathBuf,
    _scratch: ScratchDir,
}

impl ScratchDaemon {
    /// `flash --storage HOME ARGS...`.
    fn flash(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.flash);
        c.arg("--storage").arg(&self.home).args(args);
        c
    }
}

impl Drop for ScratchDaemon {
    fn drop(&mut self) {
        let _ = self
            .flash(&["stop", "--timeout", "30"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The steps so far; a step records its outcome and says whether it passed.
#[derive(Default)]
struct Steps(Vec<Step>);

impl Steps {
    fn step(&mut self, name: &str, r: Result<String>) -> bool {
        let (ok, detail) = match r {
            Ok(d) => (true, d),
            Err(e) => (false, e.to_string()),
        };
        self.0.push(Step {
            name: name.into(),
            detail,
            ok,
        });
        ok
    }
}

fn failed(why: impl Into<String>) -> CheckError {
    CheckError::Failed(why.into())
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

/// Runs the daemon's check with the `flash` binary at `flash` (the daemon,
/// and the second process that attaches), on a scratch store in the
/// temporary folder. `require_gpu`: without a GPU tier the check fails
/// instead of running on the memory tier.
pub fn selftest(flash: &Path, require_gpu: bool) -> Result<Vec<Step>> {
    let scratch = ScratchDir::new(
        std::env::temp_dir().join(format!("flash-selftest-daemon-{}", std::process::id())),
    )?;
    let src = scratch.path().join("src");
    let d = ScratchDaemon {
        flash: flash.to_path_buf(),
        home: scratch.path().join("home"),
        _scratch: scratch,
    };
    // A tiny model in a scratch store.
    flash_synth::synth(
        &flash_synth::spec(flash_synth::Arch::Qwen3, "tiny")?,
        &src,
        &flash_synth::SynthOptions::default(),
    )?;
    let name = MODEL
        .parse()
        .map_err(|e| CheckError::Store(StoreError::from(e)))?;
    let store = Store::open(&d.home)?;
    store.import(&src, &name, &ImportOptions::default())?;
    let packed = PACKED
        .parse()
        .map_err(|e| CheckError::Store(StoreError::from(e)))?;
    store.import(
        &src,
        &packed,
        &ImportOptions {
            compress: true,
            ..ImportOptions::default()
        },
    )?;
    let want = reference(&d.home, MODEL)?;
    let mut steps = Steps::default();
    run_steps(&d, &want, require_gpu, &mut steps)?;
    Ok(steps.0)
}

/// The steps, in order; a failed start or a missing GPU tier ends them.
fn run_steps(d: &ScratchDaemon, want: &HostModel, require_gpu: bool, s: &mut Steps) -> Result<()> {
    if !s.step("daemon starts", start(d)) {
        return Ok(());
    }
    let mut client = Client::connect(&d.home)?;
    let status = client.status()?;
    let gpu = if status.gpus > 0 {
        let cuda = flash_sys::cuda::probe().map_err(|e| failed(e.to_string()))?;
        let g = cuda.device(0)?;
        g.bind_to_thread()?;
        Some(g)
    } else if require_gpu {
        s.step(
            "daemon has a GPU tier",
            Err(failed("the daemon found no GPU")),
        );
        return Ok(());
    } else {
        None
    };
    let place = if gpu.is_some() {
        Place::Gpu(0)
    } else {
        Place::Memory
    };
    s.step(
        &format!("memory tier pinned: {}", status.memory_pinned),
        if gpu.is_some() && !status.memory_pinned {
            Err(failed("the memory pool is not pinned"))
        } else {
            Ok(format!("{} GPU tier(s)", status.gpus))
        },
    );
    s.step(
        &format!("load into {place}"),
        client
            .load(MODEL, place, false)
            .map_err(CheckError::from)
            .map(|r| {
                format!(
                    "{} bytes from {} in {:.3} s",
                    r.bytes, r.served_from, r.seconds
                )
            }),
    );
    if let Some(g) = &gpu {
        for model in [MODEL, PACKED] {
            s.step(
                &format!("{model}: memory copy filled by the load to the GPU"),
                memory_copy_on_the_way(&mut client, model, g, want),
            );
        }
    }
    s.step(
        &format!("share mode from this process ({place})"),
        share_here(&mut client, MODEL, place, gpu.as_ref(), want),
    );
    s.step(
        "share mode from a second process",
        share_elsewhere(d, place),
    );
    copy_mode(&mut client, gpu.as_ref(), want, s)?;
    let st = client.status()?;
    s.step(
        "no lease left",
        if st.leases == 0 {
            Ok(String::new())
        } else {
            Err(failed(format!("{} leases held", st.leases)))
        },
    );
    drop(client);
    s.step("daemon stops and cleans up", stop(d));
    Ok(())
}

/// `flash start` with small budgets and no HTTP listener.
fn start(d: &ScratchDaemon) -> Result<String> {
    let out = d
        .flash(&[
            "start",
            "--mem-pool",
            "64M",
            "--http",
            "off",
            "--gpu-budget",
            "64M",
        ])
        .output()
        .map_err(|e| failed(format!("starting the daemon: {e}")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(failed(stderr_of(&out)))
    }
}

/// A cold load to the GPU fills the memory tier in the same pass over the
/// disk (compressed models: their stored bytes, decoded on the next
/// upload): from nothing resident, load to GPU 0 from disk, drop the GPU
/// copy, load again; that load must come from memory and every tensor must
/// match.
fn memory_copy_on_the_way(
    client: &mut Client,
    model: &str,
    gpu: &Gpu,
    want: &HostModel,
) -> Result<String> {
    let place = Place::Gpu(0);
    client.unload(model, place)?;
    client.unload(model, Place::Memory)?;
    let cold = client.load(model, place, false)?;
    if cold.served_from != "disk" {
        return Err(failed(format!(
            "the first load came from {}, not the disk",
            cold.served_from
        )));
    }
    client.unload(model, place)?;
    let again = client.load(model, place, false)?;
    if again.served_from != "memory" {
        return Err(failed(format!(
            "no memory copy was left: the second load came from {}",
            again.served_from
        )));
    }
    let checked = share_here(client, model, place, Some(gpu), want)?;
    Ok(format!(
        "disk -> GPU {:.3} s, memory -> GPU {:.3} s; {checked}",
        cold.seconds, again.seconds
    ))
}

/// Share mode from this process: lease, map, compare every tensor, release.
fn share_here(
    client: &mut Client,
    model: &str,
    place: Place,
    gpu: Option<&Gpu>,
    want: &HostModel,
) -> Result<String> {
    let t0 = Instant::now();
    let lease = client.acquire(model, place)?;
    let (image, ms) = match gpu {
        Some(g) => {
            let mem = lease.map_gpu(g)?;
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            let mut host = vec![0u8; mem.len()];
            mem.copy_to_host(0, &mut host)?;
            (host, ms)
        }
        None => {
            let view = lease.map_host()?;
            (view.to_vec(), t0.elapsed().as_secs_f64() * 1e3)
        }
    };
    compare(model, &lease.tensors, &image, want)?;
    client.release(lease)?;
    Ok(format!("usable after {ms:.2} ms, every tensor matches"))
}

/// Share mode from a second process: `flash attach --verify --json`.
fn share_elsewhere(d: &ScratchDaemon, place: Place) -> Result<String> {
    let tier = place.to_string();
    let out = d
        .flash(&["attach", MODEL, "--tier", &tier, "--verify", "--json"])
        .output()
        .map_err(|e| failed(format!("running flash attach: {e}")))?;
    if !out.status.success() {
        return Err(failed(stderr_of(&out)));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| failed(format!("flash attach printed no JSON: {e}")))?;
    if v["verified"] != true {
        return Err(failed(format!("not verified: {v}")));
    }
    Ok(format!(
        "usable after {:.2} ms (with connect)",
        v["attach_seconds"].as_f64().unwrap_or(0.0) * 1e3
    ))
}

/// Copy mode: a buffer of this process filled by the daemon (a GPU
/// allocation from each tier, or a shared-memory file without a GPU) and
/// compared with the store.
fn copy_mode(
    client: &mut Client,
    gpu: Option<&Gpu>,
    want: &HostModel,
    s: &mut Steps,
) -> Result<()> {
    let info = client
        .info(MODEL)?
        .ok_or_else(|| failed(format!("{MODEL} vanished")))?;
    let Some(g) = gpu else {
        s.step(
            "copy mode into shared memory",
            (|| {
                let (file, info, r) = client.fill_shm(MODEL)?;
                compare(MODEL, &info.tensors, &file, want)?;
                Ok(format!("{} bytes from {}", r.bytes, r.source_tier))
            })(),
        );
        return Ok(());
    };
    for (source, label) in [
        (Place::Auto, "copy mode from the GPU tier (D2D)"),
        (Place::Memory, "copy mode from the memory tier (H2D)"),
    ] {
        s.step(
            label,
            (|| {
                let mem = g.alloc(info.image_bytes as usize)?;
                mem.fill(0)?;
                let region = Region {
                    target: Target::Cuda {
                        ipc_handle: mem.ipc_handle()?,
                        device: 0,
                    },
                    dst_offset: 0,
                    src_offset: 0,
                    length: info.image_bytes,
                };
                let r = client.fill(MODEL, source, &[region])?;
                let mut host = vec![0u8; mem.len()];
                mem.copy_to_host(0, &mut host)?;
                compare(MODEL, &info.tensors, &host, want)?;
                Ok(format!(
                    "{} bytes from {} in {:.3} s, every tensor matches",
                    r.bytes, r.source_tier, r.seconds
                ))
            })(),
        );
    }
    Ok(())
}

/// `flash stop`, then no socket and no pid file left.
fn stop(d: &ScratchDaemon) -> Result<String> {
    let out = d
        .flash(&["stop", "--timeout", "30"])
        .output()
        .map_err(|e| failed(format!("running flash stop: {e}")))?;
    if out.status.success()
        && !d.home.join("flash.sock").exists()
        && !d.home.join("daemon.pid").exists()
    {
        Ok(String::new())
    } else {
        Err(failed(stderr_of(&out)))
    }
}
