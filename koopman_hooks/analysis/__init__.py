"""Analysis of a fitted probe: fidelity, trajectories, Betti numbers of layers and surrogate steps."""

from koopman_hooks.analysis.fidelity import evaluate
from koopman_hooks.analysis.topology import compare_topology
from koopman_hooks.analysis.trajectories import Trajectories, collect_trajectories

__all__ = ["Trajectories", "collect_trajectories", "compare_topology", "evaluate"]
