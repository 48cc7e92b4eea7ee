"""Checks that `flash synth` checkpoints load with the Hugging Face libraries.

The folders come from the environment, so this file needs no Rust toolchain:

    FLASH_SYNTH_DIR=/tmp/qwen3-tiny:/tmp/llama-tiny pytest tests/python/test_synth_compat.py

`FLASH_SYNTH_DIR` holds one or more checkpoint folders (os.pathsep-separated),
written earlier with `flash synth ARCH SIZE OUT` or
`cargo run -p flash-synth --example synth -- ARCH SIZE OUT [SEED] [DTYPE] [MAX_SHARD_BYTES]`.
Every test is skipped when it is unset.

Needs numpy, safetensors, tokenizers, transformers (torch is optional: the
model-building test is skipped without it; minijinja is optional too).
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest

DIRS = [Path(p) for p in os.environ.get("FLASH_SYNTH_DIR", "").split(os.pathsep) if p]

pytestmark = pytest.mark.skipif(not DIRS, reason="FLASH_SYNTH_DIR is not set")

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello world"},
]


@pytest.fixture(params=DIRS or [Path("unset")], ids=lambda p: p.name)
def model_dir(request):
    d = request.param
    assert (d / "config.json").is_file(), f"{d} is not a checkpoint folder"
    return d


def load_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def shard_files(d):
    index = d / "model.safetensors.index.json"
    if index.exists():
        assert not (d / "model.safetensors").exists()
        return sorted({d / f for f in load_json(index)["weight_map"].values()})
    return [d / "model.safetensors"]


def expected_shapes(cfg):
    """The state dict `AutoModelForCausalLM.from_config` builds, without torch."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}"
        out.update({
            f"{p}.self_attn.q_proj.weight": (q, h),
            f"{p}.self_attn.k_proj.weight": (kv, h),
            f"{p}.self_attn.v_proj.weight": (kv, h),
            f"{p}.self_attn.o_proj.weight": (h, q),
            f"{p}.mlp.gate_proj.weight": (i, h),
            f"{p}.mlp.up_proj.weight": (i, h),
            f"{p}.mlp.down_proj.weight": (h, i),
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.post_attention_layernorm.weight": (h,),
        })
        if cfg["model_type"] == "qwen3":
            out[f"{p}.self_attn.q_norm.weight"] = (hd,)
            out[f"{p}.self_attn.k_norm.weight"] = (hd,)
    if not cfg.get("tie_word_embeddings", False):
        out["lm_head.weight"] = (v, h)
    return out


def as_float32(dtype, shape, data):
    """Decodes raw little-endian tensor bytes (dtype as safetensors names it)."""
    if dtype.upper() in ("BF16", "BFLOAT16"):
        bits = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    np_dtype = {"F16": "<f2", "FLOAT16": "<f2", "F32": "<f4", "FLOAT32": "<f4"}[dtype.upper()]
    return np.frombuffer(data, dtype=np_dtype).astype(np.float32).reshape(shape)


def test_safetensors_read_every_shard(model_dir):
    import safetensors
    import safetensors.numpy

    cfg = load_json(model_dir / "config.json")
    want = expected_shapes(cfg)
    index_path = model_dir / "model.safetensors.index.json"
    index = load_json(index_path) if index_path.exists() else None
    seen, total = {}, 0
    for f in shard_files(model_dir):
        raw = f.read_bytes()
        header_len = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + header_len])
        assert header["__metadata__"] == {"format": "pt"}
        # The reference parser validates the whole file (offsets, lengths).
        for name, info in safetensors.deserialize(raw):
            assert name not in seen, f"{name} appears twice"
            seen[name] = tuple(info["shape"])
            total += len(info["data"])
            values = as_float32(info["dtype"], info["shape"], info["data"])
            assert values.dtype == np.float32
            if name.endswith("norm.weight"):
                assert np.all(values == 1.0), name
            elif values.size >= 4096:
                std = cfg.get("initializer_range", 0.02)
                assert abs(float(values.mean())) < std / 10, name
                assert abs(float(values.std()) / std - 1) < 0.05, name
            if index is not None:
                assert index["weight_map"][name] == f.name
        # numpy has no bfloat16: load_file works for F16/F32 checkpoints.
        if cfg["torch_dtype"] != "bfloat16":
            arrays = safetensors.numpy.load_file(str(f))
            for name, a in arrays.items():
                assert a.shape == seen[name]
    assert seen == want
    if index is not None:
        assert set(index["weight_map"]) == set(want)
        assert index["metadata"]["total_size"] == total


