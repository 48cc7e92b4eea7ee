#!/usr/bin/env bash
# Every test of the project, on a machine without a GPU: formatting, lints
# (warnings denied), the Rust tests, the CUDA kernels compiled by NVRTC, then
# the Python compatibility tests that check flash against the reference
# safetensors/tokenizers/transformers packages, the SDK's tests and vLLM.
# Installs what it needs (Python packages into environments made once per
# machine, scripts/ci-env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

echo "== rustfmt"
cargo fmt --all --check
echo "== clippy and cargo test"
# Clippy lints the workspace's crates while the tests build: as the workspace
# wrapper, clippy-driver compiles them as rustc does, with its lints added, so
# the dependencies compile once (`cargo clippy` would check them in a build of
# its own). Exported: the SDK's wheel build below reuses the same artifacts.
# `cargo test` builds the examples too and the workspace has no benches, so
# the test build covers every target `cargo clippy --all-targets` would lint.
export RUSTC_WORKSPACE_WRAPPER=clippy-driver
export RUSTFLAGS="-D warnings"
cargo test --workspace --locked
echo "== rustdoc"
# The crates' documentation builds without warnings (broken or private
# links, stray HTML): ARCHITECTURE.md sends readers to it.
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked -q
echo "== fuzz targets (compiled and linted, not run)"
# They run on nightly with cargo-fuzz (README); here they only have to keep
# compiling against the crates they call. Their own workspace and lock file.
cargo check --manifest-path fuzz/Cargo.toml --bins --locked -q --target-dir target/fuzz-check
echo "== python"
# The reference packages and NVRTC, in an environment made once per machine
# (scripts/ci-env.sh).
source scripts/ci-env.sh
pyenv=$(ci_env compat python3 tests/python/requirements.txt "nvidia-cuda-nvrtc>=13,<14")
echo "using $pyenv"
echo "== CUDA kernels (NVRTC, no GPU needed)"
# Every CUDA source the binary carries compiles for Hopper: NVRTC comes as a
# wheel (no GPU, no CUDA toolkit), loaded at run time as on a GPU machine.
nvrtc_lib=$(dirname "$(find "$pyenv" -name 'libnvrtc.so.13*' -print -quit)")
LD_LIBRARY_PATH="$nvrtc_lib" target/debug/flash kernels --compile-only --arch sm_90
# Checkpoints for the transformers/tokenizers compatibility tests.
synth=target/synth-compat
rm -rf "$synth"
target/debug/flash -q synth qwen3 tiny "$synth/qwen3-tiny" --seed 1
target/debug/flash -q synth llama tiny "$synth/llama-tiny-f32" --seed 1 --dtype fp32 --shard-size 60000
export FLASH_SYNTH_DIR="$synth/qwen3-tiny:$synth/llama-tiny-f32"
FLASH_BIN="$PWD/target/debug/flash" "$pyenv/bin/python" -m pytest -q -p no:cacheprovider tests/python
echo "== python sdk"
bash scripts/test-python-sdk.sh
