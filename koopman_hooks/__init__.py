"""koopman_hooks: read and edit any PyTorch model as a linear dynamical system."""

from koopman_hooks._version import __version__
from koopman_hooks.core.patching import PatchedModel
from koopman_hooks.errors import ConfigError, IncompatibleFileError, LayerError, NotFittedError, ShapeError
from koopman_hooks.fitting.config import ProbeConfig
from koopman_hooks.fitting.fitted import FittedProbe
from koopman_hooks.koopman.losses import LossWeights
from koopman_hooks.koopman.surrogate import KoopmanSurrogate
from koopman_hooks.probe import KoopmanProbe

__all__ = [
    "ConfigError",
    "FittedProbe",
    "IncompatibleFileError",
    "KoopmanProbe",
    "KoopmanSurrogate",
    "LayerError",
    "LossWeights",
    "NotFittedError",
    "PatchedModel",
    "ProbeConfig",
    "ShapeError",
    "__version__",
]
