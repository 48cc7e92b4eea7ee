#!/usr/bin/env bash
# A short tuning run on the GPU machine: where the cold time goes over reader
# threads, read sizes and pinned staging sizes, with two peers for reference.
# Prints one line a run; `bench/device.sh` is the full benchmark.
# (The run recorded in bench/results/2026-11-27-NVIDIA-H200-tune.log compared
# pinned with a pageable staging path since removed; the next run sweeps
# --staging-size.)
set -uo pipefail
cd "$(dirname "$0")/.."
F=$PWD/.carry/flash
export FLASH_HOME=/var/tmp/flash-tune/store PYTHONUNBUFFERED=1
S=/var/tmp/flash-tune
mkdir -p "$S"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
$F selftest --require-gpu | tail -4
$F doctor --json | python3 -c 'import json,sys; d=json.load(sys.stdin); print({k: d[k] for k in ("pin_gbps","h2d_pinned_gbps","h2d_pageable_gbps","disk_read_gbps","page_cache_read_gbps")})'
for size in 0.6b 8b; do
  $F -q synth qwen3 $size $S/q$size && $F -q pull --from $S/q$size --name t/q$size
done
b() { $F -q bench "$@" --json | python3 -c '
import json,sys
for l in sys.stdin:
    d=json.loads(l); st=d.get("stats") or {}
    print(sys.argv[1], d["model"], d["loader"], d["scenario"], "%.3f s" % d["seconds"], "%.2f GB/s" % d["gbps"], "read %.1f sink %.1f" % (st.get("read_seconds",0), st.get("sink_seconds",0)))' "$*"; }
for rep in 1 2; do
  b t/q0.6b --scenario cold --loader flash --threads 32 --chunk-size 32M
  b t/q0.6b --scenario cold --loader flash --threads 16 --chunk-size 8M
  b t/q0.6b --scenario cold --loader flash --threads 32 --chunk-size 4M
  b t/q0.6b --scenario cold --loader flash,disk --threads 32 --chunk-size 32M --staging-size 8M
  python3 bench/peers.py --loader fastsafetensors --model-dir $S/q0.6b --model q0.6b --scenario cold --card H | tail -1
done
python3 bench/peers.py --loader runai --model-dir $S/q8b --model q8b --scenario cold --card H | tail -1
for rep in 1 2; do
  b t/q8b --scenario cold --loader flash --threads 32 --chunk-size 32M
  b t/q8b --scenario cold --loader flash --threads 32 --chunk-size 32M --staging-size 8M
  b t/q8b --scenario cold --loader flash --threads 32 --chunk-size 32M --staging-size 32M
done
b t/q8b --scenario cold --loader flash --threads 64 --chunk-size 32M
b t/q8b --scenario cold --loader flash --threads 32 --chunk-size 64M
b t/q8b --scenario cold --loader disk --threads 32 --chunk-size 32M
b t/q8b --scenario warm --loader flash --threads 32
b t/q8b --scenario warm --loader flash --threads 16
b t/q8b --scenario pinned --loader flash
