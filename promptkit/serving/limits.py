"""What one request may ask of the server, and the bounded queue every generation holds a place in.

A request's jobs are its prompts times ``n``: each is a generation in the engine, so each
holds one of ``max_queue`` places while it runs or waits. A request that could never fit
is refused with 400; one that does not fit now, with 429. Every refusal names the limit
and the ``promptkit serve`` flag that raises it.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError


@dataclass(frozen=True)
class Limits:
    """Bounds on requests; each field is the ``promptkit serve`` flag of the same name."""

    max_queue: int = 64  # generations (a prompt times n) running or waiting at once
    max_prompts: int = 256  # prompts in one /v1/completions request
    max_n: int = 16  # choices per prompt
    max_body_bytes: int = 8 * 2**20  # a request body, checked before it is parsed
    max_stop: int = 4  # stop strings per request (OpenAI's own bound)
    max_stop_chars: int = 256  # characters in one stop string

    def check(self, prompts: int, n: int, stop: str | list[str] | None) -> int:
        """Refuse a request past a limit (400, naming the field); return its number of jobs."""
        if prompts > self.max_prompts:
            raise _refusal(f"{prompts} prompts in one request; this server takes at most {self.max_prompts}",
                           "--max-prompts", "prompt")
        if n > self.max_n:
            raise _refusal(f"n={n}; this server takes at most n={self.max_n}", "--max-n", "n")
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > self.max_stop:
            raise _refusal(f"{len(stops)} stop strings; this server takes at most {self.max_stop}", "--max-stop",
                           "stop")
        longest = max(map(len, stops), default=0)
        if longest > self.max_stop_chars:
            raise _refusal(f"a stop string of {longest} characters; this server takes at most "
                           f"{self.max_stop_chars}", "--max-stop-chars", "stop")
        jobs = prompts * n
        if jobs > self.max_queue:
            raise _refusal(f"this request asks for {jobs} generations ({prompts} prompts x n={n}), more than the "
                           f"{self.max_queue} this server runs or queues at once", "--max-queue",
                           "n" if n > 1 else "prompt")
        return jobs

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _refusal(what: str, flag: str, param: str | None) -> APIError:
    return APIError(400, f"{what} (the server's {flag} option raises the limit)", param=param,
                    code="limit_exceeded")


class Admission:
    """Request counters and the bounded queue of generations (thread-safe)."""

    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self.c = {"requests": 0, "ok": 0, "rejected_429": 0, "client_errors": 0, "server_errors": 0,
                  "cancelled": 0, "active": 0, "active_requests": 0, "streams": 0}

    def bump(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.c[key] += n

    def acquire(self, jobs: int) -> None:
        """Take ``jobs`` places (``active`` counts them), or answer 429 when fewer are free."""
        with self._lock:
            if self.c["active"] + jobs > self.max_queue:
                self.c["rejected_429"] += 1
                raise APIError(429, f"server busy: {self.c['active']} of {self.max_queue} generations are running or "
                                    f"waiting and this request needs {jobs}; retry later",
                               type="rate_limit_error", code="queue_full")
            self.c["active"] += jobs
            self.c["active_requests"] += 1

    def release(self, jobs: int) -> None:
        with self._lock:
            self.c["active"] -= jobs
            self.c["active_requests"] -= 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.c)


class BodyLimit:
    """ASGI middleware: refuse a request body over ``limit`` bytes before anything parses it.

    A declared Content-Length over the limit is refused before a byte is read; otherwise the
    body is counted as it arrives (a chunked upload declares nothing) and handed on whole.
    """

    def __init__(self, app: ASGIApp, limit: int, admission: Admission) -> None:
        self.app, self.limit, self.admission = app, limit, admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(int(declared), scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before its body was complete: nobody to answer
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._refuse(size, scope, receive, send)
            more = message.get("more_body", False)
        whole: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> Message:
            return whole.pop() if whole else await receive()  # then on to the client's disconnect

        await self.app(scope, replay, send)

    async def _refuse(self, size: int, scope: Scope, receive: Receive, send: Send) -> None:
        self.admission.bump("requests")
        self.admission.bump("client_errors")
        error = APIError(400, f"the request body has {size:,} bytes; this server takes at most {self.limit:,} (the "
                              "server's --max-body-bytes option raises the limit)", code="body_too_large")
        await error.response()(scope, receive, send)

