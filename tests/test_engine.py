"""The engine against plain transformers on a tiny random-weight llama (token ids in, token ids out)."""

import threading

import pytest
import torch

from promptkit.backends.base import SamplingParams
from promptkit.engine.config import EngineConfig
from promptkit.engine.engine import Engine, Request
from promptkit.engine.kv_pool import KVBudgetError

from tiny import hf_greedy, make_tiny_llama, prompts

VOCAB = 512


@pytest.fixture(scope="module")
def ref_model():
    m = make_tiny_llama(seed=0, vocab=VOCAB)
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    return m


BPT = 2 * 2 * 2 * 16 * 4  # KV bytes per token of the tiny llama: layers * (k, v) * kv heads * head dim * float32


def make_engine(**kw):
    return Engine(make_tiny_llama(seed=0, vocab=VOCAB), eos_ids=set(), **kw)


@torch.inference_mode()
def hf_logprobs(model, ids):
    logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def greedy(engine, ps, n=12):
    reqs = engine.run([Request(tokens=list(p), params=SamplingParams(max_tokens=n)) for p in ps])
    return [r.generated for r in reqs]


def test_greedy_matches_hf_cold_warm_and_packed(ref_model):
    ps = prompts(6, shared=20)  # a shared head exercises prefix jobs and cascade attention
    want = [hf_greedy(ref_model, p, 12) for p in ps]
    eng = make_engine()
    assert greedy(eng, ps) == want  # cold, all packed into one batch
    assert eng.stats()["tokens_prefilled"] < sum(map(len, ps))  # the shared head was prefilled once
    before = eng.stats()["tokens_prefilled"]
    assert greedy(eng, ps) == want  # warm: prompts (and outputs) now cached
    assert eng.stats()["tokens_prefilled"] - before == len(ps)  # only the last prompt token of each
    eng.check_integrity()


def test_greedy_matches_hf_with_chunked_prefill_and_eviction(ref_model):
    ps = prompts(5, lo=40, hi=90, seed=2, shared=30)
    want = [hf_greedy(ref_model, p, 10) for p in ps]
    budget = 200 * BPT  # less than the five prompts need at once
    # prompts are chunked; the pool is tight; a small reserve makes running requests outgrow it
    eng = make_engine(max_batch_tokens=32, max_kv_bytes=budget, decode_reserve=2)
    for _ in range(2):
        assert greedy(eng, ps, 10) == want
        eng.check_integrity()
    s = eng.stats()
    assert s["kv_high_water_bytes"] <= budget == s["kv_budget_bytes"]
    assert s["evictions"] > 0


@pytest.mark.parametrize("cache", [True, False])
def test_requests_outgrowing_the_pool_preempt_the_youngest_and_still_match_hf(ref_model, cache):
    ps = prompts(3, lo=40, hi=41, seed=15)  # all three are admitted; their generations do not fit
    want = [hf_greedy(ref_model, p, 20) for p in ps]
    eng = make_engine(max_kv_bytes=130 * BPT, decode_reserve=1, prefix_cache=cache)
    assert greedy(eng, ps, 20) == want
    s = eng.stats()
    assert s["preemptions"] > 0 and s["kv_high_water_bytes"] <= s["kv_budget_bytes"]
    eng.check_integrity()


def test_requests_waiting_behind_one_that_fills_the_pool_run_once_it_ends(ref_model):
    long, *short = prompts(3, lo=90, hi=91, seed=21)[:1] + prompts(2, lo=30, hi=31, seed=22)
    eng = make_engine(max_kv_bytes=100 * BPT)  # the long prompt fits, its 30 new tokens do not
    reqs = eng.run([Request(tokens=list(long), params=SamplingParams(max_tokens=30)),
                    *[Request(tokens=list(p), params=SamplingParams(max_tokens=4)) for p in short]])
    first, *rest = reqs
    assert first.finish_reason == "length" and first.generated == hf_greedy(ref_model, long, len(first.generated))
    assert [r.generated for r in rest] == [hf_greedy(ref_model, p, 4) for p in short]  # not refused
    eng.check_integrity()


