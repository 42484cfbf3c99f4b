"""Find a run file: a JSON run file, per-item results (JSONL), a folder holding one, or an MLflow run."""

from __future__ import annotations

import tempfile
from pathlib import Path

from .schema import RunFile

RUN_ARTIFACT = "promptkit_run.json"


def load_run(source: str | Path, run_id: str | None = None) -> RunFile:
    """The run ``source`` names.

    * a run file (``.json``, from ``promptkit eval --results run.json`` or a tracker) or per-item
      results (``.jsonl``, from ``promptkit eval --results results.jsonl``);
    * a folder holding ``promptkit_run.json`` (an MLflow run's artifacts, downloaded);
    * ``runs:/<run id>``: an MLflow run in ``$MLFLOW_TRACKING_URI`` (or ``./mlflow.db``);
    * an MLflow tracking URI or local store (``http://host:5000``, ``sqlite:///x.db``, a ``.db`` file or
      the folder of ``mlflow.db``) with ``run_id``, or without it the latest run promptkit logged there.
    """
    text = str(source)
    if text.startswith("runs:/"):
        return mlflow_run(None, text[len("runs:/"):].strip("/").split("/")[0])
    path = Path(text)
    if path.is_file() and path.suffix in (".json", ".jsonl"):
        return RunFile.load(path)
    if path.is_dir() and (path / RUN_ARTIFACT).is_file():
        return RunFile.load(path / RUN_ARTIFACT)
    if "://" in text or path.suffix in (".db", ".sqlite", ".sqlite3") or (path / "mlflow.db").is_file():
        return mlflow_run(text, run_id)
    raise FileNotFoundError(f"{text}: not a run file (.json), per-item results (.jsonl), a folder with "
                            f"{RUN_ARTIFACT}, runs:/<id>, nor an MLflow store (a tracking URI, a .db file or a "
                            "folder holding mlflow.db)")


def mlflow_run(store: str | None, run_id: str | None = None) -> RunFile:
    """The run file promptkit logged with an MLflow run (a candidate's run gives its search's)."""
    from .mlflow_tracker import quiet_mlflow, require_mlflow, tracking_uri

    mlflow = require_mlflow()
    uri = tracking_uri(store)
    client = mlflow.MlflowClient(uri)
    run = client.get_run(run_id) if run_id else latest_run(client)
    parent = run.data.tags.get("mlflow.parentRunId")
    if run.data.tags.get("promptkit.kind") == "candidate" and parent:
        run = client.get_run(parent)
    with tempfile.TemporaryDirectory() as tmp, quiet_mlflow():
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=RUN_ARTIFACT,
                                                       dst_path=tmp, tracking_uri=uri)
        except Exception as e:
            raise FileNotFoundError(f"MLflow run {run.info.run_id} in {uri} has no {RUN_ARTIFACT}: "
                                    "was it logged by promptkit?") from e
        return RunFile.load(path)


def latest_run(client: object) -> object:
    """The most recent evaluation or search promptkit logged in any experiment of the store."""
    experiments = [e.experiment_id for e in client.search_experiments()]  # type: ignore[attr-defined]
    runs = client.search_runs(experiments, filter_string="tags.`promptkit.kind` != 'candidate'",  # type: ignore
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise FileNotFoundError("no promptkit run in this MLflow store; log one with `promptkit eval ... --mlflow` "
                                "or compile(..., tracker=MlflowTracker())")
    return runs[0]
