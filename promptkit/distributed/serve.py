"""N engine replicas of ``promptkit serve`` behind Ray Serve, routed by prompt prefix.

The application has two deployments:

* ``engine``: ``replicas`` copies of the single-machine server, each its own engine and
  its own :func:`~promptkit.server.create_app` (so the OpenAI wire format, the API key
  and the limits are exactly the single server's; limits hold per replica);
* ``gateway``: the one HTTP address clients use. It reads a request, takes the text it
  is routed by (the chat messages in order, or the prompt), and forwards the raw
  request through a deployment handle whose request router is
  :class:`~promptkit.distributed.router.PrefixAffinityRouter` (or ``RandomRouter``).
  Responses, streamed ones included, come back chunk by chunk.

``promptkit serve --replicas N`` runs it; :func:`build_app` gives the application for
``serve.run`` or a Serve config file.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from .ray_executor import forwarded_env, require_ray

ROUTERS = ("prefix", "random", "pow2")


@dataclass
class ForwardedRequest:
    """An HTTP request as the gateway hands it to a replica; ``routing_text`` is what the router matches."""

    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    routing_text: str = ""
    client: tuple[str, int] | None = field(default=None)


def routing_text_of(path: str, body: bytes) -> str:
    """The prompt text a request starts with: chat messages in order (system first), or the prompt."""
    if not path.endswith(("/chat/completions", "/completions")) or not body:
        return ""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return ""
    if not isinstance(data, dict):
        return ""
    if isinstance(data.get("messages"), list):
        return "".join(f"{m.get('role', '')}:{_content_text(m.get('content'))}\n"
                       for m in data["messages"] if isinstance(m, dict))
    prompt = data.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]
    return prompt if isinstance(prompt, str) else ""


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


async def call_asgi(app: Any, request: ForwardedRequest) -> AsyncIterator[tuple]:
    """Run ``request`` through an ASGI app in this process: ``("start", status, headers)``, then ``("body", bytes)``..."""
    messages: asyncio.Queue = asyncio.Queue()
    left = asyncio.Event()
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await messages.put(message)

    async def run() -> None:
        try:
            await app(_scope(request), receive, send)
        finally:
            await messages.put(None)

    task = asyncio.create_task(run())
    try:
        while (m := await messages.get()) is not None:
            if m["type"] == "http.response.start":
                yield ("start", m["status"], list(m.get("headers", [])))
            elif m["type"] == "http.response.body":
                if m.get("body"):
                    yield ("body", m["body"])
                if not m.get("more_body", False):
                    break
    finally:
        left.set()  # the client has its answer, or has gone: the app sees a disconnect either way
        try:
            await asyncio.wait_for(task, timeout=30)
        except (asyncio.TimeoutError, Exception):
            task.cancel()


def _scope(request: ForwardedRequest) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request.method,
            "scheme": "http", "path": request.path, "raw_path": request.path.encode(), "root_path": "",
            "query_string": request.query, "headers": request.headers, "client": request.client,
            "server": ("promptkit-replica", 0)}


class EngineReplica:
    """One engine and the single-machine server app over it."""

    def __init__(self, model: str, lm_options: dict[str, Any], server_options: dict[str, Any], threads: int = 1,
                 env: dict[str, str] | None = None) -> None:
        os.environ.update(env or {})
        import torch

        from ..lm import LM
        from ..server import create_app

        torch.set_num_threads(max(1, threads))
        self.lm = LM(model, **lm_options)
        self.app = create_app(self.lm, **server_options)

    async def forward(self, request: ForwardedRequest) -> AsyncIterator[tuple]:
        """Answer one forwarded request, streamed as it is produced."""
        async for message in call_asgi(self.app, request):
            yield message

    def stats(self) -> dict[str, Any]:
        return self.lm.stats()


class Gateway:
    """The one address clients use: forwards each request to the replica its router picks."""

    def __init__(self, engine: Any, max_body_bytes: int) -> None:
        self.engine = engine.options(stream=True)
        self.max_body_bytes = max_body_bytes

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import StreamingResponse

        body = await self._body(request)
        client = (request.client.host, request.client.port) if request.client else None
        fwd = ForwardedRequest(request.method, request.url.path, request.url.query.encode(), list(request.headers.raw),
                               body, routing_text_of(request.url.path, body), client)
        stream = self.engine.forward.remote(fwd)
        _, status, headers = await stream.__anext__()
        response = StreamingResponse(_bodies(stream), status_code=status)
        response.raw_headers = [(bytes(k), bytes(v)) for k, v in headers]
        return response

    async def _body(self, request: Any) -> bytes:
        """The body, cut one byte past the limit (the replica refuses it as the single server does)."""
        chunks, size = [], 0
        async for chunk in request.stream():
            chunks.append(chunk)
            size += len(chunk)
            if size > self.max_body_bytes:
                break
        return b"".join(chunks)


async def _bodies(stream: Any) -> AsyncIterator[bytes]:
    try:
        async for message in stream:
            yield message[1]
    finally:
        stream.cancel()


def router_config(router: str, options: dict[str, Any] | None = None) -> Any:
    """Ray Serve's request-router setting for ``router``: ``prefix``, ``random`` or ``pow2`` (Serve's default)."""
    from ray.serve.config import RequestRouterConfig

    if router not in ROUTERS:
        raise ValueError(f"unknown router {router!r}; choose {', '.join(ROUTERS)}")
    if router == "pow2":
        return RequestRouterConfig()
    from .router import PrefixAffinityRouter, RandomRouter

    cls = PrefixAffinityRouter if router == "prefix" else RandomRouter
    return RequestRouterConfig(request_router_class=cls, request_router_kwargs=dict(options or {}))


def build_app(model: str = "smollm2-135m-instruct", replicas: int = 2, router: str = "prefix",
              api_key: str | None = None, max_queue: int = 64, lm_options: dict[str, Any] | None = None,
              threads: int = 1, replica_cpus: float | None = None, router_options: dict[str, Any] | None = None,
              max_body_bytes: int = 8 << 20, pipelines: dict[str, Any] | None = None, **limits: int) -> Any:
    """The Ray Serve application: ``replicas`` engines behind one gateway (``serve.run(build_app(...))``).

    ``lm_options`` go to each replica's :class:`~promptkit.lm.LM`; ``api_key``, ``max_queue``,
    ``max_body_bytes``, ``pipelines`` and ``limits`` to each replica's :func:`~promptkit.server.create_app`.
    ``router``: ``prefix`` (:class:`~promptkit.distributed.router.PrefixAffinityRouter`, with
    ``router_options``), ``random`` or ``pow2`` (Serve's default). ``threads``: torch threads per
    replica; ``replica_cpus``: CPUs Ray reserves per replica (default ``threads``).
    """
    require_ray()
    from ray import serve

    if replicas < 1:
        raise ValueError(f"replicas must be at least 1; got {replicas}")
    server_options = {"api_key": api_key, "max_queue": max_queue, "max_body_bytes": max_body_bytes,
                      "pipelines": pipelines, **limits}
    engine = serve.deployment(EngineReplica).options(
        name="engine", num_replicas=replicas, max_ongoing_requests=2 * max_queue + 16,
        ray_actor_options={"num_cpus": threads if replica_cpus is None else replica_cpus},
        request_router_config=router_config(router, router_options))
    gateway = serve.deployment(Gateway).options(name="gateway", num_replicas=1, max_ongoing_requests=100_000,
                                                ray_actor_options={"num_cpus": 0})
    replica = engine.bind(model, dict(lm_options or {}), server_options, threads, forwarded_env())
    return gateway.bind(replica, max_body_bytes)


def run_replicas(app: Any, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
                 name: str = "promptkit", blocking: bool = True) -> Any:
    """Start Serve's HTTP proxy on ``host:port`` and run ``app`` there (blocking until Ctrl-C by default)."""
    ray = require_ray()
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    return serve.run(app, name=name, route_prefix="/", blocking=blocking)
