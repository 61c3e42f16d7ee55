"""Recipes are TOML files checked against one schema before any work is done.

Sections: ``[data]``, ``[model]`` (per ``kind``), ``[train]``, ``[probe]`` (the
:class:`~koopman_hooks.KoopmanProbe` options plus ``epochs`` and ``samples``), ``[report]`` and
the optional ``[topology]``, ``[unlearning]`` and ``[targets]``. Unknown sections or keys are
refused naming the closest valid one; wrong types name the key, what was expected and what
was given (:class:`~koopman_hooks.errors.ConfigError`).
"""

from __future__ import annotations

import ast
import inspect
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import tomllib

from koopman_hooks.core.schema import check, closest, from_mapping
from koopman_hooks.data.augment import RandomShift
from koopman_hooks.errors import ConfigError
from koopman_hooks.recipes.builders import ModelSection, check_data_model, check_model_section
from koopman_hooks.unlearning.options import EditOptions, Method

Baseline = Literal["original", "retrain", "finetune", "neggrad_plus", "leace_baseline"]


@dataclass(frozen=True)
class DataSection:
    """``[data]``: the dataset; ``vocab_size``, ``min_length`` and ``max_length`` shape the
    ``"tokens"`` task (:class:`~koopman_hooks.data.TokenSequenceDataset`)."""

    dataset: Literal["yinyang", "mnist", "tokens"]
    train_size: int | None = None
    test_size: int | None = None
    data_seed: int = 0
    flatten: bool = False
    data_root: str | None = None
    vocab_size: int = 16
    min_length: int = 6
    max_length: int = 16

    def __post_init__(self) -> None:
        for name in ("train_size", "test_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1 (leave it out for the dataset's default), "
                                  f"got {getattr(self, name)}")
        if self.data_seed < 0:
            raise ConfigError(f"data.data_seed must be >= 0, got {self.data_seed}")
        if self.vocab_size < 1 or not 1 <= self.min_length <= self.max_length:
            raise ConfigError(f"data needs vocab_size >= 1 and 1 <= min_length <= max_length, got {self.vocab_size}, "
                              f"{self.min_length} and {self.max_length}")


@dataclass(frozen=True)
class TrainSection:
    """``[train]``: how the recipe trains its model (and the retraining, fine-tuning and
    NegGrad+ baselines): AdamW with a one-cycle schedule; ``shift`` > 0 translates every
    training image by a random whole-pixel offset of up to ``shift`` (image data only)."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    shift: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"train.epochs must be >= 1, got {self.epochs}")
        if self.shift < 0:
            raise ConfigError(f"train.shift must be >= 0 (pixels), got {self.shift}")
        if self.batch_size < 1:
            raise ConfigError(f"train.batch_size must be >= 1, got {self.batch_size}")
        if not 0 < self.lr < math.inf:
            raise ConfigError(f"train.lr must be a positive number, got {self.lr}")
        if not 0 <= self.weight_decay < math.inf:
            raise ConfigError(f"train.weight_decay must be a number >= 0, got {self.weight_decay}")

    def augment(self, seed: int) -> RandomShift | None:
        """The training batches' augmentation (None without ``shift``), drawing from ``seed``."""
        return RandomShift(self.shift, seed) if self.shift else None


@dataclass(frozen=True)
class ReportSection:
    pca_layers: tuple[str, ...] | None = None


@dataclass(frozen=True)
class TopologySection:
    n_points: int = 2000
    layers: tuple[str, ...] | None = None
    epsilon: float | None = None
    quantile: float = 0.99
    k: int = 1
    dims: tuple[int, ...] = (0, 1)
    per_class: bool = False
    metric: Literal["euclidean", "knn"] = "euclidean"
    n_neighbors: int = 10
    variance: float | None = None

    def __post_init__(self) -> None:
        if self.n_points < 2 or self.k < 1 or self.n_neighbors < 1:
            raise ConfigError(f"topology needs n_points >= 2, k >= 1 and n_neighbors >= 1, got {self.n_points}, "
                              f"{self.k} and {self.n_neighbors}")
        if not 0 < self.quantile <= 1:
            raise ConfigError(f"topology.quantile must be in (0, 1], got {self.quantile}")
        if self.epsilon is not None and not 0 < self.epsilon < math.inf:
            raise ConfigError(f"topology.epsilon must be a positive number, got {self.epsilon}")
        if self.variance is not None and not 0 < self.variance <= 1:
            raise ConfigError(f"topology.variance must be in (0, 1], got {self.variance}")
        if not self.dims or any(d not in (0, 1) for d in self.dims):
            raise ConfigError(f"topology.dims must list homology dimensions 0 and/or 1, got {list(self.dims)}")


