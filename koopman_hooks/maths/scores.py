"""Streaming fidelity scores: fraction of variance unexplained and classification counts.

Both keep sums only (``O(features)`` and ``O(classes²)``), so they merge exactly across
batches and processes.
"""

from __future__ import annotations

import torch

NO_VARIANCE = 1e-12  # a variance below this share of Σ‖target − shift‖² is rounding error of the float64 sums


class StreamingFVU:
    """``Σ‖pred − target‖² / Σ‖target − mean(target)‖²`` accumulated over batches (float64).

    The target's sums are taken about a shift (the first batch's mean), so its variance does not
    cancel away when the mean is large against the spread (``Σx² − (Σx)²/n`` loses it)."""

    def __init__(self) -> None:
        self.n = 0
        self.sq_error = torch.zeros((), dtype=torch.float64)
        self.shift: torch.Tensor | None = None
        self.sum: torch.Tensor | None = None  # Σ (target − shift)
        self.sq_sum = torch.zeros((), dtype=torch.float64)  # Σ ‖target − shift‖²

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> StreamingFVU:
        """Fold in a batch; sums stay on the batch's device (no host synchronisation)."""
        pred = pred.reshape(len(pred), -1).double()
        target = target.reshape(len(target), -1).double()
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        if not len(target):
            return self
        if self.shift is None:
            self.shift = target.mean(0)
        centred = target - self.shift.to(target.device)
        self.sq_error = self.sq_error.to(target.device) + (pred - target).pow(2).sum()
        self.sq_sum = self.sq_sum.to(target.device) + centred.pow(2).sum()
        batch_sum = centred.sum(0)
        self.sum = batch_sum if self.sum is None else self.sum.to(target.device) + batch_sum
        self.n += len(target)
        return self

    def merge(self, other: StreamingFVU) -> StreamingFVU:
        """Fold in the sums of another, disjoint set of samples; returns ``self``."""
        if other.n == 0:
            return self
        assert other.sum is not None and other.shift is not None
        if self.shift is None or self.sum is None:
            self.n, self.shift, self.sum = other.n, other.shift.clone(), other.sum.clone()
            self.sq_error, self.sq_sum = other.sq_error.clone(), other.sq_sum.clone()
            return self
        device = self.sq_error.device
        # the other's sums about this shift: x − s = (x − t) + d with d = t − s
        d = other.shift.to(device) - self.shift
        other_sum = other.sum.to(device)
        self.sq_sum = self.sq_sum + other.sq_sum.to(device) + 2 * (d * other_sum).sum() + other.n * d.pow(2).sum()
        self.sum = self.sum + other_sum + other.n * d
        self.sq_error = self.sq_error + other.sq_error.to(device)
        self.n += other.n
        return self

    def total_variance(self) -> float:
        """``Σ‖target − mean(target)‖²``: the denominator of :meth:`compute`."""
        if self.n == 0 or self.sum is None:
            return float("nan")
        return float(self.sq_sum) - float(self.sum.pow(2).sum()) / self.n

    def compute(self) -> float:
        """The FVU; NaN without samples or when the targets have no variance (one row, or all
        alike: up to float64 rounding of the sums), where no fraction of it is defined."""
        if self.n == 0 or self.sum is None or self.shift is None:
            return float("nan")
        variance = self.total_variance()
        if variance <= NO_VARIANCE * float(self.sq_sum):  # rounding of the centred sums: no variance
            return float("nan")
        return float(self.sq_error) / variance


class ClassificationCounts:
    """Accuracy of predictors against labels, and agreement with a ``reference`` predictor.

    Keeps per-class counts only, ``O(classes)`` memory (a language model's vocabulary is fine):
    per predictor, how many rows each label class has and how many of them it predicts, and how
    many rows the reference predicts as each class and how many of them it predicts alike.
    """

    def __init__(self, reference: str = "model") -> None:
        self.reference = reference
        self.vs_labels: dict[str, torch.Tensor] = {}  # (2, classes): rows per class, rows right
        self.vs_reference: dict[str, torch.Tensor] = {}
        self.n = 0

    @staticmethod
    def _add(table: dict[str, torch.Tensor], name: str, truth: torch.Tensor, pred: torch.Tensor) -> None:
        size = int(truth.max()) + 1 if len(truth) else 0
        counts = torch.stack([torch.bincount(truth, minlength=size), torch.bincount(truth[pred == truth], minlength=size)])
        table[name] = _summed(table.get(name), counts)

    def update(self, labels: torch.Tensor | None, ignore_index: int | None = None,
               **logits: torch.Tensor) -> ClassificationCounts:
        """Fold in a batch: ``labels`` (or ``None``) and each predictor's ``(batch, classes)``
        scores; rows labelled ``ignore_index`` (e.g. HuggingFace's -100) count for the agreement only."""
        if self.reference not in logits:
            raise ValueError(f"the reference predictor {self.reference!r} is missing from {sorted(logits)}")
        preds = {name: value.detach().argmax(-1).reshape(-1).long().cpu() for name, value in logits.items()}
        ref = preds[self.reference]
        labelled = None  # the rows with a label, where some are ignore_index
        if labels is not None:
            labels = labels.detach().reshape(-1).long().cpu()
            if len(labels) != len(ref):
                raise ValueError(f"got {len(labels)} labels for {len(ref)} predictions")
            if ignore_index is not None:
                labelled = labels != ignore_index
                labels = labels[labelled]
            if len(labels) and int(labels.min()) < 0:
                raise ValueError("labels must be class indices >= 0")
        for name, pred in preds.items():
            if labels is not None:
                self._add(self.vs_labels, name, labels, pred if labelled is None else pred[labelled])
            self._add(self.vs_reference, name, ref, pred)
        self.n += len(ref)
        return self

    def merge(self, other: ClassificationCounts) -> ClassificationCounts:
        """Fold in the counts of another, disjoint set of samples; returns ``self``."""
        for mine, theirs in ((self.vs_labels, other.vs_labels), (self.vs_reference, other.vs_reference)):
            for name, table in theirs.items():
                mine[name] = _summed(mine.get(name), table)
        self.n += other.n
        return self

    @property
    def has_labels(self) -> bool:
        return bool(self.vs_labels)

    def accuracy(self, name: str) -> tuple[float, dict[int, float]]:
        """Overall and per-label-class accuracy of predictor ``name``."""
        return _rates(self.vs_labels[name])

    def agreement(self, name: str) -> tuple[float, dict[int, float]]:
        """Fraction with the reference's argmax, overall and per reference class."""
        return _rates(self.vs_reference[name])


def _summed(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    """Two ``(2, classes)`` count tables added, the shorter one padded with zeros."""
    size = max(b.shape[1], 0 if a is None else a.shape[1])
    out = torch.zeros(2, size, dtype=torch.long)
    for table in (a, b):
        if table is not None:
            out[:, : table.shape[1]] += table
    return out


def _rates(counts: torch.Tensor) -> tuple[float, dict[int, float]]:
    total, hits = counts[0], counts[1]
    per_class = {int(c): float(hits[c]) / float(total[c]) for c in total.nonzero().flatten().tolist()}
    overall = float(hits.sum()) / max(float(total.sum()), 1.0)
    return overall, per_class
