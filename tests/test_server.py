"""`promptkit serve` over real HTTP on loopback: answers match the LM, streaming, auth, 4xx errors, 429."""

from __future__ import annotations

import json
import socket

import httpx
import pytest
from server_helpers import wait_idle

from promptkit.server import BackgroundServer, create_app

KEY = "test-key"


@pytest.fixture(scope="module")
def server(real_lm):
    with BackgroundServer(create_app(real_lm, api_key=KEY, max_queue=8)) as srv:
        yield srv


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


def sse(lines) -> list[dict]:
    """Parse server-sent events; checks the stream ends with [DONE]."""
    events = [ln[len("data: "):] for ln in lines if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_models_and_auth(server, client, real_lm):
    cards = client.get("/v1/models").json()["data"]
    assert cards[0]["id"] == real_lm.model and cards[0]["max_model_len"] == real_lm.backend.max_context
    assert httpx.get(server.url + "/v1/models").status_code == 401
    bad = httpx.post(server.url + "/v1/completions", headers={"Authorization": "Bearer nope"},
                     json={"model": real_lm.model, "prompt": "hi"})
    assert bad.status_code == 401 and bad.json()["error"]["type"] == "authentication_error"


def test_completion_matches_the_lm(client, real_lm):
    prompt = "The capital of France is"
    want = real_lm.generate(prompt, max_tokens=6, chat=False, logprobs=True)[0]
    r = client.post("/v1/completions", json={"model": real_lm.model, "prompt": prompt, "max_tokens": 6,
                                             "logprobs": 1})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == want.text
    assert choice["logprobs"]["token_logprobs"] == pytest.approx(want.logprobs, abs=1e-3)
    assert r.json()["usage"]["completion_tokens"] == len(want.token_ids)


def test_chat_matches_the_lm_and_stream_matches_chat(client, real_lm):
    msgs = [{"role": "user", "content": "Name a fruit."}]
    want = real_lm.generate(real_lm.backend.apply_chat_template(msgs), max_tokens=8, chat=False)[0].text
    body = {"model": real_lm.model, "messages": msgs, "max_tokens": 8}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": want}
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        chunks = sse(list(s.iter_lines()))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_echo_returns_prompt_logprobs(client, real_lm):
    text = "Paris is the capital of France."
    want = real_lm.token_logprobs(text)[0]
    r = client.post("/v1/completions", json={"model": real_lm.model, "prompt": text, "max_tokens": 0,
                                             "echo": True, "logprobs": 1})
    lp = r.json()["choices"][0]["logprobs"]
    assert r.json()["choices"][0]["text"] == text
    assert lp["token_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx(want.logprobs[1:], abs=1e-4)
    assert "".join(lp["tokens"]) == text and lp["text_offset"][0] == 0


def test_completion_and_chat_return_top_logprobs(client, real_lm):
    want = real_lm.generate("The capital of France is", max_tokens=4, chat=False, top_logprobs=3)[0]
    assert len(want.top_logprobs) == len(want.token_ids) == len(want.logprobs)
    r = client.post("/v1/completions", json={"model": real_lm.model, "prompt": "The capital of France is",
                                             "max_tokens": 4, "logprobs": 3})
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["top_logprobs"] == [pytest.approx(t, abs=1e-4) for t in want.top_logprobs]
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert len(top) == 3 and max(top.values()) == pytest.approx(logprob, abs=1e-5)  # greedy: the top one
        assert top[token] == pytest.approx(logprob, abs=1e-5)
    msgs = [{"role": "user", "content": "Say hello."}]
    r = client.post("/v1/chat/completions", json={"model": real_lm.model, "messages": msgs, "max_tokens": 3,
                                                  "logprobs": True, "top_logprobs": 2})
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert content and all(len(c["top_logprobs"]) == 2 for c in content)
    assert all(c["top_logprobs"][0]["logprob"] == pytest.approx(c["logprob"], abs=1e-5) for c in content)
    bad = client.post("/v1/chat/completions", json={"model": real_lm.model, "messages": msgs, "top_logprobs": 2})
    assert bad.status_code == 400 and "logprobs" in bad.text


def test_streamed_chunks_carry_the_logprobs_of_their_tokens(client, real_lm):
    prompt = "The capital of France is"
    body = {"model": real_lm.model, "prompt": prompt, "max_tokens": 6, "logprobs": 2}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
        chunks = [c["choices"][0] for c in sse(list(s.iter_lines()))]
    lps = [c["logprobs"] for c in chunks if c["logprobs"]]
    assert "".join(c["text"] for c in chunks) == whole["text"]
    assert [t for lp in lps for t in lp["token_ids"]] == whole["logprobs"]["token_ids"]
    assert [x for lp in lps for x in lp["token_logprobs"]] == pytest.approx(whole["logprobs"]["token_logprobs"],
                                                                             abs=1e-5)
    assert [x for lp in lps for x in lp["top_logprobs"]] == [pytest.approx(t, abs=1e-5)
                                                             for t in whole["logprobs"]["top_logprobs"]]
    assert [x for lp in lps for x in lp["text_offset"]] == whole["logprobs"]["text_offset"]

    msgs = [{"role": "user", "content": "Say hello."}]
    chat = {"model": real_lm.model, "messages": msgs, "max_tokens": 4, "logprobs": True, "top_logprobs": 2}
    whole = client.post("/v1/chat/completions", json=chat).json()["choices"][0]["logprobs"]["content"]
    with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as s:
        chunks = [c["choices"][0] for c in sse(list(s.iter_lines()))]
    streamed = [e for c in chunks if c["logprobs"] for e in c["logprobs"]["content"]]
    assert [e["token"] for e in streamed] == [e["token"] for e in whole]
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in whole], abs=1e-5)
    assert all(len(e["top_logprobs"]) == 2 for e in streamed)
    with client.stream("POST", "/v1/chat/completions", json={**chat, "logprobs": False, "top_logprobs": None,
                                                            "stream": True}) as s:
        assert all(c["choices"][0]["logprobs"] is None for c in sse(list(s.iter_lines())))


