"""Stage registry: names in recipes and on the command line map to stage classes.

Stage packages (retrievers, compressors, optimizers) register through the
``promptkit.stages`` entry-point group, so the core never imports them.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from .pipeline import Stage

_STAGES: dict[str, type[Stage]] = {}
_plugins_loaded = False
S = TypeVar("S", bound="type[Stage]")


def register_stage(name: str):
    """Class decorator: make a Stage buildable by ``name`` from recipes."""

    def deco(cls: S) -> S:
        existing = _STAGES.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"stage name {name!r} is taken by {existing.__module__}.{existing.__qualname__}")
        _STAGES[name] = cls
        cls.stage_name = name  # type: ignore[attr-defined]
        return cls

    return deco


def load_plugins() -> None:
    """Import the stage packages advertised by installed distributions (once)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    importlib.import_module("promptkit.stages")
    for ep in importlib.metadata.entry_points(group="promptkit.stages"):
        try:
            importlib.import_module(ep.value)
        except ModuleNotFoundError as e:
            if e.name and ep.value.startswith(e.name):
                continue  # the package does not provide stages (yet)
            raise


def stage_names() -> list[str]:
    load_plugins()
    return sorted(_STAGES)


def get_stage_class(name: str) -> type[Stage]:
    load_plugins()
    if name not in _STAGES:
        raise KeyError(f"unknown stage {name!r}; available stages: {', '.join(sorted(_STAGES))}")
    return _STAGES[name]
