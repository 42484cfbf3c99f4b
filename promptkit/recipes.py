"""Recipe files: YAML (or JSON) that names stages and their settings.

    name: rag-qa
    stages:
      - stage: bm25
        corpus: ./docs          # paths starting with ./ or ../ are relative to the recipe
        k: 3
      - stage: prompt
        instruction: Answer from the context.
      - stage: generate
        max_tokens: 48

Every stage's settings are validated by its pydantic model; errors name the
stage, the field and what is allowed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .pipeline import Pipeline, Stage
from .registry import get_stage_class, stage_names


class RecipeError(ValueError):
    """A recipe file that cannot be turned into a pipeline."""


class Recipe(BaseModel):
    """The top level of a recipe file."""

    model_config = ConfigDict(extra="forbid")
    name: str = "pipeline"
    description: str = ""
    input_key: str = "question"
    stages: list[dict[str, Any]] = Field(min_length=1)


def _resolve_paths(settings: dict[str, Any], base: Path) -> dict[str, Any]:
    def fix(v: Any) -> Any:
        if isinstance(v, str) and (v.startswith("./") or v.startswith("../")):
            return str((base / v).resolve())
        if isinstance(v, list):
            return [fix(x) for x in v]
        return v

    return {k: fix(v) for k, v in settings.items()}


def _format_errors(where: str, err: ValidationError, cls: type[Stage]) -> str:
    lines = [f"{where}: invalid settings"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(stage)"
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(n for n in cls.model_fields)
            lines.append(f"  - unknown field {field!r}; allowed fields: {allowed}")
        else:
            lines.append(f"  - {field}: {e['msg']}")
    return "\n".join(lines)


def _check_keys(data: dict[Any, Any], where: str) -> None:
    # YAML reads `on:`, `yes:` or `1:` as a bool or a number, never a field name (a CI file, say).
    odd = [k for k in data if not isinstance(k, str)]
    if odd:
        raise RecipeError(f"{where}: keys must be field names, got {', '.join(repr(k) for k in odd)} "
                          "(YAML reads on/off/yes/no as booleans)")


def build_stage(settings: dict[str, Any], where: str = "stage") -> Stage:
    """Build one stage from ``{'stage': name, **settings}``."""
    if not isinstance(settings, dict) or "stage" not in settings:
        raise RecipeError(f"{where}: each stage needs a 'stage' key naming one of: {', '.join(stage_names())}")
    _check_keys(settings, where)
    settings = dict(settings)
    name = settings.pop("stage")
    try:
        cls = get_stage_class(str(name))
    except KeyError as e:
        raise RecipeError(f"{where}: {e.args[0]}") from None
    try:
        return cls(**settings)
    except ValidationError as e:
        raise RecipeError(_format_errors(f"{where} ({name})", e, cls)) from None


def recipe_from_dict(data: Any, base: Path = Path(".")) -> Pipeline:
    """Validate a parsed recipe and build its pipeline."""
    if not isinstance(data, dict):
        raise RecipeError("a recipe must be a mapping with a 'stages' list")
    _check_keys(data, "not a promptkit recipe (a mapping with a 'stages' list)")
    try:
        recipe = Recipe(**data)
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            field = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                msgs.append(f"unknown top-level field {field!r}; allowed: {', '.join(Recipe.model_fields)}")
            else:
                msgs.append(f"{field}: {err['msg']}")
        raise RecipeError("invalid recipe: " + "; ".join(msgs)) from None
    stages = [
        build_stage(_resolve_paths(s, base) if isinstance(s, dict) else s, where=f"stages[{i}]")
        for i, s in enumerate(recipe.stages)
    ]
    return Pipeline(*stages, name=recipe.name, input_key=recipe.input_key)


def load_recipe(path: str | Path) -> Pipeline:
    """Read a recipe file (``.yaml``/``.yml``/``.json``) and build its pipeline."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"{path} is not UTF-8 text") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise RecipeError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from None
    return recipe_from_dict(data, base=path.parent)