def test_stop_sequence_and_cache_stats(client, real_lm):
    body = {"model": real_lm.model, "prompt": "Count: 1, 2, 3, 4,", "max_tokens": 12, "stop": [","]}
    first = client.post("/v1/completions", json=body).json()
    again = client.post("/v1/completions", json=body).json()
    assert "," not in first["choices"][0]["text"] and first["choices"][0]["finish_reason"] == "stop"
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # the repeated prompt hits the cache
    st = client.get("/stats").json()
    for key in ("tokens_requested", "tokens_cached", "tokens_prefilled", "evictions"):
        assert isinstance(st.get(key, 0), int)
    assert st["server"]["ok"] >= 2 and st["max_queue"] == 8


BAD = [
    ("/v1/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "does not exist"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "max_tokens": 10**6}, 400, "exceeds the model's context"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "max_tokens": 0}, 400, "echo"),
    ("/v1/completions", {"model": "M", "prompt": "word " * 9000, "max_tokens": 4}, 400, "maximum context length"),
    ("/v1/completions", {"model": "M", "prompt": "  "}, 400, "prompt is empty"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "top_k": 5}, 400, "unsupported parameter 'top_k'"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "frequency_penalty": 3}, 400, "frequency_penalty"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "n": 99}, 400, "n"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "logprobs": 30}, 400, "logprobs"),
    ("/v1/completions", {"model": "M", "prompt": [1, 10**9]}, 400, "token ids"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "guided_regex": "(?<=a)b"}, 400, "look-around"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "guided_regex": "a", "guided_choice": ["a"]}, 400,
     "at most one"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "image_url"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user", "content": "x"}], "tool_choice": "required"},
     400, "needs tools"),
    ("/v1/completions", {"model": "M"}, 400, "prompt"),
    ("/v1/chat/completions", {"model": "M", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user", "content": "x"}], "stop": list("abcde")},
     400, "stop"),
]


@pytest.mark.parametrize("path,body,status,words", BAD)
def test_bad_requests_get_clear_4xx(client, real_lm, path, body, status, words):
    if isinstance(body, dict):
        body = json.dumps({**body, "model": real_lm.model} if body.get("model") == "M" else body).encode()
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["type"] == "invalid_request_error"


def test_queue_full_answers_429_then_recovers(real_lm):
    with BackgroundServer(create_app(real_lm, max_queue=1)) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
        body = {"model": real_lm.model, "prompt": "Once upon a time, in a land far away,", "max_tokens": 300, "stream": True}
        with c.stream("POST", "/v1/completions", json=body) as s:
            next(s.iter_lines())  # the stream holds the only slot
            r = c.post("/v1/completions", json={"model": real_lm.model, "prompt": "hi", "max_tokens": 2})
            assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        st = wait_idle(c)
        assert st["server"]["active"] == 0 and st["server"]["rejected_429"] == 1
        ok = c.post("/v1/completions", json={"model": real_lm.model, "prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200


def test_client_killed_mid_stream_frees_its_slot(server, client, real_lm):
    body = json.dumps({"model": real_lm.model, "messages": [{"role": "user", "content": "Write a long poem."}],
                       "max_tokens": 400, "stream": True}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    sock.sendall(head + body)
    got = b""
    while got.count(b"data: ") < 3:  # the role chunk and two tokens
        got += sock.recv(4096)
    assert b"200 OK" in got
    before = client.get("/stats").json()["server"]
    assert before["active"] == 1
    # Die like a killed process: reset the connection without a goodbye.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()
    st = wait_idle(client)
    assert st["server"]["active"] == 0 and st.get("running", 0) == 0
    assert st["server"]["cancelled"] == before["cancelled"] + 1
    assert st["server"]["ok"] == before["ok"]
