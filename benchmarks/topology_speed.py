"""Time one β0 of 2,000 points (koopman_hooks.topology.betti_numbers, dims=(0,)).

Points: 4 noisy Gaussian blobs in 10-D, normalised, ε from the default rule. Prints the
median of 5 runs and writes benchmarks/results/topology_speed.json. Target: <= 1 s on
2 CPU cores.

    python benchmarks/topology_speed.py
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from koopman_hooks.analysis.betti import betti_numbers, epsilon_from_reference, normalise  # noqa: E402

N_POINTS, DIM, N_BLOBS, REPEATS, TARGET_S = 2000, 10, 4, 5, 1.0


def make_points(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = 5.0 * rng.normal(size=(N_BLOBS, DIM))
    return centres[rng.integers(N_BLOBS, size=N_POINTS)] + rng.normal(size=(N_POINTS, DIM))


def main() -> dict:
    x = normalise(make_points())
    t0 = time.perf_counter()
    eps = epsilon_from_reference(x)
    eps_s = time.perf_counter() - t0
    betti_numbers(x[:100], eps, dims=(0,))  # warm-up: imports gtda
    times, betti0 = [], None
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        betti0 = betti_numbers(x, eps, dims=(0,))[0]
        times.append(time.perf_counter() - t0)
    result = {
        "task": f"beta0 of {N_POINTS} points ({N_BLOBS} noisy blobs, {DIM}-D), Vietoris-Rips at eps",
        "epsilon": eps,
        "betti0": betti0,
        "epsilon_rule_seconds": eps_s,
        "median_seconds": statistics.median(times),
        "times_seconds": times,
        "target_seconds": TARGET_S,
        "meets_target": statistics.median(times) <= TARGET_S,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    out = ROOT / "benchmarks" / "results" / "topology_speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"beta0={betti0} at eps={eps:.4f}: median {result['median_seconds']:.3f} s "
          f"over {REPEATS} runs (target <= {TARGET_S} s) -> {out.relative_to(ROOT)}")
    return result


if __name__ == "__main__":
    main()