@dataclass(frozen=True)
class UnlearningSection:
    methods: tuple[Method, ...] = ("endpoint", "per_step", "leace")
    classes: Literal["all"] | tuple[int, ...] = "all"
    baselines: tuple[Baseline, ...] = ("original", "retrain", "finetune", "neggrad_plus", "leace_baseline")
    baseline_classes: Literal["all"] | tuple[int, ...] = "all"
    batch_size: int | None = None
    eval_train_samples: int = 10000
    stats_samples: int | None = None  # training rows streamed for the statistics (and the LEACE baseline)
    # "fit_cache": the Koopman edits' statistics read the rows the probe's fit cached (its states,
    # scores and labels) instead of running the model over stats_samples rows again
    statistics_from: Literal["data", "fit_cache"] = "data"
    finetune_epochs: float = 3.0  # a fraction runs that share of one epoch's steps
    finetune_lr: float | None = None
    neggrad_epochs: float = 3.0
    neggrad_lr: float | None = None
    neggrad_alpha: float = 0.99
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("finetune_epochs", "neggrad_epochs"):
            if not 0 < getattr(self, name) < math.inf:
                raise ConfigError(f"unlearning.{name} must be a positive number of epochs, got {getattr(self, name)}")
        from_mapping(EditOptions, self.options, "unlearning.options")


@dataclass(frozen=True)
class ProbeSection:
    """``[probe]``: ``layers``, any :class:`~koopman_hooks.KoopmanProbe` option, the fit's
    ``epochs`` (an upper bound; default: the probe's) and ``samples``, the training images the
    probe is fitted on (the first ``samples``; default: the whole training set)."""

    layers: tuple[str, ...]
    epochs: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    samples: int | None = None


@dataclass(frozen=True)
class Recipe:
    """A whole recipe, validated."""

    name: str
    data: DataSection
    model: ModelSection
    train: TrainSection = field(default_factory=TrainSection)
    probe: ProbeSection | None = None
    report: ReportSection = field(default_factory=ReportSection)
    topology: TopologySection | None = None
    unlearning: UnlearningSection | None = None
    targets: dict[str, str] = field(default_factory=dict)
    threads: int | None = None


SECTIONS = {"data": DataSection, "train": TrainSection, "report": ReportSection, "topology": TopologySection,
            "unlearning": UnlearningSection}
TOP_LEVEL = ("name", "threads", "data", "model", "train", "probe", "report", "topology", "unlearning", "targets")
# KoopmanProbe options a recipe may set (the model, device, seed and verbosity come from the run)
_RUN_OWNED = ("model", "device", "seed", "verbose", "select")


def probe_options() -> list[str]:
    from koopman_hooks.probe import KoopmanProbe

    names = list(inspect.signature(KoopmanProbe.__init__).parameters)[1:]
    return [n for n in names if n not in _RUN_OWNED]


def parse_recipe(raw: Mapping[str, Any], default_name: str = "recipe") -> Recipe:
    """Check a recipe's plain data (a parsed TOML file) and build the typed :class:`Recipe`."""
    raw = dict(raw)
    for key in raw:
        if key not in TOP_LEVEL:
            raise ConfigError(f"unknown section or key {key!r}{closest(key, list(TOP_LEVEL))} "
                              f"(recipes have: {', '.join(TOP_LEVEL)})")
    for key in ("data", "model"):
        if key not in raw:
            raise ConfigError(f"the recipe has no [{key}] section")
    values: dict[str, Any] = {"name": check(raw.get("name", default_name), str, "name")}
    if "threads" in raw:
        values["threads"] = check(raw["threads"], int | None, "threads")
        if values["threads"] is not None and values["threads"] < 0:
            raise ConfigError(f"threads must be >= 1 (or 0: no limit), got {values['threads']}")
    for key, cls in SECTIONS.items():
        if key in raw:
            values[key] = from_mapping(cls, raw[key], key)
    values["model"] = check_model_section(raw["model"])
    check_data_model(values["data"], values["model"])
    train, data = values.get("train", TrainSection()), values["data"]
    if train.shift and (data.dataset != "mnist" or data.flatten):
        raise ConfigError(f"train.shift translates images: it needs unflattened image data, not "
                          f"{data.dataset!r}{' (flatten = true)' if data.flatten else ''}")
    if "probe" in raw:
        values["probe"] = _probe_section(raw["probe"])
    targets = check(raw.get("targets", {}), dict[str, str], "targets")
    for path, rule in targets.items():
        parse_target(path, rule)
    values["targets"] = targets
    return Recipe(**values)


