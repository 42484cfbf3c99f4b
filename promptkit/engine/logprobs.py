"""Log-probabilities a forward owes its requests: the scored tokens of score requests, and each
sampled token (with its likeliest alternatives) for generations that ask for them."""

from __future__ import annotations

import torch

from .request import Kind, Request
from .sampler import token_logprobs


def record_scores(batch: list[tuple[Request, int]], logits: torch.Tensor, spans: list[tuple[int, int]]) -> None:
    """Append to each score request of ``batch`` the log-probabilities of its scored tokens whose
    logits rows (``spans``) this forward produced; one pass over all of them."""
    rows, targets, owners = [], [], []
    for (r, _), (a, b) in zip(batch, spans):
        if r.kind == Kind.SCORE and b > a:
            lo = max(r.computed, r.score_from - 1)
            rows.append(torch.arange(a, b))
            targets.extend(r.tokens[lo + 1 : lo + 1 + b - a])
            owners.append((r, b - a))
    if not owners:
        return
    dev = logits.device
    top = max(r.params.top_logprobs for r, _ in owners)
    values, vals, ids = token_logprobs(logits[torch.cat(rows).to(dev)], torch.tensor(targets, device=dev), top)
    values = values.tolist()
    vals, ids = (vals.tolist(), ids.tolist()) if top else (None, None)
    at = 0
    for r, n in owners:
        r.logprobs.extend(values[at : at + n])
        if r.params.top_logprobs:  # the likeliest tokens at each scored position (prompt top_logprobs)
            k = r.params.top_logprobs
            r.top_logprobs.extend(list(zip(i[:k], v[:k])) for i, v in zip(ids[at : at + n], vals[at : at + n]))
        at += n


def wants_logprobs(r: Request) -> bool:
    return bool(r.params.logprobs or r.params.top_logprobs > 0)


def sampled_logprobs(reqs: list[Request], logits: torch.Tensor, tokens: torch.Tensor
                     ) -> list[tuple[float, list[tuple[int, float]]] | None]:
    """Per request, the sampled token's log-probability under the raw ``logits`` [B, V] and its
    ``top_logprobs`` alternatives, or None for a request that asked for neither."""
    want = [wants_logprobs(r) for r in reqs]
    if not any(want):
        return [None] * len(reqs)
    top = max(r.params.top_logprobs for r in reqs)
    lp, vals, ids = token_logprobs(logits, tokens, top)
    lp, vals, ids = lp.tolist(), vals.tolist() if top else None, ids.tolist() if top else None
    out: list[tuple[float, list[tuple[int, float]]] | None] = []
    for j, r in enumerate(reqs):
        k = r.params.top_logprobs
        out.append((lp[j], list(zip(ids[j][:k], vals[j][:k])) if k else []) if want[j] else None)  # type: ignore[index]
    return out
