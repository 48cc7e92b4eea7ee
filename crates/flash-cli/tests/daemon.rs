//! The daemon end to end on the CPU: the real `flash` binary started by the
//! tests (`flash start`, in the background, each test with its own store),
//! driven through the CLI and the `flash-client` crate.
//!
//! Covered: start/status/stop and a second daemon refused; eight concurrent
//! clients leasing and releasing with every byte checked; budgets forcing
//! evictions and keep marks; refusals that say why (bad names, unknown
//! models, oversize models, full tiers, wrong tiers); a client process killed
//! while it holds leases; the daemon killed with SIGKILL in the middle of a
//! load, restarted without a manual step and every model verified; TCP with
//! a token; `/metrics`; a small swap benchmark.

mod common;

use common::*;
use flash_client::{Client, ClientError, Place};
use flash_store::Store;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The model's bytes as the store holds them, through the load path.
fn reference(home: &Path, model: &str) -> flash_load::HostModel {
    let store = Store::open(home).unwrap();
    let dir = store.existing(&model.parse().unwrap()).unwrap();
    let src = flash_load::ModelSource::open(&dir).unwrap();
    flash_load::load_to_host(&src, None, &flash_load::LoadOptions::default())
        .unwrap()
        .0
}

fn same_bytes(
    lease_tensors: &[flash_client::TensorInfo],
    image: &[u8],
    want: &flash_load::HostModel,
) {
    assert_eq!(lease_tensors.len(), want.tensors().len());
    for t in lease_tensors {
        let w = want.tensors().iter().find(|x| x.name == t.name).unwrap();
        assert!(
            image[t.offset as usize..(t.offset + t.length) as usize] == *want.bytes(w),
            "tensor {} differs",
            t.name
        );
    }
}

#[test]
fn start_status_stop_and_a_second_daemon_is_refused() {
    let h = Home::new(1);
    // No daemon: a clear error, non-zero.
    let e = fails("status without daemon", flash(&h.path, &["status"]));
    assert!(
        e.contains("not running") && e.contains("flash start"),
        "{e}"
    );
    let s = h.start(&["--mem-pool", "4M"]);
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(tier(&s, "memory")["budget"], 4 << 20);
    assert_eq!(s["memory_shareable"], true);
    let pid = s["pid"].as_u64().unwrap();
    let sock = h.path.join("flash.sock");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the socket is private");
    assert_eq!(h.shm_files().len(), 1, "one pool file");

    let e = fails("second start", flash(&h.path, &["start", "--http", "off"]));
    assert!(
        e.contains("already running") && e.contains(&pid.to_string()),
        "{e}"
    );
    let e = fails(
        "second foreground start",
        flash(&h.path, &["start", "--foreground", "--http", "off"]),
    );
    assert!(
        e.contains("already running") && e.contains("flash.sock"),
        "{e}"
    );

    ok("load", flash(&h.path, &["load", &h.models[0], "--keep"]));
    let ps = ok("ps", flash(&h.path, &["ps"]));
    assert!(
        ps.contains("test/m0") && ps.contains("memory") && ps.contains("yes"),
        "{ps}"
    );
    assert!(ps.contains("POPULARITY"), "{ps}");
    let rows: Value =
        serde_json::from_str(&ok("ps --json", flash(&h.path, &["ps", "--json"]))).unwrap();
    let row = &rows.as_array().unwrap()[0];
    // One request (the load), a moment ago.
    let pop = row["popularity"].as_f64().unwrap();
    assert!(pop > 0.99 && pop <= 1.0, "{rows}");
    let human = ok("status", flash(&h.path, &["status"]));
    assert!(
        human.contains("memory") && human.contains("test/m0"),
        "{human}"
    );

    let out = ok("stop", flash(&h.path, &["stop"]));
    assert!(out.contains("stopped"), "{out}");
    assert!(!sock.exists() && !h.path.join("daemon.pid").exists());
    assert!(h.shm_files().is_empty(), "the pool is removed");
    assert!(!flash_sys::shm::pid_alive(pid as u32));
    let out = ok("stop again", flash(&h.path, &["stop"]));
    assert!(out.contains("no flash daemon"), "{out}");
}

