"""Unlearning metrics: forget/retain accuracy, SVC membership inference, linear-probe recall.

scikit-learn (the ``unlearning`` extra) is imported only by the functions that need it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from koopman_hooks.batches import call_model, move_inputs, split_batch

ArrayLike = torch.Tensor | np.ndarray | Sequence[int]
Classes = int | Iterable[int]

#: Most members (and as many non-members) the MIA's SVC is trained on.
MIA_MAX_PER_SIDE = 1500


def _sklearn() -> Any:
    try:
        import sklearn  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("unlearning metrics need scikit-learn: pip install 'koopman_hooks[unlearning]'") from err
    return sklearn


def class_list(classes: Classes) -> list[int]:
    """``forget_classes`` as a list of ints (a single int is one class)."""
    if isinstance(classes, (int, np.integer)):
        return [int(classes)]
    out = [int(c) for c in classes]
    if not out:
        raise ValueError("forget_classes is empty")
    return out


def split_by_class(labels: ArrayLike, forget_classes: Classes) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks ``(forget_mask, retain_mask)`` over ``labels``."""
    labels = torch.as_tensor(labels).reshape(-1)
    forget = torch.isin(labels, torch.tensor(class_list(forget_classes), dtype=labels.dtype))
    return forget, ~forget


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


def resolve_module(model: nn.Module, module: str | nn.Module) -> nn.Module:
    """``model``'s submodule called ``module`` (``""`` is the model), or ``module`` itself."""
    if isinstance(module, nn.Module):
        return module
    modules = dict(model.named_modules())
    if module not in modules:
        raise KeyError(f"no module {module!r} in the model; some names: {list(modules)[:12]}")
    return modules[module]


def first_tensor(output: Any) -> torch.Tensor:
    """A module's output tensor: the output itself, or the first tensor of a tuple/list."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    raise TypeError(f"cannot find a tensor in a module output of type {type(output).__name__}")


@contextmanager
def _captured(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record ``module``'s output tensors in a list while the context is open."""
    store: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: store.append(first_tensor(out).detach()))
    try:
        yield store
    finally:
        handle.remove()


def _layer_and_output_batches(
    model: nn.Module, module: str | nn.Module, loader: Iterable, device: str | torch.device, caller: str
) -> Iterator[tuple[torch.Tensor, torch.Tensor, Any]]:
    """Yield ``(features, labels, output)`` per batch, in eval mode under ``no_grad``; the hook
    is removed and the mode restored when the iteration ends or is closed."""
    target = resolve_module(model, module)
    was_training = model.training
    model.eval()
    try:
        with _captured(target) as store, torch.no_grad():
            for batch in loader:
                x, y = split_batch(batch)
                if y is None:
                    raise ValueError(f"{caller} needs labelled batches")
                store.clear()
                output = call_model(model, move_inputs(x, device))
                if not store:
                    raise RuntimeError("the layer was not called in the model's forward pass")
                yield store[0].reshape(len(store[0]), -1).float().cpu(), y.reshape(-1).cpu(), output
    finally:
        model.train(was_training)


def layer_batches(
    model: nn.Module, module: str | nn.Module, loader: Iterable, device: str | torch.device = "cpu"
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(features, labels)`` per batch: the layer's flattened output (its first call) on CPU.

    Runs in eval mode under ``no_grad``; the hook is removed and the mode restored when the
    iteration ends or is closed.
    """
    for features, labels, _ in _layer_and_output_batches(model, module, loader, device, "layer_batches"):
        yield features, labels


def collect_features(
    model: nn.Module, module_name_or_module: str | nn.Module, loader: Iterable, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's flattened outputs ``(n, d)`` and the labels ``(n,)`` over a labelled loader."""
    feats, labels = [], []
    for f, y in layer_batches(model, module_name_or_module, loader, device):
        feats.append(f)
        labels.append(y)
    if not feats:
        raise ValueError("the loader yielded no batches")
    return torch.cat(feats), torch.cat(labels)


def predict_with_features(
    model: nn.Module, module: str | nn.Module, loader: Iterable, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits ``(n, C)``, labels ``(n,)`` and a layer's flattened features ``(n, d)`` in one pass
    (eval mode, ``no_grad``; hook removed and mode restored afterwards)."""
    logits, labels, feats = [], [], []
    for f, y, out in _layer_and_output_batches(model, module, loader, device, "predict_with_features"):
        logits.append(out.float().cpu())
        labels.append(y)
        feats.append(f)
    if not logits:
        raise ValueError("the loader yielded no batches")
    return torch.cat(logits), torch.cat(labels), torch.cat(feats)
