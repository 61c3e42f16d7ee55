"""Tests of koopman_hooks/maths/scores.py: streamed scores equal whole-batch formulas, and merge."""

from __future__ import annotations

import pytest
import torch

from koopman_hooks.maths.scores import ClassificationCounts, StreamingFVU


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_streaming_fvu_matches_the_whole_batch_formula_and_merges():
    target = torch.randn(300, 7, generator=gen(0), dtype=torch.float64) * 3 + 10
    pred = target + 0.5 * torch.randn(300, 7, generator=gen(1), dtype=torch.float64)
    oracle = ((pred - target) ** 2).sum() / ((target - target.mean(0)) ** 2).sum()
    streamed = StreamingFVU()
    for a in range(0, 300, 70):
        assert streamed.update(pred[a : a + 70], target[a : a + 70]) is streamed
    assert abs(streamed.compute() - float(oracle)) < 1e-10
    left, right = StreamingFVU().update(pred[:123], target[:123]), StreamingFVU().update(pred[123:], target[123:])
    assert abs(left.merge(right).compute() - float(oracle)) < 1e-10
    assert StreamingFVU().merge(StreamingFVU()).n == 0


def test_classification_counts_match_direct_counts_and_merge():
    labels = torch.randint(0, 4, (500,), generator=gen(2))
    model = torch.randn(500, 4, generator=gen(3))
    model[torch.arange(500), labels] += 1.0  # mostly right
    other = model + 0.8 * torch.randn(500, 4, generator=gen(4))
    whole = ClassificationCounts().update(labels, model=model, other=other)
    halves = [ClassificationCounts().update(labels[a:b], model=model[a:b], other=other[a:b]) for a, b in ((0, 211), (211, 500))]
    merged = halves[0].merge(halves[1])
    pred_m, pred_o = model.argmax(1), other.argmax(1)
    for counts in (whole, merged):
        assert counts.n == 500 and counts.has_labels
        acc, per_class = counts.accuracy("other")
        assert abs(acc - float((pred_o == labels).double().mean())) < 1e-12
        for c in range(4):
            assert abs(per_class[c] - float((pred_o[labels == c] == c).double().mean())) < 1e-12
        agree, per_ref = counts.agreement("other")
        assert abs(agree - float((pred_o == pred_m).double().mean())) < 1e-12
        for c in per_ref:
            assert abs(per_ref[c] - float((pred_o[pred_m == c] == c).double().mean())) < 1e-12
    unlabelled = ClassificationCounts().update(None, model=model)
    assert not unlabelled.has_labels and unlabelled.agreement("model")[0] == 1.0


def test_streaming_fvu_of_targets_without_variance_is_nan():
    row = torch.randn(1, 5, generator=gen(2), dtype=torch.float64) * 7 + 3
    for target in (row, row.repeat(8, 1), torch.zeros(4, 5, dtype=torch.float64)):
        fvu = StreamingFVU().update(target + 0.1, target).compute()
        assert fvu != fvu, fvu  # NaN: no fraction of a variance that is not there
    tiny = torch.full((50, 5), 1e3, dtype=torch.float64)
    tiny[0, 0] += 1e-2  # a small variance on a large mean is still a variance
    expected = float(((tiny + 0.1 - tiny) ** 2).sum() / ((tiny - tiny.mean(0)) ** 2).sum())
    assert abs(StreamingFVU().update(tiny + 0.1, tiny).compute() - expected) < 1e-6 * expected
    left, right = StreamingFVU().update(tiny[:20] + 0.1, tiny[:20]), StreamingFVU().update(tiny[20:] + 0.1, tiny[20:])
    assert abs(right.merge(left).compute() - expected) < 1e-6 * expected  # merged about other shifts


def test_classification_counts_ignore_unlabelled_rows_and_stay_small_for_many_classes():
    classes = 50_000  # a vocabulary: per-class counts, no (classes x classes) table
    labels = torch.randint(0, classes, (400,), generator=gen(5))
    model = torch.zeros(400, classes)
    model[torch.arange(400), labels] = 1.0
    other = model.clone()
    other[:100] = torch.roll(other[:100], 1, dims=1)  # the first 100 rows predicted one class off
    labels[::4] = -100  # unlabelled rows: in the agreement, not in the accuracy
    counts = ClassificationCounts().update(labels, ignore_index=-100, model=model, other=other)
    scored = labels != -100
    pred_o, pred_m = other.argmax(1), model.argmax(1)
    assert counts.n == 400
    assert counts.accuracy("other")[0] == float((pred_o == labels)[scored].double().mean())
    assert counts.agreement("other")[0] == float((pred_o == pred_m).double().mean()) == 0.75
    assert all(t.numel() <= 2 * classes for t in (*counts.vs_labels.values(), *counts.vs_reference.values()))
    halves = ClassificationCounts().update(labels[:150], ignore_index=-100, model=model[:150], other=other[:150])
    halves.merge(ClassificationCounts().update(labels[150:], ignore_index=-100, model=model[150:], other=other[150:]))
    assert halves.accuracy("other") == counts.accuracy("other") and halves.agreement("other") == counts.agreement("other")
    with pytest.raises(ValueError, match="class indices >= 0"):
        ClassificationCounts().update(labels, model=model)  # -100 without ignore_index: an error, as before