#[test]
fn eight_clients_lease_and_release_concurrently() {
    let h = Home::new(4);
    // Room for 3 of the 4 models: the clients force evictions too.
    h.start(&["--mem-pool", &(3 * TINY_IMAGE).to_string()]);
    let wants: Vec<_> = h.models.iter().map(|m| reference(&h.path, m)).collect();
    std::thread::scope(|s| {
        for c in 0..8 {
            let (h, wants) = (&h, &wants);
            s.spawn(move || {
                let mut client = h.client();
                for i in 0..12 {
                    let k = (c * 5 + i * 3) % h.models.len();
                    match client.acquire(&h.models[k], Place::Memory) {
                        Ok(lease) => {
                            let view = lease.map_host().unwrap();
                            same_bytes(&lease.tensors, &view, &wants[k]);
                            drop(view);
                            client.release(lease).unwrap();
                        }
                        // All three slots leased by the others at this instant.
                        Err(ClientError::NoSpace(m)) => assert!(m.contains("no room"), "{m}"),
                        Err(e) => panic!("client {c}: {e}"),
                    }
                }
            });
        }
    });
    let s = h.status();
    assert_eq!(s["leases"], 0);
    let mem = tier(&s, "memory");
    assert!(mem["used"].as_u64().unwrap() <= mem["budget"].as_u64().unwrap());
    assert!(mem["evictions"].as_u64().unwrap() >= 1, "{mem}");
    assert!(resident(&s, "memory").len() <= 3);
    // Copy mode into this process's shared memory, too.
    let client = h.client();
    let (file, info, reply) = client.fill_shm(&h.models[1]).unwrap();
    assert_eq!(reply.bytes, TINY_IMAGE);
    same_bytes(&info.tensors, &file, &wants[1]);
}

#[test]
fn budgets_evict_and_respect_keep_and_leases() {
    let h = Home::new(4);
    h.start(&["--mem-pool", &(2 * TINY_IMAGE).to_string()]);
    let m = &h.models;
    ok("load keep", flash(&h.path, &["load", &m[0], "--keep"]));
    ok("load 1", flash(&h.path, &["load", &m[1]]));
    ok("load 2", flash(&h.path, &["load", &m[2]]));
    let s = h.status();
    let mut r = resident(&s, "memory");
    r.sort();
    assert_eq!(
        r,
        vec![m[0].clone(), m[2].clone()],
        "m1 evicted, the kept m0 stays"
    );
    assert_eq!(tier(&s, "memory")["evictions"], 1);
    // Lease m2: nothing can be evicted until the lease ends, so a load
    // queues behind it and goes on once the client releases it.
    let mut c = h.client();
    let lease = c.acquire(&m[2], Place::Memory).unwrap();
    assert_eq!(lease.served_from, "memory", "a hit");
    let e = fails("unload leased", flash(&h.path, &["unload", &m[2]]));
    assert!(e.contains("in use"), "{e}");
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        c.release(lease).unwrap();
    });
    let t0 = Instant::now();
    ok("load 3 behind the lease", flash(&h.path, &["load", &m[3]]));
    let waited = t0.elapsed();
    releaser.join().unwrap();
    assert!(
        waited >= Duration::from_millis(1000) && waited < Duration::from_secs(20),
        "queued until the release: {waited:?}"
    );
    assert!(resident(&h.status(), "memory").contains(&m[3]));
    // Kept copies only: waiting cannot help, so a request is refused at
    // once with a message that says what holds the tier.
    ok("keep 3", flash(&h.path, &["load", &m[3], "--keep"]));
    let t0 = Instant::now();
    let e = fails("full tier", flash(&h.path, &["load", &m[1]]));
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "refused without waiting"
    );
    assert!(
        e.contains("no room") && e.contains("kept") && e.contains("test/m3"),
        "{e}"
    );
    let out = ok(
        "unload kept",
        flash(&h.path, &["unload", &m[0], "--tier", "memory"]),
    );
    assert!(out.contains("unloaded from memory"), "{out}");
    let out = ok("unload absent", flash(&h.path, &["unload", &m[0]]));
    assert!(out.contains("not resident"), "{out}");
}

