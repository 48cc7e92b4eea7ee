#!/usr/bin/env bash
# The main job, end to end on this machine: build, synthesize a model when none
# is given, import it into a scratch store, verify it, benchmark its loads
# (cold and warm page cache) against a plain mmap loader and the raw disk, and
# export it back to safetensors, and finally generate text from it with
# `flash run` (the CPU engine here). On a GPU machine `flash doctor` also
# reports the GPU's limits.
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
echo "== run: generate text (streamed to stdout; timings on stderr)"
if [ -n "$synthesized" ]; then
  echo "   This model has random weights: random weights make random text. Its small synthetic"
  echo "   tokenizer also spells only 320 of the 151,936 ids, so most generated tokens print"
  echo "   nothing; the --json run below lists the ids. Pass a real model folder for real text."
fi
$flash run demo/model "Why is the sky blue?" --max-tokens 24 --temperature 0 --no-daemon
$flash run demo/model "Why is the sky blue?" --max-tokens 8 --temperature 0 --no-daemon --json
