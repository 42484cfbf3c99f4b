"""Single-stream decode through the compiled graph (bfloat16 activations, CPU): the eager forward's
tokens, a step from a cached prefix (two runs of keys), and the eager forward whenever the graph is
not ready, cannot take a step or failed to compile; the library is built once per graph key and
loaded from the cache by later engines."""
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
    """Until the build ends; it must have succeeded."""
    graph = eng.runner.compiled
    assert graph is not None
    assert graph.wait(), f"compiling the decode graph failed: {graph.status}"


@pytest.fixture(scope="module")
def compiled_int4() -> Engine:
    eng = engine("int4", compile_decode="build")
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
    assert graph.step(5, 9, [(0, 1), (2, 1), (4, 1), (6, 1), (8, 1)], 30) is None  # more runs than it takes
    assert graph.step(5, 0, [], 0) is None  # no cached keys
    # A batch of two requests decodes through the eager forward.
    ps = prompts(2, lo=6, hi=12, seed=3, vocab=VOCAB)
    before = compiled_int4.stats()["compiled_decode_steps"]
    both = compiled_int4.run([Request(tokens=list(p), params=SamplingParams(max_tokens=8)) for p in ps])
    assert compiled_int4.stats()["compiled_decode_steps"] == before
    assert [len(r.generated) for r in both] == [8, 8]


def test_float32_keeps_the_eager_forward_and_a_failed_compile_decodes_eagerly(monkeypatch, caplog, tmp_path):
    assert engine("float32").runner.compiled is None  # the mode equal to transformers bit for bit
    assert engine("bfloat16", compile_decode=False).runner.compiled is None
    monkeypatch.setenv("PROMPTKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(C, "BUILD_COMMAND", [*C.BUILD_COMMAND[:-1], "promptkit.no_such_module"])
    with caplog.at_level(logging.WARNING, logger="promptkit.engine"):
        eng = engine("bfloat16", compile_decode="build")
    graph = eng.runner.compiled
    assert graph.error is not None and not graph.ready and graph.status.startswith("failed")
    assert "decode stays eager" in caplog.text
    ps = prompts(2, lo=6, hi=12, seed=4, vocab=VOCAB)
    assert generate(eng, ps, 8) == generate(engine("bfloat16", compile_decode=False), ps, 8)
    assert eng.stats()["compiled_decode_steps"] == 0


def test_a_cached_graph_loads_at_once_and_cached_mode_never_builds(compiled_int4, monkeypatch, tmp_path):
    # Another engine of the same shape and format finds the library the fixture built.
    again = engine("int4", compile_decode="cached")
    assert again.runner.compiled.ready and again.runner.compiled.path == compiled_int4.runner.compiled.path
    ps = prompts(1, lo=6, hi=12, seed=7, vocab=VOCAB)
    assert generate(again, ps, 8) == generate(compiled_int4, ps, 8)
    assert again.stats()["compiled_decode_steps"] > 0
    # With an empty cache, "cached" starts no build and decodes eagerly.
    monkeypatch.setenv("PROMPTKIT_CACHE", str(tmp_path))
    fresh = engine("int4", compile_decode="cached")
    assert fresh.runner.compiled.status == "not cached" and not list(tmp_path.rglob("*.so"))
    assert generate(fresh, ps, 8) and fresh.stats()["compiled_decode_steps"] == 0


def test_auto_builds_in_the_background_and_switches_to_the_graph_between_steps(monkeypatch, tmp_path):
    monkeypatch.setenv("PROMPTKIT_CACHE", str(tmp_path))
    eng = engine("bfloat16", compile_decode="auto")
    graph = eng.runner.compiled
    assert graph.status == "building" and not graph.ready
    ps = prompts(1, lo=6, hi=12, seed=8, vocab=VOCAB)
    eager = generate(eng, ps, 8)  # answered eagerly while the child compiles
    graph._child.wait(timeout=C.BUILD_TIMEOUT_S)
    assert generate(eng, ps, 8) == eager  # the next step loads the library and decodes in it
    assert graph.ready and eng.stats()["compiled_decode_steps"] > 0
    assert graph.path.exists() and graph.path.parent == tmp_path / "graphs"


def test_a_roomy_allocation_takes_the_longest_free_run():
    pool = KVPool(1, 1, 4, torch.float32, "cpu", 100 * 32)
    a, _, _ = pool.alloc(10), pool.alloc(5), pool.alloc(30)
    pool.free(a)  # free: 10 slots at 0, 55 at 45
    assert pool.alloc(4) == [(0, 4)]  # first fit
    assert pool.alloc(4, roomy=True) == [(45, 4)]  # the longest run, which can grow in place
    pool.check()


def test_grouped_int8_decodes_in_the_graph_with_the_eager_tokens():
    eng = engine("int8", compile_decode="build")
    wait_for_graph(eng)
    ps = prompts(2, lo=6, hi=20, seed=5, vocab=VOCAB)
    assert generate(eng, ps) == generate(engine("int8", compile_decode=False), ps)
    assert eng.stats()["compiled_decode_steps"] >= len(ps) * 20


def test_the_graph_key_follows_the_shape_not_the_weights():
    # Weights are arguments of the graph: models of one shape share a library, another shape gets its own.
    a, b = (make_tiny_llama(seed=s, layers=1, vocab=VOCAB) for s in (0, 1))
    c = make_tiny_llama(seed=0, layers=1, vocab=VOCAB + 16)
    graphs = []
    for m in (a, b, c):
        W.apply_format(m, "bfloat16")
        eng = Engine(m, eos_ids=set(), compile_decode="off")
        assert eng.runner.compiled is None  # "off" builds nothing at all
        graphs.append(C.CompiledDecode(eng.runner.lean, eng.pool, "off"))
    assert graphs[0].path == graphs[1].path != graphs[2].path


def test_selective_prefill_decodes_in_the_graph_at_its_positions(compiled_int4):
    p = prompts(1, lo=40, hi=41, seed=9, vocab=VOCAB)[0]
    idx = sorted({*range(4), *range(30, 40), 10, 17, 22})  # tokens kept at their places in the prompt

    def request() -> Request:
        return Request(tokens=[p[j] for j in idx], positions=idx, params=SamplingParams(max_tokens=16))

    want = engine("int4", compile_decode=False).run([request()])[0].generated
    before = compiled_int4.stats()["compiled_decode_steps"]
    assert compiled_int4.run([request()])[0].generated == want
    assert compiled_int4.stats()["compiled_decode_steps"] - before >= 14
