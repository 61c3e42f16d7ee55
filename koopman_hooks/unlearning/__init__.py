"""Class unlearning: Koopman edits of the latent linear dynamics, the standard baselines, metrics."""

from typing import Any

from koopman_hooks.unlearning.baselines import finetune, neggrad_plus, retrain
from koopman_hooks.unlearning.edit import unlearn, unlearning_statistics
from koopman_hooks.unlearning.metrics import (
    forget_retain_accuracy,
    layer_batches,
    mia_efficacy,
    mia_features,
    predict_with_features,
    probe_recall,
)
from koopman_hooks.unlearning.options import EditOptions
from koopman_hooks.unlearning.per_step import per_step_operator
from koopman_hooks.unlearning.redirect import redirect_map
from koopman_hooks.unlearning.splits import class_loaders, class_subsets, dataset_targets, split_by_class
from koopman_hooks.unlearning.statistics import LatentGroupStatistics, collect_statistics

_LEACE = ("LeaceErasedModel", "LeaceFitter", "fit_leace", "latent_leace_map", "leace_erasure")


def __getattr__(name: str) -> Any:
    """The LEACE names, imported on first use (they need the optional ``concept-erasure``)."""
    if name in _LEACE:
        from koopman_hooks.unlearning import leace

        return getattr(leace, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EditOptions",
    "LatentGroupStatistics",
    "LeaceErasedModel",
    "LeaceFitter",
    "class_loaders",
    "class_subsets",
    "collect_statistics",
    "dataset_targets",
    "finetune",
    "fit_leace",
    "forget_retain_accuracy",
    "latent_leace_map",
    "layer_batches",
    "leace_erasure",
    "mia_efficacy",
    "mia_features",
    "neggrad_plus",
    "per_step_operator",
    "predict_with_features",
    "probe_recall",
    "redirect_map",
    "retrain",
    "split_by_class",
    "unlearn",
    "unlearning_statistics",
]
