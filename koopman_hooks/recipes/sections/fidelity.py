"""The fidelity section (always on): the model, the patched surrogate and the linear baseline."""

from __future__ import annotations

import resource
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from koopman_hooks.recipes.config import Recipe
from koopman_hooks.recipes.plots import seed_plots
from koopman_hooks.recipes.sections.base import RunContext
from koopman_hooks.recipes.summary import fmt, mean, spread, with_spread

SUMMARY_KEYS = ("model", "surrogate", "linear_baseline")
#: the scalar figures of each summary key that targets may name
TARGET_FIGURES = {
    "model": ("test_accuracy", "train_seconds"),
    "surrogate": ("test_accuracy", "agreement", "mixed_agreement", "strict_mixed_gap", "accuracy_drop", "state_fvu",
                  "latent_fvu", "fit_seconds", "peak_rss_mb", "latent_dim", "width", "surrogate_macs", "replaced_macs"),
    "linear_baseline": ("test_accuracy", "agreement", "state_fvu"),
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def honesty_lines(report: Mapping[str, Any]) -> list[str]:
    """The reductions used, and a flag whenever a lossy one lets the real forward pass reach the
    output (its strict and mixed figures differ, or its ignored part moves the output)."""
    surrogate = report["surrogate"]
    reduce = surrogate.get("reduce") or {}
    lines = ["Reductions: " + ", ".join(f"`{k}` {v}" for k, v in reduce.items()) + ". Agreement is strict: what a "
             "lossy reduction ignores at the last layer is its training mean, never the real forward pass's.", ""]
    runs = report.get("per_seed_honesty") or []
    flagged = [r for r in runs if r.get("lossy_reduction_reaches_output") or (r.get("strict_mixed_gap") or 0.0) != 0.0]
    if flagged:
        gaps = ", ".join(f"seed {r['seed']}: strict {fmt(r['agreement'])} vs mixed {fmt(r['mixed_agreement'])}" for r in flagged)
        lines += [f"**Flag: the part the last layer's reduction ignores reaches the model's output** ({gaps}). "
                  "The mixed figure copies that part from the real forward pass and flatters the surrogate; only the "
                  "strict agreement above is the surrogate's.", ""]
    return lines


def _per_class_list(per_class: Mapping[int, float], num_classes: int) -> list[float | None]:
    return [per_class.get(c) for c in range(num_classes)]


class Fidelity:
    """Accuracy, agreement and FVU of the fitted probe on the test set, and the seed's plots."""

    name = "fidelity"

    def enabled(self, recipe: Recipe) -> bool:
        return True

    def run(self, context: RunContext) -> dict[str, Any]:
        probe, k = context.probe, context.num_classes
        test_loader = context.loader(context.test_set, 1000, shard=True)
        metrics = probe.evaluate(test_loader)
        fitted = probe.fetch_model()
        results: dict[str, Any] = {
            "model": {
                "test_accuracy": metrics["model_accuracy"],
                "per_class_accuracy": _per_class_list(metrics["model_per_class_accuracy"], k),
                "train_seconds": context.train_seconds,
                "train_loss": context.train_loss,
            },
            "surrogate": {
                "test_accuracy": metrics["surrogate_accuracy"],
                "agreement": metrics["agreement"],
                "mixed_agreement": metrics["mixed_agreement"],
                "strict_mixed_gap": abs(metrics["mixed_agreement"] - metrics["agreement"]),
                "lossy_reduction_reaches_output": metrics["lossy_reduction_reaches_output"],
                "reduce": dict(fitted.info.get("reduce") or {name: a.reduce for name, a in fitted.adapters.items()}),
                "accuracy_drop": metrics["model_accuracy"] - metrics["surrogate_accuracy"],
                "per_class_accuracy": _per_class_list(metrics["surrogate_per_class_accuracy"], k),
                "state_fvu": metrics["state_fvu"],
                "state_fvu_per_layer": metrics["state_fvu_per_layer"],
                "latent_fvu": metrics["latent_fvu"],
                "latent_fvu_per_layer": metrics["latent_fvu_per_layer"],
                "fit_seconds": fitted.fit_seconds,
                "peak_rss_mb": context.results.get("peak_rss_mb", peak_rss_mb()),
                "layers": fitted.layers,
                "steps": list(fitted.autoencoder.config.segment_steps),
                "latent_dim": fitted.autoencoder.config.latent_dim,
                "width": fitted.autoencoder.config.width,
                "hidden": list(fitted.autoencoder.config.hidden),
                "surrogate_macs": None if fitted.sizes is None else fitted.sizes.surrogate_macs,
                "replaced_macs": None if fitted.sizes is None else fitted.sizes.replaced_macs,
                "fit": fitted.info,
                "operator": fitted.config.operator,
            },
            "linear_baseline": {
                "test_accuracy": metrics["linear_baseline"]["accuracy"],
                "agreement": metrics["linear_baseline"]["agreement"],
                "state_fvu": metrics["linear_baseline"]["state_fvu"],
            },
            "history": fitted.history,
        }
        paths = seed_plots(context, results["model"]["train_loss"], test_loader)  # drawn by rank 0
        results["plots"] = {key: str(Path(p).relative_to(context.out_dir.parent)) for key, p in paths.items()}
        return results

    def aggregate(self, runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        report = {key: mean([r[key] for r in runs]) for key in SUMMARY_KEYS}
        report["spread"] = spread(runs, (*SUMMARY_KEYS, "seconds"))
        report["per_seed_honesty"] = [
            {"seed": r["seed"], **{k: r["surrogate"].get(k) for k in ("agreement", "mixed_agreement", "strict_mixed_gap",
                                                                      "lossy_reduction_reaches_output")}}
            for r in runs]
        # what each seed's fit chose and why (texts, kept epochs): listed per seed, never averaged
        report["surrogate"]["fit"] = [{"seed": r["seed"], **r["surrogate"]["fit"]} for r in runs]
        report["surrogate"]["lossy_reduction_reaches_output"] = any(
            bool(h["lossy_reduction_reaches_output"]) or (h["strict_mixed_gap"] or 0.0) != 0.0
            for h in report["per_seed_honesty"])
        return report

    def target_names(self, recipe: Recipe, layers: Sequence[str]) -> list[str]:
        names = [f"{key}.{figure}" for key, figures in TARGET_FIGURES.items() for figure in figures]
        return names + [f"surrogate.{kind}_fvu_per_layer.{layer}" for kind in ("state", "latent") for layer in layers[1:]]

    def markdown(self, report: Mapping[str, Any]) -> list[str]:
        surrogate = report["surrogate"]
        lines = [
            "## Fidelity",
            "",
            "| | test accuracy | agreement with model | state FVU (layers[-1]) |",
            "|---|---|---|---|",
            f"| model | {with_spread(report, 'model.test_accuracy')} | – | – |",
            f"| Koopman surrogate (patched) | {with_spread(report, 'surrogate.test_accuracy')} | "
            f"{with_spread(report, 'surrogate.agreement')} | {with_spread(report, 'surrogate.state_fvu')} |",
            f"| linear baseline (DMD, no lifting) | {with_spread(report, 'linear_baseline.test_accuracy')} | "
            f"{with_spread(report, 'linear_baseline.agreement')} | {with_spread(report, 'linear_baseline.state_fvu')} |",
            "",
            f"Latent FVU: {with_spread(report, 'surrogate.latent_fvu')}. "
            f"Probe fit: {with_spread(report, 'surrogate.fit_seconds')} s, peak RSS {with_spread(report, 'surrogate.peak_rss_mb')} MB. "
            f"Model training: {with_spread(report, 'model.train_seconds')} s. Whole run per seed: {with_spread(report, 'seconds')} s "
            "(split under Wall time).",
            "",
            "Per-class test accuracy (model / surrogate): "
            + ", ".join(
                f"{c}: {fmt(m, 3)} / {fmt(s, 3)}"
                for c, (m, s) in enumerate(zip(report["model"]["per_class_accuracy"], surrogate["per_class_accuracy"]))
            ),
            "",
        ]
        state = surrogate.get("state_fvu_per_layer") or {}
        latent = surrogate.get("latent_fvu_per_layer") or {}
        if state or latent:
            lines += ["Per probed layer, on the test set: state FVU (`ψ(K^k φ(a_0))` decoded into the layer, against "
                      "the layer's adapted state) and latent FVU (`K^k φ(a_0)` against `φ(a_layer)`: how linear the "
                      "latent dynamics really are).", "",
                      "| layer | state FVU | latent FVU |", "|---|---|---|"]
            for name in dict.fromkeys([*state, *latent]):
                lines.append(f"| `{name}` | {with_spread(report, f'surrogate.state_fvu_per_layer.{name}')} | "
                             f"{with_spread(report, f'surrogate.latent_fvu_per_layer.{name}')} |")
            lines.append("")
        return lines + honesty_lines(report)

    def figures(self, report: Mapping[str, Any], out: Path) -> dict[str, Path]:
        return {}
