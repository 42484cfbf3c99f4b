"""Types, prompt building, the pipeline DSL, recipes, metrics and data loading (no model)."""

import datetime
import json

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from promptkit import LM, Classify, Document, Example, Pipeline, Prompt, PromptTemplate, Record, SegmentKind, Stage
from promptkit.data import DataError, load_examples
from promptkit.models import ModelNotFoundError, resolve_llm
from promptkit.metrics import accuracy, exact_match, normalize_answer, token_f1
from promptkit.prompt import TemplateError, render, to_messages
from promptkit.recipes import RecipeError, build_stage, load_recipe, recipe_from_dict
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


def _cli_output(res) -> str:
    return " ".join(res.output.split())  # the error console wraps long lines


def test_load_examples_csv_with_bom_and_multiline_fields(tmp_path):
    text = 'question,answer\r\n"Two\nlines?","yes, ""quoted"""\r\nq2,a2\r\n'
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    exs = load_examples(tmp_path / "bom.csv")
    assert [e.fields for e in exs] == [{"question": "Two\nlines?", "answer": 'yes, "quoted"'},
                                       {"question": "q2", "answer": "a2"}]
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + b'{"question": "q", "answer": "a"}\n')
    assert load_examples(tmp_path / "bom.jsonl")[0].output == "a"


def test_load_examples_names_rows_without_the_gold_field_and_malformed_rows(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"question": "q1", "answer": "a1"}\n{"question": "q2"}\n\n'
                                      '{"question": "q3", "answer": "a3"}\n{"question": "q4"}\n')
    with pytest.raises(DataError, match=r"2 of 4 examples have no output field 'answer' \(lines 2, 5\)"):
        load_examples(tmp_path / "d.jsonl")
    (tmp_path / "d.csv").write_text('question,answer\nq1,a1\n"multi\nline",a2\nq3\n')
    with pytest.raises(DataError, match=r"d\.csv:5: 1 fields but the header has 2"):
        load_examples(tmp_path / "d.csv")
    (tmp_path / "d.csv").write_text("question,answer\nq1,a1,extra\n")
    with pytest.raises(DataError, match=r"d\.csv:2: 3 fields"):
        load_examples(tmp_path / "d.csv")


class City(BaseModel):
    name: str
    founded: datetime.date


class TypedCity(Stage):
    def process(self, records):
        for r in records:
            r.output = City(name=str(r.inputs["question"]), founded=datetime.date(1889, 3, 31))
        return records


register_stage("test-typed-city")(TypedCity)


