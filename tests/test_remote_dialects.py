"""The OpenAI-compatible backend's dialects, without a GPU server: the request bodies sent to vLLM,
SGLang, llama.cpp's llama-server and OpenAI (captured with an httpx.MockTransport and checked
against those servers' documented fields), server detection, refusals before the call, the
regex-to-GBNF converter and the check of constrained replies."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest
from pydantic import BaseModel

from promptkit import LM
from promptkit.backends.base import SamplingParams
from promptkit.backends.remote import (
    NonConformingOutput,
    OpenAIBackend,
    ScoringUnavailable,
    ServerKind,
    UnsupportedByServer,
)
from promptkit.backends.remote.chat import decode_chat, encode_chat
from promptkit.backends.remote.conformance import check_output, sent_schema
from promptkit.backends.remote.gbnf import NotConvertible, choices_to_gbnf, regex_to_gbnf
from promptkit.backends.remote.scoring import continuation_logprob, echoed_prompt
from promptkit.server import BackgroundServer
from promptkit.structured import Constraint


class City(BaseModel):
    name: str
    country: str


CITY = sent_schema(City.model_json_schema())  # what goes on the wire: objects closed, as local decoding does
CITY_JSON = '{"name": "Paris", "country": "France"}'
GBNF = 'root ::= "a" "b"+'
LARK = 'start: "a" "b"+'


class FakeServer:
    """An httpx handler that plays a server: its model card, a few GET endpoints, canned replies,
    and every POST body it received."""

    def __init__(self, card: dict[str, Any], gets: dict[str, dict[str, Any]] | None = None,
                 usage: dict[str, Any] | None = None) -> None:
        self.card, self.gets, self.usage = {"id": "m", "object": "model", **card}, gets or {}, usage or {}
        self.posts: list[tuple[str, dict[str, Any]]] = []
        self.reply = "ok"

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "GET":
            if path == "/v1/models":
                return httpx.Response(200, json={"object": "list", "data": [self.card]})
            return httpx.Response(200, json=self.gets[path]) if path in self.gets else httpx.Response(404)
        body = json.loads(request.content)
        self.posts.append((path, body))
        usage = {"prompt_tokens": 5, "completion_tokens": 2, **self.usage}
        if path == "/v1/chat/completions":
            return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": self.reply},
                                                         "finish_reason": "stop"}], "usage": usage})
        return httpx.Response(200, json={"choices": [{"text": self.reply, "finish_reason": "stop"}], "usage": usage})

    def last(self) -> tuple[str, dict[str, Any]]:
        return self.posts[-1]


def backend(server: FakeServer, **kw: Any) -> OpenAIBackend:
    return OpenAIBackend("m", base_url="http://server.test/v1", transport=httpx.MockTransport(server), **kw)


def generate(b: OpenAIBackend, chat: bool, reply: str, **constraint: Any) -> tuple[str, dict[str, Any]]:
    """Generate once (a chat prompt or plain text) with one constraint; return the endpoint and body sent."""
    b.transport_server.reply = reply  # type: ignore[attr-defined]
    LM("m", backend=b, chat=chat).generate("Where?", max_tokens=8, **constraint)
    return b.transport_server.last()  # type: ignore[attr-defined]


def make(card: dict[str, Any], gets: dict[str, dict[str, Any]] | None = None, **kw: Any) -> OpenAIBackend:
    server = FakeServer(card, gets)
    b = backend(server, **kw)
    b.transport_server = server  # type: ignore[attr-defined]
    return b


VLLM = ({"owned_by": "vllm", "max_model_len": 4096, "root": "m"}, {"/version": {"version": "0.11.0"}})
SGLANG = ({"owned_by": "sglang", "max_model_len": 8192, "root": "m"},
          {"/get_server_info": {"version": "0.5.4", "model_path": "m"}})
LLAMA_SERVER = ({"owned_by": "llamacpp", "meta": {"n_ctx_train": 8192}},
                {"/props": {"default_generation_settings": {"n_ctx": 4096}, "build_info": "b6000-abc"}})
SAMPLING = {"model": "m", "temperature": 0.0, "top_p": 1.0, "max_tokens": 8}
LLAMA_SAMPLING = {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}


# -- finding the server ------------------------------------------------------------------------------
@pytest.mark.parametrize("card, gets, kind, version, context", [
    (*VLLM, ServerKind.VLLM, "0.11.0", 4096),
    (*SGLANG, ServerKind.SGLANG, "0.5.4", 8192),
    (*LLAMA_SERVER, ServerKind.LLAMA_CPP, "b6000-abc", 4096),
    ({"owned_by": "me", "permissions": []}, {"/openapi.json": {"info": {"title": "🦙 llama.cpp Python API",
                                                                        "version": "0.3.36"}}},
     ServerKind.LLAMA_CPP_PYTHON, "0.3.36", 2048),
    ({"owned_by": "promptkit", "max_model_len": 8192, "chat": True}, {}, ServerKind.PROMPTKIT, None, 8192),
    ({"owned_by": "system"}, {}, ServerKind.OPENAI, None, 4096),
    ({"owned_by": "someone"}, {"/version": {"version": "0.9.2"}}, ServerKind.VLLM, "0.9.2", 4096),
    ({"owned_by": "someone"}, {"/get_server_info": {"version": "0.4.9"}}, ServerKind.SGLANG, "0.4.9", 4096),
    ({"owned_by": "someone"}, {}, ServerKind.GENERIC, None, 4096),
])
def test_the_server_kind_is_found_by_a_cheap_probe(card, gets, kind, version, context, caplog):
    with caplog.at_level("INFO", logger="promptkit.remote"):
        b = make(card, gets)
    assert (b.server.kind, b.server.version, b.max_context) == (kind, version, context)
    assert kind.value in caplog.text  # what was found is logged
    assert b.max_concurrency == (1 if kind is ServerKind.LLAMA_CPP_PYTHON else 8)


def test_server_kind_can_be_given():
    b = make({"owned_by": "someone"}, {"/version": {"version": "0.9.0"}}, server_kind="vllm")
    assert (b.server.kind, b.server.version, b.server.evidence) == (ServerKind.VLLM, "0.9.0", "given as server_kind")


# -- vLLM -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chat", [False, True])
def test_vllm_takes_every_constraint_in_structured_outputs(chat):
    b = make(*VLLM)
    endpoint = "/v1/chat/completions" if chat else "/v1/completions"
    cases = [({"json_schema": City}, CITY_JSON, {"json": CITY}), ({"regex": r"19\d\d"}, "1969", {"regex": r"19\d\d"}),
             ({"grammar": LARK}, "abb", {"grammar": LARK}), ({"grammar": GBNF}, "abb", {"grammar": GBNF}),
             ({"choices": ["yes", "no"]}, "no", {"choice": ["yes", "no"]})]
    for constraint, reply, fields in cases:
        path, body = generate(b, chat, reply, **constraint)
        prompt = {"messages": [{"role": "user", "content": "Where?"}]} if chat else {"prompt": "Where?"}
        assert path == endpoint and body == {**SAMPLING, **prompt, "structured_outputs": fields}


def test_vllm_before_0_10_2_takes_guided_fields():
    b = make(VLLM[0], {"/version": {"version": "0.9.2"}})
    assert generate(b, False, "1969", regex=r"19\d\d")[1]["guided_regex"] == r"19\d\d"
    assert generate(b, False, CITY_JSON, json_schema=City)[1]["guided_json"] == CITY
    assert generate(b, True, "no", choices=["yes", "no"])[1]["guided_choice"] == ["yes", "no"]
    assert generate(b, True, "abb", grammar=GBNF)[1]["guided_grammar"] == GBNF


def test_vllm_continues_the_assistant_turn_after_an_answer_prefix():
    from promptkit.types import Prompt

    b = make(*VLLM)
    b.transport_server.reply = " Paris"
    LM("m", backend=b).generate(Prompt.from_parts(question="Capital of France?", answer_prefix="Answer:"), max_tokens=4)
    path, body = b.transport_server.last()
    assert path == "/v1/chat/completions"
    assert body["messages"][-1] == {"role": "assistant", "content": "Answer:"}
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False


def test_vllm_completions_without_max_tokens_ask_for_the_rest_of_the_context():
    b = make(*VLLM)
    LM("m", backend=b, chat=False).generate("Where?", max_tokens=None)
    assert b.transport_server.last()[1]["max_tokens"] is None  # vLLM: null is "up to max_model_len"


# -- SGLang -----------------------------------------------------------------------------------------
def test_sglang_fields():
    b = make(*SGLANG)
    assert generate(b, False, CITY_JSON, json_schema=City)[1]["json_schema"] == json.dumps(CITY)  # a string
    assert generate(b, True, CITY_JSON, json_schema=City)[1]["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "output", "schema": CITY}}
    for chat in (False, True):
        assert generate(b, chat, "1969", regex=r"19\d\d")[1]["regex"] == r"19\d\d"
        assert generate(b, chat, "abb", grammar=GBNF)[1]["ebnf"] == GBNF
        assert generate(b, chat, "no", choices=["yes", "no"])[1]["ebnf"] == 'root ::= "yes" | "no"'
    _, body = generate(b, False, "1969", regex=r"19\d\d")
    assert body == {**SAMPLING, "prompt": "Where?", "regex": r"19\d\d"}


def test_sglang_refuses_a_lark_grammar_before_the_call():
    b = make(*SGLANG)
    sent = len(b.transport_server.posts)
    with pytest.raises(UnsupportedByServer, match="sglang server cannot take a Lark grammar"):
        generate(b, False, "abb", grammar=LARK)
    assert len(b.transport_server.posts) == sent


# -- llama.cpp's llama-server ------------------------------------------------------------------------
def test_llama_server_fields_and_refusals():
    b = make(*LLAMA_SERVER)
    _, body = generate(b, False, CITY_JSON, json_schema=City)
    assert body == {**SAMPLING, **LLAMA_SAMPLING, "prompt": "Where?", "json_schema": CITY}
    assert generate(b, True, CITY_JSON, json_schema=City)[1]["response_format"]["json_schema"]["schema"] == CITY
    assert generate(b, False, "1969", regex=r"19\d\d")[1]["grammar"] == 'root ::= "19" [0-9] [0-9]'
    assert generate(b, True, "no", choices=["yes", "no"])[1]["grammar"] == 'root ::= "yes" | "no"'
    with pytest.raises(UnsupportedByServer, match="llama.cpp server cannot take a Lark grammar"):
        generate(b, False, "abb", grammar=LARK)
    with pytest.raises(UnsupportedByServer, match="back-references"):
        generate(b, False, "aa", regex=r"(a)\1")
    with pytest.raises(ScoringUnavailable, match="llama-server does not echo"):
        LM("m", backend=b, chat=False).score("The sky is", [" blue"])


# -- OpenAI and unknown servers ---------------------------------------------------------------------
def test_openai_takes_only_a_json_schema_on_chat():
    b = make({"owned_by": "system"})
    _, body = generate(b, True, CITY_JSON, json_schema=City)
    assert body["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "output", "schema": CITY, "strict": True}}
    assert body["max_completion_tokens"] == 8 and "max_tokens" not in body
    with pytest.raises(UnsupportedByServer, match="openai server cannot take a regex constraint"):
        generate(b, True, "1969", regex=r"19\d\d")
    with pytest.raises(UnsupportedByServer, match="only on /v1/chat/completions"):
        generate(b, False, CITY_JSON, json_schema=City)
    with pytest.raises(ScoringUnavailable, match="OpenAI's API returns no prompt log-probabilities"):
        LM("m", backend=b, chat=False).score("The sky is", [" blue"])


def test_an_unknown_server_gets_only_response_format():
    b = make({"owned_by": "someone"})
    assert generate(b, False, CITY_JSON, json_schema=City)[1]["response_format"]["json_schema"]["schema"] == CITY
    with pytest.raises(UnsupportedByServer, match="server_kind="):
        generate(b, False, "no", choices=["yes", "no"])


def test_chat_prompts_without_a_tokenizer_go_to_the_chat_endpoint():
    b = make(*VLLM)
    assert b.tokenizer is None and b.is_chat
    text = b.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert decode_chat(text).messages[0] == {"role": "system", "content": "Be brief."}
    with pytest.raises(ScoringUnavailable, match="pass tokenizer="):
        LM("m", backend=b).score("The sky is", [" blue"])


def test_cached_tokens_are_read_from_usage():
    server = FakeServer(*VLLM, usage={"prompt_tokens_details": {"cached_tokens": 3}})
    b = backend(server)
    g = LM("m", backend=b, chat=False).generate(["a", "b"], max_tokens=2)
    assert [x.usage.cached_tokens for x in g] == [3, 3]
    assert b.stats()["cached_tokens"] == 6 and b.stats()["cached_tokens_reported"]


# -- what comes back ----------------------------------------------------------------------------------
def test_a_reply_that_ignores_its_constraint_raises():
    """A fake server in a thread that answers prose to every request, as one that drops a constraint does."""
    from fastapi import FastAPI

    app = FastAPI()
    app.get("/v1/models")(lambda: {"data": [{"id": "m", "owned_by": "vllm", "max_model_len": 2048}]})
    app.get("/version")(lambda: {"version": "0.11.0"})
    prose = {"choices": [{"text": "The capital of France is Paris.", "finish_reason": "stop"}]}
    app.post("/v1/completions")(lambda: prose)
    with BackgroundServer(app) as srv:
        lm = LM("m", backend="openai", base_url=srv.url + "/v1", chat=False)
        with pytest.raises(NonConformingOutput, match="vllm server's output does not match the JSON schema"):
            lm.generate("Capital of France as JSON:", json_schema=City)
        with pytest.raises(NonConformingOutput, match=r"regex '19\\\\d\\\\d'"):
            lm.generate("Year of the moon landing:", regex=r"19\d\d")
        assert lm.generate("Capital of France:")[0].text.startswith("The capital")  # no constraint, no check


def test_check_output():
    schema = Constraint(json_schema=City.model_json_schema())
    check_output(schema, '{ "name":"Paris",\n "country": "France" }\n', finished=True, server="x")
    check_output(schema, '{"name": "Par', finished=False, server="x")  # cut by max_tokens: a prefix will do
    for text, finished in [('{"name": "Paris"}', True), ('{"name": "Paris", "country": "F", "x": 1}', True),
                           ("Paris", False)]:
        with pytest.raises(NonConformingOutput):
            check_output(schema, text, finished=finished, server="x")
    check_output(Constraint(regex=r"19\d\d"), "19", finished=False, server="x")
    with pytest.raises(NonConformingOutput, match="stops before it matches"):
        check_output(Constraint(regex=r"19\d\d"), "19", finished=True, server="x")
    with pytest.raises(NonConformingOutput):
        check_output(Constraint(choices=["yes", "no"]), "maybe", finished=True, server="x")
    check_output(Constraint(grammar=GBNF), "abbb", finished=True, server="x")
    check_output(Constraint(grammar=LARK), "abbb", finished=True, server="x")


# -- regex and choices as GBNF ---------------------------------------------------------------------------
REGEXES = {
    r"19\d\d": ["1969", "19", "196x", "19690"],
    r"[A-Z][a-z]+( [A-Z][a-z]+)*": ["New York", "new", "New  York"],
    r"(yes|no)\.?": ["yes", "no.", "maybe"],
    r"\w+@\w+\.com": ["a_b@x.com", "a@b.org"],
    r".{2,4}": ["ab", "abcde", "a\nb"],
    r"[^\d\s]+": ["abc", "a1", "a b"],
    r'é+"\\-': ['éé"\\-', 'e"\\-'],
    r"^a(?:b|c){2}$": ["abc", "abcd", "ab"],
    r"\D\S?": ["a1", "1a", "a"],
    r"(?P<y>\d{4})-\d{2}": ["2024-01", "24-01"],
    r"x*?y+": ["xxyy", "y", "x"],
}


@pytest.mark.parametrize("pattern", list(REGEXES))
def test_regex_to_gbnf_matches_what_the_regex_matches(pattern):
    from llguidance import LLMatcher, grammar_from

    from promptkit.backends.remote.conformance import _byte_tokenizer

    gbnf = regex_to_gbnf(pattern)
    for s in REGEXES[pattern]:
        m = LLMatcher(_byte_tokenizer(), grammar_from("grammar", gbnf), log_level=0)
        matched = m.consume_tokens(list(s.encode())) and m.is_accepting()
        assert matched == bool(re.fullmatch(pattern, s)), (pattern, gbnf, s)


def test_llama_cpp_parses_the_converted_grammars():
    grammar = pytest.importorskip("llama_cpp.llama_grammar")
    for pattern in REGEXES:
        grammar.LlamaGrammar.from_string(regex_to_gbnf(pattern), verbose=False)
    grammar.LlamaGrammar.from_string(choices_to_gbnf(["yes", 'a "quoted" one', "naïve\n"]), verbose=False)


@pytest.mark.parametrize("pattern, why", [(r"(a)\1", "back-references"), (r"a(?=b)", "look-arounds"),
                                          (r"(?i)abc", "case-insensitive"), (r"a^b", "anchors"),
                                          (r"[\Da]", "negated class")])
def test_regexes_without_a_gbnf_form_are_refused_by_name(pattern, why):
    with pytest.raises(NotConvertible, match=why):
        regex_to_gbnf(pattern)


# -- echoed log-probabilities ------------------------------------------------------------------------
def test_echo_entries_are_placed_by_offsets_or_from_the_end():
    text, choice = "<s>The sky is", " blue"
    # llama-cpp-python's offsets count its detokenization, where the special token <s> is empty
    reply = {"choices": [{"text": text + choice + " and", "logprobs": {
        "tokens": ["The", " sky", " is", " blue", " and"], "text_offset": [0, 3, 7, 10, 15],
        "token_logprobs": [None, -2.0, -1.0, -0.5, -0.1]}}], "usage": {"completion_tokens": 1}}
    echo = echoed_prompt(reply, text + choice)
    assert not echo.by_offsets and echo.starts == [3, 6, 10, 13]
    assert continuation_logprob(echo, text + choice, len(text)) == -0.5
    reply["choices"][0]["logprobs"]["text_offset"] = [3, 6, 10, 13, 18]  # offsets in the prompt as sent
    assert echoed_prompt(reply, text + choice).by_offsets


def test_a_token_that_straddles_the_choice_counts_for_it():
    """'The sky is ' + 'blue' tokenized together: ' blue' starts in the prompt but spells the choice."""
    text, choice = "The sky is ", "blue"
    reply = {"choices": [{"text": text + choice, "logprobs": {
        "tokens": ["The", " sky", " is", " blue"], "text_offset": [0, 3, 7, 10],
        "token_logprobs": [None, -2.0, -1.0, -0.5]}}], "usage": {"completion_tokens": 0}}
    assert continuation_logprob(echoed_prompt(reply, text + choice), text + choice, len(text)) == -0.5


class ShiftingServer(FakeServer):
    """Echoes as llama-cpp-python 0.3 does for a prompt without BOS: the generated token's entry is missing."""

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.method == "POST" else {}
        if not body.get("echo"):
            return super().__call__(request)
        prompt = body["prompt"]
        return httpx.Response(200, json={"choices": [{"text": prompt + " 8", "finish_reason": "length", "logprobs": {
            "tokens": [prompt], "text_offset": [0], "token_logprobs": [None]}}], "usage": {"completion_tokens": 1}})


