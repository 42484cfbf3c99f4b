"""MLflow tracking and tracing of evaluations and optimizer searches (the ``mlflow`` extra).

An evaluation is one run: the recipe as an artifact, the model, weight format and engine
settings as params, the metric with its interval, tokens and seconds as metrics, the
per-item results as a table, and each record's pipeline trace as an MLflow trace. A search
is a parent run with one child run per candidate (instruction, demonstrations, scorer;
validation score with interval, rung reached, calls and tokens), the winner tagged, and
the held-out comparison added by :meth:`MlflowTracker.log_heldout`. Every run also keeps
``promptkit_run.json``, the run file ``promptkit report`` draws.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..pipeline import Pipeline, Record
from .schema import CandidateRow, EvalSection, ItemResult, MlflowRef, RunFile, SearchSection
from .tracker import Tracker

RUN_ARTIFACT = "promptkit_run.json"
INSTALL_HINT = "pip install 'promptkit[mlflow]' (in a checkout: pip install -e '.[mlflow]')"
DEFAULT_EXPERIMENT = "promptkit"


def require_mlflow() -> Any:
    """The mlflow module, or an ImportError that says how to install it."""
    try:
        import mlflow
    except ImportError as e:
        raise ImportError(f"MLflow tracking needs the mlflow package: {INSTALL_HINT}") from e
    return mlflow


def tracking_uri(value: str | os.PathLike | None = None) -> str:
    """The tracking URI for ``value``: a URI as given (``http://host:5000``, ``sqlite:///x.db``,
    ``databricks``), a ``.db`` file as SQLite, any other path as the folder of ``mlflow.db``;
    None: ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working directory."""
    if value is None or value == "":
        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"
    text = os.fspath(value)
    if "://" in text or text in ("databricks", "databricks-uc"):
        return text
    path = Path(text).expanduser().resolve()
    if path.suffix in (".db", ".sqlite", ".sqlite3"):
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'mlflow.db'}"


def _local_artifacts(uri: str) -> str | None:
    """Where a local SQLite store keeps artifacts: beside the database (``mlflow server``'s layout)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()


class MlflowTracker(Tracker):
    """Log evaluations and searches to MLflow (and keep each as a run file, like :class:`Tracker`).

    ``uri``: a tracking server (``http://127.0.0.1:5000``), a store (``sqlite:///runs/mlflow.db``, a
    ``.db`` file or a folder), or None for ``$MLFLOW_TRACKING_URI`` or ``./mlflow.db``; it becomes
    MLflow's tracking URI for this process. ``experiment``: its name (default ``$MLFLOW_EXPERIMENT_NAME``
    or ``promptkit``). ``max_traces``: records of an evaluation logged as traces, failures first
    (None: all). A run started inside an active MLflow run is nested under it.
    """

    def __init__(self, uri: str | os.PathLike | None = None, experiment: str | None = None,
                 max_traces: int | None = 200, results: str | Path | None = None,
                 recipe: str | Path | None = None, title: str | None = None) -> None:
        super().__init__(results=results, recipe=recipe, title=title)
        self.mlflow = require_mlflow()
        self.uri = tracking_uri(uri)
        self.mlflow.set_tracking_uri(self.uri)
        self.experiment_id = self._experiment(experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME")
                                              or DEFAULT_EXPERIMENT)
        self.max_traces = max_traces
        self.run_id: str | None = None  # the latest run logged (a search's parent run)

    def _experiment(self, name: str) -> str:
        client = self.mlflow.MlflowClient(self.uri)
        found = client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        return client.create_experiment(name, artifact_location=_local_artifacts(self.uri))

    # -- publishing ---------------------------------------------------------------------------
    def publish_eval(self, run: RunFile, pipeline: Pipeline, records: list[Record]) -> None:
        section = run.eval
        assert section is not None
        with quiet_mlflow(), self._run(run.title, "eval") as active:
            mlf = self.mlflow
            mlf.log_params(model_params(run) | eval_params(section, pipeline))
            mlf.log_metrics(eval_metrics(section))
            self._log_recipe(pipeline, "recipe.yaml", self.recipe)
            self._log_traces(records, pipeline, section.items, active.info.experiment_id)
            mlf.log_table(items_table(section.items), "results.json")
            self._log_run_file(run, active)

    def publish_search(self, run: RunFile, pipeline: Pipeline, best_pipeline: Pipeline) -> None:
        search = run.search
        assert search is not None
        with quiet_mlflow(), self._run(run.title, "search", {"promptkit.best": search.best_name}) as active:
            mlf = self.mlflow
            mlf.log_params(model_params(run) | search_params(search, pipeline))
            mlf.log_metrics(search_metrics(search))
            self._log_recipe(pipeline, "recipe.yaml", self.recipe)
            self._log_recipe(best_pipeline, "best_recipe.yaml")
            for cand in search.candidates:
                self._log_candidate(cand, search)
            mlf.log_table(candidates_table(search.candidates), "candidates.json")
            self._log_run_file(run, active)

    def publish_heldout(self, run: RunFile) -> None:
        held = run.heldout
        assert held is not None and run.mlflow is not None
        mlf = self.mlflow
        with quiet_mlflow(), mlf.start_run(run_id=run.mlflow.run_id, nested=mlf.active_run() is not None):
            mlf.log_metrics(heldout_metrics(run))
            mlf.log_table(heldout_table(held.zero_shot.items, held.optimized.items), "heldout.json")
            mlf.log_dict(run.model_dump(mode="json"), RUN_ARTIFACT)

    def log_traces(self, records: list[Record], pipeline: Pipeline | None = None) -> list[str | None]:
        """Log records (from ``pipeline.run(...)``) as MLflow traces, one span per stage; their trace ids."""
        from .spans import log_record_traces

        ids = log_record_traces(records, pipeline, experiment_id=self.experiment_id)
        self.mlflow.flush_trace_async_logging()
        return ids

    # -- helpers --------------------------------------------------------------------------------
    @contextmanager
    def _run(self, name: str, kind: str, tags: dict[str, str] | None = None) -> Iterator[Any]:
        mlf = self.mlflow
        outer = mlf.active_run()
        with mlf.start_run(experiment_id=outer.info.experiment_id if outer else self.experiment_id,
                           run_name=name[:250], nested=outer is not None,
                           tags={"promptkit.kind": kind, **(tags or {})}) as active:
            self.run_id = active.info.run_id
            yield active

    def _log_candidate(self, cand: CandidateRow, search: SearchSection) -> None:
        mlf = self.mlflow
        tags = {"promptkit.kind": "candidate", "promptkit.winner": str(cand.winner).lower(),
                "promptkit.raced_out": str(cand.raced_out).lower()}
        parent = mlf.active_run()
        with mlf.start_run(experiment_id=parent.info.experiment_id, run_name=cand.name[:250], nested=True, tags=tags):
            mlf.log_params(candidate_params(cand))
            mlf.log_metrics(candidate_metrics(cand, search))

    def _log_recipe(self, pipeline: Pipeline, name: str, source: Path | None = None) -> None:
        if source is not None and source.is_file():
            self.mlflow.log_artifact(str(source))
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            pipeline.save(path)
            self.mlflow.log_artifact(str(path))

    def _log_traces(self, records: list[Record], pipeline: Pipeline, items: list[ItemResult],
                    experiment_id: str) -> None:
        from .spans import log_record_traces

        if not records or self.max_traces == 0:
            return
        ids = log_record_traces(records, pipeline, items, experiment_id, self.max_traces)
        for item, trace_id in zip(items, ids):
            item.trace_id = trace_id

    def _log_run_file(self, run: RunFile, active: Any) -> None:
        run.mlflow = MlflowRef(tracking_uri=self.uri, experiment_id=active.info.experiment_id,
                               run_id=active.info.run_id)
        self.mlflow.log_dict(run.model_dump(mode="json"), RUN_ARTIFACT)


@contextmanager
def quiet_mlflow() -> Iterator[None]:
    """Keep MLflow from printing each run's link to stdout (a search ends a run per candidate) and
    progress bars of artifact transfers to stderr."""
    settings = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    before = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# -- params, metrics and tables ------------------------------------------------------------------
def _param(value: Any, limit: int = 6000) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def model_params(run: RunFile) -> dict[str, str]:
    """The first model's name, backend, weight format, device and engine settings."""
    if not run.models:
        return {}
    m = run.models[0]
    params = {"model": m.model, "backend": m.backend, "weights": m.weights, "device": m.device, "chat": m.chat}
    params |= {f"engine.{k}": v for k, v in m.engine.items()}
    if len(run.models) > 1:
        params["models"] = [x.model for x in run.models]
    return {k: _param(v) for k, v in params.items() if v is not None}


def pipeline_params(pipeline: Pipeline) -> dict[str, str]:
    return {"pipeline": pipeline.name, "stages": " > ".join(s.stage_name for s in pipeline.stages)}


def eval_params(section: EvalSection, pipeline: Pipeline) -> dict[str, str]:
    return {**pipeline_params(pipeline), "metric": section.metric, "dataset": _param(section.dataset or ""),
            "n": str(section.n)}


def eval_metrics(section: EvalSection, prefix: str = "") -> dict[str, float]:
    """The metric with its interval, examples, seconds and the engine's token counters."""
    m = section.metric
    out = {f"{prefix}{m}": section.score, f"{prefix}{m}_ci_low": section.ci[0], f"{prefix}{m}_ci_high": section.ci[1],
           f"{prefix}n": section.n, f"{prefix}seconds": section.seconds}
    if section.tokens is not None:
        t = section.tokens
        out |= {f"{prefix}tokens_requested": t.requested, f"{prefix}tokens_prefilled": t.prefilled,
                f"{prefix}tokens_cached": t.cached}
        if t.requested:
            out[f"{prefix}prefill_ratio"] = t.prefilled / t.requested
    return {k: float(v) for k, v in out.items()}


def search_params(search: SearchSection, pipeline: Pipeline) -> dict[str, str]:
    params = {**pipeline_params(pipeline), "optimizer": search.optimizer, "metric": search.metric,
              "seed": str(search.seed), "train_size": str(search.train_size), "val_size": str(search.val_size)}
    if search.rungs:
        params["rungs"] = _param(search.rungs)
    params |= {f"optimizer.{k}": _param(v) for k, v in search.settings.items()}
    return params


def search_metrics(search: SearchSection) -> dict[str, float]:
    m = search.metric
    out: dict[str, float] = {f"best_val_{m}": search.best_score, "lm_calls": search.lm_calls,
                             "metric_calls": search.metric_calls, "seconds": search.seconds,
                             "candidates": len(search.candidates), "tokens_requested": search.tokens.requested,
                             "tokens_prefilled": search.tokens.prefilled, "tokens_cached": search.tokens.cached}
    if search.best_ci:
        out |= {f"best_val_{m}_ci_low": search.best_ci[0], f"best_val_{m}_ci_high": search.best_ci[1]}
    if search.baseline_score is not None:
        out[f"baseline_val_{m}"] = search.baseline_score
    if search.baseline_ci:
        out |= {f"baseline_val_{m}_ci_low": search.baseline_ci[0], f"baseline_val_{m}_ci_high": search.baseline_ci[1]}
    if search.tokens.requested:
        out["prefill_ratio"] = search.tokens.prefilled / search.tokens.requested
    return {k: float(v) for k, v in out.items()}


def candidate_params(cand: CandidateRow) -> dict[str, str]:
    params = {"candidate": cand.name, "order": str(cand.order), "instruction": _param(cand.instruction or ""),
              "demonstrations": _param(cand.demonstrations), "n_demonstrations": str(len(cand.demonstrations)),
              "scorer": _param(cand.scorer)}
    params |= {f"setting.{k}": _param(v) for k, v in cand.settings.items()}
    return params


def candidate_metrics(cand: CandidateRow, search: SearchSection) -> dict[str, float]:
    m = search.metric
    out: dict[str, float] = {f"val_{m}": cand.score, f"val_{m}_ci_low": cand.ci[0], f"val_{m}_ci_high": cand.ci[1],
                             "val_examples": cand.n, "seconds": cand.seconds, "winner": float(cand.winner)}
    if cand.rung is not None:
        out["rung"] = cand.rung
    if cand.lm_calls is not None:
        out["lm_calls"] = cand.lm_calls
    if cand.tokens is not None:
        out |= {"tokens_requested": cand.tokens.requested, "tokens_prefilled": cand.tokens.prefilled,
                "tokens_cached": cand.tokens.cached}
    return {k: float(v) for k, v in out.items()}


def heldout_metrics(run: RunFile) -> dict[str, float]:
    held = run.heldout
    assert held is not None
    out = eval_metrics(held.zero_shot, "heldout_zero_shot_") | eval_metrics(held.optimized, "heldout_optimized_")
    out |= {"heldout_difference": held.difference, "heldout_difference_ci_low": held.difference_ci[0],
            "heldout_difference_ci_high": held.difference_ci[1]}
    return out


def items_table(items: list[ItemResult]) -> dict[str, list[Any]]:
    """Per-item results as columns (``mlflow.log_table``): inputs, gold, prediction, score, usage, trace."""
    keys = sorted({k for it in items for k in it.inputs})
    table: dict[str, list[Any]] = {"item": [it.index for it in items]}
    for k in keys:
        table[k] = [_cell(it.inputs.get(k)) for it in items]
    table |= {"gold": [_cell(it.gold) for it in items], "prediction": [_cell(it.prediction) for it in items],
              "score": [it.score for it in items]}
    optional = {"answer_rank": lambda it: it.answer_rank,
                "documents": lambda it: " ".join(d.id for d in it.documents) or None,
                "prompt_tokens": lambda it: it.prompt_tokens, "prefilled_tokens": lambda it: it.prefilled_tokens,
                "cached_tokens": lambda it: it.cached_tokens, "completion_tokens": lambda it: it.completion_tokens,
                "first_token_seconds": lambda it: it.first_token_seconds, "trace_id": lambda it: it.trace_id}
    for name, get in optional.items():
        column = [get(it) for it in items]
        if any(v is not None for v in column):
            table[name] = column
    return table


def candidates_table(candidates: list[CandidateRow]) -> dict[str, list[Any]]:
    """The candidates as columns, in the order they were tried."""
    return {"order": [c.order for c in candidates], "name": [c.name for c in candidates],
            "score": [c.score for c in candidates], "ci_low": [c.ci[0] for c in candidates],
            "ci_high": [c.ci[1] for c in candidates], "n": [c.n for c in candidates],
            "rung": [c.rung for c in candidates], "winner": [c.winner for c in candidates],
            "instruction": [c.instruction for c in candidates],
            "demonstrations": [len(c.demonstrations) for c in candidates],
            "scorer": [json.dumps(c.scorer) for c in candidates], "lm_calls": [c.lm_calls for c in candidates],
            "tokens_prefilled": [c.tokens.prefilled if c.tokens else None for c in candidates]}


def heldout_table(zero_shot: list[ItemResult], optimized: list[ItemResult]) -> dict[str, list[Any]]:
    """Both pipelines' predictions per held-out item, side by side (the flipped items stand out)."""
    table = items_table(optimized)
    table["zero_shot_prediction"] = [_cell(it.prediction) for it in zero_shot]
    table["zero_shot_score"] = [it.score for it in zero_shot]
    return table


def _cell(value: Any) -> Any:
    return value if value is None or isinstance(value, (str, int, float, bool)) else json.dumps(value, default=str)
