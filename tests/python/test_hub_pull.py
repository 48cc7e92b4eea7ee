"""`flash pull ORG/NAME` end to end against a local server that speaks the
Hugging Face Hub's HTTP API (no hub is reachable from CI), and interop with
the real `huggingface_hub` library through the cache they share: what one
downloaded the other uses, online and with HF_HUB_OFFLINE=1, byte for byte."""

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "test-org/tiny-llama"
FOLDER = "models--test-org--tiny-llama"
# The files `flash pull` wants (flash-store's `wanted_file`), as huggingface_hub patterns.
WANTED = ["*.safetensors", "*.json", "*.jinja", "*.txt", "*.tiktoken", "tokenizer.model"]


def is_lfs(name):
    return name.endswith(".safetensors")


def git_blob_sha1(data):
    """The Hub's ETag of a regular (non-LFS) file: git's blob id."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub(http.server.ThreadingHTTPServer):
    """The Hub's routes as huggingface_hub and flash use them: revision info, tree listing,
    HEAD/GET of `resolve` (regular files answered with their git blob id as ETag, LFS files
    redirected to a CDN on another origin with X-Linked-Etag = sha256 and X-Linked-Size)."""

    def __init__(self, repos: dict, gated: set):
        super().__init__(("127.0.0.1", 0), Handler)
        self.repos = repos  # repo id -> folder
        self.gated = gated
        self.lock = threading.Lock()
        self.requests = []  # (method, path), both origins
        self.file_gets = []  # names of files whose bytes were sent
        self.auth_headers = []
        # The CDN: another origin (port), as the Hub's LFS storage is.
        self.cdn = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.cdn.hub = self
        self.threads = []

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    @property
    def cdn_url(self):
        return f"http://127.0.0.1:{self.cdn.server_address[1]}"

    def start(self):
        for s in (self, self.cdn):
            t = threading.Thread(target=s.serve_forever, daemon=True)
            t.start()
            self.threads.append(t)

    def stop(self):
        """Stops both origins and closes their sockets: connections are refused after."""
        for s in (self, self.cdn):
            s.shutdown()
            s.server_close()

    def file_requests(self):
        """Requests for file metadata or bytes (`resolve` or the CDN)."""
        with self.lock:
            return [r for r in self.requests if "/resolve/" in r[1] or r[1].startswith("/cdn/")]

    def all_requests(self):
        with self.lock:
            return list(self.requests)

    def clear(self):
        with self.lock:
            self.requests.clear()
            self.file_gets.clear()


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

    def send_file(self, hub, name, data, headers, send_body):
        if send_body:
            with hub.lock:
                hub.file_gets.append(name)
        self.reply(200, data, headers, send_body)

    def route(self, send_body):
        hub: FakeHub = getattr(self.server, "hub", self.server)
        path = urllib.parse.urlsplit(self.path).path
        with hub.lock:
            hub.requests.append((self.command, path))
            hub.auth_headers.append(self.headers.get("Authorization"))
        if self.server is hub.cdn:
            sha = path.removeprefix("/cdn/")
            for folder in hub.repos.values():
                for f in folder.iterdir():
                    if is_lfs(f.name) and hashlib.sha256(f.read_bytes()).hexdigest() == sha:
                        return self.send_file(hub, f.name, f.read_bytes(), {}, send_body)
            return self.reply(404)
        if path.startswith("/api/models/"):
            rest = path[len("/api/models/"):]
            for route in ("/revision/", "/tree/"):
                repo, sep, rev = rest.partition(route)
                if sep:
                    break
            if not sep:
                return self.reply(404)
            if repo not in hub.repos:
                return self.reply(401, b"not found", {"X-Error-Code": "RepoNotFound"})
            if urllib.parse.unquote(rev) not in ("main", COMMIT):
                return self.reply(404, b"", {"X-Error-Code": "RevisionNotFound"})
            files = sorted(p for p in hub.repos[repo].iterdir() if p.is_file())
            if route == "/revision/":
                body = {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": f.name} for f in files]}
            else:
                body = []
                for f in files:
                    data = f.read_bytes()
                    entry = {"type": "file", "path": f.name, "size": len(data), "oid": git_blob_sha1(data)}
                    if is_lfs(f.name):
                        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                    body.append(entry)
            return self.reply(200, json.dumps(body).encode(), {"Content-Type": "application/json"})
        repo, sep, rest = path[1:].partition("/resolve/")
        if not sep or repo not in hub.repos:
            return self.reply(401, b"", {"X-Error-Code": "RepoNotFound"})
        if repo in hub.gated:
            return self.reply(403, b"gated", {"X-Error-Code": "GatedRepo"})
        rev, _, name = rest.partition("/")
        rev, name = urllib.parse.unquote(rev), urllib.parse.unquote(name)
        if rev not in ("main", COMMIT):
            return self.reply(404, b"", {"X-Error-Code": "RevisionNotFound"})
        f = hub.repos[repo] / name
        if not f.is_file():
            return self.reply(404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
        data = f.read_bytes()
        if is_lfs(name):
            sha = hashlib.sha256(data).hexdigest()
            return self.reply(302, b"", {
                "Location": f"{hub.cdn_url}/cdn/{sha}",
                "X-Repo-Commit": COMMIT,
                "ETag": f'"{git_blob_sha1(b"lfs pointer " + sha.encode())}"',
                "X-Linked-Etag": f'"{sha}"',
                "X-Linked-Size": str(len(data)),
            }, send_body)
        self.send_file(hub, name, data, {"ETag": f'"{git_blob_sha1(data)}"', "X-Repo-Commit": COMMIT}, send_body)

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
    # Files a Hub repo has and flash does not want.
    (repo / "README.md").write_text("# tiny llama\n")
    (repo / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    server = FakeHub({REPO: repo, "test-org/gated": repo}, {"test-org/gated"})
    server.start()
    yield server, repo
    try:
        server.stop()
    except OSError:
        pass


def env_for(server, tmp_path, token=None, cache="hf-cache", offline=None):
    env = dict(os.environ)
    env["HF_ENDPOINT"] = server.url
    env["HF_HUB_CACHE"] = str(tmp_path / cache)
    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_XET"):
        env.pop(k, None)
    env["HF_HOME"] = str(tmp_path / "hf-home")
    env["NO_PROXY"] = "127.0.0.1"
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    if token:
        env["HF_TOKEN"] = token
    if offline is not None:
        env["HF_HUB_OFFLINE"] = offline
    return env


def run(flash_bin, store, env, *args):
    return subprocess.run([flash_bin, "--storage", str(store), "-q", *args], env=env, capture_output=True, text=True)


def hf(env, code):
    """Runs `code` with huggingface_hub in a fresh interpreter (it reads HF_* at import) and
    returns what the code printed as JSON."""
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def snapshot_files(snap: Path):
    return sorted(p.name for p in snap.iterdir())


def flash_wanted(name):
    return name.endswith((".safetensors", ".json", ".jinja", ".txt", ".tiktoken")) or name == "tokenizer.model"


def test_pull_from_hub_and_cache(hub, flash_bin, tmp_path):
    server, repo = hub
    store = tmp_path / "store"
    env = env_for(server, tmp_path, token="hf_test")
    r = run(flash_bin, store, env, "pull", REPO, "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["model_id"] == REPO
    assert any(a == "Bearer hf_test" for a in server.auth_headers)
    shards = sorted(p.name for p in repo.glob("*.safetensors"))
    assert len(shards) > 1, "the fixture is sharded"
    assert sorted(n for n in server.file_gets if n.endswith(".safetensors")) == shards
    assert "README.md" not in server.file_gets

    # The Hub cache has the huggingface_hub layout.
    snap = tmp_path / "hf-cache" / FOLDER / "snapshots" / COMMIT
    assert (snap / "config.json").is_file()
    assert (tmp_path / "hf-cache" / FOLDER / "refs" / "main").read_text() == COMMIT

    info = json.loads(run(flash_bin, store, env, "info", REPO, "--json").stdout)
    assert info["source"] == f"hub:{REPO}"
    assert info["revision"] == COMMIT

    # A second pull (forced) finds every file in the Hub cache: no download.
    before = len(server.file_gets)
    r = run(flash_bin, store, env, "pull", REPO, "--force")
    assert r.returncode == 0, r.stderr
    assert len(server.file_gets) == before

    # The weights in the store are the ones the Hub served.
    out = tmp_path / "export"
    assert run(flash_bin, store, env, "export", REPO, "--to", str(out)).returncode == 0
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
    # The Hub answers 401 + X-Error-Code: RepoNotFound for a missing repo without a token.
    r = run(flash_bin, store, env, "pull", "test-org/nope")
    assert r.returncode != 0
    assert "test-org/nope" in r.stderr and "not found" in r.stderr.lower(), r.stderr
    assert "panicked" not in r.stderr
    assert json.loads(run(flash_bin, store, env, "list", "--json").stdout) == []


def test_cache_layout_is_the_one_of_huggingface_hub(hub, flash_bin, tmp_path):
    """The same files pulled by flash into one cache and by huggingface_hub into another
    give the same refs, blob names (sha256 for LFS files, git blob sha1 for the others)
    and snapshot links."""
    server, repo = hub
    r = run(flash_bin, tmp_path / "store", env_for(server, tmp_path, cache="by-flash"), "pull", REPO)
    assert r.returncode == 0, r.stderr
    hf(env_for(server, tmp_path, cache="by-hf"), f"""
