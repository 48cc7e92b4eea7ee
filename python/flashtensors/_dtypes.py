"""Element types: safetensors names <-> numpy and torch dtypes.

numpy has no bfloat16 or float8 types of its own: with the `ml_dtypes`
package installed, BF16 and F8 tensors come back as `ml_dtypes.bfloat16`,
`float8_e4m3fn`, `float8_e5m2` and `float8_e8m0fnu` arrays; without it as
arrays of the same bit width (`uint16` for BF16, `uint8` for F8) holding the
exact bits. Packed sub-byte types (F4, F6) come back as their raw bytes
(a 1-D `uint8` array / tensor).
"""

from __future__ import annotations

import functools

import numpy as np


# Optional: numpy dtypes for bf16 and fp8, imported the first time a BF16 or
# F8 tensor comes back under numpy: its import took 0.87 s of the 1.05 s of
# `import flashtensors` on the 2-core build machine, and torch users never
# need it.
@functools.cache
def _ml_dtypes():
    """The ml_dtypes module, None when it is not installed."""
    try:
        import ml_dtypes
    except ImportError:  # pragma: no cover - depends on the environment
        return None
    return ml_dtypes


# Element width in bits of every safetensors dtype.
BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8,
    "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
    "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64,
    "I64": 64, "U64": 64,
}

PACKED = {"F4", "F6_E2M3", "F6_E3M2"}

_NUMPY = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "I16": np.dtype(np.int16), "U16": np.dtype(np.uint16), "F16": np.dtype(np.float16),
    "I32": np.dtype(np.int32), "U32": np.dtype(np.uint32), "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64), "I64": np.dtype(np.int64), "U64": np.dtype(np.uint64),
    "C64": np.dtype(np.complex64),
}
_ML_NAMES = {
    "BF16": "bfloat16", "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn",
    "F8_E8M0": "float8_e8m0fnu",
}
_FALLBACK = {"BF16": np.dtype(np.uint16), "F8_E5M2": np.dtype(np.uint8),
             "F8_E4M3": np.dtype(np.uint8), "F8_E8M0": np.dtype(np.uint8)}


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype a tensor stored as `name` comes back as."""
    if name in _NUMPY:
        return _NUMPY[name]
    if name in _ML_NAMES:
        ml = _ml_dtypes()
        if ml is not None and hasattr(ml, _ML_NAMES[name]):
            return np.dtype(getattr(ml, _ML_NAMES[name]))
        return _FALLBACK[name]
    return np.dtype(np.uint8)  # packed sub-byte types: raw bytes


# numpy dtype name -> safetensors name (for saving).
_FROM_NUMPY = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "uint16": "U16",
    "float16": "F16", "int32": "I32", "uint32": "U32", "float32": "F32",
    "float64": "F64", "int64": "I64", "uint64": "U64", "complex64": "C64",
    "bfloat16": "BF16", "float8_e5m2": "F8_E5M2", "float8_e4m3fn": "F8_E4M3",
    "float8_e8m0fnu": "F8_E8M0",
}


def from_numpy(dtype) -> str:
    dtype = np.dtype(dtype)
    try:
        return _FROM_NUMPY[dtype.name]
    except KeyError:
        raise TypeError(
            f"numpy dtype {dtype.name} has no safetensors equivalent "
            f"(supported: {', '.join(sorted(_FROM_NUMPY))})"
        ) from None


# safetensors name -> torch dtype attribute name.
_TORCH = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16",
    "F16": "float16", "BF16": "bfloat16", "I32": "int32", "U32": "uint32",
    "F32": "float32", "F64": "float64", "I64": "int64", "U64": "uint64",
    "C64": "complex64", "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn",
    "F8_E8M0": "float8_e8m0fnu",
}


def torch_dtype(torch, name: str):
    """The torch dtype of `name` (uint8 raw bytes for packed sub-byte types)."""
    attr = _TORCH.get(name)
    if attr is None:
        return torch.uint8
    dt = getattr(torch, attr, None)
    if dt is None:
        raise TypeError(f"this torch ({torch.__version__}) has no {attr} for {name} tensors")
    return dt


def from_torch(dtype) -> str:
    attr = str(dtype).removeprefix("torch.")
    for name, a in _TORCH.items():
        if a == attr:
            return name
    raise TypeError(f"torch dtype {dtype} has no safetensors equivalent")


def parse_torch_dtype(value) -> str | None:
    """`torch_dtype`/`dtype` arguments ('bfloat16', 'bf16', torch.bfloat16,
    'auto', None) as the store's conversion names (bf16, fp16, fp32, auto)."""
    if value is None:
        return None
    s = str(value).removeprefix("torch.").lower()
    table = {
        "auto": "auto", "bfloat16": "bf16", "bf16": "bf16", "float16": "fp16",
        "fp16": "fp16", "half": "fp16", "f16": "fp16", "float32": "fp32",
        "fp32": "fp32", "float": "fp32", "f32": "fp32",
    }
    if s not in table:
        raise ValueError(f"unknown dtype {value!r} (auto, bfloat16, float16, float32)")
    return table[s]
