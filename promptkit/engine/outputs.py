"""What a forward's logits become: scores recorded, tokens sampled and appended (stop strings,
grammars, EOS, lengths), and finished or failed requests retired and their callers told."""

from __future__ import annotations

import time

import torch

from ..structured import accept_tokens, process_logits
from .fast_forward import can_fast_forward, fast_forward
from .logprobs import record_scores, sampled_logprobs
from .request import Kind, Request
from .sampler import sample
from .scheduler import Scheduler


class Outputs:
    """Turns each forward's logits into its requests' next state (called by the engine loop only)."""

    def __init__(self, scheduler: Scheduler, eos_ids: set[int], vocab_size: int, fast_forward: bool) -> None:
        self.scheduler, self.eos_ids, self.vocab_size = scheduler, eos_ids, vocab_size
        self.fast_forward_enabled = fast_forward
        self.fast_forwarded = 0  # tokens appended without a forward because the grammar allowed nothing else

    def after_forward(self, batch: list[tuple[Request, int]], logits: torch.Tensor,
                       spans: list[tuple[int, int]]) -> None:
        record_scores(batch, logits, spans)
        sampling: list[tuple[Request, int]] = []  # (request, its logits row)
        for (r, n), (_, b) in zip(batch, spans):
            try:
                self.scheduler.advance(r, n)
                if r.pending:
                    continue  # more prefill chunks to come
                if r.kind != Kind.GENERATE:
                    self.finish(r, "stop")
                elif r.aborted:
                    self.finish(r, "abort")
                else:
                    if not r.generated:
                        self.scheduler.cache_prompt(r, r.prompt_len)  # later requests share the prompt now
                    sampling.append((r, b - 1))
            except Exception as e:
                self.fail(r, e)
        if sampling:
            self._sample(sampling, logits)

    def _sample(self, rows: list[tuple[Request, int]], logits: torch.Tensor) -> None:
        reqs = [r for r, _ in rows]
        try:
            index = torch.tensor([i for _, i in rows], device=logits.device)
            x = logits[index]  # a copy: processors edit it, logprobs read the raw rows
            procs = [r.processor for r in reqs]
            if any(p is not None for p in procs):  # constraints, penalties, bias
                process_logits(x, procs, [r.generated for r in reqs])
            toks = sample(x, [r.params.temperature for r in reqs], [r.params.top_p for r in reqs],
                          [r.seed for r in reqs], [len(r.generated) for r in reqs])
            lps, toks = sampled_logprobs(reqs, logits[index], toks), toks.tolist()
        except Exception as e:
            for r in reqs:
                self.fail(r, e)
            return
        for r, tok, lp in zip(reqs, toks, lps):
            try:
                if lp is not None:
                    r.logprobs.append(lp[0])
                    if r.params.top_logprobs:
                        r.top_logprobs.append(lp[1])
                self._append(r, tok)
            except Exception as e:
                self.fail(r, e)

    def _append(self, r: Request, tok: int) -> None:
        if r.first_token_seconds is None:
            r.first_token_seconds = time.perf_counter() - r.started
        if tok in self.eos_ids:
            return self.finish(r, "stop")
        r.tokens.append(tok)
        r.generated.append(tok)
        if r.events is not None:
            r.events.put(tok)
        if r.processor is not None:
            accept_tokens([r.processor], [tok])
            if r.processor.finished:  # the grammar is complete: only EOS could follow
                return self.finish(r, "stop")
        if r.stop_check is not None and r.stop_check(r.generated):
            return self.finish(r, "stop")
        if len(r.generated) >= r.params.max_tokens:
            return self.finish(r, "length")
        if r.aborted:
            return self.finish(r, "abort")
        if can_fast_forward(r, self.fast_forward_enabled):
            before = len(r.generated)
            reason = fast_forward(r, self.vocab_size)
            self.fast_forwarded += len(r.generated) - before
            if reason is not None:
                self.finish(r, reason)

    def finish(self, r: Request, reason: str) -> None:
        if r.finished:
            return
        self.scheduler.retire(r, keep=True)
        r.finished, r.finish_reason = True, reason
        self._notify(r)

    def fail(self, r: Request, error: BaseException) -> None:
        if r.finished:
            return
        try:
            self.scheduler.retire(r, keep=False)
        finally:
            r.finished, r.finish_reason, r.error = True, "error", error
            self._notify(r)

    def _notify(self, r: Request) -> None:
        r.seconds = time.perf_counter() - r.started
        if r.events is not None:
            r.events.put(r.error if r.error is not None else None)
        if not r.future.set_running_or_notify_cancel():
            return  # its caller cancelled the future: nobody waits for this result (and set_result would raise)
        if r.error is not None:
            r.future.set_exception(r.error)
        else:
            r.future.set_result(r)
