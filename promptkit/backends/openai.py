"""The backend over OpenAI-compatible servers (``backend="openai"``); it lives in :mod:`promptkit.backends.remote`."""

from .remote import (
                     NonConformingOutput,
                     OpenAIBackend,
                     ScoringUnavailable,
                     ServerError,
                     ServerInfo,
                     ServerKind,
                     UnsupportedByServer,
)

__all__ = ["NonConformingOutput", "OpenAIBackend", "ScoringUnavailable", "ServerError", "ServerInfo", "ServerKind",
           "UnsupportedByServer"]
