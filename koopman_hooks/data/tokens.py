"""A synthetic token-classification task, generated in code: variable-length padded sequences.

Each sample is ``[CLS] t_1 ... t_L [PAD] ...``: ``L`` content tokens (``min_length`` to
``max_length``, uniform) drawn from ``2 .. vocab_size - 1``, right-padded with ``PAD = 0`` to
``max_length + 1`` positions, with an attention mask of ones over ``[CLS]`` and the content.
The content tokens split into a low and a high half; the class (0 to 3) is

    2 * [t_1 is high] + [more high than low tokens]

so it depends on the tokens (how many are high) and on their order (which one comes first).
Classes are balanced (samples are drawn per class by rejection) and everything is seeded.
Items are dicts ``{"input_ids", "attention_mask", "labels"}``, the batches a HuggingFace model
takes as ``model(**batch)`` once the labels are split off.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

PAD, CLS = 0, 1
FIRST_CONTENT = 2
NUM_CLASSES = 4
KEYS = ("input_ids", "attention_mask", "labels")


def token_class(content: np.ndarray, vocab_size: int) -> int:
    """The class of one sequence of content tokens (no ``[CLS]``, no padding)."""
    high = content >= FIRST_CONTENT + (vocab_size - FIRST_CONTENT) // 2
    return 2 * int(high[0]) + int(2 * int(high.sum()) > len(content))


class TokenSequenceDataset(Dataset):
    """Balanced, seeded sequences of the token task (see the module docstring).

    Attributes ``input_ids`` and ``attention_mask`` are ``(size, max_length + 1)`` int64,
    ``targets`` is ``(size,)``; ``tensors`` holds the three in :data:`KEYS` order.
    """

    keys = KEYS

    def __init__(self, size: int = 4000, seed: int = 0, vocab_size: int = 16, min_length: int = 6,
                 max_length: int = 16) -> None:
        if size < NUM_CLASSES:
            raise ValueError(f"TokenSequenceDataset needs size >= {NUM_CLASSES} (one sample per class), got {size}")
        if vocab_size < FIRST_CONTENT + 2:
            raise ValueError(f"vocab_size must be at least {FIRST_CONTENT + 2} (PAD, CLS and two content tokens), "
                             f"got {vocab_size}")
        if not 2 <= min_length <= max_length:
            raise ValueError(f"need 2 <= min_length <= max_length, got {min_length} and {max_length}")
        self.vocab_size, self.min_length, self.max_length = vocab_size, min_length, max_length
        rng = np.random.default_rng(seed)
        ids = np.full((size, max_length + 1), PAD, dtype=np.int64)
        mask = np.zeros_like(ids)
        labels = np.arange(size, dtype=np.int64) % NUM_CLASSES
        for i, wanted in enumerate(labels):
            while True:
                length = int(rng.integers(min_length, max_length + 1))
                content = rng.integers(FIRST_CONTENT, vocab_size, length)
                if token_class(content, vocab_size) == wanted:
                    break
            ids[i, 0], ids[i, 1 : length + 1] = CLS, content
            mask[i, : length + 1] = 1
        order = rng.permutation(size)
        self.input_ids = torch.from_numpy(ids[order])
        self.attention_mask = torch.from_numpy(mask[order])
        self.targets = torch.from_numpy(labels[order])

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.input_ids, self.attention_mask, self.targets

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index],
                "labels": self.targets[index]}
