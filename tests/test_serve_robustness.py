"""`trtc serve` under bad input, auth, a full queue and SIGTERM: raw HTTP to a real server process
(stories260K built with max_batch_size 1 and max_seq_len 512, an API key, at most 1 waiting request)."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx2 as httpx
import pytest
from serve_helpers import Server, stories260k

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from trtc.compiler.build import build_from_hf
    from trtc.formats.build_config import BuildConfig

    engine = build_from_hf(stories260k(), tmp_path_factory.mktemp("serve") / "engine",
                           build_config=BuildConfig(max_batch_size=1, max_seq_len=512), progress=False)
    s = Server(engine, "--max_queued_requests", "1", env={"TRTC_API_KEY": KEY})
    yield s
    s.stop()


def post(server, path, body=None, raw: bytes | None = None, headers=None, **kw):
    headers = {**AUTH, **(headers or {})}
    if raw is None:
        return httpx.post(server.url + path, json=body, headers=headers, timeout=30, **kw)
    return httpx.post(server.url + path, content=raw, headers={"Content-Type": "application/json", **headers},
                      timeout=30, **kw)


def assert_served(server):
    r = post(server, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text


C = "/v1/completions"
BAD = [  # (path, json body | raw bytes, extra headers, status, words in the message)
    (C, b"{not json", None, 400, "not valid JSON"),
    (C, b"[1, 2]", None, 400, "JSON object"),
    (C, b'{"prompt": "hi"}', {"Content-Type": "text/plain"}, 415, "application/json"),
    (C, {"max_tokens": 3}, None, 400, "prompt"),
    (C, {"prompt": {"a": 1}}, None, 400, "prompt"),
    (C, {"prompt": "hi", "max_tokens": "ten"}, None, 400, "max_tokens"),
    (C, {"prompt": "hi", "max_tokens": 0}, None, 400, "max_tokens"),
    (C, {"prompt": "hi", "temperature": -1}, None, 400, "temperature"),
    (C, {"prompt": "hi", "temperature": 3}, None, 400, "temperature"),
    (C, {"prompt": "hi", "top_p": 0}, None, 400, "top_p"),
    (C, {"prompt": "hi", "top_p": 1.5}, None, 400, "top_p"),
    (C, {"prompt": "hi", "presence_penalty": 5}, None, 400, "presence_penalty"),
    (C, {"prompt": "hi", "frequency_penalty": -3}, None, 400, "frequency_penalty"),
    (C, {"prompt": "hi", "n": 0}, None, 400, "n"),
    (C, {"prompt": "hi", "top_k": -2}, None, 400, "top_k"),
    (C, {"prompt": "hi", "min_p": 2}, None, 400, "min_p"),
    (C, {"prompt": "hi", "repetition_penalty": 0}, None, 400, "repetition_penalty"),
    (C, {"prompt": "hi", "seed": "abc"}, None, 400, "seed"),
    (C, {"prompt": "hi", "stop": 5}, None, 400, "stop"),
    (C, {"prompt": "hi", "logprobs": 21}, None, 400, "logprobs"),
    (C, {"prompt": "hi " * 600, "max_tokens": 4}, None, 400, "max_seq_len 512"),
    (C, {"prompt": [1, 99999], "max_tokens": 4}, None, 400, "token ids"),
    (C, {"prompt": ""}, None, 400, "empty"),
    (C, {"prompt": "hi", "model": "gpt-4"}, None, 404, "gpt-4"),
    (C, {"prompt": "x" * (9 << 20)}, None, 413, "limit"),
    ("/v1/chat/completions", {"max_tokens": 3}, None, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, None, 400, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, None, 400, "chat template"),
    ("/v1/nowhere", {"prompt": "hi"}, None, 404, "Not Found"),
]


@pytest.mark.parametrize("path,body,headers,status,words", BAD, ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_input_gets_an_openai_error_and_the_server_goes_on(server, path, body, headers, status, words):
    if isinstance(body, bytes):
        r = post(server, path, raw=body, headers=headers)
    else:
        r = post(server, path, body, headers=headers)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    assert words.lower() in err["message"].lower() and "Traceback" not in r.text
    assert_served(server)


def test_auth(server):
    body = {"prompt": "hi", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(server.url + C, json=body, headers=headers, timeout=30)
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/v1/models", timeout=30).status_code == 401
    assert httpx.get(server.url + "/v1/models", headers=AUTH, timeout=30).json()["data"][0]["id"] == "test-model"
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200  # outside /v1: no key needed
    assert httpx.get(server.url + "/version", timeout=30).json()["version"]


def _open_stream(server, body, chunks: list, stop: threading.Event):
    """Stream a completion on a thread, appending its data lines to `chunks`, until `stop` is set."""
    def run():
        with httpx.stream("POST", server.url + C, json={**body, "stream": True}, headers=AUTH, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    chunks.append(line[6:])
                if stop.is_set():
                    return
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not cond():
        time.sleep(0.02)
    return cond()


def test_a_full_queue_answers_503_at_once(server):
    long = {"prompt": "Once upon a time", "max_tokens": 490}
    stop, running, waiting = threading.Event(), [], []
    threads = [_open_stream(server, long, running, stop)]  # the one running request (max_batch_size 1)
    assert _wait_for(lambda: running)
    threads.append(_open_stream(server, long, waiting, stop))  # the one waiting request
    assert _wait_for(lambda: server.metric("trtc:num_requests_waiting") == 1, 5)
    start = time.monotonic()
    r = post(server, C, {"prompt": "hi", "max_tokens": 1})
    assert r.status_code == 503 and "capacity" in r.json()["error"]["message"], r.text
    assert time.monotonic() - start < 2
    stop.set()
    for t in threads:
        t.join(30)
    assert _wait_for(lambda: server.metric("trtc:num_requests_running") == 0
                     and server.metric("trtc:num_requests_waiting") == 0, 20)
    assert_served(server)


def test_sigterm_ends_open_streams_and_exits_0(server):
    chunks, stop = [], threading.Event()
    t = _open_stream(server, {"prompt": "Once upon a time", "max_tokens": 490}, chunks, stop)
    assert _wait_for(lambda: len(chunks) > 2)
    server.proc.send_signal(signal.SIGTERM)
    t.join(30)
    assert server.proc.wait(30) == 0, server.output()
    assert chunks[-1] == "[DONE]"
    last = json.loads(chunks[-2])["choices"][0]
    assert last["finish_reason"] in ("abort", "length")


def test_serve_cli_refuses_bad_options_in_one_line(tmp_path):
    from cli_helpers import assert_one_line_error, cli

    bad = tmp_path / "serve.yaml"
    bad.write_text("port: 8000\nmax_queue: 3\n")
    assert_one_line_error(cli("serve", tmp_path, "--config", bad), "max_queue", "known")
    assert_one_line_error(cli("serve", tmp_path / "missing"), "does not exist")
    assert_one_line_error(cli("serve", tmp_path, "--chat_template", tmp_path / "none.jinja"), "--chat_template")


def test_config_file_options_and_flags_win(tmp_path):
    from trtc.serve.server import read_config

    path = tmp_path / "serve.yaml"
    path.write_text("port: 8123\ntp: 2\napi_key: k\nmax_queued_requests: 4\n")
    assert read_config(path) == {"port": 8123, "tp_size": 2, "api_key": "k", "max_queued_requests": 4}


def test_kv_cache_max_tokens_sizes_the_engine_cores_pool(tmp_path):
    from cli_helpers import assert_one_line_error, cli

    from trtc.compiler.build import build_from_hf
    from trtc.formats.build_config import BuildConfig

    engine = build_from_hf(stories260k(), tmp_path / "engine", build_config=BuildConfig(max_batch_size=2, max_seq_len=256),
                           progress=False)
    s = Server(engine, "--kv_cache_max_tokens", "100")
    try:
        assert "KV cache 4 blocks x 32 tokens = 128 tokens" in s.output()
    finally:
        s.stop()
    assert_one_line_error(cli("serve", engine, "--device", "cpu", "--kv_cache_max_tokens", "16"),
                          "--kv_cache_max_tokens 16", "one block")
