"""A fault inside the engine reaches HTTP clients as an error response, and the server goes on."""

from __future__ import annotations

import httpx
import pytest

from promptkit.server import BackgroundServer, create_app


@pytest.fixture(scope="module")
def server(real_lm):
    with BackgroundServer(create_app(real_lm)) as srv:
        yield srv


@pytest.fixture()
def broken_forward(real_lm):
    """Make the engine's next forward raise, once; restore the runner afterwards."""
    runner = real_lm.backend.engine.runner
    original, state = runner.forward, {"armed": True}

    def forward(batch):
        if state["armed"]:
            state["armed"] = False
            raise RuntimeError("device lost")
        return original(batch)

    runner.forward = forward
    yield
    runner.forward = original


def test_a_failed_forward_is_an_error_response_not_a_200(server, real_lm, broken_forward):
    body = {"model": real_lm.model, "prompt": "The capital of France is", "max_tokens": 4}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 500 and "device lost" in r.json()["error"]["message"]
    ok = httpx.post(server.url + "/v1/completions", json=body, timeout=120)  # the engine goes on
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("length", "stop")
    real_lm.backend.engine.check_integrity()


def test_a_stream_that_fails_before_its_first_token_is_an_error_response(server, real_lm, broken_forward):
    body = {"model": real_lm.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
            "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as r:
        r.read()
    assert r.status_code == 500 and "device lost" in r.json()["error"]["message"]
    real_lm.backend.engine.check_integrity()
