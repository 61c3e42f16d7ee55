"""Helpers to summarise per-seed results: means, spreads, dotted paths, number formatting."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def mean(values: Sequence[Any]) -> Any:
    """Mean over seeds of numbers, lists (element-wise) and dicts (key-wise); else the first."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    if isinstance(present[0], bool):
        return all(present)
    if isinstance(present[0], (int, float)):
        if all(v == present[0] for v in present):
            return present[0]
        return float(sum(present) / len(present))
    if isinstance(present[0], list):
        return [mean(list(column)) for column in zip(*present)]
    if isinstance(present[0], Mapping):
        return {k: mean([p.get(k) for p in present]) for k in present[0]}
    return present[0]


def get_path(tree: Any, path: str) -> Any:
    """The value at a dotted ``path``; keys that contain dots themselves (``"blocks.1"``) are
    matched whole, longest first (``surrogate.state_fvu_per_layer.blocks.1``)."""
    if path == "":
        return tree
    if not isinstance(tree, Mapping):
        return None
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        key = ".".join(parts[:cut])
        if key in tree:
            found = get_path(tree[key], ".".join(parts[cut:]))
            if found is not None:
                return found
    return None


def scalar_paths(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of every number in a nested dict (booleans excluded)."""
    paths = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            paths.append(path)
        elif isinstance(value, Mapping):
            paths.extend(scalar_paths(value, path + "."))
    return paths


def spread(runs: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{path: {"mean", "min", "max", "values"}}`` over seeds for every number under ``keys``."""
    out = {}
    for key in keys:
        for path in scalar_paths({key: runs[0][key]}):
            values = [get_path(r, path) for r in runs]
            if all(isinstance(v, (int, float)) for v in values):
                out[path] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "values": values}
    return out


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def with_spread(report: Mapping[str, Any], path: str) -> str:
    """``mean [min, max]`` over seeds, or the value alone for one seed."""
    entry = report.get("spread", {}).get(path)
    value = get_path(report, path)
    if entry is None or len(entry["values"]) == 1:
        return fmt(value)
    return f"{fmt(entry['mean'])} [{fmt(entry['min'])}, {fmt(entry['max'])}]"
