"""What every handler of one app shares (``app.state.served``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import anyio

from ..lm import LM
from .limits import Admission, Limits
from .stats import StatsCache


@dataclass
class Served:
    """The model served, under which name, the pipelines served beside it, and the server's bounds.

    ``generation`` bounds the worker threads that wait on the engine (the engine batches what
    they wait for); short work (templating, formatting) runs on anyio's default threads.
    """

    lm: LM
    name: str
    pipelines: dict[str, Any]
    limits: Limits
    api_key: str | None = None
    max_workers: int = 16
    admission: Admission = field(init=False)
    generation: anyio.CapacityLimiter = field(init=False)
    stats: StatsCache = field(init=False)

    def __post_init__(self) -> None:
        self.admission = Admission(self.limits.max_queue)
        self.generation = anyio.CapacityLimiter(self.max_workers)
        self.stats = StatsCache(self.lm.stats)

    @property
    def backend(self) -> Any:
        return self.lm.backend

    def model_cards(self) -> list[dict[str, Any]]:
        card = {"id": self.name, "object": "model", "created": 0, "owned_by": "promptkit",
                "max_model_len": self.backend.max_context, "chat": self.backend.is_chat}
        return [card, *({"id": p, "object": "model", "created": 0, "owned_by": "promptkit-pipeline"}
                        for p in self.pipelines)]
