//! `flash selftest --daemon`: the daemon's check for machines without a Rust
//! toolchain (the GPU machine). On a scratch store it starts a real daemon
//! (this binary, in the background), then, with a GPU:
//! 1. loads a tiny model to `gpu:0` (disk → pinned memory pool → GPU);
//! 2. share mode from this process: leases the GPU copy, opens its CUDA IPC
//!    handle, reads every tensor back and compares it with the store;
//! 3. share mode from a second process (`flash attach --verify`);
//! 4. copy mode: fills a `cuMemAlloc` buffer of this process from the GPU
//!    tier (device to device) and from the memory tier (host to device);
//! 5. stops the daemon and checks that it released everything.
//!
//! Without a GPU the same steps run on the memory tier (shared-memory maps and
//! files), unless `--require-gpu`.

use crate::daemon::{compare, reference};
use anyhow::{anyhow, bail, Context, Result};
use flash_client::{Client, Place, Region, Target};
use flash_store::{ImportOptions, Store};
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

const MODEL: &str = "selftest/daemon-tiny";

struct Step {
    name: String,
    ok: bool,
    detail: String,
}

pub fn run(require_gpu: bool, json: bool) -> Result<ExitCode> {
    let scratch =
        std::env::temp_dir().join(format!("flash-selftest-daemon-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    let home = scratch.join("home");
    let result = run_in(&scratch, &home, require_gpu);
    // Whatever happened, leave no daemon behind.
    let exe = std::env::current_exe()?;
    let _ = Command::new(&exe)
        .arg("--storage")
        .arg(&home)
        .args(["stop", "--timeout", "30"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let _ = std::fs::remove_dir_all(&scratch);
    let steps = result?;
    let all_ok = steps.iter().all(|s| s.ok);
    if json {
        let v: Vec<_> = steps
            .iter()
            .map(|s| serde_json::json!({"check": s.name, "ok": s.ok, "detail": s.detail}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"ok": all_ok, "checks": v}))?
        );
    } else {
        for s in &steps {
            println!(
                "{:<4} {:<44} {}",
                if s.ok { "ok" } else { "FAIL" },
                s.name,
                s.detail
            );
        }
        println!(
            "{}",
            if all_ok {
                "daemon selftest passed"
            } else {
                "daemon selftest FAILED"
            }
        );
    }
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn run_in(scratch: &Path, home: &Path, require_gpu: bool) -> Result<Vec<Step>> {
    let mut steps = Vec::new();
    let mut step = |name: &str, r: Result<String>| {
        let (ok, detail) = match r {
            Ok(d) => (true, d),
            Err(e) => (false, format!("{e:#}")),
        };
        steps.push(Step {
            name: name.into(),
            ok,
            detail,
        });
        ok
    };
    // A tiny model in a scratch store.
    let src = scratch.join("src");
    flash_synth::synth(
        &flash_synth::spec(flash_synth::Arch::Qwen3, "tiny")?,
        &src,
        &flash_synth::SynthOptions::default(),
    )?;
    Store::open(home)?.import(&src, &MODEL.parse()?, &ImportOptions::default())?;
    let want = reference(home, MODEL)?;

    let exe = std::env::current_exe()?;
    let out = Command::new(&exe)
        .arg("--storage")
        .arg(home)
        .args([
            "start",
            "--mem-pool",
            "64M",
            "--http",
            "off",
            "--gpu-budget",
            "64M",
        ])
        .output()
        .context("starting the daemon")?;
    if !step(
        "daemon starts",
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(anyhow!("{}", String::from_utf8_lossy(&out.stderr).trim()))
        },
    ) {
        return Ok(steps);
    }
    let mut client = Client::connect(home).map_err(|e| anyhow!(e))?;
    let status = client.status().map_err(|e| anyhow!(e))?;
    let gpu = if status.gpus > 0 {
        let cuda = flash_sys::cuda::probe().map_err(|e| anyhow!("{e}"))?;
        let g = cuda.device(0)?;
        g.bind_to_thread()?;
        Some(g)
    } else if require_gpu {
        step(
            "daemon has a GPU tier",
            Err(anyhow!("the daemon found no GPU")),
        );
        return Ok(steps);
    } else {
        None
    };
    let place = if gpu.is_some() {
        Place::Gpu(0)
    } else {
        Place::Memory
    };
    step(
        &format!("memory tier pinned: {}", status.memory_pinned),
        if gpu.is_some() && !status.memory_pinned {
            Err(anyhow!("the memory pool is not pinned"))
        } else {
            Ok(format!("{} GPU tier(s)", status.gpus))
        },
    );

    step(
        &format!("load into {place}"),
        client
            .load(MODEL, place, false)
            .map_err(|e| anyhow!(e))
            .map(|r| {
                format!(
                    "{} bytes from {} in {:.3} s",
                    r.bytes, r.served_from, r.seconds
                )
            }),
    );

    // Share mode, this process.
    step(
        &format!("share mode from this process ({place})"),
        (|| {
            let t0 = Instant::now();
            let lease = client.acquire(MODEL, place).map_err(|e| anyhow!(e))?;
            let image = match &gpu {
                Some(g) => {
                    let mem = lease.map_gpu(g).map_err(|e| anyhow!(e))?;
                    let ms = t0.elapsed().as_secs_f64() * 1e3;
                    let mut host = vec![0u8; mem.len()];
                    mem.copy_to_host(0, &mut host)?;
                    (host, ms)
                }
                None => {
                    let view = lease.map_host().map_err(|e| anyhow!(e))?;
                    (view.to_vec(), t0.elapsed().as_secs_f64() * 1e3)
                }
            };
            compare(MODEL, &lease.tensors, &image.0, &want)?;
            client.release(lease).map_err(|e| anyhow!(e))?;
            Ok(format!(
                "usable after {:.2} ms, every tensor matches",
                image.1
            ))
        })(),
    );

    // Share mode, a second process.
    step(
        "share mode from a second process",
        (|| {
            let out = Command::new(&exe)
                .arg("--storage")
                .arg(home)
                .args([
                    "attach",
                    MODEL,
                    "--tier",
                    &place.to_string(),
                    "--verify",
                    "--json",
                ])
                .output()?;
            if !out.status.success() {
                bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
            }
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            if v["verified"] != true {
                bail!("not verified: {v}");
            }
            Ok(format!(
                "usable after {:.2} ms (with connect)",
                v["attach_seconds"].as_f64().unwrap_or(0.0) * 1e3
            ))
        })(),
    );

    // Copy mode.
    let info = client
        .info(MODEL)
        .map_err(|e| anyhow!(e))?
        .ok_or_else(|| anyhow!("{MODEL} vanished"))?;
    match &gpu {
        Some(g) => {
            for (source, label) in [
                (Place::Auto, "copy mode from the GPU tier (D2D)"),
                (Place::Memory, "copy mode from the memory tier (H2D)"),
            ] {
                step(
                    label,
                    (|| {
                        let mem = g.alloc(info.image_bytes as usize)?;
                        mem.fill(0)?;
                        let r = client
                            .fill(
                                MODEL,
                                source,
                                &[Region {
                                    target: Target::Cuda {
                                        ipc_handle: mem.ipc_handle()?,
                                        device: 0,
                                    },
                                    dst_offset: 0,
                                    src_offset: 0,
                                    length: info.image_bytes,
                                }],
                            )
                            .map_err(|e| anyhow!(e))?;
                        let mut host = vec![0u8; mem.len()];
                        mem.copy_to_host(0, &mut host)?;
                        compare(MODEL, &info.tensors, &host, &want)?;
                        Ok(format!(
                            "{} bytes from {} in {:.3} s, every tensor matches",
                            r.bytes, r.source_tier, r.seconds
                        ))
                    })(),
                );
            }
        }
        None => {
            step(
                "copy mode into shared memory",
                (|| {
                    let (file, info, r) = client.fill_shm(MODEL).map_err(|e| anyhow!(e))?;
                    compare(MODEL, &info.tensors, &file, &want)?;
                    Ok(format!("{} bytes from {}", r.bytes, r.source_tier))
                })(),
            );
        }
    }

    let st = client.status().map_err(|e| anyhow!(e))?;
    step(
        "no lease left",
        if st.leases == 0 {
            Ok(String::new())
        } else {
            Err(anyhow!("{} leases held", st.leases))
        },
    );
    drop(client);
    let out = Command::new(&exe)
        .arg("--storage")
        .arg(home)
        .args(["stop", "--timeout", "30"])
        .output()?;
    step(
        "daemon stops and cleans up",
        if out.status.success()
            && !home.join("flash.sock").exists()
            && !home.join("daemon.pid").exists()
        {
            Ok(String::new())
        } else {
            Err(anyhow!("{}", String::from_utf8_lossy(&out.stderr).trim()))
        },
    );
    Ok(steps)
}
