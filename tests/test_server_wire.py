"""`promptkit serve` takes the OpenAI wire format as clients send it (raw HTTP, every row of the field table)."""

from __future__ import annotations

import json
import time

import httpx
import jsonschema
import pytest

import promptkit.engine.outputs as engine_mod
from promptkit.server import BackgroundServer, create_app

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
          "required": ["city", "country"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Local time in a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                        "required": ["city"]}}}


@pytest.fixture(scope="module")
def server(real_lm):
    with BackgroundServer(create_app(real_lm, max_queue=16)) as srv:
        yield srv


@pytest.fixture()
def post(server, real_lm):
    with httpx.Client(base_url=server.url, timeout=300) as c:
        def call(path: str, body: dict) -> httpx.Response:
            return c.post(path, json={"model": real_lm.model, **body})
        call.client = c
        yield call


def ok(r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def sse_events(lines) -> list[str]:
    return [ln[len("data: "):] for ln in lines if ln.startswith("data: ")]


def test_response_format_json_schema_and_json_object(post):
    msgs = [{"role": "user", "content": "Paris is in France. Which city and country is that?"}]
    out = ok(post("/v1/chat/completions", {"messages": msgs, "response_format": {
        "type": "json_schema", "json_schema": {"name": "place", "schema": SCHEMA, "strict": True}}}))
    choice = out["choices"][0]
    assert choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)
    out = ok(post("/v1/chat/completions", {"messages": msgs, "max_tokens": 60,
                                           "response_format": {"type": "json_object"}}))
    assert isinstance(json.loads(out["choices"][0]["message"]["content"]), dict)


def test_vllm_guided_extras_constrain_like_the_native_fields(post):
    out = ok(post("/v1/completions", {"prompt": "The sky is", "max_tokens": 5, "guided_choice": ["blue", "green"]}))
    assert out["choices"][0]["text"] in ("blue", "green")
    out = ok(post("/v1/completions", {"prompt": "Year of the moon landing:", "max_tokens": 8,
                                      "guided_regex": r"19[0-9]{2}"}))
    assert len(out["choices"][0]["text"]) == 4 and out["choices"][0]["text"].startswith("19")
    out = ok(post("/v1/completions", {"prompt": "Paris is in France. As JSON:", "guided_json": SCHEMA, "max_tokens": 40}))
    jsonschema.validate(json.loads(out["choices"][0]["text"]), SCHEMA)
    out = ok(post("/v1/completions", {"prompt": "Answer yes or no:", "max_tokens": 4,
                                      "guided_grammar": 'root ::= "yes" | "no"'}))
    assert out["choices"][0]["text"] in ("yes", "no")


def test_tools_named_required_and_history(post):
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    out = ok(post("/v1/chat/completions", {"messages": msgs, "tools": [WEATHER, TIME], "tool_choice": {
        "type": "function", "function": {"name": "get_weather"}}}))
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather" and call["id"]
    args = json.loads(call["function"]["arguments"])
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    out = ok(post("/v1/chat/completions", {"messages": msgs, "tools": [WEATHER, TIME], "tool_choice": "required"}))
    assert out["choices"][0]["message"]["tool_calls"][0]["function"]["name"] in ("get_weather", "get_time")
    # the call and its result come back in the history, as agents send them
    history = msgs + [{"role": "assistant", "content": None, "tool_calls": [call]},
                      {"role": "tool", "tool_call_id": call["id"], "content": "18 degrees and sunny"}]
    out = ok(post("/v1/chat/completions", {"messages": history, "tools": [WEATHER], "max_tokens": 20}))
    assert out["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")
    none = ok(post("/v1/chat/completions", {"messages": msgs, "tools": [WEATHER], "tool_choice": "none",
                                            "max_tokens": 8}))
    assert isinstance(none["choices"][0]["message"]["content"], str)


