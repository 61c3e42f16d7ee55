"""Small reference models used by the recipes: a residual MLP like the paper's."""

from __future__ import annotations

import torch
from torch import nn


class ResidualBlock(nn.Module):
    """``x + act(norm(linear(x)))``: one residual step of constant width."""

    def __init__(self, width: int, batch_norm: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.norm = nn.BatchNorm1d(width) if batch_norm else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.norm(self.linear(x)))


class ResMLP(nn.Module):
    """Input layer, ``depth`` residual blocks of ``width`` units, and a linear head.

    Module names: ``input``, ``blocks.0`` ... ``blocks.{depth-1}``, ``head``.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        width: int = 10,
        depth: int = 5,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten(), nn.Linear(in_features, width)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(nn.ReLU())
        self.input = nn.Sequential(*layers)
        self.blocks = nn.Sequential(*(ResidualBlock(width, batch_norm) for _ in range(depth)))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.input(x)))
