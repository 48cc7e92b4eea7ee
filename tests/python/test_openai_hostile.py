"""No request can take the daemon down.

A daemon serves three tiny synthesized models (two Qwen3, one Llama) on
the CPU engine. Malformed, oversized and hostile requests are sent one by
one over raw HTTP (bad JSON, wrong types, NaN and infinities, astronomical
sizes, multi-megabyte prompts, token ids outside the vocabulary, unknown and
path-like model names, partial and slow bodies over a raw socket, wrong
content types, deeply nested JSON...): each must get a clear error in
OpenAI's shape with the right status, and the daemon must still answer
after each. A stream cut by its client must free the model at once, and 32
concurrent clients over the three models must all be answered. At the end
every model of the store still verifies.

The body timeout is set low (FLASH_HTTP_BODY_TIMEOUT) so that the partial
body cases take seconds, not the default 30.
"""

import concurrent.futures
import http.client
import json
import random
import socket
import threading
import time

import openai
import pytest

QWEN = "test/qwen"
LLAMA = "test/llama"
QWEN2 = "test/qwen-b"
MODELS = [QWEN, LLAMA, QWEN2]
CONTEXT = 40960  # max_position_embeddings of the tiny Qwen3
BODY_TIMEOUT_S = 2.0
MAX_BODY = 16 << 20  # the daemon's default limit


@pytest.fixture(scope="module")
def daemon(flash_bin, tmp_path_factory):
    from conftest import Flash

    root = tmp_path_factory.mktemp("hostile")
    flash = Flash(flash_bin, root / "store")
    flash.env["FLASH_HTTP_BODY_TIMEOUT"] = str(BODY_TIMEOUT_S)
    for name, (arch, seed) in zip(MODELS, [("qwen3", 1), ("llama", 2), ("qwen3", 3)]):
        src = root / name.replace("/", "-")
        flash("synth", arch, "tiny", src, "--seed", seed)
        flash("pull", "--from", src, "--name", name)
    flash("start", "--http", "127.0.0.1:0", "--threads", "2")
    try:
        host, port = flash.json("status", "--json")["http"].rsplit(":", 1)
        yield flash, (host, int(port))
    finally:
        flash("stop", "--timeout", "30", check=False)
        log = (flash.store / "daemon.log").read_text(errors="replace")
        assert "panicked" not in log, log[-4000:]


def request(addr, method, path, body=b"", headers=None, timeout=120):
    """One HTTP request; returns (status, parsed JSON body or the raw text)."""
    conn = http.client.HTTPConnection(*addr, timeout=timeout)
    try:
        hdrs = {"Content-Type": "application/json"}
        hdrs.update(headers or {})
        conn.request(method, path, body=body, headers=hdrs)
        r = conn.getresponse()
        data = r.read()
    finally:
        conn.close()
    try:
        return r.status, json.loads(data)
    except ValueError:
        return r.status, data.decode(errors="replace")


def post(addr, path, obj, **kw):
    body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return request(addr, "POST", path, body, **kw)


def assert_openai_error(status, body, want_status, param=None, code=None, contains=None):
    assert status == want_status, (status, body)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert len(err["message"]) < 2000, f"the message quotes too much: {len(err['message'])} chars"
    assert err["type"] in ("invalid_request_error", "server_error"), err
    if want_status < 500:
        assert err["type"] == "invalid_request_error", err
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    for piece in [contains] if isinstance(contains, str) else (contains or []):
        assert piece in err["message"], err
    return err


def assert_alive(addr):
    status, body = request(addr, "GET", "/health", timeout=10)
    assert status == 200 and "ok" in body, (status, body)
    status, body = request(addr, "GET", "/v1/models", timeout=10)
    assert status == 200, body
    assert sorted(m["id"] for m in body["data"]) == sorted(MODELS)


def completion(**kw):
    return {"model": QWEN, "prompt": "Hello", "max_tokens": 4, **kw}


def chat(**kw):
    return {"model": QWEN, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **kw}


C, CH = "/v1/completions", "/v1/chat/completions"