/// `--disk-loads` reaches the daemon, and `flash status` says how loads
/// take turns on the disk.
#[test]
fn disk_turns_are_set_at_start_and_reported() {
    let h = Home::new(1);
    let e = fails(
        "not a number",
        flash(&h.path, &["start", "--disk-loads", "x"]),
    );
    assert!(e.contains("--disk-loads"), "{e}");
    h.start(&["--mem-pool", "4M", "--disk-loads", "3"]);
    ok("load", flash(&h.path, &["load", &h.models[0]]));
    let s = h.status();
    assert_eq!(
        (
            s["disk_loads_limit"].as_u64(),
            s["disk_loads_reading"].as_u64(),
            s["disk_loads_waiting"].as_u64()
        ),
        (Some(3), Some(0), Some(0)),
        "{s}"
    );
    let text = ok("status", flash(&h.path, &["status"]));
    assert!(
        text.contains("disk    loads 3 at a time: 0 reading, 0 waiting"),
        "{text}"
    );
}

/// The daemon evicts the least popular idle copy, not the least recent, and
/// `--popularity-half-life` sets how fast popularity fades.
#[test]
fn popularity_decides_evictions_and_fades_with_its_half_life() {
    let h = Home::new(3);
    let e = fails(
        "half-life 0",
        flash(&h.path, &["start", "--popularity-half-life", "0"]),
    );
    assert!(
        e.contains("popularity-half-life") && e.contains("\"0\""),
        "{e}"
    );
    h.start(&[
        "--mem-pool",
        &(2 * TINY_IMAGE).to_string(),
        "--popularity-half-life",
        "0.5",
    ]);
    let m = &h.models;
    for _ in 0..3 {
        ok("load m0", flash(&h.path, &["load", &m[0]]));
    }
    ok("load m1", flash(&h.path, &["load", &m[1]]));
    // m0 is the least recent, m1 the least requested.
    ok("load m2", flash(&h.path, &["load", &m[2]]));
    let mut r = resident(&h.status(), "memory");
    r.sort();
    assert_eq!(r, vec![m[0].clone(), m[2].clone()], "m1 evicted");
    let popularity = || {
        let rows: Value =
            serde_json::from_str(&ok("ps", flash(&h.path, &["ps", "--json"]))).unwrap();
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["model"] == m[0].as_str())
            .unwrap()["popularity"]
            .as_f64()
            .unwrap()
    };
    let t0 = Instant::now();
    let before = popularity();
    assert!(before > 2.0 && before <= 3.0, "{before}");
    std::thread::sleep(Duration::from_millis(1500));
    let after = popularity();
    // At least three half-lives later: an eighth or less of it.
    let halvings = t0.elapsed().as_secs_f64() / 0.5;
    assert!(
        after <= before / 8.0 && after >= before * (-halvings - 1.0).exp2(),
        "{before} then {after} after {halvings:.1} half-lives"
    );
}

#[test]
fn refusals_say_why() {
    let h = Home::new(1);
    // The pool holds less than one model.
    h.start(&["--mem-pool", "64K"]);
    let m = &h.models[0];
    let e = fails("oversize", flash(&h.path, &["load", m]));
    assert!(e.contains("whole budget") && e.contains(m), "{e}");
    for bad in ["../etc/passwd", "a/b/c", "no-slash", "x/.hidden"] {
        let e = fails(bad, flash(&h.path, &["load", bad]));
        assert!(e.contains("invalid model name"), "{bad}: {e}");
    }
    let e = fails("unknown", flash(&h.path, &["load", "nobody/nothing"]));
    assert!(e.contains("not in the store"), "{e}");
    let e = fails("gpu on cpu", flash(&h.path, &["load", m, "--gpu", "0"]));
    assert!(e.contains("not a tier of this daemon"), "{e}");
    let e = fails(
        "disk tier",
        flash(&h.path, &["unload", m, "--tier", "disk"]),
    );
    assert!(e.contains("unknown tier"), "{e}");
    // Through the client: typed errors.
    let mut c = h.client();
    assert!(matches!(
        c.acquire(m, Place::Memory),
        Err(ClientError::NoSpace(_))
    ));
    assert!(matches!(
        c.acquire("nobody/nothing", Place::Memory),
        Err(ClientError::UnknownModel(_))
    ));
    assert!(matches!(
        c.acquire("../x", Place::Memory),
        Err(ClientError::BadRequest(_))
    ));
    assert!(matches!(
        c.release_id(12345),
        Err(ClientError::BadRequest(_))
    ));
    assert!(c.info("nobody/nothing").unwrap().is_none());
    let s = h.status();
    assert_eq!(tier(&s, "memory")["used"], 0, "nothing left behind");
    assert!(s["errors"].as_u64().unwrap() >= 3);
}

