#!/usr/bin/env bash
# The Python SDK's tests: builds the abi3 wheel with maturin (the
# `flash` binary bundled), installs it into an environment of CPython 3.11
# (made once per machine, scripts/ci-env.sh) and
# runs tests/python_sdk against a real daemon on the CPU (numpy only, no
# torch), then installs the same wheel into CPython 3.12 and runs the suite
# again when that interpreter is present. Called by scripts/test.sh after the
# Rust tests (target/debug/flash must exist; it is built here if not). Ends
# with scripts/test-vllm.sh (the real vLLM, CPU build).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

# The same build as the Rust tests' (`cargo test --workspace`: the same
# features, so nothing compiles again after scripts/test.sh), which also
# builds target/debug/flash; `cargo build -p flash-cli` would resolve
# features for flash-cli alone and compile a second copy of much of the
# workspace.
cargo test -q --workspace --no-run --locked
# The wheel ships the debug binary built above, stripped (it is several
# times smaller without debug info, and the wheel is zipped).
strip -o target/flash-for-wheel target/debug/flash

# maturin and the suite's packages, in an environment made once per machine.
source scripts/ci-env.sh
venv=$(ci_env sdk python3 tests/python_sdk/requirements.txt)

echo "== python sdk: maturin build"
# maturin compiles flash-py alone; with the workspace's features it reuses
# everything the Rust tests compiled (only flash-py and PyO3 are new).
bash scripts/check-wheel-features.sh
rm -rf target/sdk-wheels
# Debug profile: reuses what `cargo test` built; --strip keeps the wheel small.
(cd python && FLASHTENSORS_FLASH_BIN="$PWD/../target/flash-for-wheel" \
    "$venv/bin/maturin" build --strip -i "$venv/bin/python" --out ../target/sdk-wheels)
wheel=$(ls target/sdk-wheels/flashtensors-*-abi3-*.whl)

# run_suite ENV: the wheel of this checkout into ENV (an environment of
# ci_env with the suite's packages), then the suite.
run_suite() {
    local env=$1
    "$env/bin/python" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps "$wheel"
    echo "== python sdk: pytest ($("$env/bin/python" --version))"
    # FLASH_BIN unset: the SDK must use the binary bundled in the wheel.
    env -u FLASH_BIN -u FLASH_HOME "$env/bin/python" -m pytest -q -p no:cacheprovider tests/python_sdk
}

run_suite "$venv"
# The same abi3 wheel on CPython 3.12, where one is installed (pyenv or PATH).
py312=""
for c in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
    if [ -n "$c" ] && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
        py312=$c
        break
    fi
done
if [ -n "$py312" ]; then
    run_suite "$(ci_env sdk-suite "$py312" pytest numpy safetensors ml_dtypes)"
else
    echo "== python sdk: no CPython 3.12 here, the 3.11 run stands for the abi3 wheel"
fi

# The vLLM integration against the real vLLM (its CPU build), with the wheel
# built above: its environment is made once per machine, outside the checkout.
bash scripts/test-vllm.sh
