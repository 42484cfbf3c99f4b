"""KV reuse of documents (the chunk store): re-rotation, exact recompute, persistence, the budget.

The reference is plain transformers with an eager attention function of the test's own that
records every layer's keys and values and can patch some positions' K/V (what a reused,
not recomputed, document token holds), so the engine is checked against an independent
computation, never against itself.
"""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import AttentionInterface

from promptkit.backends.base import SamplingParams
from promptkit.engine.chunk_store import StaleKVError
from promptkit.engine.config import KVReuse
from promptkit.engine.engine import Engine
from promptkit.engine.kv_pool import run_slots
from promptkit.engine.request import Request, Reuse
from promptkit.engine.rerotate import ReuseUnsupportedError, rerotator_for

from tiny import FAMILIES, make_tiny, make_tiny_llama

VOCAB = 512
ROPE_FAMILIES = [f for f in FAMILIES if f != "gpt2"]

# -- the reference: eager attention that records (and may patch) K/V ------------------------
_ref = threading.local()


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                         sliding_window=None, softcap=None, **kw):
    layer = module.layer_idx
    patch = getattr(_ref, "patch", None)
    if patch is not None and layer >= patch["from_layer"]:
        key, value = key.clone(), value.clone()
        key[0, :, patch["positions"]] = patch["k"][layer].to(key.dtype)
        value[0, :, patch["positions"]] = patch["v"][layer].to(value.dtype)
    _ref.keys[layer], _ref.values[layer] = key[0].clone(), value[0].clone()
    pos = _ref.positions
    g = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(g, 1).float(), value.repeat_interleave(g, 1).float()
    s = torch.matmul(query.float(), k.transpose(-1, -2)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    hidden = pos[None, :] > pos[:, None]
    if sliding_window is not None:
        hidden |= pos[None, :] <= pos[:, None] - sliding_window
    out = torch.matmul(torch.softmax(s.masked_fill(hidden, float("-inf")), -1), v)
    return out.to(query.dtype).transpose(1, 2), None


AttentionInterface.register("kv_reuse_reference", _reference_attention)


@torch.inference_mode()
def reference(model, tokens, start=0, patch=None):
    """Keys, values ([layers] of [Hkv, n, D]) and log-probabilities of ``tokens`` placed at
    ``start``, with ``patch`` ({from_layer, positions, k, v}) overriding K/V of some positions."""
    model.set_attn_implementation("kv_reuse_reference")
    n = len(tokens)
    _ref.positions = torch.arange(n)
    _ref.keys, _ref.values, _ref.patch = {}, {}, patch
    try:
        logits = model(torch.tensor([tokens]), position_ids=torch.arange(start, start + n)[None]).logits[0].float()
    finally:
        _ref.patch = None
    layers = len(_ref.keys)
    lp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]
    return [_ref.keys[i] for i in range(layers)], [_ref.values[i] for i in range(layers)], lp


def model_of(family):
    """A tiny model of ``family``; the llama gets four layers and sharp attention (larger q/k
    weights), so that a wrong key anywhere shows in the outputs."""
    if family != "llama":
        return make_tiny(family, vocab=VOCAB)
    model = make_tiny_llama(layers=4, vocab=VOCAB)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return model


def rand_tokens(n, g):
    return torch.randint(1, VOCAB, (n,), generator=g).tolist()


def rag_prompt(seed=0, docs=(30, 24, 40), head=12, question=9):
    """head + documents separated by two tokens + question; returns tokens and document spans."""
    g = torch.Generator().manual_seed(seed)
    tokens, spans = rand_tokens(head, g), []
    for i, n in enumerate(docs):
        if i:
            tokens += [5, 6]
        spans.append((len(tokens), len(tokens) + n))
        tokens += rand_tokens(n, g)
    return tokens + rand_tokens(question, g), spans


def assembled(eng, r):
    """Admit and assemble ``r`` by hand (so its ``todo`` can be read), then prefill it."""
    with eng._lock:
        eng.scheduler.waiting.append(r)
        admitted, failed = eng.scheduler.admit()
        assert not failed
        eng.reuse.assemble(admitted)
        todo, cached = list(r.kv.todo or []), r.kv.cached_len
        eng.step()
        assert r.kv.todo is None and r.pending <= 1
    return todo, cached


# -- re-rotation ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", ROPE_FAMILIES)
def test_rerotated_keys_equal_keys_encoded_there(family):
    model = model_of(family)
    tokens = rand_tokens(40, torch.Generator().manual_seed(3))
    keys0, _, _ = reference(model, tokens, start=0)
    rot = rerotator_for(model)
    for p in (1, 37, 300):
        keys_p, _, _ = reference(model, tokens, start=p)
        moved = rot.rotate(torch.stack(keys0), torch.full((len(tokens),), p))
        torch.testing.assert_close(moved, torch.stack(keys_p), atol=2e-5 * max(1, p / 10), rtol=1e-4)
    # and back: a chunk encoded at p moved by -p lands at 0
    back = rot.rotate(torch.stack(keys_p), torch.full((len(tokens),), -300))
    torch.testing.assert_close(back, torch.stack(keys0), atol=1e-3, rtol=1e-4)


