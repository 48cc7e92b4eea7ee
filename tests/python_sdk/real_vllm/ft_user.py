"""A flashtensors user's script:

    python ft_user.py STORE MODEL_ID OUT.json

`ft.configure(storage_path=STORE)` (the daemon already runs there: this
connects), `ft.load_model(MODEL_ID, backend="vllm")`, greedy generations,
written to OUT.json.
"""

import sys

import common

if __name__ == "__main__":
    store, model_id, out = sys.argv[1:4]
    import flashtensors as ft

    ft.configure(storage_path=store)
    llm = ft.load_model(model_id, backend="vllm", **common.llm_args())
    common.write(out, {"generations": common.generate(llm)})
