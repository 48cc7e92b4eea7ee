"""save_dict / load_dict: state dicts to and from disk, host memory and GPUs.

    from flashtensors import flash
    flash.save_dict(model.state_dict(), "/models/mine")
    state = flash.load_dict("/models/mine", {"": 0})

Paths. A folder is written in the flash format (aligned, checksummed, tied
tensors stored once); a path ending in `.safetensors` is written as one
safetensors file. `load_dict` reads flash folders, safetensors folders
(sharded or not) and single safetensors files.

Store models. After `configure(storage_path=...)` (or `connect`), a path of
the form `ORG/NAME` that is not an existing file or folder names a model of
the daemon's store (`<store>/models/ORG/NAME`), and so does an absolute path
inside the store's `models/` folder. `load_dict` then goes through the
daemon: `copy=False` (default) shares the daemon's copy (GPU tier: CUDA IPC,
zero copy; memory tier: the shared memory mapped copy-on-write; a model
stored compressed keeps compressed bytes in the memory tier, so on the CPU
it comes as a copy the daemon decodes), `copy=True` has the daemon copy the
model into memory of this process. Everything else
is loaded in this process (flash-load's pipeline).

Results are torch tensors when torch is installed (`framework="numpy"`
asks for numpy arrays), numpy arrays otherwise (host memory only). See
`_dtypes` for bf16/fp8 under numpy.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import time
from pathlib import Path

import numpy as np

from . import _daemon, _dtypes, _native, _tensors
from .errors import DeviceError, FlashError, InvalidRequestError, ModelNotFoundError

_log = logging.getLogger("flashtensors")

__all__ = ["save_dict", "load_dict"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(:[A-Za-z0-9][A-Za-z0-9._-]*)?")


def _is_torch(x) -> bool:
    mod = type(x).__module__
    return mod.startswith("torch") and hasattr(x, "data_ptr")


def _entry(name: str, value):
    """(name, dtype, shape, bytes buffer, identity key) of one tensor."""
    if _is_torch(value):
        import torch

        t = value.detach()
        dtype = _dtypes.from_torch(t.dtype)
        key = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()), t.device)
        shape = tuple(t.shape)
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous().reshape(-1)
        buf = t.view(torch.uint8).numpy() if t.numel() else np.empty(0, np.uint8)
        return (name, dtype, list(shape), buf), key if value.numel() else None
    arr = np.asarray(value)
    dtype = _dtypes.from_numpy(arr.dtype)
    ai = arr.__array_interface__
    key = (ai["data"][0], arr.dtype.str, arr.shape, arr.strides)
    flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    return (name, dtype, list(arr.shape), flat), key if arr.size else None


def _store_model(path) -> str | None:
    """The store model a path names, if any (see the module doc)."""
    home = _daemon.store_root()
    if home is None:
        return None
    s = os.fspath(path)
    p = Path(s)
    if p.is_absolute():
        try:
            rel = p.resolve().relative_to((Path(home) / "models").resolve())
        except ValueError:
            return None
        if len(rel.parts) != 2:
            return None
        org, leaf = rel.parts
        return f"{org}/{leaf.replace('@', ':')}"
    if s.startswith(("./", "../")) or p.exists():
        return None
    return s if _NAME.fullmatch(s) else None


def save_dict(state_dict, path, *, metadata: dict | None = None, compress: bool = False) -> dict:
    """Saves a dict of torch tensors or numpy arrays.

    `path`: a folder (flash format; created or replaced) or a file ending in
    `.safetensors`; `ORG/NAME` saves into the configured store (see the
    module doc). Tensors sharing memory (tied weights: same storage, offset,
    dtype, shape and strides) are saved once in the flash format and come
    back as one object; a safetensors file holds a copy per name.
    `compress=True` stores floating-point tensors compressed (flash format
    only; lossless, decoded on the GPU while loading).
    Returns `{"path", "format", "tensors", "aliases", "bytes"}`.
    """
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict of tensors, not {type(state_dict).__name__}")
    model = _store_model(path)
    if model is not None:
        target = Path(_daemon.store_root()) / "models" / model.replace(":", "@")
    else:
        target = Path(os.fspath(path)).expanduser()
    entries, aliases, first = [], {}, {}
    for name, value in state_dict.items():
        if not isinstance(name, str):
            raise TypeError(f"state_dict keys must be strings, not {name!r}")
        entry, key = _entry(name, value)
        if key is not None and key in first:
            aliases[name] = first[key]
            continue
        if key is not None:
            first[key] = name
        entries.append(entry)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    c = _daemon.client(required=False) if model is not None else None
    if c is not None:
        _drop_daemon_copies(c, model)
    if target.suffix == ".safetensors":
        if compress:
            raise InvalidRequestError(
                f"{target}: compression is a feature of the flash format (save to a folder)"
            )
        by_name = {e[0]: e for e in entries}
        full = [by_name[n] if n in by_name else (n, *by_name[aliases[n]][1:]) for n in state_dict]
        nbytes = _native.save_safetensors(str(target), full, meta)
        fmt, n_alias = "safetensors", 0
    else:
        nbytes = _native.save_flash(str(target), entries, aliases, meta, model, compress)
        fmt, n_alias = "flash", len(aliases)
        if c is not None:
            try:  # a load that raced with the write
                c.unload(model)
            except FlashError:
                pass
    return {"path": str(target), "format": fmt, "tensors": len(entries),
            "aliases": n_alias, "bytes": nbytes}


def _drop_daemon_copies(c, model: str) -> None:
    """Makes the daemon forget its copies of `model` before it is replaced."""
    try:
        c.unload(model)
    except ModelNotFoundError:
        pass  # a new model
    except InvalidRequestError as e:
        raise InvalidRequestError(
            f"cannot replace {model}: the daemon's copy is in use ({e}); "
            "release the tensors loaded from it first"
        ) from None


def _device_map_json(device_map) -> str:
    if device_map is None:
        device_map = {"": 0}
    if isinstance(device_map, str):
        if device_map == "auto":
            return json.dumps("auto")
        device_map = {"": device_map}
    if not isinstance(device_map, dict):
        device_map = {"": device_map}
    out = {}
    for k, v in device_map.items():
        if type(v).__name__ == "device":  # torch.device
            v = "cpu" if v.type == "cpu" else (v.index or 0)
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            raise DeviceError(f"device_map[{k!r}] = {v!r} is not a device (a GPU number, 'cuda:N' or 'cpu')")
        if isinstance(v, int) and v < 0:
            raise DeviceError(f"device_map[{k!r}] = {v}: GPU numbers start at 0")
        out[str(k)] = v
    return json.dumps(out)


def _single_device(dm_json: str):
    """'cpu', a GPU ordinal, or None when the map spreads over devices."""
    dm = json.loads(dm_json)
    if not isinstance(dm, dict) or set(dm) != {""}:
        return None
    v = dm[""]
    if isinstance(v, int):
        return v
    v = v.strip()
    if v == "cpu":
        return "cpu"
    if v == "cuda":
        return 0
    try:
        return int(v.removeprefix("cuda:"))
    except ValueError:
        raise DeviceError(f"unknown device {v!r} (a GPU number, 'cuda:N' or 'cpu')") from None


def _framework(framework) -> str:
    if framework not in (None, "torch", "numpy", "np", "pt"):
        raise InvalidRequestError(f"framework must be 'torch' or 'numpy', not {framework!r}")
    if framework in ("numpy", "np"):
        return "numpy"
    if framework in ("torch", "pt"):
        return "torch"
    if importlib.util.find_spec("torch") is not None:
        return "torch"
    return "numpy"


def _is_compressed(model):
    """Whether store model `model` is stored compressed (its manifest says;
    the daemon's Info does not)."""
    try:
        info = _native.store_info(str(_daemon.store_root()), model.split("#")[0])
    except FlashError:
        return False
    return bool(info and json.loads(info).get("compressed"))


def _load_blocks(path, device_map, copy, threads, chunk_size, rank=None):
    dm = _device_map_json(device_map)
    model = _store_model(path)
    c = _daemon.client(required=False)
    if model is not None and rank is not None:
        # The daemon keeps each rank of a split model as its own image.
        model = f"{model}#{rank}"
    if model is not None:
        single = _single_device(dm)
        if c is not None and single is not None:
            if single == "cpu":
                # A compressed model's memory-tier copy holds its compressed
                # bytes, which cannot be shared as tensors: the daemon decodes
                # it into memory of this process instead (copy mode).
                share = not copy and not _is_compressed(model)
                return [c.acquire(model, "memory") if share else c.fill_host(model)], model
            n = _native.cuda_devices()[0]
            if single >= n:
                raise DeviceError(
                    f"device_map asks for GPU {single}, but this process sees {n} GPU(s)"
                )
            return [c.fill_gpu(model, single) if copy else c.acquire(model, f"gpu:{single}")], model
        folder = _native.store_model_dir(str(_daemon.store_root()), model.split("#")[0])
        if folder is None:
            raise ModelNotFoundError(f"model {model} is not in the store {_daemon.store_root()}")
        path = folder
    else:
        p = Path(os.fspath(path)).expanduser()
        if not p.exists():
            hint = ""
            if _NAME.fullmatch(os.fspath(path)) and _daemon.store_root() is None:
                hint = " (to load a store model, call flashtensors.configure() first)"
            raise FileNotFoundError(f"{p}: no such file or folder{hint}")
        path = p
    return _native.load_local(str(path), dm, threads, chunk_size, rank), None


def load_dict(path, device_map=None, copy: bool = False, *, framework: str | None = None,
              threads: int | None = None, chunk_size: int | None = None,
              rank: int | None = None) -> dict:
    """Loads a state dict.

    `device_map`: `{"": 0}` (default: GPU 0), `{"": "cuda:1"}`, `{"": "cpu"}`
    (host memory), prefixes (`{"model.layers.0": 0, "": "cpu"}`) or "auto".
    `copy`: for store models, a private copy instead of the daemon's shared
    one (share-mode tensors must be treated as read-only on GPUs: they are
    the daemon's memory, seen by every process sharing them).
    Returns `{name: tensor}` in the checkpoint's order, exact dtypes and
    shapes; tied tensors (aliases) are the same object.
    `rank`: for a model stored split for tensor parallelism (`flash pull
    --tp N`), the tensors of rank `rank` alone (the process that runs that
    rank loads them, on its GPU): the checkpoint's names, the shard's
    shapes. A split model must be loaded by rank.
    """
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
        raise InvalidRequestError(f"rank must be a non-negative int, not {rank!r}")
    fw = _framework(framework)
    if fw == "numpy" and _single_device(_device_map_json(device_map)) not in ("cpu", None):
        raise DeviceError(
            "GPU tensors need torch (numpy arrays live in host memory): install torch, "
            "or load with device_map={'': 'cpu'}"
        )
    t0 = time.perf_counter()
    blocks, model = _load_blocks(path, device_map, copy, threads, chunk_size, rank)
    t1 = time.perf_counter()
    out = _tensors.to_numpy(blocks) if fw == "numpy" else _tensors.to_torch(blocks)
    _log.debug("load_dict %s: bytes %.3f s (%s), tensors %.3f s (%d)", model or path, t1 - t0,
               "daemon" if model else "this process", time.perf_counter() - t1, len(out))
    return out
