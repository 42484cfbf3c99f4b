"""Attention-guided retention (in the spirit of PromptDistill / LazyLLM).

The engine runs the prompt through its first layers only and measures how
much the question's tokens attend to each context token; the tokens attended
to most are kept.
"""

from __future__ import annotations

from promptkit import Prompt, SegmentKind

from .base import Compressor, Piece, merge_words, spans_from_offsets, window_bounds


class AttentionCompressor(Compressor):
    """Keep the tokens the question attends to most in the first ``layers`` layers."""

    method: str = "attention"
    layers: int = 14
    first_layer: int = 6

    def pieces(self, prompt: Prompt, texts: dict[SegmentKind, str], question: str, budget: int) -> list[Piece]:
        backend = self.lm().backend
        engine = getattr(backend, "engine", None)
        if engine is None:
            raise ValueError("attention-guided compression needs the local engine backend")
        q_ids = backend.encode_continuation("\n\nQuestion: " + (question.strip() or "Summarize the text."))
        longest = max(64, backend.max_context // 2 - len(q_ids))  # a longer segment is read in windows
        out: list[Piece] = []
        for seg, text in texts.items():
            for start, end in window_bounds(self.lm(), text, longest):
                window = text[start:end]
                enc = backend.tokenizer(window, add_special_tokens=False, return_offsets_mapping=True)
                ids = list(enc["input_ids"])
                attn = engine.attention_to(ids + q_ids, len(ids), self.layers, self.first_layer)
                tokens = [Piece(seg, a, b, float(attn[i])) for i, a, b in
                          spans_from_offsets(enc["offset_mapping"], 0, len(window))]
                for p in merge_words(tokens, window, reduce=sum):
                    for x in [p] + (p.parts or []):
                        x.start, x.end = x.start + start, x.end + start
                    out.append(p)
        return out
