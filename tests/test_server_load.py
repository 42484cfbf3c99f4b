"""Load and fault tests on loopback: concurrent clients against a small queue, and a malformed-request fuzz."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from promptkit.server import BackgroundServer, create_app

PROMPTS = ["The capital of France is", "Water boils at", "The opposite of hot is", "One, two, three,"]


@pytest.fixture(scope="module")
def small_server(real_lm):
    with BackgroundServer(create_app(real_lm, max_queue=3)) as srv:
        yield srv


def test_concurrent_clients_get_a_correct_answer_or_429(small_server, real_lm):
    want = {p: g.text for p, g in zip(PROMPTS, real_lm.generate(PROMPTS, max_tokens=4, chat=False))}
    clients, per_client = 8, 3

    def client(i: int) -> list[tuple[str, int, str]]:
        out = []
        with httpx.Client(base_url=small_server.url, timeout=120) as c:
            for j in range(per_client):
                p = PROMPTS[(i + j) % len(PROMPTS)]
                r = c.post("/v1/completions", json={"model": real_lm.model, "prompt": p, "max_tokens": 4})
                out.append((p, r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else
                            r.json()["error"]["code"]))
        return out

    rss_before = psutil.Process().memory_info().rss
    with ThreadPoolExecutor(clients) as pool:
        results = [x for batch in pool.map(client, range(clients)) for x in batch]
    rss_growth_mb = (psutil.Process().memory_info().rss - rss_before) / 2**20
    assert len(results) == clients * per_client  # none lost
    ok = [(p, text) for p, status, text in results if status == 200]
    rejected = [text for _, status, text in results if status == 429]
    assert len(ok) + len(rejected) == len(results)
    assert all(code == "queue_full" for code in rejected)
    assert ok and all(text == want[p] for p, text in ok)  # batched answers equal one-at-a-time answers
    with httpx.Client(base_url=small_server.url) as c:
        st_ = c.get("/stats").json()
    assert st_["server"]["active"] == 0 and st_.get("running", 0) == 0
    assert st_["server"]["rejected_429"] == len(rejected)
    # Memory stays bounded: the cache within its budget, the process without a leak per request.
    assert st_["kv_high_water_bytes"] <= st_["kv_budget_bytes"]
    assert rss_growth_mb < 256, f"the server process grew by {rss_growth_mb:.0f} MB under load"


JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False) |
                    st.text(max_size=8), lambda kids: st.lists(kids, max_size=3) |
                    st.dictionaries(st.text(max_size=6), kids, max_size=3), max_leaves=6)
FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream",
          "echo", "logprobs", "user", "bogus"]


@st.composite
def bodies(draw, model: str) -> bytes:
    """Mostly near-valid requests with some fields mangled; sometimes raw bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=40))
    body = {"model": model, "prompt": "Hi", "max_tokens": 1}
    for key in draw(st.lists(st.sampled_from(FIELDS), max_size=3, unique=True)):
        body[key] = draw(JSON | st.sampled_from([model, "x", [], [{"role": "user", "content": "hi"}], -1, 0, 1]))
    if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 4:
        body["max_tokens"] = 4  # keep valid requests cheap; too large values are tested elsewhere
    return json.dumps(body).encode()


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_malformed_request_fuzz_never_500s_or_hangs(small_server, real_lm, path):
    with httpx.Client(base_url=small_server.url, timeout=60) as c:

        @settings(max_examples=40, deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(bodies(real_lm.model))
        def check(body: bytes) -> None:
            r = c.post(path, content=body, headers={"content-type": "application/json"})
            assert r.status_code in (200, 400, 404, 429), (r.status_code, body, r.text)
            if r.headers["content-type"].startswith("text/event-stream"):
                assert r.text.rstrip().endswith("data: [DONE]")
            elif r.status_code != 200:
                err = r.json()["error"]
                assert err["message"] and err["type"] in ("invalid_request_error", "rate_limit_error")

        check()
