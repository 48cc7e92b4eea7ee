//! `flash bench` on the CPU: one JSON line per measurement, sane values, and
//! clean errors for bad arguments.

use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_flash");

fn flash(store: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--storage")
        .arg(store)
        .arg("-q")
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("FLASH_HOME")
        .output()
        .expect("run flash")
}

#[test]
fn bench_synth_prints_json_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let out = flash(
        &store,
        &["bench", "--synth", "qwen3:tiny", "--json", "--threads", "2"],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    let rows: Vec<Value> = stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}")))
        .collect();
    let mut seen = BTreeSet::new();
    for r in &rows {
        let loader = r["loader"].as_str().unwrap();
        let scenario = r["scenario"].as_str().unwrap();
        assert!(["disk", "flash", "mmap"].contains(&loader), "{r}");
        assert!(["cold", "warm"].contains(&scenario), "{r}");
        assert!(r["seconds"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["bytes"].as_u64().unwrap() > 0, "{r}");
        assert!(r["gbps"].as_f64().unwrap() > 0.0, "{r}");
        let resident = r["resident_before"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&resident), "{r}");
        assert_eq!(r["card"], "cpu", "{r}");
        assert_eq!(r["model"], "synth:qwen3:tiny", "{r}");
        assert!(
            seen.insert((loader.to_string(), scenario.to_string())),
            "{loader}/{scenario} twice"
        );
    }
    // Every loader cold; warm for all but disk (O_DIRECT ignores the page cache).
    let want: BTreeSet<(String, String)> = [
        ("disk", "cold"),
        ("flash", "cold"),
        ("mmap", "cold"),
        ("flash", "warm"),
        ("mmap", "warm"),
    ]
    .iter()
    .map(|(l, s)| (l.to_string(), s.to_string()))
    .collect();
    assert_eq!(seen, want);
    // flash and mmap move the same tensor bytes; disk reads whole files.
    let bytes = |l: &str| {
        rows.iter().find(|r| r["loader"] == l).unwrap()["bytes"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(bytes("flash"), bytes("mmap"));
    assert!(bytes("disk") >= bytes("flash"));
    // The synthesized scratch model is gone.
    let left: Vec<_> = std::fs::read_dir(store.join("tmp"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "bench left {left:?}");
}

#[test]
fn bench_refuses_bad_arguments() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["bench", "--scenario", "nope", "X"],
            &["unknown scenario", "\"nope\""],
        ),
        (&["bench", "--synth", "qwen3"], &["ARCH:SIZE"]),
        (&["bench", "--synth", "qwen3:huge"], &["\"huge\""]),
        (&["bench", "--synth", "gpt9:tiny"], &["\"gpt9\""]),
        (
            &["bench", "nope/missing"],
            &["nope/missing", "not in the store"],
        ),
        (
            &["bench", "--pattern", "direct:shared:1x16M:qd16", "X"],
            &["direct:shared:1x16M:qd16", "flash bench-disk"],
        ),
        (
            &["bench", "--staging-size", "0", "X"],
            &["--staging-size 0", "at least one byte"],
        ),
    ];
    for (args, needles) in cases {
        let out = flash(&store, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{args:?}: {lines:#?}");
        assert!(lines[0].starts_with("error: "), "{args:?}: {}", lines[0]);
        for n in *needles {
            assert!(
                lines[0].contains(n),
                "{args:?}: {:?} does not mention {n:?}",
                lines[0]
            );
        }
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    // Usage errors are clap's: exit 2.
    let out = flash(&store, &["bench"]);
    assert_eq!(out.status.code(), Some(2));
    let out = flash(&store, &["bench", "--synth", "qwen3:tiny", "X"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "--synth conflicts with a target"
    );
}
