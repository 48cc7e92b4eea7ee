#!/usr/bin/env bash
# The main job, end to end on this machine: build, synthesize a model when none
# is given, import it into a scratch store, verify it, benchmark its loads
# (cold and warm page cache) against a plain mmap loader and the raw disk, and
# export it back to safetensors, generate text from it with `flash run` (the
# CPU engine here), then start the daemon, prewarm the model into its tiers,
# generate through it and through its OpenAI-compatible HTTP API, and stop it.
# On a GPU machine `flash doctor` also reports the GPU's limits and the daemon
# serves from the GPU tier.
#
#   bash scripts/demo.sh                 # Qwen3-0.6B-shaped random weights
#   bash scripts/demo.sh /path/to/model  # a local Hugging Face style folder
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p flash-cli
flash=target/release/flash
work=$(mktemp -d -t flash-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
export FLASH_HOME="$work/store"

src=${1:-}
synthesized=
if [ -z "$src" ]; then
  echo "== no model given: synthesizing a Qwen3-0.6B-shaped checkpoint (random weights)"
  src="$work/qwen3-0.6b"
  $flash synth qwen3 0.6b "$src"
  synthesized=1
fi
echo "== import"
$flash pull --from "$src" --name demo/model
$flash info demo/model
echo "== verify"
$flash verify demo/model
echo "== doctor"
$flash doctor
echo "== bench (flash format)"
$flash bench demo/model
echo "== bench (the plain safetensors folder, no conversion)"
$flash bench "$src" --scenario cold
echo "== export back to safetensors"
$flash export demo/model --to "$work/exported"
ls -l "$work/exported"
echo "== run: generate text in this process (streamed to stdout; timings on stderr)"
if [ -n "$synthesized" ]; then
  echo "   This model has random weights: random weights make random text (made-up words"
  echo "   from the synthetic tokenizer). Pass a real model folder for real text."
fi
$flash run demo/model "Why is the sky blue?" --max-tokens 24 --temperature 0 --no-daemon
echo
echo "== the daemon: tiers, flash run through it, the OpenAI-compatible API, /metrics"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
$flash start --mem-pool 4G --http "127.0.0.1:$port"
trap '$flash stop >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
$flash load demo/model
$flash ps
$flash run demo/model "Why is the sky blue?" --max-tokens 24 --temperature 0
echo
curl -s "http://127.0.0.1:$port/v1/chat/completions" -H 'content-type: application/json' \
  -d '{"model": "demo/model", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16, "temperature": 0}'
echo
curl -s "http://127.0.0.1:$port/metrics" | grep -E '^flash_tier_(hits|misses|resident_bytes)' || true
$flash status
$flash stop
