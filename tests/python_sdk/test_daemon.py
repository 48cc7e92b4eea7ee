"""The SDK against a real daemon on the CPU: configure, register, list, info,
save/load through the daemon's memory tier (share and copy), cleanup,
shutdown, and the error cases."""

import gc
import json
import os
import subprocess
import time

import numpy as np
import pytest

from conftest import read_safetensors


def lease_count(ft):
    return ft.status()["leases"]


def test_configure_starts_then_reuses(ft, daemon, tmp_path):
    st = ft.status()
    pid = st["pid"]
    assert st["store"] == str(daemon)
    assert (daemon / "flash.sock").exists()
    # A second configure on the same store reuses the running daemon: no error.
    st2 = ft.configure(storage_path=str(daemon), mem_pool_size=64 << 20, use_gpu=False)
    assert st2["pid"] == pid
    # connect() reaches it too.
    assert ft.connect(storage_path=str(daemon))["pid"] == pid


def test_configure_with_the_seed_arguments(ft, tmp_path):
    from conftest import free_port

    port = free_port()
    st = ft.configure(
        storage_path=str(tmp_path / "models"),
        mem_pool_size=1024**2 * 64,
        chunk_size=1024**2 * 32,
        num_threads=4,
        gpu_memory_utilization=0.8,
        server_host="127.0.0.1",
        server_port=port,
    )
    assert st["tcp"].endswith(f":{port}")
    assert ft.connect(server_host="127.0.0.1", server_port=port,
                      storage_path=str(tmp_path / "models"))["pid"] == st["pid"]
    mem = [t for t in st["tiers"] if t["tier"] == "memory"]
    assert mem and mem[0]["budget"] == 64 << 20


def test_register_list_info(ft, daemon, synth_qwen3):
    r = ft.register_model(str(synth_qwen3), backend="transformers", torch_dtype="bfloat16")
    assert r["status"] == "registered"
    assert r["model_id"] == "local/qwen3-tiny"
    assert r["backend"] == "transformers"
    assert set(r["metrics"]) == {"download_time", "transform_time", "register_time", "model_size"}
    assert r["metrics"]["model_size"] > 0 and r["metrics"]["download_time"] == 0
    assert r["path"].startswith(str(daemon / "models"))
    # Again: already there, nothing redone.
    r2 = ft.register_model(str(synth_qwen3), backend="transformers", torch_dtype="bfloat16")
    assert r2["status"] == "exists" and r2["metrics"]["transform_time"] == 0
    r3 = ft.register_model(str(synth_qwen3), backend="vllm", force=True)
    assert r3["status"] == "registered"
    info = ft.get_model_info("local/qwen3-tiny")
    assert info["model_id"] == "local/qwen3-tiny"
    assert info["backend"] == "vllm"
    assert info["size"] == r3["metrics"]["model_size"]
    assert info["ranks"] == 1
    assert info["path"] == r3["path"]
    assert ft.get_model_info(str(synth_qwen3))["model_id"] == "local/qwen3-tiny"
    assert ft.get_model_info("nobody/nothing") is None
    assert ft.get_model_info("not a name") is None
    models = ft.list_models()
    assert list(models) == ["local/qwen3-tiny"]
    assert models["local/qwen3-tiny"]["size"] == info["size"]


def test_register_converts_dtype(ft, daemon, synth_qwen3):
    ft.register_model(str(synth_qwen3), torch_dtype="float32")
    info = ft.get_model_info(str(synth_qwen3))
    assert info["dtype"] == "F32"
    sd = ft.load_dict("local/qwen3-tiny", {"": "cpu"})
    ref = read_safetensors(synth_qwen3 / "model.safetensors")
    assert set(sd) == set(ref)
    for k, v in sd.items():
        assert v.dtype == np.float32, k


def test_load_dict_through_the_daemon(ft, daemon, synth_qwen3):
    ft.register_model(str(synth_qwen3))
    # bf16 checkpoint: compare bytes with the safetensors file, read by hand.
    header = _raw_safetensors(synth_qwen3 / "model.safetensors")
    for copy in (False, True):
        sd = ft.load_dict("local/qwen3-tiny", {"": "cpu"}, copy=copy)
        assert set(sd) == set(header)
        for name, (dtype, shape, raw) in header.items():
            assert list(sd[name].shape) == shape, name
            assert sd[name].tobytes() == raw, name
        if not copy:
            assert lease_count(ft) == 1
        del sd
        gc.collect()
        assert lease_count(ft) == 0


