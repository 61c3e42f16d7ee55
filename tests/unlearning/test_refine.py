"""Tests of koopman_hooks/unlearning/refine.py."""

from __future__ import annotations

import pytest
import torch

from koopman_hooks.unlearning.refine import SampleReservoir, refinement_rows, refinement_targets


def test_sample_reservoir_is_bounded_uniform_seeded_and_aligned() -> None:
    def stream(seed: int) -> SampleReservoir:
        reservoir = SampleReservoir(100, seed=seed)
        for start in range(0, 5000, 250):
            rows = torch.arange(start, start + 250)
            reservoir.update(rows[:, None].float(), rows % 3, (rows + 1) % 3, rows % 5)
        return reservoir

    a = stream(0)
    assert len(a) == 100 and a.inputs.shape == (100, 1)
    index = a.inputs[:, 0].long()
    assert torch.equal(a.labels, index % 3) and torch.equal(a.keys, (index + 1) % 3)
    assert torch.equal(a.predictions[:, 0], index % 5)  # rows stay aligned
    assert len(index.unique()) == 100
    assert 1500 < index.float().mean() < 3500  # drawn from the whole stream, not its start
    assert torch.equal(stream(0).inputs, a.inputs) and not torch.equal(stream(1).inputs, a.inputs)
    with pytest.raises(TypeError, match="mix"):
        a.update({"x": torch.zeros(2, 1)}, torch.zeros(2), torch.zeros(2), None)


def test_sample_reservoir_keeps_dict_batches_and_pads_ragged_sequences() -> None:
    """HF-style dict batches of different (dynamically padded) lengths: rows stay aligned, and
    shorter sequences are right-padded with zeros (a zero attention mask hides them)."""
    reservoir = SampleReservoir(6, seed=0)
    for start, length in ((0, 3), (4, 5), (8, 2)):
        ids = torch.arange(start, start + 4)[:, None].repeat(1, length)
        mask = torch.ones(4, length, dtype=torch.long)
        reservoir.update({"input_ids": ids, "attention_mask": mask}, torch.arange(start, start + 4) % 3,
                         torch.zeros(4), None)
    assert len(reservoir) == 6
    ids, mask = reservoir.inputs["input_ids"], reservoir.inputs["attention_mask"]
    assert ids.shape == (6, 5) and mask.shape == (6, 5)
    assert torch.equal(ids[:, 0] % 3, reservoir.labels)  # aligned with the labels
    assert torch.equal((ids != 0) | (ids[:, :1] == 0), mask.bool() | (ids[:, :1] == 0))  # padding has mask 0


def test_merged_reservoirs_are_a_sample_of_the_union() -> None:
    a, b = SampleReservoir(50, seed=0), SampleReservoir(50, seed=1)
    a.update(torch.arange(0, 100)[:, None].float(), torch.zeros(100), torch.zeros(100), None)
    b.update(torch.arange(100, 200)[:, None].float(), torch.zeros(100), torch.zeros(100), None)
    priorities = torch.cat([a.priority, b.priority])
    rows = torch.cat([a.inputs, b.inputs])[:, 0]
    merged = a.merge(b)
    assert len(merged) == 50
    expected = rows[torch.topk(priorities, 50, largest=False).indices].sort().values
    assert torch.equal(merged.inputs[:, 0].sort().values, expected)


def _pool(n: int, seed: int = 0) -> SampleReservoir:
    """``n`` rows of 4 classes: labels cycle; a retained row's runner-up is the next class for
    3 rows in 4 and class 0 (forgotten below) for the fourth; a class-0 row's is retained."""
    rows = torch.arange(n)
    labels = rows % 4
    keys = torch.where(rows % 16 < 12, labels % 3 + 1, torch.zeros_like(labels))
    keys = torch.where(labels == 0, 1 + rows % 3, keys)
    return SampleReservoir(n, seed=seed).update(rows[:, None].float(), labels, keys, labels)


def test_refinement_rows_use_a_small_reservoir_whole_with_the_plain_weights() -> None:
    pool = _pool(200)
    rows, weights = refinement_rows(pool, [0], [1, 2, 3], 2048, retain_weight=0.8)
    targets, forgotten = refinement_targets(pool, [0], [1, 2, 3])
    assert torch.equal(rows, (targets >= 0).nonzero().squeeze(1))
    f = forgotten[rows]
    assert torch.allclose(weights[f], torch.full((int(f.sum()),), 0.2 / int(f.sum())))
    assert torch.allclose(weights[~f], torch.full((int((~f).sum()),), 0.8 / int((~f).sum())))


