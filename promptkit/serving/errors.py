"""Errors as OpenAI's ``{"error": {...}}`` bodies, and whose fault an exception is.

The client's fault is a 4xx naming the field to fix. The server's fault is a 5xx whose
message says nothing of the server's internals (paths, stores, tracebacks): those go to
the log, under a reference the message gives.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from ..backends.base import ContextLengthError, GenerationError
from ..engine.chunk_store import StaleKVError
from ..engine.engine import Cancelled
from ..engine.families import UnsupportedModelError
from ..models import ModelNotFoundError
from ..engine.rerotate import ReuseUnsupportedError
from ..engine.weights import WeightFormatError

log = logging.getLogger("promptkit.server")

# ValueErrors that come from how the server was set up (a store built for another model, a model
# or weight format the engine cannot run), not from what a request asked for.
SERVER_FAULTS: tuple[type[BaseException], ...] = (StaleKVError, UnsupportedModelError, ModelNotFoundError,
                                                  ReuseUnsupportedError, WeightFormatError)


class APIError(Exception):
    """An error answered as OpenAI's ``{"error": {...}}`` body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def classify(e: BaseException, field: str | None = None) -> APIError:
    """The answer to an exception raised while serving a request: a 4xx naming ``field`` (the
    request field the error is about) when the request is at fault, else a 5xx."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ContextLengthError):
        return APIError(400, context_message(e), param=field, code="context_length_exceeded")
    if isinstance(e, GenerationError) and not isinstance(e.__cause__, SERVER_FAULTS):
        return APIError(500, str(e), type="server_error")  # the backend words these for clients
    if isinstance(e, ValueError) and not isinstance(e, SERVER_FAULTS):
        return APIError(400, plain(e), param=field)
    return internal_error(e)


def internal_error(e: BaseException) -> APIError:
    """A 500 that tells the client only where to look; the exception is logged with a reference."""
    ref = uuid.uuid4().hex[:12]
    log.error("internal error %s while serving a request", ref, exc_info=e)
    return APIError(500, f"internal server error (reference {ref}); the server's log has the details",
                    type="server_error", code="internal_error")


def context_message(e: ContextLengthError) -> str:
    """The context-length error in terms of what this server accepts (no library-only options)."""
    if getattr(e, "context", None) is None:
        return str(e)
    return (f"This model's maximum context length is {e.context} tokens, but the prompt has {e.prompt_tokens} tokens "
            f"and {e.new_tokens} more were asked for. Shorten the prompt or lower max_tokens "
            "(on /v1/chat/completions, leaving max_tokens out uses whatever room the prompt leaves).")


def plain(e: ValueError) -> str:
    """An error's message without pydantic's framing (its model name and error count)."""
    if isinstance(e, ValidationError):
        return "; ".join(str(err.get("msg", "")).removeprefix("Value error, ") for err in e.errors())
    return str(e)


def install(app: FastAPI) -> None:
    """Answer every error as an OpenAI error body, and count it (``app.state.served.admission``)."""

    async def api_error(request: Request, e: APIError) -> JSONResponse:
        if e.status != 429:  # 429s are counted where they are decided
            request.app.state.served.admission.bump("client_errors" if e.status < 500 else "server_errors")
        return e.response()

    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return await api_error(request, APIError(400, describe(e.errors()), param=first_field(e.errors())))

    async def http(request: Request, e: HTTPException) -> JSONResponse:
        message = str(e.detail)
        if e.status_code == 400 and "parsing the body" in message:  # FastAPI's words for undecodable bytes
            message = "the body could not be read: send JSON encoded as UTF-8"
        return await api_error(request, APIError(e.status_code, message, code=str(e.status_code)))

    async def cancelled(request: Request, e: Cancelled) -> Response:
        return Response(status_code=499)  # nobody reads it: the client has gone (counted by its run)

    async def crash(request: Request, e: Exception) -> JSONResponse:
        return await api_error(request, internal_error(e))

    app.add_exception_handler(APIError, api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, invalid)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, http)  # type: ignore[arg-type]
    app.add_exception_handler(Cancelled, cancelled)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, crash)


def describe(errors: Any) -> str:
    """One readable line from pydantic's errors, naming each offending field."""
    parts = []
    for e in errors:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        if e.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}")
        elif e.get("type") == "extra_forbidden":
            parts.append(f"unsupported parameter {loc!r}")
        else:
            parts.append(f"{loc or 'body'}: {e.get('msg')}")
    return "; ".join(parts) or "invalid request"


def first_field(errors: Any) -> str | None:
    """The top-level field the first of pydantic's errors is about."""
    for e in errors:
        if e.get("type") == "json_invalid":
            return None
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if loc:
            return loc[0]
    return None
