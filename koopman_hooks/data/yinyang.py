"""The Yin-Yang dataset of Kriener, Göltz and Petrovici (2022), generated in code.

Points are drawn uniformly in the unit square, kept inside the big circle, labelled
yin (0), yang (1) or dot (2), and rejected per class until the classes are balanced.
Each sample is ``(x, y, 1 - x, 1 - y)`` as in the original dataset.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

R_BIG = 0.5
R_SMALL = 0.1
CLASS_NAMES = ("yin", "yang", "dot")


def yinyang_class(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Label points of the unit square: 0 yin, 1 yang, 2 dot, -1 outside the big circle."""
    d_right = np.hypot(x - 1.5 * R_BIG, y - R_BIG)
    d_left = np.hypot(x - 0.5 * R_BIG, y - R_BIG)
    d_centre = np.hypot(x - R_BIG, y - R_BIG)
    is_yin = (d_right <= R_SMALL) | ((d_left > R_SMALL) & (d_left <= 0.5 * R_BIG)) | (
        (y > R_BIG) & (d_right > 0.5 * R_BIG)
    )
    is_dot = (d_right < R_SMALL) | (d_left < R_SMALL)
    label = np.where(is_dot, 2, is_yin.astype(np.int64))
    return np.where(d_centre <= R_BIG, label, -1)


class YinYangDataset(Dataset):
    """Balanced, seeded Yin-Yang samples; items are ``(float32[4], int64)`` pairs."""

    def __init__(self, size: int = 5000, seed: int = 0) -> None:
        if size < 3:
            raise ValueError(f"YinYangDataset needs size >= 3 (one sample per class), got {size}")
        rng = np.random.default_rng(seed)
        per_class = [size // 3 + (1 if c < size % 3 else 0) for c in range(3)]
        points: list[np.ndarray] = []
        labels: list[np.ndarray] = []
        missing = list(per_class)
        while any(missing):
            xy = rng.uniform(0.0, 2 * R_BIG, size=(4 * size + 64, 2))
            cls = yinyang_class(xy[:, 0], xy[:, 1])
            for c in range(3):
                take = xy[cls == c][: missing[c]]
                points.append(take)
                labels.append(np.full(len(take), c))
                missing[c] -= len(take)
        xy = np.concatenate(points)
        order = rng.permutation(len(xy))
        xy, y = xy[order], np.concatenate(labels)[order]
        self.inputs = torch.from_numpy(np.concatenate([xy, 1.0 - xy], axis=1)).float()
        self.targets = torch.from_numpy(y).long()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.targets[index]