def test_max_completion_tokens_is_max_tokens_and_no_limit_runs_to_eos(post):
    msgs = [{"role": "user", "content": "Write one sentence about Paris."}]
    a = ok(post("/v1/chat/completions", {"messages": msgs, "max_completion_tokens": 5}))
    b = ok(post("/v1/chat/completions", {"messages": msgs, "max_tokens": 5}))
    assert a["choices"][0]["message"] == b["choices"][0]["message"] and a["usage"]["completion_tokens"] == 5
    free = ok(post("/v1/chat/completions", {"messages": msgs}))
    assert free["choices"][0]["finish_reason"] == "stop" and free["usage"]["completion_tokens"] > 16


def test_stream_options_include_usage(post):
    body = {"model": "", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}
    body["model"] = post.client.get("/v1/models").json()["data"][0]["id"]
    with post.client.stream("POST", "/v1/chat/completions", json=body) as s:
        events = sse_events(s.iter_lines())
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 4
    assert all("usage" not in json.loads(e) for e in events[:-2])


def test_n_prompt_lists_and_token_id_prompts(post, real_lm):
    out = ok(post("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 6, "n": 3, "temperature": 1.0,
                                      "seed": 7}))
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert len({c["text"] for c in out["choices"]}) > 1  # seeded, but each choice its own draw
    prompts = ["The capital of France is", "Two plus two is"]
    out = ok(post("/v1/completions", {"prompt": prompts, "max_tokens": 4, "n": 2}))
    texts = [c["text"] for c in sorted(out["choices"], key=lambda c: c["index"])]
    want = [g.text for g in real_lm.generate(prompts, max_tokens=4, chat=False)]
    assert texts == [want[0], want[0], want[1], want[1]]
    ids = [real_lm.backend.encode(p) for p in prompts]
    by_ids = ok(post("/v1/completions", {"prompt": ids, "max_tokens": 4}))
    assert [c["text"] for c in by_ids["choices"]] == want
    one = ok(post("/v1/completions", {"prompt": ids[0], "max_tokens": 4}))
    assert one["choices"][0]["text"] == want[0] and one["usage"]["prompt_tokens"] == len(ids[0])


def test_text_parts_and_developer_role_read_as_plain_messages(post):
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit.\nOnly one."}]
    parts = [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
             {"role": "user", "content": [{"type": "text", "text": "Name a fruit."}, {"type": "text", "text": "Only one."}]}]
    a = ok(post("/v1/chat/completions", {"messages": plain, "max_tokens": 6}))
    b = ok(post("/v1/chat/completions", {"messages": parts, "max_tokens": 6}))
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]


def test_echo_with_new_tokens_returns_prompt_and_generated_logprobs(post, real_lm):
    """What lm-eval's local-completions sends for multiple choice: echo, max_tokens=1, logprobs=1, token ids."""
    text = "Paris is the capital of France."
    ids = real_lm.backend.encode(text)
    want = real_lm.token_logprobs(text, top_logprobs=1)[0]
    out = ok(post("/v1/completions", {"prompt": [ids], "echo": True, "max_tokens": 1, "logprobs": 1,
                                      "temperature": 0, "seed": 1234}))
    choice = out["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"].startswith(text) and len(lp["token_logprobs"]) == len(ids) + 1
    assert lp["token_ids"][: len(ids)] == ids and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1 : len(ids)] == pytest.approx(want.logprobs[1:], abs=1e-4)
    for tok, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert len(top) == 1 and max(top.values()) >= tok - 1e-6
    greedy = [i for i in range(1, len(ids)) if lp["token_logprobs"][i] == max(lp["top_logprobs"][i].values())]
    assert greedy  # lm-eval's is_greedy compares exactly these numbers
    assert lp["text_offset"][0] == 0 and lp["text_offset"][len(ids)] == len(text)


def test_penalties_and_logit_bias_match_the_library(post, real_lm):
    prompt = "Write the word cat five times."
    want = real_lm.generate(prompt, max_tokens=10, chat=False, frequency_penalty=1.5, presence_penalty=0.5)[0].text
    out = ok(post("/v1/completions", {"prompt": prompt, "max_tokens": 10, "frequency_penalty": 1.5,
                                      "presence_penalty": 0.5}))
    assert out["choices"][0]["text"] == want
    token = real_lm.backend.encode(" Banana")[0]
    out = ok(post("/v1/completions", {"prompt": prompt, "max_tokens": 1, "logprobs": 0,
                                      "logit_bias": {str(token): 100}}))
    assert out["choices"][0]["logprobs"]["token_ids"] == [token]