def test_load_dict_one_rank_of_a_split_model(ft, daemon, flash_bin, synth_qwen3, tmp_path):
    env = {**os.environ, "FLASH_HOME": str(daemon)}

    def flash(*args):
        r = subprocess.run([flash_bin, "-q", *args], env=env, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr

    flash("pull", "--from", str(synth_qwen3), "--name", "t/tp", "--tp", "2")
    wants = []
    for rank in (0, 1):
        flash("export", "t/tp", "--rank", str(rank), "--to", str(tmp_path / f"r{rank}"))
        wants.append(_raw_safetensors(tmp_path / f"r{rank}" / "model.safetensors"))
    assert wants[0] != wants[1]

    def same(sd, want):
        assert set(sd) == set(want)
        for name, (dtype, shape, raw) in want.items():
            assert list(sd[name].shape) == shape, name
            assert sd[name].tobytes() == raw, name

    # Through the daemon: each rank its own image, shared or copied.
    for rank in (0, 1):
        for copy in (False, True):
            same(ft.load_dict("t/tp", {"": "cpu"}, copy=copy, rank=rank), wants[rank])
            gc.collect()
    mem = next(t for t in ft.status()["tiers"] if t["tier"] == "memory")
    assert sorted(m["model"] for m in mem["models"]) == ["t/tp#0", "t/tp#1"]
    with pytest.raises(ft.InvalidRequestError, match="2 tensor-parallel ranks"):
        ft.load_dict("t/tp", {"": "cpu"})
    with pytest.raises(ft.InvalidRequestError, match="#0 to #1"):
        ft.load_dict("t/tp", {"": "cpu"}, rank=2)
    with pytest.raises(ft.InvalidRequestError, match="rank"):
        ft.load_dict("t/tp", {"": "cpu"}, rank=-1)
    # In this process (no daemon): the same bytes.
    assert ft.shutdown_server() is True
    same(ft.load_dict("t/tp", {"": "cpu"}, rank=1), wants[1])
    with pytest.raises(ft.FlashError, match="not rank 3"):
        ft.load_dict("t/tp", {"": "cpu"}, rank=3)


def _raw_safetensors(path):
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    out = {}
    for name, h in header.items():
        b, e = h["data_offsets"]
        out[name] = (h["dtype"], h["shape"], data[8 + n + b:8 + n + e])
    return out


def test_save_into_the_store_and_share(ft, daemon):
    emb = np.arange(64, dtype=np.float32).reshape(16, 4)
    sd = {"embed": emb, "head": emb, "bias": np.zeros(4, np.float64),
          "mask": np.array([True, False, True])}
    rep = ft.save_dict(sd, "me/tiny")
    assert rep["path"] == str(daemon / "models" / "me" / "tiny")
    assert "me/tiny" in ft.list_models()
    got = ft.load_dict("me/tiny", {"": "cpu"})
    assert got["head"] is got["embed"]
    for k, v in sd.items():
        np.testing.assert_array_equal(got[k], v)
        assert got[k].dtype == v.dtype
    # Share mode maps the daemon's copy copy-on-write: writing here changes
    # nothing for other clients.
    got["embed"][0, 0] = -1.0
    again = ft.load_dict("me/tiny", {"": "cpu"})
    assert again["embed"][0, 0] == 0.0
    # The same path as an absolute path inside the store also goes through it.
    via_path = ft.load_dict(str(daemon / "models" / "me" / "tiny"), {"": "cpu"})
    np.testing.assert_array_equal(via_path["bias"], sd["bias"])
    # Saving again replaces the model, and the daemon serves the new bytes;
    # not while its copy is leased.
    with pytest.raises(ft.InvalidRequestError, match="in use"):
        ft.save_dict({"embed": emb * 2}, "me/tiny")
    np.testing.assert_array_equal(via_path["embed"], emb)
    del got, again, via_path
    gc.collect()
    ft.save_dict({"embed": emb * 2}, "me/tiny")
    np.testing.assert_array_equal(ft.load_dict("me/tiny", {"": "cpu"})["embed"], emb * 2)


def test_cleanup_keeps_the_daemons_tier(ft, daemon):
    ft.save_dict({"w": np.ones((256, 256), np.float32)}, "me/w")
    sd = ft.load_dict("me/w", {"": "cpu"})
    del sd
    r = ft.cleanup_gpu()
    assert isinstance(r, dict) and r["cuda_cache_emptied"] is False
    assert lease_count(ft) == 0
    mem = next(t for t in ft.status()["tiers"] if t["tier"] == "memory")
    assert [m["model"] for m in mem["models"]] == ["me/w"]  # still resident


def test_errors(ft, daemon, tmp_path):
    with pytest.raises(ft.ModelNotFoundError, match="nobody/nothing"):
        ft.load_dict("nobody/nothing", {"": "cpu"})
    with pytest.raises(ft.ModelNotFoundError):
        ft.load_model("nobody/nothing", backend="transformers")
    ft.save_dict({"w": np.ones(4, np.float32)}, "me/w")
    with pytest.raises(ft.DeviceError, match="GPU 0"):
        ft.load_dict("me/w", {"": 0}, framework="torch")
    with pytest.raises(ft.DeviceError, match="GPU 5"):
        ft.load_dict("me/w", {"": "cuda:5"}, copy=True, framework="torch")
    with pytest.raises(ft.InvalidRequestError, match="backend"):
        ft.register_model("me/w", backend="onnx")
    with pytest.raises(ValueError, match="dtype"):
        ft.register_model("me/w", torch_dtype="int4")
    # Budget full: a model larger than the 64 MiB memory tier.
    ft.save_dict({"big": np.zeros((80 << 20) // 4, np.float32)}, "me/big")
    with pytest.raises(ft.BudgetFullError):
        ft.load_dict("me/big", {"": "cpu"})
    # The daemon is still fine afterwards.
    assert ft.load_dict("me/w", {"": "cpu"})["w"].sum() == 4


def test_shutdown_then_in_process(ft, daemon):
    ft.save_dict({"w": np.arange(6, dtype=np.int32)}, "me/w")
    assert ft.shutdown_server() is True
    assert not (daemon / "flash.sock").exists() or not _answers(daemon)
    with pytest.raises(ft.DaemonNotRunningError):
        ft.status()
    # Without a daemon, the configured store is read in this process.
    np.testing.assert_array_equal(ft.load_dict("me/w", {"": "cpu"})["w"], np.arange(6))
    assert "me/w" in ft.list_models()
    assert ft.shutdown_server() is False  # nothing running: no error
    with pytest.raises(ft.DaemonNotRunningError, match="not running"):
        ft.connect(storage_path=str(daemon))


def _answers(store):
    from flashtensors import _native

    return _native.daemon_running(str(store))


def test_shutdown_without_configure_is_harmless(ft):
    assert ft.shutdown_server() is False


def test_a_daemon_started_by_the_cli_is_reused(ft, flash_bin, tmp_path):
    store = tmp_path / "cli-store"
    r = subprocess.run([flash_bin, "--storage", str(store), "-q", "start", "--http", "off",
                        "--no-gpu", "--mem-pool", str(32 << 20)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    try:
        pid = json.loads(subprocess.run([flash_bin, "--storage", str(store), "status", "--json"],
                                        capture_output=True, text=True).stdout)["pid"]
        assert ft.configure(storage_path=str(store))["pid"] == pid
    finally:
        assert ft.shutdown_server() is True
        deadline = time.monotonic() + 30
        while _answers(store) and time.monotonic() < deadline:
            time.sleep(0.05)


def test_bundled_binary(ft):
    from flashtensors import _daemon

    assert _daemon.flash_binary().endswith("flashtensors/bin/flash")


def test_closing_the_connection_keeps_live_tensors_valid(ft, daemon):
    from flashtensors import _daemon

    w = np.arange(1024, dtype=np.float32)
    ft.save_dict({"w": w}, "me/w")
    sd = ft.load_dict("me/w", {"": "cpu"})
    old = _daemon.client()
    old.close()
    assert old.closed
    with pytest.raises(ft.DaemonNotRunningError, match="closed"):
        old.status()
    ft.connect(storage_path=str(daemon))
    # The lease (and the session owning it) lives on with the tensors.
    assert lease_count(ft) == 1
    np.testing.assert_array_equal(sd["w"], w)
    del sd
    gc.collect()
    assert lease_count(ft) == 0
