"""Two engine replicas behind Ray Serve on a real local cluster (``ray.init(num_cpus=2)``): they answer
through the gateway and the prefix-aware router, with the single server's wire format, API key and
limits, streaming included; requests sharing a prompt prefix go to the replica that holds it."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

ray = pytest.importorskip("ray")

from promptkit.distributed.serve import build_app, routing_text_of  # noqa: E402

pytestmark = pytest.mark.slow

KEY = "replica-key"
MODEL = "smollm2-135m-instruct"
SYSTEM = ("You are the support assistant of a small bookshop. You answer questions about orders, opening "
          "hours, returns and gift cards. Keep every answer to one short sentence, be polite, and never "
          "invent a policy: if you do not know, say that a person from the shop will reply by e-mail.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url():
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(MODEL, replicas=2, router="prefix", api_key=KEY, max_queue=8, max_body_bytes=64 << 10),
              name="promptkit-test", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture()
def client(url):
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=300) as c:
        yield c


def chat(question: str, **extra) -> dict:
    return {"model": MODEL, "max_tokens": 8, **extra,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]}


def test_replicas_answer_through_the_router(client):
    r = client.post("/v1/chat/completions", json=chat("What is the capital of France?"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"]
    assert body["usage"]["prompt_tokens"] > 0 and "cached_tokens" in body["usage"]["prompt_tokens_details"]
    done = client.post("/v1/completions", json={"model": MODEL, "prompt": "The capital of France is",
                                                 "max_tokens": 4})
    assert done.status_code == 200 and done.json()["object"] == "text_completion"


def test_a_shared_prefix_goes_to_the_replica_that_holds_it(client):
    shared = client.post("/v1/chat/completions", json=chat("Are you open on Sunday?"))
    assert shared.status_code == 200
    cached = [client.post("/v1/chat/completions", json=chat(q)).json()["usage"]["prompt_tokens_details"]["cached_tokens"]
              for q in ("Can I return a book?", "Do you sell gift cards?", "Where is my order?", "Do you ship abroad?")]
    system_tokens = 60  # the system prompt alone is longer than this
    assert all(c >= system_tokens for c in cached), cached  # random routing would miss on one replica in two


def test_the_api_key_and_limits_are_the_single_servers(url):
    assert httpx.get(url + "/v1/models").status_code == 401
    r = httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   content=b"x" * (65 << 10), timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "body_too_large"
    bad = httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                     json={**chat("hi"), "temperature": -1}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "temperature"


def test_streaming_comes_back_through_the_gateway(client):
    with client.stream("POST", "/v1/chat/completions", json=chat("Count to three.", stream=True)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) > 2
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["object"] == "chat.completion.chunk"


def test_routing_text_is_the_prompt_in_order():
    body = json.dumps(chat("Hello?")).encode()
    text = routing_text_of("/v1/chat/completions", body)
    assert text.startswith("system:" + SYSTEM) and text.endswith("user:Hello?\n")
    assert routing_text_of("/v1/completions", b'{"prompt": ["abc", "d"]}') == "abc"
    assert routing_text_of("/v1/models", b"") == "" and routing_text_of("/v1/completions", b"{not json") == ""