def test_context_length_error_suggests_only_what_the_server_accepts(post):
    r = post("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 9000}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "truncate" not in r.json()["error"]["message"] and "max_tokens" in r.json()["error"]["message"]


def test_engine_failure_is_an_error_response_not_a_200(post, monkeypatch):
    calls = {"n": 0}
    real_sample = engine_mod.sample

    def failing(*a, **kw):
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("device lost")
        return real_sample(*a, **kw)

    monkeypatch.setattr(engine_mod, "sample", failing)
    r = post("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 8})
    assert r.status_code == 500 and "device lost" in r.json()["error"]["message"]
    calls["n"] = 0
    body = {"model": post.client.get("/v1/models").json()["data"][0]["id"], "prompt": "Once upon a time",
            "max_tokens": 8, "stream": True}
    with post.client.stream("POST", "/v1/completions", json=body) as s:
        assert s.status_code == 200
        events = sse_events(s.iter_lines())
    assert "[DONE]" not in events
    assert "device lost" in json.loads(events[-1])["error"]["message"]
    monkeypatch.undo()
    assert ok(post("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 2}))  # the engine serves on


def test_seed_must_be_64_bit_and_a_bad_one_spares_the_requests_beside_it(post, real_lm):
    from concurrent.futures import ThreadPoolExecutor

    from promptkit.backends.base import SamplingParams
    from promptkit.engine.engine import Request

    greedy = {"prompt": "Count: 1, 2, 3,", "max_tokens": 24}
    with ThreadPoolExecutor(2) as pool:
        beside = pool.submit(post, "/v1/completions", greedy)
        bad = post("/v1/completions", {"prompt": "hi", "max_tokens": 2, "temperature": 1, "seed": 2**64})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "seed"
        assert ok(beside.result())["choices"][0]["text"] == real_lm.generate("Count: 1, 2, 3,", max_tokens=24,
                                                                             chat=False)[0].text
    # the largest seed with n > 1: choices' seeds wrap around instead of overflowing
    out = ok(post("/v1/completions", {"prompt": "hi", "max_tokens": 2, "temperature": 1, "seed": 2**63 - 1, "n": 2}))
    assert len(out["choices"]) == 2
    # the engine refuses a seed that skipped validation, before it can join a batch
    params = SamplingParams(temperature=1.0).model_copy(update={"seed": 2**64})
    with pytest.raises(ValueError, match="64-bit"):
        real_lm.backend.engine.submit(Request(tokens=[1, 2, 3], params=params))


def test_logprobs_cover_the_text_before_a_stop_string(post):
    free = ok(post("/v1/completions", {"prompt": "1, 2, 3, 4,", "max_tokens": 20}))["choices"][0]["text"]
    stop = free[len(free) // 2 : len(free) // 2 + 3]
    body = {"prompt": "1, 2, 3, 4,", "max_tokens": 20, "stop": [stop], "logprobs": 1}
    choice = ok(post("/v1/completions", body))["choices"][0]
    text, tokens = choice["text"], choice["logprobs"]["tokens"]
    assert choice["finish_reason"] == "stop" and text == free[: free.index(stop)]
    assert len("".join(tokens[:-1])) < len(text) <= len("".join(tokens))  # the tokens that spell the text, no more
    assert len(choice["logprobs"]["token_logprobs"]) == len(tokens)
    with post.client.stream("POST", "/v1/completions", json={**body, "model": post.client.get("/v1/models").json()
                                                             ["data"][0]["id"], "stream": True}) as s:
        chunks = [json.loads(e) for e in sse_events(s.iter_lines())[:-1]]
    streamed = [t for c in chunks for t in (c["choices"][0]["logprobs"] or {}).get("tokens", [])]
    assert streamed == tokens and "".join(c["choices"][0]["text"] for c in chunks) == text


def test_logprobs_name_tokens_that_split_a_character(post, real_lm):
    ids = real_lm.backend.encode("Emoji party: 🎉🎉 日本語のテキスト café")
    echo = ok(post("/v1/completions", {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0}))["choices"][0]
    assert echo["text"] == "Emoji party: 🎉🎉 日本語のテキスト café"
    offsets = echo["logprobs"]["text_offset"]
    assert offsets == sorted(offsets) and offsets[-1] < len(echo["text"])
    tops = ok(post("/v1/completions", {"prompt": "Japanese: 日本語。 Again: ", "max_tokens": 3,
                                       "logprobs": 5}))["choices"][0]["logprobs"]
    assert [len(t) for t in tops["top_logprobs"]] == [5, 5, 5]  # byte tokens keep distinct names
    assert all("\ufffd" not in t for t in tops["tokens"])
    msgs = [{"role": "user", "content": "Write 日本語 three times."}]
    chat = ok(post("/v1/chat/completions", {"messages": msgs, "max_tokens": 12, "logprobs": True,
                                            "top_logprobs": 2}))["choices"][0]
    joined = bytes(b for entry in chat["logprobs"]["content"] for b in entry["bytes"])
    assert joined.decode("utf-8", errors="replace") == chat["message"]["content"]


def test_model_card_utf8_errors_usage_chunks_and_constraint_params(post, real_lm):
    c = post.client
    assert c.get(f"/v1/models/{real_lm.model}").json()["id"] == real_lm.model
    assert c.get("/v1/models/nope").status_code == 404
    r = c.post("/v1/completions", content=b'{"model": "m", "prompt": "\xff\xfe"}',
               headers={"content-type": "application/json"})
    assert r.status_code == 400 and "UTF-8" in r.json()["error"]["message"]
    body = {"model": real_lm.model, "prompt": "Hi", "max_tokens": 3, "n": 2, "stream": True}
    with c.stream("POST", "/v1/completions", json=body) as s:
        assert all("usage" not in json.loads(e) for e in sse_events(s.iter_lines())[:-1])  # only when asked for
    err = post("/v1/completions", {"prompt": "hi", "max_tokens": 2, "guided_choice": []}).json()["error"]
    assert err["param"] == "guided_choice" and "validation error" not in err["message"]


def test_a_non_streamed_request_stops_when_its_client_leaves(server, real_lm):
    msgs = [{"role": "user", "content": "Tell a very long story."}]
    before = httpx.get(server.url + "/stats").json()["server"]["cancelled"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", timeout=1.5,
                   json={"model": real_lm.model, "messages": msgs, "max_tokens": 4000, "temperature": 0.7, "seed": 1})
    for _ in range(100):  # 4,000 tokens would take minutes; an abort takes a step
        stats = httpx.get(server.url + "/stats").json()["server"]
        if stats["cancelled"] > before and stats["active"] == 0:
            break
        time.sleep(0.1)
    assert stats["cancelled"] > before and stats["active"] == 0


def test_a_served_pipeline_honours_sampling_fields_or_refuses_them(real_lm):
    from pathlib import Path

    from promptkit import load_recipe

    recipe = load_recipe(Path(__file__).parents[1] / "cookbook" / "serve_openai" / "recipe.yaml")
    with BackgroundServer(create_app(real_lm, pipelines={"docs-bot": recipe})) as srv, \
            httpx.Client(base_url=srv.url, timeout=300) as c:
        msgs = [{"role": "user", "content": "What is green tea?"}]
        out = ok(c.post("/v1/chat/completions", json={"model": "docs-bot", "messages": msgs, "max_tokens": 2}))
        assert out["usage"]["completion_tokens"] == 2
        for field, value in [("logprobs", True), ("n", 2), ("guided_choice", ["a", "b"]), ("presence_penalty", 1.0)]:
            r = c.post("/v1/chat/completions", json={"model": "docs-bot", "messages": msgs, field: value})
            assert r.status_code == 400 and field in r.json()["error"]["message"], (field, r.text)
