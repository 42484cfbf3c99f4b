"""The LM facade: generate, score and per-token log-probabilities over any backend."""

from __future__ import annotations

import json

import threading
from collections.abc import Sequence
from typing import Any

from .backends.base import Backend, SamplingParams
from .engine.config import KVReuse
from .engine.selective import SelectivePrefill
from .models import DEFAULT_LLM
from .prompt import render, render_with_documents
from .structured import Constraint
from .types import Generation, Prompt, TokenLogprobs, Usage

PromptLike = str | Prompt


def _make_backend(model: str, backend: str, **options: Any) -> Backend:
    if backend == "local":
        from .backends.local import LocalBackend

        return LocalBackend(model, **options)
    if backend == "hf":
        from .backends.hf import HFBackend

        return HFBackend(model, **options)
    if backend == "openai":
        from .backends.openai import OpenAIBackend

        return OpenAIBackend(model, **options)
    raise ValueError(f"unknown backend {backend!r}; choose 'local', 'hf' or 'openai', or pass a Backend")


class LM:
    """A language model behind a small, batch-first API.

    >>> lm = LM()                      # the embedded SmolLM2-135M-Instruct on the local engine
    >>> lm.generate("What is the capital of France?")[0].text
    'The capital of France is Paris.'

    ``backend`` is ``"local"`` (the promptkit engine, default), ``"hf"`` (plain
    transformers, the reference), ``"openai"`` (any OpenAI-compatible server;
    pass ``base_url``) or a :class:`Backend` instance. Other keyword options go
    to the backend (``device``, ``dtype``, ``max_kv_bytes``, ``prefix_cache``, ...; see
    :class:`~promptkit.engine.config.EngineConfig`).

    ``weights`` (local and hf backends) picks the weight format: ``"float32"``
    (equal to transformers token for token), ``"bfloat16"``, ``"int8"``, ``"int4"``
    (weight-only, activations in float; int4 keeps a GGUF model's own 4-bit
    blocks) or ``"int4+bf16"`` (int4 for decode, bfloat16 weights for prefill).
    The default is ``$PROMPTKIT_WEIGHTS`` if set, else the fastest format this
    CPU runs well for the model (``int4+bf16`` for a Q4_1 GGUF such as the
    embedded model, where the CPU has AVX512-BF16); ``LM().stats()["weights"]``
    and ``promptkit doctor`` say which.

    ``kv_reuse`` (on generate and score, or as the engine's default): how the documents of a
    Prompt's context reuse KV computed for each of them alone — ``"full"`` (prefill them, the
    reference), ``"blend"``, ``"sink"`` or ``"none"`` (see :class:`~promptkit.engine.config.KVReuse`).
    """

    def __init__(self, model: str = DEFAULT_LLM, backend: str | Backend = "local", chat: bool | None = None,
                 **options: Any) -> None:
        self.backend: Backend = (
            _make_backend(model, backend, **options) if isinstance(backend, str) else backend
        )
        self.model = model
        self.chat = self.backend.is_chat if chat is None else chat

    def __repr__(self) -> str:
        return f"LM({self.model!r}, backend={type(self.backend).__name__})"

    # -- rendering ---------------------------------------------------------
    def render(self, prompt: PromptLike, chat: bool | None = None) -> str:
        """The exact text the model sees for ``prompt``."""
        use_chat = self.chat if chat is None else chat
        return render(prompt, self.backend.apply_chat_template if use_chat else None)

    def _texts(self, prompts: PromptLike | Sequence[PromptLike], chat: bool | None) -> list[str]:
        return self._rendered(prompts, chat, None)[0]

    def _rendered(self, prompts: PromptLike | Sequence[PromptLike], chat: bool | None,
                  kv_reuse: KVReuse | str | dict | None) -> tuple[list[str], dict[str, Any]]:
        """Rendered texts, and the keyword arguments that hand their documents to the backend."""
        items = [prompts] if isinstance(prompts, (str, Prompt)) else list(prompts)
        for p in items:
            if isinstance(p, str) and not p.strip() or isinstance(p, Prompt) and not p.text().strip():
                raise ValueError("empty prompt: give the model some text to condition on")
        if kv_reuse is not None:  # checked even when no prompt has documents, so a typo never passes
            kv_reuse = KVReuse.model_validate(kv_reuse)
        if not getattr(self.backend, "supports_kv_reuse", False):
            if kv_reuse is not None and kv_reuse.reuses:
                raise ValueError("kv_reuse needs the local backend (the promptkit engine's chunk store)")
            return [self.render(p, chat) for p in items], {}
        template = self.backend.apply_chat_template if (self.chat if chat is None else chat) else None
        out = [render_with_documents(p, template) for p in items]
        docs = [spans for _, spans in out]
        return [t for t, _ in out], {"documents": docs, "kv_reuse": kv_reuse} if any(docs) else {}

    def count_tokens(self, prompt: PromptLike, chat: bool | None = None) -> int:
        """Tokens in a raw string, or in the rendered text of a Prompt (or of a string when ``chat``)."""
        raw = isinstance(prompt, str) and not chat
        return self.backend.count_tokens(prompt if raw else self.render(prompt, chat))

    # -- calls -------------------------------------------------------------
    def generate(
        self,
        prompts: PromptLike | Sequence[PromptLike],
        max_tokens: int | None = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        chat: bool | None = None,
        logprobs: bool = False,
        truncate: bool = False,
        top_logprobs: int = 0,
        json_schema: Any = None,
        regex: str | None = None,
        grammar: str | None = None,
        choices: Sequence[str] | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logit_bias: dict[int, float] | None = None,
        kv_reuse: KVReuse | str | dict | None = None,
        prefill: SelectivePrefill | str | dict | None = None,
    ) -> list[Generation]:
        """Generate a completion for each prompt (one batch). Greedy when ``temperature == 0``.

        ``max_tokens=None`` runs until EOS or the context limit. ``logprobs`` returns each generated
        token's log-probability; ``top_logprobs=k`` also the ``k`` most likely tokens at every step
        (local backend). ``kv_reuse``: see the class.

        Constrained decoding (at most one): ``json_schema`` (a dict, a JSON string or a pydantic model
        class), ``regex``, ``grammar`` (Lark or GBNF) or ``choices`` (the output is exactly one of them).
        ``presence_penalty``, ``frequency_penalty`` and ``logit_bias`` work as OpenAI's do.

        ``prefill`` (local backend): prefill only the tokens that matter, each at its own position:
        ``"filter"`` (the model's first layers choose them, as GemFilter does) or
        ``SelectivePrefill(mode="spec", draft=...)`` (a draft model chooses, as SpecPrefill does);
        faster to the first token on long prompts, and approximate.

        >>> lm.generate("Is water wet? Answer yes or no.", choices=["yes", "no"])[0].text
        'yes'
        """
        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed, logprobs=logprobs,
            truncate=truncate, top_logprobs=top_logprobs,
            constraint=Constraint.of(json_schema=json_schema, regex=regex, grammar=grammar, choices=choices),
            presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, logit_bias=logit_bias or {})
        texts, docs = self._rendered(prompts, chat, kv_reuse)
        if prefill is not None:
            if not getattr(self.backend, "supports_selective_prefill", False):
                raise ValueError("selective prefill needs the local backend (the promptkit engine)")
            docs["prefill"] = SelectivePrefill.model_validate(prefill)
        return self.backend.generate(texts, params, **docs)

    def score(self, prompt: PromptLike, choices: Sequence[str], chat: bool | None = None,
              kv_reuse: KVReuse | str | dict | None = None) -> list[float]:
        """Total log-likelihood of each choice as a continuation of ``prompt``."""
        return self.score_many([prompt], [choices], chat=chat, kv_reuse=kv_reuse)[0]

    def score_many(self, prompts: Sequence[PromptLike], choices: Sequence[Sequence[str]] | Sequence[str],
                   chat: bool | None = None, kv_reuse: KVReuse | str | dict | None = None) -> list[list[float]]:
        """:meth:`score` for many prompts in one batch; ``choices`` is one list per prompt or one shared list."""
        return self.score_with_usage(prompts, choices, chat, kv_reuse)[0]

    def score_with_usage(self, prompts: Sequence[PromptLike], choices: Sequence[Sequence[str]] | Sequence[str],
                         chat: bool | None = None, kv_reuse: KVReuse | str | dict | None = None
                         ) -> tuple[list[list[float]], list[Usage | None]]:
        """:meth:`score_many`, and per prompt the token usage of its choices (None where the
        backend does not report it)."""
        texts, docs = self._rendered(list(prompts), chat, kv_reuse)
        if choices and isinstance(choices[0], str):
            choices = [list(choices)] * len(texts)  # type: ignore[list-item]
        if len(choices) != len(texts):
            raise ValueError(f"{len(texts)} prompts but {len(choices)} choice lists")
        for c in choices:
            if not c:
                raise ValueError("score needs at least one choice")
        lists = [list(c) for c in choices]
        if hasattr(self.backend, "score_with_usage"):
            return self.backend.score_with_usage(texts, lists, **docs)
        return self.backend.score(texts, lists), [None] * len(texts)

    def load_kv_store(self, path: str) -> int:
        """Load documents' KV saved next to an index (``promptkit index build --kv``); local backend."""
        if not getattr(self.backend, "supports_kv_reuse", False):
            raise ValueError("a KV store needs the local backend")
        return self.backend.load_kv_store(path)  # type: ignore[attr-defined]

    def token_logprobs(self, texts: str | Sequence[str], top_logprobs: int = 0) -> list[TokenLogprobs]:
        """Log-probability of every token of each raw text (no chat template); ``top_logprobs=k``
        also the ``k`` most likely tokens at each position."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if top_logprobs:
            return self.backend.token_logprobs(texts, top_logprobs=top_logprobs)  # type: ignore[arg-type]
        return self.backend.token_logprobs(texts)  # type: ignore[arg-type]

    def stats(self) -> dict[str, Any]:
        """Backend counters (for the local engine: tokens prefilled vs served from cache)."""
        return self.backend.stats()


_shared: dict[tuple[str, str, str], LM] = {}
_shared_lock = threading.Lock()


def get_lm(model: str = DEFAULT_LLM, backend: str = "local", **options: Any) -> LM:
    """A process-wide shared LM, so stages naming the same model (and options) load it once."""
    key = (model, backend, json.dumps(options, sort_keys=True, default=repr))
    with _shared_lock:
        if key not in _shared:
            _shared[key] = LM(model, backend=backend, **options)
        return _shared[key]
