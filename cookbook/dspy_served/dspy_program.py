"""A DSPy program on promptkit's engine: typed outputs that always parse, served or in-process.

    python cookbook/dspy_served/dspy_program.py                  # through promptkit serve (started here)
    python cookbook/dspy_served/dspy_program.py --url http://127.0.0.1:8000/v1   # a server of your own
    python cookbook/dspy_served/dspy_program.py --in-process     # no HTTP at all

``promptkit.dspy.PromptkitLM`` is a ``dspy.LM`` whose engine is promptkit's. It declares that it
honours response schemas, so DSPy's JSON adapter sends the signature's schema and promptkit decodes
under it; under DSPy's default ChatAdapter it holds the reply to the adapter's ``[[ ## field ## ]]``
format with a grammar. Either way even a 135M model answers in fields DSPy can parse. The JSON
adapter is used here: a schema holds every value, which a small model answers best under.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no price list from the network

import dspy  # noqa: E402

from promptkit import get_lm  # noqa: E402
from promptkit.dspy import PromptkitLM  # noqa: E402
from promptkit.server import BackgroundServer, create_app  # noqa: E402


class Capital(dspy.Signature):
    """Name the capital city of the country."""

    country: str = dspy.InputField()
    capital: str = dspy.OutputField()
    confident: bool = dspy.OutputField()


def ask(lm: dspy.BaseLM, countries: tuple[str, ...]) -> list[dspy.Prediction]:
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        predict = dspy.Predict(Capital)
        return [predict(country=c) for c in countries]


def main(countries: tuple[str, ...] = ("France", "Japan"), max_tokens: int = 64, url: str | None = None,
         in_process: bool = False) -> list[dspy.Prediction]:
    """Ask through ``url`` (a promptkit server), in this process, or through a server started here."""
    if in_process:
        return ask(PromptkitLM(get_lm(), max_tokens=max_tokens, cache=False), countries)
    if url:
        return ask(PromptkitLM(base_url=url, max_tokens=max_tokens, cache=False), countries)
    with BackgroundServer(create_app(get_lm())) as server:
        return ask(PromptkitLM(base_url=server.url + "/v1", max_tokens=max_tokens, cache=False), countries)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running promptkit server's base URL, ending in /v1")
    ap.add_argument("--in-process", action="store_true", help="run the engine in this process, without HTTP")
    args = ap.parse_args()
    for p in main(url=args.url, in_process=args.in_process):
        print(p)
