"""The torch half of the synth compatibility tests, run on the GPU machine
(torch is installed there, not in CI) by bench/device.sh:

    FLASH_SYNTH_DIR=/tmp/qwen3-tiny:/tmp/llama-tiny pytest tests/gpu

transformers builds the synthesized configs with the same shapes, loads the
checkpoints with no missing or unexpected keys, and generates.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
from test_synth_compat import MESSAGES, expected_shapes, load_json, model_dir, shard_files  # noqa: E402,F401


def test_from_config_builds_the_same_shapes(model_dir):
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    built = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        built.pop("lm_head.weight", None)
    assert built == expected_shapes(load_json(model_dir / "config.json"))


def test_from_pretrained_loads_and_generates(model_dir):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = load_json(model_dir / "config.json")
    if cfg["hidden_size"] > 256:
        pytest.skip("only tiny checkpoints are run")
    model, info = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    # The weights are the file's.
    from safetensors import safe_open
    params = dict(model.named_parameters())
    for f in shard_files(model_dir):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                assert torch.equal(params[name].detach(), st.get_tensor(name).float()), name
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    inputs = tok.apply_chat_template(MESSAGES, add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    with torch.no_grad():
        logits = model(**inputs).logits
        assert logits.shape[-1] == cfg["vocab_size"]
        assert torch.isfinite(logits).all()
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    n = inputs["input_ids"].shape[1]
    assert n < out.shape[1] <= n + 4