def test_cache_off_matches_hf(ref_model):
    ps = prompts(4, seed=3, shared=16)
    eng = make_engine(prefix_cache=False)
    assert greedy(eng, ps) == [hf_greedy(ref_model, p, 12) for p in ps]
    assert eng.stats()["tokens_prefilled"] == sum(map(len, ps)) and eng.stats()["tokens_cached"] == 0
    assert eng.stats()["kv_used_bytes"] == 0  # nothing kept once the requests are done


def test_one_budget_bounds_all_kv_with_the_cache_on_or_off(ref_model):
    ps = prompts(8, lo=90, hi=91, seed=11)  # eight 90-token prompts under a 100-token budget
    want = [hf_greedy(ref_model, p, 6) for p in ps]
    for cache in (True, False):
        eng = make_engine(max_kv_bytes=100 * BPT, prefix_cache=cache)
        assert greedy(eng, ps, 6) == want
        s = eng.stats()
        assert s["kv_high_water_bytes"] <= s["kv_budget_bytes"] == 100 * BPT
        eng.check_integrity()


def test_packed_and_cached_prefill_logits_equal_plain_prefill(ref_model):
    ps = prompts(5, seed=4, shared=25)
    eng = make_engine(max_batch_tokens=64)
    eng.run([Request(tokens=ps[0][:30], params=SamplingParams(max_tokens=1))])  # warm a prefix
    # logits of every token after the shared head: computed packed, on top of a cached prefix
    reqs = eng.run([Request(tokens=list(p), kind="score", score_from=26) for p in ps])
    for r, p in zip(reqs, ps):
        assert r.counts.matched_len == 25
        torch.testing.assert_close(torch.tensor(r.logprobs), hf_logprobs(ref_model, p)[25:], atol=1e-4, rtol=1e-4)
    # and with nothing cached: every token's logits through packed prefill
    reqs = make_engine(prefix_cache=False).run([Request(tokens=list(p), kind="score", score_from=1) for p in ps])
    for r, p in zip(reqs, ps):
        torch.testing.assert_close(torch.tensor(r.logprobs), hf_logprobs(ref_model, p), atol=1e-4, rtol=1e-4)


def test_shared_prefix_scoring_prefills_prompt_once(ref_model):
    prompt = prompts(1, lo=50, hi=51, seed=5)[0]
    choices = [[7], [8, 9], [10, 11, 12]]
    eng = make_engine()
    reqs = eng.run([Request(tokens=prompt + c, kind="score", score_from=len(prompt)) for c in choices])
    for r, c in zip(reqs, choices):
        full = hf_logprobs(ref_model, prompt + c)[len(prompt) - 1 :]
        torch.testing.assert_close(torch.tensor(r.logprobs), full, atol=1e-4, rtol=1e-4)
    # the prompt once (prefix job, minus its last token) + per choice its last prompt token and its tokens
    assert eng.stats()["tokens_prefilled"] == (len(prompt) - 1) + sum(1 + len(c) for c in choices)


def test_sampling_is_seeded():
    eng = make_engine()
    p = prompts(1, seed=6)[0]
    run = lambda seed: eng.run([Request(tokens=list(p), params=SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=seed))])[0].generated
    assert run(1) == run(1)
    assert run(1) != run(2)


def test_concurrent_callers_get_correct_results(ref_model):
    ps = prompts(8, seed=7, shared=12)
    want = [hf_greedy(ref_model, p, 8) for p in ps]
    eng = make_engine()
    got = [None] * len(ps)

    def work(i):
        got[i] = eng.run([Request(tokens=list(ps[i]), params=SamplingParams(max_tokens=8))])[0].generated

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(ps))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == want
    eng.check_integrity()
    assert eng.cache.size_info()["locked_bytes"] == 0


