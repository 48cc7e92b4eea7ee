#!/usr/bin/env bash
# Builds what bench/device.sh needs on the GPU machine (which has no Rust):
# the stripped release `flash` at .carry/flash and the Python SDK's release
# wheel (with that binary inside) at .carry/wheels/. Both folders are
# gitignored and travel with `carry: [".carry", ".whl"]`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p flash-cli
mkdir -p .carry/wheels
strip -o .carry/flash target/release/flash
venv=target/sdk-venv
[ -x "$venv/bin/maturin" ] || { python3 -m venv "$venv" && "$venv/bin/python" -m pip install -q -r tests/python_sdk/requirements.txt; }
rm -f .carry/wheels/*.whl
(cd python && FLASHTENSORS_FLASH_BIN="$PWD/../.carry/flash" \
    "../$venv/bin/maturin" build --release --strip -i "../$venv/bin/python" --out ../.carry/wheels)
ls -l .carry/flash .carry/wheels/
