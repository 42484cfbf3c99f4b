"""Plain transformers backend: padded batches and ``model.generate``.

It is the reference the engine is tested against and the baseline the
benchmarks compare with; :class:`TransformersBase` also holds what every
local backend shares (loading, tokenizing, chat templates, context checks).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch

from ..engine.models import resolve_llm
from ..types import Generation, TokenLogprobs, Usage
from .base import ContextLengthError, SamplingParams, StreamEvent, truncate_at_stop


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
    """Loads a causal LM and its tokenizer; shared by the local backends."""

    def __init__(
        self,
        model: str,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        progress: bool = False,
        model_obj: Any = None,
        tokenizer: Any = None,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_name = model
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device, dtype)
        if model_obj is None:
            if not progress:
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()
            path = resolve_llm(model, progress=progress)
            tokenizer = AutoTokenizer.from_pretrained(path)
            model_obj = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype, attn_implementation="sdpa")
        self.model = model_obj.to(self.device).eval()
        self.tokenizer = tokenizer
        self.config = self.model.config
        self.max_context = int(getattr(self.config, "max_position_embeddings", 2048))
        self.is_chat = bool(getattr(tokenizer, "chat_template", None))
        self.eos_ids = self._eos_ids()

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
            f"{self.max_context} tokens; shorten or compress the prompt, or pass truncate=True"
        )

    def stats(self) -> dict[str, Any]:
        return {"backend": type(self).__name__, "model": self.model_name, "device": str(self.device)}


class HFBackend(TransformersBase):
    """Reference backend: padded batches through ``transformers`` ``generate``."""

    def __init__(self, model: str, batch_size: int = 16, **kw: Any) -> None:
        super().__init__(model, **kw)
        self.batch_size = batch_size

    @torch.inference_mode()
    def generate(self, texts: list[str], params: SamplingParams) -> list[Generation]:
        out: list[Generation] = []
        for i in range(0, len(texts), self.batch_size):
            out.extend(self._generate_batch(texts[i : i + self.batch_size], params))
        return out

    def _generate_batch(self, texts: list[str], params: SamplingParams) -> list[Generation]:
        t0 = time.perf_counter()
        seqs = [self.check_length(self.encode(t), params.max_tokens, params.truncate) for t in texts]
        width = max(map(len, seqs))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=self.device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=self.device)
        sample = params.temperature > 0
        if params.seed is not None:
            torch.manual_seed(params.seed)
        gen = self.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=params.max_tokens, do_sample=sample,
            temperature=params.temperature if sample else None, top_p=params.top_p if sample else None,
            top_k=None, pad_token_id=pad, output_scores=params.logprobs, return_dict_in_generate=True,
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
            lps = None
            if params.logprobs:
                lps = [float(torch.log_softmax(gen.scores[j][row].float(), -1)[t]) for j, t in enumerate(new)]
            text, stopped = truncate_at_stop(self.decode(new), params.stop)
            results.append(Generation(
                text=text, token_ids=new, logprobs=lps, finish_reason="stop" if stopped else finish,
                usage=Usage(prompt_tokens=len(s), completion_tokens=len(new), seconds=seconds),
            ))
        return results

    def generate_stream(self, text: str, params: SamplingParams) -> Iterator[StreamEvent]:
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
    def token_logprobs(self, texts: list[str]) -> list[TokenLogprobs]:
        out = []
        for text in texts:
            enc = self.tokenizer(text, return_offsets_mapping=True)
            ids = self.check_length(list(enc["input_ids"]), 0)
            logits = self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0].float()
            lp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:], device=self.device)[:, None])
            out.append(TokenLogprobs(
                token_ids=ids, tokens=self.tokenizer.convert_ids_to_tokens(ids),
                logprobs=[None] + lp[:, 0].tolist(), offsets=[tuple(o) for o in enc["offset_mapping"]],
            ))
        return out
