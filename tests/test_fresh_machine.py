"""A machine where nothing was compiled before: commands answer and exit 0, whatever is still compiling.

Each test runs a real process on the embedded model in its default weight format, with an empty
TorchInductor cache and an empty cache of decode graphs (the converted model is shared, so the
tests do not spend a minute converting it again).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from promptkit.models import cache_dir

pytestmark = pytest.mark.slow


@pytest.fixture
def fresh_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a fresh machine that has run set-up's conversion, but compiled nothing."""
    cache = tmp_path / "promptkit-cache"
    cache.mkdir()
    for entry in cache_dir().iterdir():
        if entry.name != "graphs":
            (cache / entry.name).symlink_to(entry)
    (tmp_path / "inductor").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PROMPTKIT_WEIGHTS", "PROMPTKIT_COMPILE_DECODE")}
    env.update(PROMPTKIT_CACHE=str(cache), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    return env


def promptkit_bin() -> str:
    return str(Path(sys.executable).with_name("promptkit"))


def test_ask_answers_and_exits_0_with_nothing_compiled(fresh_env):
    done = subprocess.run([promptkit_bin(), "ask", "What is the capital of France?"], env=fresh_env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Paris" in done.stdout
    # A one-shot command starts no compile it would not live to use.
    assert not list(Path(fresh_env["PROMPTKIT_CACHE"], "graphs").glob("*.so"))


def test_a_script_exits_0_while_its_graph_builds_and_its_engine_decodes(fresh_env):
    # "auto" starts the background build; the script ends while the child compiles and while the
    # engine's loop is in the middle of a long generation that nobody waits for.
    script = textwrap.dedent("""
        import threading
        from promptkit import LM
        lm = LM()
        print(lm.generate("What is the capital of France?", max_tokens=16)[0].text)
        assert lm.stats()["compiled_decode"] == "building", lm.stats()["compiled_decode"]
        threading.Thread(target=lambda: lm.generate("Tell me a long story.", max_tokens=400), daemon=True).start()
        import time; time.sleep(1.0)
    """)
    done = subprocess.run([sys.executable, "-c", script], env=fresh_env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Paris" in done.stdout
    assert "terminate called" not in done.stderr
    # The build ended with the process: no child is left compiling for nobody.
    left = subprocess.run(["pgrep", "-f", fresh_env["PROMPTKIT_CACHE"]], capture_output=True, text=True)
    assert left.stdout.strip() == ""
