"""The native GPU engine against transformers, run on the GPU
machine where torch and transformers are installed (not in CI):

    FLASH_BIN=path/to/flash pytest -q -s tests/gpu/test_engine_vs_transformers.py

For Qwen3-0.6B- and Llama-3.2-1B-shaped checkpoints synthesized by
`flash synth` (random bf16 weights, the real shapes, Llama 3 RoPE scaling),
transformers runs 64 teacher-forced positions on cuda twice: in bf16 (its
usual mode) and in f32 (the same bf16 weights, computed exactly). The flash
GPU engine runs the same token ids (`flash engine-logits`, which writes the
f32 logits of every position). The issue's bar, on the teacher-forced (one
batched) pass: cosine similarity of the logits >= 0.999 at every position
and the same argmax at >= 95 % of the positions.

Why two references. Random weights give flat logits: on the Llama-1B
checkpoint the median gap between the two largest logits is 0.15 (logit std
0.9), so any bf16 rounding moves the argmax at several of the 64 positions.
Transformers' own bf16 forward agrees with its f32 forward at 90.6 % of the
positions on the CPU and 93.8 % on an H200 (2026-11-27), below the bar. The
f32 forward is the model's exact arithmetic on the checkpoint's bf16
weights, so it is the reference the argmax bar is checked against; flash's
CPU engine (f32) matches it at 100 % with a relative error of 9e-6. Checked:

- the engine as it runs (bf16 products, f32 residual stream, f32 logits):
  cosine >= 0.999 against both references, argmax >= 95 % against
  transformers f32; its argmax agreement with transformers bf16 is printed,
  with transformers' own bf16-vs-f32 agreement beside it;
- the engine rounding where transformers rounds (`--hf-rounding
  --bf16-logits`: bf16 residual stream, RoPE and logits): cosine >= 0.999
  against transformers bf16; its argmax agreement is printed (98.4 % on
  Qwen3-0.6B, 93.8 % on Llama-1B on the H200: cuBLAS picks other kernels for
  transformers' products than for the engine's, and each bf16 rounding after
  them amplifies the difference);
- the KV-cache path (a prefill of 32, then 32 single-token decode steps,
  which run the fused matrix-vector kernels): cosine >= 0.999 against
  transformers, and argmax >= 90 % against the engine's own batched pass.

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


def hf_logits(model_dir, ids, dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).cuda()
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


def report(model, path, against, got, want, info=None):
    cos, top1 = agreement(got, want)
    print(json.dumps({
        "model": model, "path": path, "against": against,
        "device": (info or {}).get("device"), "min_cosine": float(cos.min()),
        "mean_cosine": float(cos.mean()), "top1": top1,
        "forward_s": (info or {}).get("forward_s"),
    }))
    return cos, top1


@pytest.mark.parametrize("arch,size", models())
def test_engine_matches_transformers(workdir, arch, size):
    d = synth(workdir, arch, size)
    cfg = json.loads((d / "config.json").read_text())
    vocab = cfg["vocab_size"]
    ids = token_ids(vocab)
    name = f"{arch}-{size}"
    hf16 = hf_logits(d, ids, torch.bfloat16)
    hf32 = hf_logits(d, ids, torch.float32)
    assert hf16.shape == hf32.shape == (POSITIONS, vocab)
    report(name, "transformers bf16", "transformers f32", hf16, hf32)

    # The engine as it runs by default.
    batched, info = flash_logits(d, ids, vocab)
    assert np.isfinite(batched).all()
    for against, want in (("transformers bf16", hf16), ("transformers f32", hf32)):
        cos, top1 = report(name, "batched", against, batched, want, info)
        assert cos.min() >= MIN_COSINE, (against, np.argsort(cos)[:5], np.sort(cos)[:5])
    # The argmax bar, against the exact reference (the last one).
    assert top1 >= MIN_TOP1, top1

    # Rounding where transformers rounds.
    hf_like, info = flash_logits(d, ids, vocab, extra=("--hf-rounding", "--bf16-logits"))
    cos, _ = report(name, "batched, hf rounding", "transformers bf16", hf_like, hf16, info)
    assert cos.min() >= MIN_COSINE, (np.argsort(cos)[:5], np.sort(cos)[:5])

    # The KV-cache path.
    prefill = POSITIONS // 2
    got, info = flash_logits(d, ids, vocab, prefill)
    assert np.isfinite(got).all()
    path = f"prefill {prefill} + decode"
    cos, _ = report(name, path, "transformers bf16", got, hf16, info)
    assert cos.min() >= MIN_COSINE, (np.argsort(cos)[:5], np.sort(cos)[:5])
    own_cos, own_top1 = report(name, path, "engine batched", got, batched)
    assert own_cos.min() >= MIN_COSINE, own_cos.min()
    assert own_top1 >= 0.9, own_top1
