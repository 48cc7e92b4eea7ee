//! `flash run` through the daemon on the CPU: the real binary, a store of
//! tiny synthesized models, the daemon started by the test (or by `flash
//! run` itself). Greedy generation through the daemon must give exactly the
//! token ids of `flash run --no-daemon`; a request for a model that is not
//! resident swaps it in through the tiers, and an idle engine never keeps a
//! copy from being evicted.

mod common;

use common::*;
use flash_client::{Client, Place};
use std::process::Command;

#[test]
fn run_through_the_daemon_matches_in_process() {
    let h = Home::new(1);
    h.start(&[]);
    let m = &h.models[0];
    for (prompt, raw) in [("Hello there", false), ("Once upon a time", true)] {
        let extra: &[&str] = if raw { &["--raw"] } else { &[] };
        let via = h.run(m, prompt, extra);
        let local = h.run(m, prompt, &[extra, &["--no-daemon"]].concat());
        assert_eq!(via["via"], "daemon", "{via}");
        assert!(local.get("via").is_none(), "{local}");
        for k in ["prompt_token_ids", "token_ids", "text", "finish_reason"] {
            assert_eq!(via[k], local[k], "{k} differs for {prompt:?}");
        }
        assert!(!via["token_ids"].as_array().unwrap().is_empty());
        for k in ["load_s", "ttft_s", "tokens_per_s"] {
            assert!(via[k].as_f64().is_some_and(|x| x >= 0.0), "{k}: {via}");
        }
        assert_eq!(via["device"], "cpu");
    }
    // The engine stays: the second request finds it (no load).
    let again = h.run(m, "Hello there", &[]);
    assert_eq!(again["served_from"], "engine", "{again}");
    assert_eq!(again["load_s"].as_f64(), Some(0.0));

    // Text streamed to stdout is the JSON's text; the timings go to stderr.
    let out = Command::new(BIN)
        .arg("--storage")
        .arg(&h.path)
        .args([
            "run",
            m,
            "Hello there",
            "--max-tokens",
            "12",
            "--temperature",
            "0",
        ])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stdout.strip_suffix('\n').unwrap(),
        again["text"].as_str().unwrap()
    );
    assert!(
        stderr.contains("TTFT") && stderr.contains("tokens/s"),
        "{stderr}"
    );

    // Unknown models are refused with the daemon's reason.
    let out = flash(&h.path, &["run", "nobody/none", "hi"]);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("HTTP 404") && e.contains("nobody/none"), "{e}");
}

#[test]
fn run_starts_a_daemon_when_none_runs() {
    let h = Home::new(1);
    assert!(Client::connect(&h.path).is_err());
    let via = h.run(&h.models[0], "Hi", &[]);
    assert_eq!(via["via"], "daemon");
    // It was loaded from disk for this request, and it is still up.
    assert_eq!(via["served_from"], "disk", "{via}");
    let s = h.status();
    assert_eq!(resident(&s, "memory"), vec![h.models[0].clone()]);
}

#[test]
fn requests_swap_models_through_the_tiers() {
    // Room for one model in memory: each request for the other model swaps.
    let h = Home::new(3);
    h.start(&["--mem-pool", &TINY_IMAGE.to_string()]);
    let (a, b) = (&h.models[0], &h.models[1]);
    // Sampled with a seed: the weights show in the tokens (greedy
    // text of random tiny models repeats the prompt's last token).
    let sampled = ["--raw", "--temperature", "1", "--seed", "3"];
    let ra = h.run(a, "Hello", &sampled);
    assert_eq!(resident(&h.status(), "memory"), vec![a.clone()]);
    // The engine of `a` is idle: it holds no lease, so `b` can evict `a`.
    let rb = h.run(b, "Hello", &sampled);
    assert_eq!(rb["served_from"], "disk");
    assert_eq!(resident(&h.status(), "memory"), vec![b.clone()]);
    assert_ne!(ra["token_ids"], rb["token_ids"], "different weights");
    for (m, r) in [(a, &ra), (b, &rb)] {
        let local = h.run(m, "Hello", &[&sampled[..], &["--no-daemon"]].concat());
        assert_eq!(r["token_ids"], local["token_ids"], "{m}");
    }

    // A third model needs the room that a client's lease holds: the request
    // queues behind the lease and is served once the client releases it.
    let c = &h.models[2];
    let mut client = Client::connect(&h.path).unwrap();
    let lease = client.acquire(b, Place::Memory).unwrap();
    // Meanwhile `a` still has its CPU engine (f32 weights of its own): no
    // copy needed, so it is served at once.
    let again = h.run(a, "Hello", &sampled);
    assert_eq!(again["token_ids"], ra["token_ids"]);
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(1500));
        client.release(lease).unwrap();
    });
    let t0 = std::time::Instant::now();
    let rc = h.run(c, "Hello", &[]);
    assert!(
        t0.elapsed() >= std::time::Duration::from_secs(1),
        "it waited for the lease"
    );
    releaser.join().unwrap();
    assert_eq!(rc["served_from"], "disk");
    assert_eq!(resident(&h.status(), "memory"), vec![c.clone()]);
    // A kept copy cannot make room: 503 at once, and the message says what
    // holds the tier.
    ok("keep c", flash(&h.path, &["load", c, "--keep"]));
    let out = flash(&h.path, &["run", b, "Hello", "--max-tokens", "4"]);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("HTTP 503") && e.contains(c.as_str()) && e.contains("kept"),
        "{e}"
    );
}

/// `flash load` of a model parses its tokenizer while the weights load, so
/// that the first request finds it ready (the daemon logs the parse); a
/// request then generates as before.
#[test]
fn load_parses_the_tokenizer_ahead_of_the_first_request() {
    let h = Home::new(1);
    h.start(&[]);
    let m = &h.models[0];
    ok("flash load", flash(&h.path, &["load", m, "--memory"]));
    let log = h.path.join(flash_daemon::LOG_FILE);
    let want = format!("tokenizer parsed ahead of the first request model={m}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(&want) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {want:?} in the daemon's log:\n{text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let r = h.run(m, "Hello there", &[]);
    assert_eq!(r["via"], "daemon", "{r}");
    assert!(!r["token_ids"].as_array().unwrap().is_empty(), "{r}");
}