def _probe_section(raw: Any) -> ProbeSection:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"probe: expected a table, got {type(raw).__name__}")
    raw = dict(raw)
    if "layers" not in raw:
        raise ConfigError("[probe] needs layers = [...]")
    valid = [*probe_options(), "epochs", "samples"]
    for key in raw:
        if key not in valid:
            raise ConfigError(f"unknown key 'probe.{key}'{closest(key, valid)} (valid: {', '.join(valid)})")
    layers = raw.pop("layers")
    layers = check([layers] if isinstance(layers, str) else layers, tuple[str, ...], "probe.layers")
    epochs = check(raw.pop("epochs", None), int | None, "probe.epochs")
    if epochs is not None and epochs < 1:
        raise ConfigError("probe.epochs must be >= 1")
    samples = check(raw.pop("samples", None), int | None, "probe.samples")
    if samples is not None and samples < 1:
        raise ConfigError("probe.samples must be >= 1")
    return ProbeSection(layers, epochs, raw, samples)


_COMPARE_OPS = (">=", "<=", ">", "<")


def parse_target(path: str, rule: str) -> tuple[str, float]:
    """``">= 0.99"`` as ``(">=", 0.99)`` (:class:`ConfigError` naming the target otherwise)."""
    op, _, threshold = rule.strip().partition(" ")
    try:
        limit = float(threshold)
    except ValueError:
        limit = float("nan")
    if op not in _COMPARE_OPS or limit != limit:
        raise ConfigError(f"target {path!r}: rule {rule!r} must be '<op> <number>' with op one of {list(_COMPARE_OPS)}")
    return op, limit


def packaged_recipe(name: str) -> Path | None:
    """The recipe file shipped with the package under ``name`` (e.g. ``"yinyang"``), if any."""
    candidate = resources.files("koopman_hooks.recipes") / "library" / f"{name}.toml"
    return Path(str(candidate)) if candidate.is_file() else None


def packaged_names() -> list[str]:
    folder = resources.files("koopman_hooks.recipes") / "library"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def read_recipe(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The plain data of a recipe file (or a packaged recipe's name) with overrides applied."""
    file = Path(path)
    if not file.exists() and not file.suffix:
        file = packaged_recipe(str(path)) or file
    if not file.is_file():
        raise FileNotFoundError(f"no recipe file {str(path)!r} (packaged recipes: {', '.join(packaged_names())})")
    try:
        with file.open("rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{file}: not valid TOML: {err}") from None
    raw.setdefault("name", file.stem)
    for item in overrides:
        set_by_path(raw, item)
    return raw


def load_recipe(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Recipe:
    """Read and check a recipe file (or a packaged recipe's name, e.g. ``"yinyang"``) with
    ``section.key=value`` overrides applied."""
    raw = read_recipe(path, overrides)
    return parse_recipe(raw, str(raw.get("name")))


def set_by_path(recipe: dict[str, Any], assignment: str) -> None:
    """Apply ``"probe.epochs=5"``; the value is a Python/TOML literal, else a string."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {assignment!r} is not of the form section.key=value")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = {"true": True, "false": False}.get(raw.lower(), raw)
    node = recipe
    parts = key.strip().split(".")
    if parts[0] == "targets" and len(parts) > 2:  # a target's name holds dots itself: targets.surrogate.agreement
        parts = ["targets", ".".join(parts[1:])]
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {assignment!r}: {part!r} is not a section")
    node[parts[-1]] = value
