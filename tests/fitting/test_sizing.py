"""Tests of koopman_hooks/fitting/sizing.py: multiply-add counts against closed forms, and the
sizes chosen from them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from koopman_hooks.core.skipping import trace
from koopman_hooks.fitting import sizing
from koopman_hooks.models import ResMLP


def test_module_macs_match_the_closed_form() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, stride=2), nn.ReLU(), nn.Conv2d(8, 4, 1, groups=2), nn.Flatten(),
                          nn.Linear(4 * 5 * 5, 7))
    x = torch.randn(2, 3, 10, 10)
    counts = sizing.module_macs(model, x)
    assert counts["0"] == 2 * 8 * 5 * 5 * (3 * 3 * 3)  # batch, out channels, out pixels, in channels x kernel
    assert counts["2"] == 2 * 4 * 5 * 5 * (8 // 2)  # grouped 1x1
    assert counts["4"] == 2 * 7 * 100
    assert counts["1"] == 0 and counts["3"] == 0


def test_surrogate_macs_counts_each_linear_map_once() -> None:
    # adapters 10x4 and 4x6, phi: 4->8 skip + 4->3->8 residual, K once 8x8, psi mirrored
    expected = 10 * 4 + (4 * 8 + 4 * 3 + 3 * 8) + 8 * 8 + (8 * 4 + 8 * 3 + 3 * 4) + 4 * 6
    assert sizing.surrogate_macs(10, 6, 4, 8, [3]) == expected
    assert sizing.surrogate_macs(10, 6, 4, 8, []) == 10 * 4 + 4 * 8 + 64 + 8 * 4 + 4 * 6


@pytest.mark.parametrize("budget", [60_000, 150_000, 262_144])
def test_width_is_narrowed_to_the_budget_of_the_replaced_modules(budget: int) -> None:
    width, note = sizing.width_for(247, 256, 256, budget)
    latent = sizing.latent_dim_for(width)[0]
    assert sizing.MIN_WIDTH <= width < 247 and "narrowed" in note
    assert sizing.surrogate_macs(256, 256, width, latent, [sizing.MIN_HIDDEN]) <= budget
    wider = width + 1
    assert sizing.surrogate_macs(256, 256, wider, sizing.latent_dim_for(wider)[0], [sizing.MIN_HIDDEN]) > budget
    hidden, _ = sizing.hidden_for(256, 256, width, latent, budget)
    assert sizing.surrogate_macs(256, 256, width, latent, hidden) <= budget


def test_width_is_kept_when_it_fits_or_only_a_tiny_one_would() -> None:
    assert sizing.width_for(40, 64, 64, 10**6)[0] == 40  # fits
    assert sizing.width_for(40, 64, 64, None)[0] == 40  # not measurable
    assert sizing.width_for(9, 10, 10, 400)[0] == 9  # below MIN_WIDTH: never narrowed
    width, note = sizing.width_for(42, 64, 64, 8192)  # only a width below 32 would fit
    assert width == 42 and "even 32" in note


def test_hidden_is_budgeted_except_for_tiny_layers() -> None:
    tiny, note = sizing.hidden_for(10, 10, 9, 17, 400)  # Yin-Yang-size blocks: nothing fits 400 multiply-adds
    assert tiny == (sizing.MAX_HIDDEN,) and "tiny" in note
    assert sizing.hidden_for(10, 10, sizing.MIN_WIDTH, 40, 400)[0] == (sizing.MAX_HIDDEN,)
    wide, _ = sizing.hidden_for(256, 256, sizing.MIN_WIDTH + 1, 41, 400)  # wider: held to the budget
    assert wide == (sizing.MIN_HIDDEN,)
    assert sizing.hidden_for(256, 256, 64, 80, None)[0] == (sizing.MAX_HIDDEN,)  # not measurable


def test_steps_follow_the_modules_each_segment_spans() -> None:
    model = ResMLP(4, 3, width=6, depth=5)
    x = torch.randn(3, 4)
    steps, _ = sizing.steps_from_trace(["blocks.0", "blocks.2", "blocks.4"], trace(model, lambda: model(x)))
    assert steps == (2, 2)
    steps, _ = sizing.steps_from_trace(["blocks.0", "blocks.4"], trace(model, lambda: model(x)))
    assert steps == (4,)


def test_batch_size_gives_about_fifty_steps_within_bounds() -> None:
    assert sizing.batch_size_for(100)[0] == 64
    assert sizing.batch_size_for(12_800)[0] == 256
    assert sizing.batch_size_for(10**6)[0] == 512
    # at least 128 rows a step once that still leaves 25 steps per epoch; fewer rows keep 64
    assert sizing.batch_size_for(1_300)[0] == 64
    assert sizing.batch_size_for(3_199)[0] == 64
    size, note = sizing.batch_size_for(3_600)
    assert size == 128 and "at least 128 rows a step" in note and 3_600 // size >= sizing.MIN_STEPS
