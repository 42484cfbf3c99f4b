"""The OpenAI-compatible backend against llama.cpp's server (llama-cpp-python's ``python -m
llama_cpp.server``, started here on loopback with the embedded SmolLM2 GGUF): chat templates,
constraints honoured or refused before the call, replies checked, and scores that pick the same
label as the local engine on the same GGUF."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel
from shared_data import missing_data

from promptkit import LM
from promptkit.backends.base import SamplingParams
from promptkit.backends.remote import (
    NonConformingOutput,
    ScoringUnavailable,
    ServerKind,
    UnsupportedByServer,
)
from promptkit.backends.remote.llamacpp_server import LlamaCppServer, unavailable_reason
from promptkit.models import DEFAULT_LLM, gguf_source
from promptkit.pipeline import Pipeline
from promptkit.stages import BuildPrompt, Classify
from promptkit.types import Prompt

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))

ALIAS = "smollm2-q4"  # not an embedded model's name: the backend finds no tokenizer by it
QUESTION = "What is the capital of France? Answer in one sentence."


class City(BaseModel):
    name: str
    country: str


@pytest.fixture(scope="module")
def server():
    gguf = gguf_source(DEFAULT_LLM)
    if gguf is None:
        pytest.skip("the embedded SmolLM2 GGUF is not installed")
    with LlamaCppServer(gguf, alias=ALIAS, n_ctx=2048, threads=2) as srv:
        yield srv


@pytest.fixture(scope="module")
def bare(server):
    """No tokenizer: chat prompts go to /v1/chat/completions and the server applies the template."""
    return LM(ALIAS, backend="openai", base_url=server.url + "/v1")


@pytest.fixture(scope="module")
def templated(server):
    """A tokenizer named by the user: the template is applied here and text goes to /v1/completions."""
    return LM(ALIAS, backend="openai", base_url=server.url + "/v1", tokenizer=DEFAULT_LLM)


def test_the_server_is_recognized(bare, templated):
    assert bare.backend.server.kind is ServerKind.LLAMA_CPP_PYTHON and bare.backend.server.version == "0.3.36"
    assert bare.backend.tokenizer is None and bare.chat  # chat prompts as messages
    assert templated.backend.tokenizer is not None and templated.chat


def test_generate_applies_the_chat_template(bare, templated, real_lm):
    want = real_lm.generate(QUESTION, max_tokens=24)[0].text
    for lm in (bare, templated):
        g = lm.generate(QUESTION, max_tokens=24)[0]
        assert "Paris" in g.text, g.text
        assert g.usage.prompt_tokens == real_lm.count_tokens(QUESTION, chat=True)  # the templated prompt
    assert templated.generate(QUESTION, max_tokens=24)[0].text == want
    raw = templated.generate(QUESTION, max_tokens=24, chat=False)[0]  # plain text, no template: what the issue saw
    assert raw.usage.prompt_tokens == real_lm.count_tokens(QUESTION)


def test_json_schema_is_honoured_on_both_endpoints(bare, templated):
    prompt = "Give the capital of France and its country as JSON."
    for lm in (bare, templated):  # chat: response_format with the schema; completions: the schema as GBNF
        g = lm.generate(prompt, json_schema=City, max_tokens=32)[0]
        assert g.finish_reason == "stop"
        City.model_validate(json.loads(g.text))


def test_regex_choices_and_gbnf_are_honoured(bare, templated):
    for lm in (bare, templated):
        year = lm.generate("In which year did Apollo 11 land on the moon?", regex=r"19\d\d", max_tokens=8)[0].text
        assert re.fullmatch(r"19\d\d", year)
        assert lm.generate("Is water wet? Answer yes or no.", choices=["yes", "no"])[0].text in ("yes", "no")
        out = lm.generate("Say a greeting.", grammar='root ::= ("hello" | "hi") " " [a-z]+', max_tokens=12)[0].text
        assert re.fullmatch(r"(hello|hi) [a-z]+", out)


def test_what_the_server_cannot_take_is_refused_before_the_call(bare):
    sent = bare.backend.requests
    with pytest.raises(UnsupportedByServer, match="llama-cpp-python server cannot take a Lark grammar"):
        bare.generate("Say a greeting.", grammar='start: "hello" " " /[a-z]+/')
    with pytest.raises(UnsupportedByServer, match="has no GBNF form"):
        bare.generate("Repeat a letter.", regex=r"(a)\1")
    with pytest.raises(UnsupportedByServer, match="cannot continue a turn"):  # an answer prefix on the chat endpoint
        bare.generate(Prompt.from_parts(question="Capital of France?", answer_prefix="Answer:"))
    assert bare.backend.requests == sent


def test_a_dropped_constraint_is_an_error(server):
    """Told the server is an unidentified one, the backend sends a JSON schema as OpenAI's response_format,
    which llama-cpp-python's /v1/completions ignores: the prose that comes back must raise."""
    lm = LM(ALIAS, backend="openai", base_url=server.url + "/v1", tokenizer=DEFAULT_LLM,
            server_kind="openai-compatible")
    with pytest.raises(NonConformingOutput, match="does not match the JSON schema"):
        lm.generate("Give the capital of France and its country as JSON.", json_schema=City, max_tokens=24)
    with pytest.raises(UnsupportedByServer, match="server_kind="):
        lm.generate("Year?", regex=r"19\d\d")


