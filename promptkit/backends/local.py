"""The local backend: the promptkit engine (radix prefix cache, packed prefill, batched decode)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ..engine.engine import Engine, Request
from ..engine.radix_cache import CacheBudgetError
from ..types import Generation, TokenLogprobs, Usage
from .base import GenerationError, PromptInput, SamplingParams, StreamEvent, truncate_at_stop
from .hf import TransformersBase

DEFAULT_CACHE_BYTES = 2 << 30


class LocalBackend(TransformersBase):
    """Runs a transformers causal LM on the promptkit engine.

    Options: ``max_cache_bytes`` (prefix cache budget; 0 turns the cache off),
    ``prefix_cache`` (False is the same as ``max_cache_bytes=0``),
    ``max_batch_tokens`` (tokens per forward: bounds activation memory and
    chunks long prefills), ``max_running`` (requests decoded together),
    ``sparse`` (a :class:`promptkit.engine.sparse.SparseConfig`, or True for
    the defaults: sparse attention for long prefills).
    """

    def __init__(self, model: str, max_cache_bytes: int = DEFAULT_CACHE_BYTES, prefix_cache: bool = True,
                 max_batch_tokens: int = 2048, max_running: int = 64, sparse: Any = None, **kw: Any) -> None:
        super().__init__(model, **kw)
        attn_sparse, min_len, self.sparse_stats = _sparse_hook(sparse)
        self.engine = Engine(self.model, self.eos_ids, max_cache_bytes=max_cache_bytes if prefix_cache else 0,
                             max_batch_tokens=max_batch_tokens, max_running=max_running,
                             sparse=attn_sparse, sparse_min_length=min_len)
        self.sparse_config = sparse

    # -- generation --------------------------------------------------------------
    def _request(self, prompt: PromptInput, params: SamplingParams) -> Request:
        ids, params = self.prompt_ids(prompt, params)
        stop = params.stop
        check = (lambda gen: any(s in self.decode(gen) for s in stop)) if stop else None
        return Request(tokens=ids, params=params, stop_check=check, processor=self.processor(params))

    def _generation(self, r: Request) -> Generation:
        text, stopped = truncate_at_stop(self.decode(r.generated), r.params.stop)
        return Generation(
            text=text, **self._step_logprobs(r, 0),
            finish_reason="stop" if stopped else r.finish_reason,
            usage=Usage(prompt_tokens=r.prompt_len, cached_tokens=r.matched_len,
                        completion_tokens=len(r.generated), seconds=r.seconds),
        )

    def generate(self, texts: list[PromptInput], params: SamplingParams) -> list[Generation]:
        reqs = [self._request(t, params) for t in texts]
        try:
            done = self.engine.run(reqs)
        except CacheBudgetError:
            raise
        except Exception as e:
            raise GenerationError(f"the generation failed in the engine: {type(e).__name__}: {e}") from e
        return [self._generation(r) for r in done]

    def generate_stream(self, text: PromptInput, params: SamplingParams) -> Iterator[StreamEvent]:
        req = self._request(text, params)
        shown, sent = "", 0  # text shown and tokens accounted for so far
        tokens = self.engine.stream(req)
        try:
            try:
                for _ in tokens:
                    full, _ = truncate_at_stop(self.decode(req.generated), params.stop)
                    if len(full) > len(shown) and not full.endswith("\ufffd"):  # wait for whole characters
                        yield StreamEvent(text=full[len(shown):], **self._step_logprobs(req, sent))
                        shown, sent = full, len(req.generated)
            except CacheBudgetError:
                raise
            except Exception as e:
                raise GenerationError(f"the generation failed in the engine: {type(e).__name__}: {e}") from e
            if req.error is not None:  # the step that failed ran in another caller's thread
                raise GenerationError(f"the generation failed in the engine: {req.error}") from req.error
            gen = self._generation(req)
            yield StreamEvent(text=gen.text[len(shown):], generation=gen, **self._step_logprobs(req, sent))
        finally:
            tokens.close()

    def _step_logprobs(self, r: Request, start: int) -> dict:
        """The generated tokens from ``start`` on, with their logprobs when the request wants them."""
        end = len(r.generated)  # one logprob per generated token (a stop on EOS scored one step more)
        out: dict = {"token_ids": list(r.generated[start:end])}
        if r.params.logprobs or r.params.top_logprobs:
            out["logprobs"] = r.logprobs[start:end]
        if r.params.top_logprobs:
            out["top_logprobs"] = [{self.decode([t]): lp for t, lp in step} for step in r.top_logprobs[start:end]]
        return out

    # -- scoring -----------------------------------------------------------------
    def score(self, texts: list[str], choices: list[list[str]]) -> list[list[float]]:
        reqs: list[Request] = []
        for text, opts in zip(texts, choices):
            ctx = self.encode(text)
            for c in opts:
                cont = self.encode_continuation(c)
                if not cont:
                    raise ValueError(f"choice {c!r} has no tokens")
                reqs.append(Request(tokens=self.check_length(ctx + cont, 0), kind="score", score_from=len(ctx)))
        self.engine.run(reqs)
        it = iter(reqs)
        return [[sum(next(it).logprobs) for _ in opts] for opts in choices]

    def token_logprobs(self, texts: list[PromptInput], top_logprobs: int = 0) -> list[TokenLogprobs]:
        encs = [self.encode_with_offsets(t) for t in texts]
        top = SamplingParams(top_logprobs=top_logprobs)
        reqs = [Request(tokens=self.check_length(ids, 0), kind="score", score_from=1, params=top) for ids, _ in encs]
        ok = [r for r in reqs if r.prompt_len > 1]
        self.engine.run(ok)
        return [TokenLogprobs(token_ids=r.tokens, tokens=self.tokenizer.convert_ids_to_tokens(r.tokens),
                              logprobs=[None] + r.logprobs, offsets=offs,
                              top_logprobs=[None] + [{self.decode([t]): lp for t, lp in step} for step in r.top_logprobs]
                              if top_logprobs else None)
                for r, (_, offs) in zip(reqs, encs)]

    # -- cache ------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        out = {**super().stats(), **self.engine.stats()}
        if self.sparse_stats is not None:
            out["sparse_mean_sparsity"] = self.sparse_stats.mean_sparsity()
            out["sparse_layer_sparsity"] = self.sparse_stats.layer_sparsity()
        return out

    def clear_cache(self) -> None:
        """Drop every cached prefix not in use."""
        with self.engine._step_lock:
            self.engine.cache.clear()


def _sparse_hook(sparse: Any) -> tuple[Any, int, Any]:
    """The engine's sparse-attention callable, its minimum length and its statistics (or Nones)."""
    if not sparse:
        return None, 1 << 62, None
    from ..engine import sparse as sparse_mod

    cfg = sparse_mod.SparseConfig() if sparse is True else sparse
    if isinstance(cfg, dict):
        cfg = sparse_mod.SparseConfig(**cfg)
    stats = sparse_mod.SparseStats()

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, layer: int) -> torch.Tensor:
        out, info = sparse_mod.sparse_attention(q, k, v, cfg, scale=scale)
        stats.record(layer, info)
        return out

    return (run if cfg.enabled else None), cfg.min_length, stats
