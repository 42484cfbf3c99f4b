"""Sparse prefill on the real SmolLM2: through transformers' attention interface and the local engine."""

from __future__ import annotations

import inspect
import sysconfig
from pathlib import Path

import pytest
import torch

from promptkit.engine.sparse import SparseConfig, register_hf_attention

SMALL = dict(min_length=512, block_size=64, bucket=256, min_budget=0, backend="gather", max_density=1.0)


@pytest.fixture(scope="module")
def hf():
    """A private copy of the model (switching its attention must not touch the shared ``real_lm``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from promptkit.models import resolve_llm

    path = resolve_llm()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def long_ids(hf):
    """About 900 tokens of real prose: the Python license, written by others."""
    text = (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text(encoding="utf-8")
    ids = hf[1](text, return_tensors="pt")["input_ids"][:, :900]
    assert ids.shape[1] == 900
    return ids


@torch.inference_mode()
def next_token_logp(model, ids, attn: str) -> torch.Tensor:
    model.set_attn_implementation(attn)
    return torch.log_softmax(model(input_ids=ids, logits_to_keep=1).logits[0, -1].float(), -1)


def test_hf_sparse_prefill_is_close_and_decodes_dense(hf, long_ids):
    model, tok = hf
    stats = register_hf_attention(SparseConfig(gamma=0.9, **SMALL), "pk_sparse")
    dense = next_token_logp(model, long_ids, "sdpa")
    sparse = next_token_logp(model, long_ids, "pk_sparse")
    kl = float((dense.exp() * (dense - sparse)).sum())
    assert 0.0 <= kl < 0.1
    assert int(dense.argmax()) == int(sparse.argmax())
    per_layer = stats.layer_sparsity()
    assert len(per_layer) == model.config.num_hidden_layers
    assert 0.05 < stats.mean_sparsity() < 1.0
    assert set(stats.patterns) <= {"query_aware", "vertical_slash"}
    # A decode step (one query over the cached keys) takes the dense path: nothing is recorded.
    calls = stats.calls
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.inference_mode():
        out = model(input_ids=long_ids, use_cache=True, logits_to_keep=1)
        step = model(input_ids=out.logits[:, -1:].argmax(-1), use_cache=True, **{cache_arg: getattr(out, cache_arg)})
    assert torch.isfinite(step.logits).all()
    assert stats.calls == 2 * calls


def test_local_engine_runs_sparse_prefill(real_lm, hf, long_ids):
    """The engine's own sparse hook: gamma=1 gives the dense engine's greedy answer."""
    from promptkit import LM

    text = hf[1].decode(long_ids[0]) + "\n\nSummarise the text above in one sentence."
    lm = LM(backend="local", sparse=SparseConfig(gamma=1.0, **SMALL), prefix_cache=False)
    got = lm.generate(text, max_tokens=3, temperature=0.0)
    want = real_lm.generate(text, max_tokens=3, temperature=0.0)
    assert got[0].text == want[0].text
    stats = lm.backend.sparse_stats
    assert len(stats.layer_sparsity()) == lm.backend.model.config.num_hidden_layers
