"""The native GPU engine against transformers (issue 6), run on the GPU
machine where torch and transformers are installed (not in CI):

    FLASH_BIN=path/to/flash pytest -q tests/gpu/test_engine_vs_transformers.py

For Qwen3-0.6B- and Llama-3.2-1B-shaped checkpoints synthesized by
`flash synth` (random bf16 weights, the real shapes, Llama 3 RoPE scaling),
transformers runs 64 teacher-forced positions in bf16 on cuda, and the flash
GPU engine runs the same token ids (`flash engine-logits`, which writes the
f32 logits of every position). The issue's bar, on the teacher-forced
(one batched) pass: cosine similarity of the logits >= 0.999 at every
position and the same argmax at >= 95 % of the positions.

The KV-cache path (a prefill of 32, then 32 single-token decode steps) must
reach the same cosine against transformers at every position, and agree
with the engine's own batched pass (argmax >= 90 %). Its argmax agreement
with transformers is printed, not asserted at 95 %: on the Llama-1B-shaped
random checkpoint it measured 87-92 % (H200, 2026-11-27) with a minimum
cosine of 0.9993, as with the batched pass. Random weights put several
logits within bf16 noise of the top at many positions; which one wins is
decided by rounding (transformers' own, and cuBLAS picking other kernels
for one row than for 64), so two correct bf16 engines disagree there.

FLASH_ENGINE_MODELS overrides the checkpoints ("qwen3:0.6b,llama:1b");
FLASH_ENGINE_DIR keeps them in a folder between runs (default: a temp dir).
"""

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

POSITIONS = 64
MIN_COSINE = 0.999
MIN_TOP1 = 0.95
ROOT = Path(__file__).resolve().parents[2]


def flash_bin():
    b = os.environ.get("FLASH_BIN")
    if b:
        return b
    for c in (ROOT / ".carry" / "flash", ROOT / "target" / "release" / "flash",
              ROOT / "target" / "debug" / "flash"):
        if c.exists():
            return str(c)
    found = shutil.which("flash")
    if not found:
        pytest.skip("no flash binary (set FLASH_BIN)")
    return found


def models():
    spec = os.environ.get("FLASH_ENGINE_MODELS", "qwen3:0.6b,llama:1b")
    return [tuple(m.split(":")) for m in spec.split(",") if m]


@pytest.fixture(scope="module")
def workdir():
    keep = os.environ.get("FLASH_ENGINE_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        yield Path(keep)
        return
    d = Path(tempfile.mkdtemp(prefix="flash-engine-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def synth(workdir, arch, size):
    out = workdir / f"{arch}-{size}"
    if not (out / "config.json").exists():
        if out.exists():
            shutil.rmtree(out)
        subprocess.run([flash_bin(), "synth", arch, size, str(out), "--seed", "3"],
                       check=True, capture_output=True)
    return out


def token_ids(vocab):
    rng = np.random.default_rng(1234)
    return [int(x) for x in rng.integers(0, vocab, size=POSITIONS)]


def flash_logits(model_dir, ids, vocab, prefill=0, extra=()):
    out = model_dir.parent / f"{model_dir.name}-logits-{prefill}.f32"
    env = dict(os.environ, FLASH_HOME=str(model_dir.parent / "flash-home"))
    r = subprocess.run(
        [flash_bin(), "engine-logits", str(model_dir), "--device", "gpu",
         "--tokens", ",".join(map(str, ids)), "--out", str(out), "--prefill", str(prefill),
         *extra],
        check=True, capture_output=True, text=True, env=env)
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["positions"] == len(ids) and info["vocab_size"] == vocab, info
    a = np.fromfile(out, dtype=np.float32)
    out.unlink()
    return a.reshape(len(ids), vocab), info


def hf_logits(model_dir, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16).cuda()
    model.eval()
    with torch.no_grad():
        x = torch.tensor([ids], device="cuda")
        logits = model(input_ids=x).logits[0].float().cpu().numpy()
    del model
    torch.cuda.empty_cache()
    return logits


def agreement(a, b):
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    cos = (a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))
    top1 = float((a.argmax(1) == b.argmax(1)).mean())
    return cos, top1


@pytest.mark.parametrize("arch,size", models())
def test_engine_matches_transformers(workdir, arch, size):
    d = synth(workdir, arch, size)
    cfg = json.loads((d / "config.json").read_text())
    vocab = cfg["vocab_size"]
    ids = token_ids(vocab)
    want = hf_logits(d, ids)
    assert want.shape == (POSITIONS, vocab)
    batched = None
    for prefill in (0, POSITIONS // 2):
        got, info = flash_logits(d, ids, vocab, prefill)
        assert np.isfinite(got).all()
        cos, top1 = agreement(got, want)
        print(json.dumps({
            "model": f"{arch}-{size}", "path": "batched" if prefill == 0 else f"prefill {prefill} + decode",
            "device": info["device"], "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
            "top1": top1, "forward_s": info["forward_s"],
        }))
        assert cos.min() >= MIN_COSINE, (prefill, np.argsort(cos)[:5], np.sort(cos)[:5])
        if prefill == 0:
            assert top1 >= MIN_TOP1, top1
            batched = got
        else:
            own_cos, own_top1 = agreement(got, batched)
            assert own_cos.min() >= MIN_COSINE, own_cos.min()
            assert own_top1 >= 0.9, own_top1
