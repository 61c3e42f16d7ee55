"""Training losses of the Koopman autoencoder, and the output-matching loss."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from koopman_hooks.core.precision import float32_region
from koopman_hooks.core.schema import check_fields
from koopman_hooks.core.select import MODEL_OUTPUT
from koopman_hooks.koopman.autoencoder import KoopmanAutoencoder
from koopman_hooks.koopman.operator import advance


@dataclass(frozen=True)
class LossWeights:
    """Weights of the training losses (0 switches a term off).

    ``output`` matches the model's own outputs when ``layers[-1]`` is replaced by the
    prediction (KL divergence of the softmax: for classifiers); ``None`` (the default) turns it
    on (weight 1) when the model outputs class scores and its tail after ``layers[-1]`` can be
    run on its own, and off otherwise.
    """

    reconstruction: float = 1.0
    state: float = 1.0
    latent: float = 1.0
    isometry: float = 0.0
    topological: float = 0.0
    output: float | None = None

    def __post_init__(self) -> None:
        check_fields(self)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def fvu(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained, ``Σ‖pred − target‖² / Σ‖target − mean(target)‖²`` over
    the batch; the normaliser is not differentiated, so no term can win by shrinking its target
    (a collapsed target has no variance left and makes the loss large, not small). Computed in
    float32 whatever the inputs' precision (bfloat16 under autocast)."""
    pred, target = pred.float(), target.float()
    target_var = (target.detach() - target.detach().mean(0)).pow(2).mean()
    scale = target.detach().pow(2).mean()
    return (pred - target).pow(2).mean() / torch.maximum(target_var, 1e-6 * scale).clamp_min(1e-12)


def isometry_loss(a: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Mismatch of pairwise distances in and out of the latent space (relative)."""
    a, z = a.float(), z.float()
    da = torch.cdist(a, a)
    dz = torch.cdist(z, z)
    return (dz - da).pow(2).mean() / da.pow(2).mean().clamp_min(1e-8)


def batch_ridge_operator(z_in: torch.Tensor, z_out: torch.Tensor, ridge: float) -> torch.Tensor:
    """``K`` minimising ``‖z_out − z_in Kᵀ‖² + ridge·mean(diag)·‖K‖²`` (differentiable; in float32,
    also under autocast)."""
    with float32_region(z_in.device):
        return _ridge_solve(z_in.float(), z_out.float(), ridge)


def _ridge_solve(z_in: torch.Tensor, z_out: torch.Tensor, ridge: float) -> torch.Tensor:
    gram = z_in.T @ z_in / len(z_in)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    scale = gram.diagonal().mean().detach().clamp_min(1e-8)
    return torch.linalg.solve(gram + ridge * scale * eye, z_in.T @ z_out / len(z_in)).T


def koopman_losses(
    model: KoopmanAutoencoder,
    states: Sequence[torch.Tensor],
    weights: LossWeights,
    topological: nn.Module | None = None,
    closed_form_ridge: float | None = None,
) -> dict[str, torch.Tensor]:
    """The weighted training losses on a batch of adapted states, one per probed layer.

    - reconstruction: ``ψ(φ(a_l)) ≈ a_l`` at the first and the last layer, where the surrogate
      reads the network's state and where its output replaces it;
    - state: ``ψ(K^{o_j} φ(a_0)) ≈ a_j`` for every later layer ``j`` (what the surrogate predicts);
    - latent: ``K^s φ(a_i) ≈ φ(a_j)`` from layers[0] to every ``j`` and for consecutive pairs;
    - isometry: pairwise distances kept by φ; topological: the persistence-pair loss.

    In between, a layer is held by the latent and state terms only, which already tie
    ``φ(a_j)`` to ``K^{o_j} φ(a_0)`` and the decoding of that to ``a_j``. Decoding ``φ(a_j)`` and
    the consecutive predictions as well was half of the decoding; without it, the 6-block ViT
    recipe's fit (same model and data) took 91 s instead of 111 s, with a state FVU 0.007-0.009
    lower at the intermediate layers. Surrogates that start at an intermediate layer
    (``surrogate(src=...)``) are no longer trained directly: on that ViT their one-block FVU
    moved by +0.003 to +0.009, on a 5-block MLP from 0.023-0.030 to 0.028-0.035.

    Every term is a fraction of its target's variance (:func:`fvu`), so terms are comparable
    whatever the layers' widths and none can be lowered by collapsing the latent space.

    With ``n`` predicted layers the state term is the *sum* of their FVUs, so that each probed
    layer weighs as much against the reconstruction and output terms however many are probed
    (as a mean, the output term won over the middle layers), and the latent term (the mean over
    its pairs) is scaled by ``max(1, n / 2)``; with one predicted layer nothing changes. The
    measurements that chose both scalings are in the CHANGELOG.

    With ``closed_form_ridge``, K is not the operator's parameter but the ridge least-squares
    solution over this batch's consecutive latent pairs (one step each), differentiable, so the
    encoder learns a latent space in which the closed form fits well.
    """
    sizes = [len(a) for a in states]
    latents = list(model.encoder(torch.cat(list(states))).split(sizes))
    k = (model.operator.matrix() if closed_form_ridge is None
         else batch_ridge_operator(torch.cat(latents[:-1]), torch.cat(latents[1:]), closed_form_ridge))
    offsets = model.offsets
    pairs = [(0, j) for j in range(1, len(states))]
    pairs += [(i, i + 1) for i in range(1, len(states) - 1)]
    advanced: list[torch.Tensor] = []
    z = latents[0]
    for j in range(1, len(states)):  # from layers[0]: each layer's prediction advances the one before
        z = advance(k, z, offsets[j] - offsets[j - 1])
        advanced.append(z)
    advanced += [advance(k, latents[i], offsets[j] - offsets[i]) for i, j in pairs[len(states) - 1:]]
    # one decoder call for the two reconstructions and every prediction from layers[0]
    ends = [0, len(states) - 1]
    from_first = advanced[: len(states) - 1]
    decoded = model.decoder(torch.cat([*(latents[i] for i in ends), *from_first]))
    decoded = decoded.split([sizes[i] for i in ends] + [len(z) for z in from_first])
    losses: dict[str, torch.Tensor] = {}
    losses["reconstruction"] = torch.stack([fvu(p, states[i]) for p, i in zip(decoded, ends)]).mean()
    predictions = decoded[len(ends):]
    predicted = len(states) - 1
    losses["state"] = torch.stack([fvu(p, states[j]) for p, j in zip(predictions, range(1, len(states)))]).sum()
    latent_scale = max(1.0, predicted / 2)  # see the docstring: the latent term grows half as fast as the state's
    losses["latent"] = torch.stack([fvu(z, latents[j]) for z, (_, j) in zip(advanced, pairs)]).mean() * latent_scale
    losses["prediction"] = predictions[-1]  # the last layer's, from layers[0] (not a loss)
    if weights.isometry:
        losses["isometry"] = torch.stack([isometry_loss(a, z) for a, z in zip(states, latents)]).mean()
    if weights.topological and topological is not None:
        losses["topological"] = torch.stack([topological(a, z.float()) for a, z in zip(states, latents)]).mean()
    total = torch.zeros((), device=states[0].device)
    for name, value in losses.items():
        if name != "prediction":
            total = total + (getattr(weights, name) or 0.0) * value
    losses["total"] = total
    return losses


def output_matching_loss(patched_output: Any, model_output: Any, per_row: bool = False,
                         temperature: float = 1.0) -> torch.Tensor:
    """KL divergence from the model's softmax output to the patched model's, both softened by
    ``temperature`` and scaled by its square (distillation, Hinton et al. 2015: the targets
    carry the model's ranking of every class, not only its top one, and the gradients keep
    their size): the batch mean, or with ``per_row`` each row's."""
    t = float(temperature)
    student = torch.log_softmax(MODEL_OUTPUT.get(patched_output).float() / t, dim=-1)
    teacher = torch.log_softmax(MODEL_OUTPUT.get(model_output).float().detach() / t, dim=-1)
    if per_row:
        rows = torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="none")
        return rows.reshape(len(rows), -1).sum(1) * t * t
    return torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean") * t * t