import json
from huggingface_hub import snapshot_download
print(json.dumps(snapshot_download({REPO!r}, allow_patterns={WANTED!r})))
""")
    ours, theirs = tmp_path / "by-flash" / FOLDER, tmp_path / "by-hf" / FOLDER
    assert (ours / "refs" / "main").read_text() == (theirs / "refs" / "main").read_text() == COMMIT
    names = snapshot_files(theirs / "snapshots" / COMMIT)
    assert names == sorted(p.name for p in repo.iterdir() if flash_wanted(p.name))
    assert snapshot_files(ours / "snapshots" / COMMIT) == names
    for name in names:
        a, b = ours / "snapshots" / COMMIT / name, theirs / "snapshots" / COMMIT / name
        assert os.readlink(a) == os.readlink(b), name
        data = (repo / name).read_bytes()
        blob = hashlib.sha256(data).hexdigest() if is_lfs(name) else git_blob_sha1(data)
        assert os.readlink(a) == f"../../blobs/{blob}", name
        assert a.read_bytes() == data
    blobs = lambda d: sorted(p.name for p in (d / "blobs").iterdir())  # noqa: E731
    assert blobs(ours) == blobs(theirs)


def test_flash_imports_what_huggingface_hub_downloaded(hub, flash_bin, tmp_path):
    server, repo = hub
    env = env_for(server, tmp_path)
    snap = hf(env, f"""
