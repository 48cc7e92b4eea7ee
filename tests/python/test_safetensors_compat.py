"""flash against the reference safetensors implementation.

Checkpoints written by `safetensors.numpy.save_file` (and by hand, for the
dtypes numpy lacks) are imported with `flash pull --from`, written back with
`flash export --to` (which reads through flash's load path), and every tensor
of the export is compared with the original: dtype, shape and bytes. Files
flash writes itself (`flash synth`, `flash export`) must load in the
reference reader.
"""

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

# Every numpy dtype safetensors.numpy reads and writes, with its safetensors name.
NUMPY_DTYPES = {
    "BOOL": np.bool_,
    "U8": np.uint8,
    "I8": np.int8,
    "I16": np.int16,
    "U16": np.uint16,
    "I32": np.int32,
    "U32": np.uint32,
    "I64": np.int64,
    "U64": np.uint64,
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
    "C64": np.complex64,
}
SHAPES = [(), (0, 3), (1,), (7,), (3, 5), (2, 0, 4), (2, 3, 4)]


def random_array(rng, dtype, shape):
    """A C-contiguous array (0-d for shape `()`) of `dtype`."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return np.array(rng.integers(0, 2, size=shape), dtype=np.bool_)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.array(rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True), dtype=dtype)
    if dtype.kind == "c":
        return np.array(rng.standard_normal(shape) + 1j * rng.standard_normal(shape), dtype=dtype)
    a = np.array(rng.standard_normal(shape) * 100, dtype=dtype)
    flat = a.reshape(-1)
    # Special values must survive byte for byte.
    for i, v in enumerate([np.nan, -0.0, np.inf, -np.inf, np.finfo(dtype).tiny]):
        if i < flat.size:
            flat[i] = v
    return a


def st_tensors(path):
    """name -> (safetensors dtype name, shape tuple, raw bytes), by the reference parser."""
    out = {}
    for name, t in safetensors.deserialize(Path(path).read_bytes()):
        out[name] = (t["dtype"], tuple(t["shape"]), bytes(t["data"]))
    return out


def export_files(d):
    """The safetensors files of an export folder, through its index when sharded."""
    index = d / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({d / f for f in weight_map.values()})
        assert files == sorted(d.glob("*.safetensors")), "the index names every shard, and only those"
        return files, weight_map
    return [d / "model.safetensors"], None


def round_trip(flash, tmp_path, src, name, *export_args):
    """pull --from src, verify, export; returns the export folder."""
    flash("pull", "--from", src, "--name", name)
    flash("verify", name)
    out = tmp_path / ("export-" + name.replace("/", "-"))
    flash("export", name, "--to", out, *export_args)
    return out


def assert_same_arrays(original, exported):
    assert sorted(exported) == sorted(original)
    for k, a in original.items():
        b = exported[k]
        assert b.dtype == a.dtype, k
        assert b.shape == a.shape, k
        assert b.tobytes() == a.tobytes(), k


@pytest.mark.parametrize("dtype", list(NUMPY_DTYPES), ids=list(NUMPY_DTYPES))
def test_numpy_dtype_round_trips(flash, tmp_path, dtype):
    rng = np.random.default_rng(list(NUMPY_DTYPES).index(dtype))
    tensors = {f"t.{'x'.join(map(str, s)) or 'scalar'}": random_array(rng, NUMPY_DTYPES[dtype], s) for s in SHAPES}
    # A tied copy: flash stores it once and must still export it under both names.
    tensors["t.tied"] = tensors["t.3x5"].copy()
    src = tmp_path / "src"
    src.mkdir()
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "np", "who": "pytest"})

    out = round_trip(flash, tmp_path, src, f"np/{dtype.lower()}")
    info = flash.json("info", f"np/{dtype.lower()}", "--json")
    assert info["tensor_count"] == len(tensors)

    files, _ = export_files(out)
    assert len(files) == 1
    assert_same_arrays(tensors, load_file(str(files[0])))
    for name, (st_dtype, shape, _) in st_tensors(files[0]).items():
        assert st_dtype == dtype, name
        assert shape == tensors[name].shape, name
    with safe_open(str(files[0]), framework="np") as f:
        assert f.metadata() == {"format": "np", "who": "pytest"}


def test_mixed_dtypes_two_shards_with_hand_written_index(flash, tmp_path):
    rng = np.random.default_rng(7)
    tensors = {}
    for dtype, np_dtype in NUMPY_DTYPES.items():
        for s in [(), (0, 3), (4, 3)]:
            tensors[f"{dtype.lower()}.{'x'.join(map(str, s)) or 'scalar'}"] = random_array(rng, np_dtype, s)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    src = tmp_path / "src"
    src.mkdir()
    weight_map = {}
    for fname, members in shards.items():
        save_file({k: tensors[k] for k in members}, str(src / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in members})
    total = sum(a.nbytes for a in tensors.values())
    (src / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    (src / "config.json").write_text(json.dumps({"architectures": ["MixedForTest"], "torch_dtype": "float32"}))

    # Small shards on export, so flash's own index is read back too.
    out = round_trip(flash, tmp_path, src, "mixed/two-shards", "--shard-size", "256")
    info = flash.json("info", "mixed/two-shards", "--json")
    assert info["architecture"] == "MixedForTest"
    assert info["tensor_count"] == len(tensors)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["MixedForTest"]

    files, index = export_files(out)
    assert len(files) > 1 and index is not None
    exported = {}
    for f in files:
        part = load_file(str(f))
        assert all(index[k] == f.name for k in part), f"{f.name} holds tensors its index puts elsewhere"
        assert not set(part) & set(exported)
        exported.update(part)
    assert sorted(index) == sorted(tensors)
    assert_same_arrays(tensors, exported)


def write_raw_safetensors(path, tensors, metadata=None):
    """Writes (name, dtype name, shape, bytes) tuples by hand: 8-byte
    little-endian header length, JSON header, data area."""
    header, offset, data = {}, 0, b""
    if metadata:
        header["__metadata__"] = metadata
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        data += raw
    js = json.dumps(header).encode()
    js += b" " * (-len(js) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(js)) + js + data)


def test_bf16_and_fp8_written_by_hand(flash, tmp_path):
    rng = np.random.default_rng(3)
    tensors = []
    for s in [(), (0, 3), (5,), (4, 6)]:
        label = "x".join(map(str, s)) or "scalar"
        # BF16: the top halves of float32 values, as uint16.
        f = rng.standard_normal(s).astype(np.float32)
        bf16 = (np.ascontiguousarray(f).view(np.uint32) >> 16).astype(np.uint16)
        tensors.append((f"bf16.{label}", "BF16", s, bf16.astype("<u2").tobytes()))
        for fp8 in ("F8_E4M3", "F8_E5M2"):
            tensors.append((f"{fp8.lower()}.{label}", fp8, s, rng.integers(0, 256, size=s, dtype=np.uint8).tobytes()))
    src = tmp_path / "src"
    src.mkdir()
    write_raw_safetensors(src / "model.safetensors", tensors, {"format": "pt"})
    # The reference parser accepts the hand-written file as written.
    want = {name: (dtype, tuple(shape), raw) for name, dtype, shape, raw in tensors}
    assert st_tensors(src / "model.safetensors") == want

    out = round_trip(flash, tmp_path, src, "hand/bf16-fp8")
    info = flash.json("info", "hand/bf16-fp8", "--json")
    assert info["tensor_count"] == len(tensors)
    files, _ = export_files(out)
    got = {}
    for f in files:
        got.update(st_tensors(f))
    assert got == want


def test_bf16_import_conversion_matches_numpy_rounding(flash, tmp_path):
    """`pull --dtype bf16` of F32 tensors rounds to nearest even, as numpy
    arithmetic on the bit pattern does; integers are left alone."""
    rng = np.random.default_rng(11)
    f = np.concatenate([rng.standard_normal(1000).astype(np.float32), np.float32([0.0, -0.0, 1.0, 65504.0, 3.0e38])])
    ints = rng.integers(-(2**40), 2**40, size=17, dtype=np.int64)
    src = tmp_path / "src"
    src.mkdir()
    save_file({"w": f, "ids": ints}, str(src / "model.safetensors"))
    flash("pull", "--from", src, "--name", "conv/bf16", "--dtype", "bf16")
    out = tmp_path / "out"
    flash("export", "conv/bf16", "--to", out)
    got = st_tensors(out / "model.safetensors")
    bits = f.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    assert got["w"] == ("BF16", (f.size,), rounded.astype("<u2").tobytes())
    assert got["ids"] == ("I64", (17,), ints.tobytes())


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_flash_synth_files_load_in_the_reference_reader(flash, tmp_path, dtype):
    src = tmp_path / "synth"
    flash("synth", "qwen3", "tiny", src, "--dtype", dtype, "--shard-size", "64K")
    cfg = json.loads((src / "config.json").read_text())
    files, index = export_files(src)
    assert len(files) > 1, "64K shards of a tiny model: sharded"
    st_name = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}[dtype]
    seen = {}
    for f in files:
        raw = st_tensors(f)  # the reference parser accepts every shard
        assert all(t[0] == st_name for t in raw.values())
        assert all(index[k] == f.name for k in raw)
        if dtype != "bf16":  # numpy has no bfloat16
            arrays = load_file(str(f))
            assert {k: a.shape for k, a in arrays.items()} == {k: t[1] for k, t in raw.items()}
            assert all(np.isfinite(a).all() for a in arrays.values())
            for k, a in arrays.items():
                if k.endswith("norm.weight"):
                    assert (a == 1).all(), f"{k}: norm weights are ones"
        seen.update(raw)
    assert sorted(seen) == sorted(index)
    h = cfg["hidden_size"]
    assert seen["model.embed_tokens.weight"][1] == (cfg["vocab_size"], h)
    assert seen["model.norm.weight"][1] == (h,)

    # And flash's import + export of it gives back the same bytes.
    out = round_trip(flash, tmp_path, src, f"synth/tiny-{dtype}")
    exported = {}
    for f in export_files(out)[0]:
        exported.update(st_tensors(f))
    assert exported == seen