def test_tokenizer_round_trips(model_dir):
    from tokenizers import Tokenizer

    cfg = load_json(model_dir / "config.json")
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert tok.get_vocab_size(with_added_tokens=True) <= cfg["vocab_size"]
    enc = tok.encode("Hello world")
    assert all(0 <= i < cfg["vocab_size"] for i in enc.ids)
    assert tok.decode(enc.ids) == "Hello world"
    text = "Numbers 12345, unicode café — 你好\n\ttabs  and  spaces."
    assert tok.decode(tok.encode(text).ids) == text
    eos = cfg["eos_token_id"]
    eos = eos if isinstance(eos, list) else [eos]
    for i in [cfg["bos_token_id"], *eos]:
        assert i < cfg["vocab_size"]
        token = tok.id_to_token(i)
        assert token is not None and token.startswith("<|"), (i, token)
        assert tok.encode(token, add_special_tokens=False).ids == [i]


def test_autoconfig_accepts_config(model_dir):
    from transformers import AutoConfig

    raw = load_json(model_dir / "config.json")
    cfg = AutoConfig.from_pretrained(str(model_dir))
    assert cfg.model_type == raw["model_type"]
    assert cfg.architectures == raw["architectures"]
    for key in ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings",
                "max_position_embeddings", "bos_token_id", "eos_token_id"]:
        assert getattr(cfg, key) == raw[key], key
    gen = load_json(model_dir / "generation_config.json")
    assert gen["bos_token_id"] == raw["bos_token_id"]


def expected_chat(model_type, bos, messages, thinking=True):
    if model_type == "qwen3":
        s = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        s += "<|im_start|>assistant\n"
        return s if thinking else s + "<think>\n\n</think>\n\n"
    s = bos + "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
        for m in messages)
    return s + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def test_autotokenizer_and_chat_template(model_dir):
    from transformers import AutoTokenizer
    from tokenizers import Tokenizer

    cfg = load_json(model_dir / "config.json")
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == expected_chat(cfg["model_type"], tok.bos_token, MESSAGES)
    if cfg["model_type"] == "qwen3":
        no_think = tok.apply_chat_template(
            MESSAGES, tokenize=False, add_generation_prompt=True, enable_thinking=False)
        assert no_think == expected_chat("qwen3", None, MESSAGES, thinking=False)
    ids = tok.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    assert all(0 <= i < cfg["vocab_size"] for i in ids)
    assert tok.decode(ids) == text
    # transformers and the raw tokenizer agree on the ids.
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    sample = "Hello world!  It's 2026; café — 你好\n\nbye"
    assert tok(sample)["input_ids"] == raw.encode(sample).ids


def test_chat_template_renders_in_minijinja(model_dir):
    minijinja = pytest.importorskip("minijinja")
    cfg = load_json(model_dir / "config.json")
    tc = load_json(model_dir / "tokenizer_config.json")
    env = minijinja.Environment(templates={"chat": tc["chat_template"]})
    bos = tc.get("bos_token") or ""
    out = env.render_template("chat", messages=MESSAGES, add_generation_prompt=True,
                              bos_token=bos, eos_token=tc.get("eos_token"))
    assert out == expected_chat(cfg["model_type"], bos, MESSAGES)
    if cfg["model_type"] == "qwen3":
        out = env.render_template("chat", messages=MESSAGES, add_generation_prompt=True,
                                  enable_thinking=False)
        assert out == expected_chat("qwen3", None, MESSAGES, thinking=False)
