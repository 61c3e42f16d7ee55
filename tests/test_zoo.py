"""The held-out zoo's fast variant: models nobody tuned the probe for, fitted with defaults only.

Each entry trains its own small model (``benchmarks/zoo.py``), calls
``KoopmanProbe(model, layers).fit(loader)`` with nothing else set and checks, on held-out data,
that the fit kept its promise: never worse than the closed-form linear start it began from (up to
one held-out sample of noise), faithful in absolute terms, and the latents follow K.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

ZOO_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "zoo.py"


def _zoo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("koopman_hooks_zoo", ZOO_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


ZOO = _zoo()
FAST_ENTRIES = ["plain_mlp", "tuple_outputs", "train_mode"]  # the cheap ones: MLP, tuple outputs, train-mode model


@pytest.mark.parametrize("name", FAST_ENTRIES)
def test_defaults_on_held_out_zoo(name: str) -> None:
    entry = next(e for e in ZOO.ZOO if e.name == name)
    row = ZOO.run_entry(entry, fast=True)
    n_test = 1000 if name == "tuple_outputs" else 797  # digits: 1,797 samples, 1,000 fitted on
    noise = 1.0 / n_test
    assert row["agreement"] >= row["linear_baseline_agreement"] - noise, row
    assert row["agreement"] >= 0.97, row
    for layer, fvu in row["state_fvu_per_layer"].items():
        assert math.isfinite(fvu) and fvu < 0.1, (layer, row)
    for layer, fvu in row["latent_fvu_per_layer"].items():
        assert fvu <= 0.1, (layer, row)  # the latent dynamics are linear, not only the endpoints
    assert row["fit"]["model_passes"] <= 3, row["fit"]
