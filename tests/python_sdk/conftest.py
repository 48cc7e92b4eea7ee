"""Fixtures of the SDK tests: the installed `flashtensors` wheel against a
real daemon on the CPU (started by `ft.configure`, stopped after each test
that used one). No torch: numpy only. The vLLM tests, real_vllm/, need vLLM
and torch: they are skipped here and run by scripts/test-vllm.sh.

Run: scripts/test-python-sdk.sh (builds and installs the wheel first).
"""

import os
import socket
import subprocess

import pytest


@pytest.fixture(scope="session")
def ft():
    import flashtensors

    # The tests must exercise the installed wheel, not the source folder.
    assert "site-packages" in flashtensors.__file__, flashtensors.__file__
    return flashtensors


@pytest.fixture(scope="session")
def flash_bin(ft):
    from flashtensors import _daemon

    return _daemon.flash_binary()


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Every test starts without a store or connection, with its own HOME
    (no test touches the user's cache) and no FLASH_HOME."""
    from flashtensors import _daemon

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FLASH_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("FLASH_NO_CUDA", "1")
    _daemon.state.client = None
    _daemon.state.home = None
    yield
    # Stop a daemon the test left running.
    home = _daemon.state.home
    try:
        if home is not None:
            _daemon.shutdown_server(storage_path=home)
    finally:
        _daemon.state.client = None
        _daemon.state.home = None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def daemon(ft, tmp_path):
    """A daemon on a fresh store (memory tier of 64 MiB, no GPU)."""
    store = tmp_path / "store"
    st = ft.configure(storage_path=str(store), mem_pool_size=64 << 20, num_threads=4,
                      use_gpu=False)
    assert st["store"] == str(store.resolve())
    yield store.resolve()


@pytest.fixture(scope="session")
def synth_qwen3(flash_bin, tmp_path_factory):
    """A synthesized tiny Qwen3 checkpoint (safetensors, config, tokenizer)."""
    d = tmp_path_factory.mktemp("synth") / "qwen3-tiny"
    r = subprocess.run([flash_bin, "-q", "synth", "qwen3", "tiny", str(d), "--seed", "7"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return d


def read_safetensors(path):
    from safetensors.numpy import load_file

    return load_file(str(path))


os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
