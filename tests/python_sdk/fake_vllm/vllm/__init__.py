"""A minimal stand-in for vLLM (not installed on CI or the GPU machine).

It mimics only the interface flashtensors relies on, as vLLM defines it:
`vllm.model_executor.model_loader.register_model_loader(name)` (a class
decorator) and `get_model_loader(load_config)`, `BaseModelLoader(load_config)`
with `download_model(model_config)` and `load_weights(model, model_config)`,
whose `load_model` builds the model and calls `load_weights`, and
`LLM(model=..., load_format=..., dtype=..., gpu_memory_utilization=...)`,
which loads through the loader of its load format and has `generate`.
The model here records the weights `load_weights` hands it.
"""

from dataclasses import dataclass

from vllm.model_executor.model_loader import get_model_loader
from vllm.config import LoadConfig, ModelConfig


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16


@dataclass
class CompletionOutput:
    text: str


@dataclass
class RequestOutput:
    prompt: str
    outputs: list


class LLM:
    def __init__(self, model, load_format="auto", dtype="auto", gpu_memory_utilization=0.9,
                 tokenizer=None, **kwargs):
        self.kwargs = dict(model=model, load_format=load_format, dtype=dtype,
                           gpu_memory_utilization=gpu_memory_utilization, tokenizer=tokenizer,
                           **kwargs)
        loader = get_model_loader(LoadConfig(load_format=load_format))
        config = ModelConfig(model=model, dtype=dtype)
        loader.download_model(config)
        self.model = loader.load_model(vllm_config=None, model_config=config)
        self.loader = loader

    def generate(self, prompts, sampling_params=None):
        n = len(self.model.weights)
        return [RequestOutput(p, [CompletionOutput(f" [{n} tensors loaded]")]) for p in prompts]
