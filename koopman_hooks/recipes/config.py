"""Recipes are TOML files: data, model, training, probe and report sections."""

from __future__ import annotations

import ast
import copy
import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PACKAGED_RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def load_recipe(path: str | os.PathLike, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a recipe file (or a bare name from ``recipes/``) and apply ``key.sub=value`` overrides."""
    file = Path(path)
    if not file.exists() and not file.suffix and (PACKAGED_RECIPES / f"{path}.toml").exists():
        file = PACKAGED_RECIPES / f"{path}.toml"
    if not file.exists():
        raise FileNotFoundError(f"no recipe file {path!r}")
    with file.open("rb") as f:
        recipe = tomllib.load(f)
    recipe.setdefault("name", file.stem)
    for item in overrides:
        set_by_path(recipe, item)
    return recipe


def set_by_path(recipe: dict[str, Any], assignment: str) -> None:
    """Apply ``"probe.epochs=5"``; the value is a Python/TOML literal, else a string."""
    key, sep, raw = assignment.partition("=")
    if not sep:
        raise ValueError(f"override {assignment!r} is not of the form section.key=value")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = {"true": True, "false": False}.get(raw.lower(), raw)
    node = recipe
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {assignment!r}: {part!r} is not a section")
    node[parts[-1]] = value


def section(recipe: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A copy of one section (empty when absent)."""
    return copy.deepcopy(dict(recipe.get(name, {})))
