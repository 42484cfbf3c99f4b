"""`promptkit doctor`: real checks on this machine, and a failing essential check exits 1."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from promptkit.cli import app
from promptkit.doctor import check_cache_dir


def test_doctor_passes_here_and_reports_every_check():
    res = CliRunner().invoke(app, ["doctor", "--json"])
    assert res.exit_code == 0, res.output
    checks = {c["name"]: c for c in json.loads(res.stdout[res.stdout.index("["):])}
    assert {"cache dir writable", "torch device", "torch.compile", "flex_attention",
            "model smollm2-135m-instruct loads", "model minilm-l6-v2 loads"} <= set(checks)
    assert all(c["ok"] for c in checks.values() if c["essential"])
    assert "135M parameters" in checks["model smollm2-135m-instruct loads"]["detail"]
    assert "384 dimensions" in checks["model minilm-l6-v2 loads"]["detail"]
    assert not any(checks[n]["essential"] for n in ("torch device", "torch.compile", "flex_attention"))
    assert checks["torch device"]["detail"].startswith(("cpu", "cuda"))
    from promptkit.engine.weights import default_format

    assert checks["weight format"]["detail"].startswith(f"default {default_format()} on this CPU (")


def test_unwritable_cache_dir_fails_with_a_fix(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("PROMPTKIT_CACHE", str(blocker / "cache"))
    c = check_cache_dir()
    assert not c.ok and c.essential
    assert "PROMPTKIT_CACHE" in c.fix and "cache" in c.detail


def test_doctor_exits_1_when_an_essential_check_fails(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("PROMPTKIT_CACHE", str(blocker / "cache"))
    res = CliRunner().invoke(app, ["doctor", "--quick"])
    assert res.exit_code == 1
    assert "fix:" in res.stdout and "cache dir writable" in res.stdout
    assert "torch.compile" not in res.stdout  # --quick skips compiling


def test_an_unknown_pinned_weight_format_fails_the_doctor(monkeypatch):
    from promptkit.doctor import check_weights

    monkeypatch.setenv("PROMPTKIT_WEIGHTS", "bogus")
    found = check_weights()
    assert not found.ok and found.essential and "int4+bf16" in found.fix
    monkeypatch.setenv("PROMPTKIT_WEIGHTS", "int8")
    assert check_weights().ok
