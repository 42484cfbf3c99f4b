"""Streaming: text is detokenized incrementally (O(1) work per token) and the streamed text equals the
whole text exactly, stop strings and split characters included; clients that leave mid-stream never
fail the streams beside them."""

from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from promptkit.backends.base import SamplingParams, StopScanner, truncate_at_stop
from promptkit.backends.detokenize import StreamText
from promptkit.server import BackgroundServer, create_app

EMOJI = "List three animals as emoji, like 🐶."
JAPANESE = "Say hello in Japanese, Chinese and Korean."


@pytest.fixture(scope="module")
def server(real_lm):
    with BackgroundServer(create_app(real_lm)) as srv:
        yield srv


def sse_texts(lines, chat: bool) -> tuple[str, str]:
    """The streamed text joined, and the finish reason."""
    events = [json.loads(ln[6:]) for ln in lines if ln.startswith("data: ") and ln != "data: [DONE]"]
    choices = [e["choices"][0] for e in events if e["choices"]]
    texts = [(c["delta"].get("content") or "") if chat else c["text"] for c in choices]
    return "".join(texts), choices[-1]["finish_reason"]


def test_stream_text_is_a_prefix_of_the_whole_text_for_any_tokens_and_stops(real_lm):
    decode, rng = real_lm.backend.decode, random.Random(0)
    base = real_lm.backend.encode("Emoji 🎉🐶 日本語のテキスト, café — naïve; 1, 2, 3.")
    for trial in range(200):
        ids = [rng.randrange(real_lm.backend.vocab_size) for _ in range(20)] if trial % 2 else list(base)
        full = decode(ids)
        stops = [full[a : a + rng.randint(1, 5)] for a in rng.sample(range(len(full)), 2)] if trial % 3 else []
        shown, counted = StreamText(decode, stops), 0
        text = ""
        for i, t in enumerate(ids, 1):
            piece, counted = shown.push(t)
            text += piece
            if stops and truncate_at_stop(decode(ids[:i]), stops)[1]:
                ids = ids[:i]  # the engine stops at the token that completes a stop string
                break
        assert truncate_at_stop(decode(ids), stops)[0].startswith(text), (ids, stops)
        assert counted <= len(ids)


def test_stop_scanner_is_linear_in_the_text_for_long_stop_strings():
    stops = ["a" * 255 + "b", "ab" * 128, "x" * 256, "a" * 100 + "c"]
    text = "a" * 30_000 + "ab" * 5_000
    scanner, t0 = StopScanner(stops), time.perf_counter()
    for k in range(0, len(text), 3):
        scanner.feed(text[k : k + 3])
    assert time.perf_counter() - t0 < 2.0  # quadratic work per token would take minutes
    assert scanner.found == min(i for i in map(text.find, stops) if i >= 0) == 30_000 - 254
    assert scanner.final() == scanner.found


def test_streaming_decodes_each_token_a_bounded_number_of_times(real_lm, monkeypatch):
    backend, decoded = real_lm.backend, {"tokens": 0}
    decode = backend.decode

    def counting(ids):
        decoded["tokens"] += len(ids)
        return decode(ids)

    monkeypatch.setattr(backend, "decode", counting)
    params = SamplingParams(max_tokens=160, stop=["never in this text 0123456789"])
    events = list(backend.generate_stream("Once upon a time, in a village by the sea,", params))
    n = len(events[-1].generation.token_ids)
    assert n > 100
    # incremental: a few tokens per step (the stream's window and the stop check's), not all of them
    assert decoded["tokens"] < 20 * n, f"{decoded['tokens']} tokens decoded for {n} generated"


CASES = [(EMOJI, None), (EMOJI, ["🐶🐶🐶🐶🐶"]), (JAPANESE, None), (JAPANESE, ["ですが"]), (JAPANESE, ["アニンX", "くは"]),
         (JAPANESE, ["ラ" + "z" * 200])]


@pytest.mark.parametrize("question,stop", CASES)
def test_streamed_text_equals_the_whole_text(server, real_lm, question, stop):
    msgs = [{"role": "user", "content": question}]
    body = {"model": real_lm.model, "messages": msgs, "max_tokens": 40, "stop": stop}
    with httpx.Client(base_url=server.url, timeout=120) as c:
        whole = c.post("/v1/chat/completions", json=body).json()["choices"][0]
        with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
            text, finish = sse_texts(list(s.iter_lines()), chat=True)
    assert any(ord(ch) > 0x3000 for ch in whole["message"]["content"] or "x" * 0) or stop
    assert (text, finish) == (whole["message"]["content"], whole["finish_reason"])
    # the backend's own stream, straight
    prompt = real_lm.backend.apply_chat_template(msgs)
    params = SamplingParams(max_tokens=40, stop=stop)
    streamed = list(real_lm.backend.generate_stream(prompt, params))
    assert "".join(ev.text for ev in streamed) == real_lm.backend.generate([prompt], params)[0].text == text
    assert sum(len(ev.token_ids) for ev in streamed) == len(streamed[-1].generation.token_ids)


def test_clients_leaving_mid_stream_never_fail_the_streams_beside_them(server, real_lm):
    prompts = [f"Fact {i}: the number {i * 7} is" for i in range(12)]
    want = {p: g.text for p, g in zip(prompts, real_lm.generate(prompts, max_tokens=30, chat=False))}
    before = httpx.get(server.url + "/stats").json()["server"]
    start = threading.Barrier(len(prompts))

    def client(i: int) -> tuple[str, str | None]:
        leaves = i % 2 == 1
        body = {"model": real_lm.model, "prompt": prompts[i], "max_tokens": 30 if not leaves else 400,
                "stream": True}
        with httpx.Client(base_url=server.url, timeout=120) as c:
            start.wait()
            with c.stream("POST", "/v1/completions", json=body) as s:
                lines = []
                for line in s.iter_lines():
                    lines.append(line)
                    if leaves and sum(ln.startswith("data: ") for ln in lines) == 2:
                        return prompts[i], None  # leaving closes the connection mid-stream
            return prompts[i], sse_texts(lines, chat=False)[0]

    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(client, range(len(prompts))))
    finished = [(p, text) for p, text in results if text is not None]
    assert len(finished) == 6 and all(text == want[p] for p, text in finished)
    deadline = time.monotonic() + 60
    while True:
        st = httpx.get(server.url + "/stats").json()
        if st["server"]["active"] == 0 and st.get("running", 0) == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert st["server"]["active"] == 0 and st.get("running", 0) == 0
    assert st["server"]["ok"] - before["ok"] == 6 and st["server"]["cancelled"] - before["cancelled"] == 6
    assert st["server"]["server_errors"] == before["server_errors"]
    real_lm.backend.engine.check_integrity()
