"""Plain transformers backend: padded batches and ``model.generate``.

It is the reference the engine is tested against and the baseline the
benchmarks compare with; :class:`TransformersBase` also holds what every
local backend shares (loading, tokenizing, chat templates, context checks).
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from ..models import gguf_source, resolve_llm
from ..engine.threads import on_fresh_thread
from ..engine.weights import activation_dtype, apply_format, gguf_cache_file, is_q4_gguf, resolve_format
from ..structured import accept_tokens, ll_tokenizer, process_logits, processor_for
from ..types import Generation, TokenLogprobs, Usage
from .base import (ContextLengthError, PromptInput, SamplingParams, StreamEvent, kept_tokens, token_text,
                   truncate_at_stop)


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype:
        return getattr(torch, dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class TransformersBase:
    """Loads a causal LM and its tokenizer; shared by the local backends.

    ``weights`` is the weight format (``"float32"``, ``"bfloat16"``, ``"int8"``,
    ``"int4"``; see :mod:`promptkit.engine.weights`); by default the fastest one
    this CPU runs well. ``dtype`` without ``weights`` (or a GPU) loads the model
    in that float dtype, as it comes. A model passed as ``model_obj`` runs as
    given unless ``weights`` is set.
    """

    def __init__(
        self,
        model: str,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        progress: bool = False,
        model_obj: Any = None,
        tokenizer: Any = None,
        weights: str | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_name = model
        self.device = pick_device(device)
        fmt = None
        gguf = gguf_source(model) if model_obj is None else None  # int4 takes its blocks from there
        if weights is None and (dtype is not None or model_obj is not None or self.device.type != "cpu"):
            self.dtype = pick_dtype(self.device, dtype)
            self.weights_note = f"{str(self.dtype).removeprefix('torch.')} as loaded"
        else:
            fmt, self.weights_note = resolve_format(weights, self.device, q4_gguf=is_q4_gguf(gguf))
            self.dtype = activation_dtype(fmt, self.device)

        def load(model_obj: Any, tokenizer: Any) -> tuple[Any, Any, str | None]:
            if model_obj is None:
                if not progress:
                    from transformers.utils import logging as hf_logging

                    hf_logging.disable_progress_bar()
                path = resolve_llm(model, progress=progress)
                tokenizer = AutoTokenizer.from_pretrained(path)
                load_dtype = torch.float32 if fmt and fmt.startswith("int") else self.dtype  # quantized from float32
                model_obj = AutoModelForCausalLM.from_pretrained(path, dtype=load_dtype)  # sdpa where it has it
            model_obj = model_obj.to(self.device).eval()
            weights = fmt and apply_format(model_obj, fmt, gguf=gguf, gguf_cache=gguf_cache_file(gguf))
            return model_obj, tokenizer, weights

        # Loading runs many parallel ops; on a thread of its own, their OpenMP team ends with it (threads.py).
        self.model, tokenizer, self.weights = on_fresh_thread(load, model_obj, tokenizer)
        self.tokenizer = tokenizer
        self.config = self.model.config
        self.max_context = int(getattr(self.config, "max_position_embeddings", 2048))
        self.is_chat = bool(getattr(tokenizer, "chat_template", None))
        self.eos_ids = self._eos_ids()
        self.vocab_size = int(self.model.get_output_embeddings().out_features)  # the logits' width (any weight format)

    def _eos_ids(self) -> set[int]:
        ids = set()
        for src in (self.config.eos_token_id, getattr(self.model, "generation_config", None) and
                    self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if isinstance(src, int):
                ids.add(src)
            elif isinstance(src, (list, tuple)):
                ids.update(int(i) for i in src)
        return ids

    # -- text <-> tokens -------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        if not self.is_chat:
            return "\n\n".join(m["content"] for m in messages)
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def encode_continuation(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    def token_pieces(self, ids: Sequence[int], specials: bool = True) -> list[bytes]:
        """Each token's own bytes: part of a character stays a part; a special token is spelled out,
        or empty with ``specials=False`` (as :meth:`decode` drops it)."""
        ll = ll_tokenizer(self.tokenizer, self.vocab_size, sorted(self.eos_ids))
        return [b"" if not specials and ll.is_special_token(t) else ll.decode_bytes([t]) for t in ids]

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """Each token as logprobs name it (see :func:`promptkit.backends.base.token_text`)."""
        return [token_text(b) for b in self.token_pieces(ids)]

    def char_offsets(self, ids: Sequence[int], start: int = 0) -> list[int]:
        """Where each token begins in the decoded text of ``ids`` (from ``start``): the characters
        completed before it, so a token holding part of a character points at that character."""
        decoder, pos, out = codecs.getincrementaldecoder("utf-8")(errors="replace"), start, []
        for piece in self.token_pieces(ids, specials=False):
            out.append(pos)
            pos += len(decoder.decode(piece))
        return out

    def valid_ids(self, ids: list[int]) -> list[int]:
        """Token ids given as a prompt, checked against the vocabulary."""
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size}); got {bad[:5]}")
        return list(ids)

    def prompt_ids(self, prompt: PromptInput, params: SamplingParams) -> tuple[list[int], SamplingParams]:
        """The prompt's token ids (token-id prompts as given, after a range check), checked against
        the context, and ``params`` with ``max_tokens`` resolved (None: the rest of the context)."""
        ids = self.encode(prompt) if isinstance(prompt, str) else self.valid_ids(prompt)
        ids = self.check_length(ids, params.tokens_for(len(ids), self.max_context), params.truncate)
        return ids, params.model_copy(update={"max_tokens": params.tokens_for(len(ids), self.max_context)})

    def processor(self, params: SamplingParams) -> Any:
        """The request's :class:`promptkit.structured.LogitsProcessor` (constraint, penalties, bias), or None."""
        return processor_for(params, self.tokenizer, self.vocab_size, sorted(self.eos_ids))

    def encode_with_offsets(self, prompt: PromptInput) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and each token's character span: in the text, or for token ids in the
        concatenation of their decoded pieces."""
        if isinstance(prompt, str):
            enc = self.tokenizer(prompt, return_offsets_mapping=True)
            return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        ids = self.valid_ids(prompt)
        starts = self.char_offsets(ids)
        ends = starts[1:] + [len(self.decode(ids))]
        return ids, list(zip(starts, ends))

    def check_length(self, ids: list[int], new_tokens: int, truncate: bool = False) -> list[int]:
        """Return ``ids`` if they fit the context with ``new_tokens`` more, else raise (or left-truncate)."""
        if not ids:
            raise ValueError("empty prompt: nothing to condition on")
        room = self.max_context - new_tokens
        if len(ids) <= room:
            return ids
        if truncate and room > 0:
            return ids[-room:]
        raise ContextLengthError(
            f"prompt has {len(ids)} tokens and {new_tokens} more were asked for, but the model's context is "
            f"{self.max_context} tokens; shorten or compress the prompt, or pass truncate=True",
            prompt_tokens=len(ids), new_tokens=new_tokens, context=self.max_context,
        )

    def stats(self) -> dict[str, Any]:
        return {"backend": type(self).__name__, "model": self.model_name, "device": str(self.device),
                "weights": self.weights.format if self.weights else str(self.dtype).removeprefix("torch."),
                "weights_note": self.weights_note}


class HFBackend(TransformersBase):
    """Reference backend: padded batches through ``transformers`` ``generate``."""

    def __init__(self, model: str, batch_size: int = 16, **kw: Any) -> None:
        super().__init__(model, **kw)
        self.batch_size = batch_size

    @torch.inference_mode()
    def generate(self, texts: list[PromptInput], params: SamplingParams) -> list[Generation]:
        out: list[Generation] = []
        for i in range(0, len(texts), self.batch_size):
            out.extend(self._generate_batch(texts[i : i + self.batch_size], params))
        return out

    def _generate_batch(self, texts: list[PromptInput], params: SamplingParams) -> list[Generation]:
        t0 = time.perf_counter()
        prepared = [self.prompt_ids(t, params) for t in texts]
        seqs = [ids for ids, _ in prepared]
        width = max(map(len, seqs))
        budget = min(p.max_tokens for _, p in prepared)  # type: ignore[type-var]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=self.device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=self.device)
        sample = params.temperature > 0
        if params.seed is not None:
            torch.manual_seed(params.seed)
        procs = [self.processor(params) for _ in seqs]
        extra = {"logits_processor": LogitsProcessorList([_RowProcessors(procs, width)])} if any(procs) else {}
        gen = self.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=budget, do_sample=sample,
            temperature=params.temperature if sample else None, top_p=params.top_p if sample else None,
            top_k=None, pad_token_id=pad, output_logits=params.logprobs, return_dict_in_generate=True, **extra,
        )
        seconds = time.perf_counter() - t0
        results = []
        for row, s in enumerate(seqs):
            new = gen.sequences[row, width:].tolist()
            finish = "length"
            for j, tok in enumerate(new):
                if tok in self.eos_ids:
                    new, finish = new[:j], "stop"
                    break
            if procs[row] is not None and procs[row].finished:  # type: ignore[union-attr]
                finish = "stop"
            lps = None
            if params.logprobs:  # of the raw logits, as the local engine reports them
                lps = [float(torch.log_softmax(gen.logits[j][row].float(), -1)[t]) for j, t in enumerate(new)]
            text, stopped = truncate_at_stop(self.decode(new), params.stop)
            generated = len(new)
            if stopped:  # the tokens (and logprobs) that spell the text returned
                new = new[: kept_tokens(self.token_pieces(new, specials=False), len(text))]
                lps = lps[: len(new)] if lps is not None else None
            results.append(Generation(
                text=text, token_ids=new, logprobs=lps, finish_reason="stop" if stopped else finish,
                usage=Usage(prompt_tokens=len(s), completion_tokens=generated, seconds=seconds),
            ))
        return results

    def generate_stream(self, text: PromptInput, params: SamplingParams) -> Iterator[StreamEvent]:
        """No incremental decoding here: one event with the whole generation."""
        gen = self.generate([text], params)[0]
        yield StreamEvent(text=gen.text, generation=gen, token_ids=gen.token_ids, logprobs=gen.logprobs,
                          top_logprobs=gen.top_logprobs)

    @torch.inference_mode()
    def score(self, texts: list[str], choices: list[list[str]]) -> list[list[float]]:
        out = []
        for text, opts in zip(texts, choices):
            ctx = self.encode(text)
            conts = [self.encode_continuation(c) for c in opts]
            seqs = [self.check_length(ctx + c, 0) for c in conts]
            width = max(map(len, seqs))
            ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=self.device)
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=self.device)
            # Logits of the positions that predict a choice token only: a 262k vocabulary makes the rest costly.
            keep = width - len(ctx) + 1
            logits = self.model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
            logp = torch.log_softmax(logits.float(), -1)  # index i holds position len(ctx) - 1 + i
            row_scores = []
            for r, c in enumerate(conts):
                pos = torch.arange(len(c), device=self.device)
                row_scores.append(float(logp[r, pos, torch.tensor(c, device=self.device)].sum()))
            out.append(row_scores)
        return out

    @torch.inference_mode()
    def token_logprobs(self, texts: list[PromptInput], top_logprobs: int = 0) -> list[TokenLogprobs]:
        out = []
        for text in texts:
            ids, offsets = self.encode_with_offsets(text)
            ids = self.check_length(ids, 0)
            logits = self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0].float()
            logp = torch.log_softmax(logits[:-1], -1)
            lp = logp.gather(-1, torch.tensor(ids[1:], device=self.device)[:, None])
            tops = None
            if top_logprobs:
                vals, idx = logp.topk(top_logprobs)
                tops = [None] + [dict(zip(self.token_texts(i), vs))
                                 for i, vs in zip(idx.tolist(), vals.tolist())]
            out.append(TokenLogprobs(token_ids=ids, tokens=self.tokenizer.convert_ids_to_tokens(ids),
                                     logprobs=[None] + lp[:, 0].tolist(), offsets=offsets, top_logprobs=tops))
        return out


class _RowProcessors(LogitsProcessor):
    """promptkit's per-row processors (grammar masks, penalties, bias) inside ``model.generate``."""

    def __init__(self, procs: list[Any], prompt_width: int) -> None:
        self.procs, self.width = procs, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self.width:]
        if generated.shape[1]:
            accept_tokens(self.procs, generated[:, -1].tolist())
        process_logits(scores, self.procs, generated.tolist())
        return scores