def test_run_prints_structured_outputs_as_json(tmp_path):
    from typer.testing import CliRunner

    from promptkit.cli import app

    (tmp_path / "r.yaml").write_text("stages:\n  - stage: test-typed-city\n")
    res = CliRunner().invoke(app, ["run", str(tmp_path / "r.yaml"), "--input", "Paris"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == {"name": "Paris", "founded": "1889-03-31"}
    res = CliRunner().invoke(app, ["run", str(tmp_path / "r.yaml"), "--input", "Paris", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["output"] == {"name": "Paris", "founded": "1889-03-31"}


def test_foreign_yaml_is_not_a_recipe(tmp_path):
    from typer.testing import CliRunner

    from promptkit.cli import app

    gha = tmp_path / "gha.yaml"
    gha.write_text("on: push\njobs:\n  build:\n    runs-on: ubuntu\n")
    with pytest.raises(RecipeError, match=r"not a promptkit recipe.*got True"):
        load_recipe(gha)
    res = CliRunner().invoke(app, ["run", str(gha), "-i", "hi"])
    assert res.exit_code == 1 and "not a promptkit recipe" in _cli_output(res), res.output
    with pytest.raises(RecipeError, match=r"stages\[0\]: keys must be field names, got 1"):
        build_stage({"stage": "generate", 1: "x"}, where="stages[0]")


def test_serve_refuses_two_recipes_served_under_one_name(tmp_path):
    from typer.testing import CliRunner

    from promptkit.cli import app

    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "recipe.yaml").write_text("stages:\n  - stage: test-upper\n")
    res = CliRunner().invoke(app, ["serve", "--recipe", str(tmp_path / "a" / "recipe.yaml"),
                                   "--recipe", str(tmp_path / "b" / "recipe.yaml")])
    assert res.exit_code == 1 and "two served models would be named 'recipe'" in _cli_output(res), res.output


def test_unknown_models_are_clear_cli_errors(tmp_path):
    from typer.testing import CliRunner

    from promptkit.cli import app

    runner = CliRunner()
    (tmp_path / "r.yaml").write_text("stages:\n  - stage: generate\n    model: nope\n")
    for args in (["ask", "hi", "--model", "nope"], ["serve", "--model", "nope"],
                 ["run", str(tmp_path / "r.yaml"), "-i", "hi"], ["ask", "hi", "--model", str(tmp_path / "x")]):
        res = runner.invoke(app, args)
        assert res.exit_code == 1 and "Traceback" not in res.output, (args, res.output)
        assert "unknown model 'nope'" in _cli_output(res) or "does not exist" in _cli_output(res), res.output
    assert issubclass(ModelNotFoundError, ValueError) and issubclass(ModelNotFoundError, RuntimeError)


def test_local_model_paths_must_exist_and_hold_a_model(tmp_path):
    for name in (str(tmp_path / "nonexist"), "./no/such/dir", "../no/such/dir", "~/no-such-promptkit-model"):
        with pytest.raises(ModelNotFoundError, match="does not exist"):
            resolve_llm(name)
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_llm(str(tmp_path))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match=r"only GGUF files \(m\.gguf\)"):
        resolve_llm(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="is a file"):
        resolve_llm(str(tmp_path / "m.gguf"))
    (tmp_path / "config.json").write_text("{}")
    assert resolve_llm(str(tmp_path)) == str(tmp_path)
    assert resolve_llm("some-org/some-model") == "some-org/some-model"  # a hub id: left to the HF cache


def test_classify_refuses_duplicate_and_empty_labels_and_shared_verbalizers():
    with pytest.raises(ValidationError, match=r"duplicate labels \['pos'\]"):
        Classify(labels=["pos", "neg", "pos"])
    with pytest.raises(ValidationError, match="labels must not be empty"):
        Classify(labels=["pos", " "])
    with pytest.raises(ValidationError, match=r"share the verbalizer\(s\) \['good'\]"):
        Classify(labels=["pos", "neg"], verbalizers={"pos": "good", "neg": "good"})
    with pytest.raises(ValidationError, match=r"share the verbalizer\(s\) \['neg'\]"):
        Classify(labels=["pos", "neg"], verbalizers={"pos": "neg"})
    with pytest.raises(ValidationError, match=r"empty verbalizers for labels \['neg'\]"):
        Classify(labels=["pos", "neg"], verbalizers={"neg": ""})
    assert Classify(labels=["pos", "neg"], verbalizers={"pos": "good", "neg": "bad"}).words() == [" good", " bad"]


def test_document_metadata_does_not_replace_the_template_fields():
    doc = Document(id="d1", text="alpha", metadata={"index": 99, "id": "fake", "text": "spoof", "source": "wiki"})
    text, spans = PromptTemplate(document_format="[{index}] ({id}, {source}) {text}").context_segment([doc])
    assert text == "Context:\n[1] (d1, wiki) alpha"
    assert [text[a:b] for a, b in spans] == ["alpha"]


class _NoDocsBackend:
    """A backend that reuses KV, records what it is sent and generates nothing."""

    is_chat = False
    supports_kv_reuse = True

    def __init__(self):
        self.calls = []

    def apply_chat_template(self, messages):
        return "\n".join(m["content"] for m in messages)

    def generate(self, texts, params, **docs):
        self.calls.append(docs)
        return []


def test_kv_reuse_is_validated_even_without_documents():
    lm = LM("stub", backend=_NoDocsBackend())
    with pytest.raises(ValueError, match="'full', 'blend', 'sink' or 'none'"):
        lm.generate("plain prompt", kv_reuse="blendz")
    with pytest.raises(ValueError, match="recompute_ratio"):
        lm.generate("plain prompt", kv_reuse={"mode": "blend", "recompute_ratio": 2})
    assert lm.generate("plain prompt", kv_reuse="blend") == [] and lm.backend.calls == [{}]


def test_a_saved_recipe_finds_its_corpus_from_any_directory(tmp_path, monkeypatch):
    from promptkit.stages import BuildPrompt

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "tea.md").write_text("Green tea is made from the leaves of Camellia sinensis.\n")
    (tmp_path / "docs" / "rock.md").write_text("Granite is an igneous rock.\n")
    (tmp_path / "docs" / "sea.md").write_text("The Pacific is the largest ocean.\n")
    monkeypatch.chdir(tmp_path)
    pipe = get_stage_class("bm25")(corpus="docs", k=1) >> BuildPrompt()
    (tmp_path / "recipes").mkdir()
    pipe.save(tmp_path / "recipes" / "rag.yaml")
    assert yaml.safe_load((tmp_path / "recipes" / "rag.yaml").read_text())["stages"][0]["corpus"] == "../docs"
    monkeypatch.chdir(tmp_path / "recipes")
    again = load_recipe("rag.yaml")
    assert [d.id for d in again("What is green tea made from?").documents] == ["tea.md"]
