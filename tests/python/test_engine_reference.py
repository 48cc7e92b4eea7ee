"""The CPU engine of `flash run` against an independent numpy forward.

For tiny Qwen3 and Llama 3 checkpoints from `flash synth` (bf16 and fp32):
- the logits at the prompt's last position (`flash run --json --logits`)
  match a float64 numpy implementation of the Hugging Face forward to a
  relative error below 1e-4;
- greedy generation gives the same tokens as numpy's greedy loop;
- prompt token ids match the `tokenizers` package, and chat-templated
  prompts match `transformers`' `apply_chat_template`;
- seeds repeat, stop strings cut the text.

The checkpoints' RMSNorm weights (ones when synthesized) are replaced by
random values so that the per-head q_norm/k_norm of Qwen3, the layer norms
and the final norm all matter, and the query/key projections are scaled up
so that attention is sharp and RoPE changes the logits (dropping the Llama 3
scaling moves them by about 1e-2, 100 times the tolerance). The Llama tiny preset has Llama 3 RoPE
scaling (factor 32, original 8192 positions, theta 500000): with head_dim 16
its frequencies fall in all three bands (kept, blended, divided). Qwen3's
embedding is tied (no lm_head tensor); Llama's is not.

Needs numpy, tokenizers, transformers (no torch) and FLASH_BIN.
"""

import json
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

PROMPT = "Hello world, the cat is on the mat. It is 2024!"
N_GREEDY = 16

# --- safetensors in plain numpy (bf16 included) ------------------------------

DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def read_safetensors(path):
    """{name: float64 array} of one safetensors file."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        b, e = t["data_offsets"]
        a = np.frombuffer(data[b:e], dtype=DTYPES[t["dtype"]])
        if t["dtype"] == "BF16":
            a = (a.astype(np.uint32) << 16).view(np.float32)
        out[name] = a.astype(np.float64).reshape(t["shape"])
    return out


def write_safetensors(path, tensors, dtype):
    """Writes float arrays as `dtype` ("F32" or "BF16", rounded to nearest even)."""
    header, blobs, off = {}, [], 0
    for name, a in tensors.items():
        a32 = np.ascontiguousarray(a, dtype=np.float32)
        if dtype == "BF16":
            u = a32.view(np.uint32)
            u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
            blob = u.astype(np.uint16).tobytes()
        else:
            blob = a32.tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [off, off + len(blob)]}
        blobs.append(blob)
        off += len(blob)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def load_weights(d):
    d = Path(d)
    w = {}
    for f in sorted(d.glob("*.safetensors")):
        w.update(read_safetensors(f))
    return w


# --- the reference forward (float64) -----------------------------------------


def rope_inv_freq(cfg):
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    inv = 1.0 / cfg["rope_theta"] ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    rs = cfg.get("rope_scaling")
    if rs and rs.get("rope_type", rs.get("type")) == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        wavelen = 2 * np.pi / inv
        scaled = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        inv = np.where(medium, smoothed, scaled)
    return inv


def rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def forward(cfg, w, ids):
    """Logits [len(ids), vocab] of the Hugging Face decoder, causal, no cache."""
    H, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads") or nh
    hd = cfg.get("head_dim") or H // nh
    eps = cfg["rms_norm_eps"]
    qwen3 = cfg["architectures"][0] == "Qwen3ForCausalLM"
    n = len(ids)
    ang = np.arange(n, dtype=np.float64)[:, None] * rope_inv_freq(cfg)[None, :]
    ang = np.concatenate([ang, ang], axis=-1)
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    mask = np.triu(np.full((n, n), -np.inf), k=1)
    x = w["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = rms(x, w[p + "input_layernorm.weight"], eps)
        q, k, v = (
            (a @ w[p + f"self_attn.{x}_proj.weight"].T + w.get(p + f"self_attn.{x}_proj.bias", 0.0))
            .reshape(n, heads, hd)
            for x, heads in (("q", nh), ("k", nkv), ("v", nkv))
        )
        if qwen3:
            q = rms(q, w[p + "self_attn.q_norm.weight"], eps)
            k = rms(k, w[p + "self_attn.k_norm.weight"], eps)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        out = np.empty((n, nh, hd))
        for h in range(nh):
            kv = h // (nh // nkv)
            s = q[:, h, :] @ k[:, kv, :].T / np.sqrt(hd) + mask
            s = np.exp(s - s.max(axis=-1, keepdims=True))
            s /= s.sum(axis=-1, keepdims=True)
            out[:, h, :] = s @ v[:, kv, :]
        x = x + out.reshape(n, nh * hd) @ w[p + "self_attn.o_proj.weight"].T
        a = rms(x, w[p + "post_attention_layernorm.weight"], eps)
        g = a @ w[p + "mlp.gate_proj.weight"].T
        u = a @ w[p + "mlp.up_proj.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ w[p + "mlp.down_proj.weight"].T
    x = rms(x, w["model.norm.weight"], eps)
    head = w.get("lm_head.weight")
    if head is None:
        assert cfg["tie_word_embeddings"]
        head = w["model.embed_tokens.weight"]
    return x @ head.T


def eos_ids(d):
    ids = set()
    for f in ("config.json", "generation_config.json"):
        e = json.loads((Path(d) / f).read_text()).get("eos_token_id")
        ids.update(e if isinstance(e, list) else [e] if e is not None else [])
    return ids


def greedy(cfg, w, ids, n, eos):
    ids, out = list(ids), []
    for _ in range(n):
        t = int(np.argmax(forward(cfg, w, ids)[-1]))
        if t in eos:
            break
        out.append(t)
        ids.append(t)
    return out


# --- fixtures -----------------------------------------------------------------


def run_json(flash_bin, model, *args, storage=None):
    cmd = [flash_bin, "-q"]
    if storage:
        cmd += ["--storage", str(storage)]
    cmd += ["run", str(model), *map(str, args), "--json", "--no-daemon", "--device", "cpu"]  # the f32 reference
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}:\n{r.stderr}"
    assert "panicked" not in r.stderr, r.stderr
    return json.loads(r.stdout)


# qwen2: the Qwen3 tiny checkpoint turned into a Qwen2 one (no q_norm/k_norm,
# random biases on the q/k/v projections).
CASES = [("qwen3", "bf16"), ("qwen3", "fp32"), ("llama", "bf16"), ("llama", "fp32"), ("qwen2", "fp32")]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def model(request, flash_bin, tmp_path_factory):
    """A tiny checkpoint with random norm weights, and its float64 weights."""
    arch, dtype = request.param
    d = tmp_path_factory.mktemp("engine") / f"{arch}-tiny-{dtype}"
    subprocess.run(
        [flash_bin, "-q", "synth", "qwen3" if arch == "qwen2" else arch, "tiny", str(d),
         "--seed", "3", "--dtype", dtype,
         "--shard-size", "100000"],
        check=True,
        capture_output=True,
    )
    w = load_weights(d)
    rng = np.random.default_rng(7)
    for name in w:
        if name.endswith("norm.weight"):
            w[name] = 1.0 + 0.5 * rng.standard_normal(w[name].shape)
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            # Sharper attention: with the synthesized std of 0.02, scores are
            # near 0, attention is near uniform and RoPE hardly matters.
            w[name] = 12.0 * w[name]
    if arch == "qwen2":
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2")
        del cfg["head_dim"]  # Qwen2 derives it: hidden_size / num_attention_heads
        assert cfg["hidden_size"] // cfg["num_attention_heads"] == 16
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
        for name in [n for n in w if "_norm." in n and "self_attn" in n]:
            del w[name]
        for i in range(cfg["num_hidden_layers"]):
            for x in "qkv":
                rows = w[f"model.layers.{i}.self_attn.{x}_proj.weight"].shape[0]
                w[f"model.layers.{i}.self_attn.{x}_proj.bias"] = 0.5 * rng.standard_normal(rows)
    st = "BF16" if dtype == "bf16" else "F32"
    for f in list(d.glob("*.safetensors")) + list(d.glob("*.index.json")):
        f.unlink()
    write_safetensors(d / "model.safetensors", w, st)
    w = load_weights(d)  # what the engine sees (bf16-rounded)
    cfg = json.loads((d / "config.json").read_text())
    return arch, d, cfg, w


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


# --- tests ----------------------------------------------------------------------


def test_checkpoint_exercises_the_features(model):
    arch, d, cfg, w = model
    if arch == "qwen2":
        assert "model.layers.0.self_attn.q_norm.weight" not in w
        assert np.std(w["model.layers.1.self_attn.k_proj.bias"]) > 0.1
    elif arch == "qwen3":
        assert cfg["tie_word_embeddings"] and "lm_head.weight" not in w
        qn = w["model.layers.0.self_attn.q_norm.weight"]
        assert qn.shape == (cfg["head_dim"],) and np.std(qn) > 0.1
    else:
        assert not cfg["tie_word_embeddings"] and "lm_head.weight" in w
        assert cfg["rope_scaling"]["rope_type"] == "llama3"
        hd = cfg["head_dim"]
        base = 1.0 / cfg["rope_theta"] ** (np.arange(0, hd, 2) / hd)
        ratio = rope_inv_freq(cfg) / base
        factor = cfg["rope_scaling"]["factor"]
        assert np.any(ratio == 1.0), "some frequencies are kept"
        assert np.any(np.isclose(ratio, 1 / factor)), "some are divided by the factor"
        assert np.any((ratio < 1.0) & ~np.isclose(ratio, 1 / factor)), "some are blended"


def test_last_logits_match_numpy(model, flash_bin):
    arch, d, cfg, w = model
    out = run_json(flash_bin, d, PROMPT, "--raw", "--logits", "--max-tokens", 0)
    ids = out["prompt_token_ids"]
    assert len(ids) > 8
    want = forward(cfg, w, ids)[-1]
    got = np.array(out["last_logits"], dtype=np.float64)
    assert got.shape == (cfg["vocab_size"],)
    err = rel_err(got, want)
    assert err < 1e-4, f"{arch}: relative error {err:.2e}"
    assert int(np.argmax(got)) == int(np.argmax(want))


def test_long_prompt_logits_match_numpy(model, flash_bin):
    """A few hundred positions: RoPE's slow frequencies turn by a visible angle."""
    arch, d, cfg, w = model
    out = run_json(flash_bin, d, " ".join([PROMPT] * 12), "--raw", "--logits", "--max-tokens", 0)
    assert len(out["prompt_token_ids"]) > 200
    want = forward(cfg, w, out["prompt_token_ids"])[-1]
    assert rel_err(out["last_logits"], want) < 1e-4


