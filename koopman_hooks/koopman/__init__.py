"""The Koopman model: reductions, adapters, operator, autoencoder, losses, linear fits, surrogate."""

from koopman_hooks.koopman.adapters import AdapterFitter, LayerAdapter
from koopman_hooks.koopman.autoencoder import AutoencoderConfig, KoopmanAutoencoder
from koopman_hooks.koopman.linear import LinearBaselineFitter, RidgeOperatorFitter
from koopman_hooks.koopman.losses import LossWeights, TopologicalLoss, koopman_losses, output_matching_loss
from koopman_hooks.koopman.operator import KoopmanOperator, Parametrization
from koopman_hooks.koopman.surrogate import KoopmanSurrogate

__all__ = [
    "AdapterFitter",
    "AutoencoderConfig",
    "KoopmanAutoencoder",
    "KoopmanOperator",
    "KoopmanSurrogate",
    "LayerAdapter",
    "LinearBaselineFitter",
    "LossWeights",
    "Parametrization",
    "RidgeOperatorFitter",
    "TopologicalLoss",
    "koopman_losses",
    "output_matching_loss",
]