#[test]
fn a_killed_client_loses_its_leases() {
    let h = Home::new(2);
    h.start(&["--mem-pool", "4M"]);
    let m = &h.models[0];
    let mut child: Child = command(
        &h.path,
        &[
            "attach", m, "--tier", "memory", "--verify", "--hold", "0", "--json",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let report: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
        let mut err = String::new();
        let _ = child.stderr.take().unwrap().read_to_string(&mut err);
        panic!("attach printed {line:?} ({e}); stderr: {err}")
    });
    assert_eq!(report["verified"], true);
    assert_eq!(report["mode"], "share");
    let s = h.status();
    assert_eq!(s["leases"], 1);
    assert_eq!(s["sessions"], 1);
    let e = fails("unload leased", flash(&h.path, &["unload", m]));
    assert!(e.contains("in use") && e.contains("client"), "{e}");
    child.kill().unwrap();
    child.wait().unwrap();
    wait_until("the dead client's lease is released", 10, || {
        h.status()["leases"] == 0
    });
    assert_eq!(h.status()["sessions"], 0);
    ok("unload", flash(&h.path, &["unload", m]));
}

#[test]
fn sigkill_mid_load_then_restart_recovers_and_every_model_verifies() {
    let h = Home::new(3);
    let s = h.start_env(&["--mem-pool", "4M"], Some(3000));
    let pid = s["pid"].as_u64().unwrap().to_string();
    let old_pool = h.shm_files();
    assert_eq!(old_pool.len(), 1);
    // A load in flight (the test hook holds it for 3 s)...
    let loader = command(&h.path, &["load", &h.models[1]])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the load is in flight", 10, || {
        tier(&h.status(), "memory")["loading"].as_u64().unwrap() > 0
    });
    // ... and the daemon killed under it.
    assert!(Command::new("kill")
        .args(["-9", &pid])
        .status()
        .unwrap()
        .success());
    let out = loader.wait_with_output().unwrap();
    assert!(!out.status.success(), "the load cannot succeed");
    wait_until("the daemon is gone", 10, || {
        !flash_sys::shm::pid_alive(pid.parse().unwrap())
    });
    assert!(h.path.join("flash.sock").exists(), "a stale socket is left");
    // The next start cleans up by itself.
    let s = h.start(&["--mem-pool", "4M"]);
    assert_ne!(s["pid"].as_u64().unwrap().to_string(), pid);
    assert!(
        old_pool.iter().all(|p| !p.exists()),
        "the dead daemon's pool is removed"
    );
    assert_eq!(h.shm_files().len(), 1);
    for m in &h.models {
        let out = ok("verify", flash(&h.path, &["verify", m]));
        assert!(!out.contains("bad"), "{out}");
        ok("load after restart", flash(&h.path, &["load", m]));
    }
    let list = h.client().list().unwrap();
    assert_eq!(list.len(), 3);
    assert!(list.iter().all(|m| m.tiers == ["memory"]), "{list:?}");
}

