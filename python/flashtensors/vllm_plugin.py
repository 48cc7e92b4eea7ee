"""The vLLM integration: a model loader for `load_format="flashtensors"`.

`register()` registers `FlashtensorsModelLoader` with vLLM's
`register_model_loader("flashtensors")`. It runs in this process through
`flashtensors.activate_vllm_integration()`, and in vLLM's worker processes
through the `vllm.general_plugins` entry point of this package (vLLM loads
general plugins in every process it starts).

The loader follows vLLM's `BaseModelLoader` interface: vLLM builds the model
on the GPU (`BaseModelLoader.load_model`), then `load_weights(model,
model_config)` gets the checkpoint's tensors from the flash daemon
(share mode on this worker's GPU: the daemon's GPU copy mapped through CUDA
IPC, no disk read and no host copy when the model is resident) and hands
them to the model's own `load_weights`, which fuses and shards them as for
any checkpoint. `model_config.model` is the model's folder in the store
(`load_model(backend="vllm")` passes it) or its store name.

Workers find the daemon through `FLASH_HOME`, which `configure()`/`connect()`
set for child processes.
"""

from __future__ import annotations

import os

LOAD_FORMAT = "flashtensors"
_registered = False
_cls = None


def _loader_class():
    global _cls
    if _cls is None:
        _cls = _make_loader_class()
    return _cls


def _make_loader_class():
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    class FlashtensorsModelLoader(BaseModelLoader):
        """Loads weights through the flash daemon (see the module doc)."""

        def _model_id(self, model_config) -> str:
            from . import _daemon, flash

            _ensure_connected()
            name = flash._store_model(os.fspath(model_config.model))
            if name is None:
                from ._models import resolve_model_id

                name = resolve_model_id(model_config.model)
            if _daemon.store_root() is None:
                from .errors import FlashError

                raise FlashError(
                    "the flashtensors load format needs a store: call "
                    "flashtensors.configure() (or set FLASH_HOME) before creating the LLM"
                )
            return name

        def download_model(self, model_config) -> None:
            from ._models import get_model_info
            from .errors import ModelNotFoundError

            name = self._model_id(model_config)
            if get_model_info(name) is None:
                raise ModelNotFoundError(
                    f"model {name} is not in the flashtensors store: "
                    f"flashtensors.register_model({name!r}) first"
                )

        def load_weights(self, model, model_config) -> None:
            from .flash import load_dict

            name = self._model_id(model_config)
            device = _worker_device()
            state = load_dict(name, {"": device}, copy=False)
            model.load_weights(iter(state.items()))
            # The model copied what it needs; the lease on the daemon's copy
            # ends when `state` goes.
            del state

    return FlashtensorsModelLoader


def _worker_device():
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.current_device()
    except ImportError:
        pass
    return "cpu"


def _ensure_connected() -> None:
    from . import _daemon

    if _daemon.client(required=False) is not None:
        return
    home = os.environ.get("FLASH_HOME")
    if home:
        try:
            _daemon.connect(storage_path=home)
        except Exception:
            # No daemon: the store is still read in-process.
            _daemon.state.home = _daemon.Path(home)


def register(require: bool = False):
    """Registers the "flashtensors" load format with vLLM (idempotent).
    Returns the loader class, or None when vLLM is not installed and
    `require` is False (the entry point must not break other processes)."""
    global _registered
    try:
        from vllm.model_executor.model_loader import register_model_loader
    except ImportError as e:
        if require:
            from .errors import FlashError

            raise FlashError(
                f"vLLM is not installed or too old for custom model loaders ({e}): pip install vllm"
            ) from None
        return None
    cls = _loader_class()
    if not _registered:
        register_model_loader(LOAD_FORMAT)(cls)
        _registered = True
    return cls


def load_llm(model_id: str, info: dict, dtype=None, gpu_memory_utilization=None, **kwargs):
    """A `vllm.LLM` of a stored model, loading through the daemon."""
    from .errors import FlashError

    try:
        from vllm import LLM
    except ImportError as e:
        raise FlashError(f"the vllm backend needs vLLM ({e}): pip install vllm") from None
    register(require=True)
    kwargs.setdefault("tokenizer", info["path"])
    return LLM(
        model=info["path"],
        load_format=LOAD_FORMAT,
        dtype=str(dtype).removeprefix("torch.") if dtype is not None else "auto",
        gpu_memory_utilization=0.9 if gpu_memory_utilization is None else gpu_memory_utilization,
        **kwargs,
    )
