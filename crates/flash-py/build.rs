//! When maturin builds the wheel, put the `flash` binary (daemon and CLI) at
//! `python/flashtensors/bin/flash` so that the wheel ships it and
//! `flashtensors.configure()` can start the daemon.
//!
//! - `FLASHTENSORS_FLASH_BIN=PATH`: copy this prebuilt binary (CI reuses
//!   `target/debug/flash`);
//! - otherwise: `cargo build --release -p flash-cli` into
//!   `target/flash-bundle` (incremental: fast when nothing changed);
//! - `FLASHTENSORS_NO_BUNDLE=1`: do nothing (the SDK then finds `flash` on
//!   PATH or through `FLASH_BIN`).
//!
//! Plain `cargo build`/`clippy`/`test` of the workspace do nothing here:
//! maturin is recognised by `PYO3_BUILD_EXTENSION_MODULE`, which it sets.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    for var in [
        "PYO3_BUILD_EXTENSION_MODULE",
        "FLASHTENSORS_FLASH_BIN",
        "FLASHTENSORS_NO_BUNDLE",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if env::var_os("PYO3_BUILD_EXTENSION_MODULE").is_none()
        || env::var_os("FLASHTENSORS_NO_BUNDLE").is_some_and(|v| !v.is_empty() && v != "0")
    {
        return;
    }
    // The binary depends on the whole workspace: look every time (a path
    // that never exists makes cargo run this script on every build).
    println!("cargo:rerun-if-changed=flash-bundle-always-rerun");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest
        .parent()
        .and_then(Path::parent)
        .expect("crates/flash-py is two levels below the workspace root")
        .to_path_buf();
    let dest_dir = root.join("python").join("flashtensors").join("bin");
    let dest = dest_dir.join("flash");
    let src = match env::var_os("FLASHTENSORS_FLASH_BIN").filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => build_flash(&root),
    };
    if let Err(e) = std::fs::create_dir_all(&dest_dir)
        .and_then(|_| std::fs::copy(&src, dest_dir.join(".flash.tmp")))
        .and_then(|_| std::fs::rename(dest_dir.join(".flash.tmp"), &dest))
    {
        panic!(
            "cannot put the flash binary {} at {}: {e}",
            src.display(),
            dest.display()
        );
    }
}

fn build_flash(root: &Path) -> PathBuf {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target_dir = root.join("target").join("flash-bundle");
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .args(["build", "--release", "-p", "flash-cli", "--target-dir"])
        .arg(&target_dir)
        // Settings cargo passes to build scripts, not meant for this build.
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("PYO3_BUILD_EXTENSION_MODULE");
    if Path::new(root).join("Cargo.lock").exists() {
        cmd.arg("--locked");
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo to build the flash binary: {e}"));
    if !status.success() {
        panic!("building the flash binary (cargo build --release -p flash-cli) failed: {status}");
    }
    target_dir.join("release").join("flash")
}