def test_greedy_tokens_match_numpy(model, flash_bin):
    arch, d, cfg, w = model
    out = run_json(flash_bin, d, PROMPT, "--raw", "--temperature", 0, "--max-tokens", N_GREEDY)
    want = greedy(cfg, w, out["prompt_token_ids"], N_GREEDY, eos_ids(d))
    assert out["token_ids"] == want
    assert out["finish_reason"] == ("length" if len(want) == N_GREEDY else "eos")
    for k in ("load_s", "ttft_s", "tokens_per_s"):
        assert out[k] >= 0
    assert out["device"] == "cpu"


def test_chat_prompt_logits_match_numpy(model, flash_bin):
    """The chat-templated prompt (longer, special tokens) through the same check."""
    arch, d, cfg, w = model
    out = run_json(flash_bin, d, "Is it on?", "--system", "Be brief.", "--logits", "--max-tokens", 0)
    want = forward(cfg, w, out["prompt_token_ids"])[-1]
    assert rel_err(out["last_logits"], want) < 1e-4


def test_flash_format_store_gives_the_same_logits(model, flash_bin, tmp_path):
    arch, d, cfg, w = model
    store = tmp_path / "store"
    subprocess.run(
        [flash_bin, "-q", "--storage", str(store), "pull", "--from", str(d), "--name", f"t/{arch}"],
        check=True,
        capture_output=True,
    )
    a = run_json(flash_bin, d, PROMPT, "--raw", "--logits", "--max-tokens", 4, "--temperature", 0)
    b = run_json(flash_bin, f"t/{arch}", PROMPT, "--raw", "--logits", "--max-tokens", 4,
                 "--temperature", 0, storage=store)
    assert a["last_logits"] == b["last_logits"]
    assert a["token_ids"] == b["token_ids"]


