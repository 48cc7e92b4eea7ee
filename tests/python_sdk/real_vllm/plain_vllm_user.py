"""A vLLM user's script that never imports flashtensors:

    python plain_vllm_user.py MODEL LOAD_FORMAT OUT.json

`vllm.LLM(model=MODEL, load_format=LOAD_FORMAT)` and greedy generations,
written to OUT.json. With LOAD_FORMAT "flashtensors" and MODEL a model's
folder in a flash store, vLLM finds the loader through flashtensors'
`vllm.general_plugins` entry point alone (in this process and in the engine
and worker processes it starts); with "safetensors" this is the reference.
The guard: vLLM starts its processes with spawn, which imports this file.
"""

import sys

import common

if __name__ == "__main__":
    model, load_format, out = sys.argv[1:4]
    from vllm import LLM

    before = common.modules_seen()
    assert not before["flashtensors_imported"], "this script must not import flashtensors"
    llm = LLM(model=model, load_format=load_format, **common.llm_args())
    result = {"generations": common.generate(llm), "before_llm": before,
              "after_llm": common.modules_seen()}
    common.write(out, result)