# (id, path, body (bytes: sent as is), status, param, code, message pieces)
CASES = [
    ("bad-json", C, b'{"model": "test/qwen", "prompt": ', 400, None, None, "JSON"),
    ("empty-body", C, b"", 400, None, None, "empty"),
    ("body-is-array", CH, b"[1, 2, 3]", 400, None, None, "JSON object"),
    ("not-utf8", C, b"\xff\xfe\x00{", 400, None, None, "JSON"),
    ("lone-surrogate", C, b'{"model": "test/qwen", "prompt": "\\ud800"}', 400, None, None, "JSON"),
    ("nan-token", C, b'{"model": "test/qwen", "prompt": "hi", "temperature": NaN}', 400,
     None, None, "JSON"),
    ("infinity-token", C, b'{"model": "test/qwen", "prompt": "hi", "top_p": Infinity}', 400,
     None, None, "JSON"),
    ("number-beyond-f64", C, b'{"model": "test/qwen", "prompt": "hi", "max_tokens": 1e999}',
     400, None, None, "JSON"),
    ("deeply-nested", C,
     b'{"model": "test/qwen", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
     400, None, None, "JSON"),
    ("max-tokens-astronomical", C, completion(max_tokens=1_000_000_000_000), 400,
     "max_tokens", "context_length_exceeded",
     ["max_tokens is 1000000000000", "test/qwen", f"context of {CONTEXT} tokens"]),
    ("max-completion-tokens-astronomical", CH, chat(max_tokens=None,
                                                   max_completion_tokens=10**15),
     400, "max_completion_tokens", "context_length_exceeded", "context of"),
    ("max-tokens-beyond-u64", C, completion(max_tokens=10**30), 400, "max_tokens",
     "integer_above_max_value", None),
    ("max-tokens-negative", C, completion(max_tokens=-5), 400, "max_tokens",
     "integer_below_min_value", "-5"),
    ("max-tokens-zero", CH, chat(max_tokens=0), 400, "max_tokens", "integer_below_min_value",
     None),
    ("max-tokens-string", C, completion(max_tokens="7"), 400, "max_tokens", "invalid_type",
     "string"),
    ("max-tokens-decimal", C, completion(max_tokens=16.5), 400, "max_tokens", "invalid_type",
     None),
    ("max-tokens-bool", C, completion(max_tokens=True), 400, "max_tokens", "invalid_type",
     "boolean"),
    ("top-p-7", C, completion(top_p=7), 400, "top_p", "decimal_above_max_value", "<= 1"),
    ("top-p-zero", C, completion(top_p=0), 400, "top_p", "decimal_below_min_value", "> 0"),
    ("top-p-string", CH, chat(top_p="7"), 400, "top_p", "invalid_type", None),
    ("temperature-above-2", C, completion(temperature=2.5), 400, "temperature",
     "decimal_above_max_value", None),
    ("temperature-negative", CH, chat(temperature=-1), 400, "temperature",
     "decimal_below_min_value", None),
    ("temperature-bool", C, completion(temperature=True), 400, "temperature", "invalid_type",
     None),
    ("temperature-huge", C, completion(temperature=1e308), 400, "temperature",
     "decimal_above_max_value", None),
    ("n-2", CH, chat(n=2), 400, "n", "unsupported_value", None),
    ("n-huge", C, completion(n=10**12), 400, "n", "unsupported_value", None),
    ("n-zero", C, completion(n=0), 400, "n", "integer_below_min_value", None),
    ("stop-five", C, completion(stop=["a", "b", "c", "d", "e"]), 400, "stop",
     "array_above_max_length", None),
    ("stop-number", C, completion(stop=42), 400, "stop", "invalid_type", None),
    ("stop-list-of-numbers", CH, chat(stop=[1]), 400, "stop[0]", "invalid_type", None),
    ("stop-huge", C, completion(stop="x" * 100_000), 400, "stop", "string_above_max_length",
     None),
    ("seed-string", C, completion(seed="x"), 400, "seed", "invalid_type", None),
    ("seed-decimal", C, completion(seed=1.5), 400, "seed", "invalid_type", None),
    ("stream-string", CH, chat(stream="yes"), 400, "stream", "invalid_type", None),
    ("stream-options-without-stream", CH, chat(stream_options={"include_usage": True}), 400,
     "stream_options", None, None),
    ("logprobs", CH, chat(logprobs=True), 400, "logprobs", "unsupported_parameter", None),
    ("frequency-penalty-range", C, completion(frequency_penalty=3), 400, "frequency_penalty",
     "decimal_above_max_value", None),
    ("presence-penalty-unsupported", C, completion(presence_penalty=0.5), 400,
     "presence_penalty", "unsupported_value", "repetition_penalty"),
    ("repetition-penalty-zero", C, completion(repetition_penalty=0), 400, "repetition_penalty",
     "decimal_below_min_value", None),
    ("top-k-below-minus-one", C, completion(top_k=-2), 400, "top_k", "integer_below_min_value",
     None),
    ("response-format-json", CH, chat(response_format={"type": "json_object"}), 400,
     "response_format.type", "unsupported_value", None),
    ("tools", CH, chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools",
     "unsupported_parameter", None),
    ("token-id-outside-vocabulary", C, completion(prompt=[1, 2, 999_999]), 400, "prompt[2]",
     "invalid_value", "vocabulary"),
    ("token-id-negative", C, completion(prompt=[-1]), 400, "prompt[0]", "invalid_value",
     "vocabulary"),
    ("token-id-beyond-u32", C, completion(prompt=[[4294967296]]), 400, "prompt[0][0]",
     "invalid_value", "vocabulary"),
    ("token-ids-many-prompts", C, completion(prompt=[[1, 2], [3]]), 400, "prompt",
     "unsupported_value", None),
    ("prompt-object", C, completion(prompt={"text": "hi"}), 400, "prompt", "invalid_type",
     None),
    ("prompt-missing", C, {"model": QWEN}, 400, "prompt", "missing_required_parameter", None),
    ("prompt-empty-array", C, completion(prompt=[]), 400, "prompt", "empty_array", None),
    ("messages-empty", CH, chat(messages=[]), 400, "messages", "empty_array", None),
    ("messages-string", CH, chat(messages="hi"), 400, "messages", "invalid_type", None),
    ("message-role-unknown", CH, chat(messages=[{"role": "wizard", "content": "x"}]), 400,
     "messages[0].role", "invalid_value", "wizard"),
    ("message-role-missing", CH, chat(messages=[{"content": "x"}]), 400, "messages[0].role",
     "missing_required_parameter", None),
    ("message-content-number", CH, chat(messages=[{"role": "user", "content": 5}]), 400,
     "messages[0].content", "invalid_type", None),
    ("message-image-part", CH,
     chat(messages=[{"role": "user", "content": [{"type": "image_url",
                                                   "image_url": {"url": "http://x/y.png"}}]}]),
     400, "messages[0].content[0].type", "unsupported_value", None),
    ("model-missing", C, {"prompt": "hi"}, 400, "model", "missing_required_parameter", None),
    ("model-number", C, completion(model=5), 400, "model", "invalid_type", None),
    ("model-empty", C, completion(model=""), 400, "model", None, None),
    ("model-unknown", CH, chat(model="nobody/nothing"), 404, "model", "model_not_found",
     "nobody/nothing"),
    ("model-path-traversal", C, completion(model="../../../../etc/passwd"), 404, "model",
     "model_not_found", "does not exist"),
    ("model-absolute-path", C, completion(model="/etc/passwd"), 404, "model", "model_not_found",
     None),
    ("model-dotdot-parts", CH, chat(model="test/../../qwen"), 404, "model", "model_not_found",
     None),
    ("model-huge-name", C, completion(model="a" * 1_000_000), 404, "model", "model_not_found",
     None),
    ("wrong-content-type-text", C, b"hello there", 400, None, None, "JSON"),
    ("wrong-content-type-form", C, b"model=test/qwen&prompt=hi", 400, None, None, "JSON"),
]
CONTENT_TYPES = {
    "wrong-content-type-text": "text/plain",
    "wrong-content-type-form": "application/x-www-form-urlencoded",
}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_request_is_a_clear_error(daemon, case):
    _, addr = daemon
    name, path, body, status, param, code, contains = case
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if v is not None}
    headers = {"Content-Type": CONTENT_TYPES[name]} if name in CONTENT_TYPES else None
    got_status, got = post(addr, path, body, headers=headers)
    assert_openai_error(got_status, got, status, param, code, contains)
    assert_alive(addr)


