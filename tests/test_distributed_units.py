"""Units, affinity placement and the scaling model, without Ray: prefix chains read from segments,
hot units split, held prefixes free, round-robin blind to them; and the install hint without Ray."""

from __future__ import annotations

import sys

import pytest

from promptkit.distributed.executor import Job, job_items, split_at_lm
from promptkit.distributed.units import (HeldPrefixes, estimate_prefill, place_affinity, place_round_robin,
                                         prefix_chain, prompt_units)
from promptkit.pipeline import Pipeline, Record
from promptkit.prompt import PromptTemplate
from promptkit.stages import BuildPrompt, Classify
from promptkit.types import Document, Prompt


def record(instruction: str, question: str, exemplars: str = "Q: x\nA: y " * 20) -> Record:
    prompt = Prompt.from_parts(instruction=instruction, exemplars=exemplars, question=question, answer_prefix="A:")
    return Record(inputs={"q": question}, prompt=prompt)


def items_of(records_per_job: list[list[Record]]):
    stage = Pipeline(Classify(labels=["yes", "no"]))
    return job_items([Job(stage, recs) for recs in records_per_job])


def test_chain_follows_the_segments_and_cuts_the_context_per_document():
    docs = [Document(id="a", text="Alpha " * 30), Document(id="b", text="Beta " * 30)]
    prompt = PromptTemplate(system="Be brief.", instruction="Answer.").build({"question": "Why?"}, documents=docs)
    chain = prefix_chain(Record(inputs={"question": "Why?"}, prompt=prompt), "mode")
    kinds = [level.kind for level in chain]
    assert kinds == ["mode", "system", "instruction", "context", "context", "question", "answer_prefix"]
    other = PromptTemplate(system="Be brief.", instruction="Answer.").build({"question": "How?"}, documents=docs[:1])
    shared = prefix_chain(Record(inputs={"question": "How?"}, prompt=other), "mode")
    assert [lv.key for lv in shared[:4]] == [lv.key for lv in chain[:4]]  # same first document: same prefix
    assert shared[4].key != chain[4].key
    assert prefix_chain(Record(inputs={"question": "Why?"}, prompt=prompt), "other")[1].key != chain[1].key


def test_units_are_the_items_sharing_a_head():
    items = items_of([[record("Classify A.", f"q{i}") for i in range(5)],
                      [record("Classify B.", f"q{i}") for i in range(3)]])
    units = prompt_units(items)
    assert sorted(len(u.items) for u in units) == [3, 5]
    assert len({items[i].head for u in units for i in u.items}) == 2


def test_affinity_keeps_each_unit_on_one_worker_and_balances():
    jobs = [[record(f"Instruction number {j}. " * 10, f"q{i}") for i in range(6)] for j in range(4)]
    items = items_of(jobs)
    plan = place_affinity(items, [HeldPrefixes(), HeldPrefixes()], max_items=4)
    where: dict[str, set[int]] = {}
    by_key = {(it.job, it.index): it for it in items}
    for t in plan.tasks:
        for job, idx in t.parts.items():
            for i in idx:
                where.setdefault(by_key[(job, i)].head, set()).add(t.worker)
    assert all(len(ws) == 1 for ws in where.values())
    assert {t.worker for t in plan.tasks} == {0, 1}
    assert max(plan.load) <= 1.5 * min(plan.load)


def test_a_hot_unit_is_split_over_the_workers():
    items = items_of([[record("One instruction for all.", f"question {i}") for i in range(40)]])
    plan = place_affinity(items, [HeldPrefixes() for _ in range(4)], max_items=8)
    assert {t.worker for t in plan.tasks} == {0, 1, 2, 3}


def test_held_prefixes_pull_a_unit_back_to_its_worker():
    items = items_of([[record(f"Instruction {j}. " * 20, f"q{i}") for i in range(4)] for j in range(2)])
    held = [HeldPrefixes(), HeldPrefixes()]
    first = place_affinity(items, held, max_items=8)
    for t in first.tasks:  # what the executor records when it sends a task
        for job, idx in t.parts.items():
            for i in idx:
                for level in next(it for it in items if (it.job, it.index) == (job, i)).chain:
                    held[t.worker].add(level.key, level.tokens)
    again = place_affinity(items, held, max_items=8)
    assert {(tuple(t.parts), t.worker) for t in again.tasks} == {(tuple(t.parts), t.worker) for t in first.tasks}


def test_round_robin_deals_units_in_turn_and_prefills_more():
    jobs = [[record("Shared instruction. " * 30 + f"Variant {j}.", f"q{i}", exemplars=f"E{j}") for i in range(3)]
            for j in range(6)]
    items = items_of(jobs)
    rr = place_round_robin(items, 2, max_items=8)
    aff = place_affinity(items, [HeldPrefixes(), HeldPrefixes()], max_items=8)
    assert sum(estimate_prefill(aff, items, 2)) <= sum(estimate_prefill(rr, items, 2))
    assert {t.worker for t in rr.tasks} == {0, 1}


def test_held_prefixes_forget_the_least_recent_past_capacity():
    held = HeldPrefixes(capacity=10)
    held.add("a", 6)
    held.add("b", 3)
    held.add("a", 6)  # used again: now the most recent
    held.add("c", 4)
    assert "a" in held and "c" in held and "b" not in held


def test_pipeline_is_cut_at_its_first_lm_stage():
    pipe = Pipeline(BuildPrompt(instruction="x"), Classify(labels=["a", "b"]))
    head, tail = split_at_lm(pipe)
    assert [s.stage_name for s in head.stages] == ["prompt"]
    assert [s.stage_name for s in tail.stages] == ["classify"]


def test_asking_for_ray_without_it_says_how_to_install(monkeypatch):
    from promptkit.distributed import ray_executor

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"pip install 'promptkit\[ray\]'"):
        ray_executor.RayExecutor(workers=2)


def test_the_core_does_not_import_ray():
    import subprocess

    code = ("import sys, promptkit, promptkit.evaluate, promptkit.distributed, optimizers; "
            "from promptkit.distributed import RayExecutor; assert 'ray' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
