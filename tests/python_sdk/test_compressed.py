"""Compressed models through the SDK on the CPU: `save_dict(compress=True)`,
`register_model(compress=True)`, and `load_dict` of them in this process and
through the daemon (whose memory tier keeps them compressed and decodes a
copy for this process)."""

import numpy as np
import pytest
import ml_dtypes


def normal_weights(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 0.02).astype(dtype)


def state():
    return {
        "model.embed_tokens.weight": normal_weights((512, 256), ml_dtypes.bfloat16, 1),
        "model.layers.0.mlp.up_proj.weight": normal_weights((256, 300), np.float32, 2),
        "model.layers.0.mlp.down_proj.weight": normal_weights((300, 256), np.float16, 3),
        "model.norm.weight": np.ones(256, dtype=ml_dtypes.bfloat16),
        "ids": np.arange(7, dtype=np.int64),
    }


def same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_save_dict_compressed_loads_exactly(ft, tmp_path):
    s = state()
    plain = ft.save_dict(s, tmp_path / "plain")
    packed = ft.save_dict(s, tmp_path / "packed", compress=True)
    assert packed["bytes"] < plain["bytes"], (packed, plain)
    got = ft.load_dict(tmp_path / "packed", {"": "cpu"})
    assert set(got) == set(s)
    for k, v in s.items():
        assert same(np.asarray(got[k]), v), k


def test_compression_needs_the_flash_format(ft, tmp_path):
    with pytest.raises(ft.errors.InvalidRequestError, match="flash format"):
        ft.save_dict(state(), tmp_path / "one.safetensors", compress=True)


def test_a_compressed_store_model_through_the_daemon(ft, daemon, synth_qwen3, tmp_path):
    r = ft.register_model(str(synth_qwen3), compress=True)
    name = r["model_id"]
    info = ft.get_model_info(name)
    assert info["compressed"] is True
    assert info["stored_bytes"] < info["size"], info
    assert r["metrics"]["model_size"] == info["size"]
    # The reference: the checkpoint loaded in this process, uncompressed.
    want = ft.load_dict(synth_qwen3, {"": "cpu"})
    # Shared by default: the daemon's memory tier holds the compressed bytes,
    # so this process gets a copy the daemon decoded.
    got = ft.load_dict(name, {"": "cpu"})
    assert set(got) == set(want)
    for k in want:
        assert same(np.asarray(got[k]), np.asarray(want[k])), k
    assert "memory" in ft.get_model_info(name)["tiers"]
