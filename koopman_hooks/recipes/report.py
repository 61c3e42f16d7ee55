"""Aggregate per-seed results into ``report.json`` and ``report.md``."""

from __future__ import annotations

import json
import math
import operator
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from koopman_hooks import __version__

SUMMARY_SECTIONS = ("model", "surrogate", "linear_baseline")
_COMPARE = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


def _mean(values: Sequence[Any]) -> Any:
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
        return [_mean(list(column)) for column in zip(*present)]
    if isinstance(present[0], Mapping):
        return {k: _mean([p.get(k) for p in present]) for k in present[0]}
    return present[0]


def get_path(results: Mapping[str, Any], path: str) -> Any:
    node: Any = results
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _scalar_paths(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    paths = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            paths.append(path)
        elif isinstance(value, Mapping):
            paths.extend(_scalar_paths(value, path + "."))
    return paths


def build_report(recipe: Mapping[str, Any], runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds for every figure, with min/max/values under ``spread``."""
    from koopman_hooks.recipes.sections import AGGREGATORS

    report: dict[str, Any] = {"recipe": recipe.get("name"), "seeds": [r["seed"] for r in runs]}
    for name in SUMMARY_SECTIONS:
        report[name] = _mean([r[name] for r in runs])
    report["seconds"] = _mean([r["seconds"] for r in runs])
    spread = {}
    for name in (*SUMMARY_SECTIONS, "seconds"):
        tree = {name: runs[0][name]} if not isinstance(runs[0][name], Mapping) else {name: runs[0][name]}
        for path in _scalar_paths(tree):
            values = [get_path(r, path) for r in runs]
            if all(isinstance(v, (int, float)) for v in values):
                spread[path] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "values": values}
    report["spread"] = spread
    for name, aggregate in AGGREGATORS.items():
        if any(name in r for r in runs):
            report[name] = aggregate([r[name] for r in runs if name in r])
    report["targets"] = evaluate_targets(recipe.get("targets", {}), runs, report)
    report["environment"] = {
        "koopman_hooks": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "threads": torch.get_num_threads(),
    }
    report["plots"] = dict(runs[0].get("plots", {}))
    return report


def evaluate_targets(targets: Mapping[str, str], runs: Sequence[dict[str, Any]], report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Check ``{"surrogate.agreement": ">= 0.995", ...}`` on every seed (met only if all do)."""
    rows = []
    for path, rule in targets.items():
        op, _, threshold = rule.strip().partition(" ")
        if op not in _COMPARE:
            raise ValueError(f"target {path!r}: rule {rule!r} must start with one of {sorted(_COMPARE)}")
        limit = float(threshold)
        values = [get_path(r, path) for r in runs]
        if any(v is None for v in values):
            values = [get_path(report, path)]
        ok = all(v is not None and not (isinstance(v, float) and math.isnan(v)) and _COMPARE[op](v, limit) for v in values)
        rows.append({"figure": path, "target": rule, "values": values, "met": ok})
    return rows


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _with_spread(report: Mapping[str, Any], path: str) -> str:
    spread = report["spread"].get(path)
    value = get_path(report, path)
    if spread is None or len(spread["values"]) == 1:
        return _fmt(value)
    return f"{_fmt(spread['mean'])} [{_fmt(spread['min'])}, {_fmt(spread['max'])}]"


def render_markdown(report: Mapping[str, Any]) -> str:
    from koopman_hooks.recipes.sections import MARKDOWN

    seeds = report["seeds"]
    lines = [
        f"# koopman_hooks report: {report['recipe']}",
        "",
        f"Seeds: {seeds}. Figures are means over seeds, with [min, max] when there are several. "
        f"Held-out test data. koopman_hooks {report['environment']['koopman_hooks']}, torch {report['environment']['torch']}, "
        f"{report['environment']['threads']} threads.",
        "",
        "## Fidelity",
        "",
        "| | test accuracy | agreement with model | state FVU (layers[-1]) |",
        "|---|---|---|---|",
        f"| model | {_with_spread(report, 'model.test_accuracy')} | – | – |",
        f"| Koopman surrogate (patched) | {_with_spread(report, 'surrogate.test_accuracy')} | "
        f"{_with_spread(report, 'surrogate.agreement')} | {_with_spread(report, 'surrogate.state_fvu')} |",
        f"| linear baseline (DMD, no lifting) | {_with_spread(report, 'linear_baseline.test_accuracy')} | "
        f"{_with_spread(report, 'linear_baseline.agreement')} | {_with_spread(report, 'linear_baseline.state_fvu')} |",
        "",
        f"Latent FVU: {_with_spread(report, 'surrogate.latent_fvu')}. "
        f"Probe fit: {_with_spread(report, 'surrogate.fit_seconds')} s, peak RSS {_with_spread(report, 'surrogate.peak_rss_mb')} MB. "
        f"Model training: {_with_spread(report, 'model.train_seconds')} s. Whole run per seed: {_with_spread(report, 'seconds')} s.",
        "",
        "Per-class test accuracy (model / surrogate): "
        + ", ".join(
            f"{c}: {_fmt(m, 3)} / {_fmt(s, 3)}"
            for c, (m, s) in enumerate(zip(report["model"]["per_class_accuracy"], report["surrogate"]["per_class_accuracy"]))
        ),
        "",
    ]
    per_layer = report["surrogate"].get("state_fvu_per_layer") or {}
    if len(per_layer) > 1:
        lines += ["State FVU per probed layer: " + ", ".join(f"`{k}` {_fmt(v)}" for k, v in per_layer.items()), ""]
    if report["targets"]:
        lines += ["## Targets", "", "| figure | target | value(s) | met |", "|---|---|---|---|"]
        for row in report["targets"]:
            values = ", ".join(_fmt(v) for v in row["values"])
            lines.append(f"| `{row['figure']}` | {row['target']} | {values} | {'yes' if row['met'] else '**no**'} |")
        lines.append("")
    for name, render in MARKDOWN.items():
        if name in report:
            lines += render(report[name])
    if report.get("plots"):
        lines += ["## Plots", ""]
        lines += [f"![{name}]({path})" for name, path in report["plots"].items()]
        lines.append("")
    return "\n".join(lines)


def write_report(report: dict[str, Any], runs: Sequence[Mapping[str, Any]], out: Path) -> None:
    """Write ``report.json``, ``report.md``, section figures and the raw ``runs.json`` into ``out``."""
    from koopman_hooks.recipes.sections import FIGURES

    out.mkdir(parents=True, exist_ok=True)
    for name, draw in FIGURES.items():
        if name in report:
            report["plots"][name] = str(draw(report[name], out).relative_to(out))
    (out / "report.json").write_text(json.dumps(report, indent=2, default=_json_default))
    (out / "runs.json").write_text(json.dumps(list(runs), indent=2, default=_json_default))
    (out / "report.md").write_text(render_markdown(report))


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
