"""``promptkit index``: build an index directory from a corpus, and search it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(name="index", help="Build and search retrieval indexes (BM25, dense, hybrid).",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)
err = Console(stderr=True, soft_wrap=True)  # keep paths in errors on one line


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(1)


@app.command()
def build(
    corpus: Annotated[Path, typer.Argument(help="A JSONL file (id, text per line) or a folder of .txt/.md files.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Index directory to create.")],
    kind: Annotated[str, typer.Option("--kind", help="bm25, dense or hybrid.")] = "bm25",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing index directory.")] = False,
) -> None:
    """Index CORPUS into directory OUT."""
    from .errors import CorpusError
    from .index import KINDS, build_index
    from .corpus import load_corpus

    if kind not in KINDS:
        _fail(f"unknown --kind {kind!r}; choose one of {', '.join(KINDS)}")
    if out.exists() and not force:
        _fail(f"{out} already exists; pass --force to replace it")
    try:
        docs = load_corpus(corpus)
    except CorpusError as e:
        _fail(str(e))
    with err.status(f"indexing {len(docs)} documents ({kind}) ...", spinner="dots"):
        retriever = build_index(docs, kind)
        retriever.save(out, force=force)
    err.print(f"[green]indexed[/] {len(docs)} documents into {out} ({kind})")


@app.command()
def search(
    index: Annotated[Path, typer.Argument(help="An index directory made by 'build'.")],
    query: Annotated[str, typer.Argument(help="The search query.")],
    k: Annotated[int, typer.Option("--k", "-k", min=1, help="How many documents.")] = 10,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON list of {id, score, text}.")] = False,
) -> None:
    """Search INDEX for QUERY."""
    from .errors import IndexFormatError
    from .index import load_index

    try:
        docs = load_index(index).search(query, k)
    except IndexFormatError as e:
        _fail(str(e))
    if json_out:
        print(json.dumps([{"id": d.id, "score": d.score, "text": d.text} for d in docs], ensure_ascii=False))
        return
    table = Table("rank", "id", "score", "text")
    for i, d in enumerate(docs, 1):
        table.add_row(str(i), d.id, f"{d.score:.4f}", d.text[:100].replace("\n", " "))
    Console().print(table)