#[test]
fn tcp_needs_the_token_and_metrics_are_served() {
    let h = Home::new(1);
    let s = h.start(&["--mem-pool", "4M", "--host", "127.0.0.1", "--port", "0"]);
    let tcp = s["tcp"].as_str().unwrap().to_string();
    assert!(!tcp.is_empty());
    let token = std::fs::read_to_string(h.path.join("daemon.token")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(h.path.join("daemon.token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let bad = Client::connect_tcp(&tcp, "wrong").unwrap();
    assert!(matches!(bad.status(), Err(ClientError::Unauthorized(_))));
    let good = Client::connect_tcp(&tcp, &token).unwrap();
    good.load(&h.models[0], Place::Memory, false).unwrap();
    assert_eq!(good.status().unwrap().tiers[0].loads, 1);

    let http = s["http"].as_str().unwrap();
    let mut conn = std::net::TcpStream::connect(http).unwrap();
    write!(
        conn,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    conn.read_to_string(&mut body).unwrap();
    for want in [
        "200 OK",
        "flash_tier_budget_bytes{tier=\"memory\"} 4194304",
        "flash_tier_misses_total{tier=\"memory\"} 1",
        "flash_load_seconds_count{tier=\"memory\",from=\"disk\"} 1",
        "flash_bytes_moved_total{tier=\"memory\"} 196608",
        "flash_disk_loads{state=\"reading\"} 0",
        "flash_disk_loads{state=\"waiting\"} 0",
    ] {
        assert!(body.contains(want), "{want} missing from:\n{body}");
    }
}

/// The swap workload of `bench-daemon` on a fresh daemon with a memory
/// tier of three tiny models, `args` added: its JSON report, which must
/// count no errors, requests from disk and from memory, and more than
/// `min_requests` requests.
fn swap_report(args: &[&str], min_requests: u64) -> (Home, Value) {
    let h = Home::new(0);
    h.start(&["--mem-pool", &(3 * TINY_IMAGE).to_string()]);
    let mut all = vec!["bench-daemon", "--scenario", "swap", "--json"];
    all.extend_from_slice(args);
    let out = ok(&all.join(" "), flash(&h.path, &all));
    let r: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(r["errors"], 0, "{r}");
    assert!(r["requests"].as_u64().unwrap() > min_requests, "{r}");
    let by = r["by_source"].as_object().unwrap();
    assert!(by.contains_key("disk") && by.contains_key("memory"), "{r}");
    let counted: u64 = by.values().map(|l| l["count"].as_u64().unwrap()).sum();
    assert_eq!(
        r["all"]["count"], counted,
        "all requests, whatever served them: {r}"
    );
    assert_eq!(r["all"]["count"], r["requests"], "{r}");
    let p50 = r["all"]["p50_s"].as_f64().unwrap();
    assert!(
        p50 > 0.0 && p50 <= r["all"]["max_s"].as_f64().unwrap(),
        "{r}"
    );
    (h, r)
}

#[test]
fn swap_benchmark_runs_without_errors_on_the_cpu() {
    let args = [
        "--models",
        "6",
        "--clients",
        "3",
        "--duration",
        "1.5",
        "--zipf",
        "0.8",
    ];
    let (h, _) = swap_report(&args, 10);
    assert_eq!(h.client().list().unwrap().len(), 6);
}

#[test]
fn swap_benchmark_with_compressed_models() {
    let args = [
        "--compress",
        "--models",
        "4",
        "--clients",
        "2",
        "--duration",
        "1",
    ];
    let (h, r) = swap_report(&args, 4);
    // No GPU: the memory tier holds the models compressed, read in copy mode.
    assert_eq!(r["mode"], "copy", "{r}");
    assert_eq!(r["compressed"], true, "{r}");
    let models = h.client().list().unwrap();
    assert_eq!(models.len(), 4);
    for m in &models {
        assert!(
            m.model.contains("-c-"),
            "{} is not named as compressed",
            m.model
        );
        assert!(m.compressed, "{} is not compressed", m.model);
        assert!(
            m.stored_bytes < m.size,
            "{}: {} stored of {}",
            m.model,
            m.stored_bytes,
            m.size
        );
    }
}

/// The daemon's GPU paths (pinned pool, GPU tier, CUDA IPC in share mode, copy
/// mode device to device and host to device) through `flash selftest
/// --daemon --require-gpu`, which the lead also runs on the GPU machine.
#[test]
#[ignore = "needs a GPU"]
fn gpu_share_and_copy_modes() {
    let h = Home::new(0);
    let out = ok(
        "selftest --daemon",
        flash(
            &h.path,
            &["selftest", "--daemon", "--require-gpu", "--json"],
        ),
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], true, "{v}");
}

#[test]
fn daemon_selftest_passes_on_the_cpu() {
    let h = Home::new(0);
    let out = ok(
        "selftest --daemon",
        command(&h.path, &["selftest", "--daemon", "--json"])
            .env("FLASH_NO_CUDA", "1")
            .output()
            .unwrap(),
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    assert!(v["checks"].as_array().unwrap().len() >= 6, "{v}");
}

#[test]
fn concurrent_requests_for_one_model_cause_one_load_and_stop_waits_for_it() {
    let h = Home::new(1);
    // Each load takes 500 ms: the eight requests overlap.
    h.start_env(&["--mem-pool", "4M"], Some(500));
    let m = &h.models[0];
    let froms: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    let mut c = h.client();
                    let lease = c.acquire(m, Place::Memory).unwrap();
                    let from = lease.served_from.clone();
                    c.release(lease).unwrap();
                    from
                })
            })
            .collect();
        hs.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let mem = tier(&h.status(), "memory").clone();
    assert_eq!(mem["loads"], 1, "single flight: {mem}");
    assert_eq!(
        mem["misses"].as_u64().unwrap()
            + mem["coalesced"].as_u64().unwrap()
            + mem["hits"].as_u64().unwrap(),
        8
    );
    assert_eq!(
        froms.iter().filter(|f| *f == "disk").count() as u64,
        8 - mem["hits"].as_u64().unwrap()
    );
    // A stop during a load lets it finish: the loading client succeeds.
    ok("unload", flash(&h.path, &["unload", m]));
    let loader = command(&h.path, &["load", m])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the load is in flight", 10, || {
        tier(&h.status(), "memory")["loading"].as_u64().unwrap() > 0
    });
    ok("stop", flash(&h.path, &["stop"]));
    let out = loader.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!h.path.join("flash.sock").exists());
}

