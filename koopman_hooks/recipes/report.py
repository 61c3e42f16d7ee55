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
    for key in ("wall_time", "cpu_time"):
        if all(key in r for r in runs):
            report[key] = mean([r[key] for r in runs])
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
    if report.get("wall_time"):
        lines += wall_time_markdown(report["wall_time"], report.get("cpu_time") or {})
    if report.get("plots"):
        lines += ["## Plots", ""]
        lines += [f"![{name}]({path})" for name, path in report["plots"].items()]
        lines.append("")
    return "\n".join(lines)


# the parts of a seed's run, in run order
_WALL_PARTS = {
    "setup": "setup (data, model, saving it)",
    "model_training": "model training (`[train]`)",
    "probe_fit": "probe fit (model passes, closed-form start, epochs)",
    "fidelity": "fidelity (test evaluation, plots)",
    "topology": "topology",
    "unlearning": "unlearning",
}
_SUB_PARTS = {
    "koopman_statistics": "Koopman statistics pass (shared by all classes)",
    "koopman_edits": "Koopman edits",
    "retrain": "retrain",
    "finetune": "fine-tune",
    "neggrad_plus": "NegGrad+",
    "leace_baseline": "LEACE baseline",
    "original": "original",
    "scoring": "scoring every row (accuracies, MIA, probe recall)",
}


def wall_time_markdown(wall: Mapping[str, Any], cpu: Mapping[str, Any]) -> list[str]:
    """Where a seed's time goes (means over seeds): wall seconds, their share, and CPU seconds."""
    total = wall.get("total") or 0.0

    def row(label: str, key: str, parts: str | None = None) -> str:
        seconds = (wall.get(parts) or {}).get(key) if parts else wall.get(key)
        used = (cpu.get(parts) or {}).get(key) if parts else cpu.get(key)
        share = f"{100 * seconds / total:.1f}%" if seconds is not None and total else "–"
        return f"| {label} | {fmt(seconds, 1)} | {share} | {fmt(used, 1)} |"

    lines = ["## Wall time", "",
             "Per seed (means over seeds). CPU seconds are this process's own; where the wall time is larger, other "
             "processes on the machine took the difference.", "",
             "| part | wall s | share | CPU s |", "|---|---|---|---|"]
    for key, label in _WALL_PARTS.items():
        if wall.get(key) is None:
            continue
        lines.append(row(label, key))
        for part in wall.get(f"{key}_parts") or {}:
            lines.append(row(f"&nbsp;&nbsp;↳ {_SUB_PARTS.get(part, part)}", part, f"{key}_parts"))
    counted = sum(wall.get(key) or 0.0 for key in _WALL_PARTS)
    used = sum(cpu.get(key) or 0.0 for key in _WALL_PARTS)
    other_wall, other_cpu = max(total - counted, 0.0), max((cpu.get("total") or 0.0) - used, 0.0)
    lines += [f"| other | {fmt(other_wall, 1)} | {100 * other_wall / total if total else 0:.1f}% | {fmt(other_cpu, 1)} |",
              row("**whole run**", "total"), ""]
    return lines


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
