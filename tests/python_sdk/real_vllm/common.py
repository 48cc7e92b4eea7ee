"""What every generation of the vLLM tests shares: prompts, greedy
sampling, the engine's settings for a short run on a few CPU cores, and
what a run reports. Imports neither vLLM nor flashtensors at module level
(the scripts that use it decide what they import, and when)."""

import json
import os
import sys

PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "The future of AI is",
]
MAX_TOKENS = 16
LOGPROBS = 5
# vLLM on the CPU, kept short: no torch.compile, a small context.
LLM_ARGS = dict(enforce_eager=True, max_model_len=256, max_num_seqs=4, dtype="bfloat16",
                seed=0)
# Runs whose point is not vLLM's processes (the reference, the README
# example) keep the engine and the worker in the script's process: about a
# minute less on two cores. The test sets this and VLLM_ENABLE_V1_MULTIPROCESSING=0.
ONE_PROCESS = os.environ.get("FT_VLLM_TEST_ONE_PROCESS") == "1"


def llm_args(**overrides) -> dict:
    args = dict(LLM_ARGS, **overrides)
    if ONE_PROCESS:
        args["distributed_executor_backend"] = "uni"
    return args


def generate(llm) -> list:
    """Greedy generations: per prompt its token ids, text and, per step, the
    LOGPROBS best tokens' logprobs (which every weight feeds into)."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=LOGPROBS,
                            ignore_eos=True)
    out = []
    for o in llm.generate(PROMPTS, params):
        c = o.outputs[0]
        out.append({
            "prompt": o.prompt,
            "token_ids": list(c.token_ids),
            "text": c.text,
            "logprobs": [{str(t): lp.logprob for t, lp in step.items()}
                         for step in (c.logprobs or [])],
        })
    return out


def write(path: str, result: dict) -> None:
    with open(path, "w") as f:
        json.dump(result, f)


def modules_seen() -> dict:
    return {"flashtensors_imported": "flashtensors" in sys.modules,
            "plugin_imported": "flashtensors.vllm_plugin" in sys.modules}
