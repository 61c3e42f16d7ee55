"""koopman_hooks: read and edit any PyTorch model as a linear dynamical system."""

__version__ = "0.1.0"

from koopman_hooks.autoencoder import LossWeights  # noqa: E402
from koopman_hooks.hooks import LayerError  # noqa: E402
from koopman_hooks.patching import PatchedModel  # noqa: E402
from koopman_hooks.probe import KoopmanProbe, NotFittedError  # noqa: E402
from koopman_hooks.surrogate import KoopmanSurrogate  # noqa: E402

__all__ = ["KoopmanProbe", "KoopmanSurrogate", "LayerError", "LossWeights", "NotFittedError", "PatchedModel", "__version__"]
