"""Analysis of a fitted probe: fidelity, K's spectrum, trajectories, Betti numbers of layers and surrogate steps."""

from koopman_hooks.analysis.fidelity import evaluate
from koopman_hooks.analysis.spectrum import KoopmanSpectrum, koopman_spectrum
from koopman_hooks.analysis.topology import compare_topology
from koopman_hooks.analysis.trajectories import Trajectories, collect_trajectories

__all__ = ["KoopmanSpectrum", "Trajectories", "collect_trajectories", "compare_topology", "evaluate", "koopman_spectrum"]
