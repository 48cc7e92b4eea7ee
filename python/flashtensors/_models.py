"""register_model, load_model, list_models, get_model_info, cleanup_gpu."""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import re
import sys
import time
from pathlib import Path

from . import _daemon, _dtypes, _native
from .errors import FlashError, InvalidRequestError, ModelNotFoundError

BACKENDS = ("auto", "transformers", "vllm")
_REGISTRY = "sdk-models.json"


# ---------------------------------------------------------------------------
# The SDK's notes on models (backend, dtype asked at registration), kept in
# the store folder beside models/ (the flash format has no such field).

def _registry_path() -> Path | None:
    home = _daemon.store_root()
    return Path(home) / _REGISTRY if home is not None else None


def _registry() -> dict:
    p = _registry_path()
    if p is None:
        return {}
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def _note(model_id: str, **fields) -> None:
    p = _registry_path()
    if p is None:
        return
    reg = _registry()
    reg.setdefault(model_id, {}).update(fields)
    tmp = p.with_name(f".{p.name}.{os.getpid()}")
    tmp.write_text(json.dumps(reg, indent=1, sort_keys=True))
    os.replace(tmp, p)


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise InvalidRequestError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    return backend


_SANITIZE = re.compile(r"[^A-Za-z0-9._-]+")


def resolve_model_id(model_id) -> str:
    """A store name for `model_id`: itself (ORG/NAME[:REV]), or `local/<name>`
    for a path to a local folder."""
    s = os.fspath(model_id)
    p = Path(s).expanduser()
    if p.is_dir():
        leaf = _SANITIZE.sub("-", p.resolve().name).strip(".-") or "model"
        return f"local/{leaf}"
    return s


def _require_store():
    if _daemon.store_root() is None:
        raise FlashError("no store configured: call flashtensors.configure(...) first")


# ---------------------------------------------------------------------------

def register_model(model_id, backend: str = "auto", torch_dtype=None, force: bool = False,
                   hf_token: str | None = None, *, compress: bool | None = None) -> dict:
    """Puts a model into the store: a Hub repository (ORG/NAME[:REVISION],
    downloaded into the Hugging Face cache, then imported) or a local
    Hugging Face style folder (imported as `local/<folder name>`).

    `torch_dtype`: convert floating-point weights at import ("bfloat16",
    "float16", "float32"; None/"auto" keeps them). `force`: replace a stored
    model. `compress`: store floating-point weights compressed (lossless,
    decoded on the GPU while loading; None: the store's setting, `flash
    config compress`, by default on where an NVIDIA GPU is present). Returns `{"status": "registered"|"exists", "model_id", "backend",
    "path", "metrics": {"download_time", "transform_time", "register_time",
    "model_size"}}` (times in seconds, size in bytes).
    """
    t0 = time.perf_counter()
    _check_backend(backend)
    _require_store()
    dtype = _dtypes.parse_torch_dtype(torch_dtype) or "auto"
    name = resolve_model_id(model_id)
    local = Path(os.fspath(model_id)).expanduser()
    c = _daemon.client(required=False)
    home = str(_daemon.store_root())
    existing = get_model_info(name)
    download = transform = 0.0
    if existing is not None and not force:
        status = "exists"
        path, size = existing["path"], existing["size"]
    else:
        if local.is_dir():
            src = local.resolve()
        else:
            t = time.perf_counter()
            src, _commit, _bytes = _native.hub_snapshot(name, hf_token)
            download = time.perf_counter() - t
        t = time.perf_counter()
        if c is not None:
            rep = json.loads(c.pull(name, str(src), None, dtype, force, compress))
        else:
            rep = json.loads(_native.store_import(home, str(src), name, dtype, force, compress))
        transform = time.perf_counter() - t
        status = "registered"
        # The model's size is its tensors' decoded bytes (as get_model_info
        # reports it), whatever its files take on disk.
        path, size = rep["path"], rep.get("tensor_bytes") or rep["bytes"]
    _note(name, backend=backend, torch_dtype=None if dtype == "auto" else dtype)
    return {
        "status": status,
        "model_id": name,
        "backend": backend,
        "path": str(path),
        "metrics": {
            "download_time": download,
            "transform_time": transform,
            "register_time": time.perf_counter() - t0,
            "model_size": size,
        },
    }


