"""`promptkit eval --ray --workers 2` on a local Ray it starts itself: the same results file as a local
run, and the checkpoint it keeps beside --results is gone once the results are written."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

pytest.importorskip("ray")

pytestmark = pytest.mark.slow

RECIPE = ("stages:\n  - stage: prompt\n    instruction: Is the sentiment of this movie review positive or negative?\n"
          "    input_format: 'Review: {text}'\n    answer_prefix: 'Sentiment:'\n"
          "  - stage: classify\n    labels: [positive, negative]\n    calibrate: false\n")
ROWS = [("A moving, beautifully acted film.", "positive"), ("Dull, slow and far too long.", "negative"),
        ("I laughed the whole way through.", "positive"), ("The plot makes no sense at all.", "negative"),
        ("Warm, funny and wise.", "positive"), ("Forgettable in every way.", "negative")]


def test_eval_on_ray_writes_the_local_results(tmp_path, real_lm):
    from promptkit.cli import app

    recipe, data = tmp_path / "sentiment.yaml", tmp_path / "reviews.jsonl"
    recipe.write_text(RECIPE)
    data.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in ROWS))
    runner = CliRunner()
    common = [str(recipe), str(data), "--metric", "accuracy", "--output-key", "label", "--json"]
    local = runner.invoke(app, ["eval", *common, "--results", str(tmp_path / "local.jsonl")])
    assert local.exit_code == 0, local.output
    remote = runner.invoke(app, ["eval", *common, "--results", str(tmp_path / "ray.jsonl"), "--ray", "--workers", "2"])
    assert remote.exit_code == 0, remote.output
    assert json.loads(remote.stdout.strip().splitlines()[-1])["score"] == json.loads(local.stdout.strip().splitlines()[-1])["score"]
    assert (tmp_path / "ray.jsonl").read_text() == (tmp_path / "local.jsonl").read_text()
    assert not (tmp_path / "ray.jsonl.partial").exists()
