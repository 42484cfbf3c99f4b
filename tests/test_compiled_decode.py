"""Single-stream decode through the compiled graph (bfloat16 activations, CPU): the eager forward's
tokens, a step from a cached prefix (two runs of keys), and the eager forward whenever the graph is
not ready, cannot take a step or failed to compile."""
import logging

import pytest
import torch

from promptkit.backends.base import SamplingParams
from promptkit.engine import compiled as C
from promptkit.engine import weights as W
from promptkit.engine.engine import Engine, Request
from promptkit.engine.kv_pool import KVPool
from tiny import make_tiny_llama, prompts

VOCAB = 512
pytestmark = pytest.mark.skipif(not W.cpu_features().runs_fast("int4"), reason="int4 needs AVX512")


def engine(fmt: str, **kw) -> Engine:
    model = make_tiny_llama(seed=0, layers=3, vocab=VOCAB)
    W.apply_format(model, fmt)
    return Engine(model, eos_ids=set(), **kw)


def generate(eng: Engine, ps: list[list[int]], n: int = 24) -> list[list[int]]:
    return [eng.run([Request(tokens=list(p), params=SamplingParams(max_tokens=n))])[0].generated for p in ps]


def wait_for_graph(eng: Engine) -> None:
    """Until the background compile ends; it must have succeeded."""
    graph = eng.runner.compiled
    assert graph is not None
    for _ in range(9000):
        if graph.ready.wait(0.1) or graph.error is not None:
            break
    assert graph.ready.is_set(), f"compiling the decode graph failed: {graph.error!r}"


@pytest.fixture(scope="module")
def compiled_int4() -> Engine:
    eng = engine("int4")
    wait_for_graph(eng)
    return eng


def test_the_compiled_step_gives_the_eager_tokens_fresh_and_from_a_cached_prefix(compiled_int4):
    # Two prompts sharing 20 tokens: the second decodes over the cached prefix and its own slots.
    ps = prompts(4, lo=6, hi=30, shared=20, vocab=VOCAB)
    want = generate(engine("int4", compile_decode=False), ps)
    before = compiled_int4.stats()["compiled_decode_steps"]
    assert generate(compiled_int4, ps) == want
    # Every step but the first of each request (the prefill's token) can run in the graph; a
    # request's very first decode steps over a one-slot run stay eager.
    assert compiled_int4.stats()["compiled_decode_steps"] - before >= len(ps) * 20
    compiled_int4.check_integrity()


def test_a_step_the_graph_cannot_take_runs_eagerly(compiled_int4):
    graph = compiled_int4.runner.compiled
    assert graph.step(5, 3, [(0, 3)], 3) is None  # one run too short to split into two
    assert graph.step(5, 9, [(0, 3), (10, 3), (20, 3)], 30) is None  # three runs
    # A batch of two requests decodes through the eager forward.
    ps = prompts(2, lo=6, hi=12, seed=3, vocab=VOCAB)
    before = compiled_int4.stats()["compiled_decode_steps"]
    both = compiled_int4.run([Request(tokens=list(p), params=SamplingParams(max_tokens=8)) for p in ps])
    assert compiled_int4.stats()["compiled_decode_steps"] == before
    assert [len(r.generated) for r in both] == [8, 8]


def test_float32_keeps_the_eager_forward_and_a_failed_compile_decodes_eagerly(monkeypatch, caplog):
    assert engine("float32").runner.compiled is None  # the mode equal to transformers bit for bit
    assert engine("bfloat16", compile_decode=False).runner.compiled is None
    monkeypatch.setattr(C, "_OPTIONS", {"no_such_inductor_option": True})
    with caplog.at_level(logging.WARNING, logger="promptkit.engine"):
        eng = engine("bfloat16")
        graph = eng.runner.compiled
        for _ in range(600):
            if graph.error is not None:
                break
            graph.ready.wait(0.1)
    assert graph.error is not None and not graph.ready.is_set()
    assert "decode stays eager" in caplog.text
    ps = prompts(2, lo=6, hi=12, seed=4, vocab=VOCAB)
    assert generate(eng, ps, 8) == generate(engine("bfloat16", compile_decode=False), ps, 8)
    assert eng.stats()["compiled_decode_steps"] == 0


def test_a_roomy_allocation_takes_the_longest_free_run():
    pool = KVPool(1, 1, 4, torch.float32, "cpu", 100 * 32)
    a, b, c = pool.alloc(10), pool.alloc(5), pool.alloc(30)
    pool.free(a)  # free: 10 slots at 0, 55 at 45
    assert pool.alloc(4) == [(0, 4)]  # first fit
    assert pool.alloc(4, roomy=True) == [(45, 4)]  # the longest run, which can grow in place
    pool.check()


def test_grouped_int8_decodes_in_the_graph_with_the_eager_tokens():
    eng = engine("int8")
    wait_for_graph(eng)
    ps = prompts(2, lo=6, hi=20, seed=5, vocab=VOCAB)
    assert generate(eng, ps) == generate(engine("int8", compile_decode=False), ps)
    assert eng.stats()["compiled_decode_steps"] >= len(ps) * 20


def test_every_engine_in_a_process_gets_its_own_graph():
    # Dynamo caches compiled graphs per code object, one entry per model shape: engines sharing one
    # code object would fail to compile past its recompile limit (8 shapes in a process).
    limit = torch._dynamo.config.recompile_limit
    engines = []
    for i in range(limit + 2):
        model = make_tiny_llama(seed=0, layers=1, vocab=VOCAB + 16 * i)  # a shape of its own
        W.apply_format(model, "bfloat16")
        engines.append(Engine(model, eos_ids=set()))
        wait_for_graph(engines[-1])
    ps = prompts(1, lo=6, hi=10, seed=6, vocab=VOCAB)
    assert engines[-1].run([Request(tokens=ps[0], params=SamplingParams(max_tokens=8))])[0].generated
    assert engines[-1].stats()["compiled_decode_steps"] > 0
