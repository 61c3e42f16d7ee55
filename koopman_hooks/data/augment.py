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
        if n == 0:
            return images
        offsets = torch.randint(-self.pixels, self.pixels + 1, (n, 2), generator=self.generator)
        # the sampling grid in float64 (exact whole pixels at any size), the images sampled in
        # float32 or float64 and returned in their own dtype (uint8, half precision, ...)
        theta = torch.zeros(n, 2, 3, dtype=torch.float64)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        # grid_sample reads the output's pixel (i, j) at input (i - dy, j - dx); one pixel is 2 / size
        theta[:, 0, 2] = -2.0 * offsets[:, 0].double() / width
        theta[:, 1, 2] = -2.0 * offsets[:, 1].double() / height
        grid = F.affine_grid(theta, [n, 1, height, width], align_corners=False)
        sampled = images if images.dtype in (torch.float32, torch.float64) else images.float()
        grid = grid.to(sampled.device, sampled.dtype)
        shifted = F.grid_sample(sampled, grid, mode="nearest", padding_mode="border", align_corners=False)
        return shifted.to(images.dtype)

    def __repr__(self) -> str:
        return f"RandomShift(pixels={self.pixels})"