def test_refinement_rows_favour_rows_at_risk_and_keep_the_pools_loss_unbiased() -> None:
    """From a larger pool: exactly ``rows`` distinct rows, more of the at-risk retained rows
    (runner-up forgotten) than a uniform draw, the strata's weights in the pool's proportions,
    and the weighted mean of any per-row value, averaged over draws, equal to the whole pool's."""
    forget, retained, rw = [0], [1, 2, 3], 0.8
    whole = _pool(4000)
    targets, forgotten = refinement_targets(whole, forget, retained)
    at_risk = (whole.keys == 0) & ~forgotten
    value = torch.randn(4000, generator=torch.Generator().manual_seed(0)) + 2.0 * at_risk
    f_all, r_all = forgotten & (targets >= 0), ~forgotten & (targets >= 0)
    oracle = (1 - rw) * value[f_all].mean() + rw * value[r_all].mean()
    estimates = []
    for seed in range(300):
        rows, weights = refinement_rows(_pool(4000, seed), forget, retained, 400, rw)
        assert len(rows) == 400 and len(rows.unique()) == 400 and (targets[rows] >= 0).all()
        assert torch.isclose(weights.sum(), torch.tensor(1.0))
        assert torch.isclose(weights[forgotten[rows]].sum(), torch.tensor(1 - rw))
        estimates.append(float((weights * value[rows]).sum()))
    assert at_risk[rows].float().mean() > 1.8 * at_risk[r_all | f_all].float().mean()  # 0.375 vs 0.1875
    assert torch.equal(refinement_rows(_pool(4000, 5), forget, retained, 400, rw)[0],
                       refinement_rows(_pool(4000, 5), forget, retained, 400, rw)[0])  # seeded
    mean = torch.tensor(estimates).mean()
    spread = torch.tensor(estimates).std() / len(estimates) ** 0.5
    assert abs(float(mean - oracle)) < 4 * float(spread) + 1e-6, (float(mean), float(oracle))


@pytest.mark.parametrize("loaded", [False, True])
def test_refinement_lowers_its_loss_on_fitted_and_loaded_probes(setup: dict, tmp_path, loaded: bool) -> None:
    """The refinement must move the readout: on a fresh fit (the fit's tail runner) and on a
    probe loaded from disk (which finds the tail on the statistics pass's first batch)."""
    from koopman_hooks import KoopmanProbe

    probe = setup["probe"]
    if loaded:
        probe.save(tmp_path / "probe.safetensors")
        probe = KoopmanProbe.load(tmp_path / "probe.safetensors", setup["model"], verbose=False)
        assert probe.fetch_model().tail is None
    stats = probe.unlearning_statistics(setup["loader"])
    assert probe.fetch_model().tail is not None
    edited = probe.unlearn(1, stats, refine=5)
    before, after = edited.info["refine_loss_before"], edited.info["refine_loss_after"]
    assert after < before - 1e-4, edited.info


def test_statistics_keep_no_inputs_when_the_tail_reads_the_states_alone(setup: dict, monkeypatch) -> None:
    """The tensor-input model's tail runs alone, so the refinement's sample holds states and
    no inputs; the edit equals the one made from a sample that kept the inputs."""
    from koopman_hooks.data import TensorLoader

    probe, loader = setup["probe"], TensorLoader.from_dataset(setup["train"], 128)  # the same row order twice
    lean = probe.unlearning_statistics(loader)
    assert probe.fetch_model().tail_example is not None
    assert lean.reservoir.inputs.shape == (len(lean.reservoir), 0) and lean.reservoir.states.shape[1] > 0
    monkeypatch.setattr(type(probe.fetch_model()), "outputs_from_states", lambda self, dst, inputs: False)
    full = probe.unlearning_statistics(loader)
    assert full.reservoir.inputs.shape == (len(full.reservoir), 4)
    assert torch.equal(full.reservoir.states, lean.reservoir.states)
    a, b = probe.unlearn(1, lean), probe.unlearn(1, full)
    assert torch.allclose(a.readout, b.readout, atol=1e-6), (a.readout - b.readout).abs().max()
    assert a.info["refine_loss_after"] < a.info["refine_loss_before"]


def test_refinement_targets_follow_the_models_ranking_past_forgotten_classes() -> None:
    """Forgotten rows go to their runner-up retained class; a retained row to the model's best
    retained class, skipping forgotten ones; its label when the ranking is unknown; -1 when no
    retained class is among the ranked ones."""
    pool = SampleReservoir(10, seed=0)
    labels = torch.tensor([0, 1, 2, 1, 2])
    keys = torch.tensor([2, 0, 1, 0, 0])
    ranking = torch.tensor([[0, 2], [1, 0], [0, 2], [-1, -1], [0, 3]])
    pool.update(torch.zeros(5, 1), labels, keys, ranking)
    pool.update(torch.zeros(1, 1), torch.tensor([2]), torch.tensor([1]), None)  # a batch the model did not rank
    order = pool.labels.argsort(stable=True)  # the reservoir may reorder rows
    targets, forgotten = refinement_targets(pool, forget=[0, 3], retained=[1, 2])
    got = {(int(pool.labels[i]), tuple(pool.predictions[i].tolist())): (int(targets[i]), bool(forgotten[i])) for i in order}
    assert got == {(0, (0, 2)): (2, True), (1, (1, 0)): (1, False), (2, (0, 2)): (2, False),
                   (1, (-1, -1)): (1, False), (2, (0, 3)): (-1, False), (2, (-1, -1)): (2, False)}