#[test]
fn ranks_of_a_split_model_are_images_of_their_own() {
    let h = Home::new(0);
    let src = h.path.parent().unwrap().join("src-tp");
    ok(
        "synth",
        flash(
            &h.path,
            &[
                "synth",
                "qwen3",
                "tiny",
                src.to_str().unwrap(),
                "--seed",
                "7",
            ],
        ),
    );
    let src_arg = src.to_str().unwrap();
    let pull = |name: &str, extra: &[&str]| {
        let mut args = vec!["pull", "--from", src_arg, "--name", name];
        args.extend_from_slice(extra);
        flash(&h.path, &args)
    };
    ok("pull --tp 2", pull("test/tp", &["--tp", "2"]));
    let store = Store::open(&h.path).unwrap();
    let dir = store.existing(&"test/tp".parse().unwrap()).unwrap();
    let rank_ref = |r: u32| {
        let src = flash_load::ModelSource::open_rank(&dir, r).unwrap();
        flash_load::load_to_host(&src, None, &flash_load::LoadOptions::default())
            .unwrap()
            .0
    };
    h.start(&[]);
    let mut c = h.client();
    for r in 0..2u32 {
        let lease = c.acquire(&format!("test/tp#{r}"), Place::Memory).unwrap();
        let want = rank_ref(r);
        let q = lease
            .tensors
            .iter()
            .find(|t| t.name == "model.layers.0.self_attn.q_proj.weight")
            .unwrap();
        assert_eq!(q.shape, [32, 64], "rank {r}: half the heads");
        same_bytes(&lease.tensors, &lease.map_host().unwrap(), &want);
        c.release(lease).unwrap();
    }
    // Each rank is its own copy in the tier.
    let mut r = resident(&h.status(), "memory");
    r.sort();
    assert_eq!(r, ["test/tp#0", "test/tp#1"]);
    // Without a rank, or a rank it does not have: clear refusals.
    let e = c.acquire("test/tp", Place::Memory).unwrap_err().to_string();
    assert!(
        e.contains("2 tensor-parallel ranks") && e.contains("test/tp#R"),
        "{e}"
    );
    let e = c
        .acquire("test/tp#2", Place::Memory)
        .unwrap_err()
        .to_string();
    assert!(e.contains("#0 to #1"), "{e}");
    ok("pull whole", pull("test/whole", &[]));
    let e = fails(
        "load a rank of an unsplit",
        flash(&h.path, &["load", "test/whole#1"]),
    );
    assert!(e.contains("not split into ranks"), "{e}");
    let e = c
        .acquire("test/tp#x", Place::Memory)
        .unwrap_err()
        .to_string();
    assert!(e.contains("rank after '#'"), "{e}");
    // Unloading the model by its name unloads its ranks; `flash load`
    // takes a rank.
    ok("unload", flash(&h.path, &["unload", "test/tp"]));
    assert!(resident(&h.status(), "memory").is_empty());
    ok(
        "load #1",
        flash(&h.path, &["load", "test/tp#1", "--memory"]),
    );
    assert_eq!(resident(&h.status(), "memory"), ["test/tp#1"]);
    // Removing the model drops every rank's copy first.
    ok(
        "load #0",
        flash(&h.path, &["load", "test/tp#0", "--memory"]),
    );
    ok("rm", flash(&h.path, &["rm", "test/tp"]));
    assert!(resident(&h.status(), "memory").is_empty());
}
