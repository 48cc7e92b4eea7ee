"""The small Qwen3 the vLLM tests serve: `flash synth qwen3 tiny --head-dim
64` (vLLM's CPU attention takes head sizes 32, 64, 80, ...; the tiny
preset's is 16)."""

import json
import subprocess
from pathlib import Path

HEAD_DIM = 64


def synth_qwen3(flash_bin: str, out: Path, seed: int = 7) -> Path:
    out = Path(out)
    cmd = [flash_bin, "-q", "synth", "qwen3", "tiny", str(out), "--seed", str(seed),
           "--head-dim", str(HEAD_DIM)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["head_dim"] == HEAD_DIM, cfg
    return out
