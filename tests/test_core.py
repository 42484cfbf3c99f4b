"""Types, prompt building, the pipeline DSL, recipes, metrics and data loading (no model)."""

import json

import pytest
import yaml

from promptkit import Document, Example, Pipeline, Prompt, PromptTemplate, Record, SegmentKind, Stage
from promptkit.data import DataError, load_examples
from promptkit.metrics import accuracy, exact_match, normalize_answer, token_f1
from promptkit.prompt import TemplateError, render, to_messages
from promptkit.recipes import RecipeError, load_recipe, recipe_from_dict
from promptkit.registry import get_stage_class, register_stage, stage_names


def test_prompt_segments_keep_canonical_order():
    p = Prompt.from_parts(question="Q?", system="S", context="C", instruction="I")
    assert [s.kind for s in p.segments] == [SegmentKind.system, SegmentKind.instruction, SegmentKind.context,
                                             SegmentKind.question]
    p2 = p.with_segment("exemplars", "E").with_segment("context", None)
    assert p2.get("exemplars") == "E" and p2.get("context") is None and p.get("context") == "C"
    assert p2.text() == "S\n\nI\n\nE\n\nQ?"
    with pytest.raises(ValueError, match="unknown segment"):
        Prompt.from_parts(footer="x")


def test_example_fields():
    ex = Example(question="2+2?", answer="4")
    assert ex.inputs == {"question": "2+2?"} and ex.output == "4"
    assert Example(text="good", label="pos", output_key="label").output == "pos"


def test_template_builds_segments_and_names_missing_fields():
    t = PromptTemplate(instruction="Answer.", system="Be brief.")
    p = t.build({"question": "Who?"}, exemplars=[Example(question="A?", answer="a")],
                documents=[Document(id="d1", text="alpha")])
    assert p.get("exemplars") == "Question: A?\nAnswer: a"
    assert p.get("context") == "Context:\n[1] alpha"
    assert p.get("question") == "Question: Who?" and p.get("answer_prefix") == "Answer:"
    with pytest.raises(TemplateError, match="'question'"):
        t.build({"text": "no question field"})


def test_rendering_for_chat_and_plain_models():
    p = Prompt.from_parts(system="S", instruction="I", question="Q", answer_prefix="A:")
    assert to_messages(p) == [{"role": "system", "content": "S"}, {"role": "user", "content": "I\n\nQ"}]
    fake = lambda msgs: "|".join(m["role"] + ":" + m["content"] for m in msgs) + "|assistant:"
    assert render(p, fake) == "system:S|user:I\n\nQ|assistant:A:"
    assert render(p, None) == "S\n\nI\n\nQ\nA:"


class Upper(Stage):
    suffix: str = "!"

    def process(self, records):
        for r in records:
            r.output = str(r.inputs["question"]).upper() + self.suffix
        return records


register_stage("test-upper")(Upper)


def test_pipeline_composes_runs_batches_and_traces():
    pipe = Upper() >> Upper(suffix="?")
    assert isinstance(pipe, Pipeline) and len(pipe.stages) == 2
    r = pipe("hi")
    assert isinstance(r, Record) and r.output == "HI?"
    assert [t.stage for t in r.trace] == ["test-upper", "test-upper"]
    assert r.trace[0].changed == {"output": "HI!"}
    out = pipe(["a", {"question": "b"}, Example(question="c", answer="x")])
    assert [x.output for x in out] == ["A?", "B?", "C?"]


def test_pipeline_save_and_load_round_trip(tmp_path):
    pipe = Pipeline(Upper(suffix="..."), name="shout")
    for ext in ("yaml", "json"):
        pipe.save(tmp_path / f"p.{ext}")
        again = Pipeline.load(tmp_path / f"p.{ext}")
        assert again.config() == pipe.config() and again("x").output == "X..."


def test_registry_lists_core_stages():
    assert {"prompt", "generate", "classify"} <= set(stage_names())
    with pytest.raises(KeyError, match="available stages"):
        get_stage_class("nope")


def test_recipe_errors_name_the_field_and_allowed_values(tmp_path):
    with pytest.raises(RecipeError, match="unknown stage 'retrieve-all'.*available stages"):
        recipe_from_dict({"stages": [{"stage": "retrieve-all"}]})
    with pytest.raises(RecipeError, match=r"unknown field 'max_token'; allowed fields: .*max_tokens"):
        recipe_from_dict({"stages": [{"stage": "generate", "max_token": 5}]})
    with pytest.raises(RecipeError, match="max_tokens"):
        recipe_from_dict({"stages": [{"stage": "generate", "max_tokens": "lots"}]})
    with pytest.raises(RecipeError, match="'stage' key"):
        recipe_from_dict({"stages": [{"max_tokens": 5}]})
    with pytest.raises(RecipeError, match="stages"):
        recipe_from_dict({"stages": []})
    with pytest.raises(RecipeError, match="unknown top-level field 'stagez'"):
        recipe_from_dict({"stagez": []})
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [ {stage: generate\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    bad.write_bytes(b"\xff\xfe stages")
    with pytest.raises(RecipeError, match="not UTF-8"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_recipe_builds_stages_and_resolves_relative_paths(tmp_path):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({
        "name": "two", "stages": [{"stage": "prompt", "instruction": "Be brief.", "exemplars": [{"question": "q", "answer": "a"}]},
                                  {"stage": "generate", "max_tokens": 8, "stop": ["\n"]}]}))
    pipe = load_recipe(tmp_path / "r.yaml")
    assert pipe.name == "two" and [s.stage_name for s in pipe.stages] == ["prompt", "generate"]
    assert pipe.stages[1].max_tokens == 8


def test_metrics_hand_computed():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert exact_match("the Paris.", "Paris") == 1.0 and exact_match("Lyon", ["Paris", "Nice"]) == 0.0
    assert token_f1("big red dog", "red dog") == pytest.approx(0.8)
    assert token_f1("", "") == 1.0 and token_f1("cat", "dog") == 0.0
    assert accuracy(" Positive", "positive") == 1.0


def test_load_examples_jsonl_csv_and_errors(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"question": "q1", "answer": "a1"}\n\n{"question": "q2", "answer": "a2"}\n')
    exs = load_examples(tmp_path / "d.jsonl")
    assert [e.output for e in exs] == ["a1", "a2"]
    (tmp_path / "d.csv").write_text("text,label\nnice,pos\nbad,neg\n")
    assert [e.output for e in load_examples(tmp_path / "d.csv", output_key="label")] == ["pos", "neg"]
    (tmp_path / "bad.jsonl").write_text('{"question": "q1"\n')
    with pytest.raises(DataError, match="bad.jsonl:1"):
        load_examples(tmp_path / "bad.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps({"question": "caf"}).encode()[:-2] + b"\xe9\"}\n")
    with pytest.raises(DataError, match="not UTF-8"):
        load_examples(tmp_path / "latin1.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no examples"):
        load_examples(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="output field 'answer'"):
        load_examples(tmp_path / "d.csv")
