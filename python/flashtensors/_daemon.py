"""The connection to the flash daemon: configure(), connect(), shutdown_server().

The daemon (`flash start`) owns the store and the memory tiers (host memory,
GPU memory); this process talks to it through the Rust client
(`_native.Client`, gRPC over the Unix socket `<store>/flash.sock`).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import threading
import time
from pathlib import Path

from . import _native
from .errors import DaemonNotRunningError, FlashError

_lock = threading.RLock()


class _State:
    home: Path | None = None
    client = None  # _native.Client
    config: dict = {}


state = _State()


def default_home() -> Path:
    """`$FLASH_HOME`, else `<user cache>/flashtensors` (as the `flash` CLI)."""
    env = os.environ.get("FLASH_HOME", "").strip()
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(cache) if cache else Path.home() / ".cache"
    return base / "flashtensors"


def flash_binary() -> str:
    """The `flash` binary: `$FLASH_BIN`, the one bundled in the wheel, or PATH."""
    env = os.environ.get("FLASH_BIN")
    if env:
        return env
    bundled = Path(__file__).parent / "bin" / "flash"
    if bundled.is_file() and os.access(bundled, os.X_OK):
        return str(bundled)
    found = shutil.which("flash")
    if found:
        return found
    raise FlashError(
        "the flash binary is not bundled in this installation and not on PATH: "
        "build the wheel with python/build_wheel.sh (or `cargo build --release -p flash-cli` "
        "and set FLASH_BIN)"
    )


def store_root() -> Path | None:
    """The store this process works with: the configured or connected one."""
    return state.home


def client(required: bool = True):
    """The connected client, or None (or an error when `required`)."""
    c = state.client
    if c is not None and not c.closed:
        return c
    if required:
        raise DaemonNotRunningError(
            "not connected to a flash daemon: call flashtensors.configure(...) "
            "(starts one) or flashtensors.connect(...)"
        )
    return None


def _size(v) -> str | None:
    if v is None:
        return None
    if isinstance(v, str):
        return v
    return str(int(v))


def _start_args(home: Path, cfg: dict, timeout: float) -> list[str]:
    args = [flash_binary(), "--storage", str(home), "-q", "start", "--wait", str(max(1, int(timeout)))]
    if cfg.get("mem_pool_size") is not None:
        args += ["--mem-pool", _size(cfg["mem_pool_size"])]
    if cfg.get("gpu_memory_utilization") is not None:
        args += ["--gpu-mem-util", str(float(cfg["gpu_memory_utilization"]))]
    if cfg.get("num_threads"):
        args += ["--threads", str(int(cfg["num_threads"]))]
    if cfg.get("chunk_size"):
        args += ["--chunk-size", _size(cfg["chunk_size"])]
    if cfg.get("server_port"):
        args += ["--host", str(cfg.get("server_host") or "127.0.0.1"),
                 "--port", str(int(cfg["server_port"]))]
    args += ["--http", cfg.get("metrics_addr") or "off"]
    if cfg.get("use_gpu") is False:
        args.append("--no-gpu")
    return args


def _connect_socket(home: Path):
    return _native.Client(str(home))


def configure(
    storage_path: str | os.PathLike | None = None,
    mem_pool_size: int | None = None,
    chunk_size: int | None = None,
    num_threads: int | None = None,
    gpu_memory_utilization: float | None = 0.9,
    server_host: str | None = None,
    server_port: int | None = None,
    *,
    use_gpu: bool | None = None,
    metrics_addr: str | None = None,
    timeout: float = 180.0,
) -> dict:
    """Starts the flash daemon on the store at `storage_path` (created if
    needed), or connects to the one already running there: a running daemon
    is reused as it is (its settings are kept; `shutdown_server()` first to
    change them). Returns the daemon's status.

    - `mem_pool_size`: bytes of the host-memory tier (None: the daemon's default).
    - `chunk_size`, `num_threads`: read size and reader threads of its loads
      (None: the daemon's defaults, 512 KiB reads and one reader per core,
      4 to 16).
    - `gpu_memory_utilization`: the share of each GPU's memory its GPU tier may use.
    - `server_host`, `server_port`: also listen on TCP there (token in
      `<store>/daemon.token`); this process always talks over the Unix socket.
    - `use_gpu=False`: memory tier only; `metrics_addr`: serve /metrics there
      (default: off, so that several daemons never compete for a port).
    """
    home = Path(storage_path).expanduser().resolve() if storage_path else default_home()
    cfg = dict(
        mem_pool_size=mem_pool_size, chunk_size=chunk_size, num_threads=num_threads,
        gpu_memory_utilization=gpu_memory_utilization, server_host=server_host,
        server_port=server_port, use_gpu=use_gpu, metrics_addr=metrics_addr,
    )
    with _lock:
        if state.client is not None and state.home != home:
            state.client.close()
            state.client = None
        home.mkdir(parents=True, exist_ok=True)
        if _native.daemon_running(str(home)):
            state.client = _connect_socket(home)
            state.home = home
            state.config = cfg
            os.environ["FLASH_HOME"] = str(home)  # for child processes (vLLM workers)
            return status()
        args = _start_args(home, cfg, timeout)
        try:
            r = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               timeout=timeout + 30)
        except subprocess.TimeoutExpired:
            raise FlashError(f"`flash start` did not return within {timeout:.0f} s") from None
        if r.returncode != 0 and not _native.daemon_running(str(home)):
            raise FlashError(
                f"the flash daemon did not start on {home}: "
                f"{(r.stderr or r.stdout).strip()}\n(command: {' '.join(args)})"
            )
        state.client = _connect_socket(home)
        state.home = home
        state.config = cfg
        os.environ["FLASH_HOME"] = str(home)  # for child processes (vLLM workers)
        return status()


def connect(
    storage_path: str | os.PathLike | None = None,
    server_host: str | None = None,
    server_port: int | None = None,
    token: str | None = None,
) -> dict:
    """Connects to a running daemon without starting one: through the Unix
    socket of the store at `storage_path`, or over TCP at `server_host:server_port`
    with `token` (default: read from `<store>/daemon.token`). Raises
    DaemonNotRunningError when none answers."""
    with _lock:
        if server_port:
            host = server_host or "127.0.0.1"
            if token is None:
                home = Path(storage_path).expanduser() if storage_path else default_home()
                try:
                    token = (home / "daemon.token").read_text().strip()
                except OSError as e:
                    raise FlashError(
                        f"no token given and {home / 'daemon.token'} cannot be read: {e}"
                    ) from None
            c = _native.Client.tcp(f"{host}:{int(server_port)}", token)
        else:
            home = Path(storage_path).expanduser().resolve() if storage_path else default_home()
            c = _connect_socket(home)
        if state.client is not None:
            state.client.close()
        state.client = c
        st = status()
        state.home = Path(st["store"]) if st.get("store") else None
        if state.home is not None:
            os.environ["FLASH_HOME"] = str(state.home)
        return st


def status() -> dict:
    """The daemon's status: version, tiers with budgets and use, resident models."""
    import json

    return json.loads(client().status())


def shutdown_server(storage_path: str | os.PathLike | None = None, timeout: float = 60.0) -> bool:
    """Stops the daemon this process is connected to (or the one of
    `storage_path`, or of the default store) and waits until it is gone.
    Returns False when no daemon was running (no error)."""
    with _lock:
        c = client(required=False)
        if storage_path is not None:
            home = Path(storage_path).expanduser().resolve()
            if state.home != home:
                c = None
        else:
            home = state.home if c is not None else default_home()
        if c is None:
            if home is None or not _native.daemon_running(str(home)):
                return False
            c = _connect_socket(home)
        try:
            c.shutdown()
        except DaemonNotRunningError:
            return False
        finally:
            c.close()
            if c is state.client:
                state.client = None
        deadline = time.monotonic() + timeout
        while home is not None and _native.daemon_running(str(home)):
            if time.monotonic() > deadline:
                raise FlashError(f"the flash daemon of {home} did not stop within {timeout:.0f} s")
            time.sleep(0.05)
        return True


def _atexit():  # pragma: no cover - interpreter exit
    c = state.client
    if c is not None:
        try:
            c.close()
        except Exception:
            pass


import atexit  # noqa: E402

atexit.register(_atexit)
