"""The backend's stats without waiting on the engine: the freshest snapshot a worker thread could take.

The engine's ``stats()`` takes the lock its loop holds for a whole step, and a long prefill
is a step of seconds. So a worker thread reads them, at most one at a time, and ``/stats``
waits for that read only briefly: when the engine is mid-step it answers with the last
snapshot and its age, and the read lands for a later call.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio

STATS_WAIT_S = 0.02  # how long /stats waits for a fresh read before answering with the last one


class StatsCache:
    """The last stats snapshot ``read`` returned, refreshed on demand off the event loop."""

    def __init__(self, read: Callable[[], dict[str, Any]], wait_s: float = STATS_WAIT_S) -> None:
        self._read, self.wait_s = read, wait_s
        self._reading = threading.Lock()  # held by the one worker thread reading
        self._snapshot: dict[str, Any] = {}
        self._taken: float | None = None

    async def get(self) -> tuple[dict[str, Any], float | None]:
        """The freshest snapshot available within ``wait_s``, and its age in seconds (None: none yet)."""
        with anyio.move_on_after(self.wait_s):
            if self._reading.locked():  # another call's read is in flight: wait for it a little
                while self._reading.locked():
                    await anyio.sleep(0.005)
            else:  # abandoned when the wait ends: the thread goes on and stores what it reads
                await anyio.to_thread.run_sync(self._refresh, abandon_on_cancel=True)
        taken = self._taken
        return self._snapshot, None if taken is None else round(time.monotonic() - taken, 3)

    def _refresh(self) -> None:
        if not self._reading.acquire(blocking=False):
            return  # another thread is reading
        try:
            snapshot = json.loads(json.dumps(self._read(), default=str))  # plain JSON values
            self._snapshot, self._taken = snapshot, time.monotonic()
        finally:
            self._reading.release()
