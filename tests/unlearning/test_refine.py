"""Tests of koopman_hooks/unlearning/refine.py."""

from __future__ import annotations

import pytest
import torch

from koopman_hooks.unlearning.refine import SampleReservoir


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
    assert torch.equal(a.predictions, index % 5)  # rows stay aligned
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
