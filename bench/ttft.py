"""Time to first token, measured from process start, the same way for every
contender: the harness starts the process and stops the clock when the first
byte of generated text reaches the pipe.

    python3 bench/ttft.py flash   --flash BIN --model NAME_OR_DIR [--scenario S] [--card C] [--no-daemon]
    python3 bench/ttft.py transformers --model-dir DIR [--card C]

`flash` runs `flash run MODEL PROMPT --raw --max-tokens 8 --temperature 0`
(the scenario — memory, gpu, cold — is prepared by the caller: bench/device.sh
loads the model into the daemon's tier or evicts the page cache first);
`--no-daemon` runs it in the measured process instead (the model streamed
from disk to the GPU by that process: flash's cold start without a daemon).
`transformers` runs `python3 -c` that imports torch and transformers, calls
`from_pretrained(dir, dtype=bfloat16, device_map="cuda:0")` and generates
with a streamer that prints each piece of text as it comes.
Prints one JSON line: loader, model, scenario, ttft_s, total_s, card.
"""
import argparse
import json
import os
import subprocess
import sys
import time

PROMPT = "The quick brown fox"
# A chat message of about 30 tokens once templated (the count is printed by
# `flash run` and kept in the output's stderr_tail).
CHAT_PROMPT = "Say hello to the new user"

TRANSFORMERS = r"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer
d = sys.argv[1]
tok = AutoTokenizer.from_pretrained(d)
model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16, device_map="cuda:0")
class Out(TextStreamer):
    def on_finalized_text(self, text, stream_end=False):
        sys.stdout.write("\x01" + text); sys.stdout.flush()
ids = tok(sys.argv[2], return_tensors="pt").input_ids.to("cuda:0")
model.generate(ids, max_new_tokens=8, do_sample=False, streamer=Out(tok, skip_prompt=True))
"""


def first_byte(cmd, env=None, marker=None):
    """Seconds from spawn to the first stdout byte (after `marker` if given), and to exit."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first = None
    while True:
        b = p.stdout.read(1)
        if not b:
            break
        if first is None and (marker is None or b == marker):
            first = time.perf_counter() - t0
    err = p.stderr.read().decode(errors="replace")
    rc = p.wait()
    total = time.perf_counter() - t0
    return first, total, rc, err


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("who", choices=("flash", "transformers"))
    ap.add_argument("--flash", default=".carry/flash")
    ap.add_argument("--model")
    ap.add_argument("--model-dir")
    ap.add_argument("--label", default=None, help="model name in the output")
    ap.add_argument("--scenario", default="cold")
    ap.add_argument("--card", default="unknown")
    ap.add_argument("--no-daemon", action="store_true", help="flash run --no-daemon (in-process)")
    ap.add_argument("--extra", default="", help="extra flash run arguments")
    ap.add_argument("--chat", action="store_true",
                    help="a chat message through the model's template (default: raw text)")
    a = ap.parse_args()
    if a.who == "flash":
        cmd = [a.flash, "run", a.model, CHAT_PROMPT if a.chat else PROMPT, "--max-tokens", "8",
               "--temperature", "0"]
        if not a.chat:
            cmd.append("--raw")
        if a.no_daemon:
            cmd.append("--no-daemon")
        cmd += a.extra.split()
        first, total, rc, err = first_byte(cmd)
        loader = "flash-run"
    else:
        cmd = [sys.executable, "-c", TRANSFORMERS, a.model_dir, PROMPT]
        first, total, rc, err = first_byte(cmd, marker=b"\x01")
        loader = "transformers"
    out = {
        "loader": loader,
        "model": a.label or a.model or a.model_dir,
        "scenario": a.scenario,
        "ttft_s": first,
        "total_s": total,
        "card": a.card,
    }
    if rc != 0 or first is None:
        out["error"] = f"rc {rc}: {err[-400:]}"
    else:
        out["stderr_tail"] = err.strip().splitlines()[-4:] if err.strip() else []
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
