"""Choose how many retrieved passages a RAG pipeline reads, in which order, and how compressed.

Jin et al. (2024), "Long-context LLMs meet RAG": answer quality first rises with the number of
retrieved passages and then falls, as hard negatives mislead the model, and placing the best
passages at the ends of the context helps. Where the peak lies depends on the model and the data,
so it is chosen on validation data, the way demonstrations are.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydantic import Field, field_validator

from promptkit.pipeline import Pipeline, Stage
from promptkit.types import Document, Example

from .base import Candidate, Optimizer, prompt_stage, replace_stage
from .errors import OptimizerError
from .schedule import CandidateScore

ORDERS = ("score", "best_last", "ends")


def retriever_stage(pipeline: Pipeline) -> tuple[int, Stage]:
    """The pipeline's first retriever stage (one with ``k`` and ``order``) and its index."""
    for i, s in enumerate(pipeline.stages):
        if "k" in type(s).model_fields and "order" in type(s).model_fields and s.stage_name != "rerank":
            return i, s
    names = [s.stage_name for s in pipeline.stages]
    raise OptimizerError(f"the pipeline has no retriever stage (bm25, dense, hybrid) to tune; its stages are {names}")


def compress_stage(pipeline: Pipeline) -> tuple[int, Stage] | None:
    """The pipeline's ``compress`` stage and its index, if it has one."""
    return next(((i, s) for i, s in enumerate(pipeline.stages) if s.stage_name == "compress"), None)


def arrangement(k: int, order: str) -> tuple[int, ...]:
    """The ranks (0 = best) in the order the context holds them: equal tuples read the same."""
    from retrievers.order import order_passages

    docs = [Document(id=str(i), text="") for i in range(k)]
    return tuple(int(d.id) for d in order_passages(docs, order))  # type: ignore[arg-type]


class RAGSearch(Optimizer):
    """Passage count × passage order (× compression rate), scored on validation data.

    Every ``k`` in ``ks`` with every order in ``orders`` (``score``: best first, ``best_last``:
    best nearest the question, ``ends``: best at both ends) is a candidate; settings that place
    the same passages the same way (``k=1`` in any order, ``k=2`` by score or at the ends) are
    scored once. With ``rates``, each is also tried with the context compressed to that share of
    its tokens: the pipeline's ``compress`` stage's rate is set, or one is added after the prompt
    stage (``compressor`` names its method). The best on the whole validation set wins; the
    baseline (the pipeline as given) is scored first, so the result never scores below it there.
    """

    ks: list[int] = Field(default_factory=lambda: [1, 2, 3, 5], min_length=1)
    orders: list[str] = Field(default_factory=lambda: list(ORDERS), min_length=1)
    rates: list[float] = Field(default_factory=list)
    compressor: str = "question"

    @field_validator("ks")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(k < 1 for k in v):
            raise ValueError(f"every k must be at least 1, got {v}")
        return v

    @field_validator("orders")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        unknown = [o for o in v if o not in ORDERS]
        if unknown:
            raise ValueError(f"unknown passage orders {unknown}; choose from {list(ORDERS)}")
        return v

    @field_validator("rates")
    @classmethod
    def _rates(cls, v: list[float]) -> list[float]:
        if any(not 0.0 < r <= 1.0 for r in v):
            raise ValueError(f"compression rates must lie in (0, 1], got {v}")
        return v

    def search(self, pipeline: Pipeline, train: list[Example]) -> Iterator[tuple[Pipeline, CandidateScore]]:
        i, stage = retriever_stage(pipeline)
        given = (stage.k, arrangement(stage.k, stage.order), self._rate(pipeline))
        seen = {given}
        cands: list[Candidate] = []
        for k in self.ks:
            for order in self.orders:
                for rate in [None, *self.rates] if self.rates else [None]:
                    key = (k, arrangement(k, order), rate if rate is not None else given[2])
                    if key in seen:
                        continue
                    seen.add(key)
                    pipe = replace_stage(pipeline, i, stage.model_copy(update={"k": k, "order": order}))
                    if rate is not None:
                        pipe = self._with_rate(pipe, rate)
                    settings: dict[str, Any] = {"k": k, "order": order, **({"rate": rate} if rate else {})}
                    name = f"k{k}-{order}" + (f"-r{rate:g}" if rate is not None else "")
                    cands.append((name, pipe, settings))
        self._info.update(candidates=len(cands))
        yield from self.evaluate_pipes(cands)

    def _rate(self, pipeline: Pipeline) -> float | None:
        found = compress_stage(pipeline)
        return getattr(found[1], "rate", None) if found else None

    def _with_rate(self, pipeline: Pipeline, rate: float) -> Pipeline:
        found = compress_stage(pipeline)
        if found is not None:
            j, comp = found
            return replace_stage(pipeline, j, comp.model_copy(update={"rate": rate, "target_tokens": None}))
        from compressors.stages import Compress

        j, _ = prompt_stage(pipeline)
        return replace_stage(pipeline, j + 1, Compress(method=self.compressor, rate=rate), insert=True)  # type: ignore[arg-type]
