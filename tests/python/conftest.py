"""Shared fixtures of the Python compatibility tests.

`FLASH_BIN` must name the flash binary (`cargo build -p flash-cli`, then
`FLASH_BIN=$PWD/target/debug/flash pytest tests/python`); without it every
test that needs the binary fails with a message saying so (nothing is skipped).
"""

import json
import os
import subprocess
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def flash_bin():
    path = os.environ.get("FLASH_BIN")
    if not path:
        pytest.fail(
            "FLASH_BIN is not set: build the binary with `cargo build -p flash-cli` "
            "and run FLASH_BIN=$PWD/target/debug/flash pytest tests/python",
            pytrace=False,
        )
    if not (Path(path).is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"FLASH_BIN={path!r} is not an executable file", pytrace=False)
    return path


@pytest.fixture
def flash_store(tmp_path):
    """An empty store folder of this test."""
    return tmp_path / "store"


class Flash:
    """Runs `flash --storage STORE -q ARGS...`."""

    def __init__(self, binary, store):
        self.binary = binary
        self.store = store
        self.env = {k: v for k, v in os.environ.items() if k not in ("FLASH_HOME", "RUST_LOG")}

    def __call__(self, *args, check=True):
        cmd = [self.binary, "--storage", str(self.store), "-q", *map(str, args)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=300)
        if check:
            assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}:\n{r.stderr}"
            assert "panicked" not in r.stderr, r.stderr
        return r

    def json(self, *args):
        return json.loads(self(*args).stdout)


@pytest.fixture
def flash(flash_bin, flash_store):
    """A runner of the flash binary on this test's store."""
    return Flash(flash_bin, flash_store)
