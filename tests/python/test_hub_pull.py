"""`flash pull ORG/NAME` end to end against a local server that speaks the
Hugging Face Hub's HTTP API (no hub is reachable from CI)."""

import hashlib
import http.server
import json
import os
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub(http.server.ThreadingHTTPServer):
    def __init__(self, repos: dict, gated: set):
        super().__init__(("127.0.0.1", 0), Handler)
        self.repos = repos  # repo id -> folder
        self.gated = gated
        self.file_gets = []
        self.auth_headers = []

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, status, body=b"", headers=None, send_body=True):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def route(self, send_body):
        hub: FakeHub = self.server
        hub.auth_headers.append(self.headers.get("Authorization"))
        path = self.path
        if path.startswith("/api/models/"):
            repo, _, rev = path[len("/api/models/"):].partition("/revision/")
            if repo not in hub.repos:
                return self.reply(404, b"not found", {"X-Error-Code": "RepositoryNotFound"})
            files = sorted(p.name for p in hub.repos[repo].iterdir())
            body = json.dumps({"id": repo, "sha": COMMIT, "siblings": [{"rfilename": f} for f in files]})
            return self.reply(200, body.encode(), {"Content-Type": "application/json"})
        repo, sep, rest = path[1:].partition("/resolve/")
        if not sep or repo not in hub.repos:
            return self.reply(404, b"", {"X-Error-Code": "RepositoryNotFound"})
        if repo in hub.gated:
            return self.reply(403, b"gated", {"X-Error-Code": "GatedRepo"})
        _, _, name = rest.partition("/")
        f = hub.repos[repo] / name
        if not f.is_file():
            return self.reply(404, b"", {"X-Error-Code": "EntryNotFound"})
        data = f.read_bytes()
        if send_body:
            hub.file_gets.append(name)
        etag = hashlib.sha256(data).hexdigest()
        self.reply(200, data, {"ETag": f'"{etag}"', "X-Repo-Commit": COMMIT}, send_body)

    def do_GET(self):
        self.route(True)

    def do_HEAD(self):
        self.route(False)


@pytest.fixture
def flash_bin():
    path = os.environ.get("FLASH_BIN")
    assert path and Path(path).is_file(), "set FLASH_BIN to the flash binary (scripts/test.sh does)"
    return path


@pytest.fixture
def hub(flash_bin, tmp_path):
    repo = tmp_path / "repo"
    subprocess.run([flash_bin, "-q", "synth", "llama", "tiny", str(repo), "--shard-size", "64K", "--dtype", "fp32"], check=True)
    server = FakeHub({"test-org/tiny-llama": repo, "test-org/gated": repo}, {"test-org/gated"})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, repo
    server.shutdown()


def env_for(server, tmp_path, token=None):
    env = dict(os.environ)
    env["HF_ENDPOINT"] = server.url
    env["HF_HUB_CACHE"] = str(tmp_path / "hf-cache")
    env.pop("HF_TOKEN", None)
    env["HF_HOME"] = str(tmp_path / "hf-home")
    env["NO_PROXY"] = "127.0.0.1"
    if token:
        env["HF_TOKEN"] = token
    return env


def run(flash_bin, store, env, *args):
    return subprocess.run([flash_bin, "--storage", str(store), "-q", *args], env=env, capture_output=True, text=True)


def test_pull_from_hub_and_cache(hub, flash_bin, tmp_path):
    server, repo = hub
    store = tmp_path / "store"
    env = env_for(server, tmp_path, token="hf_test")
    r = run(flash_bin, store, env, "pull", "test-org/tiny-llama", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["model_id"] == "test-org/tiny-llama"
    assert any(a == "Bearer hf_test" for a in server.auth_headers)
    shards = sorted(p.name for p in repo.glob("*.safetensors"))
    assert len(shards) > 1, "the fixture is sharded"
    assert sorted(n for n in server.file_gets if n.endswith(".safetensors")) == shards

    # The Hub cache has the huggingface_hub layout.
    snap = tmp_path / "hf-cache" / "models--test-org--tiny-llama" / "snapshots" / COMMIT
    assert (snap / "config.json").is_file()
    assert (tmp_path / "hf-cache" / "models--test-org--tiny-llama" / "refs" / "main").read_text() == COMMIT

    info = json.loads(run(flash_bin, store, env, "info", "test-org/tiny-llama", "--json").stdout)
    assert info["source"] == "hub:test-org/tiny-llama"
    assert info["revision"] == COMMIT

    # A second pull (forced) finds every file in the Hub cache: no download.
    before = len(server.file_gets)
    r = run(flash_bin, store, env, "pull", "test-org/tiny-llama", "--force")
    assert r.returncode == 0, r.stderr
    assert len(server.file_gets) == before

    # The weights in the store are the ones the Hub served.
    out = tmp_path / "export"
    assert run(flash_bin, store, env, "export", "test-org/tiny-llama", "--to", str(out)).returncode == 0
    got = load_file(str(out / "model.safetensors"))
    want = {}
    for s in shards:
        want.update(load_file(str(repo / s)))
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and np.array_equal(got[k].view(np.uint8), want[k].view(np.uint8)), k


def test_gated_and_missing_repos(hub, flash_bin, tmp_path):
    server, _ = hub
    store = tmp_path / "store"
    env = env_for(server, tmp_path)
    r = run(flash_bin, store, env, "pull", "test-org/gated")
    assert r.returncode != 0
    assert "HF_TOKEN" in r.stderr and "test-org/gated" in r.stderr
    r = run(flash_bin, store, env, "pull", "test-org/nope")
    assert r.returncode != 0
    assert "test-org/nope" in r.stderr and "not found" in r.stderr.lower()
    assert "panicked" not in r.stderr
    assert json.loads(run(flash_bin, store, env, "list", "--json").stdout) == []
