"""Aggregate per-seed results into ``report.json`` and ``report.md``."""

from __future__ import annotations

import json
import math
import operator
import platform
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from koopman_hooks._version import __version__
from koopman_hooks.core import distributed
from koopman_hooks.recipes.config import Recipe, parse_target
from koopman_hooks.recipes.sections import SECTIONS
from koopman_hooks.recipes.summary import fmt, get_path, mean

_COMPARE: dict[str, Callable[[Any, Any], bool]] = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


def build_report(recipe: Recipe, runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Every enabled section's aggregate over seeds, the targets checked, and the environment."""
    report: dict[str, Any] = {"recipe": recipe.name, "seeds": [r["seed"] for r in runs]}
    report["seconds"] = mean([r["seconds"] for r in runs])
    for section in SECTIONS:
        if section.enabled(recipe):
            report.update(section.aggregate(runs))
    report["targets"] = evaluate_targets(recipe.targets, runs, report)
    report["environment"] = {
        "koopman_hooks": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "threads": torch.get_num_threads(), "world_size": distributed.world_size(),
    }
    report["plots"] = dict(runs[0].get("plots", {}))
    return report


def evaluate_targets(targets: Mapping[str, str], runs: Sequence[Mapping[str, Any]], report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Check ``{"surrogate.agreement": ">= 0.995", ...}`` on every seed (met only if all do);
    figures only the report has (aggregates over seeds) are checked there."""
    rows = []
    for path, rule in targets.items():
        op, limit = parse_target(path, rule)
        values = [get_path(r, path) for r in runs]
        if any(v is None for v in values):
            values = [get_path(report, path)]
        ok = all(isinstance(v, (int, float)) and not math.isnan(v) and _COMPARE[op](v, limit) for v in values)
        rows.append({"figure": path, "target": rule, "values": values, "met": ok})
    return rows


def render_markdown(recipe: Recipe, report: Mapping[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"# koopman_hooks report: {report['recipe']}",
        "",
        f"Seeds: {report['seeds']}. Figures are means over seeds, with [min, max] when there are several. "
        f"Held-out test data. koopman_hooks {env['koopman_hooks']}, torch {env['torch']}, {env['threads']} threads.",
        "",
    ]
    enabled = [s for s in SECTIONS if s.enabled(recipe)]
    lines += enabled[0].markdown(report)  # fidelity first, then the targets
    if report["targets"]:
        lines += ["## Targets", "", "| figure | target | value(s) | met |", "|---|---|---|---|"]
        for row in report["targets"]:
            values = ", ".join(fmt(v) for v in row["values"])
            lines.append(f"| `{row['figure']}` | {row['target']} | {values} | {'yes' if row['met'] else '**no**'} |")
        lines.append("")
    for section in enabled[1:]:
        lines += section.markdown(report)
    if report.get("plots"):
        lines += ["## Plots", ""]
        lines += [f"![{name}]({path})" for name, path in report["plots"].items()]
        lines.append("")
    return "\n".join(lines)


def write_report(recipe: Recipe, report: dict[str, Any], runs: Sequence[Mapping[str, Any]], out: Path) -> None:
    """Write ``report.json``, ``report.md``, section figures and the raw ``runs.json`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for section in SECTIONS:
        if section.enabled(recipe):
            for name, path in section.figures(report, out).items():
                report["plots"][name] = str(path.relative_to(out))
    (out / "report.json").write_text(json.dumps(report, indent=2, default=_json_default))
    (out / "runs.json").write_text(json.dumps(list(runs), indent=2, default=_json_default))
    (out / "report.md").write_text(render_markdown(recipe, report))


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
