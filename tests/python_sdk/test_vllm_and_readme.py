"""The vLLM integration where vLLM is not installed (the SDK's numpy
suite): the entry point is declared and stays quiet, and the version range
logic. The integration itself, and the seed README's vLLM example, run
against the real vLLM (its CPU build) in real_vllm/, by scripts/test-vllm.sh.
And the seed README's custom-model example, with numpy."""

import importlib.metadata

import numpy as np
import pytest


def test_entry_point_is_declared(ft):
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    ours = [e for e in eps if e.name == "flashtensors"]
    assert ours and ours[0].value == "flashtensors.vllm_plugin:register"


def test_register_without_vllm_is_quiet(ft):
    from flashtensors import vllm_plugin

    assert vllm_plugin.register() is None  # the entry point never breaks a process
    with pytest.raises(ft.FlashError, match="vLLM is not installed"):
        ft.activate_vllm_integration()
    assert vllm_plugin.vllm_version() is None


def test_tested_vllm_range(ft):
    from flashtensors import vllm_plugin

    assert vllm_plugin.is_tested_version("0.32.0")
    assert vllm_plugin.is_tested_version("0.32.4.dev1+gabcdef")
    for v in ("0.31.2", "0.33.0", "1.0", "dev", ""):
        assert not vllm_plugin.is_tested_version(v), v


def test_seed_readme_custom_model_example_with_numpy(ft, tmp_path):
    # The README's custom-model example uses torch (tests/gpu runs it as
    # written); here the same calls with a numpy state dict on the CPU.
    from flashtensors import flash

    state_dict = {"weight": np.random.default_rng(0).standard_normal((3, 3)).astype(np.float32)}
    flash.save_dict(state_dict, str(tmp_path / "your-model-folder"))
    device_map = {"": "cpu"}
    new_state_dict = flash.load_dict(str(tmp_path / "your-model-folder"), device_map)
    np.testing.assert_array_equal(new_state_dict["weight"], state_dict["weight"])