def test_stream_yields_tokens_and_abort_frees_the_slot(ref_model):
    p = prompts(1, seed=8)[0]
    eng = make_engine()
    toks = list(eng.stream(Request(tokens=list(p), params=SamplingParams(max_tokens=6))))
    assert toks == hf_greedy(ref_model, p, 6)
    req = Request(tokens=list(p) + [3], params=SamplingParams(max_tokens=50))
    it = eng.stream(req)
    next(it)
    it.close()
    req.future.result(timeout=60)
    assert req.finish_reason == "abort"
    eng.check_integrity()
    assert not eng.scheduler.running and eng.cache.size_info()["locked_bytes"] == 0


def test_bad_requests_and_settings():
    eng = make_engine(max_kv_bytes=50 * BPT)
    with pytest.raises(ValueError, match="empty"):
        eng.submit(Request(tokens=[]))
    with pytest.raises(KVBudgetError, match="KV budget"):
        eng.submit(Request(tokens=list(range(1, 100))))
    for bad in ({"max_running": 0}, {"max_batch_tokens": 0}, {"max_kv_bytes": 0}, {"max_kv_bytes": "lots"}):
        with pytest.raises(ValueError):
            EngineConfig(**bad)
    assert EngineConfig(max_kv_bytes="64MB").max_kv_bytes == 64_000_000


def test_long_generation_grows_private_kv(ref_model):
    ps = prompts(2, seed=9)
    assert greedy(make_engine(), ps, 150) == [hf_greedy(ref_model, p, 150) for p in ps]


def _failing_once(engine, when):
    """Make the runner's forward raise for the first batch ``when(batch)`` accepts."""
    original, state = engine.runner.forward, {"armed": True}

    def forward(batch):
        if state["armed"] and when(batch):
            state["armed"] = False
            raise RuntimeError("device lost")
        return original(batch)

    engine.runner.forward = forward


def test_failed_forward_fails_exactly_its_requests_and_the_engine_goes_on(ref_model):
    ps = prompts(2, seed=10)
    eng = make_engine(max_running=1)  # the two requests cannot share a forward
    bad, good = (Request(tokens=list(p), params=SamplingParams(max_tokens=4)) for p in ps)
    _failing_once(eng, lambda batch: any(r is bad for r, _ in batch))
    eng.submit_many([bad, good])
    with pytest.raises(RuntimeError, match="device lost"):
        bad.future.result(timeout=60)
    assert good.future.result(timeout=60).generated == hf_greedy(ref_model, ps[1], 4)
    assert bad.finish_reason == "error" and good.finish_reason == "length"
    eng.check_integrity()
    assert eng.cache.size_info()["locked_bytes"] == 0
    assert greedy(eng, ps[:1], 4) == [hf_greedy(ref_model, ps[0], 4)]  # the engine still works


def test_errors_reach_run_and_stream_callers():
    eng = make_engine()
    p = prompts(1, seed=12)[0]
    _failing_once(eng, lambda batch: True)
    with pytest.raises(RuntimeError, match="device lost"):
        eng.run([Request(tokens=list(p), params=SamplingParams(max_tokens=4))])
    _failing_once(eng, lambda batch: all(n == 1 for _, n in batch))  # fail a decode step, mid-stream
    it = eng.stream(Request(tokens=list(p) + [1], params=SamplingParams(max_tokens=8)))
    with pytest.raises(RuntimeError, match="device lost"):
        list(it)
    eng.check_integrity()


def test_a_fault_during_admission_fails_its_requests_not_the_engine(ref_model, monkeypatch):
    eng = make_engine()
    p = prompts(1, seed=13)[0]
    original = eng.scheduler.admit
    monkeypatch.setattr(eng.scheduler, "admit", lambda: (_ for _ in ()).throw(MemoryError("no memory")))
    with pytest.raises(MemoryError):
        eng.run([Request(tokens=list(p), params=SamplingParams(max_tokens=3))])
    monkeypatch.setattr(eng.scheduler, "admit", original)
    eng.check_integrity()
    assert greedy(eng, [p], 3) == [hf_greedy(ref_model, p, 3)]


def test_callers_lists_are_not_changed_and_sampling_leaves_the_global_rng_alone():
    eng = make_engine()
    p = prompts(1, seed=14)[0]
    mine = list(p)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    eng.run([Request(tokens=mine, params=SamplingParams(max_tokens=5, temperature=0.8))])
    assert torch.equal(torch.rand(3), expected)
    assert mine == p


