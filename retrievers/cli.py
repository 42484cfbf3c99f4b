"""``promptkit index``: build an index directory from a corpus, and search it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

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
    force: Annotated[bool, typer.Option("--force", help="Replace an existing index directory (an index only; "
                                                      "any other file or directory is refused).")] = False,
    kv: Annotated[bool, typer.Option("--kv", help="Also encode every document's KV alone with --model and "
                                     "save it next to the index (kv.safetensors), for kv_reuse.")] = False,
    model: Annotated[str, typer.Option("--model", help="The model whose KV --kv saves.")] = "smollm2-135m-instruct",
    lead_in: Annotated[Optional[str], typer.Option("--lead-in", help="Text the documents are encoded after "
                                                   "(default: a chat turn opening with 'Context:').")] = None,
) -> None:
    """Index CORPUS into directory OUT."""
    from .errors import CorpusError, IndexFormatError
    from .index import KINDS, build_index
    from .corpus import load_corpus
    from .storage import check_replaceable

    if kind not in KINDS:
        _fail(f"unknown --kind {kind!r}; choose one of {', '.join(KINDS)}")
    if out.exists() and not force:
        _fail(f"{out} already exists; pass --force to replace it")
    src, dst = corpus.resolve(), out.resolve()
    if dst == src or dst.is_relative_to(src) or src.is_relative_to(dst):
        _fail(f"--out {out} overlaps the corpus {corpus}; write the index outside it")
    try:
        check_replaceable(out, force)
        docs = load_corpus(corpus)
    except (CorpusError, IndexFormatError) as e:
        _fail(str(e))
    lm = None
    if kv:  # the model first, so a model that cannot load leaves nothing written
        from promptkit.lm import get_lm

        with err.status(f"loading {model} ...", spinner="dots"):
            try:
                lm = get_lm(model)
            except ValueError as e:  # an unknown model, a refused setting
                _fail(str(e))
    with err.status(f"indexing {len(docs)} documents ({kind}) ...", spinner="dots"):
        retriever = build_index(docs, kind)
        try:
            retriever.save(out, force=force)
        except (FileExistsError, IndexFormatError) as e:  # ``out`` appeared or changed meanwhile
            _fail(str(e))
    err.print(f"[green]indexed[/] {len(docs)} documents into {out} ({kind})")
    if lm is not None:
        from .stages import KV_STORE

        with err.status(f"encoding the KV of {len(docs)} documents with {model} ...", spinner="dots"):
            try:
                n = lm.backend.save_kv_store(str(out / KV_STORE), [d.text for d in docs], lead_in,  # type: ignore[attr-defined]
                                             extra={"documents": len(docs)})
            except ValueError as e:  # a model whose KV cannot be reused, a document without tokens
                _fail(f"{e} (the index in {out} was written without KV)")
        err.print(f"[green]saved[/] the KV of {n} documents to {out / KV_STORE}")


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
