"""Every cookbook example runs offline on the embedded models and does what its README says."""

from __future__ import annotations

import importlib.util
import runpy
from pathlib import Path

import pytest

from promptkit import load_recipe

COOKBOOK = Path(__file__).resolve().parent.parent / "cookbook"


def example(path: str) -> dict:
    """The namespace of a cookbook script, as if imported (its __main__ block does not run)."""
    return runpy.run_path(str(COOKBOOK / path), run_name="cookbook_example")


def needs(package: str) -> None:
    if importlib.util.find_spec(package) is None or not list((COOKBOOK.parent / package).glob("*.py")):
        pytest.skip(f"the {package!r} package is not in the repository yet")


def test_every_recipe_loads():
    recipes = sorted(COOKBOOK.glob("*/recipe.yaml"))
    assert len(recipes) >= 3
    for r in recipes:
        folder = r.parent.name
        if folder == "long_doc_compression" and importlib.util.find_spec("compressors.stages") is None:
            continue
        assert len(load_recipe(r).stages) >= 2, folder


def test_rag_qa(real_lm):
    needs("retrievers")
    rows = example("rag_qa/rag_qa.py")["main"](["Who invented the Fresnel lens?", "What do bees use the waggle dance for?"],
                                               max_tokens=8)
    assert rows[0]["sources"][0] == "lighthouses.md" and rows[1]["sources"][0] == "honeybees.md"
    assert "Augustin-Jean" in rows[0]["answer"]  # from the retrieved document, not the model's memory


def test_rag_kv_reuse(real_lm):
    needs("retrievers")
    ns = example("rag_kv_reuse/rag_kv_reuse.py")
    first, second, full = ns["main"](ns["QUESTIONS"], max_tokens=6)
    assert first["sources"] != second["sources"] and sorted(first["sources"]) == sorted(second["sources"])
    assert first["stored"] > 0 and second["stored"] == 0 and second["reused"] > 0  # found in the chunk store
    assert (full["mode"], full["reused"], full["stored"]) == ("full", 0, 0)
    assert full["prefilled"] > 3 * second["prefilled"] and second["ttft"] > 0 and full["ttft"] > 0


def test_fewshot_classification(real_lm):
    needs("optimizers")
    rows = example("fewshot_classification/classify.py")["main"](
        ["What a waste of money, it stopped working at once.", "Lovely little cafe with the kindest owners."])
    assert [r["label"] for r in rows] == ["negative", "positive"]
    # The nearest exemplar comes last, next to the question: a product complaint, and a restaurant compliment.
    assert rows[0]["exemplars"][-1].startswith("It broke after two days")
    assert rows[1]["exemplars"][-1].startswith("Friendly staff")
    assert set(rows[0]["scores"]) == {"positive", "negative"}


def test_serve_openai(real_lm):
    needs("retrievers")
    out = example("serve_openai/serve_openai.py")["main"]("Who invented the Fresnel lens?", max_tokens=8)
    assert out["models"] == [real_lm.model, "docs-bot"]
    msgs = [{"role": "user", "content": "Who invented the Fresnel lens?"}]
    assert out["model_answer"] == real_lm.generate(real_lm.backend.apply_chat_template(msgs), max_tokens=8,
                                                   chat=False)[0].text
    assert "Fresnel" in out["pipeline_answer"] and out["requests_ok"] == 2


def test_long_doc_compression(real_lm):
    needs("compressors")
    rows = example("long_doc_compression/long_doc_compression.py")["main"](["Who invented the Fresnel lens?"])
    row = rows[0]
    assert row["context_tokens_after"] < 0.45 * row["context_tokens_before"]
    assert "Fresnel" in row["answer"]


def test_prompt_optimization(real_lm, tmp_path):
    needs("optimizers")
    from promptkit.evaluate import evaluate

    main = example("prompt_optimization/optimize.py")
    out = main["main"](tmp_path / "optimized.yaml", n_train=60, n_val=16, n_test=16, instructions=0, sets=0)
    assert out["val_optimized"] >= out["val_zero_shot"]
    # The saved recipe is the chosen pipeline: it scores what the search reported on the validation set.
    saved = load_recipe(out["saved"])
    _, val, test = main["load_headlines"](60, 16, 16)
    assert evaluate(saved, val, "accuracy").score == pytest.approx(out["val_optimized"])
    assert evaluate(saved, test, "accuracy").score == pytest.approx(out["test_optimized"])
    low, high = out["test_difference_ci"]
    assert low <= out["test_optimized"] - out["test_zero_shot"] <= high
    assert all(0 < f < 1 for f in out["prefilled_fraction"].values())  # shared prefixes served from the cache


def test_sparse_long_context(real_lm):
    rows = example("sparse_long_context/sparse_long_context.py")["main"](["What year was engraved on the brass compass?"], dense=True)
    row = rows[0]
    assert row["prompt_tokens"] > 2048 and row["sparsity"] > 0.05  # long enough to go sparse, and some layers did
    assert "1911" in row["dense_answer"] and "1911" in row["answer"]


def test_typed_extraction(real_lm):
    from pydantic import BaseModel

    (landmark,) = example("typed_extraction/extract.py")["main"]()
    assert isinstance(landmark, BaseModel) and landmark.name and landmark.place
    record = load_recipe(COOKBOOK / "typed_extraction" / "recipe.yaml")(
        {"text": "The Eiffel Tower was finished in Paris in 1889."})
    assert set(type(record.output).model_fields) == {"name", "place", "year"}


def test_dspy_served(real_lm):
    first, second = example("dspy_served/dspy_program.py")["main"](("France", "Japan"))
    assert isinstance(first.capital, str) and first.capital and isinstance(first.confident, bool)
    assert isinstance(second.confident, bool)
