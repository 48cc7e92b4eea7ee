"""save_dict / load_dict with numpy, in this process (no daemon)."""

import json

import numpy as np
import pytest

from conftest import read_safetensors

NUMPY_DTYPES = [np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32,
                np.int64, np.uint64, np.float16, np.float32, np.float64, np.complex64]


def sample(dtype, shape, seed=0):
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    if np.dtype(dtype) == np.bool_:
        return (rng.integers(0, 2, n) == 1).reshape(shape)
    if np.issubdtype(dtype, np.complexfloating):
        return (rng.standard_normal(n) + 1j * rng.standard_normal(n)).astype(dtype).reshape(shape)
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(n).astype(dtype).reshape(shape)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, n, dtype=dtype, endpoint=True).reshape(shape)


def state():
    sd = {}
    for i, dt in enumerate(NUMPY_DTYPES):
        name = np.dtype(dt).name
        sd[f"{name}.matrix"] = sample(dt, (3, 5), i)
        sd[f"{name}.scalar"] = sample(dt, (), i + 100)
        sd[f"{name}.empty"] = sample(dt, (0, 4), i)
        sd[f"{name}.cube"] = sample(dt, (2, 3, 7), i + 200)
    return sd


def check_equal(got, want, ordered=True):
    if ordered:
        assert list(got) == list(want)
    else:
        assert set(got) == set(want)
    for k, v in want.items():
        g = got[k]
        assert isinstance(g, np.ndarray), (k, type(g))
        assert g.dtype == v.dtype, (k, g.dtype, v.dtype)
        assert g.shape == v.shape, (k, g.shape, v.shape)
        assert g.tobytes() == np.ascontiguousarray(v).tobytes(), k


@pytest.mark.parametrize("fmt", ["flash", "safetensors"])
def test_round_trip_every_numpy_dtype(ft, tmp_path, fmt):
    sd = state()
    path = tmp_path / ("m.safetensors" if fmt == "safetensors" else "m")
    rep = ft.save_dict(sd, path)
    assert rep["format"] == fmt and rep["tensors"] == len(sd)
    got = ft.load_dict(path, {"": "cpu"})
    check_equal(got, sd)
    # Host memory of this process: writable, and writes stay in this dict.
    got["float32.matrix"][0, 0] = 42.0
    assert ft.load_dict(path, {"": "cpu"})["float32.matrix"][0, 0] == sd["float32.matrix"][0, 0]


def test_flash_module_is_the_seed_entry_point(ft, tmp_path):
    from flashtensors import flash

    sd = {"weight": sample(np.float32, (3, 3))}
    flash.save_dict(sd, str(tmp_path / "folder"))
    out = flash.load_dict(str(tmp_path / "folder"), {"": "cpu"})
    check_equal(out, sd)


def test_safetensors_written_is_read_by_the_reference(ft, tmp_path):
    sd = state()
    ft.save_dict(sd, tmp_path / "x.safetensors")
    ref = read_safetensors(tmp_path / "x.safetensors")
    check_equal(ref, sd, ordered=False)


def test_reference_safetensors_load(ft, tmp_path):
    from safetensors.numpy import save_file

    sd = state()
    save_file(sd, str(tmp_path / "ref.safetensors"))
    # (the reference writer orders tensors its own way)
    check_equal(ft.load_dict(tmp_path / "ref.safetensors", {"": "cpu"}), sd, ordered=False)
    # A folder of shards with an index.
    folder = tmp_path / "sharded"
    folder.mkdir()
    names = list(sd)
    half = len(names) // 2
    shards = {"a.safetensors": names[:half], "b.safetensors": names[half:]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(folder / shard))
        weight_map.update({k: shard for k in keys})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    check_equal(ft.load_dict(folder, {"": "cpu"}), sd, ordered=False)


def test_non_contiguous_inputs_are_saved_by_value(ft, tmp_path):
    base = sample(np.float32, (6, 8))
    sd = {"t": base.T, "strided": base[::2, 1::3]}
    ft.save_dict(sd, tmp_path / "m")
    got = ft.load_dict(tmp_path / "m", {"": "cpu"})
    np.testing.assert_array_equal(got["t"], base.T)
    np.testing.assert_array_equal(got["strided"], base[::2, 1::3])
    assert got["t"].flags.c_contiguous


def test_tied_tensors_stay_tied(ft, tmp_path):
    emb = sample(np.float32, (16, 4))
    other = emb.copy()  # equal bytes, but a tensor of its own
    sd = {"embed.weight": emb, "lm_head.weight": emb, "other": other}
    rep = ft.save_dict(sd, tmp_path / "m")
    assert rep["tensors"] == 2 and rep["aliases"] == 1
    manifest = json.loads((tmp_path / "m" / "model.flash.json").read_text())
    assert manifest["aliases"] == {"lm_head.weight": "embed.weight"}
    got = ft.load_dict(tmp_path / "m", {"": "cpu"})
    assert got["lm_head.weight"] is got["embed.weight"]
    assert got["other"] is not got["embed.weight"]
    np.testing.assert_array_equal(got["other"], emb)
    # safetensors cannot share: each name gets its bytes.
    ft.save_dict(sd, tmp_path / "m.safetensors")
    got = ft.load_dict(tmp_path / "m.safetensors", {"": "cpu"})
    assert got["lm_head.weight"] is not got["embed.weight"]
    np.testing.assert_array_equal(got["lm_head.weight"], emb)