import json
from huggingface_hub import snapshot_download
print(json.dumps(snapshot_download({REPO!r})))
""")
    assert Path(snap).name == COMMIT
    assert (Path(snap) / "README.md").is_file(), "huggingface_hub took the whole repo"
    assert server.file_gets, "huggingface_hub downloaded through the fake Hub"

    # Online: the revision is asked, no file is downloaded (nor its metadata asked) again.
    server.clear()
    store = tmp_path / "store"
    r = run(flash_bin, store, env, "pull", REPO, "--json")
    assert r.returncode == 0, r.stderr
    assert server.file_requests() == [], server.file_requests()
    assert server.file_gets == []
    assert json.loads(run(flash_bin, store, env, "info", REPO, "--json").stdout)["revision"] == COMMIT

    # Offline: not a single request. huggingface_hub's listing (trees/<commit>.json) is there
    # and every wanted file of it is in the snapshot.
    assert (tmp_path / "hf-cache" / FOLDER / "trees" / f"{COMMIT}.json").is_file()
    server.clear()
    r = run(flash_bin, store, env_for(server, tmp_path, offline="1"), "pull", REPO, "--force")
    assert r.returncode == 0, r.stderr
    assert server.all_requests() == []


def test_huggingface_hub_finds_what_flash_pulled(hub, flash_bin, tmp_path):
    server, repo = hub
    r = run(flash_bin, tmp_path / "store", env_for(server, tmp_path), "pull", REPO)
    assert r.returncode == 0, r.stderr
    shards = sorted(p.name for p in repo.glob("*.safetensors"))

    server.clear()
    got = hf(env_for(server, tmp_path, offline="1"), f"""
