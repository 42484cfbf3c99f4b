"""Integration with the real embedded SmolLM2-135M-Instruct: the engine against transformers, the facade, the CLI."""

import json

import pytest
from typer.testing import CliRunner

from promptkit import LM, ContextLengthError, Prompt, load_recipe
from promptkit.models import ModelNotFoundError

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Translate 'good morning' into Spanish.",
    "What is the boiling point of water in Celsius?",
    "Write one sentence about the Moon.",
]


def test_capital_of_france(real_lm):
    gen = real_lm.generate("What is the capital of France?", max_tokens=20)[0]
    assert "Paris" in gen.text
    assert gen.finish_reason == "stop" and gen.usage.prompt_tokens > 20 and gen.usage.completion_tokens > 0


def test_engine_greedy_equals_transformers_cold_warm_packed_and_evicted(real_lm, hf_lm):
    want = [hf_lm.generate(q, max_tokens=16)[0].token_ids for q in QUESTIONS]  # one at a time, unpadded
    cold = LM(backend="local", prefix_cache=False)
    assert [g.token_ids for g in cold.generate(QUESTIONS, max_tokens=16)] == want  # packed, no cache
    tight = LM(backend="local", max_kv_bytes=80 * cold.backend.engine.bytes_per_token, max_batch_tokens=64)
    for _ in range(2):  # chunked prefill, a KV budget too small for all: evictions and preemptions
        assert [g.token_ids for g in tight.generate(QUESTIONS, max_tokens=16)] == want
    assert tight.stats()["evictions"] > 0
    warm = LM(backend="local")
    first = warm.generate(QUESTIONS, max_tokens=16)
    again = warm.generate(QUESTIONS, max_tokens=16)
    assert [g.token_ids for g in first] == want and [g.token_ids for g in again] == want
    assert all(g.usage.cached_tokens == g.usage.prompt_tokens - 1 for g in again)


def test_score_prefers_the_right_continuation(real_lm):
    cases = [
        ("What is the capital of France?", [" Paris", " London", " Madrid"], 0),
        ("The opposite of hot is", [" cold", " blue", " fast"], 0),
        ("2 + 2 =", [" 7", " 4", " 12"], 1),
    ]
    for q, choices, right in cases:
        scores = real_lm.score(Prompt.from_parts(question=q), choices)
        assert max(range(len(scores)), key=scores.__getitem__) == right, (q, scores)


def test_score_matches_transformers(real_lm, hf_lm):
    prompt, choices = "The color of the sky on a clear day is", [" blue", " green", " very dark red"]
    assert real_lm.score(prompt, choices) == pytest.approx(hf_lm.score(prompt, choices), abs=2e-3)


def test_classify_stage_with_calibration(real_lm):
    from promptkit import BuildPrompt, Classify

    pipe = BuildPrompt(instruction="Is the review positive or negative?", input_format="Review: {text}",
                       answer_prefix="Sentiment:") >> Classify(labels=["positive", "negative"], calibrate=True)
    out = pipe([{"text": "An absolute delight, I loved every minute."},
                {"text": "Terrible. Boring, far too long, and the acting was awful."}])
    assert [r.output for r in out] == ["positive", "negative"]
    assert set(out[0].label_scores) == {"positive", "negative"}


def test_two_stage_recipe_end_to_end(tmp_path, real_lm):
    (tmp_path / "qa.yaml").write_text(
        "name: qa\nstages:\n  - stage: prompt\n    instruction: Answer in a few words.\n"
        "  - stage: generate\n    max_tokens: 16\n")
    pipe = load_recipe(tmp_path / "qa.yaml")
    rec = pipe("What is the capital of France?")
    assert "Paris" in rec.output and [t.stage for t in rec.trace] == ["prompt", "generate"]


def test_bad_inputs(real_lm):
    with pytest.raises(ValueError, match="empty prompt"):
        real_lm.generate("   ")
    long_text = "word " * 9000
    with pytest.raises(ContextLengthError, match="context is 8192 tokens"):
        real_lm.generate(long_text, max_tokens=4, chat=False)
    gen = real_lm.generate(long_text[-2000:] + "Say hi.", max_tokens=2, chat=False, truncate=True)[0]
    assert gen.usage.prompt_tokens <= 8192
    with pytest.raises(ModelNotFoundError, match="unknown model 'no-such-model'"):
        LM("no-such-model")


def test_cli_ask_prints_the_answer_alone(real_lm):
    from promptkit.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["ask", "What is the capital of France?", "--max-tokens", "20"])
    assert res.exit_code == 0 and "Paris" in res.stdout and res.stdout.strip().count("\n") == 0
    res = runner.invoke(app, ["ask", "What is the capital of France?", "--max-tokens", "20", "--json"])
    data = json.loads(res.stdout)
    assert "Paris" in data["text"] and data["usage"]["prompt_tokens"] > 0
    res = runner.invoke(app, ["ask", " "])
    assert res.exit_code == 1


def test_cli_quickstart_run_and_eval(tmp_path, real_lm):
    from promptkit.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["quickstart", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["documents"][0]["id"] == "everest.md" and "8,849" in out["output"]
    recipe = tmp_path / "qa.yaml"
    recipe.write_text("stages:\n  - stage: prompt\n    instruction: Answer with one word.\n"
                      "  - stage: generate\n    max_tokens: 8\n    stop: ['\\n']\n")
    res = runner.invoke(app, ["run", str(recipe), "--input", "What is the capital of France?"])
    assert res.exit_code == 0 and "Paris" in res.stdout
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "What is the capital of France?", "answer": "Paris"}\n'
                    '{"question": "What is the capital of Italy?", "answer": "Rome"}\n')
    res = runner.invoke(app, ["eval", str(recipe), str(data), "--metric", "contains", "--json",
                              "--results", str(tmp_path / "r.jsonl")])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["n"] == 2 and summary["score"] >= 0.5
    assert 0.0 <= summary["ci_low"] <= summary["score"] <= summary["ci_high"] <= 1.0
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 2
    res = runner.invoke(app, ["run", str(tmp_path / "missing.yaml"), "--input", "x"])
    assert res.exit_code == 1 and "not found" in res.output
