"""Streaming fidelity metrics: fraction of variance unexplained and classification counts."""

from __future__ import annotations

import torch


class StreamingFVU:
    """``Σ||pred - target||² / Σ||target - mean(target)||²`` accumulated over batches."""

    def __init__(self) -> None:
        self.n = 0
        self.sq_error = 0.0
        self.sq_sum = 0.0
        self.sum: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> StreamingFVU:
        pred = pred.reshape(len(pred), -1).double()
        target = target.reshape(len(target), -1).double()
        self.sq_error += (pred - target).pow(2).sum().item()
        self.sq_sum += target.pow(2).sum().item()
        batch_sum = target.sum(0).cpu()
        self.sum = batch_sum if self.sum is None else self.sum + batch_sum
        self.n += len(target)
        return self

    def compute(self) -> float:
        if self.n == 0 or self.sum is None:
            return float("nan")
        total_var = self.sq_sum - self.sum.pow(2).sum().item() / self.n
        return self.sq_error / max(total_var, 1e-30)


class ClassificationCounts:
    """Accuracy of one or more predictors against labels and against a reference, per class."""

    def __init__(self) -> None:
        self.labels: list[torch.Tensor] = []
        self.preds: dict[str, list[torch.Tensor]] = {}

    def update(self, labels: torch.Tensor | None, **preds: torch.Tensor) -> ClassificationCounts:
        # only predicted class ids are kept: O(samples) integers, never activations
        if labels is not None:
            self.labels.append(labels.detach().cpu().long().reshape(-1))
        for name, logits in preds.items():
            self.preds.setdefault(name, []).append(logits.detach().argmax(-1).cpu().reshape(-1))
        return self

    def predictions(self, name: str) -> torch.Tensor:
        return torch.cat(self.preds[name])

    @property
    def has_labels(self) -> bool:
        return bool(self.labels)

    def accuracy(self, name: str) -> tuple[float, dict[int, float]]:
        return _accuracy(self.predictions(name), torch.cat(self.labels))

    def agreement(self, name: str, reference: str) -> tuple[float, dict[int, float]]:
        """Fraction with the same argmax as ``reference``, per reference class."""
        return _accuracy(self.predictions(name), self.predictions(reference))


def _accuracy(pred: torch.Tensor, target: torch.Tensor) -> tuple[float, dict[int, float]]:
    correct = (pred == target).double()
    per_class = {int(c): correct[target == c].mean().item() for c in target.unique()}
    return correct.mean().item(), per_class
