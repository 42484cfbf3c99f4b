"""Token pruning by self-information (LLMLingua).

A budget controller first drops whole demonstrations (blocks of the exemplars
segment) with the lowest mean self-information, leaving twice the budget; then
each segment is pruned window by window: a window's tokens are scored given the
already-compressed text before it (iterative), and the most informative tokens
are kept. The final cut is exact across all segments.
"""

from __future__ import annotations

from promptkit import Prompt, SegmentKind

from .base import Compressor, Piece, merge_words, token_pieces, window_bounds


class SelfInformationCompressor(Compressor):
    """Keep the tokens the small LM finds least predictable."""

    method: str = "selfinfo"
    window_tokens: int = 256
    coarse: bool = True

    def _coarse_demonstrations(self, text: str, keep_tokens: int) -> tuple[str, list[int]]:
        blocks = text.split("\n\n")
        if len(blocks) < 2:
            return text, []
        pieces = token_pieces(self.lm(), SegmentKind.exemplars, text)
        starts, pos = [], 0
        for b in blocks:
            starts.append(pos)
            pos += len(b) + 2
        info = []
        for i, start in enumerate(starts):
            end = start + len(blocks[i])
            scores = [p.score for p in pieces if start <= p.start < end]
            info.append(sum(scores) / max(1, len(scores)))
        kept, used = set(), 0
        for i in sorted(range(len(blocks)), key=lambda i: -info[i]):
            n = self.count(blocks[i])
            if used + n <= keep_tokens or not kept:
                kept.add(i)
                used += n
        return "\n\n".join(blocks[i] for i in sorted(kept)), sorted(kept)

    def pieces(self, prompt: Prompt, texts: dict[SegmentKind, str], question: str, budget: int) -> list[Piece]:
        before = sum(self.count(t) for t in texts.values())
        rate = budget / before
        if self.coarse and SegmentKind.exemplars in texts and rate < 0.5:
            share = self.count(texts[SegmentKind.exemplars]) / before
            texts[SegmentKind.exemplars], _ = self._coarse_demonstrations(
                texts[SegmentKind.exemplars], int(2 * budget * share))
        lm = self.lm()
        out: list[Piece] = []
        compressed = ""  # conditioning text: what precedes, already compressed
        for seg in (k for k in SegmentKind if k in texts):
            text = texts[seg]
            bounds = window_bounds(lm, text, self.window_tokens)
            for a, b in bounds:
                window = text[a:b]
                ps = merge_words(token_pieces(lm, seg, window, compressed), window)
                for p in ps:
                    for x in [p] + (p.parts or []):
                        x.start, x.end = x.start + a, x.end + a
                out.extend(ps)
                keep, room = [], sum(p.tokens for p in ps) * rate
                for p in sorted(ps, key=lambda p: -p.score):
                    if p.tokens <= room:
                        keep.append(p)
                        room -= p.tokens
                compressed += "".join(text[p.start : p.end] for p in sorted(keep, key=lambda p: p.start))
            compressed += "\n\n"
        return out

