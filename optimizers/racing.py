"""Racing: compare candidates with the noise in mind (successive halving with a confidence rule).

Scoring every candidate on every validation example and trusting the argmax
spends most calls on clear losers and still picks by noise when the set is
small. Racing scores all candidates on a first rung of examples, then, rung
by rung on more examples (each rung ``growth`` times the last, the last the
whole set):

* a candidate whose paired bootstrap interval of the difference to the
  leader (the best candidate so far, the incumbent included) lies below zero
  is dropped: a clear loser;
* of the rest, the best ``keep`` fraction by mean goes on (successive
  halving), so close candidates get more examples and the winner is chosen on
  the whole set.

Examples are visited in one seeded order, so every candidate on a rung is
scored on the same examples (paired), and the same seed races the same way.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from promptkit.metrics import paired_bootstrap_ci

from .schedule import CandidateScore

if TYPE_CHECKING:
    from .base import Candidate, Optimizer


class Racing(BaseModel):
    """Settings of a race (see the module doc)."""

    min_examples: int = Field(default=30, ge=2, description="examples of the first rung")
    growth: float = Field(default=2.0, gt=1.0, description="each rung has this many times the examples of the last")
    keep: float = Field(default=0.5, gt=0.0, le=1.0, description="share of the survivors kept by mean on each rung")
    confidence: float = Field(default=0.95, gt=0.0, lt=1.0, description="of the interval that drops a clear loser")

    def rungs(self, n: int) -> list[int]:
        """Cumulative example counts of the rungs for an evaluation set of ``n``."""
        sizes, size = [], float(self.min_examples)
        while size < n:
            sizes.append(int(size))
            size *= self.growth
        return sizes + [n]

    def order(self, n: int, seed: int) -> list[int]:
        """The seeded order in which the evaluation set is visited."""
        order = list(range(n))
        random.Random(seed).shuffle(order)
        return order

    def clear_loser(self, cand: CandidateScore, leader: CandidateScore, seen: Sequence[int]) -> bool:
        """Whether ``cand`` is worse than ``leader`` on the examples ``seen``, beyond the noise."""
        return paired_bootstrap_ci(cand.on(seen), leader.on(seen), self.confidence)[1] < 0.0


def race(opt: Optimizer, candidates: Sequence[Candidate], incumbent: CandidateScore | None) -> dict[int, CandidateScore]:
    """Race ``candidates`` on the optimizer's evaluation set; ``{candidate index: its result}``.

    A result covers the examples the candidate was scored on before it was
    dropped (``n`` below the set's size) or the whole set (the survivors).
    Candidates the budget could not pay for are absent.
    """
    racing, sched = opt.racing, opt._scheduler
    assert racing is not None
    total = len(sched.examples)
    order = racing.order(total, opt.seed)
    parts: dict[int, list[CandidateScore]] = {i: [] for i in range(len(candidates))}
    alive, done = list(range(len(candidates))), 0
    for size in racing.rungs(total):
        new = order[done:size]
        room = opt.room(len(new))
        if room == 0:
            break
        if room < len(alive):  # the budget pays for the best few so far only
            alive = sorted(alive, key=lambda i: _merged(parts[i]).key if parts[i] else (0.0, 0.0), reverse=True)[:room]
            opt._exhausted = True
        for i, res in zip(alive, sched.evaluate([candidates[i] for i in alive], indices=new)):
            parts[i].append(res)
        done = size
        if size == total or opt._exhausted:
            break
        merged = {i: _merged(parts[i]) for i in alive}
        seen = order[:size]
        pool = list(merged.values()) + ([incumbent] if incumbent is not None else [])
        leader = max(pool, key=lambda c: (sum(c.on(seen)), c.soft))
        alive = [i for i in alive if merged[i] is leader or not racing.clear_loser(merged[i], leader, seen)]
        n_keep = max(1, math.ceil(len(alive) * racing.keep))
        alive = sorted(sorted(alive, key=lambda i: merged[i].key, reverse=True)[:n_keep])
    results = {i: _merged(p) for i, p in parts.items() if p}
    opt._tried.extend(results[i] for i in sorted(results))
    return results


def _merged(parts: list[CandidateScore]) -> CandidateScore:
    return parts[0] if len(parts) == 1 else CandidateScore.merge(parts)
