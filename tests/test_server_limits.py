"""No request floods the server: every generation counts against the queue, each request is bounded
(prompts, n, body bytes, stop strings), and the event loop stays free for other clients."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from server_helpers import wait_idle

from promptkit.server import BackgroundServer, create_app

QUEUE = 8


@pytest.fixture(scope="module")
def server(real_lm):
    with BackgroundServer(create_app(real_lm, max_queue=QUEUE)) as srv:
        yield srv


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def refused(r: httpx.Response, status: int, flag: str, param: str | None) -> None:
    assert r.status_code == status, r.text[:300]
    err = r.json()["error"]
    assert flag in err["message"] and err["param"] == param, err


def test_a_flood_is_refused_by_name_and_another_client_is_answered_at_once(client, real_lm):
    alone = time.perf_counter()
    assert client.post("/v1/completions", json={"model": real_lm.model, "prompt": "Hi", "max_tokens": 2}).is_success
    alone = time.perf_counter() - alone
    flood = {"model": real_lm.model, "prompt": [f"Tell me about the number {i}." for i in range(2000)], "n": 16,
             "max_tokens": 16}
    refused(client.post("/v1/completions", json=flood), 400, "--max-prompts", "prompt")
    # the largest legal request: one prompt, n filling every place but one, a long generation
    big = {"model": real_lm.model, "prompt": "Once upon a time", "n": QUEUE - 1, "max_tokens": 400,
           "temperature": 1.0, "seed": 3, "stream": True}
    with client.stream("POST", "/v1/completions", json=big) as s:
        lines = s.iter_lines()
        next(line for line in lines if line.startswith("data: "))  # decoding has begun
        st = client.get("/stats").json()["server"]
        assert st["active"] == QUEUE - 1  # each of its generations holds a place
        t0 = time.perf_counter()
        r = client.post("/v1/completions", json={"model": real_lm.model, "prompt": "Hi", "max_tokens": 2})
        waited = time.perf_counter() - t0
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        assert waited < max(2.0, 5 * alone), f"a 2-token request waited {waited:.2f}s beside the big one"
        full = client.post("/v1/completions", json={"model": real_lm.model, "prompt": ["a", "b"], "max_tokens": 2})
        assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"  # 7 + 2 > 8 places
    assert wait_idle(client, 60)["server"]["active"] == 0


@pytest.mark.parametrize("body,flag,param,chat_too", [
    ({"prompt": "hi", "n": 17}, "--max-n", "n", True),
    ({"prompt": ["a", "b", "c"], "n": 3}, "--max-queue", "n", False),  # 9 generations never fit 8 places
    ({"prompt": [[1, 2]] * (QUEUE + 1)}, "--max-queue", "prompt", False),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "--max-stop", "stop", True),
    ({"prompt": "hi", "stop": "x" * 257}, "--max-stop-chars", "stop", True),
])
def test_each_limit_is_a_400_naming_its_flag_and_field(client, real_lm, body, flag, param, chat_too):
    refused(client.post("/v1/completions", json={"model": real_lm.model, "max_tokens": 2, **body}), 400, flag, param)
    if chat_too:
        chat = {"model": real_lm.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                **{k: v for k, v in body.items() if k != "prompt"}}
        refused(client.post("/v1/chat/completions", json=chat), 400, flag, param)


def test_limits_are_options_and_a_large_body_is_refused_before_parsing(real_lm):
    app = create_app(real_lm, max_queue=4, max_prompts=3, max_n=2, max_body_bytes=4096, max_stop=1,
                     max_stop_chars=5)
    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        m = real_lm.model
        refused(c.post("/v1/completions", json={"model": m, "prompt": ["a"] * 4}), 400, "--max-prompts", "prompt")
        refused(c.post("/v1/completions", json={"model": m, "prompt": "a", "n": 3}), 400, "--max-n", "n")
        refused(c.post("/v1/completions", json={"model": m, "prompt": "a", "stop": ["x", "y"]}), 400, "--max-stop",
                "stop")
        refused(c.post("/v1/completions", json={"model": m, "prompt": "a", "stop": "abcdef"}), 400,
                "--max-stop-chars", "stop")
        big = json.dumps({"model": m, "prompt": "word " * 2000}).encode()
        refused(c.post("/v1/completions", content=big, headers={"content-type": "application/json"}), 400,
                "--max-body-bytes", None)
        chunked = c.post("/v1/completions", content=iter([big[:3000], big[3000:]]),  # no Content-Length
                         headers={"content-type": "application/json"})
        refused(chunked, 400, "--max-body-bytes", None)
        ok = c.post("/v1/completions", json={"model": m, "prompt": "a", "n": 2, "max_tokens": 1, "stop": ["x"]})
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 2
        st = c.get("/stats").json()
        assert st["limits"]["max_body_bytes"] == 4096 and st["server"]["client_errors"] >= 6


def test_health_and_stats_answer_within_100ms_during_a_long_prefill(server, client, real_lm):
    prompt = " ".join(f"item{i}" for i in range(400))  # about 1,500 tokens: a prefill of seconds on a CPU
    assert 1200 < real_lm.backend.count_tokens(prompt) < 2000
    first_byte: list[float] = []

    def long_request() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as c, c.stream(
                "POST", "/v1/completions", json={"model": real_lm.model, "prompt": prompt, "max_tokens": 2,
                                                 "stream": True}) as s:
            for _ in s.iter_raw():
                first_byte.append(time.perf_counter())
                break

    worker = threading.Thread(target=long_request)
    started = time.perf_counter()
    worker.start()
    time.sleep(0.5)  # sent, tokenized and in the engine's forward
    timings: list[tuple[str, float, float]] = []  # (path, when asked, seconds taken)
    while not first_byte and len(timings) < 20:
        for path in ("/health", "/stats"):
            t0 = time.perf_counter()
            assert client.get(path).status_code == 200
            timings.append((path, t0, time.perf_counter() - t0))
    worker.join()
    if first_byte[0] - started < 1.0:
        pytest.skip("the prefill took under a second on this machine: too short to measure beside")
    during = [(path, took) for path, asked, took in timings if asked < first_byte[0]]
    slowest = max(during, key=lambda x: x[1])
    assert slowest[1] < 0.1, f"{slowest[0]} took {slowest[1] * 1000:.0f} ms during a prefill"
    st = client.get("/stats").json()
    assert "stats_age_s" in st and "kv_budget_bytes" in st


def test_templating_runs_off_the_event_loop(client, real_lm, monkeypatch):
    template = real_lm.backend.apply_chat_template

    def slow_template(messages):
        time.sleep(1.5)  # a long template render (or a slow tokenizer) must not stall other clients
        return template(messages)

    monkeypatch.setattr(real_lm.backend, "apply_chat_template", slow_template)
    with ThreadPoolExecutor(1) as pool:
        chat = pool.submit(client.post, "/v1/chat/completions",
                           json={"model": real_lm.model, "messages": [{"role": "user", "content": "Hi"}],
                                 "max_tokens": 2})
        time.sleep(0.3)
        t0 = time.perf_counter()
        assert client.get("/health").status_code == 200
        assert time.perf_counter() - t0 < 0.5
        assert chat.result().status_code == 200
