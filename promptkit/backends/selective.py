"""The tokens a selective prefill keeps for one prompt on the local backend (see
:mod:`promptkit.engine.selective`): scored by the target's own first layers or by a draft model."""

from __future__ import annotations

from typing import Any

from ..engine.selective import SelectivePrefill, carry_scores, kept_indices, tail_scores


def choose_tokens(backend: Any, ids: list[int], text: str | None, cfg: SelectivePrefill) -> list[int] | None:
    """Indices of ``ids`` to prefill, or None to prefill them all (a prompt shorter than
    ``cfg.min_tokens``)."""
    if len(ids) < max(cfg.min_tokens, cfg.tail + cfg.sink + 1):
        return None
    if cfg.mode == "filter":
        layers = backend.model.config.get_text_config().num_hidden_layers
        layer = min(cfg.layer or max(1, layers // 3), layers)
        scores = tail_scores(backend.engine, ids, cfg.tail, layer, first_layer=layer - 1)
    else:
        scores = _draft_scores(backend, ids, text, cfg)
    return kept_indices(scores, cfg.keep, cfg.tail, cfg.sink)


def _draft_scores(backend: Any, ids: list[int], text: str | None, cfg: SelectivePrefill) -> Any:
    """The draft model's scores for the target's tokens ``ids``: on the same token ids where the
    two share a tokenizer, else carried over by the characters each token spells."""
    from ..lm import get_lm

    draft = get_lm(cfg.draft)  # type: ignore[arg-type]
    layers = draft.backend.model.config.get_text_config().num_hidden_layers
    if draft.backend.tokenizer.get_vocab() == backend.tokenizer.get_vocab():
        return tail_scores(draft.backend.engine, ids, cfg.tail, layers)
    if text is None:
        raise ValueError("a draft model with another tokenizer needs the prompt as text, not token ids")
    target = backend.tokenizer(text, return_offsets_mapping=True)  # as the backend encodes prompts
    if list(target["input_ids"]) != ids:
        raise ValueError("the prompt's tokens do not spell its text back; prefill it whole")
    mine = draft.backend.tokenizer(text, return_offsets_mapping=True)
    tail_start = target["offset_mapping"][len(ids) - cfg.tail][0]
    tail = sum(1 for a, _ in mine["offset_mapping"] if a >= tail_start)
    scores = tail_scores(draft.backend.engine, list(mine["input_ids"]), max(1, tail), layers)
    return carry_scores(scores, mine["offset_mapping"], target["offset_mapping"])
