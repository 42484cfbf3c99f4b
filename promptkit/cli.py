"""The ``promptkit`` command line."""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__

app = typer.Typer(
    name="promptkit",
    help="Prompt engineering and RAG pipelines on a local, prefix-caching inference engine.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
models_app = typer.Typer(help="List and prepare the embedded models.", no_args_is_help=True)
app.add_typer(models_app, name="models")

err = Console(stderr=True)
out = Console()
QUICKSTART = Path(__file__).parent / "data" / "quickstart"


def _one_shot() -> None:
    """A command that answers and exits uses a cached decode graph but never starts compiling one
    (it would not live to use it); ``$PROMPTKIT_COMPILE_DECODE`` still decides if set."""
    os.environ.setdefault("PROMPTKIT_COMPILE_DECODE", "cached")


def _fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        print(f"promptkit {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    """promptkit: build, evaluate, optimize and serve prompt pipelines on a local model."""


def _load_lm(model: str, backend: str = "local", **options):
    from .lm import get_lm

    with err.status(f"loading {model} ...", spinner="dots"):
        try:
            return get_lm(model, backend, **options)
        except ValueError as e:  # a refused model or setting
            _fail(str(e))


@models_app.command("list")
def models_list(json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Show the embedded models and whether they are installed and prepared."""
    from .models import EMBEDDED, embedded_status

    rows = [embedded_status(name) for name in EMBEDDED]
    if json_out:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="embedded models")
    for col in ("name", "kind", "installed", "prepared", "description"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r["name"]), str(r["kind"]), "yes" if r["installed"] else f"no: {r['install']}",
                      "yes" if r["prepared"] else "no", str(r["description"]))
    out.print(table)


@models_app.command("prepare")
def models_prepare(
    names: Annotated[Optional[list[str]], typer.Argument(help="Models to prepare (default: all embedded).")] = None,
) -> None:
    """Install-check and convert embedded models once (GGUF -> safetensors in the cache dir).

    Without names: every embedded model, skipping optional ones that are not installed."""
    from .models import EMBEDDED, ModelNotFoundError, embedded_status, resolve_embedder, resolve_llm

    for name in names or list(EMBEDDED):
        if not names and EMBEDDED[name].optional and not embedded_status(name)["installed"]:
            err.print(f"[dim]skipped {name} (optional, not installed: {EMBEDDED[name].install_hint})[/]")
            continue
        try:
            kind = EMBEDDED[name].kind if name in EMBEDDED else "llm"
            path = resolve_llm(name, progress=True) if kind == "llm" else resolve_embedder(name)
        except ModelNotFoundError as e:
            _fail(str(e))
        err.print(f"[green]ready[/] {name}: {path}")
        if kind == "llm":
            _prepare_graph(name)


def _prepare_graph(name: str) -> None:
    """Compile the model's decode graph into the cache once, so later processes decode compiled at once."""
    from .doctor import decode_graph

    with err.status(f"compiling the decode graph of {name} once (a minute or two; later runs load it) ...",
                    spinner="dots"):
        try:
            ok, detail = decode_graph(name, build=True)
        except ValueError as e:
            _fail(str(e))
    err.print(f"[green]ready[/] {name} decode graph: {detail}" if ok else f"[yellow]warning:[/] {name} decode "
              f"graph: {detail}")


@app.command()
def ask(
    question: Annotated[str, typer.Argument(help="The question or instruction.")],
    model: Annotated[str, typer.Option(help="Model name, local HF directory or hub id.")] = "smollm2-135m-instruct",
    system: Annotated[Optional[str], typer.Option(help="System prompt.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate at most.")] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 is greedy.")] = 0.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the whole Generation as JSON.")] = False,
) -> None:
    """Ask the model one question; prints the answer alone (or JSON with --json)."""
    _one_shot()
    from .types import Prompt

    if not question.strip():
        _fail("the question is empty")
    lm = _load_lm(model)
    try:
        gen = lm.generate(Prompt.from_parts(system=system, question=question), max_tokens=max_tokens,
                          temperature=temperature)[0]
    except ValueError as e:
        _fail(str(e))
    print(gen.model_dump_json(indent=2) if json_out else gen.text.strip())


