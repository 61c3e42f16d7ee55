"""The protocol every recipe section follows, and the context a seed's run hands it."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from torch import nn
from torch.utils.data import Dataset, Subset

from koopman_hooks.core import distributed
from koopman_hooks.data import TensorLoader
from koopman_hooks.probe import KoopmanProbe
from koopman_hooks.recipes.config import Recipe


@dataclass
class RunContext:
    """Everything a section needs about one seed's run."""

    recipe: Recipe
    seed: int
    out_dir: Path
    train_set: Dataset
    test_set: Dataset
    num_classes: int
    new_model: Callable[[], nn.Module]
    model: nn.Module
    probe: KoopmanProbe
    train_seconds: float
    train_loss: list[float]
    verbose: bool = True
    results: dict[str, Any] = field(default_factory=dict)

    def loader(self, dataset: Dataset, batch_size: int = 512, shuffle: bool = False,
               limit: int | None = None, shard: bool = False) -> TensorLoader:
        """A loader over ``dataset`` (its first ``limit`` rows); with ``shard``, under
        ``torch.distributed``, only this rank's rows (``rank``, ``rank + world``, ...)."""
        if shard and distributed.active():
            size = min(len(dataset), limit) if limit is not None else len(dataset)  # type: ignore[arg-type]
            dataset, limit = Subset(dataset, range(distributed.rank(), size, distributed.world_size())), None
        return TensorLoader.from_dataset(dataset, batch_size=batch_size, shuffle=shuffle, seed=self.seed, limit=limit)


class Section(Protocol):
    """One part of a recipe's report.

    ``run`` returns a seed's results (merged into that seed's results; an optional
    ``"time_parts"`` entry, a :class:`~koopman_hooks.recipes.timing.Stopwatch`, says where the
    section's time went and is moved to the seed's ``wall_time`` and ``cpu_time``), ``aggregate`` the
    report entries over seeds (merged into the report), ``markdown`` the report's lines and
    ``figures`` the report-level figures it drew (``{name: path}``).
    """

    name: str

    def enabled(self, recipe: Recipe) -> bool: ...

    def run(self, context: RunContext) -> dict[str, Any]: ...

    def aggregate(self, runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]: ...

    def markdown(self, report: Mapping[str, Any]) -> list[str]: ...

    def figures(self, report: Mapping[str, Any], out: Path) -> dict[str, Path]: ...

    def target_names(self, recipe: Recipe, layers: Sequence[str]) -> list[str]:
        """The dotted report figures of this section a recipe's ``[targets]`` may name
        (``layers``: the probed layers, resolved)."""
        ...