def _info_dict(raw: dict, reg: dict) -> dict:
    name = raw.get("model_id") or raw.get("model")
    note = reg.get(name, {})
    return {
        "model_id": name,
        "backend": note.get("backend", "auto"),
        "size": int(raw.get("size", 0)),
        "stored_bytes": int(raw.get("stored_bytes", 0) or raw.get("size", 0)),
        "compressed": bool(raw.get("compressed", False)),
        "ranks": int(raw.get("ranks", 1) or 1),
        "path": str(raw.get("path", "")),
        "dtype": raw.get("dtype") or None,
        "architecture": raw.get("architecture") or None,
        "tensor_count": int(raw.get("tensor_count", 0)),
        "tiers": list(raw.get("tiers", [])),
    }


def list_models() -> dict:
    """`{model_id: info}` of every model in the store (see `get_model_info`)."""
    _require_store()
    c = _daemon.client(required=False)
    reg = _registry()
    if c is not None:
        models = json.loads(c.list())
    else:
        models = json.loads(_native.store_list(str(_daemon.store_root())))
    out = {}
    for m in models:
        info = _info_dict(m, reg)
        out[info["model_id"]] = info
    return out


def get_model_info(model_id) -> dict | None:
    """`{"model_id", "backend", "size" (bytes, decoded), "stored_bytes" (on
    disk), "compressed", "ranks", "path", "dtype", "architecture",
    "tensor_count", "tiers"}`, or None when the model is not in the store."""
    _require_store()
    name = resolve_model_id(model_id)
    c = _daemon.client(required=False)
    try:
        raw = c.info(name) if c is not None else _native.store_info(str(_daemon.store_root()), name)
    except InvalidRequestError:
        return None  # not a valid model name: not in the store either
    if raw is None:
        return None
    return _info_dict(json.loads(raw), _registry())


def _auto_backend() -> str:
    if importlib.util.find_spec("vllm") is not None and _native.cuda_devices()[0] > 0:
        return "vllm"
    return "transformers"


def load_model(model_id, backend: str | None = None, dtype=None,
               gpu_memory_utilization: float | None = None, device_map=None, **kwargs):
    """Loads a registered model ready to generate.

    - backend "transformers": returns `(model, tokenizer)`; the model is built
      on the meta device (no random init, no second copy) and its parameters
      are the tensors the daemon serves (`device_map` as in `load_dict`;
      default GPU 0 when there is one, else host memory).
    - backend "vllm": returns a `vllm.LLM` loading through the
      "flashtensors" load format (`activate_vllm_integration`).
    - backend None / "auto": the backend given at registration; "auto" picks
      vLLM when it is installed and a GPU is present, else transformers.
    """
    _require_store()
    name = resolve_model_id(model_id)
    info = get_model_info(name)
    if info is None:
        raise ModelNotFoundError(
            f"model {name} is not in the store {_daemon.store_root()}: register it with "
            f"flashtensors.register_model({name!r})"
        )
    if backend is None:
        backend = info["backend"]
    backend = _check_backend(backend)
    if backend == "auto":
        backend = _auto_backend()
    if backend == "transformers":
        from . import transformers_backend

        return transformers_backend.load(name, info, dtype=dtype, device_map=device_map, **kwargs)
    from . import vllm_plugin

    return vllm_plugin.load_llm(name, info, dtype=dtype,
                                gpu_memory_utilization=gpu_memory_utilization, **kwargs)


def cleanup_gpu() -> dict:
    """Frees what this process holds: drops unreferenced tensors (and with
    them their daemon leases) and empties torch's CUDA cache. The daemon's
    tiers are left as they are (other processes may use them; see
    `flash unload`). Returns `{"collected": objects, "cuda_cache_emptied": bool}`."""
    collected = gc.collect()
    emptied = False
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        emptied = True
    return {"collected": collected, "cuda_cache_emptied": emptied}
