"""The first load of a model in a fresh Python process, as a user meets it:
`ft.load_model(name, backend="transformers")` with the model in the
daemon's memory tier, or transformers' `from_pretrained` on the
safetensors folder. Each run is its own process; it prints one JSON line
with the import time (`import torch, transformers` for both, and
`flashtensors` for flash) and the load's time after the imports, until the
weights are on the GPU; what either imports after that (the model's
classes, the tokenizer's) is part of its load. Flash's run also keeps the
SDK's debug line that says where its time went.

    python3 bench/first_load.py flash --store STORE --model ORG/NAME
    python3 bench/first_load.py transformers --model-dir DIR
    python3 bench/first_load.py imports --model-dir DIR

`imports` says where the model's construction spends its time: it builds
the model of DIR's config on the meta device as the SDK does (no weights),
under `python -X importtime`, and prints the modules imported after
`import torch, transformers` with the most cumulative time.
"""

import argparse
import json
import subprocess
import sys

FLASH = r"""
import json, sys, time
t0 = time.perf_counter()
import logging
import torch, transformers
import flashtensors as ft
t1 = time.perf_counter()
logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
logging.getLogger("flashtensors").setLevel(logging.DEBUG)
ft.configure(storage_path=sys.argv[1])
model, tok = ft.load_model(sys.argv[2], backend="transformers", dtype="bfloat16")
torch.cuda.synchronize()
t2 = time.perf_counter()
print(json.dumps({"imports_s": t1 - t0, "seconds": t2 - t1,
                  "device": str(next(model.parameters()).device)}))
"""

TRANSFORMERS = r"""
import json, sys, time
t0 = time.perf_counter()
import torch, transformers
t1 = time.perf_counter()
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map="cuda:0", dtype=torch.bfloat16)
torch.cuda.synchronize()
t2 = time.perf_counter()
print(json.dumps({"imports_s": t1 - t0, "seconds": t2 - t1,
                  "device": str(next(model.parameters()).device)}))
"""

IMPORTS = r"""
import json, sys, time
import torch, transformers
print("-- after the imports --", file=sys.stderr, flush=True)
from flashtensors.transformers_backend import skeleton
t0 = time.perf_counter()
skeleton(sys.argv[1])
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def import_profile(stderr, top):
    """The `top` modules by cumulative import time (seconds) in the
    `-X importtime` lines after the marker."""
    lines = stderr.split("-- after the imports --", 1)[-1].splitlines()
    rows = []
    for l in lines:
        if not l.startswith("import time:"):
            continue
        parts = l.split("|")
        try:
            cumulative = int(parts[1]) / 1e6
        except (IndexError, ValueError):
            continue  # the header line
        rows.append((parts[2].strip(), round(cumulative, 3)))
    rows.sort(key=lambda r: -r[1])
    return rows[:top]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("who", choices=("flash", "transformers", "imports"))
    ap.add_argument("--store")
    ap.add_argument("--model")
    ap.add_argument("--model-dir")
    ap.add_argument("--label", default="qwen3-8b")
    ap.add_argument("--card", default="unknown")
    ap.add_argument("--round", type=int, default=None)
    ap.add_argument("--warmup", action="store_true",
                    help="an untimed warm-up run (page cache, bytecode): marked in its line")
    a = ap.parse_args()
    if a.who == "imports":
        p = subprocess.run([sys.executable, "-X", "importtime", "-c", IMPORTS, a.model_dir],
                           capture_output=True, text=True, timeout=600)
        out = {"loader": "transformers-skeleton", "model": a.label, "scenario": "import-profile",
               "card": a.card}
        lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
        if p.returncode != 0 or not lines:
            out["error"] = f"rc {p.returncode}: {p.stderr[-400:]}"
        else:
            out.update(json.loads(lines[-1]))
            out["imports_top"] = import_profile(p.stderr, 30)
            print(f"model on meta {out['seconds']:.2f} s; its slowest imports (cumulative s):",
                  file=sys.stderr)
            for module, secs in out["imports_top"][:15]:
                print(f"  {secs:6.2f}  {module}", file=sys.stderr)
        print(json.dumps(out), flush=True)
        return
    if a.who == "flash":
        cmd = [sys.executable, "-c", FLASH, a.store, a.model]
        loader, scenario = "flash-load_model-transformers", "first-memory-tier"
    else:
        cmd = [sys.executable, "-c", TRANSFORMERS, a.model_dir]
        loader, scenario = "transformers-from_pretrained", "first-page-cache"
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    out = {"loader": loader, "model": a.label, "scenario": scenario, "card": a.card}
    if a.round is not None:
        out["round"] = a.round
    if a.warmup:
        out["warmup"] = True
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if p.returncode != 0 or not lines:
        out["error"] = f"rc {p.returncode}: {p.stderr[-400:]}"
    else:
        out.update(json.loads(lines[-1]))
        why = [l for l in p.stderr.splitlines() if l.startswith(("load_model ", "load_dict "))]
        if why:
            out["breakdown"] = why
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
