"""Selective prefill in the engine: a prompt's chosen tokens prefilled at their own positions.

The reference is transformers run on the same subset of tokens with the same position ids, so
the engine must give exactly what a model that only ever saw those tokens where they stood gives.
"""
import pytest
import torch

from promptkit.backends.base import SamplingParams
from promptkit.engine.engine import Engine, Request

from tiny import make_tiny, make_tiny_llama, prompts

VOCAB = 512


@pytest.fixture(scope="module")
def ref_model():
    return make_tiny_llama(seed=0, vocab=VOCAB)


@torch.inference_mode()
def hf_greedy_at(model, ids: list[int], positions: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of ``ids`` placed at ``positions``, the new tokens after the last."""
    import inspect

    from transformers import DynamicCache

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = {name: DynamicCache()}
    out = model(input_ids=torch.tensor([ids]), position_ids=torch.tensor([positions]), use_cache=True, **cache)
    tokens, pos = [], positions[-1]
    for _ in range(n):
        tok = int(out.logits[0, -1].argmax())
        tokens.append(tok)
        pos += 1
        out = model(input_ids=torch.tensor([[tok]]), position_ids=torch.tensor([[pos]]), use_cache=True, **cache)
    return tokens


def subset(prompt: list[int], keep: int, seed: int) -> list[int]:
    """Sorted indices: the first 4, the last 6, and ``keep`` random others."""
    middle = torch.randperm(len(prompt) - 10, generator=torch.Generator().manual_seed(seed))[:keep] + 4
    return sorted({*range(4), *range(len(prompt) - 6, len(prompt)), *middle.tolist()})


def test_kept_tokens_at_their_positions_match_transformers(ref_model):
    eng = Engine(make_tiny_llama(seed=0, vocab=VOCAB), eos_ids=set())
    ps = prompts(3, lo=60, hi=90, seed=11)
    reqs, want = [], []
    for i, p in enumerate(ps):
        idx = subset(p, 20, seed=i)
        reqs.append(Request(tokens=[p[j] for j in idx], positions=idx, params=SamplingParams(max_tokens=8)))
        want.append(hf_greedy_at(ref_model, [p[j] for j in idx], idx, 8))
    assert [r.generated for r in eng.run(reqs)] == want  # one packed batch of three
    # The same subset at consecutive positions is another computation: the positions matter.
    idx = subset(ps[0], 20, seed=0)
    moved = eng.run([Request(tokens=[ps[0][j] for j in idx], params=SamplingParams(max_tokens=8))])[0]
    assert moved.generated == hf_greedy_at(ref_model, [ps[0][j] for j in idx], list(range(len(idx))), 8)
    eng.check_integrity()


def test_only_the_tokens_before_the_first_gap_are_cached(ref_model):
    eng = Engine(make_tiny_llama(seed=0, vocab=VOCAB), eos_ids=set())
    p = prompts(1, lo=70, hi=71, seed=3)[0]
    idx = subset(p, 20, seed=1)
    gap = next(i for i, j in enumerate(idx) if i != j)
    eng.run([Request(tokens=[p[j] for j in idx], positions=idx, params=SamplingParams(max_tokens=4))])
    before = eng.stats()["tokens_cached"]
    plain = [p[j] for j in idx]  # the same token ids, at their own indices: only the head may be served
    eng.run([Request(tokens=plain, params=SamplingParams(max_tokens=4))])
    assert 0 < eng.stats()["tokens_cached"] - before <= gap
    eng.check_integrity()


@pytest.mark.parametrize("family", ["mistral", "gemma3_text", "qwen2"])
def test_sliding_window_families_count_the_window_in_kept_tokens_as_transformers_does(family):
    # transformers masks a sliding window by cache index, the position ids moving only RoPE: the
    # window then spans the last kept tokens, and the engine does the same.
    model = make_tiny(family, VOCAB)
    eng = Engine(make_tiny(family, VOCAB), eos_ids=set())
    p = prompts(1, lo=60, hi=61, seed=5)[0]
    idx = subset(p, 24, seed=2)
    got = eng.run([Request(tokens=[p[j] for j in idx], positions=idx, params=SamplingParams(max_tokens=8))])[0]
    assert got.generated == hf_greedy_at(model, [p[j] for j in idx], idx, 8)


def test_refused_where_it_would_be_wrong():
    eng = Engine(make_tiny_llama(seed=0, vocab=VOCAB), eos_ids=set())
    with pytest.raises(ValueError, match="increasing order"):
        eng.run([Request(tokens=[1, 2, 3], positions=[0, 5, 5])])
    with pytest.raises(ValueError, match="increasing order"):
        eng.run([Request(tokens=[1, 2, 3], positions=[0, 5])])


def test_kept_indices_keep_the_ends_and_the_top_share():
    from promptkit.engine.selective import kept_indices

    scores = torch.tensor([9.0, 0, 0, 5, 1, 7, 0, 2, 0, 0])
    assert kept_indices(scores, keep=0.5, tail=2, sink=1) == [0, 3, 4, 5, 7, 8, 9]  # body 1..7: top 4 of 7
    assert kept_indices(scores, keep=1.0, tail=2, sink=1) == list(range(10))
    assert kept_indices(scores[:3], keep=0.3, tail=5, sink=4) == [0, 1, 2]  # all ends, nothing to choose


def test_scores_carry_across_tokenizations_by_characters():
    from promptkit.engine.selective import carry_scores

    # "the cat sat": the draft has 3 tokens, the target 4 ("the", " c", "at", " sat").
    draft = [(0, 3), (3, 7), (7, 11)]
    target = [(0, 3), (3, 5), (5, 7), (7, 11)]
    got = carry_scores(torch.tensor([0.1, 0.7, 0.2]), draft, target)
    assert got.tolist() == pytest.approx([0.1, 0.7, 0.7, 0.2])
    # A target token spanning two draft tokens takes the higher score; an empty span (a special token) its neighbour's.
    assert carry_scores(torch.tensor([0.1, 0.7]), [(0, 3), (3, 7)], [(0, 0), (0, 7)]).tolist() == \
        pytest.approx([0.1, 0.7])


@pytest.mark.slow
def test_filter_and_spec_prefill_on_the_real_model(real_lm):
    from promptkit import SelectivePrefill
    from promptkit.engine.selective import kept_indices  # noqa: F401  (the choice the engine runs)

    facts = " ".join(f"Fact {i}: the {w} box holds {i * 7} marbles." for i, w in
                     enumerate(["red", "blue", "green", "black", "white", "gold", "pink", "grey"] * 6))
    question = f"{facts}\n\nQuestion: How many marbles does the gold box hold? Answer with the number."
    n = real_lm.count_tokens(question, chat=True)
    before = real_lm.stats()["tokens_prefilled"]
    full = real_lm.generate(question, max_tokens=12)[0]
    full_cost = real_lm.stats()["tokens_prefilled"] - before
    for prefill in (SelectivePrefill(keep=0.3, min_tokens=64),
                    SelectivePrefill(mode="spec", draft="smollm2-135m-instruct", keep=0.3, min_tokens=64)):
        real_lm.backend.clear_cache()
        before = real_lm.stats()["tokens_prefilled"]
        got = real_lm.generate(question, max_tokens=12, prefill=prefill)[0]
        spent = real_lm.stats()["tokens_prefilled"] - before
        assert spent < 0.55 * n < full_cost + 1  # about the kept share of the prompt, the tail dense
        assert got.text.strip()
    assert full.text.strip()
    with pytest.raises(ValueError, match="draft model"):
        SelectivePrefill(mode="spec")