def _mst_edges(distances: np.ndarray) -> np.ndarray:
    """``(n-1, 2)`` index pairs of a minimum spanning tree = the 0-dim persistence pairs (scipy)."""
    from scipy.sparse.csgraph import minimum_spanning_tree

    d = distances.astype(np.float64, copy=True)
    # scipy reads zero entries as "no edge": keep coincident points connected.
    off_diagonal = ~np.eye(d.shape[0], dtype=bool)
    d[(d <= 0) & off_diagonal] = np.finfo(np.float64).tiny
    tree = minimum_spanning_tree(d).tocoo()
    return np.stack([tree.row, tree.col], axis=1).astype(np.int64)


def _pair_distances(points: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(points[pairs[:, 0]] - points[pairs[:, 1]], dim=1)


class TopologicalLoss(nn.Module):
    """Persistent-homology loss of topological autoencoders (Moor et al., ICML 2020).

    For a batch ``x`` (input space) and ``z`` (latent), the 0-dim persistence pairs of the
    Vietoris-Rips filtration of each are the edges π of its minimum spanning tree (found on
    detached distances; the selection is not differentiable, the selected distances are)::

        loss = 0.5 * mean_{π_X} (D_X - D_Z)² + 0.5 * mean_{π_Z} (D_Z - D_X)²

    With ``normalise=True`` (default) each space's distances are divided by its mean pairwise
    distance, so spaces of different scale or dimension compare. Needs scipy.
    """

    def __init__(self, normalise: bool = True) -> None:
        super().__init__()
        self.normalise = normalise

    def _prepare(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        flat = points.reshape(points.shape[0], -1)
        scale = nn.functional.pdist(flat).mean() if self.normalise else flat.new_ones(())
        if self.normalise:
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        dist = torch.cdist(flat.detach().double(), flat.detach().double())
        pairs = torch.from_numpy(_mst_edges(dist.cpu().numpy())).to(flat.device)
        return flat, scale, pairs

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Scalar loss for a batch; ``x`` and ``z`` hold the same ``n`` samples, any shape."""
        if x.shape[0] != z.shape[0]:
            raise ValueError(f"x and z must hold the same samples: {x.shape[0]} vs {z.shape[0]}")
        if x.shape[0] < 2:
            return z.sum() * 0.0
        x_flat, x_scale, x_pairs = self._prepare(x)
        z_flat, z_scale, z_pairs = self._prepare(z)
        x_flat = x_flat.to(z_flat.dtype)
        x_scale = x_scale.to(z_flat.dtype)

        def term(pairs: torch.Tensor) -> torch.Tensor:
            dx = _pair_distances(x_flat, pairs) / x_scale
            dz = _pair_distances(z_flat, pairs) / z_scale
            return 0.5 * ((dx - dz) ** 2).mean()

        return term(x_pairs) + term(z_pairs)
