"""Fitting a probe: its typed configuration, the training loop and the fitted artifact."""

from koopman_hooks.fitting.config import OperatorFit, ProbeConfig
from koopman_hooks.fitting.fitted import FittedProbe
from koopman_hooks.fitting.trainer import fit_probe

__all__ = ["FittedProbe", "OperatorFit", "ProbeConfig", "fit_probe"]
