"""The ``[unlearning]`` section: Koopman edits next to the standard baselines.

For every forget class, each method yields a model-like module (the original, a patched model
routed through an edited surrogate, a retrained / fine-tuned / NegGrad+ model, or a
LEACE-wrapped model) and is scored the same way on the same data.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from koopman_hooks.core import distributed
from koopman_hooks.recipes.config import Recipe
from koopman_hooks.recipes.sections.base import RunContext
from koopman_hooks.recipes.timing import Stopwatch
from koopman_hooks.training import predict
from koopman_hooks.unlearning import (
    EditOptions,
    LatentGroupStatistics,
    class_subsets,
    finetune,
    forget_retain_accuracy,
    layer_batches,
    leace_erasure,
    mia_efficacy,
    neggrad_plus,
    predict_with_features,
    probe_recall,
    retrain,
)

ROW_FIGURES = (
    "test_forget_accuracy", "test_retain_accuracy", "train_forget_accuracy", "train_retain_accuracy",
    "mia_efficacy", "probe_recall", "seconds",
)
Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def score(
    module: nn.Module,
    feature_layer: str,
    context: RunContext,
    forget_class: int,
    train_eval: Iterable[Any],
    test_eval: Iterable[Any],
    hook_on: nn.Module | None = None,
    cache: dict[int, Outputs] | None = None,
) -> dict[str, Any]:
    """Accuracies on forget/retain splits, MIA efficacy and probe recall for one model-like module.

    ``feature_layer`` is read on ``hook_on`` (the shared model, for wrappers) or ``module``.
    ``cache`` (keyed by module identity) keeps a module's outputs for its next forget class.
    Batches are split as the probe splits them."""
    spec = context.probe.fetch_model().batch_spec
    if cache is not None and id(module) in cache:
        outputs = cache[id(module)]
    else:
        test_logits, test_labels, features = predict_with_features(module, feature_layer, test_eval, hook_on=hook_on,
                                                                   spec=spec)
        outputs = (*predict(module, train_eval, spec=spec), test_logits, test_labels, features)
        if cache is not None:
            cache[id(module)] = outputs
    train_logits, train_labels, test_logits, test_labels, features = outputs
    forget = train_labels == forget_class
    test_forget, test_retain = forget_retain_accuracy(test_logits, test_labels, forget_class)
    train_forget, train_retain = forget_retain_accuracy(train_logits, train_labels, forget_class)
    per_class = [
        (test_logits[test_labels == c].argmax(-1) == c).float().mean().item() for c in range(context.num_classes)
    ]
    return {
        "test_forget_accuracy": test_forget,
        "test_retain_accuracy": test_retain,
        "train_forget_accuracy": train_forget,
        "train_retain_accuracy": train_retain,
        "mia_efficacy": mia_efficacy(
            train_logits[~forget], test_logits, train_logits[forget], seed=context.seed,
            retain_labels=train_labels[~forget], test_labels=test_labels, forget_labels=train_labels[forget],
        ),
        "probe_recall": probe_recall(features.numpy(), test_labels.numpy(), forget_class, seed=context.seed),
        "per_class_test_accuracy": per_class,
    }


def _classes(value: str | Sequence[int], num_classes: int) -> list[int]:
    return list(range(num_classes)) if value == "all" else [int(c) for c in value]


def run_unlearning(context: RunContext) -> dict[str, Any]:
    """Rows ``{"method", "forget_class", <figures>, "seconds"}`` for every method and class."""
    cfg = context.recipe.unlearning
    assert cfg is not None
    train_cfg = context.recipe.train
    probe = context.probe
    last = probe.layers[-1]
    koopman_classes = _classes(cfg.classes, context.num_classes)
    baseline_classes = _classes(cfg.baseline_classes, context.num_classes)
    batch = cfg.batch_size or train_cfg.batch_size
    train_eval = context.loader(context.train_set, 1000, limit=cfg.eval_train_samples)
    test_eval = context.loader(context.test_set, 1000)
    stats_loader = None  # "fit_cache": the rows the fit kept, on every rank its own shard's
    if cfg.statistics_from == "data":
        stats_loader = context.loader(context.train_set, 1000, limit=cfg.stats_samples, shard=True)
    rows: list[dict[str, Any]] = []
    spec = probe.fetch_model().batch_spec
    original_outputs: dict[int, Outputs] = {}
    fit_seconds = probe.fit_seconds or 0.0
    clock = Stopwatch()  # where this section's time goes: each method's own work, and scoring every row

    def add(method: str, kind: str, c: int, module: nn.Module, seconds: float, hook_on: nn.Module | None = None,
            cache: dict[int, Outputs] | None = None, **extra: Any) -> None:
        with clock.part("scoring"):
            row = {"method": method, "kind": kind, "forget_class": c,
                   **score(module, last, context, c, train_eval, test_eval, hook_on, cache)}
        row.update(seconds=seconds, **extra)
        rows.append(row)

    # one pass over the data serves every single-class edit of a method's statistics
    statistics: dict[tuple[Any, ...], LatentGroupStatistics] = {}

    def stats_for(method: Any) -> LatentGroupStatistics:
        options = EditOptions.for_method(method, cfg.options)
        key = (options.redirect, options.metric, options.sample_rows)
        if key not in statistics:  # under torch.distributed every rank streams its shard
            with clock.part("koopman_statistics"):
                statistics[key] = probe.unlearning_statistics(stats_loader, method=method, **cfg.options)
        return statistics[key]

    for method in cfg.methods:
        stats_for(method)
    probe.release_cache()  # every statistic is collected: the fit's rows are not read again
    if not distributed.is_main():  # the edits and the baselines' scores are rank 0's
        return {"rows": [], "retrain_seconds_mean": None, "time": clock}

    for c in sorted(set(koopman_classes) | set(baseline_classes)):
        if c in koopman_classes:
            for method in cfg.methods:
                stats = stats_for(method)
                start = time.perf_counter()
                with clock.part("koopman_edits"):
                    edited = probe.unlearn(c, stats, method=method, **cfg.options)
                seconds = time.perf_counter() - start + stats.seconds  # as if the pass ran for this class alone
                add(f"koopman_{method}", "koopman", c, probe.patch(edited), seconds, hook_on=context.model,
                    edit_seconds=edited.info.get("edit_seconds"), fit_plus_edit_seconds=fit_seconds + seconds)
        if c not in baseline_classes:
            continue
        retain_set, forget_set = class_subsets(context.train_set, c)
        retain_loader = context.loader(retain_set, batch, shuffle=True)
        forget_loader = context.loader(forget_set, batch, shuffle=True)
        lr = train_cfg.lr
        for name in cfg.baselines:
            if name == "original":  # the same model for every class: its outputs are computed once
                add("original", "baseline", c, context.model, 0.0, cache=original_outputs)
            elif name == "retrain":
                with clock.part(name):
                    model, seconds = retrain(context.new_model, retain_loader, train_cfg.epochs, lr=lr,
                                             weight_decay=train_cfg.weight_decay, spec=spec,
                                             augment=train_cfg.augment(context.seed))
                add("retrain", "baseline", c, model, seconds)
            elif name == "finetune":
                with clock.part(name):
                    model, seconds = finetune(context.model, retain_loader, cfg.finetune_epochs,
                                              lr=cfg.finetune_lr or lr / 10, spec=spec,
                                              augment=train_cfg.augment(context.seed))
                add("finetune", "baseline", c, model, seconds)
            elif name == "neggrad_plus":
                with clock.part(name):
                    model, seconds = neggrad_plus(context.model, retain_loader, forget_loader, cfg.neggrad_epochs,
                                                  lr=cfg.neggrad_lr or lr / 10, alpha=cfg.neggrad_alpha, spec=spec,
                                                  augment=train_cfg.augment(context.seed))
                add("neggrad_plus", "baseline", c, model, seconds)
            else:  # leace_baseline
                with clock.part(name):
                    whole = context.loader(context.train_set, 1000, limit=cfg.stats_samples)  # every row, on rank 0
                    features = ((f, y) for f, y, _ in layer_batches(context.model, last, whole, spec=spec))
                    wrapped, seconds = leace_erasure(context.model, last, features, [c])
                add("leace_baseline", "baseline", c, wrapped, seconds, hook_on=context.model)
    return {"rows": rows, "retrain_seconds_mean": _mean_of(rows, "retrain", "seconds"), "time": clock}


def _mean_of(rows: list[dict[str, Any]], method: str, key: str) -> float | None:
    values = [r[key] for r in rows if r["method"] == method and r.get(key) is not None]
    return float(np.mean(values)) if values else None


# ----------------------------------------------------------------------------- report


def aggregate_unlearning(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean (and min/max over seeds) of every figure per (method, forget class), plus cost checks."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for run in runs:
        for row in run["rows"]:
            groups.setdefault((row["method"], row["forget_class"]), []).append(row)
    table = []
    for (method, c), rows in groups.items():
        entry: dict[str, Any] = {"method": method, "forget_class": c, "kind": rows[0]["kind"]}
        for key in (*ROW_FIGURES, "edit_seconds", "fit_plus_edit_seconds"):
            values = [r[key] for r in rows if r.get(key) is not None]
            if values:
                entry[key] = float(np.mean(values))
                if len(values) > 1:
                    entry[f"{key}_range"] = [float(min(values)), float(max(values))]
        entry["per_class_test_accuracy"] = np.mean([r["per_class_test_accuracy"] for r in rows], axis=0).tolist()
        table.append(entry)
    summary = _summary(table)
    return {"rows": table, "summary": summary}


def _summary(table: list[dict[str, Any]]) -> dict[str, Any]:
    """Per method: worst case over classes of each target's figure, relative to the references."""
    by = {(r["method"], r["forget_class"]): r for r in table}
    classes = sorted({r["forget_class"] for r in table})
    out: dict[str, Any] = {}
    for method in sorted({r["method"] for r in table}):
        rows = [by[(method, c)] for c in classes if (method, c) in by]
        entry: dict[str, Any] = {"classes": [r["forget_class"] for r in rows],
                                 "max_test_forget_accuracy": max(r["test_forget_accuracy"] for r in rows)}
        gaps: dict[str, list[float]] = {"original": [], "retrain": [], "probe": [], "mia": [], "cost": []}
        for r in rows:
            c = r["forget_class"]
            if ("original", c) in by:
                gaps["original"].append(abs(r["test_retain_accuracy"] - by[("original", c)]["test_retain_accuracy"]))
            if ("retrain", c) in by:
                ref = by[("retrain", c)]
                gaps["retrain"].append(abs(r["test_retain_accuracy"] - ref["test_retain_accuracy"]))
                gaps["probe"].append(r["probe_recall"] - ref["probe_recall"])
                gaps["mia"].append(abs(r["mia_efficacy"] - ref["mia_efficacy"]))
                if r.get("fit_plus_edit_seconds") is not None and ref["seconds"] > 0:
                    gaps["cost"].append(r["fit_plus_edit_seconds"] / ref["seconds"])
        names = {"original": "max_retain_gap_vs_original", "retrain": "max_retain_gap_vs_retrain",
                 "probe": "max_probe_recall_above_retrain", "mia": "max_mia_gap_vs_retrain",
                 "cost": "max_fit_plus_edit_over_retrain"}
        for key, values in gaps.items():
            if values:
                entry[names[key]] = float(max(values))
        if any(r.get("edit_seconds") is not None for r in rows):
            entry["max_edit_seconds"] = float(max(r.get("edit_seconds") or 0.0 for r in rows))
        out[method] = entry
    return out


