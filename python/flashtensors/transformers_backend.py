"""load_model(backend="transformers"): a transformers model whose weights
are the tensors flashtensors loaded, with no second copy and no random init.

The model is built with its parameters on the meta device (the way
`accelerate.init_empty_weights(include_buffers=False)` does: each parameter
is moved to "meta" as it is registered, so initialisers run on meta tensors
and cost nothing; small buffers such as rotary frequencies are computed
normally). Then `load_state_dict(..., assign=True)` makes the loaded tensors
the parameters, tied weights are tied, and buffers move to the device.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib
import importlib.util
import logging
import sys
import time
import types
from pathlib import Path

from .errors import FlashError, InvalidRequestError

_log = logging.getLogger("flashtensors")


@contextlib.contextmanager
def _params_on_meta():
    import torch
    from torch import nn

    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            kwargs = {"requires_grad": param.requires_grad}
            cls = type(module._parameters[name])
            module._parameters[name] = cls(module._parameters[name].to("meta"), **kwargs)

    nn.Module.register_parameter = register
    try:
        with torch.device("cpu"):
            yield
    finally:
        nn.Module.register_parameter = original


# Modules that transformers imports, where they are installed, while a
# model class is built, for functions that no model build calls (module ->
# names). Measured on the CI machine (`bench/first_load.py imports`), of
# 2.7-2.9 s building a Qwen3-8B on the meta device: scikit-learn 0.6-1.2 s
# (`roc_curve`, which assisted generation calls to tune its threshold) and
# scipy.optimize 0.4 s (`linear_sum_assignment`, for object detection
# losses). Everything else transformers imports there defines classes or
# tables at import time, and is imported as usual.
_DEFERRED = {
    "sklearn.metrics": ("roc_curve",),
    "scipy.optimize": ("linear_sum_assignment",),
}


class _DeferredModule(types.ModuleType):
    """Stands for a module in `sys.modules` while transformers imports: a
    name of `_DEFERRED` is a function that imports the real module on its
    first call; any other name imports the real module at once."""

    def __init__(self, name, names):
        super().__init__(name)
        self._deferred_names = names

    def __getattr__(self, name):
        if name.startswith("__"):
            # What the import system asks of a module (`__path__`): as a
            # plain module without it.
            raise AttributeError(name)
        if name not in self._deferred_names:
            _drop_stand_in(self.__name__, self)
            return getattr(importlib.import_module(self.__name__), name)
        module = self.__name__

        def deferred(*args, **kwargs):
            return getattr(importlib.import_module(module), name)(*args, **kwargs)

        deferred.__name__ = deferred.__qualname__ = name
        deferred.__doc__ = f"{module}.{name}, imported on its first call (flashtensors)."
        return deferred


def _drop_stand_in(name, module):
    if sys.modules.get(name) is module:
        del sys.modules[name]


@contextlib.contextmanager
def _deferred_imports():
    """While it lasts, importing a module of `_DEFERRED` that is installed
    but not yet imported gives a [`_DeferredModule`]; after it, the real
    module imports as usual (the stand-ins leave `sys.modules`)."""
    stand_ins = {}
    for name, names in _DEFERRED.items():
        if name in sys.modules:
            continue
        top = name.split(".", 1)[0]
        try:
            # Not find_spec(name): it would import the package `top`.
            installed = top in sys.modules or importlib.util.find_spec(top) is not None
        except (ImportError, ValueError):
            installed = False
        if installed:
            stand_ins[name] = sys.modules[name] = _DeferredModule(name, names)
    try:
        yield
    finally:
        for name, module in stand_ins.items():
            _drop_stand_in(name, module)


def _torch_dtype(torch, value):
    if value is None or value == "auto":
        return None
    if isinstance(value, torch.dtype):
        return value
    s = str(value).removeprefix("torch.").lower()
    alias = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
             "float": "float32", "f32": "float32", "f16": "float16"}
    dt = getattr(torch, alias.get(s, s), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise InvalidRequestError(f"unknown dtype {value!r} (bfloat16, float16, float32)")
    return dt


def _single_device(torch, device_map):
    if device_map is None or device_map == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(device_map, dict):
        if set(device_map) != {""}:
            raise InvalidRequestError(
                "the transformers backend places the whole model on one device: "
                "device_map must be {'': N}, {'': 'cpu'} or 'auto'"
            )
        device_map = device_map[""]
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    return torch.device(device_map)


def _from_config(transformers, config, dtype, trust_remote_code):
    from transformers import AutoModelForCausalLM

    major = int(transformers.__version__.split(".")[0])
    kw = {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}
    if trust_remote_code:
        kw["trust_remote_code"] = True
    return AutoModelForCausalLM.from_config(config, **kw)


def _target_dtype(torch, config, dtype, state=None):
    """The parameters' dtype: `dtype`, else the config's, else the most
    common floating dtype of `state` (None when that is needed but absent)."""
    target = _torch_dtype(torch, dtype)
    if target is None:
        cfg_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        target = _torch_dtype(torch, cfg_dtype) if cfg_dtype is not None else None
    if target is None and state is not None:
        floats = [t.dtype for t in state.values() if t.is_floating_point()]
        target = max(set(floats), key=floats.count) if floats else torch.float32
    return target


def skeleton(folder, dtype=None, trust_remote_code: bool = False, state=None):
    """The model of the config in `folder` with its parameters on the meta
    device, and their dtype. Needs `state` only when neither `dtype` nor the
    config names one."""
    import torch
    import transformers
    from transformers import AutoConfig

    with _deferred_imports():
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        target = _target_dtype(torch, config, dtype, state)
        if target is None:
            return None, None
        with _params_on_meta():
            model = _from_config(transformers, config, target, trust_remote_code)
    return model, target


def assign(folder, model, target, state: dict, device=None):
    """Makes the tensors of `state` the parameters of `model` (a
    [`skeleton`]; assigned, not copied; converted only where `target`
    differs). Returns the model in eval mode."""
    import torch
    import transformers

    if device is None:
        device = next(iter(state.values())).device if state else torch.device("cpu")
    cache, out = {}, {}
    for name, t in state.items():
        if t.is_floating_point() and t.dtype != target:
            if id(t) not in cache:
                cache[id(t)] = t.to(target)
            t = cache[id(t)]
        out[name] = t
    state = out
    result = model.load_state_dict(state, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise FlashError(
            f"{folder}: the checkpoint lacks {len(missing)} parameter(s) of "
            f"{type(model).__name__}: {', '.join(missing[:8])}"
            + (" ..." if len(missing) > 8 else "")
        )
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        import warnings

        warnings.warn(
            f"{folder}: {len(unexpected)} tensor(s) of the checkpoint are not parameters of "
            f"{type(model).__name__} and were ignored: {', '.join(unexpected[:8])}",
            stacklevel=3,
        )
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.device != device:
                module._buffers[name] = buf.to(device)
    gen = Path(folder) / "generation_config.json"
    if gen.is_file():
        try:
            model.generation_config = transformers.GenerationConfig.from_pretrained(folder)
        except Exception:  # a malformed generation config is not worth failing the load
            pass
    model.eval()
    return model


def _tokenizer(folder, trust_remote_code):
    from transformers import AutoTokenizer

    if any((Path(folder) / f).exists() for f in
           ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")):
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    return None


def load(model_id: str, info: dict, dtype=None, device_map=None, copy: bool = False,
         trust_remote_code: bool = False, **_ignored):
    """`(model, tokenizer)` of a stored model (see the module doc)."""
    # Only whether transformers is installed: importing its model and
    # tokenizer stacks takes seconds, and happens below while the weights
    # already stream in on the other thread.
    try:
        import torch
    except ImportError as e:
        raise FlashError(
            f"the transformers backend needs torch and transformers ({e}): "
            "pip install 'flashtensors[transformers]'"
        ) from None
    if importlib.util.find_spec("transformers") is None:
        raise FlashError(
            "the transformers backend needs torch and transformers (no module named "
            "'transformers'): pip install 'flashtensors[transformers]'"
        )
    from .flash import load_dict

    device = _single_device(torch, device_map)
    dm = {"": "cpu"} if device.type == "cpu" else {"": device.index or 0}
    folder = info["path"]
    # The weights come from the daemon (upload to the GPU, IPC mapping) on a
    # thread with the GIL released, while this one builds the model on the
    # meta device and reads the tokenizer: the three overlap.
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="flash-load") as pool:
        weights = pool.submit(_timed, load_dict, model_id, dm, copy=copy, framework="torch")
        try:
            model, target = skeleton(folder, dtype, trust_remote_code)
            t_model = time.perf_counter() - t0
            tokenizer = _tokenizer(folder, trust_remote_code)
            t_tok = time.perf_counter() - t0 - t_model
        finally:
            state, t_weights = weights.result()
    t_wait = time.perf_counter() - t0
    if model is None:  # no dtype named anywhere: the checkpoint's decides
        model, target = skeleton(folder, dtype, trust_remote_code, state)
    model = assign(folder, model, target, state, device)
    _log.debug(
        "load_model %s (transformers): weights %.3f s on a thread, beside: model on meta %.3f s, "
        "tokenizer %.3f s; both done %.3f s; assign %.3f s",
        model_id, t_weights, t_model, t_tok, t_wait, time.perf_counter() - t0 - t_wait)
    return model, tokenizer


def _timed(f, *args, **kwargs):
    t = time.perf_counter()
    out = f(*args, **kwargs)
    return out, time.perf_counter() - t
