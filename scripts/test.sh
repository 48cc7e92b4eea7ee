#!/usr/bin/env bash
# Every test of the project, on a machine without a GPU: formatting, lints
# (warnings denied), the Rust tests, then the Python compatibility tests that
# check flash against the reference safetensors/tokenizers/transformers
# packages. Installs what it needs (Python packages into target/pyenv).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

echo "== rustfmt"
cargo fmt --all --check
echo "== clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked
echo "== python"
python3 -m venv target/pyenv
target/pyenv/bin/python -m pip install -q --disable-pip-version-check -r tests/python/requirements.txt
# Checkpoints for the transformers/tokenizers compatibility tests.
synth=target/synth-compat
rm -rf "$synth"
target/debug/flash -q synth qwen3 tiny "$synth/qwen3-tiny" --seed 1
target/debug/flash -q synth llama tiny "$synth/llama-tiny-f32" --seed 1 --dtype fp32 --shard-size 60000
export FLASH_SYNTH_DIR="$synth/qwen3-tiny:$synth/llama-tiny-f32"
FLASH_BIN="$PWD/target/debug/flash" target/pyenv/bin/python -m pytest -q tests/python
echo "== python sdk"
bash scripts/test-python-sdk.sh