def test_bf16_and_fp8_with_ml_dtypes(ft, tmp_path):
    ml = pytest.importorskip("ml_dtypes")
    x = sample(np.float32, (4, 6))
    sd = {
        "bf16": x.astype(ml.bfloat16),
        "e4m3": x.astype(ml.float8_e4m3fn),
        "e5m2": x.astype(ml.float8_e5m2),
    }
    ft.save_dict(sd, tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "model.flash.json").read_text())
    assert {t["name"]: t["dtype"] for t in manifest["tensors"]} == {
        "bf16": "BF16", "e4m3": "F8_E4M3", "e5m2": "F8_E5M2"}
    got = ft.load_dict(tmp_path / "m", {"": "cpu"})
    check_equal(got, sd)


def test_bf16_without_ml_dtypes_is_the_exact_bits(ft, tmp_path, monkeypatch):
    ml = pytest.importorskip("ml_dtypes")
    from flashtensors import _dtypes

    x = sample(np.float32, (3, 4)).astype(ml.bfloat16)
    ft.save_dict({"w": x}, tmp_path / "m")
    monkeypatch.setattr(_dtypes, "_ml_dtypes", lambda: None)
    got = ft.load_dict(tmp_path / "m", {"": "cpu"})["w"]
    assert got.dtype == np.uint16 and got.shape == (3, 4)
    assert got.tobytes() == x.tobytes()


def test_ml_dtypes_is_imported_only_for_a_numpy_bf16_tensor(ft, tmp_path):
    """`import flashtensors` leaves ml_dtypes alone (its import is slow and
    torch users never need it); the first BF16 tensor under numpy imports it."""
    pytest.importorskip("ml_dtypes")
    import subprocess
    import sys

    ml = __import__("ml_dtypes")
    ft.save_dict({"f": sample(np.float32, (2,))}, tmp_path / "f32")
    ft.save_dict({"w": sample(np.float32, (2, 3)).astype(ml.bfloat16)}, tmp_path / "bf16")
    code = (
        "import sys, numpy, flashtensors as ft\n"
        "assert 'ml_dtypes' not in sys.modules, 'imported by import flashtensors'\n"
        "d = ft.load_dict(sys.argv[1], {'': 'cpu'})\n"
        "assert 'ml_dtypes' not in sys.modules, 'imported for an F32 tensor'\n"
        "d = ft.load_dict(sys.argv[2], {'': 'cpu'})\n"
        "assert 'ml_dtypes' in sys.modules and d['w'].dtype.name == 'bfloat16', d['w'].dtype\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "f32"), str(tmp_path / "bf16")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_resave_replaces_the_folder(ft, tmp_path):
    big = {f"t{i}": sample(np.float32, (1024, 1024), i) for i in range(3)}
    ft.save_dict(big, tmp_path / "m")
    small = {"only": sample(np.int64, (5,))}
    ft.save_dict(small, tmp_path / "m")
    check_equal(ft.load_dict(tmp_path / "m", {"": "cpu"}), small)
    data = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert data == ["data-00000.bin", "model.flash.json"], data


def test_device_maps(ft, tmp_path):
    sd = {"model.a": sample(np.float32, (2, 2)), "lm_head": sample(np.float32, (3,))}
    ft.save_dict(sd, tmp_path / "m")
    for dm in [{"": "cpu"}, "cpu", {"model": "cpu", "": "cpu"}, "auto"]:
        check_equal(ft.load_dict(tmp_path / "m", dm, framework="numpy"), sd)


def test_errors(ft, tmp_path):
    sd = {"w": sample(np.float32, (2, 2))}
    ft.save_dict(sd, tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="no such file"):
        ft.load_dict(tmp_path / "missing", {"": "cpu"})
    # No GPU here: a GPU device map is a clear error, not a crash.
    with pytest.raises(ft.DeviceError, match="GPU 0"):
        ft.load_dict(tmp_path / "m", {"": 0}, framework="torch")
    with pytest.raises(ft.DeviceError, match="cuda:3|GPU 3"):
        ft.load_dict(tmp_path / "m", {"": "cuda:3"}, framework="torch")
    with pytest.raises(ft.DeviceError, match="need torch"):
        ft.load_dict(tmp_path / "m", {"": 0})  # numpy (no torch in CI)
    with pytest.raises(ft.DeviceError):
        ft.load_dict(tmp_path / "m", {"layers": 0, "": "cpu"}, framework="torch")
    with pytest.raises(ft.DeviceError):
        ft.load_dict(tmp_path / "m", {"": -1})
    with pytest.raises(ft.DeviceError, match="unknown device"):
        ft.load_dict(tmp_path / "m", {"": "tpu"})
    with pytest.raises(TypeError, match="complex128"):
        ft.save_dict({"c": np.zeros(3, np.complex128)}, tmp_path / "c")
    with pytest.raises(TypeError, match="no safetensors equivalent"):
        ft.save_dict({"o": np.array(["a"], dtype=object)}, tmp_path / "o")
    with pytest.raises(TypeError, match="dict"):
        ft.save_dict([("w", sd["w"])], tmp_path / "l")
    with pytest.raises(TypeError, match="strings"):
        ft.save_dict({1: sd["w"]}, tmp_path / "k")
    with pytest.raises(ft.InvalidRequestError, match="framework"):
        ft.load_dict(tmp_path / "m", {"": "cpu"}, framework="jax")
    # A damaged checkpoint names the file.
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ft.FormatError, match="bad.safetensors"):
        ft.load_dict(bad, {"": "cpu"})
    # A data file shorter than its manifest says.
    data = tmp_path / "m" / "data-00000.bin"
    data.write_bytes(data.read_bytes()[:10])
    with pytest.raises(ft.FlashError, match="data-00000.bin"):
        ft.load_dict(tmp_path / "m", {"": "cpu"})


def test_store_name_without_configure_says_so(ft):
    with pytest.raises(FileNotFoundError, match="configure"):
        ft.load_dict("Qwen/Qwen3-0.6B", {"": "cpu"})
