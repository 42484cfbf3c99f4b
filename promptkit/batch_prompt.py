"""BatchPrompt: many items in one prompt, asked in several orders and voted, with early stopping.

Lin et al. (2024), "BatchPrompt: Accomplish more with less". One prompt carries a numbered list of
items and the model answers one line per item (``1: <answer>``). Batch Permutation and Ensembling
(BPE) asks every batch again in other orders (``permutations`` rounds) and takes a majority vote per
item, since an item's answer depends on where it sits in the batch. Self-reflection-guided early
stopping (SEAS) drops an item from later rounds once the model has given the same answer
confidently ``seas_votes`` times; here the confidence is the model's own probability of the
answer's tokens (the paper asks the model to write "confident" or "not confident", which a small
model does not do reliably).

Each answer is decoded under a regular expression with one line per item, its number fixed and
the answer constrained (to the label words for a classifier), so a batch answer always parses
into one answer per item.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .lm import LM
from .types import Generation, Prompt, SegmentKind, Usage

CLASSIFY_HEADER = ("Label each of the {n} items below as one of: {labels}. "
                   "Answer with one line per item: its number, a colon and its label.")
GENERATE_HEADER = ("Answer each of the {n} items below. "
                   "Answer with one line per item: its number, a colon and its answer.")


class BatchPrompt(BaseModel):
    """Settings of batched prompting (see the module doc).

    ``size`` items share one prompt; ``permutations`` rounds ask them in different orders (round 0
    in the given order, later rounds shuffled, seeded by ``seed``) and vote; with ``seas`` an item
    stops being asked once it has ``seas_votes`` answers alike whose probability reached
    ``confidence``. ``input_key`` names the input listed per item (default: the classifier's input,
    or the record's question segment for generation). ``header`` opens the list (``{n}``: the batch
    size, ``{labels}``: the label words); ``answer_prefix`` opens the answer. ``item_tokens`` bounds
    one free-text answer.
    """

    model_config = ConfigDict(extra="forbid")

    size: int = Field(default=8, ge=1)
    permutations: int = Field(default=1, ge=1)
    seas: bool = False
    confidence: float = Field(default=0.9, gt=0.0, le=1.0)
    seas_votes: int = Field(default=2, ge=1)
    seed: int = 0
    input_key: str | None = None
    header: str | None = None
    answer_prefix: str = "Answers:\n"
    item_tokens: int = Field(default=32, ge=1)


class Vote(BaseModel):
    """One answer given to one item in one round."""

    answer: str
    probability: float | None = None  # the model's probability of the answer's tokens


class BatchOutcome(BaseModel):
    """What a batched run answered and what it cost."""

    answers: list[str | None]
    votes: list[list[Vote]]
    calls: int = 0  # prompts sent to the model
    rounds: int = 0
    usage: Usage = Field(default_factory=Usage)
    first_usage: list[Usage | None] = Field(default_factory=list)  # per item: the batch call that first answered it


# -- the answer format ---------------------------------------------------------------
def item_regex(n: int, answer: str) -> str:
    """``1: <answer>\\n2: <answer>...``: one line per item, numbered, each matching ``answer``."""
    return "\n".join(f"{i}: (?:{answer})" for i in range(1, n + 1))


def choice_pattern(choices: Sequence[str]) -> str:
    """A regular expression matching exactly one of ``choices`` (longest first, so none shadows another)."""
    return "|".join(re.escape(c) for c in sorted(choices, key=len, reverse=True))


def parse_lines(text: str, n: int) -> list[str | None]:
    """The answer on each numbered line ``i: answer`` (None for a line that is missing)."""
    out: list[str | None] = [None] * n
    for line in text.split("\n"):
        m = re.match(r"\s*(\d+)\s*[:.)]\s?(.*)$", line)
        if m and 1 <= int(m.group(1)) <= n and out[int(m.group(1)) - 1] is None:
            out[int(m.group(1)) - 1] = m.group(2).strip()
    return out


def answer_probabilities(lm: LM, gen: Generation, n: int) -> list[float | None]:
    """Per numbered line, the product of the probabilities of the tokens that spell its answer."""
    offsets = getattr(lm.backend, "char_offsets", None)
    if gen.logprobs is None or offsets is None:
        return [None] * n
    starts = offsets(gen.token_ids)
    spans = _answer_spans(gen.text, n)
    out: list[float | None] = [None] * n
    for i, span in enumerate(spans):
        if span is None:
            continue
        a, b = span
        # a token belongs to the answer when it ends inside it (its leading space may precede it)
        ends = starts[1:] + [len(gen.text)]
        logp = [lp for s, e, lp in zip(starts, ends, gen.logprobs) if e > a and s < b]
        out[i] = math.exp(sum(logp)) if logp else None
    return out


def _answer_spans(text: str, n: int) -> list[tuple[int, int] | None]:
    spans: list[tuple[int, int] | None] = [None] * n
    for m in re.finditer(r"(?m)^\s*(\d+)\s*[:.)]\s?(.*)$", text):
        i = int(m.group(1)) - 1
        if 0 <= i < n and spans[i] is None:
            spans[i] = (m.start(2), m.end(2))
    return spans


# -- prompts ---------------------------------------------------------------------------
def batch_prompt(layout: Prompt, items: Sequence[str], header: str, answer_prefix: str) -> Prompt:
    """``layout`` (its system, instruction, exemplars and context) asking the numbered ``items``."""
    lines = "\n".join(f"{i}: {' '.join(str(t).split())}" for i, t in enumerate(items, 1))
    question = f"{header.replace('{n}', str(len(items)))}\n\n{lines}" if header else lines
    return layout.with_segment(SegmentKind.question, question).with_segment(SegmentKind.answer_prefix, answer_prefix)


# -- rounds and votes ------------------------------------------------------------------
AskRound = Callable[[list[list[int]]], list[list[Vote | None]]]


def run_rounds(n_items: int, settings: BatchPrompt, ask: AskRound) -> tuple[list[list[Vote]], int, int]:
    """Ask ``n_items`` in batches over the rounds; ``ask`` answers one round's batches (item indices).

    Returns the votes per item, the number of batches asked and the rounds run.
    """
    votes: list[list[Vote]] = [[] for _ in range(n_items)]
    active, calls, rounds = list(range(n_items)), 0, 0
    for r in range(settings.permutations):
        if not active:
            break
        order = list(active)
        if r:
            random.Random(settings.seed * 1_000_003 + r).shuffle(order)
        batches = [order[i:i + settings.size] for i in range(0, len(order), settings.size)]
        for batch, answers in zip(batches, ask(batches)):
            for item, vote in zip(batch, answers):
                if vote is not None:
                    votes[item].append(vote)
        calls, rounds = calls + len(batches), rounds + 1
        if settings.seas:
            active = [i for i in active if not settled(votes[i], settings)]
    return votes, calls, rounds


def settled(votes: Sequence[Vote], settings: BatchPrompt) -> bool:
    """SEAS: whether one answer was given confidently ``seas_votes`` times."""
    sure: dict[str, int] = {}
    for v in votes:
        if v.probability is not None and v.probability >= settings.confidence:
            sure[v.answer] = sure.get(v.answer, 0) + 1
    return any(c >= settings.seas_votes for c in sure.values())


def majority(votes: Sequence[Vote]) -> str | None:
    """The most frequent answer; ties go to the larger summed probability, then the earliest."""
    if not votes:
        return None
    tally: dict[str, tuple[int, float]] = {}
    for v in votes:
        count, mass = tally.get(v.answer, (0, 0.0))
        tally[v.answer] = (count + 1, mass + (v.probability or 0.0))
    return max(tally, key=lambda a: tally[a])  # dicts keep first-seen order, and max keeps the first best


# -- running ---------------------------------------------------------------------------
def answer_in_batches(lm: LM, layout: Prompt, items: Sequence[str], settings: BatchPrompt, answer: str,
                      header: str, max_tokens: int, **generate: Any) -> BatchOutcome:
    """Ask ``items`` in numbered batches under ``layout``; each answer matches the regex ``answer``.

    All batches of a round go to the engine as one batch; they share ``layout`` as their prefix.
    ``generate`` passes sampling options (``chat``, ``temperature``, ``seed``...) to :meth:`LM.generate`.
    """
    usage, first_usage = Usage(), [None] * len(items)  # type: list[Usage | None]

    def ask(batches: list[list[int]]) -> list[list[Vote | None]]:
        nonlocal usage
        prompts = [batch_prompt(layout, [items[i] for i in b], header, settings.answer_prefix) for b in batches]
        gens = _generate_round(lm, prompts, [len(b) for b in batches], answer, max_tokens, generate)
        out = []
        for b, g in zip(batches, gens):
            usage = usage + g.usage
            for i in b:
                first_usage[i] = first_usage[i] or g.usage
            probs = answer_probabilities(lm, g, len(b))
            out.append([None if a is None else Vote(answer=a, probability=p)
                        for a, p in zip(parse_lines(g.text, len(b)), probs)])
        return out

    votes, calls, rounds = run_rounds(len(items), settings, ask)
    return BatchOutcome(answers=[majority(v) for v in votes], votes=votes, calls=calls, rounds=rounds,
                        usage=usage, first_usage=first_usage)


def _generate_round(lm: LM, prompts: list[Prompt], sizes: list[int], answer: str, max_tokens: int,
                    generate: dict[str, Any]) -> list[Generation]:
    """One engine batch per distinct batch size (the regex fixes the number of lines)."""
    out: list[Generation | None] = [None] * len(prompts)
    for n in sorted(set(sizes)):
        idx = [j for j, s in enumerate(sizes) if s == n]
        gens = lm.generate([prompts[j] for j in idx], regex=item_regex(n, answer), max_tokens=max_tokens * n + 8,
                           logprobs=True, **generate)
        for j, g in zip(idx, gens):
            out[j] = g
    return out  # type: ignore[return-value]


def label_tokens(lm: LM, words: Sequence[str]) -> int:
    """Tokens one answer line may take: its number, colon and line break, and room for the label
    spelled in twice its usual tokens (constrained decoding may choose a split spelling); the
    regex ends the answer at the last line, so the room costs nothing."""
    count = getattr(lm.backend, "count_tokens", None)
    longest = max((count(" " + w) for w in words), default=8) if count else 8
    return 2 * longest + 6


# -- the stages' side --------------------------------------------------------------------
def layout_groups(records: Sequence[Any]) -> dict[tuple, list[int]]:
    """Record positions grouped by prompt layout (every segment but the question): one group per
    instruction and exemplar set, so a batch never mixes two layouts."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(records):
        key = tuple((s.kind, s.text) for s in r.prompt.segments if s.kind != SegmentKind.question)
        groups.setdefault(key, []).append(i)
    return groups


