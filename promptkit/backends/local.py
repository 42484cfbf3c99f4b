"""The local backend: the promptkit engine (radix prefix cache, packed prefill, batched decode)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ..engine.chunk_store import StaleKVError, read_meta, write_store
from ..engine.config import EngineConfig, KVReuse
from ..engine.engine import Cancelled, Engine, Request
from ..engine.kv_pool import KVBudgetError
from ..engine.request import Reuse
from ..engine.selective import SelectivePrefill
from ..types import Generation, TokenLogprobs, Usage
from .base import GenerationError, PromptInput, SamplingParams, StreamEvent, kept_tokens, truncate_at_stop
from .detokenize import StopCheck, StreamText
from .hf import TransformersBase
from .selective import choose_tokens

Spans = list[tuple[int, int]]
TOKENIZER_PROBE = "A chunk store: Ünïcode, digits 12345, code `x = f(y)`.\n"


class LocalBackend(TransformersBase):
    """Runs a transformers causal LM on the promptkit engine.

    Engine settings come as an :class:`EngineConfig` (``engine=``) or as its
    field names among the keyword options: ``max_kv_bytes`` (all KV memory:
    the prefix cache and running requests), ``prefix_cache`` (False: no
    reuse across requests), ``max_batch_tokens`` (tokens per forward: bounds
    activation memory and chunks long prefills), ``max_running`` (requests
    decoded together), ``sparse`` (a :class:`promptkit.engine.sparse.SparseConfig`,
    or True for the defaults: sparse attention for long prefills), ``kv_reuse``
    (the default :class:`~promptkit.engine.config.KVReuse` of prompts that mark their
    documents). ``kv_lead_in``: text the documents' KV is encoded after (default: each
    prompt's own text before its first document, or the lead-in of a loaded store).

    ``documents`` (on generate, generate_stream and score): per text, the character spans of
    its documents, whose KV the chunk store keeps and reuses wherever they land.
    """

    supports_kv_reuse = True
    supports_cancel = True  # generate() takes cancel=
    supports_selective_prefill = True  # generate() takes prefill=

    def __init__(self, model: str, engine: EngineConfig | None = None, kv_lead_in: str | None = None,
                 **kw: Any) -> None:
        config, rest = EngineConfig.split(kw)
        if engine is not None:
            config = EngineConfig(**{**engine.model_dump(exclude_unset=True), **config.model_dump(exclude_unset=True)})
        super().__init__(model, **rest)
        self.engine = Engine(self.model, self.eos_ids, config)
        self.sparse_config = config.sparse
        self.sparse_stats = self.engine.sparse_stats
        self.kv_lead_in = tuple(self.encode(kv_lead_in)) if kv_lead_in else None
        self._loaded_stores: set[str] = set()

    # -- documents ---------------------------------------------------------------
    def reuse_config(self, kv_reuse: KVReuse | str | dict | None = None) -> KVReuse:
        """``kv_reuse`` as settings; None means the engine's default."""
        if kv_reuse is None:
            return self.engine.config.kv_reuse
        return kv_reuse if isinstance(kv_reuse, KVReuse) else KVReuse.model_validate(kv_reuse)

    def encode_documents(self, text: str, documents: Spans) -> tuple[list[int], Spans]:
        """Token ids of ``text`` and the token span of each document: the tokens inside its character
        span, less its leading newlines and trailing whitespace (those tokenize with what surrounds
        the document), plus the spaces just before it (tokenizers join them to its first word). So a
        document has the same tokens wherever it lands."""
        enc = self.tokenizer(text, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        spans = []
        for a, b in documents:
            while a < b and text[a] in "\r\n":
                a += 1
            while b > a and text[b - 1].isspace():
                b -= 1
            while a > 0 and text[a - 1] in " \t":
                a -= 1
            inside = [i for i, (x, y) in enumerate(offsets) if a <= x and y <= b and y > x]
            if inside:
                spans.append((inside[0], inside[-1] + 1))
        return ids, spans

    def _prompt(self, prompt: PromptInput, documents: Spans | None, kv_reuse: Any, max_tokens: int | None,
                truncate: bool = False) -> tuple[list[int], Reuse | None]:
        """The prompt's ids, checked against the context with room for ``max_tokens`` (None: the
        rest of it), and how its documents reuse KV (None: no reuse)."""
        cfg = self.reuse_config(kv_reuse)
        if documents and cfg.reuses and isinstance(prompt, str):
            ids, spans = self.encode_documents(prompt, documents)
        else:
            ids, spans = (self.encode(prompt) if isinstance(prompt, str) else self.valid_ids(prompt)), []
        kept = self.check_length(ids, max_tokens if max_tokens is not None else max(1, self.max_context - len(ids)),
                                 truncate)
        cut = len(ids) - len(kept)  # left truncation moves every position
        spans = [(s - cut, e - cut) for s, e in spans if s >= cut]
        return kept, Reuse(cfg, spans, self.kv_lead_in) if spans else None

    # -- generation --------------------------------------------------------------
    def _request(self, prompt: PromptInput, params: SamplingParams, documents: Spans | None = None,
                 kv_reuse: Any = None, prefill: SelectivePrefill | None = None) -> Request:
        ids, reuse = self._prompt(prompt, documents, kv_reuse, params.max_tokens, params.truncate)
        params = params.model_copy(update={"max_tokens": params.tokens_for(len(ids), self.max_context)})
        prefill = prefill or self.engine.config.prefill
        kept = choose_tokens(self, ids, prompt if isinstance(prompt, str) else None, prefill) \
            if prefill is not None and reuse is None else None
        return Request(tokens=ids if kept is None else [ids[i] for i in kept], positions=kept, params=params,
                       stop_check=stop_checker(params.stop, self.decode), processor=self.processor(params),
                       reuse=reuse)

    def _generation(self, r: Request) -> Generation:
        text, stopped = truncate_at_stop(self.decode(r.generated), r.params.stop)
        return Generation(
            text=text, **self._step_logprobs(r, 0, self._kept(r, text) if stopped else len(r.generated)),
            finish_reason="stop" if stopped else r.finish_reason,
            usage=usage_of(r, completion_tokens=len(r.generated)),
        )

    def generate(self, texts: list[PromptInput], params: SamplingParams,
                 documents: Sequence[Spans | None] | None = None,
                 kv_reuse: KVReuse | str | None = None, cancel: threading.Event | None = None,
                 prefill: SelectivePrefill | None = None) -> list[Generation]:
        """One generation per prompt, decoded together; setting ``cancel`` aborts them (raises :class:`Cancelled`).
        ``prefill``: prefill only the tokens that matter (see :class:`SelectivePrefill`)."""
        docs = documents or [None] * len(texts)
        reqs = [self._request(t, params, d, kv_reuse, prefill) for t, d in zip(texts, docs)]
        try:
            done = self.engine.run(reqs, cancel)
        except (KVBudgetError, Cancelled):
            raise
        except Exception as e:
            raise GenerationError(f"the generation failed in the engine: {type(e).__name__}: {e}") from e
        return [self._generation(r) for r in done]

    def generate_stream(self, text: PromptInput, params: SamplingParams, documents: Spans | None = None,
                        kv_reuse: KVReuse | str | None = None) -> Iterator[StreamEvent]:
        """Yield text as it is generated (see :class:`~promptkit.backends.detokenize.StreamText`); the
        last event carries the Generation, and all events' text joined is its text exactly."""
        req = self._request(text, params, documents, kv_reuse)
        shown, sent = StreamText(self.decode, params.stop), 0  # text released; tokens accounted for
        tokens = self.engine.stream(req)
        try:
            try:
                for token in tokens:
                    piece, counted = shown.push(token)
                    if piece:
                        yield StreamEvent(text=piece, **self._step_logprobs(req, sent, counted))
                        sent = counted
            except KVBudgetError:
                raise
            except Exception as e:
                raise GenerationError(f"the generation failed in the engine: {type(e).__name__}: {e}") from e
            gen = self._generation(req)
            yield StreamEvent(text=gen.text[shown.released:], generation=gen,
                              **self._step_logprobs(req, sent, max(sent, len(gen.token_ids))))
        finally:
            tokens.close()

    def _kept(self, r: Request, text: str) -> int:
        """How many generated tokens spell ``text``, the generation cut at a stop string."""
        return kept_tokens(self.token_pieces(r.generated, specials=False), len(text))

    def _step_logprobs(self, r: Request, start: int, end: int) -> dict:
        """Generated tokens ``start:end``, with their logprobs when the request wants them."""
        out: dict = {"token_ids": list(r.generated[start:end])}
        if r.params.logprobs or r.params.top_logprobs:
            out["logprobs"] = r.logprobs[start:end]
        if r.params.top_logprobs:
            out["top_logprobs"] = [self._named(step) for step in r.top_logprobs[start:end]]
        return out

    def _named(self, step: list[tuple[int, float]]) -> dict[str, float]:
        """One step's likeliest tokens, by name (see :meth:`token_texts`)."""
        return dict(zip(self.token_texts([t for t, _ in step]), [lp for _, lp in step]))

    # -- scoring -----------------------------------------------------------------
    def score(self, texts: list[str], choices: list[list[str]], documents: Sequence[Spans | None] | None = None,
              kv_reuse: KVReuse | str | None = None) -> list[list[float]]:
        return self.score_with_usage(texts, choices, documents, kv_reuse)[0]

    def score_with_usage(self, texts: list[str], choices: list[list[str]],
                         documents: Sequence[Spans | None] | None = None,
                         kv_reuse: KVReuse | str | None = None) -> tuple[list[list[float]], list[Usage]]:
        """:meth:`score`, and per text the usage of its choices together."""
        reqs: list[Request] = []
        for text, opts, docs in zip(texts, choices, documents or [None] * len(texts)):
            ctx, reuse = self._prompt(text, docs, kv_reuse, 0)
            for c in opts:
                cont = self.encode_continuation(c)
                if not cont:
                    raise ValueError(f"choice {c!r} has no tokens")
                reqs.append(Request(tokens=self.check_length(ctx + cont, 0), kind="score", score_from=len(ctx),
                                    reuse=reuse))
        self.engine.run(reqs)
        it = iter(reqs)
        scores, usages = [], []
        for opts in choices:
            done = [next(it) for _ in opts]
            scores.append([sum(r.logprobs) for r in done])
            total = Usage()
            for r in done:
                total = total + usage_of(r)
            usages.append(total)
        return scores, usages

    def token_logprobs(self, texts: list[PromptInput], top_logprobs: int = 0) -> list[TokenLogprobs]:
        encs = [self.encode_with_offsets(t) for t in texts]
        top = SamplingParams(top_logprobs=top_logprobs)
        reqs = [Request(tokens=self.check_length(ids, 0), kind="score", score_from=1, params=top) for ids, _ in encs]
        ok = [r for r in reqs if r.prompt_len > 1]
        self.engine.run(ok)
        return [TokenLogprobs(token_ids=r.tokens, tokens=self.tokenizer.convert_ids_to_tokens(r.tokens),
                              logprobs=[None] + r.logprobs, offsets=offs,
                              top_logprobs=[None] + [self._named(step) for step in r.top_logprobs]
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
        """Drop every cached prefix and stored chunk not in use (a loaded KV store included)."""
        self.engine.clear_cache()
        self._loaded_stores.clear()

    # -- the chunk store ----------------------------------------------------------------
    def document_tokens(self, texts: Sequence[str], lead_in: str | None = None) -> tuple[list[int], list[list[int]]]:
        """The lead-in and each document's token ids as a prompt of the default layout holds them
        (a chat turn opening with ``Context:`` and ``[1] <document>``); ``lead_in`` replaces the
        text before the document."""
        from ..prompt import PromptTemplate, render_with_documents
        from ..types import Document, Prompt

        lead, chunks = None, []
        for t in texts:
            prompt = Prompt().with_segment("context", *PromptTemplate().context_segment([Document(id="d", text=t)]))
            text, spans = render_with_documents(prompt, self.apply_chat_template if self.is_chat else None)
            ids, tok = self.encode_documents(text, spans)
            if not tok:
                raise ValueError(f"a document has no tokens of its own: {t[:60]!r}")
            chunks.append(ids[tok[0][0] : tok[0][1]])
            lead = lead if lead is not None else ids[: tok[0][0]]
        if lead_in is not None:
            lead = self.encode(lead_in)
        return lead or [], chunks

    def save_kv_store(self, path: str, texts: Sequence[str], lead_in: str | None = None,
                      extra: dict[str, Any] | None = None) -> int:
        """Encode ``texts`` alone (in batches that fit the KV budget) and save their KV to ``path``
        with the model's identity, the tokenizer's and the lead-in; returns how many were saved."""
        lead, chunks = self.document_tokens(texts, lead_in)
        room = max(1, self.engine.pool.capacity // 2)
        parts, batch, size = [], [], 0
        for c in [*chunks, None]:
            if batch and (c is None or size + len(c) > room):
                self.engine.store_chunks(lead, batch)
                parts.append(self.engine.export_chunks(lead))
                self.engine.clear_cache()
                batch, size = [], 0
            if c is not None:
                batch.append(c)
                size += len(c)
        meta = {"tokenizer": self.encode(TOKENIZER_PROBE), "model_name": self.model_name, **(extra or {})}
        return write_store(path, parts, lead, self.engine.identity(), meta)

    def load_kv_store(self, path: str) -> int:
        """Load a saved chunk store once (refused with StaleKVError if it was made with another model,
        tokenizer or ``kv_lead_in``); returns how many chunks it put in the pool."""
        if path in self._loaded_stores:
            return 0
        mark = read_meta(path).get("tokenizer")
        if mark is None:
            raise StaleKVError(f"{path} does not say which tokenizer made it; rebuild it with promptkit index build --kv")
        if mark != self.encode(TOKENIZER_PROBE):
            raise StaleKVError(f"{path} was made with another tokenizer; rebuild it")
        n = self.engine.load_chunks(path, list(self.kv_lead_in) if self.kv_lead_in else None)
        self._loaded_stores.add(path)
        return n


def usage_of(r: Request, completion_tokens: int = 0) -> Usage:
    return Usage(prompt_tokens=r.prompt_len, cached_tokens=r.counts.matched_len, reused_tokens=r.counts.reused_tokens,
                 recomputed_tokens=r.counts.recomputed_tokens, stored_tokens=r.counts.stored_tokens,
                 completion_tokens=completion_tokens, seconds=r.seconds, first_token_seconds=r.first_token_seconds)


def stop_checker(stop: list[str], decode: Callable[[list[int]], str]) -> Callable[[list[int]], bool] | None:
    """A check, run after every generated token, of whether the text now holds a stop string.

    It decodes and scans only the new tokens' text (see :class:`~promptkit.backends.detokenize.StopCheck`),
    so neither a long generation nor a long stop string makes a token cost more.
    """
    return StopCheck(decode, stop) if stop else None
