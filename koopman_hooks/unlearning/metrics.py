"""Unlearning metrics: forget/retain accuracy, SVC membership inference, linear-probe recall.

scikit-learn (the ``unlearning`` extra) is imported only by the functions that need it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from koopman_hooks.core.batches import BatchSpec
from koopman_hooks.core.capture import iter_captures
from koopman_hooks.core.hooks import preserved_state
from koopman_hooks.core.select import MODEL_OUTPUT, OutputSelector, Select
from koopman_hooks.unlearning.splits import ArrayLike, Classes, split_by_class

#: Most members (and as many non-members) the MIA's SVC is trained on.
MIA_MAX_PER_SIDE = 1500


def _sklearn() -> Any:
    try:
        import sklearn  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("unlearning metrics need scikit-learn: pip install 'koopman_hooks[unlearning]'") from err
    return sklearn


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    if len(labels) == 0:
        return float("nan")
    return (logits.argmax(dim=-1) == labels).float().mean().item()


def forget_retain_accuracy(logits: ArrayLike, labels: ArrayLike, forget_classes: Classes) -> tuple[float, float]:
    """Top-1 accuracy on the forget-class samples and on the rest (NaN for an empty subset)."""
    logits, labels = torch.as_tensor(logits), torch.as_tensor(labels).reshape(-1)
    forget, retain = split_by_class(labels, forget_classes)
    return _accuracy(logits[forget], labels[forget]), _accuracy(logits[retain], labels[retain])


def mia_features(logits: ArrayLike, labels: ArrayLike | None = None) -> np.ndarray:
    """Per-sample MIA feature, shape ``(n, 1)``: the softmax confidence.

    With labels it is the probability of the true label (SalUn's ``confidence`` attack, the
    one its MIA-efficacy reports); without, the maximum softmax probability (equal to it on
    correctly classified samples).
    """
    probs = torch.softmax(torch.as_tensor(logits).double(), dim=-1)
    if labels is None:
        conf = probs.max(dim=-1).values
    else:
        conf = probs.gather(1, torch.as_tensor(labels).long().reshape(-1, 1)).squeeze(1)
    return conf.reshape(-1, 1).numpy()


def mia_efficacy(
    retain_logits: ArrayLike,
    test_logits: ArrayLike,
    forget_logits: ArrayLike,
    seed: int = 0,
    *,
    retain_labels: ArrayLike | None = None,
    test_labels: ArrayLike | None = None,
    forget_labels: ArrayLike | None = None,
    max_per_side: int = MIA_MAX_PER_SIDE,
) -> float:
    """MIA-efficacy (SalUn, Fan et al. 2024; Jia et al. 2023): share of forget samples the attack calls non-members.

    An RBF ``SVC(C=3, gamma="auto")``, as in SalUn's code, is trained on :func:`mia_features`
    of retain samples (members, label 1) and test samples (non-members, label 0), both
    subsampled (``seed``) to the same size, at most ``max_per_side``; it then labels the
    forget samples. Higher means better forgetting. Pass all three label arrays for
    true-label confidence (the SalUn metric) or none for max-softmax confidence.
    """
    _sklearn()
    from sklearn.svm import SVC

    given = [lab is not None for lab in (retain_labels, test_labels, forget_labels)]
    if any(given) and not all(given):
        raise ValueError("pass all of retain_labels, test_labels, forget_labels, or none")
    members = mia_features(retain_logits, retain_labels)
    non_members = mia_features(test_logits, test_labels)
    target = mia_features(forget_logits, forget_labels)
    if min(len(members), len(non_members), len(target)) == 0:
        raise ValueError("mia_efficacy needs non-empty retain, test and forget logits")
    rng = np.random.default_rng(seed)
    size = min(len(members), len(non_members), max_per_side)
    members = members[rng.choice(len(members), size, replace=False)]
    non_members = non_members[rng.choice(len(non_members), size, replace=False)]
    attack = SVC(C=3, gamma="auto", kernel="rbf")
    attack.fit(np.concatenate([members, non_members]), np.r_[np.ones(size), np.zeros(size)])
    return float(1.0 - attack.predict(target).mean())


def probe_recall(
    features: ArrayLike, labels: ArrayLike, forget_class: int, seed: int = 0, test_fraction: float = 0.3
) -> float:
    """Held-out recall of class ``forget_class`` for a linear "is this class" probe.

    A balanced-class-weight logistic regression on standardised features is fit on a
    stratified train split and scored on the rest. High recall means the class is still
    linearly decodable from the representation (the "illusion of unlearning" check);
    chance level is about 0.5.
    """
    _sklearn()
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import recall_score
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = torch.as_tensor(features).reshape(len(features), -1).double().numpy()
    y = (torch.as_tensor(labels).reshape(-1) == forget_class).numpy().astype(int)
    if y.sum() < 2 or (1 - y).sum() < 2:
        raise ValueError(f"probe_recall needs at least 2 samples in and out of class {forget_class}")
    x_fit, x_test, y_fit, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    probe = make_pipeline(
        StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000, random_state=seed)
    )
    probe.fit(x_fit, y_fit)
    return float(recall_score(y_test, probe.predict(x_test), pos_label=1, zero_division=0))


def layer_batches(
    model: nn.Module, layer: str, loader: Iterable[Any], select: Select = None, hook_on: nn.Module | None = None,
    spec: BatchSpec = BatchSpec(),
) -> Iterator[tuple[torch.Tensor, torch.Tensor, Any]]:
    """Yield ``(features, labels, output)`` per labelled batch: ``layer``'s flattened output on
    the CPU and the model's output, in eval mode under ``no_grad`` (modes restored afterwards).
    For a wrapper around a shared model (a patched or LEACE-erased model), pass that model as
    ``hook_on``: ``layer`` is then read there, after the wrapper's own edit. ``spec`` splits
    the batches (dict batches go to the model as ``model(**inputs)``)."""
    selectors = {layer: OutputSelector(select, layer)}
    with preserved_state(model):
        for captured in iter_captures(model, selectors, loader, spec, hook_on=hook_on):
            if captured.labels is None:
                raise ValueError("unlearning metrics need labelled batches")
            features = captured.activations[layer]
            yield features.reshape(len(features), -1).float().cpu(), captured.labels.reshape(-1).cpu(), captured.output


def predict_with_features(
    model: nn.Module, layer: str, loader: Iterable[Any], select: Select = None, hook_on: nn.Module | None = None,
    spec: BatchSpec = BatchSpec(),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits ``(n, C)``, labels ``(n,)`` and ``layer``'s flattened features ``(n, d)`` in one pass
    (see :func:`layer_batches`)."""
    logits, labels, feats = [], [], []
    for f, y, out in layer_batches(model, layer, loader, select, hook_on, spec):
        logits.append(MODEL_OUTPUT.get(out).float().cpu())
        labels.append(y)
        feats.append(f)
    return torch.cat(logits), torch.cat(labels), torch.cat(feats)
