"""``EditOptions``: every knob of a Koopman unlearning edit, typed and validated once."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from koopman_hooks.core.schema import check, check_fields, from_mapping
from koopman_hooks.errors import ConfigError

Method = Literal["endpoint", "per_step", "leace"]
LabelSource = Literal["loader", "model"]
Redirect = Literal["runner_up", "nearest"]
Metric = Literal["decoder", "euclidean"]
Solver = Literal["auto", "direct", "cg"]


@dataclass(frozen=True)
class EditOptions:
    """Knobs of :func:`~koopman_hooks.unlearning.edit.unlearn` (defaults tuned on Yin-Yang).

    Attributes:
        strength: weight of the forgotten samples relative to the retained ones.
        contract: β_R, retained groups may shrink towards their own mean.
        spread: β_F, forgotten samples keep this fraction of their spread around the target.
        match: and this fraction of the target class's spread (Gaussian optimal transport).
        metric: ``"decoder"`` pull-back metric or ``"euclidean"``.
        metric_eps: ε added to the normalised pull-back metric.
        metric_rows: rows per batch whose decoder Jacobian estimates the pull-back metric when
            the decoder has more than one hidden layer (the default decoder's metric is exact,
            over every row, in closed form).
        refine: L-BFGS iterations refining the redirect on the patched model's outputs (0: off).
        refine_rows: rows the refinement fits on. It fits a ``d × (d+1)`` map, and more rows
            fit it better at a proportional cost.
        refine_pool: the statistics keep a seeded sample of ``refine_pool × refine_rows`` rows;
            each edit's refinement draws its ``refine_rows`` from it, favouring the forgotten
            rows and the retained rows whose runner-up class is forgotten (the rows an edit can
            flip), weighted back to the sample's proportions. Costs memory, not edit time.
        proximal: pull of the refinement towards the least-squares redirect.
        retain_weight: share of the refinement loss on retained (vs forgotten) samples.
        redirect: target of a forgotten sample: the model's ``"runner_up"`` retained class, or
            the ``"nearest"`` retained class mean.
        ridge: relative ridge towards the identity edit.
        iterations: L-BFGS iterations of the per-step operator fit.
        solver: metric least squares: ``"direct"`` (Kronecker), ``"cg"``, or ``"auto"``.
    """

    strength: float = 1.5
    contract: float = 0.7
    spread: float = 0.0
    match: float = 0.0
    metric: Metric = "decoder"
    metric_eps: float = 0.1
    metric_rows: int = 64
    refine: int = 10
    refine_rows: int = 2048
    refine_pool: int = 4
    proximal: float = 1e-2
    retain_weight: float = 0.8
    redirect: Redirect = "runner_up"
    ridge: float = 1e-6
    iterations: int = 100
    solver: Solver = "auto"

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("strength", "spread", "match", "metric_eps", "proximal", "ridge"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:  # NaN passes `< 0` and an infinite weight makes every entry NaN
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
        if not math.isfinite(self.contract):
            raise ConfigError(f"contract must be a finite number, got {self.contract}")
        for name in ("refine", "refine_rows", "iterations"):  # refine_rows=0: statistics without refinement rows
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.metric == "decoder" and self.metric_rows < 1:
            raise ConfigError(f"metric_rows must be >= 1 (rows per batch whose decoder Jacobian is taken), got {self.metric_rows}")
        if self.refine_pool < 1:
            raise ConfigError(f"refine_pool must be >= 1, got {self.refine_pool}")
        if not 0.0 <= self.retain_weight <= 1.0:
            raise ConfigError(f"retain_weight must be in [0, 1], got {self.retain_weight}")

    @property
    def sample_rows(self) -> int:
        """Rows the statistics must sample for this edit's refinement (0 without refinement)."""
        return self.refine_rows * self.refine_pool if self.refine else 0

    @classmethod
    def for_method(cls, method: Method, options: Mapping[str, Any] | None = None) -> EditOptions:
        """The defaults of ``method`` with ``options`` applied (unknown names are refused)."""
        check(method, Method, "method")
        return from_mapping(cls, {**METHOD_DEFAULTS.get(method, {}), **dict(options or {})})

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: Per-method overrides of the defaults: LEACE spreads the forgotten samples over half the
#: target class's (Gaussian optimal-transport) spread, so they blend in rather than collapse.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {"leace": {"match": 0.5}}
