"""Log-probabilities of a continuation, read from ``/v1/completions`` in one of two ways.

**Echo** (``echo`` with ``logprobs``): the server returns the log-probability of every prompt
token. A reply lists one entry per token (its text, its character offset and its log-probability;
the first is null), and with ``max_tokens=1`` the generated token last. Servers differ in
what the offsets count: vLLM and ``promptkit serve`` count characters of the prompt as sent,
llama-cpp-python counts characters of its detokenization, in which special tokens such as
``<|im_start|>`` are empty. So entries are placed by their offsets when those agree with the
text, else from the end of the text (where a choice being scored lies).

llama-cpp-python 0.3 also pairs each echoed token with the *next* position's distribution
when the prompt does not start with the model's BOS token (and then drops the generated
token's entry): :func:`generated_token_echoed` detects that on a probe whose continuation is
certain, and the backend refuses to score such prompts rather than sum the wrong numbers.

**Forcing** (llama-cpp-python): the context is sent alone and the choice's own tokens are
generated under a +100 ``logit_bias``; the server reports each generated token's
log-probability from the model's logits, before the bias. It needs one position's
distribution per choice token where echo needs one per prompt token (and llama-cpp-python
spends a full sort of the vocabulary on each), and it tokenizes the context and the choice
apart, as the local engine scores them. :func:`forced_logprob` checks the server generated
exactly the forced tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PROBE = "1, 2, 3, 4, 5, 6, 7,"  # any generated token will do: the probe checks where its entry lands


class ScoringUnavailable(NotImplementedError):
    """The server cannot give log-probabilities that can be trusted for this (the message says why)."""


@dataclass
class EchoedPrompt:
    """The prompt's tokens as the server returned them, placed in the prompt's own characters."""

    tokens: list[str]
    starts: list[int]
    ends: list[int]
    logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    token_ids: list[int] | None
    by_offsets: bool  # placed by the server's offsets (else counted back from the end of the prompt)


def generated_count(reply: dict[str, Any], prompt: str) -> int:
    """How many generated tokens the echo reply carries after the prompt's."""
    done = (reply.get("usage") or {}).get("completion_tokens")
    if done is not None:
        return int(done)
    return int(reply["choices"][0].get("text", prompt) != prompt)


def generated_token_echoed(reply: dict[str, Any], prompt: str) -> bool | None:
    """Whether the reply's last entries are the generated tokens (True: entries line up with tokens;
    False: they are shifted; None: nothing was generated, so it cannot tell)."""
    lp = reply["choices"][0].get("logprobs") or {}
    tokens, text = list(lp.get("tokens") or []), reply["choices"][0].get("text") or ""
    n = generated_count(reply, prompt)
    generated = text[len(prompt):] if text.startswith(prompt) else None
    if n == 0 or not generated:
        return None
    return "".join(tokens[-n:]) == generated


def echoed_prompt(reply: dict[str, Any], prompt: str) -> EchoedPrompt:
    """The prompt's entries of an echo reply (generated ones dropped), placed in ``prompt``."""
    lp = reply["choices"][0].get("logprobs") or {}
    if not lp.get("token_logprobs") or not lp.get("tokens"):
        raise ScoringUnavailable("the reply had no prompt logprobs")
    keep = len(lp["tokens"]) - generated_count(reply, prompt)
    tokens = list(lp["tokens"][:keep])
    offsets = list((lp.get("text_offset") or [])[:keep])
    top, ids = lp.get("top_logprobs"), lp.get("token_ids")
    by_offsets = _offsets_spell(tokens, offsets, prompt)
    starts, ends = _by_offsets(offsets, prompt) if by_offsets else _from_end(tokens, prompt)
    return EchoedPrompt(tokens, starts, ends, list(lp["token_logprobs"][:keep]), list(top[:keep]) if top else None,
                        list(ids[:keep]) if ids else None, by_offsets)


def _clean(token: str) -> bool:
    """A token named by its text (not a partial character: ``bytes:\\x..`` or a replacement mark)."""
    return not token.startswith("bytes:") and "\ufffd" not in token


def _offsets_spell(tokens: list[str], offsets: list[int], prompt: str) -> bool:
    """Whether the server's offsets are positions in ``prompt`` (each whole token found where its offset says)."""
    if len(offsets) != len(tokens) or not tokens:
        return False
    rising = all(0 <= a <= b <= len(prompt) for a, b in zip(offsets, offsets[1:] + [len(prompt)]))
    return rising and all(prompt[o:o + len(t)] == t for o, t in zip(offsets, tokens) if _clean(t))


def _by_offsets(offsets: list[int], prompt: str) -> tuple[list[int], list[int]]:
    return offsets, offsets[1:] + [len(prompt)]


def _from_end(tokens: list[str], prompt: str) -> tuple[list[int], list[int]]:
    starts, ends, end = [], [], len(prompt)
    for t in reversed(tokens):
        ends.append(end)
        end -= len(t)
        starts.append(end)
    return starts[::-1], ends[::-1]


def continuation_logprob(echo: EchoedPrompt, prompt: str, context_chars: int) -> float:
    """Sum of the log-probabilities of the tokens that reach into ``prompt[context_chars:]`` (a token that
    straddles the boundary, when the server merged the two, counts: it is the only one spelling the start)."""
    picked = [i for i, (s, e) in enumerate(zip(echo.starts, echo.ends)) if e > context_chars or s >= context_chars]
    spelled = "".join(echo.tokens[i] for i in picked)
    if not picked or not (echo.by_offsets or spelled == prompt[echo.starts[picked[0]]:]):
        raise ScoringUnavailable("the server's tokens do not spell the scored text, so they cannot be aligned with it")
    values = [echo.logprobs[i] for i in picked]
    if any(v is None for v in values):
        raise ScoringUnavailable("the server gave no log-probability for a token of the scored text")
    return float(sum(values))  # type: ignore[arg-type]


FORCING_BIAS = 100.0


def forcing_body(prompt: str, token_ids: list[int]) -> dict[str, Any]:
    """Request fields that make the server generate ``token_ids`` (greedy, each biased by +100)."""
    return {"prompt": prompt, "max_tokens": len(token_ids), "temperature": 0.0, "logprobs": 1,
            "logit_bias": {str(t): FORCING_BIAS for t in dict.fromkeys(token_ids)}}


def forced_logprob(reply: dict[str, Any], expected: str, n_tokens: int) -> float | None:
    """Sum of the generated tokens' log-probabilities when the server generated exactly ``n_tokens``
    tokens spelling ``expected``; None when it generated something else (biased tokens in another order)."""
    choice = reply["choices"][0]
    lp = choice.get("logprobs") or {}
    values, tokens = lp.get("token_logprobs") or [], lp.get("tokens") or []
    if choice.get("text") != expected or len(tokens) != n_tokens or len(values) != n_tokens:
        return None
    if any(v is None for v in values):
        return None
    return float(sum(values))