@pytest.mark.parametrize("offset", [None, 0, 37])
def test_fused_attention_matches_the_matmul_reference(offset):
    from promptkit.engine import attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(6, 50, 16, generator=g)
    n = 80 if offset is None else 50 + offset
    k, v = torch.randn(2, n, 16, generator=g), torch.randn(2, n, 16, generator=g)
    out, lse = attention.attend_lse(q, k, v, 0.25, offset)
    ref_out, ref_lse = attention.attend_lse_blocks(q, k, v, 0.25, offset)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_decode_attention_reads_long_runs_in_place_and_gathers_the_rest():
    from promptkit.engine.attention import AttentionBackend, BatchLayout, SegmentLayout, layout

    g = torch.Generator().manual_seed(0)
    long = layout.IN_PLACE_RUN
    kv = torch.randn(2, 2, long + 100, 16, generator=g)  # (k, v), kv heads, slots, head dim
    runs = [(0, long), (long + 10, 5), (long + 50, 20)]  # a long cached prefix, then short runs
    seg = SegmentLayout(0, 1, own=runs[2:], own_past=19, prefix=runs[:2], prefix_len=long + 5, keys=runs)
    backend = AttentionBackend(BatchLayout([seg]), kv[None])
    whole, rest = backend.one_step
    assert whole == [(0, long)] and rest.tolist() == [*range(long + 10, long + 15), *range(long + 50, long + 70)]
    q = torch.randn(6, 1, 16, generator=g)
    got = backend._one_step(q, kv[0], kv[1], 0.25)[None]
    slots = torch.cat([torch.arange(a, a + n) for a, n in runs])
    k, v = kv[0][:, slots].repeat_interleave(3, 0), kv[1][:, slots].repeat_interleave(3, 0)
    want = torch.nn.functional.scaled_dot_product_attention(q[None], k[None], v[None], scale=0.25)
    torch.testing.assert_close(got, want.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_decode_after_a_cached_prefix_in_its_own_run_matches_hf(ref_model, monkeypatch):
    from promptkit.engine.attention import AttentionBackend, layout

    monkeypatch.setattr(layout, "IN_PLACE_RUN", 16)  # the tiny model's prefixes are short
    blocks = []
    inner = AttentionBackend._one_step

    def counted(self, *a):
        blocks.append(len(self.one_step[0]) + (self.one_step[1] is not None))
        return inner(self, *a)

    monkeypatch.setattr(AttentionBackend, "_one_step", counted)
    eng = make_engine()
    shared = prompts(1, lo=40, hi=41, seed=7)[0]
    first, second = shared + [5, 6, 7], shared + [9, 10]
    assert greedy(eng, [first], 6) == [hf_greedy(ref_model, first, 6)]
    blocks.clear()
    assert greedy(eng, [second], 6) == [hf_greedy(ref_model, second, 6)]
    assert max(blocks) == 2  # the cached prefix read in place, the request's own keys beside it


def test_matmul_attention_path_matches_hf(ref_model, monkeypatch):
    from promptkit.engine.attention import cpu_flash

    monkeypatch.setattr(cpu_flash, "FLASH", None)  # the path other devices take
    ps = prompts(4, shared=24, seed=5)
    assert greedy(make_engine(), ps, 8) == [hf_greedy(ref_model, p, 8) for p in ps]


def test_prefix_jobs_run_one_nesting_level_per_forward():
    from promptkit.engine.scheduler import prefix_job_steps, shared_prefixes

    base = list(range(1, 21))
    ps = [base + [50] * 20 + [1], base + [50] * 20 + [2], base + [60] * 20 + [3], base + [60] * 20 + [4],
          base + [50] * 20 + [70] * 20 + [5], base + [50] * 20 + [70] * 20 + [6]]
    jobs = shared_prefixes(ps, min_length=16)
    steps = prefix_job_steps(jobs)
    assert [sorted(map(len, s)) for s in steps] == [[20], [40, 40], [60]]
