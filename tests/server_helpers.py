"""Helpers shared by the server tests."""

from __future__ import annotations

import time

import httpx


def wait_idle(client: httpx.Client, seconds: float = 30) -> dict:
    """Poll /stats until no request is active in the server or running in the engine; the last stats."""
    deadline = time.monotonic() + seconds
    while True:
        st = client.get("/stats").json()
        if st["server"]["active"] == 0 and st.get("running", 0) == 0 or time.monotonic() > deadline:
            return st
        time.sleep(0.1)
