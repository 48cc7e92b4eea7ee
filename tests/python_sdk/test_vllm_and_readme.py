"""The vLLM integration against a stand-in of vLLM's loader interface
(fake_vllm/: vLLM is not installed here), and the seed README's examples
run as written, adapted only where a model must be synthesized (no network:
the model is a synthesized tiny Qwen3 folder) and where vLLM is the stand-in."""

import importlib.metadata
import json

import numpy as np
import pytest

from conftest import free_port


def test_entry_point_is_declared(ft):
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    ours = [e for e in eps if e.name == "flashtensors"]
    assert ours and ours[0].value == "flashtensors.vllm_plugin:register"


def test_register_without_vllm_is_quiet(ft):
    from flashtensors import vllm_plugin

    assert vllm_plugin.register() is None  # the entry point never breaks a process
    with pytest.raises(ft.FlashError, match="vLLM"):
        ft.activate_vllm_integration()


def test_loader_registration_and_interface(ft, fake_vllm):
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader
    from vllm.config import LoadConfig

    ep = [e for e in importlib.metadata.entry_points(group="vllm.general_plugins")
          if e.name == "flashtensors"][0]
    cls = ep.load()()  # what vLLM does in each process
    assert issubclass(cls, BaseModelLoader)
    ft.activate_vllm_integration()  # idempotent
    loader = get_model_loader(LoadConfig(load_format="flashtensors"))
    assert type(loader) is cls
    for method in ("download_model", "load_weights"):
        assert method in cls.__dict__, method


def test_llm_loads_through_the_daemon(ft, daemon, synth_qwen3, fake_vllm):
    ft.activate_vllm_integration()
    ft.register_model(str(synth_qwen3), backend="vllm")
    llm = ft.load_model(str(synth_qwen3), backend="vllm", dtype="bfloat16",
                        gpu_memory_utilization=0.5)
    info = ft.get_model_info(str(synth_qwen3))
    assert llm.kwargs["load_format"] == "flashtensors"
    assert llm.kwargs["model"] == info["path"]
    assert llm.kwargs["dtype"] == "bfloat16" and llm.kwargs["gpu_memory_utilization"] == 0.5
    header = _header(synth_qwen3 / "model.safetensors")
    assert set(llm.model.weights) == set(header)
    # The weights came from the daemon's memory tier.
    mem = next(t for t in ft.status()["tiers"] if t["tier"] == "memory")
    assert [m["model"] for m in mem["models"]] == ["local/qwen3-tiny"]
    # An unregistered model fails in download_model with a clear error.
    import vllm

    with pytest.raises(ft.ModelNotFoundError, match="register_model"):
        vllm.LLM(model="nobody/nothing", load_format="flashtensors")


def _header(path):
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    h = json.loads(data[8:8 + n])
    h.pop("__metadata__", None)
    return h


def test_seed_readme_vllm_example(ft, synth_qwen3, fake_vllm, tmp_path, capsys):
    # ---- the README's example, as written, except: the model is a
    # synthesized folder, the stand-in vLLM, the store under tmp_path, and a
    # free loopback port for the TCP listener.
    import time

    from vllm import SamplingParams

    ft.shutdown_server()  # Ensure any existing server is shut down

    ft.configure(
        storage_path=str(tmp_path / "models"),   # Where models will be stored
        mem_pool_size=1024**2*64,                # (64 MiB here)
        chunk_size=1024**2*32,                   # 32MB chunks
        num_threads=4,                           # Number of threads
        gpu_memory_utilization=0.8,             # Use 80% of GPU memory
        server_host="127.0.0.1",                # gRPC server host
        server_port=free_port()                 # gRPC server port
    )

    ft.activate_vllm_integration()

    model_id = str(synth_qwen3)

    result = ft.register_model(
        model_id=model_id,
        backend="vllm",
        torch_dtype="bfloat16",
        force=False,
        hf_token=None
    )
    assert result["status"] == "registered"

    load_start_time = time.time()
    llm = ft.load_model(
        model_id=model_id,
        backend="vllm",
        dtype="bfloat16",
        gpu_memory_utilization=0.8
    )
    load_time = time.time() - load_start_time
    print(f"Model loaded successfully with fast loading in {load_time:.2f}s")

    prompts = [
        "Hello, my name is",
        "The capital of France is",
        "The future of AI is",
    ]
    sampling_params = SamplingParams(temperature=0.1, top_p=0.95, max_tokens=50)
    outputs = llm.generate(prompts, sampling_params)
    for output in outputs:
        prompt = output.prompt
        generated_text = output.outputs[0].text
        print(f"   Prompt: {prompt!r}")
        print(f"   Generated: {generated_text!r}")

    ft.cleanup_gpu()

    info = ft.get_model_info(model_id)
    if info:
        print(f"   Model ID: {info['model_id']}")
        print(f"   Backend: {info['backend']}")
        print(f"   Size: {info['size'] / (1024**3):.2f} GB")
        print(f"   Ranks: {info['ranks']}")

    models = ft.list_models()
    for model_key, model_info in models.items():
        print(f"   {model_key}: {model_info['size'] / (1024**3):.2f} GB")
    # ---- end of the example
    out = capsys.readouterr().out
    assert "Prompt: 'The capital of France is'" in out
    assert "Backend: vllm" in out and "Ranks: 1" in out
    assert "local/qwen3-tiny: 0.00 GB" in out


def test_seed_readme_custom_model_example_with_numpy(ft, tmp_path):
    # The README's custom-model example uses torch (tests/gpu runs it as
    # written); here the same calls with a numpy state dict on the CPU.
    from flashtensors import flash

    state_dict = {"weight": np.random.default_rng(0).standard_normal((3, 3)).astype(np.float32)}
    flash.save_dict(state_dict, str(tmp_path / "your-model-folder"))
    device_map = {"": "cpu"}
    new_state_dict = flash.load_dict(str(tmp_path / "your-model-folder"), device_map)
    np.testing.assert_array_equal(new_state_dict["weight"], state_dict["weight"])
