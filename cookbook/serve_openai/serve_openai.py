"""Serve the model and a pipeline over an OpenAI-compatible API, and call both with the OpenAI client.

    python cookbook/serve_openai/serve_openai.py

In production run the server on its own:

    promptkit serve --port 8000 --recipe cookbook/serve_openai/recipe.yaml --api-key $KEY

and point any OpenAI client (or ``LM(backend="openai", base_url=...)``) at
``http://127.0.0.1:8000/v1``. Here the server runs in a background thread so
the example is one file.
"""

from __future__ import annotations

from pathlib import Path

import httpx
from openai import OpenAI

from promptkit import get_lm, load_recipe
from promptkit.server import BackgroundServer, create_app

RECIPE = Path(__file__).with_name("recipe.yaml")


def main(question: str = "Who invented the Fresnel lens?", max_tokens: int = 24) -> dict:
    """Ask the raw model (streamed) and the served pipeline the same question."""
    lm = get_lm()
    bot = load_recipe(RECIPE)
    bot.stages[-1].max_tokens = max_tokens  # the generate stage
    app = create_app(lm, api_key="local-secret", pipelines={"docs-bot": bot})
    with BackgroundServer(app) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="local-secret")
        models = [m.id for m in client.models.list()]
        stream = client.chat.completions.create(
            model=lm.model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, stream=True)
        raw = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        reply = client.chat.completions.create(model="docs-bot", messages=[{"role": "user", "content": question}])
        # /stats (beside /v1): the engine's cache counters and the server's request counters.
        stats = httpx.get(server.url + "/stats", headers={"Authorization": "Bearer local-secret"}).json()
    return {"models": models, "model_answer": raw, "pipeline_answer": reply.choices[0].message.content,
            "requests_ok": stats["server"]["ok"]}


if __name__ == "__main__":
    for key, value in main().items():
        print(f"{key}: {value}")