def unlearning_markdown(unlearning: dict[str, Any]) -> list[str]:
    lines = [
        "## Unlearning",
        "",
        "Per forget class (means over seeds). Koopman methods edit only the latent dynamics and run the",
        "model through `probe.patch(edited)`; baselines change or wrap the model. MIA efficacy: SalUn",
        "convention (higher = more forgotten). Probe recall: logistic-regression recall of the class from",
        "the method's layers[-1] representation on test data (lower = less recoverable).",
        "",
        "| method | class | test forget | test retain | train forget | train retain | MIA eff. | probe recall | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(unlearning["rows"], key=lambda r: (r["forget_class"], r["kind"] != "baseline", r["method"])):
        lines.append(
            f"| {r['method']} | {r['forget_class']} | {r['test_forget_accuracy']:.4f} | {r['test_retain_accuracy']:.4f} | "
            f"{r['train_forget_accuracy']:.4f} | {r['train_retain_accuracy']:.4f} | {r['mia_efficacy']:.3f} | "
            f"{r['probe_recall']:.3f} | {r['seconds']:.2f} |"
        )
    lines += ["", "Worst case over classes, per method (gaps are absolute, in accuracy units):", "",
              "| method | max test-forget acc. | retain gap vs original | retain gap vs retrain | "
              "probe recall above retrain | MIA gap vs retrain | max edit s | (fit+edit)/retrain |",
              "|---|---|---|---|---|---|---|---|"]

    def f(v: Any, digits: int = 4) -> str:
        return "–" if v is None else f"{v:.{digits}f}"

    for method, s in unlearning["summary"].items():
        lines.append(
            f"| {method} | {f(s.get('max_test_forget_accuracy'))} | {f(s.get('max_retain_gap_vs_original'))} | "
            f"{f(s.get('max_retain_gap_vs_retrain'))} | {f(s.get('max_probe_recall_above_retrain'))} | "
            f"{f(s.get('max_mia_gap_vs_retrain'))} | {f(s.get('max_edit_seconds'), 3)} | {f(s.get('max_fit_plus_edit_over_retrain'), 3)} |"
        )
    lines.append("")
    return lines


def unlearning_figure(unlearning: dict[str, Any], out: Path) -> Path:
    """Per-class test accuracy before (original) and after each method, one panel per forget class."""
    import matplotlib.pyplot as plt

    rows = unlearning["rows"]
    classes = sorted({r["forget_class"] for r in rows})
    methods = sorted({r["method"] for r in rows}, key=lambda m: (m != "original", m))
    cols = min(len(classes), 5)
    n_rows = -(-len(classes) // cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(3.6 * cols, 2.8 * n_rows), squeeze=False)
    for ax, c in zip(axes.flat, classes):
        present = [m for m in methods if any(r["method"] == m and r["forget_class"] == c for r in rows)]
        width = 0.8 / max(len(present), 1)
        for i, method in enumerate(present):
            acc = next(r["per_class_test_accuracy"] for r in rows if r["method"] == method and r["forget_class"] == c)
            ax.bar(np.arange(len(acc)) + i * width - 0.4 + width / 2, acc, width, label=method)
        ax.set(title=f"forget class {c}", ylim=(0, 1.05), xlabel="class", ylabel="test accuracy")
        ax.set_xticks(range(len(acc)))
    for ax in list(axes.flat)[len(classes):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    path = out / "unlearning_per_class.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class Unlearning:
    """Every Koopman edit and baseline for every forget class; worst cases over classes."""

    name = "unlearning"

    def enabled(self, recipe: Recipe) -> bool:
        return recipe.unlearning is not None

    def run(self, context: RunContext) -> dict[str, Any]:
        result = run_unlearning(context)
        return {"unlearning": result, "time_parts": result.pop("time")}

    def aggregate(self, runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return {"unlearning": aggregate_unlearning([r["unlearning"] for r in runs])}

    def target_names(self, recipe: Recipe, layers: Sequence[str]) -> list[str]:
        cfg = recipe.unlearning
        assert cfg is not None
        figures = ("max_test_forget_accuracy", "max_retain_gap_vs_original", "max_retain_gap_vs_retrain",
                   "max_probe_recall_above_retrain", "max_mia_gap_vs_retrain")
        koopman = ("max_fit_plus_edit_over_retrain", "max_edit_seconds")
        names = [f"unlearning.summary.{method}.{f}" for method in cfg.baselines for f in figures]
        return names + [f"unlearning.summary.koopman_{method}.{f}" for method in cfg.methods for f in (*figures, *koopman)]

    def markdown(self, report: Mapping[str, Any]) -> list[str]:
        return unlearning_markdown(report["unlearning"])

    def figures(self, report: Mapping[str, Any], out: Path) -> dict[str, Path]:
        return {"unlearning": unlearning_figure(report["unlearning"], out)}