def test_a_server_that_shifts_echoed_logprobs_is_refused():
    b = backend(ShiftingServer({"owned_by": "someone"}))
    with pytest.raises(ScoringUnavailable, match="next position's log-probability"):
        LM("m", backend=b, chat=False).score("The sky is", [" blue"])


def test_encode_chat_round_trip():
    messages = [{"role": "user", "content": 'quote " and \x00 nul'}]
    chat = decode_chat(encode_chat(messages) + "Answer:")
    assert chat.messages == messages and chat.assistant_prefix == "Answer:"
    assert decode_chat("plain text") is None and decode_chat([1, 2]) is None


def test_sampling_params_reach_the_body():
    b = make(*LLAMA_SERVER)
    b.transport_server.reply = "x"
    b.generate(["Where?"], SamplingParams(max_tokens=3, temperature=0.7, top_p=0.9, stop=["\n"], seed=5,
                                          presence_penalty=0.5, logit_bias={7: 2.0}))
    body = b.transport_server.last()[1]
    assert body == {"model": "m", "prompt": "Where?", "max_tokens": 3, "temperature": 0.7, "top_p": 0.9,
                    "stop": ["\n"], "seed": 5, "presence_penalty": 0.5, "logit_bias": {"7": 2.0}, **LLAMA_SAMPLING}
