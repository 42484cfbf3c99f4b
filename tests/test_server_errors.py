"""Errors are classified: the client's fault is a 4xx naming the field, the server's a 5xx that says
nothing of the server's internals (they go to its log)."""

from __future__ import annotations

import json
import logging

import httpx
import pytest

from promptkit.backends.base import GenerationError
from promptkit.engine.chunk_store import StaleKVError
from promptkit.server import BackgroundServer, create_app

# A template in the style of Llama 2's and Mistral's: it refuses roles out of order.
STRICT = ("{% for message in messages %}"
          "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
          "{% endif %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
          "<|im_start|>assistant\n")
SECRET = "/srv/operator-only/index/kv.safetensors"


@pytest.fixture(scope="module")
def server(real_lm):
    with BackgroundServer(create_app(real_lm)) as srv:
        yield srv


@pytest.fixture()
def post(server, real_lm):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield lambda path, body: c.post(path, json={"model": real_lm.model, **body})


def test_a_template_that_refuses_the_messages_is_a_400_naming_messages(post, real_lm, monkeypatch):
    monkeypatch.setattr(real_lm.backend.tokenizer, "chat_template", STRICT)
    out_of_order = [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Hi"}]
    for stream in (False, True):
        r = post("/v1/chat/completions", {"messages": out_of_order, "max_tokens": 2, "stream": stream})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "messages" and "roles must alternate" in err["message"]
    assert post("/v1/chat/completions", {"messages": out_of_order[1:], "max_tokens": 2}).status_code == 200
    monkeypatch.setattr(real_lm.backend.tokenizer, "chat_template", "{{ messages[0]['content'] + 1 }}")
    r = post("/v1/chat/completions", {"messages": out_of_order[1:], "max_tokens": 2})  # the template's TypeError
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text


def stale(*args, **kwargs):
    raise StaleKVError(f"{SECRET} was made with another model; rebuild it")


def stale_in_engine(*args, **kwargs):
    try:
        stale()
    except StaleKVError as e:
        raise GenerationError(f"the generation failed in the engine: StaleKVError: {e}") from e


@pytest.mark.parametrize("fault", [stale, stale_in_engine])
def test_a_server_fault_is_a_500_that_tells_nothing_internal(post, real_lm, monkeypatch, caplog, fault):
    monkeypatch.setattr(real_lm.backend, "generate", fault)
    monkeypatch.setattr(real_lm.backend, "generate_stream", fault)
    caplog.set_level(logging.ERROR, logger="promptkit.server")
    for path, body in [("/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
                       ("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "stream": True}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})]:
        r = post(path, body)
        assert r.status_code == 500, r.text
        err = r.json()["error"]
        assert err["type"] == "server_error" and "reference" in err["message"]
        assert "safetensors" not in r.text and "operator-only" not in r.text and "Stale" not in r.text
    logged = "\n".join(rec.getMessage() + str(rec.exc_info and rec.exc_info[1]) for rec in caplog.records)
    assert SECRET in logged  # the operator sees what happened


def test_a_client_fault_from_the_backend_is_a_400_naming_its_field(post, real_lm):
    r = post("/v1/completions", {"prompt": [1, 10**9], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "token ids" in r.text
    long = {"messages": [{"role": "user", "content": "word " * 9000}]}
    err = post("/v1/chat/completions", long).json()["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"


def test_an_unexpected_exception_is_a_generic_500(post, real_lm, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyError("internal-table-name")

    monkeypatch.setattr(real_lm.backend, "generate", boom)
    r = post("/v1/completions", {"prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 500 and "internal-table-name" not in r.text
    assert json.loads(r.text)["error"]["code"] == "internal_error"
