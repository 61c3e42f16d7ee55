"""Class unlearning: metrics (accuracy split, MIA efficacy, probe recall) and baselines."""

from koopman_hooks.unlearning.baselines import (
    LeaceErasedModel,
    LeaceEraser,
    LeaceStatistics,
    class_loaders,
    class_subsets,
    dataset_targets,
    finetune,
    fit_leace,
    leace_erasure,
    neggrad_plus,
    retrain,
)
from koopman_hooks.unlearning.metrics import (
    collect_features,
    forget_retain_accuracy,
    layer_batches,
    mia_efficacy,
    mia_features,
    predict_with_features,
    probe_recall,
    split_by_class,
)

__all__ = [
    "LeaceErasedModel",
    "LeaceEraser",
    "LeaceStatistics",
    "class_loaders",
    "class_subsets",
    "collect_features",
    "dataset_targets",
    "finetune",
    "fit_leace",
    "forget_retain_accuracy",
    "layer_batches",
    "leace_erasure",
    "mia_efficacy",
    "mia_features",
    "neggrad_plus",
    "predict_with_features",
    "probe_recall",
    "retrain",
    "split_by_class",
]

# Unlearning by editing the surrogate's latent linear dynamics (the model is never changed).
from koopman_hooks.unlearning.edits import (  # noqa: E402
    LatentGroupStatistics,
    latent_statistics,
    leace_map,
    per_step_operator,
    redirect_map,
    unlearn,
)

__all__ += [
    "LatentGroupStatistics",
    "latent_statistics",
    "leace_map",
    "per_step_operator",
    "redirect_map",
    "unlearn",
]