def test_stream_on_both_endpoints_checks_its_constraint(bare, templated):
    from promptkit.structured import Constraint

    params = SamplingParams(max_tokens=8, constraint=Constraint(regex=r"19\d\d"))
    for lm in (bare, templated):
        events = list(lm.backend.generate_stream(lm.render("In which year did Apollo 11 land?"), params))
        assert events[-1].generation.text == "".join(e.text for e in events[:-1])
        assert re.fullmatch(r"19\d\d", events[-1].generation.text)


def test_score_refuses_what_it_cannot_read(bare, templated):
    with pytest.raises(ScoringUnavailable, match="pass tokenizer="):  # a chat prompt the backend cannot render
        bare.score("The opposite of hot is", [" cold", " blue"])
    with pytest.raises(ScoringUnavailable, match="BOS token '<\\|im_start\\|>'"):  # echo is shifted without BOS
        templated.token_logprobs("The opposite of hot is")


def test_score_matches_the_local_engine(bare, templated, real_lm):
    """The issue's example: chat prompts (the default for this chat model), plain text, and a two-token choice."""
    prompt, choices = "The opposite of hot is", [" cold", " blue", " freezing cold"]
    for lm, chat in ((templated, None), (templated, False), (bare, False)):
        got, want = lm.score(prompt, choices, chat=chat), real_lm.score(prompt, choices, chat=chat)
        assert got == pytest.approx(want, abs=0.5)  # Q4_1 in llama.cpp's arithmetic vs float32
        assert max(range(3), key=got.__getitem__) == max(range(3), key=want.__getitem__)


def test_token_logprobs_of_a_prompt_that_starts_with_bos(templated, real_lm):
    text = "<|im_start|>The opposite of hot is cold"
    got, want = templated.token_logprobs(text)[0], real_lm.token_logprobs(text)[0]
    assert got.token_ids == want.token_ids[1:]  # llama-cpp-python leaves the BOS out of the entries
    assert got.logprobs[1:] == pytest.approx(want.logprobs[2:], abs=0.5)


def test_classify_agrees_with_the_local_engine_on_sst2(templated, real_lm):
    """50 SST-2 test sentences, two labels, raw scores (calibrate=False): the label picked from llama.cpp's
    scores equals the local engine's (float32 weights de-quantized from the same Q4_1 GGUF). A disagreement
    can only come from a near tie that the server's quantized arithmetic (Q4_1 weights times Q8 activations)
    tips the other way."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    from evaldata import load_sst2

    try:
        items = load_sst2()[1][:50]
    except FileNotFoundError as e:  # PROMPTKIT_DATA unset, or no SST-2 under it
        missing_data(e)
    build = BuildPrompt(instruction="Is the sentiment of this movie review negative or positive?",
                        input_format="Review: {text}", answer_prefix="Sentiment:")
    prompts = [build.build({"text": x["text"]}) for x in items]
    got, usage = templated.score_with_usage(prompts, [" negative", " positive"])
    want = real_lm.score_many(prompts, [" negative", " positive"])

    def pick(row: list[float]) -> int:
        return max(range(len(row)), key=row.__getitem__)

    same = [pick(a) == pick(b) for a, b in zip(got, want)]
    flipped_margins = [abs(w[0] - w[1]) for w, ok in zip(want, same) if not ok]
    assert sum(same) >= 48, flipped_margins
    assert all(m < 0.25 for m in flipped_margins)  # only near ties flip (here: one, by 0.017 nats)
    assert all(u.prompt_tokens > 0 for u in usage)

    from promptkit.lm import _shared

    _shared[(ALIAS, "openai", "{}")] = templated  # the stage's backend="openai" finds this LM
    try:
        stage = Classify(labels=["negative", "positive"], calibrate=False, model=ALIAS, backend="openai")
        labels = [r.output for r in Pipeline(build, stage).run([{"text": x["text"]} for x in items[:8]])]
    finally:
        _shared.pop((ALIAS, "openai", "{}"), None)
    assert labels == [["negative", "positive"][pick(r)] for r in got[:8]]
