"""Jump-forward decoding: under a grammar, a token the grammar allows alone is appended without
sampling it; the next forward computes it with the token after it, as one chunk."""

from __future__ import annotations

from .request import Request


def fast_forward(r: Request, vocab_size: int) -> str | None:
    """Append to ``r`` the tokens its grammar forces now (within ``max_tokens``). Returns the finish
    reason if that completes the generation ("stop": the grammar ended or a stop string matched;
    "length": no token left), else None."""
    state = r.processor.state
    while len(r.generated) < r.params.max_tokens and (tok := state.only_token(vocab_size)) is not None:
        state.consume_forced([tok])
        r.processor.seen += 1
        r.tokens.append(tok)
        r.generated.append(tok)
        if r.events is not None:
            r.events.put(tok)
        if r.processor.finished or (r.stop_check is not None and r.stop_check(r.generated)):
            return "stop"
    return "length" if len(r.generated) >= r.params.max_tokens else None


def can_fast_forward(r: Request, enabled: bool) -> bool:
    """Only a constrained request with no logprobs to report (a forced token has no sampled logprob)."""
    return (enabled and r.processor is not None and r.processor.state is not None and not r.params.logprobs
            and not r.params.top_logprobs)
