"""Tests of koopman_hooks/maths/linalg.py."""

from __future__ import annotations

import torch

from koopman_hooks.maths.linalg import homogeneous


def test_homogeneous():
    k, b = torch.randn(3, 3), torch.randn(3)
    h = homogeneous(k, b)
    assert h.shape == (4, 4)
    torch.testing.assert_close(h[:3, :3], k)
    torch.testing.assert_close(h[:3, 3], b)
    torch.testing.assert_close(h[3], torch.tensor([0.0, 0.0, 0.0, 1.0]))
    torch.testing.assert_close(homogeneous(k)[:3, 3], torch.zeros(3))