def _load_pipeline(recipe: Path):
    from .recipes import RecipeError, load_recipe

    try:
        return load_recipe(recipe)
    except RecipeError as e:
        _fail(str(e))


def _json(value) -> str:
    from pydantic_core import to_jsonable_python

    # Structured outputs are pydantic models (or hold them); dump those as their JSON form.
    return json.dumps(value, ensure_ascii=False, default=to_jsonable_python)


def _print_record(record, json_out: bool) -> None:
    if json_out:
        print(_json({
            "inputs": record.inputs,
            "output": record.output,
            "documents": [d.model_dump(mode="json") for d in record.documents],
            "usage": record.generation.usage.model_dump() if record.generation else None,
        }))
    else:
        print(record.output if isinstance(record.output, str) else _json(record.output))


def _read_inputs(path: Path) -> list:
    """The inputs of a JSONL file: each line a JSON object (the record's inputs) or string (its input)."""
    from .data import DataError, read_text

    items = []
    try:
        lines = read_text(path).splitlines()
    except DataError as e:
        _fail(str(e))
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            _fail(f"{path}:{n}: not valid JSON ({e.msg})")
        if not isinstance(item, (dict, str)):
            _fail(f"{path}:{n}: each line must be a JSON object of inputs (or a string), "
                  f"not a JSON {type(item).__name__}")
        items.append(item)
    return items


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe file (YAML or JSON).")],
    input: Annotated[Optional[list[str]], typer.Option("--input", "-i", help="Input text (repeatable).")] = None,
    input_file: Annotated[Optional[Path], typer.Option(help="JSONL of input objects.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per output line.")] = False,
) -> None:
    """Run a recipe's pipeline on inputs given inline or in a JSONL file."""
    _one_shot()
    pipe = _load_pipeline(recipe)
    items: list = list(input or [])
    if input_file:
        items += _read_inputs(input_file)
    if not items:
        _fail("give at least one --input or an --input-file")
    try:
        records = pipe.run(items)
    except ValueError as e:
        _fail(str(e))
    for r in records:
        _print_record(r, json_out)


