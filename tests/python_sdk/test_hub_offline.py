"""register_model of a Hub repo honours HF_HUB_OFFLINE and falls back to the
Hugging Face cache when the Hub cannot be reached, as `flash pull` does (the
download runs in this process: flashtensors._native.hub_snapshot)."""

import hashlib
import os
import socket

import pytest

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "test-org/qwen3-tiny"


def hub_cache(root, model_dir):
    """`model_dir` laid out in a Hugging Face cache as huggingface_hub leaves it:
    blobs/<sha256 or git blob sha1>, snapshots/<commit>/<file> -> ../../blobs/..., refs/main."""
    repo = root / ("models--" + REPO.replace("/", "--"))
    snap = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in sorted(model_dir.iterdir()):
        data = f.read_bytes()
        if f.name.endswith(".safetensors"):
            etag = hashlib.sha256(data).hexdigest()
        else:
            etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (repo / "blobs" / etag).write_bytes(data)
        os.symlink(f"../../blobs/{etag}", snap / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snap


@pytest.fixture
def listener():
    """A listening socket as HF_ENDPOINT: any request would show up as a connection."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    s.setblocking(False)
    yield s, f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()


def connections(s):
    n = 0
    while True:
        try:
            c, _ = s.accept()
        except BlockingIOError:
            return n
        c.close()
        n += 1


def test_register_model_offline_uses_the_cache_only(ft, daemon, synth_qwen3, tmp_path, monkeypatch, listener):
    sock, url = listener
    snap = hub_cache(tmp_path / "hf-cache", synth_qwen3)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = ft.register_model(REPO)
    assert r["status"] == "registered" and r["model_id"] == REPO
    assert ft.get_model_info(REPO)["model_id"] == REPO
    assert connections(sock) == 0, "offline mode made a request"

    # A shard missing from the snapshot: a clear error, still no request.
    shard = sorted(p.name for p in snap.iterdir() if p.name.endswith(".safetensors"))[0]
    (snap / shard).unlink()
    with pytest.raises(ft.errors.FlashError) as e:
        ft.register_model(REPO, force=True)
    msg = str(e.value)
    assert "offline (HF_HUB_OFFLINE=1)" in msg and f"{REPO}@main" in msg, msg
    assert f"snapshot {COMMIT} lacks {shard}" in msg, msg
    assert connections(sock) == 0


def test_register_model_falls_back_when_the_hub_is_unreachable(ft, daemon, synth_qwen3, tmp_path, monkeypatch):
    hub_cache(tmp_path / "hf-cache", synth_qwen3)
    with socket.socket() as s:  # a port nobody listens on: connections are refused
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_ENDPOINT", dead)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    r = ft.register_model(REPO)
    assert r["status"] == "registered"
    assert r["metrics"]["download_time"] < 5, "the refused connections were retried"
