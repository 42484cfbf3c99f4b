"""A DSPy program served by ``promptkit serve``: typed outputs that always parse.

    python cookbook/dspy_served/dspy_program.py

DSPy talks to the server over the OpenAI chat wire. Declaring the server as a DSPy
provider that honours ``response_format`` json_schema (``register_provider``) lets
DSPy's JSON adapter ask for the signature's schema; promptkit constrains decoding to
it, so even a 135M model answers in fields DSPy can parse. In production run the
server on its own (``promptkit serve --port 8000``) and use its URL.
"""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no price list from the network

import dspy  # noqa: E402
from dspy._vendor.lm15.access import AccessPolicy, EndpointSupport  # noqa: E402
from dspy.lm15 import ModelSupport, OpenAIChatCompat, ProviderDefinition, register_provider  # noqa: E402

from promptkit import get_lm  # noqa: E402
from promptkit.server import BackgroundServer, create_app  # noqa: E402


class Capital(dspy.Signature):
    """Name the capital city of the country."""

    country: str = dspy.InputField()
    capital: str = dspy.OutputField()
    confident: bool = dspy.OutputField()


def promptkit_lm(base_url: str, model: str, max_tokens: int = 64) -> dspy.LM:
    """A dspy.LM for a promptkit server at ``base_url`` (ending in /v1)."""
    access = AccessPolicy(provider="promptkit", supports=EndpointSupport(complete=True, stream=True, models=True),
                          auth_modes=("bearer",), base_url=base_url)
    register_provider(ProviderDefinition.chat(access, compat=OpenAIChatCompat.preset("vllm")),
                      supports=ModelSupport(response_schema=True, function_calling=True), replace=True)
    return dspy.LM(f"promptkit/{model}", api_key="unused", max_tokens=max_tokens, temperature=0.0, cache=False)


def main(countries: tuple[str, ...] = ("France", "Japan"), max_tokens: int = 64) -> list[dspy.Prediction]:
    lm = get_lm()
    with BackgroundServer(create_app(lm)) as server:
        with dspy.context(lm=promptkit_lm(server.url + "/v1", lm.model, max_tokens)):
            predict = dspy.Predict(Capital)
            return [predict(country=c) for c in countries]


if __name__ == "__main__":
    for p in main():
        print(p)
