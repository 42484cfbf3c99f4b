"""An OpenAI-compatible HTTP server over an :class:`~promptkit.lm.LM` (``promptkit serve``).

Endpoints: ``/v1/models``, ``/v1/completions`` (lists of prompts, token-id prompts, ``echo``
with prompt logprobs and top_logprobs, so remote clients and lm-eval can score),
``/v1/chat/completions`` (``response_format``, ``tools``/``tool_choice``, ``stream`` as
server-sent events with ``stream_options.include_usage``), ``/stats`` and ``/health``.
Both take ``n``, penalties, ``logit_bias`` and vLLM's ``guided_*`` constraints; the
accepted fields are declared in :mod:`promptkit.wire`, and any other is refused by name.

Every generation (a prompt times ``n``) holds one of ``max_queue`` places while it runs or
waits, so no request can flood the engine: one that could never fit is refused with 400,
one that does not fit now with 429 (:mod:`promptkit.serving.limits`, which also bounds the
body, the prompts, ``n`` and the stop strings). The event loop only moves bytes: templating,
tokenizing, generating and formatting run on worker threads, and ``/stats`` never waits on
an engine step. A request's generations live in a :class:`~promptkit.serving.run.Run`,
which aborts them in the engine and frees their places however the request ends.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from fastapi import FastAPI

from .lm import LM
from .serving import errors, handlers
from .serving.errors import APIError
from .serving.limits import BodyLimit, Limits
from .serving.served import Served

__all__ = ["APIError", "BackgroundServer", "Limits", "create_app", "serve"]


def create_app(lm: LM, api_key: str | None = None, max_queue: int = 64, max_workers: int = 16,
               model_name: str | None = None, pipelines: dict[str, Any] | None = None,
               **limits: int) -> FastAPI:
    """Build the ASGI app serving ``lm`` (and, optionally, pipelines as models).

    ``api_key``: when set, every request needs ``Authorization: Bearer <key>``.
    ``max_queue``: generations (each prompt times ``n``) running or waiting at once; more get 429.
    ``max_workers``: worker threads driving generations (the engine batches them).
    ``model_name``: the id clients must send (default: the LM's model name).
    ``pipelines``: ``{model id: Pipeline}``; a request naming one runs the pipeline on
    the prompt (or the last user message) and answers with the record's output.
    ``limits``: the other fields of :class:`~promptkit.serving.limits.Limits` (``max_prompts``,
    ``max_n``, ``max_body_bytes``, ``max_stop``, ``max_stop_chars``).
    """
    name = model_name or lm.model
    pipelines = dict(pipelines or {})
    if name in pipelines:
        raise ValueError(f"pipeline id {name!r} clashes with the model's name")
    served = Served(lm, name, pipelines, Limits(max_queue=max_queue, **limits), api_key, max_workers)
    app = FastAPI(title="promptkit", version="1")
    app.state.served, app.state.lm, app.state.counters = served, lm, served.admission
    errors.install(app)
    app.include_router(handlers.router)
    app.add_middleware(BodyLimit, limit=served.limits.max_body_bytes, admission=served.admission)
    return app


class BackgroundServer:
    """Serve an app with uvicorn in a daemon thread on a loopback port (tests, notebooks, the cookbook).

    >>> with BackgroundServer(create_app(lm)) as srv:
    ...     httpx.get(srv.url + "/v1/models")
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        self.host = host
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.port = port

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:54321`` (append ``/v1`` for OpenAI clients)."""
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def serve(lm: LM, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, max_queue: int = 64,
          log_level: str = "info", pipelines: dict[str, Any] | None = None, **limits: int) -> None:
    """Run the server in the foreground (what ``promptkit serve`` calls); ``limits`` as :func:`create_app`'s."""
    import uvicorn

    app = create_app(lm, api_key=api_key, max_queue=max_queue, pipelines=pipelines, **limits)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