def test_models_without_rope_are_refused_clearly():
    model = make_tiny("gpt2", vocab=VOCAB)
    with pytest.raises(ReuseUnsupportedError, match="gpt2.*no rotary position embedding.*kv_reuse='full'"):
        rerotator_for(model)
    eng = Engine(model, eos_ids=set())
    tokens, spans = rag_prompt()
    with pytest.raises(ReuseUnsupportedError):
        eng.submit(Request(tokens=tokens, reuse=Reuse(KVReuse(mode="blend"), spans)))
    # full needs no re-rotation: it runs
    eng.run([Request(tokens=tokens, params=SamplingParams(max_tokens=2), reuse=Reuse(KVReuse(), spans))])


def test_rope_that_is_not_a_pure_rotation_is_refused():
    model = make_tiny_llama()
    model.model.rotary_emb.attention_scaling = 1.0
    real = model.model.rotary_emb.forward
    model.model.rotary_emb.forward = lambda x, pos: tuple(t * (1 + pos[..., None] / 1000) for t in real(x, pos))
    with pytest.raises(ReuseUnsupportedError, match="not a pure rotation"):
        rerotator_for(model)


# -- exactness of the assembled prefill ------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_full_recompute_through_the_chunk_path_equals_plain_prefill(family):
    """Blend recomputing every document token is a full prefill: same log-probabilities, same tokens."""
    tokens, spans = rag_prompt(seed=1)
    _, _, want = reference(model_of(family), tokens)
    for cache in (True, False):
        eng = Engine(model_of(family), eos_ids=set(), prefix_cache=cache)
        for _ in range(2):  # chunks encoded on the first pass, found in the store on the second
            r = Request(tokens=tokens, kind="score", score_from=spans[-1][1] + 1,
                        reuse=Reuse(KVReuse(mode="blend", recompute_ratio=1.0), spans))
            eng.run([r])
            torch.testing.assert_close(torch.tensor(r.logprobs), want[spans[-1][1]:], atol=1e-4, rtol=1e-4)
        assert eng.chunks.stats.hits >= 1 and r.counts.recomputed_tokens == sum(e - s for s, e in spans)
        eng.check_integrity()
    plain = Engine(model_of(family), eos_ids=set())
    full = Engine(model_of(family), eos_ids=set())
    params = SamplingParams(max_tokens=8)
    a = plain.run([Request(tokens=tokens, params=params)])[0].generated
    b = full.run([Request(tokens=tokens, params=params, reuse=Reuse(KVReuse(mode="full"), spans))])[0].generated
    c = eng.run([Request(tokens=tokens, params=params,
                         reuse=Reuse(KVReuse(mode="blend", recompute_ratio=1.0), spans))])[0].generated
    assert a == b == c


@pytest.mark.parametrize("family,mode", [("llama", "blend"), ("llama", "sink"), ("llama", "none"),
                                         ("gemma3_text", "blend"), ("gemma3_text", "sink")])