class _EvalCommand(typer.core.TyperCommand):
    """`promptkit eval`, whose --mlflow and --ray may stand without a value (the default store; a local Ray)."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        args = list(args)
        for i, arg in enumerate(args):
            if arg == "--":
                break
            if arg in ("--mlflow", "--ray") and (i + 1 == len(args) or args[i + 1].startswith("-")):
                args[i] = f"{arg}="
        return super().parse_args(ctx, args)


@app.command("eval", cls=_EvalCommand)
def eval_cmd(
    recipe: Annotated[Path, typer.Argument(help="Recipe file of the pipeline to evaluate.")],
    data: Annotated[Path, typer.Argument(help="Dataset: JSONL or CSV with the input fields and the gold field.")],
    metric: Annotated[str, typer.Option(help="exact_match, f1, accuracy or contains.")] = "exact_match",
    output_key: Annotated[str, typer.Option(help="Name of the gold field.")] = "answer",
    results: Annotated[Optional[Path], typer.Option(help="Write per-example results here: JSONL, or with a .json "
                                                         "name the run file `promptkit report` draws.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    mlflow: Annotated[Optional[str], typer.Option(
        "--mlflow", metavar="[URI]",
        help="Log the run to MLflow: params, metrics, the recipe, per-item results, one trace per item. "
             "Alone: $MLFLOW_TRACKING_URI or ./mlflow.db; or a tracking URI, a .db file or a folder "
             "(give it last, or give it a value).")] = None,
    ray: Annotated[Optional[str], typer.Option(
        "--ray", metavar="[ADDRESS]",
        help="Run on Ray engine workers, each unit of prompts that share a prefix on the worker that holds it. "
             "Alone: a local Ray on this machine; or a cluster address (auto, ray://HOST:10001). With --results, "
             "finished items go to RESULTS.partial and a rerun resumes from it.")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Engine workers with --ray (one torch thread each).")] = 2,
) -> None:
    """Evaluate a recipe on a dataset: a table of results and the mean score with its 95 % bootstrap interval."""
    from .data import DataError
    from .evaluate import evaluate, print_result

    tracker = _eval_tracker(mlflow, recipe, results)
    pipe = _load_pipeline(recipe)
    executor = _ray_executor(ray, workers, results) if ray is not None else None
    try:
        res = evaluate(pipe, data, metric=metric, output_key=output_key, progress=not json_out, tracker=tracker,
                       executor=executor)
    except (DataError, ValueError) as e:
        _fail(str(e))
    if results:
        tracker.save(results) if tracker is not None and results.suffix == ".json" else res.write_jsonl(results)
    _finish_ray(executor, json_out)
    if tracker is not None and mlflow is not None:
        _report_logged(tracker, results)
    if json_out:
        print(json.dumps({"metric": res.metric, "score": res.score, "ci_low": res.ci[0], "ci_high": res.ci[1],
                          "n": res.n, "seconds": res.seconds}))
    else:
        print_result(res)


def _ray_executor(address: str, workers: int, results: Optional[Path]):
    """The Ray executor of `promptkit eval --ray`: a local Ray for an empty address, checkpointing next to --results."""
    try:
        from .distributed import RayExecutor

        return RayExecutor(address=address or None, workers=workers,
                           checkpoint=results.with_name(results.name + ".partial") if results else None)
    except (ImportError, ValueError) as e:
        _fail(str(e))


def _finish_ray(executor, quiet: bool) -> None:
    """Stop the workers, say what the run did, and drop the checkpoint the results file now holds."""
    if executor is None:
        return
    report = executor.last_report
    executor.close()
    if executor.checkpoint:
        Path(executor.checkpoint).unlink(missing_ok=True)
    if report is not None and not quiet:
        err.print(f"[dim]ray: {report.done} items on {report.workers} workers ({report.workers_alive} alive at the end), "
                  f"{report.resumed} resumed, {report.retries} retried, {report.lost} lost; "
                  f"{report.tokens_prefilled:,} tokens prefilled, {report.items_per_second:.1f} items/s[/]")


def _eval_tracker(mlflow: Optional[str], recipe: Path, results: Optional[Path]):
    """The tracker `promptkit eval` logs to: MLflow with --mlflow, a run file for --results NAME.json, or none."""
    from rich.markup import escape

    if mlflow is not None:
        from .runs import MlflowTracker

        try:
            return MlflowTracker(mlflow or None, recipe=recipe)
        except ImportError as e:
            _fail(escape(str(e)))  # the hint's extra, [mlflow], is not rich markup
    if results is not None and results.suffix == ".json":
        from .runs import Tracker

        return Tracker(recipe=recipe)
    return None


def _report_logged(tracker, results: Optional[Path]) -> None:
    from rich.markup import escape

    if tracker.error is not None:
        err.print(f"[bold yellow]warning:[/] not logged to MLflow: {escape(str(tracker.error))}")
        return
    ref = tracker.run.mlflow
    err.print(f"[green]logged[/] MLflow run {ref.run_id} to {ref.tracking_uri}")
    json_results = results is not None and results.suffix == ".json"
    source = results if json_results else f"{ref.tracking_uri} --run-id {ref.run_id}"
    err.print(f"[dim]draw it: promptkit report {source} -o report.html[/]")


@app.command()
def report(
    source: Annotated[str, typer.Argument(
        help="A run file (.json: promptkit eval --results run.json, or a tracker's), per-item results (.jsonl), "
             "a folder holding promptkit_run.json, runs:/RUN_ID, or an MLflow store (tracking URI, .db file or "
             "folder of mlflow.db; the latest promptkit run there unless --run-id).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The HTML file to write.")] = Path("report.html"),
    run_id: Annotated[Optional[str], typer.Option(help="The MLflow run to draw (in the store SOURCE names).")] = None,
    title: Annotated[Optional[str], typer.Option(help="The page's title (default: the run's).")] = None,
) -> None:
    """Draw a run as one self-contained HTML page of plots (opens offline, no server)."""
    from rich.markup import escape

    from .runs import load_run, write_report

    try:
        run = load_run(source, run_id)
        path = write_report(run, output, title)
    except (FileNotFoundError, ImportError, ValueError) as e:
        _fail(escape(str(e)))
    err.print(f"[green]wrote[/] {path} ({run.kind}: {escape(run.title)})")


@app.command()
def quickstart(
    question: Annotated[str, typer.Argument(help="Question about the bundled documents.")] = "How tall is Mount Everest?",
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON with the retrieved documents.")] = False,
) -> None:
    """Answer a question over a few bundled documents with the embedded models (retrieve, prompt, generate)."""
    _one_shot()
    pipe = _load_pipeline(QUICKSTART / "recipe.yaml")
    try:
        record = pipe(question)
    except ValueError as e:  # a model that is not installed
        _fail(str(e))
    if json_out:
        _print_record(record, True)
        return
    err.print(f"[dim]retrieved: {', '.join(d.id for d in record.documents)}[/]")
    print(record.output)


@app.command()
def stages() -> None:
    """List the stage names recipes can use."""
    from .registry import get_stage_class, stage_names

    for name in stage_names():
        doc = (get_stage_class(name).__doc__ or "").strip().splitlines()
        out.print(f"[bold]{name}[/]  {doc[0] if doc else ''}")


def _serve_replicas(model: str, replicas: int, host: str, port: int, lm_options: dict, **server_options) -> None:
    """`promptkit serve --replicas N`: N engines behind Ray Serve with the prefix-aware router, on one address."""
    try:
        from .distributed.serve import build_app, run_replicas

        threads = max(1, (os.cpu_count() or 1) // replicas)  # this machine's cores, shared among the replicas
        app_ = build_app(model, replicas, lm_options=lm_options, threads=threads, **server_options)
    except (ImportError, ValueError) as e:
        _fail(str(e))
    err.print(f"[green]serving[/] {model} on http://{host}:{port}/v1 with {replicas} replicas behind Ray Serve"
              + (" (API key required)" if server_options.get("api_key") else ""))
    run_replicas(app_, host=host, port=port)


@app.command()
def serve(
    model: Annotated[str, typer.Option(help="Model name, local HF directory or hub id.")] = "smollm2-135m-instruct",
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(envvar="PROMPTKIT_API_KEY",
                                                   help="Require 'Authorization: Bearer KEY'.")] = None,
    max_queue: Annotated[int, typer.Option(min=1, help="Generations (each prompt times n) running or waiting "
                                                       "at once; a request needing more than are free gets 429, "
                                                       "one needing more than this, 400.")] = 64,
    max_prompts: Annotated[int, typer.Option(min=1, help="Prompts in one /v1/completions request.")] = 256,
    max_n: Annotated[int, typer.Option(min=1, help="Choices per prompt (n).")] = 16,
    max_body_bytes: Annotated[str, typer.Option(help="Largest request body, e.g. 8MiB; refused before it is "
                                                     "parsed.")] = "8MiB",
    max_stop: Annotated[int, typer.Option(min=0, help="Stop strings per request.")] = 4,
    max_stop_chars: Annotated[int, typer.Option(min=1, help="Characters in one stop string.")] = 256,
    recipe: Annotated[Optional[list[Path]], typer.Option(help="Also serve a recipe's pipeline as a model "
                                                              "named after the file (repeatable).")] = None,
    max_kv_bytes: Annotated[str, typer.Option(help="KV memory for the prefix cache and running requests "
                                                   "together, e.g. 512MB or 2GiB; past it the engine evicts "
                                                   "cached prefixes, then preempts the youngest request.")] = "2GiB",
    prefix_cache: Annotated[bool, typer.Option(help="Reuse the KV of prompts' shared prefixes.")] = True,
    max_batch_tokens: Annotated[int, typer.Option(min=1, help="Tokens per forward (longer prefills are "
                                                              "chunked).")] = 2048,
    max_running: Annotated[int, typer.Option(min=1, help="Requests decoded together.")] = 64,
    kv_reuse: Annotated[str, typer.Option(help="Documents sent as content parts or consecutive user messages "
                                               "reuse the KV computed for each alone: full (prefill them), "
                                               "blend, sink or none.")] = "full",
    replicas: Annotated[int, typer.Option(min=1, help="Engine replicas behind Ray Serve on one address, each "
                                                      "request sent to the replica that holds its prompt's prefix "
                                                      "(needs promptkit[ray]); limits hold per replica.")] = 1,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /stats)."""
    import ipaddress

    from .engine.config import parse_bytes
    from .server import serve as run_server

    if kv_reuse not in ("full", "blend", "sink", "none"):
        _fail(f"unknown --kv-reuse {kv_reuse!r}; choose full, blend, sink or none")
    try:
        body_bytes = parse_bytes(max_body_bytes)
    except ValueError as e:
        _fail(f"--max-body-bytes: {e}")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        loopback = False
    if not loopback and not api_key:
        err.print(f"[bold yellow]warning:[/] serving on {host} without --api-key: anyone who can reach this "
                  "machine over the network can use the model; set --api-key (or PROMPTKIT_API_KEY)")
    pipelines = {}
    for r in recipe or []:
        if r.stem in pipelines or r.stem == model:  # the name is the id clients send: it must be unique
            _fail(f"two served models would be named {r.stem!r} (--recipe {r}); each recipe is served under its "
                  "file name, so rename or copy the file")
        pipelines[r.stem] = _load_pipeline(r)
    if replicas > 1:
        lm_options = dict(max_kv_bytes=max_kv_bytes, prefix_cache=prefix_cache, max_batch_tokens=max_batch_tokens,
                          max_running=max_running, **({"kv_reuse": kv_reuse} if kv_reuse != "full" else {}))
        return _serve_replicas(model, replicas, host, port, lm_options, api_key=api_key, max_queue=max_queue,
                               pipelines=pipelines, max_prompts=max_prompts, max_n=max_n, max_body_bytes=body_bytes,
                               max_stop=max_stop, max_stop_chars=max_stop_chars)
    lm = _load_lm(model, max_kv_bytes=max_kv_bytes, prefix_cache=prefix_cache, max_batch_tokens=max_batch_tokens,
                  max_running=max_running, **({"kv_reuse": kv_reuse} if kv_reuse != "full" else {}))
    if kv_reuse != "full":
        try:
            lm.backend.engine.reuse.rerotator()  # type: ignore[attr-defined]
        except ValueError as e:  # a model whose stored keys cannot be moved
            _fail(str(e))
    err.print(f"[green]serving[/] {model} on http://{host}:{port}/v1" + (" (API key required)" if api_key else ""))
    run_server(lm, host=host, port=port, api_key=api_key, max_queue=max_queue, pipelines=pipelines,
               max_prompts=max_prompts, max_n=max_n, max_body_bytes=body_bytes, max_stop=max_stop,
               max_stop_chars=max_stop_chars)


@app.command()
def doctor(
    json_out: Annotated[bool, typer.Option("--json", help="Print the checks as JSON.")] = False,
    quick: Annotated[bool, typer.Option(help="Skip loading the models and compiling.")] = False,
) -> None:
    """Check the environment (models, cache dir, torch device, compile) and say what to fix."""
    from .doctor import print_report, run_checks

    checks = run_checks(quick=quick)
    if json_out:
        print(json.dumps([c.model_dump() for c in checks], indent=2))
    else:
        print_report(checks, out)
    if any(c.essential and not c.ok for c in checks):
        raise typer.Exit(1)


def _mount_plugins() -> None:
    # Stage packages add sub-commands (e.g. `promptkit index`) through entry points.
    for ep in importlib.metadata.entry_points(group="promptkit.cli"):
        try:
            app.add_typer(ep.load(), name=ep.name)
        except ModuleNotFoundError:
            continue


_mount_plugins()

if __name__ == "__main__":
    sys.exit(app())
