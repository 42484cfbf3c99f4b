"""The backend over OpenAI-compatible servers: vLLM, SGLang, llama.cpp's servers, ``promptkit serve``, OpenAI.

:class:`OpenAIBackend` finds out which server it talks to (:mod:`.kinds`), sends each constraint
in that server's dialect or refuses it (:mod:`.dialects`, :mod:`.gbnf`), checks constrained
replies (:mod:`.conformance`), sends chat prompts to the chat endpoint when it has no tokenizer
(:mod:`.chat`) and scores from prompt log-probabilities or forced continuations (:mod:`.scoring`).
"""

from .backend import OpenAIBackend, ServerError, load_tokenizer
from .conformance import NonConformingOutput
from .dialects import UnsupportedByServer, constraint_fields
from .kinds import ServerInfo, ServerKind
from .scoring import ScoringUnavailable

__all__ = ["NonConformingOutput", "OpenAIBackend", "ScoringUnavailable", "ServerError", "ServerInfo", "ServerKind",
           "UnsupportedByServer", "constraint_fields", "load_tokenizer"]