def item_text(record: Any, key: str | None) -> str:
    """The text listed for a record: its input ``key``, else its prompt's question segment."""
    if key is not None and key in record.inputs:
        return str(record.inputs[key])
    return record.prompt.get(SegmentKind.question) or ""


def classify_records(stage: Any, records: list[Any], settings: BatchPrompt) -> list[BatchOutcome]:
    """Label records in batches (a :class:`~promptkit.stages.Classify` with ``batch_prompt``).

    ``record.output`` is the voted label; ``record.label_scores`` the log share of the votes
    each label got (smoothed, so a label without votes still has a finite score).
    """
    lm = stage.lm()
    words = [w.strip() for w in stage.words()]
    label_of = dict(zip(words, stage.labels))
    header = (settings.header or CLASSIFY_HEADER).replace("{labels}", ", ".join(words))
    outcomes = []
    for idx in layout_groups(records).values():
        group = [records[i] for i in idx]
        items = [item_text(r, settings.input_key or stage.input_key) for r in group]
        out = answer_in_batches(lm, group[0].prompt, items, settings, choice_pattern(words), header,
                                label_tokens(lm, words), chat=stage.chat)
        for j, r in enumerate(group):
            counts = {lab: sum(label_of.get(v.answer) == lab for v in out.votes[j]) for lab in stage.labels}
            total = sum(counts.values()) + 0.01 * len(counts)
            r.label_scores = {lab: math.log((c + 0.01) / total) for lab, c in counts.items()}
            r.output = label_of.get(out.answers[j] or "", None)
            r.usage = out.first_usage[j]
        outcomes.append(out)
    return outcomes


def generate_records(stage: Any, records: list[Any], settings: BatchPrompt) -> list[BatchOutcome]:
    """Answer records in batches (a :class:`~promptkit.stages.Generate` with ``batch_prompt``).

    Each answer is one line: one of ``choices``, a match of ``regex``, or free text of at most
    ``item_tokens`` tokens. ``record.output`` is the voted answer (None where the batch ran out of
    tokens before the item's line).
    """
    lm = stage.lm()
    if stage.choices is not None:
        answer, per_item = choice_pattern(stage.choices), label_tokens(lm, stage.choices)
    else:
        answer, per_item = stage.regex or r"[^\n]+", settings.item_tokens + 6
    header = settings.header or GENERATE_HEADER
    outcomes = []
    for idx in layout_groups(records).values():
        group = [records[i] for i in idx]
        items = [item_text(r, settings.input_key) for r in group]
        out = answer_in_batches(lm, group[0].prompt, items, settings, answer, header, per_item, chat=stage.chat,
                                temperature=stage.temperature, top_p=stage.top_p, seed=stage.seed)
        for j, r in enumerate(group):
            r.output, r.usage = out.answers[j], out.first_usage[j]
        outcomes.append(out)
    return outcomes
