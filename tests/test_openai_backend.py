"""The OpenAI-compatible backend against `promptkit serve` on loopback: same answers and scores as the local LM."""

from __future__ import annotations

import pytest

from promptkit import LM
from promptkit.backends.base import ContextLengthError, SamplingParams
from promptkit.backends.openai import OpenAIBackend, ServerError
from promptkit.lm import _shared
from promptkit.pipeline import Pipeline
from promptkit.server import BackgroundServer, create_app
from promptkit.stages import BuildPrompt, Generate

KEY = "k-123"


@pytest.fixture(scope="module")
def server(real_lm):
    with BackgroundServer(create_app(real_lm, api_key=KEY)) as srv:
        yield srv


@pytest.fixture(scope="module")
def remote(server, real_lm):
    return LM(real_lm.model, backend="openai", base_url=server.url + "/v1", api_key=KEY)


def test_remote_generate_matches_local(remote, real_lm):
    qs = ["What is the capital of France?", "Name a colour."]
    assert remote.chat and remote.backend.max_context == real_lm.backend.max_context
    got, want = remote.generate(qs, max_tokens=8), real_lm.generate(qs, max_tokens=8)
    assert [g.text for g in got] == [w.text for w in want]
    assert got[0].usage.completion_tokens == len(want[0].token_ids)


def test_remote_score_and_token_logprobs_match_local(remote, real_lm):
    prompt, choices = "The capital of France is", [" Paris", " London", " a city"]
    assert remote.score(prompt, choices, chat=False) == pytest.approx(real_lm.score(prompt, choices, chat=False),
                                                                     abs=1e-3)
    got, want = remote.token_logprobs("Hello world, this is")[0], real_lm.token_logprobs("Hello world, this is")[0]
    assert got.token_ids == want.token_ids and got.offsets == want.offsets
    assert got.logprobs[1:] == pytest.approx(want.logprobs[1:], abs=1e-4)


def test_remote_stream_and_stats(remote, real_lm):
    events = list(remote.backend.generate_stream("One, two, three,", SamplingParams(max_tokens=5)))
    want = real_lm.generate("One, two, three,", max_tokens=5, chat=False)[0].text
    assert "".join(e.text for e in events) == events[-1].generation.text == want
    assert remote.stats()["server"]["ok"] >= 1


def test_pipeline_runs_unchanged_on_the_remote_backend(server, real_lm):
    _shared[(real_lm.model, "openai", "{}")] = LM(real_lm.model, backend="openai", base_url=server.url + "/v1",
                                            api_key=KEY)
    try:
        build = lambda backend: Pipeline(BuildPrompt(input_format="Question: {question}", answer_prefix="Answer:"),
                                         Generate(max_tokens=8, backend=backend))
        remote_out = build("openai")("What colour is the sky?").output
        assert remote_out == build("local")("What colour is the sky?").output
    finally:
        _shared.pop((real_lm.model, "openai", "{}"), None)


def test_clear_errors(server, real_lm):
    with pytest.raises(ContextLengthError, match="context"):
        LM(real_lm.model, backend="openai", base_url=server.url + "/v1", api_key=KEY).generate("word " * 9000)
    with pytest.raises(ServerError, match="API key"):
        OpenAIBackend(real_lm.model, base_url=server.url + "/v1", api_key="wrong")
    with pytest.raises(ValueError, match="does not serve 'nope'"):
        OpenAIBackend("nope", base_url=server.url + "/v1", api_key=KEY)
    with pytest.raises(ServerError, match="cannot reach"):
        OpenAIBackend(real_lm.model, base_url="http://127.0.0.1:9/v1", timeout=5)


def test_score_says_when_the_server_has_no_prompt_logprobs():
    """A server that, like OpenAI's hosted API, answers echo requests without prompt logprobs."""
    from fastapi import FastAPI

    app = FastAPI()
    app.get("/v1/models")(lambda: {"data": [{"id": "m", "max_model_len": 2048}]})
    app.post("/v1/completions")(lambda: {"choices": [{"text": "x", "logprobs": None, "finish_reason": "stop"}]})
    with BackgroundServer(app) as srv:
        lm = LM("m", backend="openai", base_url=srv.url + "/v1", chat=False)
        assert lm.backend.server.kind == "openai-compatible"  # no probe recognized it
        assert lm.generate("hi", max_tokens=2)[0].text == "x"
        with pytest.raises(NotImplementedError, match=f"{srv.url}/v1 does not return them"):
            lm.score("The sky is", [" blue", " green"])


def test_promptkit_serve_is_recognized_and_honours_constraints(remote):
    """promptkit serve takes vLLM's guided_* fields and response_format, and reports cached tokens."""
    from pydantic import BaseModel

    class City(BaseModel):
        name: str

    assert remote.backend.server.kind == "promptkit"
    assert remote.generate("In which year did Apollo 11 land?", regex=r"19\d\d", max_tokens=8)[0].text.isdigit()
    assert remote.generate("Is water wet?", choices=["yes", "no"])[0].text in ("yes", "no")
    City.model_validate_json(remote.generate("The capital of France as JSON:", json_schema=City)[0].text)
    remote.generate(["Name a colour.", "Name a colour, please."], max_tokens=2)
    assert remote.stats()["cached_tokens_reported"]