def test_recomputed_tokens_equal_a_full_prefill_given_the_patched_context(family, mode):
    """Every position the engine computes has the K/V (at every layer) and the next-token
    log-probabilities that a full prefill gives when the document tokens it did not recompute
    hold, from the patched layers on, the KV of their document encoded alone (re-encoded at
    their real positions by the reference itself)."""
    tokens, spans = rag_prompt(seed=2)
    cfg = KVReuse(mode=mode, recompute_ratio=0.2, sink_tokens=4)
    eng = Engine(model_of(family), eos_ids=set())
    r = Request(tokens=tokens, params=SamplingParams(max_tokens=2), reuse=Reuse(cfg, spans))
    todo, cached = assembled(eng, r)
    lead = tokens[: spans[0][0]]
    ref_model = model_of(family)
    # the stored KV of each document, as the reference computes it at the document's real position
    patch_pos, pk, pv = [], [], []
    for s, e in spans:
        keys, values, _ = reference(ref_model, lead + tokens[s:e], start=s - len(lead))
        keep = [p for p in range(s, e) if p not in todo]
        idx = torch.tensor(keep) - s + len(lead)
        patch_pos += keep
        pk.append(torch.stack(keys)[:, :, idx])
        pv.append(torch.stack(values)[:, :, idx])
    assert todo and patch_pos and cached == spans[0][0]
    n_doc = sum(e - s for s, e in spans)
    recomputed = n_doc - len(patch_pos)
    assert recomputed == {"blend": -(-n_doc * 20 // 100), "sink": 4 * len(spans), "none": 0}[mode]
    assert (r.counts.recomputed_tokens, r.counts.reused_tokens) == (recomputed, len(patch_pos))
    patch = {"from_layer": cfg.select_layer if mode == "blend" else 0, "positions": torch.tensor(patch_pos),
             "k": torch.cat(pk, 2), "v": torch.cat(pv, 2)}
    if mode == "blend":  # the recomputed document tokens are those whose K/V deviate most at select_layer
        full_k, full_v, _ = reference(ref_model, tokens)
        doc_pos = [p for s, e in spans for p in range(s, e)]
        stored = {}
        for s, e in spans:
            k, v, _ = reference(ref_model, lead + tokens[s:e], start=s - len(lead))
            for p in range(s, e):
                stored[p] = (k[cfg.select_layer][:, p - s + len(lead)], v[cfg.select_layer][:, p - s + len(lead)])
        dev = torch.stack([(full_k[cfg.select_layer][:, p] - stored[p][0]).pow(2).sum()
                           + (full_v[cfg.select_layer][:, p] - stored[p][1]).pow(2).sum() for p in doc_pos])
        chosen = torch.tensor([p in todo for p in doc_pos])
        assert int(chosen.sum()) == recomputed  # no unselected token deviates more (beyond float noise)
        assert dev[chosen].min() >= dev[~chosen].max() - 1e-5 * dev.max()
    keys, values, lp = reference(ref_model, tokens, patch=patch)
    # the engine's KV of the prompt: the exact prefix in the tree, the rest in the request's slots
    slots = run_slots(r.kv.runs)[torch.tensor(todo) - r.kv.cached_len]
    for layer in range(len(keys)):
        torch.testing.assert_close(eng.pool.kv[layer, 0][:, slots], keys[layer][:, todo], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(eng.pool.kv[layer, 1][:, slots], values[layer][:, todo], atol=1e-4, rtol=1e-4)
    # the question's log-probabilities from the same assembly (its chunks now found in the store)
    score = Request(tokens=tokens, kind="score", score_from=spans[-1][1] + 1, reuse=Reuse(cfg, spans))
    eng.run([score])  # the same assembly again (the chunks are now hits) scores the question
    torch.testing.assert_close(torch.tensor(score.logprobs), lp[spans[-1][1]:], atol=1e-4, rtol=1e-4)


# -- persistence ----------------------------------------------------------------------------
def test_saved_store_is_reused_and_stale_stores_are_refused(tmp_path):
    tokens, spans = rag_prompt(seed=4)
    lead, docs = tokens[: spans[0][0]], [tokens[s:e] for s, e in spans]
    eng = Engine(model_of("llama"), eos_ids=set())
    assert eng.store_chunks(lead, docs) == len(docs)
    path = tmp_path / "kv.safetensors"
    assert eng.save_chunks(str(path), lead, extra={"corpus": "test"}) == len(docs)
    with pytest.raises(ValueError, match="nothing to save"):
        eng.save_chunks(str(tmp_path / "other.safetensors"), [1, 2, 3])
    cfg = Reuse(KVReuse(mode="sink", sink_tokens=2), spans)

    def question_logprobs(engine):
        r = Request(tokens=tokens, kind="score", score_from=spans[-1][1] + 1, reuse=cfg)
        engine.run([r])
        return r

    want = question_logprobs(eng)
    fresh = Engine(model_of("llama"), eos_ids=set())  # the same weights: accepted, and found
    assert fresh.load_chunks(str(path), lead) == len(docs)
    got = question_logprobs(fresh)
    assert got.counts.stored_tokens == 0 and got.counts.reused_tokens == want.counts.reused_tokens > 0
    torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=1e-5, rtol=1e-5)
    assert fresh.chunks.lead_in == tuple(lead) and fresh.stats()["chunk_hits"] == len(docs)
    other = Engine(make_tiny_llama(layers=4, vocab=VOCAB, seed=1), eos_ids=set())  # other weights
    with pytest.raises(StaleKVError, match="another model.*weights"):
        other.load_chunks(str(path), lead)
    with pytest.raises(StaleKVError, match="another lead-in"):
        Engine(model_of("llama"), eos_ids=set()).load_chunks(str(path), lead[1:])
    (tmp_path / "junk.safetensors").write_bytes(b"not a store")
    with pytest.raises(Exception):
        fresh.load_chunks(str(tmp_path / "junk.safetensors"))


# -- the budget and the scheduler --------------------------------------------------------------
BPT_LLAMA4 = 4 * 2 * 2 * 16 * 4  # KV bytes per token of the four-layer tiny llama


def test_store_stays_inside_the_budget_and_is_evicted_lru():
    budget = 400 * BPT_LLAMA4
    eng = Engine(model_of("llama"), eos_ids=set(), max_kv_bytes=budget, decode_reserve=2)
    reqs = []
    for seed in range(12):  # every prompt brings three documents of its own: the store outgrows the pool
        tokens, spans = rag_prompt(seed=10 + seed)
        reqs.append(Request(tokens=tokens, params=SamplingParams(max_tokens=4),
                            reuse=Reuse(KVReuse(mode="blend"), spans)))
    eng.run(reqs[:6])
    eng.run(reqs[6:])
    s = eng.stats()
    assert s["kv_high_water_bytes"] <= budget == s["kv_budget_bytes"]
    assert s["chunk_evictions"] > 0 and s["chunk_bytes"] <= budget
    assert all(len(r.generated) == 4 for r in reqs)
    eng.check_integrity()


def test_a_failed_forward_while_storing_documents_leaks_no_slot():
    tokens, spans = rag_prompt(seed=5)
    lead, docs = tokens[: spans[0][0]], [tokens[s:e] for s, e in spans]
    eng = Engine(model_of("llama"), eos_ids=set())
    forward = eng.runner.forward

    def failing(batch):
        raise RuntimeError("the forward failed")

    eng.runner.forward = failing  # fails the lead-in's prefill, before any document is encoded
    with pytest.raises(RuntimeError, match="the forward failed"):
        eng.store_chunks(lead, docs)
    eng.check_integrity()  # every slot free, cached or stored: none held by the failed jobs
    eng.runner.forward = forward
    assert eng.store_chunks(lead, docs) == len(docs)
    eng.check_integrity()


def test_preempted_assemblies_start_over_and_match_an_unpressed_run():
    prompts = [rag_prompt(seed=30 + i, docs=(40, 40)) for i in range(4)]
    cfg = KVReuse(mode="sink", sink_tokens=3)

    def run(**kw):
        eng = Engine(model_of("llama"), eos_ids=set(), **kw)
        reqs = [Request(tokens=t, params=SamplingParams(max_tokens=12), reuse=Reuse(cfg, sp)) for t, sp in prompts]
        eng.run(reqs)
        eng.check_integrity()
        return [r.generated for r in reqs], eng.stats()

    want, _ = run()
    got, s = run(max_kv_bytes=330 * BPT_LLAMA4, decode_reserve=1, max_batch_tokens=48)
    assert got == want and s["preemptions"] > 0


@pytest.mark.parametrize("mode", ["blend", "sink", "none"])
def test_modes_with_the_prefix_cache_on_and_off(mode):
    tokens, spans = rag_prompt(seed=5)
    results = {}
    for cache in (True, False):
        eng = Engine(model_of("llama"), eos_ids=set(), prefix_cache=cache)
        for _ in range(2):
            r = Request(tokens=tokens, kind="score", score_from=spans[-1][1] + 1, reuse=Reuse(KVReuse(mode=mode), spans))
            eng.run([r])
        results[cache] = torch.tensor(r.logprobs)
        s = eng.stats()
        assert s["chunk_hits"] == len(spans) and s["chunk_misses"] == len(spans)
        assert (s["tokens_cached"] > 0) == cache
        eng.check_integrity()
    torch.testing.assert_close(results[True], results[False], atol=1e-5, rtol=1e-5)


def test_reused_kv_is_never_served_as_an_exact_prefix():
    """After an assembled request, a plain request for the same prompt still prefills the documents."""
    tokens, spans = rag_prompt(seed=6)
    _, _, want = reference(model_of("llama"), tokens)
    eng = Engine(model_of("llama"), eos_ids=set())
    eng.run([Request(tokens=tokens, params=SamplingParams(max_tokens=3), reuse=Reuse(KVReuse(mode="none"), spans))])
    assert eng.stats()["cache_tokens"] == spans[0][0]  # only the exact head went to the tree
    r = Request(tokens=tokens, kind="score", score_from=1)
    eng.run([r])
    torch.testing.assert_close(torch.tensor(r.logprobs), want, atol=1e-4, rtol=1e-4)


def test_bad_spans_are_refused():
    tokens, _ = rag_prompt()
    eng = Engine(model_of("llama"), eos_ids=set())
    for spans in ([(5, 3)], [(2, 9), (8, 12)], [(0, len(tokens) + 1)]):
        with pytest.raises(ValueError, match="document spans"):
            eng.submit(Request(tokens=tokens, reuse=Reuse(KVReuse(mode="none"), spans)))
    with pytest.raises(ValueError, match="select_layer"):
        eng.submit(Request(tokens=tokens, reuse=Reuse(KVReuse(mode="blend", select_layer=9), [(2, 9)])))
