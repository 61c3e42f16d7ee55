"""Tests of koopman_hooks/analysis/topology.py: the lens of surrogate steps that stand for layers."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

import koopman_hooks.analysis.topology as topology
from koopman_hooks.analysis import betti
from koopman_hooks.analysis.trajectories import Trajectories


def test_steps_that_stand_for_layers_keep_their_layers_number_of_directions(monkeypatch) -> None:
    rng = np.random.default_rng(0)
    scales = 0.8 ** np.arange(20)  # a smoothly decaying spectrum
    clouds = [torch.as_tensor(rng.normal(size=(400, 20)) * scales * (1 + 0.1 * i)) for i in range(3)]
    truncated = [c.clone() for c in clouds]
    for c in truncated:
        c[:, 12:] = 0  # the decoded states lack the layers' small-variance tail
    # steps 0, 2, 4 stand for layers a, b, c; steps 1 and 3 lie between them
    steps = [truncated[0], truncated[0] * 0.9, truncated[1], truncated[1] * 0.9, truncated[2]]
    traj = Trajectories({"a": clouds[0], "b": clouds[1], "c": clouds[2]}, steps, None)
    monkeypatch.setattr(topology, "collect_trajectories", lambda *args: traj)
    probe = SimpleNamespace(layers=["a", "b", "c"], autoencoder=SimpleNamespace(offsets=[0, 2, 4]))
    result = topology.compare_topology(probe, [], n_points=400, dims=(0,), variance=0.9)  # type: ignore[arg-type]
    network, surrogate = result["lens_dims"]["network"], result["lens_dims"]["surrogate"]
    own = [betti.principal_projection(s.numpy(), 0.9).shape[1] for s in steps]
    assert own[0] < network[0]  # their own 90% would see the steps in fewer dimensions than the layers
    assert [surrogate[0], surrogate[2], surrogate[4]] == network
    assert [surrogate[1], surrogate[3]] == [own[1], own[3]]  # steps between layers keep their own lens


def test_start_and_final_errors_compare_the_layers_the_steps_stand_for(monkeypatch) -> None:
    rng = np.random.default_rng(1)
    layer = {name: torch.as_tensor(rng.normal(size=(200, 6)) * (i + 1)) for i, name in enumerate("abc")}
    steps = [layer["a"], layer["b"], layer["c"]]  # steps 0..2 stand for layers a, b, c
    probe = SimpleNamespace(layers=["a", "c"], autoencoder=SimpleNamespace(offsets=[0, 2]))

    def compare(names: list[str]) -> dict:
        traj = Trajectories({n: layer[n] for n in names}, steps, None)
        monkeypatch.setattr(topology, "collect_trajectories", lambda *args: traj)
        return topology.compare_topology(probe, [], n_points=200, dims=(0,), epsilon=0.5)  # type: ignore[arg-type]

    whole = compare(["a", "b", "c"])
    assert whole["start_betti0_relative_error"] == whole["final_betti0_relative_error"] == 0.0
    assert compare(["a", "b"])["final_betti0_relative_error"] is None  # the last probed layer is not counted
    assert compare(["b", "c"])["start_betti0_relative_error"] is None
    assert compare(["b", "c"])["final_betti0_relative_error"] == 0.0
