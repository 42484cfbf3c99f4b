"""Which OpenAI-compatible server is on the other end, found by a cheap probe at first use.

The model card from ``/v1/models`` names most servers by its ``owned_by`` (``vllm``,
``sglang``, ``llamacpp``, ``promptkit``, OpenAI's ``openai``/``system``); llama-cpp-python's
says ``me``, and its ``/openapi.json`` title settles it. Anything else is asked in turn for
vLLM's ``/version``, SGLang's ``/get_server_info``, llama.cpp's ``/props`` and the OpenAPI title.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger("promptkit.remote")

GetJSON = Callable[[str], "dict[str, Any] | None"]  # GET a path at the server's root; None if it fails


class ServerKind(StrEnum):
    """The servers whose dialects this backend speaks."""

    VLLM = "vllm"
    SGLANG = "sglang"
    LLAMA_CPP = "llama.cpp"  # llama.cpp's own C++ llama-server
    LLAMA_CPP_PYTHON = "llama-cpp-python"  # python -m llama_cpp.server
    PROMPTKIT = "promptkit"
    OPENAI = "openai"
    GENERIC = "openai-compatible"  # none of the above: only what OpenAI's API defines


OWNERS = {"vllm": ServerKind.VLLM, "sglang": ServerKind.SGLANG, "llamacpp": ServerKind.LLAMA_CPP,
          "promptkit": ServerKind.PROMPTKIT, "promptkit-pipeline": ServerKind.PROMPTKIT,
          "openai": ServerKind.OPENAI, "system": ServerKind.OPENAI, "openai-internal": ServerKind.OPENAI}


@dataclass(frozen=True)
class ServerInfo:
    """What the probe found: the kind, its version when reported, its context length when
    reported, and what gave it away."""

    kind: ServerKind
    version: str | None = None
    context: int | None = None
    evidence: str = ""

    def version_at_least(self, *wanted: int) -> bool | None:
        """Whether the reported version is at least ``wanted`` (None when no version was reported)."""
        if self.version is None:
            return None
        parts = [int(p) for p in re.findall(r"\d+", self.version)[: len(wanted)]]
        return tuple(parts) >= wanted


def identify(card: dict[str, Any], base_url: str, get: GetJSON, kind: str | None = None) -> ServerInfo:
    """The server behind ``base_url`` from its model ``card`` and, where needed, a few GETs.

    ``kind`` (a :class:`ServerKind` value) skips the guessing; the version and context are still read.
    """
    if kind is not None:
        return _details(ServerKind(kind), card, get, "given as server_kind")
    owner = str(card.get("owned_by") or "")
    if owner in OWNERS:
        return _details(OWNERS[owner], card, get, f"/v1/models owned_by={owner!r}")
    if (urlparse(base_url).hostname or "").endswith("openai.com"):
        return _details(ServerKind.OPENAI, card, get, "the api.openai.com host")
    if _is_llama_cpp_python(get):
        return _details(ServerKind.LLAMA_CPP_PYTHON, card, get, "/openapi.json title")
    if isinstance((get("/version") or {}).get("version"), str):
        return _details(ServerKind.VLLM, card, get, "/version")
    if _sglang_info(get):
        return _details(ServerKind.SGLANG, card, get, "/get_server_info")
    if "default_generation_settings" in (get("/props") or {}):
        return _details(ServerKind.LLAMA_CPP, card, get, "/props")
    return ServerInfo(ServerKind.GENERIC, context=_card_context(card), evidence="no probe answered")


def _is_llama_cpp_python(get: GetJSON) -> bool:
    title = ((get("/openapi.json") or {}).get("info") or {}).get("title", "")
    return "llama.cpp Python" in title


def _sglang_info(get: GetJSON) -> dict[str, Any]:
    return get("/get_server_info") or get("/server_info") or {}


def _card_context(card: dict[str, Any]) -> int | None:
    value = card.get("max_model_len") or (card.get("meta") or {}).get("n_ctx_train")
    return int(value) if value else None


def _details(kind: ServerKind, card: dict[str, Any], get: GetJSON, evidence: str) -> ServerInfo:
    version, context = None, _card_context(card)
    if kind is ServerKind.VLLM:
        version = (get("/version") or {}).get("version")
    elif kind is ServerKind.SGLANG:
        version = _sglang_info(get).get("version")
    elif kind is ServerKind.LLAMA_CPP:
        props = get("/props") or {}
        version = props.get("build_info")
        context = (props.get("default_generation_settings") or {}).get("n_ctx") or context
    elif kind is ServerKind.LLAMA_CPP_PYTHON:
        version = ((get("/openapi.json") or {}).get("info") or {}).get("version")
    return ServerInfo(kind, str(version) if version else None, int(context) if context else None, evidence)
