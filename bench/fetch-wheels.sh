#!/usr/bin/env bash
# Downloads the peer loaders' wheels for the GPU machine into .whl/ (gitignored).
#
# The GPU machine: Python 3.12, manylinux x86_64, no network. torch 2.11 (cu130),
# numpy, safetensors 0.8, typing-extensions, ... are already there (see the
# device README's package list): only what is missing travels. Every wheel is
# fetched with --no-deps; each missing dependency is named here after reading
# the wheel's METADATA (`unzip -p .whl/NAME-*.whl '*/METADATA' | grep ^Requires-Dist`):
#
#   fastsafetensors 0.5.0    Requires-Dist: typer (there)
#   runai-model-streamer 0.17.0 (py3-none-manylinux_2_30)
#                            Requires-Dist: humanize (there), numpy (there);
#                            extras s3/gcs/azure not fetched
#   instanttensor 0.2.2      Requires-Dist: none beyond torch/numpy (there)
#
# Versions can be overridden: FASTSAFETENSORS=0.5.0 RUNAI=0.17.0 INSTANTTENSOR=0.2.2.
# Run from the repository root: bash bench/fetch-wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."

FASTSAFETENSORS="${FASTSAFETENSORS:-0.5.0}"
RUNAI="${RUNAI:-0.17.0}"
INSTANTTENSOR="${INSTANTTENSOR:-0.2.2}"

mkdir -p .whl
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux1_x86_64)
# Some wheels name a newer glibc baseline (runai-model-streamer 0.17: 2_30);
# the machine has glibc 2.39, and pip matches N exactly.
EXTRA=()
for n in $(seq 24 39); do EXTRA+=(--platform "manylinux_2_${n}_x86_64"); done

fetch() {
    local spec="$1"
    if python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${PLATFORMS[@]}" -d .whl "$spec"; then
        return 0
    fi
    echo "retrying $spec with newer manylinux tags" >&2
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${PLATFORMS[@]}" "${EXTRA[@]}" -d .whl "$spec" || {
        echo "NO WHEEL for $spec on cp312 manylinux x86_64" >&2
        return 1
    }
}

status=0
fetch "fastsafetensors==${FASTSAFETENSORS}" || status=1
fetch "runai-model-streamer==${RUNAI}" || status=1
fetch "instanttensor==${INSTANTTENSOR}" || status=1

# Keep one version of each (two stop the whole install on the device).
echo "--- .whl/"
ls -la .whl/
for w in .whl/*.whl; do
    echo "--- $(basename "$w")"
    unzip -p "$w" '*/METADATA' 2>/dev/null | grep '^Requires-Dist' | grep -v 'extra ==' || true
done
du -sh .whl/
exit $status
