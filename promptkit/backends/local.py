"""The local backend: the promptkit engine (radix prefix cache, packed prefill, batched decode)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from ..engine.config import EngineConfig
from ..engine.engine import Engine, Request
from ..engine.kv_pool import KVBudgetError
from ..types import Generation, TokenLogprobs, Usage
from .base import GenerationError, PromptInput, SamplingParams, StreamEvent, truncate_at_stop
from .hf import TransformersBase


class LocalBackend(TransformersBase):
    """Runs a transformers causal LM on the promptkit engine.

    Engine settings come as an :class:`EngineConfig` (``engine=``) or as its
    field names among the keyword options: ``max_kv_bytes`` (all KV memory:
    the prefix cache and running requests), ``prefix_cache`` (False: no
    reuse across requests), ``max_batch_tokens`` (tokens per forward: bounds
    activation memory and chunks long prefills), ``max_running`` (requests
    decoded together), ``sparse`` (a :class:`promptkit.engine.sparse.SparseConfig`,
    or True for the defaults: sparse attention for long prefills).
    """

    def __init__(self, model: str, engine: EngineConfig | None = None, **kw: Any) -> None:
        config, rest = EngineConfig.split(kw)
        if engine is not None:
            config = EngineConfig(**{**engine.model_dump(exclude_unset=True), **config.model_dump(exclude_unset=True)})
        super().__init__(model, **rest)
        self.engine = Engine(self.model, self.eos_ids, config)
        self.sparse_config = config.sparse
        self.sparse_stats = self.engine.sparse_stats

    # -- generation --------------------------------------------------------------
    def _request(self, prompt: PromptInput, params: SamplingParams) -> Request:
        ids, params = self.prompt_ids(prompt, params)
        return Request(tokens=ids, params=params, stop_check=stop_checker(params.stop, self.decode),
                       processor=self.processor(params))

    def _generation(self, r: Request) -> Generation:
        text, stopped = truncate_at_stop(self.decode(r.generated), r.params.stop)
        return Generation(
            text=text, **self._step_logprobs(r, 0, len(r.generated)),
            finish_reason="stop" if stopped else r.finish_reason,
            usage=Usage(prompt_tokens=r.prompt_len, cached_tokens=r.matched_len,
                        completion_tokens=len(r.generated), seconds=r.seconds),
        )

    def generate(self, texts: list[PromptInput], params: SamplingParams) -> list[Generation]:
        reqs = [self._request(t, params) for t in texts]
        try:
            done = self.engine.run(reqs)
        except KVBudgetError:
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
                for count, _ in enumerate(tokens, 1):
                    full, stopped = truncate_at_stop(self.decode(req.generated[:count]), params.stop)
                    if not stopped:  # hold back a tail that may be the start of a stop string
                        full = full[: len(full) - _stop_prefix_len(full, params.stop)]
                    if len(full) > len(shown) and not full.endswith("\ufffd"):  # wait for whole characters
                        yield StreamEvent(text=full[len(shown):], **self._step_logprobs(req, sent, count))
                        shown, sent = full, count
            except KVBudgetError:
                raise
            except Exception as e:
                raise GenerationError(f"the generation failed in the engine: {type(e).__name__}: {e}") from e
            gen = self._generation(req)
            yield StreamEvent(text=gen.text[len(shown):], generation=gen,
                              **self._step_logprobs(req, sent, len(req.generated)))
        finally:
            tokens.close()

    def _step_logprobs(self, r: Request, start: int, end: int) -> dict:
        """Generated tokens ``start:end``, with their logprobs when the request wants them."""
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
        self.engine.clear_cache()


def stop_checker(stop: list[str], decode: Callable[[list[int]], str]) -> Callable[[list[int]], bool] | None:
    """A check, run after every generated token, of whether the text now holds a stop string.

    It decodes only a tail of the tokens (a stop string of n characters spans at most 4n byte
    tokens), so a long generation costs the same per token as a short one.
    """
    if not stop:
        return None
    window = 4 * max(map(len, stop)) + 2
    return lambda gen: any(s in decode(gen[-window:]) for s in stop)


def _stop_prefix_len(text: str, stop: list[str]) -> int:
    """Length of the longest tail of ``text`` that is the start of a stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
