"""The daemon's OpenAI-compatible API, driven by the official `openai` client.

A daemon is started on this test's store (a tiny synthesized Qwen3 pulled
in, HTTP on a free port) and answers on the CPU engine: models list, chat and
completions, streaming and not, errors in OpenAI's shape, and concurrent
requests that must not corrupt each other (greedy, so every answer is known).
"""

import concurrent.futures
import json
import subprocess

import openai
import pytest

MODEL = "test/tiny"


@pytest.fixture(scope="module")
def daemon(flash_bin, tmp_path_factory):
    from conftest import Flash

    root = tmp_path_factory.mktemp("openai")
    flash = Flash(flash_bin, root / "store")
    flash("synth", "qwen3", "tiny", root / "src")
    flash("pull", "--from", root / "src", "--name", MODEL)
    flash("start", "--http", "127.0.0.1:0", "--threads", "2")
    try:
        status = flash.json("status", "--json")
        yield flash, status["http"]
    finally:
        flash("stop", "--timeout", "30", check=False)


@pytest.fixture(scope="module")
def client(daemon):
    _, http = daemon
    return openai.OpenAI(base_url=f"http://{http}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_lists_the_store(client):
    ids = [m.id for m in client.models.list()]
    assert ids == [MODEL]


def test_completion_matches_flash_run(client, daemon):
    flash, _ = daemon
    r = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=12, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.completion_tokens == len(r.model_extra["flash"]["token_ids"])
    assert r.usage.prompt_tokens == len(r.model_extra["flash"]["prompt_token_ids"])
    # The same greedy request in-process gives the same tokens and text.
    local = flash.json("run", MODEL, "Hello world", "--raw", "--max-tokens", "12",
                       "--temperature", "0", "--no-daemon", "--json")
    assert r.model_extra["flash"]["token_ids"] == local["token_ids"]
    assert r.model_extra["flash"]["prompt_token_ids"] == local["prompt_token_ids"]
    assert r.choices[0].text == local["text"]


def test_completion_stream_equals_whole(client):
    whole = client.completions.create(model=MODEL, prompt="abc", max_tokens=10, temperature=0)
    pieces, finish = [], None
    for chunk in client.completions.create(model=MODEL, prompt="abc", max_tokens=10,
                                           temperature=0, stream=True):
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == whole.choices[0].text
    assert finish == whole.choices[0].finish_reason


def test_chat_whole_and_streamed(client, daemon):
    flash, _ = daemon
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    local = flash.json("run", MODEL, "Hi there", "--system", "Be brief.", "--max-tokens", "8",
                       "--temperature", "0", "--no-daemon", "--json")
    assert r.model_extra["flash"]["prompt_token_ids"] == local["prompt_token_ids"]
    assert r.model_extra["flash"]["token_ids"] == local["token_ids"]
    assert r.choices[0].message.content == local["text"]

    stream = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    text, roles, usage = [], [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.role:
                roles.append(c.delta.role)
            if c.delta.content:
                text.append(c.delta.content)
    assert roles == ["assistant"]
    assert "".join(text) == r.choices[0].message.content
    assert usage is not None and usage.total_tokens == r.usage.total_tokens


def test_sampling_with_a_seed_repeats(client):
    kw = dict(model=MODEL, prompt="The", max_tokens=16, temperature=1.0, top_p=0.9, seed=7,
              extra_body={"top_k": 50})
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert a.model_extra["flash"]["token_ids"] == b.model_extra["flash"]["token_ids"]
    assert len(a.model_extra["flash"]["token_ids"]) > 0


def test_stop_strings_cut_the_text(client):
    whole = client.completions.create(model=MODEL, prompt="Hello", max_tokens=16, temperature=0)
    text = whole.choices[0].text
    if len(text) < 3:
        pytest.fail(f"the tiny model's greedy text is too short to test stops: {text!r}")
    stop = text[1:3]
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=16, temperature=0,
                                  stop=[stop])
    assert r.choices[0].text == text[: text.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nobody/nothing",
                                       messages=[{"role": "user", "content": "hi"}])
    assert "nobody/nothing" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nobody/nothing", prompt="hi", stream=True)


def test_bad_requests_are_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", temperature=-1)
    assert "temperature" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", frequency_penalty=0.5)
    assert "repetition_penalty" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[])


def test_concurrent_requests_do_not_interfere(client):
    prompts = ["one two", "three", "four five six", "seven"]
    sequential = [
        client.completions.create(model=MODEL, prompt=p, max_tokens=24, temperature=0)
        for p in prompts
    ]

    def ask(i):
        p = prompts[i]
        if i % 2:
            pieces = [c.choices[0].text for c in client.completions.create(
                model=MODEL, prompt=p, max_tokens=24, temperature=0, stream=True) if c.choices]
            return "".join(pieces)
        return client.completions.create(model=MODEL, prompt=p, max_tokens=24,
                                         temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(ask, range(4)))
    assert got == [r.choices[0].text for r in sequential]


def test_flash_run_goes_through_the_daemon(daemon):
    flash, http = daemon
    via = flash.json("run", MODEL, "Hello", "--max-tokens", "6", "--temperature", "0", "--json")
    assert via["via"] == "daemon" and via["daemon_http"] == http
    local = flash.json("run", MODEL, "Hello", "--max-tokens", "6", "--temperature", "0",
                       "--no-daemon", "--json")
    for k in ("prompt_token_ids", "token_ids", "text"):
        assert via[k] == local[k], k
    for k in ("load_s", "ttft_s", "tokens_per_s"):
        assert isinstance(via[k], float) and via[k] >= 0, k
    assert via["device"] == "cpu"
