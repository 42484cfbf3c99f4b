"""Every supported model family against transformers on tiny random models: greedy output token
for token and prompt log-probabilities within float tolerance, with the cache cold, warm, partly
evicted, packed and chunked; and a clear refusal for what the engine cannot run exactly."""

import pytest
import torch
from tiny import FAMILIES, hf_greedy, make_tiny, prompts

from promptkit.backends.base import SamplingParams
from promptkit.engine.engine import Engine, Request
from promptkit.engine.families import SUPPORTED, UnsupportedModelError, check_supported

VOCAB = 512


@torch.inference_mode()
def hf_logprobs(model, ids):
    logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def engine(family, **kw):
    return Engine(make_tiny(family, VOCAB), eos_ids=set(), **kw)


def greedy(eng, ps, n):
    return [r.generated for r in eng.run([Request(tokens=list(p), params=SamplingParams(max_tokens=n)) for p in ps])]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    ref = make_tiny(request.param, VOCAB)
    ref.generation_config.eos_token_id = None
    return request.param, ref


def test_every_tested_family_is_declared_supported():
    assert set(FAMILIES) == set(SUPPORTED)


def test_greedy_equals_transformers_cold_warm_chunked_and_evicted(family):
    name, ref = family
    ps = prompts(4, 6, 40, seed=1, shared=20)  # 26-60 tokens: past every sliding window of the tiny models
    want = [hf_greedy(ref, p, 10) for p in ps]
    eng = engine(name)
    assert greedy(eng, ps, 10) == want, "cold, packed"
    assert greedy(eng, ps, 10) == want, "warm"
    budget = 90 * eng.bytes_per_token  # a pool too small for all: evictions and preemptions
    tight = engine(name, max_batch_tokens=16, max_kv_bytes=budget, decode_reserve=2)
    for _ in range(2):
        assert greedy(tight, ps, 10) == want, "chunked, partly evicted"
        tight.check_integrity()
    assert tight.stats()["evictions"] > 0


def test_prompt_logprobs_equal_a_plain_forward_cold_and_cached(family):
    name, ref = family
    ps = prompts(3, 10, 40, seed=2, shared=24)
    eng = engine(name, max_batch_tokens=32)
    eng.run([Request(tokens=ps[0][:28], params=SamplingParams(max_tokens=1))])  # a cached prefix
    for r, p in zip(eng.run([Request(tokens=list(p), kind="score", score_from=1) for p in ps]), ps):
        torch.testing.assert_close(torch.tensor(r.logprobs), hf_logprobs(ref, p), atol=1e-4, rtol=1e-4)


def test_unsupported_models_are_refused_with_the_reason():
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig

    with pytest.raises(UnsupportedModelError, match=r"'mixtral'.*backend='hf'"):
        check_supported(MixtralConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=64))
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2,
                      rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(UnsupportedModelError, match=r"'llama'.*'dynamic' RoPE.*backend='hf'"):
        Engine(LlamaForCausalLM(cfg), eos_ids=set())


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_public_api_matches_the_hf_backend_on_a_saved_model(name, tmp_path):
    """LM("<dir>") against LM("<dir>", backend="hf"): a tiny random model saved with the embedded tokenizer."""
    from transformers import AutoTokenizer

    from promptkit import LM
    from promptkit.models import resolve_llm

    tok = AutoTokenizer.from_pretrained(resolve_llm())
    model = make_tiny(name, vocab=len(tok))
    model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    questions = ["What is the capital of France?", "Name three colours of the rainbow, please.",
                 "Write one sentence about the sea and the wind over it."]
    ours = LM(str(tmp_path), max_batch_tokens=24)  # the chat-templated prompts are chunked
    hf = LM(str(tmp_path), backend="hf")
    want = [hf.generate(q, max_tokens=12)[0].token_ids for q in questions]
    assert [g.token_ids for g in ours.generate(questions, max_tokens=12)] == want
    assert [g.token_ids for g in ours.generate(questions, max_tokens=12)] == want  # warm
