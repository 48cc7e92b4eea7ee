//! What the daemon's end-to-end tests share: the real `flash` binary run
//! against a store of its own ([`Home`]), with the environment cleared of
//! anything that would point it elsewhere, and helpers to read `flash
//! status --json`.

// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use flash_client::Client;
use flash_store::{ImportOptions, Store};
use flash_synth::{spec, synth, Arch, SynthOptions};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_flash");
/// The image of a tiny Qwen3 checkpoint in a tier.
pub const TINY_IMAGE: u64 = 196_608;

/// `flash --storage HOME -q ARGS`, with no inherited `RUST_LOG`,
/// `FLASH_HOME` or test hooks.
pub fn command(home: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("--storage")
        .arg(home)
        .arg("-q")
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("FLASH_HOME")
        .env_remove("FLASH_TEST_LOAD_DELAY_MS")
        .stdin(Stdio::null());
    c
}

pub fn flash(home: &Path, args: &[&str]) -> Output {
    command(home, args).output().expect("run flash")
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Asserts success and returns stdout.
pub fn ok(what: &str, out: Output) -> String {
    assert!(
        out.status.success(),
        "{what}: exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Asserts failure (not a panic) and returns stderr.
pub fn fails(what: &str, out: Output) -> String {
    assert!(
        !out.status.success(),
        "{what} should fail\nstdout: {}",
        text(&out.stdout)
    );
    let e = text(&out.stderr);
    assert!(!e.contains("panicked"), "{what} panicked: {e}");
    e
}

/// Asserts success and parses stdout as one JSON value.
pub fn json(what: &str, out: Output) -> Value {
    let s = ok(what, out);
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {s}"))
}

/// A store with `n` tiny Qwen3 models `test/m<i>` (different bytes), and a
/// daemon stopped (or killed) when dropped.
pub struct Home {
    _tmp: tempfile::TempDir,
    pub path: PathBuf,
    pub models: Vec<String>,
}

impl Home {
    pub fn new(n: usize) -> Home {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("home");
        let store = Store::open(&path).unwrap();
        let mut models = Vec::new();
        for i in 0..n {
            let src = tmp.path().join(format!("src{i}"));
            let opts = SynthOptions {
                seed: 100 + i as u64,
                ..Default::default()
            };
            synth(&spec(Arch::Qwen3, "tiny").unwrap(), &src, &opts).unwrap();
            let name = format!("test/m{i}");
            store
                .import(&src, &name.parse().unwrap(), &ImportOptions::default())
                .unwrap();
            models.push(name);
        }
        Home {
            _tmp: tmp,
            path,
            models,
        }
    }

    /// `flash start` on an ephemeral HTTP port with two load threads;
    /// returns the status after the start.
    pub fn start(&self, extra: &[&str]) -> Value {
        self.start_env(extra, None)
    }

    /// [`Home::start`], with every disk load delayed by `delay_ms` (a test
    /// hook of the daemon).
    pub fn start_env(&self, extra: &[&str], delay_ms: Option<u64>) -> Value {
        let mut args = vec!["start", "--http", "127.0.0.1:0", "--threads", "2"];
        args.extend_from_slice(extra);
        let mut c = command(&self.path, &args);
        if let Some(ms) = delay_ms {
            c.env("FLASH_TEST_LOAD_DELAY_MS", ms.to_string());
        }
        let out = ok("flash start", c.output().unwrap());
        assert!(out.contains("flash daemon started"), "{out}");
        self.status()
    }

    pub fn status(&self) -> Value {
        json("status", flash(&self.path, &["status", "--json"]))
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.path).unwrap()
    }

    /// `flash run MODEL PROMPT --max-tokens 12 --json`, greedy unless
    /// `extra` sets a temperature.
    pub fn run(&self, model: &str, prompt: &str, extra: &[&str]) -> Value {
        let mut args = vec!["run", model, prompt, "--max-tokens", "12", "--json"];
        if !extra.contains(&"--temperature") {
            args.extend(["--temperature", "0"]);
        }
        args.extend_from_slice(extra);
        json("flash run", flash(&self.path, &args))
    }

    pub fn shm_files(&self) -> Vec<PathBuf> {
        std::fs::read_dir(flash_daemon::server::shm_dir(&self.path))
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.path.join("daemon.pid")) {
            if Client::connect(&self.path).is_ok() {
                let _ = flash(&self.path, &["stop", "--timeout", "20"]);
            } else if let Ok(pid) = pid.trim().parse::<i32>() {
                let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            }
        }
    }
}

/// One tier of `flash status --json`.
pub fn tier<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["tiers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tier"] == name)
        .unwrap_or_else(|| panic!("no tier {name} in {status}"))
}

/// The models resident in one tier of `flash status --json`.
pub fn resident(status: &Value, tier_name: &str) -> Vec<String> {
    tier(status, tier_name)["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["model"].as_str().unwrap().to_string())
        .collect()
}

pub fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}
