"""Training-time augmentation for the image recipes."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class RandomShift:
    """Translate every image of a ``(batch, channels, height, width)`` batch by its own random
    whole-pixel offset of at most ``pixels`` in each direction; the border pixels fill what is
    uncovered (the background, for MNIST). Draws from its own generator (seeded by ``seed``), so
    the global random streams are left alone."""

    def __init__(self, pixels: int, seed: int = 0) -> None:
        if isinstance(pixels, bool) or not isinstance(pixels, int) or pixels < 0:
            raise ValueError(f"pixels must be an int >= 0, got {pixels!r}")
        self.pixels = pixels
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.pixels == 0:
            return images
        if images.ndim != 4:
            raise ValueError(f"RandomShift needs (batch, channels, height, width) images, got shape {tuple(images.shape)}")
        n, _, height, width = images.shape
        offsets = torch.randint(-self.pixels, self.pixels + 1, (n, 2), generator=self.generator)
        theta = torch.zeros(n, 2, 3, dtype=images.dtype)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        # grid_sample reads the output's pixel (i, j) at input (i - dy, j - dx); one pixel is 2 / size
        theta[:, 0, 2] = -2.0 * offsets[:, 0].to(images.dtype) / width
        theta[:, 1, 2] = -2.0 * offsets[:, 1].to(images.dtype) / height
        grid = F.affine_grid(theta.to(images.device), list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, mode="nearest", padding_mode="border", align_corners=False)

    def __repr__(self) -> str:
        return f"RandomShift(pixels={self.pixels})"
