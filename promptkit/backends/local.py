"""The local backend (interim: plain transformers; the engine replaces its internals)."""

from __future__ import annotations

from .hf import HFBackend


class LocalBackend(HFBackend):
    """Local model backend."""
