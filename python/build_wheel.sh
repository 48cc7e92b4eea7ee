#!/usr/bin/env bash
# Builds the release wheel of the Python SDK into target/wheels: the PyO3
# extension (abi3, CPython >= 3.11) and the `flash` binary, which
# crates/flash-py/build.rs builds (cargo build --release -p flash-cli) and
# puts at flashtensors/bin/flash. Needs a Rust toolchain; maturin comes from
# PyPI in pip's isolated build environment.
#
#   python/build_wheel.sh && pip install target/wheels/flashtensors-*.whl
#
# `pip install ./python` does the same build and installs the result.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip wheel --no-deps -w target/wheels ./python "$@"
ls -l target/wheels/flashtensors-*.whl
