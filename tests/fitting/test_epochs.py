"""Tests of koopman_hooks/fitting/epochs.py: the cosine cycles of the learning rate and the stop rule."""

from __future__ import annotations

import math

import pytest
import torch

from koopman_hooks import KoopmanProbe
from koopman_hooks.data import TensorLoader
from koopman_hooks.fitting import epochs as schedule
from koopman_hooks.models import ResMLP


def test_each_cycle_anneals_from_one_to_zero_and_restarts() -> None:
    steps = 4
    factors = [schedule.cycle_factor(e, s, steps, 12) for e in range(12) for s in range(steps)]
    cycle = schedule.CYCLE_EPOCHS * steps
    assert factors[0] == 1.0 and factors[cycle] == 1.0  # a warm restart every CYCLE_EPOCHS epochs
    first = factors[:cycle]
    assert all(a > b for a, b in zip(first, first[1:]))  # monotone within a cycle
    assert first[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * (cycle - 1) / cycle)))
    # the last cycle takes the remainder: epochs 5 to 11 of 12, and still ends near zero
    last = factors[cycle:]
    assert len(last) == 7 * steps and all(a > b for a, b in zip(last, last[1:]))
    assert last[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * (7 * steps - 1) / (7 * steps))))
    assert [schedule.cycle_of(e, 3) for e in range(3)] == [(0, 3)] * 3  # fewer epochs than a cycle: one
    assert schedule.cycle_of(59, 60) == (55, 5)


def test_a_cycle_without_enough_gain_stops_the_fit() -> None:
    """A model whose layers are linear maps: the closed-form start is already right, no cycle can
    lower the held-out loss by CYCLE_GAIN, and the fit stops after the first cycle, saying why."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(6, 6) for _ in range(3)], torch.nn.Linear(6, 3)).eval()
    x = torch.randn(1200, 6)
    probe = KoopmanProbe(model, ["0", "2"], verbose=False)
    probe.fit(TensorLoader(x, torch.zeros(1200, dtype=torch.long), batch_size=200), epochs=40)
    info, history = probe.fetch_model().info, probe.fetch_model().history
    assert info["epochs_run"] == schedule.CYCLE_EPOCHS, info
    assert info["stopped_because"].startswith("a cycle lowered the held-out loss by"), info
    lrs = [h["lr"] for h in history if h["epoch"] >= 0]
    assert lrs[0] > lrs[1] > lrs[-1]  # the recorded rates follow the cosine


def test_the_epoch_limit_is_reported_when_it_ends_the_fit() -> None:
    torch.manual_seed(0)
    model = ResMLP(4, 3, width=8, depth=3).eval()
    x = torch.randn(600, 4)
    probe = KoopmanProbe(model, ["blocks.0", "blocks.2"], verbose=False)
    probe.fit(TensorLoader(x, torch.zeros(600, dtype=torch.long), batch_size=100), epochs=3)
    info = probe.fetch_model().info
    assert info["epochs_run"] == 3 and info["stopped_because"] == "the epoch limit", info


def test_held_out_rows_shares_add_up_to_the_loss_with_and_without_the_output_term(monkeypatch) -> None:
    """Every scored state's per-row shares sum to its held-out loss (state FVUs + KL)."""
    scores: list[schedule.Score] = []
    empty: list[schedule.Score] = []
    original = schedule.score

    def recording(ae, cache, rows, *args, **kwargs):
        result = original(ae, cache, rows, *args, **kwargs)
        scores.append(result[0])
        # a process whose shard holds no held-out rows (torch.distributed) scores none
        empty.append(original(ae, cache, rows[:0], *args, **kwargs)[0])
        return result

    monkeypatch.setattr(schedule, "score", recording)
    torch.manual_seed(0)
    model = ResMLP(4, 3, width=8, depth=3).eval()
    x = torch.randn(600, 4)
    probe = KoopmanProbe(model, ["blocks.0", "blocks.1", "blocks.2"], verbose=False)
    probe.fit(TensorLoader(x, torch.zeros(600, dtype=torch.long), batch_size=100), epochs=3)
    tail_less = KoopmanProbe(model, ["blocks.0", "blocks.2"], verbose=False, loss_weights={"output": 0.0})
    tail_less.fit(TensorLoader(x, torch.zeros(600, dtype=torch.long), batch_size=100), epochs=2)
    assert len(scores) >= 4 and any(s.agreement is not None for s in scores)
    for s in scores:
        assert s.row_losses is not None and len(s.row_losses) == s.rows > 0
        assert float(s.row_losses.sum()) == pytest.approx(s.loss, rel=1e-6)
    assert all(s.row_losses is not None and len(s.row_losses) == 0 for s in empty)


def test_a_cycles_gain_is_paired_over_the_held_out_rows() -> None:
    g = torch.Generator().manual_seed(0)
    before = torch.rand(500, generator=g, dtype=torch.float64)
    after = before - 0.01 + 0.05 * torch.randn(500, generator=g, dtype=torch.float64)
    a = schedule.Score(None, float(before.sum()), 0.0, 500, before)
    b = schedule.Score(None, float(after.sum()), 0.0, 500, after)
    gain, error = b.gain_over(a)
    diff = (before - after).numpy()
    assert gain == pytest.approx(diff.sum()) and error == pytest.approx(diff.std() * math.sqrt(500))
    assert b.gain_over(b) == (0.0, 0.0)
    assert schedule.Score(None, 2.0, 0.0).gain_over(schedule.Score(None, 3.0, 0.0)) == (1.0, 0.0)  # no rows kept