import json
from huggingface_hub import hf_hub_download, snapshot_download
out = {{
    "offline": snapshot_download({REPO!r}),
    "local_only": snapshot_download({REPO!r}, local_files_only=True),
    "by_commit": snapshot_download({REPO!r}, revision={COMMIT!r}, local_files_only=True),
    "files": {{n: hf_hub_download({REPO!r}, n, local_files_only=True) for n in {shards + ["config.json"]!r}}},
}}
print(json.dumps(out))
""")
    assert server.all_requests() == [], "huggingface_hub in offline mode asked the server"
    snap = tmp_path / "hf-cache" / FOLDER / "snapshots" / COMMIT
    assert Path(got["offline"]) == Path(got["local_only"]) == Path(got["by_commit"]) == snap
    for name in sorted(p.name for p in repo.iterdir() if flash_wanted(p.name)):
        assert (Path(got["offline"]) / name).read_bytes() == (repo / name).read_bytes(), name
    for name, path in got["files"].items():
        assert Path(path) == snap / name
        assert Path(path).read_bytes() == (repo / name).read_bytes(), name

    # Online, huggingface_hub finds the wanted files in place: it lists the repo, downloads
    # nothing of what flash fetched.
    got = hf(env_for(server, tmp_path), f"""
import json
from huggingface_hub import snapshot_download
print(json.dumps(snapshot_download({REPO!r}, allow_patterns={WANTED!r})))
""")
    assert Path(got) == snap
    assert server.file_gets == [], server.file_gets


def test_offline_pull_uses_only_the_cache(hub, flash_bin, tmp_path):
    server, repo = hub
    store = tmp_path / "store"
    cache = tmp_path / "hf-cache"
    offline = env_for(server, tmp_path, offline="1")

    # Nothing cached: a clear error, no request.
    r = run(flash_bin, store, offline, "pull", REPO)
    assert r.returncode != 0
    assert (f"offline (HF_HUB_OFFLINE=1): {REPO}@main is not in the Hugging Face cache at {cache}: "
            f"no {FOLDER} folder") in r.stderr, r.stderr
    assert server.all_requests() == []

    # Pulled once online, then offline (any spelling huggingface_hub accepts): no request.
    assert run(flash_bin, store, env_for(server, tmp_path), "pull", REPO).returncode == 0
    server.clear()
    for value in ("1", "ON", "yes", "True"):
        r = run(flash_bin, store, env_for(server, tmp_path, offline=value), "pull", REPO, "--force", "--json")
        assert r.returncode == 0, (value, r.stderr)
        assert json.loads(r.stdout)["model_id"] == REPO
    assert server.all_requests() == []
    # A commit hash resolves without refs/.
    r = run(flash_bin, store, offline, "pull", REPO, "--revision", COMMIT, "--force")
    assert r.returncode == 0, r.stderr

    # A shard missing from the snapshot.
    shard = sorted(p.name for p in repo.glob("*.safetensors"))[1]
    link = cache / FOLDER / "snapshots" / COMMIT / shard
    target = os.readlink(link)
    link.unlink()
    r = run(flash_bin, store, offline, "pull", REPO, "--force")
    assert r.returncode != 0
    assert f"{REPO}@main is not in the Hugging Face cache at {cache}: snapshot {COMMIT} lacks {shard}" in r.stderr, r.stderr
    assert "panicked" not in r.stderr
    os.symlink(target, link)

    # No ref for the branch.
    (cache / FOLDER / "refs" / "main").unlink()
    r = run(flash_bin, store, offline, "pull", REPO, "--force")
    assert r.returncode != 0
    assert f"{REPO}@main is not in the Hugging Face cache at {cache}: no refs/main" in r.stderr, r.stderr
    assert server.all_requests() == []


def test_unreachable_hub_falls_back_to_the_cache(hub, flash_bin, tmp_path):
    server, repo = hub
    store = tmp_path / "store"
    env = env_for(server, tmp_path)
    assert run(flash_bin, store, env, "pull", REPO).returncode == 0
    server.stop()

    # A complete snapshot: used at once (the connection errors are not retried), with a warning.
    start = time.monotonic()
    r = run(flash_bin, store, env, "pull", REPO, "--force", "--json")
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - start < 6, "the refused connections were retried"
    assert "could not be reached" in r.stderr and f"using the cached snapshot {COMMIT}" in r.stderr, r.stderr
    assert json.loads(r.stdout)["model_id"] == REPO

    # An incomplete one: the error names the network failure and what the cache lacks.
    shard = sorted(p.name for p in repo.glob("*.safetensors"))[0]
    (tmp_path / "hf-cache" / FOLDER / "snapshots" / COMMIT / shard).unlink()
    r = run(flash_bin, store, env, "pull", REPO, "--force")
    assert r.returncode != 0
    assert "could not be reached" in r.stderr and server.url in r.stderr, r.stderr
    assert f"snapshot {COMMIT} lacks {shard}" in r.stderr, r.stderr
    assert "panicked" not in r.stderr