@pytest.mark.parametrize(
    "text",
    [PROMPT, "  leading spaces and\nnew lines\n\n", "digits 1234567 and ünïcödé ✓", "x"],
)
def test_raw_prompt_ids_match_tokenizers(model, flash_bin, text):
    from tokenizers import Tokenizer

    arch, d, cfg, w = model
    out = run_json(flash_bin, d, text, "--raw", "--max-tokens", 0)
    assert out["prompt_token_ids"] == Tokenizer.from_file(str(d / "tokenizer.json")).encode(text).ids


def test_chat_prompt_ids_match_transformers(model, flash_bin):
    from transformers import AutoTokenizer

    arch, d, cfg, w = model
    tok = AutoTokenizer.from_pretrained(str(d))
    for system in (None, "You are terse."):
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": " Hello world "}
        ]
        want = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if hasattr(want, "keys"):
            want = want["input_ids"]
        args = ["--system", system] if system else []
        out = run_json(flash_bin, d, " Hello world ", *args, "--max-tokens", 0)
        assert out["prompt_token_ids"] == list(want)


def test_seeded_sampling_repeats_and_stop_strings_cut(model, flash_bin):
    arch, d, cfg, w = model
    common = [PROMPT, "--raw", "--temperature", 1.5, "--top-k", 50, "--top-p", 0.95, "--max-tokens", 24]
    a = run_json(flash_bin, d, *common, "--seed", 11)
    b = run_json(flash_bin, d, *common, "--seed", 11)
    c = run_json(flash_bin, d, *common, "--seed", 12)
    assert a["token_ids"] == b["token_ids"] and a["text"] == b["text"]
    assert a["token_ids"] != c["token_ids"]
    assert a["sampling"]["seed"] == 11
    # A stop string taken from the greedy text ends generation just before it.
    g = run_json(flash_bin, d, PROMPT, "--raw", "--temperature", 0, "--max-tokens", N_GREEDY)
    text = g["text"]
    stop = next((c for i, c in enumerate(text) if i >= 1 and c != "\ufffd" and c != " "), None)
    assert stop, f"greedy text too short to pick a stop string: {text!r}"
    s = run_json(flash_bin, d, PROMPT, "--raw", "--temperature", 0, "--max-tokens", N_GREEDY,
                 "--stop", stop)
    assert s["finish_reason"] == "stop"
    assert s["text"] == text[: text.index(stop)]
    assert s["token_ids"] == g["token_ids"][: len(s["token_ids"])]


def test_streamed_text_equals_json_text(model, flash_bin):
    arch, d, cfg, w = model
    args = [PROMPT, "--raw", "--temperature", 0, "--max-tokens", N_GREEDY, "--no-daemon"]
    r = subprocess.run([flash_bin, "run", str(d), *map(str, args)], capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr
    j = run_json(flash_bin, d, *args[:-1])
    assert r.stdout.decode("utf-8", errors="replace") == j["text"] + "\n"
    line = r.stderr.decode().strip().splitlines()[-1]
    assert "load" in line and "TTFT" in line and "tokens/s" in line, line