def test_wrong_method_and_path_are_openai_errors(daemon):
    _, addr = daemon
    status, body = request(addr, "GET", C)
    assert_openai_error(status, body, 405, contains="POST")
    status, body = request(addr, "POST", "/v1/embeddings", b"{}")
    assert_openai_error(status, body, 404, contains="/v1/embeddings")
    assert_alive(addr)


def test_multi_megabyte_prompts_are_answered(daemon):
    # Within the body limit but far beyond the context: a 400 once the
    # prompt is tokenized (seconds for megabytes), not a hang.
    _, addr = daemon
    t = time.monotonic()
    status, body = post(addr, C, completion(prompt="a" * 3_000_000))
    assert_openai_error(status, body, 400, "prompt", "context_length_exceeded",
                        [f"context of {CONTEXT} tokens", "the prompt uses"])
    text = "hello world " * (2_000_000 // 12)
    status, body = post(addr, CH, chat(messages=[{"role": "user", "content": text}]))
    assert_openai_error(status, body, 400, "messages", "context_length_exceeded")
    # A token-id prompt of a million ids (3 MB of JSON).
    status, body = post(addr, C, completion(prompt=[1] * 1_000_000))
    assert_openai_error(status, body, 400, "prompt", "context_length_exceeded",
                        "uses 1000000 tokens")
    assert time.monotonic() - t < 30
    # Within the context: answered.
    status, body = post(addr, C, completion(prompt="hello world " * 100, max_tokens=2))
    assert status == 200, body
    assert body["usage"]["prompt_tokens"] >= 200
    assert_alive(addr)


def raw_socket(addr):
    s = socket.create_connection(addr, timeout=30)
    return s


def read_response(s):
    """Reads a whole HTTP/1.1 response with a Content-Length from a socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        k, _, v = line.partition(":")
        if k.strip().lower() == "content-length":
            length = int(v)
    while len(rest) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        rest += chunk
    return status, json.loads(rest[:length])


def test_body_larger_than_the_limit_is_413(daemon):
    _, addr = daemon
    s = raw_socket(addr)
    try:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % (MAX_BODY + 1) + b"{" + b" " * 100_000)
        status, body = read_response(s)
    finally:
        s.close()
    assert_openai_error(status, body, 413, code="request_too_large", contains=str(MAX_BODY))
    assert_alive(addr)


def test_partial_body_times_out(daemon):
    _, addr = daemon
    s = raw_socket(addr)
    t = time.monotonic()
    try:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                  b'{"model": "test/qwen", ')
        status, body = read_response(s)
    finally:
        s.close()
    took = time.monotonic() - t
    assert_openai_error(status, body, 408, code="request_timeout")
    assert BODY_TIMEOUT_S * 0.8 <= took < BODY_TIMEOUT_S + 10, took
    assert_alive(addr)


def test_slow_body_times_out_as_a_whole(daemon):
    # A byte every 0.25 s never lets an idle timer fire: the limit is on the
    # whole body.
    _, addr = daemon
    s = raw_socket(addr)
    result = {}

    def reader():
        try:
            result["reply"] = read_response(s)
        except OSError as e:
            result["error"] = e

    t = time.monotonic()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Transfer-Encoding: chunked\r\n\r\n")
    th = threading.Thread(target=reader)
    th.start()
    try:
        while th.is_alive() and time.monotonic() - t < BODY_TIMEOUT_S + 10:
            try:
                s.sendall(b"1\r\n \r\n")
            except OSError:
                break
            time.sleep(0.25)
        th.join(15)
    finally:
        s.close()
    took = time.monotonic() - t
    assert "reply" in result, result
    status, body = result["reply"]
    assert_openai_error(status, body, 408, code="request_timeout")
    assert took < BODY_TIMEOUT_S + 10, took
    assert_alive(addr)


def test_client_gone_mid_body_and_mid_headers(daemon):
    _, addr = daemon
    for data in [b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{\"mo",
                 b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le",
                 b"GARBAGE \x00\xff\r\n\r\n"]:
        s = raw_socket(addr)
        s.sendall(data)
        s.close()
        assert_alive(addr)


def test_cut_stream_frees_the_model_at_once(daemon):
    flash, addr = daemon
    log = flash.store / "daemon.log"
    cancelled_before = log.read_text(errors="replace").count("request cancelled")
    # ~30000 tokens of the tiny model take well over a minute to generate.
    body = json.dumps(completion(prompt="Hello", max_tokens=30000, temperature=0,
                                 stream=True)).encode()
    s = raw_socket(addr)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body) + body)
    got = b""
    while b"data: {" not in got:
        chunk = s.recv(65536)
        assert chunk, got
        got += chunk
    assert b" 200 " in got.split(b"\r\n")[0], got
    s.close()
    t = time.monotonic()
    status, r = post(addr, C, completion(prompt="Hi", max_tokens=4, temperature=0))
    took = time.monotonic() - t
    assert status == 200, r
    assert took < 5, f"the next request waited {took:.1f} s for the cut one"
    assert r["flash"]["queue_s"] < 5, r["flash"]
    # The engine stopped because the client went away (not at an EOS).
    deadline = time.monotonic() + 10
    while log.read_text(errors="replace").count("request cancelled") <= cancelled_before:
        assert time.monotonic() < deadline, "no 'request cancelled' in the daemon's log"
        time.sleep(0.1)
    assert_alive(addr)


def test_concurrent_clients_over_three_models(daemon):
    _, addr = daemon
    base = f"http://{addr[0]}:{addr[1]}/v1"
    clients, duration = 32, 12.0
    stop_at = time.monotonic() + duration
    started = [0] * clients
    finished = [0] * clients
    errors = []

    def worker(i):
        client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120)
        rng = random.Random(i)
        while time.monotonic() < stop_at:
            model = MODELS[(i + started[i]) % len(MODELS)]
            kind = rng.choice(["chat", "completion"])
            stream = rng.random() < 0.5
            sampling = ({"temperature": 0} if rng.random() < 0.5
                        else {"temperature": 0.8, "top_p": 0.9, "seed": rng.randrange(1 << 30)})
            started[i] += 1
            try:
                if kind == "chat":
                    r = client.chat.completions.create(
                        model=model, messages=[{"role": "user", "content": f"hello {i}"}],
                        max_tokens=8, stream=stream, **sampling)
                else:
                    r = client.completions.create(model=model, prompt=f"count {i}",
                                                  max_tokens=8, stream=stream, **sampling)
                if stream:
                    finish = None
                    for chunk in r:
                        if chunk.choices and chunk.choices[0].finish_reason:
                            finish = chunk.choices[0].finish_reason
                    assert finish in ("stop", "length"), finish
                else:
                    assert r.choices[0].finish_reason in ("stop", "length")
                    assert r.usage.completion_tokens <= 8
                finished[i] += 1
            except Exception as e:  # noqa: BLE001 - every failure is reported
                errors.append(f"client {i} ({model}, {kind}, stream={stream}): {e!r}")

    with concurrent.futures.ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(worker, range(clients)))
    assert errors == [], errors[:5]
    assert started == finished
    assert all(n >= 1 for n in finished), finished
    assert sum(finished) >= clients
    assert_alive(addr)


def test_zz_every_model_still_verifies(daemon):
    flash, addr = daemon
    assert_alive(addr)
    for m in MODELS:
        flash("verify", m)
