"""numpy arrays and torch tensors on the memory of `_native.Block`s, without
copying.

A block exposes its whole memory as bytes through `__array_interface__`
(host) or `__cuda_array_interface__` (GPU). One uint8 array or tensor is
made over it, and every tensor is a slice of it reinterpreted with the
tensor's dtype and shape: each keeps the block alive, the block owns the
memory (or the daemon lease that keeps it in place), so the memory lives as
long as any tensor on it. Names with the same bytes (tied weights, aliases)
get the same object.

A daemon's memory-tier copy (share mode) is mapped here copy-on-write
(`mmap.ACCESS_COPY`): reads share the daemon's pages, a write makes a
private page, so writing a tensor never changes what other processes see
and never faults.
"""

from __future__ import annotations

import mmap
import weakref

import numpy as np

from . import _dtypes

_PAGE = mmap.ALLOCATIONGRANULARITY


def _host_bytes(block) -> np.ndarray:
    """A writable-or-not uint8 array over a host block's memory."""
    loc = block.shm_location
    if loc is None:
        if block.nbytes == 0:
            return np.empty(0, dtype=np.uint8)
        return np.asarray(block)
    path, offset, nbytes = loc
    if nbytes == 0:
        return np.empty(0, dtype=np.uint8)
    start = offset - offset % _PAGE
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), nbytes + (offset - start), offset=start,
                       access=mmap.ACCESS_COPY)
    # The lease (held by `block`) ends when the last array on the map is gone.
    weakref.finalize(mm, _keep, block)
    return np.frombuffer(mm, dtype=np.uint8)[offset - start:]


def _keep(_obj):
    """Holds a reference until the finalizer runs (then drops it)."""


def _shape_of(dtype: str, shape, length: int):
    if dtype in _dtypes.PACKED:
        return (length,)
    return tuple(shape)


def to_numpy(blocks, out: dict | None = None) -> dict:
    """`{name: ndarray}` of the tensors of host blocks."""
    out = {} if out is None else out
    for block in blocks:
        if block.device != "cpu":
            raise TypeError(
                f"tensors on {block.device} need torch (numpy arrays live in host "
                "memory): install torch or load with device_map={'': 'cpu'}"
            )
        base = _host_bytes(block)
        seen = {}
        for name, dtype, shape, offset, length in block.tensors:
            key = (offset, length, dtype, tuple(shape))
            arr = seen.get(key)
            if arr is None:
                arr = base[offset:offset + length].view(_dtypes.numpy_dtype(dtype))
                arr = arr.reshape(_shape_of(dtype, shape, length))
                seen[key] = arr
            out[name] = arr
    return out


def _torch_base(torch, block):
    if block.device == "cpu":
        base = _host_bytes(block)
        if not base.flags.writeable:
            base = base.copy()  # torch has no read-only tensors
        return torch.from_numpy(base)
    dev = torch.device(block.device)
    if block.nbytes == 0:
        return torch.empty(0, dtype=torch.uint8, device=dev)
    with torch.cuda.device(dev):
        return torch.as_tensor(block, device=dev)


def _view(torch, raw, dtype, shape):
    try:
        return raw.view(dtype).view(shape)
    except RuntimeError:
        # Bytes not aligned for the dtype (a safetensors file may put a
        # tensor at any offset): an aligned copy.
        return raw.clone().view(dtype).view(shape)


def to_torch(blocks, out: dict | None = None) -> dict:
    """`{name: tensor}` of the tensors of blocks (host or GPU)."""
    import torch

    out = {} if out is None else out
    for block in blocks:
        base = _torch_base(torch, block)
        seen = {}
        for name, dtype, shape, offset, length in block.tensors:
            key = (offset, length, dtype, tuple(shape))
            t = seen.get(key)
            if t is None:
                shp = _shape_of(dtype, shape, length)
                t = _view(torch, base[offset:offset + length], _dtypes.torch_dtype(torch, dtype), shp)
                seen[key] = t
            out[name] = t
    return out


def ordered(names, d: dict) -> dict:
    """`d` in the order of `names` (the checkpoint's order)."""
    return {n: d[n] for n in names if n in d}
