"""flashtensors: model weights from disk to GPU memory as fast as the hardware allows.

    import flashtensors as ft
    ft.configure(storage_path="/tmp/models")          # starts (or reuses) the daemon
    ft.register_model("Qwen/Qwen3-0.6B", backend="transformers", torch_dtype="bfloat16")
    model, tokenizer = ft.load_model("Qwen/Qwen3-0.6B", backend="transformers")

    from flashtensors import flash
    flash.save_dict(state_dict, "/models/mine")
    state_dict = flash.load_dict("/models/mine", {"": 0})

See README.md (section "Python SDK") for the whole API.
"""

from . import errors, flash
from ._daemon import configure, connect, shutdown_server, status
from ._models import (
    cleanup_gpu,
    get_model_info,
    list_models,
    load_model,
    register_model,
)
from ._native import __version__
from .errors import (
    BudgetFullError,
    DaemonNotRunningError,
    DeviceError,
    FlashError,
    FormatError,
    InvalidRequestError,
    ModelNotFoundError,
)
from .flash import load_dict, save_dict


def activate_vllm_integration() -> None:
    """Registers the "flashtensors" load format with vLLM in this process
    (vLLM's worker processes register it through the `vllm.general_plugins`
    entry point), so `vllm.LLM(model=..., load_format="flashtensors")` loads
    through the daemon."""
    from .vllm_plugin import register

    register(require=True)


__all__ = [
    "configure", "connect", "shutdown_server", "status", "register_model", "load_model",
    "save_dict", "load_dict", "list_models", "get_model_info", "cleanup_gpu",
    "activate_vllm_integration", "flash", "errors", "FlashError", "ModelNotFoundError",
    "DaemonNotRunningError", "BudgetFullError", "DeviceError", "InvalidRequestError",
    "FormatError", "__version__",
]
