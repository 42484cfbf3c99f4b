"""Typed extraction: pull facts out of text into a pydantic model, with output that always parses.

    python cookbook/typed_extraction/extract.py

``Generate(schema=Landmark)`` constrains decoding to the model's JSON schema, so every
record's ``output`` is a validated ``Landmark`` (the tiny model can get a fact wrong; it
cannot get the format wrong). ``recipe.yaml`` does the same with a typed signature.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from promptkit import BuildPrompt, Generate, Pipeline

DOCS = Path(__file__).resolve().parent.parent / "rag_qa" / "docs"


class Landmark(BaseModel):
    name: str = Field(description="what the passage is about")
    place: str = Field(description="where it is")
    year: int | None = Field(description="a year the passage gives, if any")


def main(passages: list[str] | None = None, max_tokens: int = 64) -> list[Landmark | None]:
    """Extract one Landmark per passage (default: the first paragraph of the lighthouse document)."""
    if passages is None:
        passages = [(DOCS / "lighthouses.md").read_text(encoding="utf-8").split("\n\n")[1]]
    extract = Pipeline(
        BuildPrompt(instruction="Extract the landmark the passage describes.", input_format="Passage: {text}",
                    answer_prefix=None),
        Generate(schema=Landmark, max_tokens=max_tokens),
        input_key="text",
    )
    return [r.output for r in extract.run(passages)]


if __name__ == "__main__":
    for landmark in main():
        print(repr(landmark))
