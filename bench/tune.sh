#!/usr/bin/env bash
# A short tuning run on the GPU machine: where the cold time goes over reader
# threads and pinned staging (size of a buffer x buffers per reader), next to
# the raw disk and the best cold peer, in alternating order (the disk's speed
# drifts). Prints one line a run; `bench/device.sh` is the full benchmark.
# Usage (GPU machine): bash bench/tune.sh [8b|0.6b|all]
set -uo pipefail
cd "$(dirname "$0")/.."
F=$PWD/.carry/flash
which=${1:-all}
export PYTHONUNBUFFERED=1
S=/var/tmp/flash-tune
mkdir -p "$S"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
$F selftest --require-gpu | tail -2
$F doctor --json | python3 -c 'import json,sys; d=json.load(sys.stdin); print({k: d.get(k) for k in ("pin_gbps","h2d_pinned_gbps","h2d_pageable_gbps","disk_read_gbps","page_cache_read_gbps")})'
sizes="0.6b 8b"; [ "$which" != all ] && sizes=$which
for size in $sizes; do [ -d $S/q$size ] || $F -q synth qwen3 $size $S/q$size; done
b() { $F -q bench "$@" --json | python3 -c '
import json,sys
for l in sys.stdin:
    d=json.loads(l); st=d.get("stats") or {}
    print("%-58s %-6s %-5s %7.3f s %6.2f GB/s rss %5.2f GB  read %6.1f sink %5.1f" % (sys.argv[1][:58], d["loader"], d["scenario"], d["seconds"], d["gbps"], (d.get("rss_peak_bytes") or 0)/1e9, st.get("read_seconds",0), st.get("sink_seconds",0)))' "$*"; }
peer() { python3 bench/peers.py --loader fastsafetensors --model-dir $S/q$1 --model q$1 --scenario cold --card H | python3 -c '
import json,sys
for l in sys.stdin:
    try: d=json.loads(l)
    except ValueError: continue
    print("%-58s %-6s %-5s %7.3f s %6.2f GB/s" % ("fastsafetensors", "peer", "cold", d["seconds"], d["gbps"]))'; }
for size in $sizes; do
  echo "== qwen3-$size cold"
  for rep in 1 2; do
    peer $size
    b $S/q$size --scenario cold --loader disk --threads 32 --chunk-size 32M
    b $S/q$size --scenario cold --loader flash --threads 32 --chunk-size 32M --staging-size 2M --staging-buffers 3
    b $S/q$size --scenario cold --loader flash --threads 32 --chunk-size 32M --staging-size 8M --staging-buffers 2
    b $S/q$size --scenario cold --loader flash --threads 32 --chunk-size 32M --staging-size 16M --staging-buffers 2
    b $S/q$size --scenario cold --loader flash --threads 32 --chunk-size 32M --staging-size 32M --staging-buffers 1
    b $S/q$size --scenario cold --loader flash --threads 16 --chunk-size 32M --staging-size 32M --staging-buffers 2
    b $S/q$size --scenario cold --loader flash --threads 64 --chunk-size 16M --staging-size 16M --staging-buffers 1
  done
done
