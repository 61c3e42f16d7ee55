"""Per-layer reductions: an activation of any shape ``(B, ...)`` to features ``(B, F)`` and back.

- ``"flatten"``: every value (exact);
- ``"pool:HxW"``: adaptive average pooling of conv maps ``(B, C, H, W)``;
- ``"cls"``: token 0 of ``(B, N, D)`` token states;
- ``"last"``: the last real token of each row (the last position the attention ``mask`` keeps,
  position ``N - 1`` without a mask), where a causal model's head reads;
- ``"mean"``: the mean of the real tokens (of every token without a mask).

Lossy reductions decode a prediction with ``like``, the layer's real output, keeping what the
reduction ignores from it; without ``like`` (strict mode) that part comes from a fixed
``template`` (the training mean of the layer's output), so nothing real leaks in. The
predicted features always go where the reduction read them: token 0, each row's last real
token, or a shift of the real tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

from koopman_hooks.errors import ConfigError, warn

REDUCE_MODES = ("flatten", "pool", "cls", "last", "mean")
TOKEN_MODES = ("cls", "last", "mean")
MASK_MODES = ("last", "mean")  # the token reductions that read the attention mask


def warn_without_mask(reductions: Sequence[str], where: str) -> None:
    """Warn that inputs without an attention mask reach reductions fitted with one: each row's
    last position is then read as its last real token, and padding as tokens."""
    modes = sorted({parse_reduce(r)[0] for r in reductions} & set(MASK_MODES))
    if modes:
        warn(f"{where} was fitted on batches with an attention mask, but these inputs have none: its "
             f"{' and '.join(repr(m) for m in modes)} reduction reads every position as a real token (each "
             "row's last position as its last one); pass the mask as in the fit")


def parse_reduce(spec: str) -> tuple[str, tuple[int, int] | None]:
    """``"flatten"``, ``"cls"``, ``"last"``, ``"mean"``, ``"pool"`` (2x2) or ``"pool:HxW"``."""
    if not isinstance(spec, str):
        raise ConfigError(f"reduce must be a string such as 'flatten' or 'pool:2x2', got {spec!r}")
    mode, _, arg = spec.partition(":")
    if mode not in REDUCE_MODES:
        raise ConfigError(f"unknown reduce {spec!r}; choose from flatten, pool[:HxW], cls, last, mean")
    if mode != "pool":
        if arg:
            raise ConfigError(f"reduce {mode!r} takes no size, got {spec!r}")
        return mode, None
    h, _, w = (arg or "2x2").partition("x")
    try:
        size = (int(h), int(w or h))
    except ValueError:
        raise ConfigError(f"reduce {spec!r}: the pool size must be HxW with integers, e.g. 'pool:2x2'") from None
    if min(size) < 1:
        raise ConfigError(f"reduce {spec!r}: pool sizes must be positive")
    return mode, size


def check_reduce(spec: str, shape: Sequence[int], layer: str = "?") -> None:
    """Raise :class:`ConfigError` unless ``spec`` applies to per-sample ``shape``."""
    mode, _ = parse_reduce(spec)
    if mode == "pool" and len(shape) != 3:
        raise ConfigError(f"reduce {spec!r} at layer {layer!r} needs (C, H, W) maps, got per-sample shape {tuple(shape)}")
    if mode in TOKEN_MODES and len(shape) != 2:
        raise ConfigError(f"reduce {spec!r} at layer {layer!r} needs (N, D) tokens, got per-sample shape {tuple(shape)}")


def token_mask(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """``mask`` as a boolean ``(B, N)`` tensor on ``x``'s device for tokens ``x`` of shape
    ``(B, N, D)`` (``None`` stays ``None``); a mask of another shape is an error."""
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(
            f"the attention mask has shape {tuple(mask.shape)} but the layer's tokens are {tuple(x.shape[:2])} "
            "(batch, tokens): the mask does not index this layer's tokens; use reduce='flatten' or 'cls' there"
        )
    return mask.to(x.device) != 0


def last_positions(mask: torch.Tensor | None, batch: int, tokens: int, device: torch.device | None = None) -> torch.Tensor:
    """Each row's last real token (the last position ``mask`` keeps; ``tokens - 1`` without a
    mask, 0 for a row the mask hides whole), as HuggingFace classifiers find it."""
    if mask is None:
        return torch.full((batch,), tokens - 1, dtype=torch.long, device=device)
    order = torch.arange(tokens, device=mask.device)
    return (order * mask.long()).argmax(-1)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return x.mean(1)
    weights = mask.to(x.dtype)[..., None]
    return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def reduce_activation(x: torch.Tensor, spec: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Flatten a batch of activations ``(B, ...)`` to ``(B, F)`` as ``spec`` says; token
    reductions read the ``(B, N)`` attention ``mask`` (see the module docstring)."""
    mode, size = parse_reduce(spec)
    if mode == "flatten":
        return rearrange(x, "b ... -> b (...)")
    if mode == "pool":
        if x.ndim != 4:
            raise ConfigError(f"reduce 'pool' needs (B, C, H, W) maps, got shape {tuple(x.shape)}")
        assert size is not None
        return rearrange(F.adaptive_avg_pool2d(x, size), "b c h w -> b (c h w)")
    if x.ndim != 3:
        raise ConfigError(f"reduce {mode!r} needs (B, N, D) tokens, got shape {tuple(x.shape)}")
    if mode == "cls":
        return x[:, 0]
    valid = token_mask(mask, x)
    if mode == "last":
        return x[torch.arange(len(x), device=x.device), last_positions(valid, len(x), x.shape[1], x.device)]
    return _masked_mean(x, valid)


def expand_activation(flat: torch.Tensor, spec: str, shape: Sequence[int], like: torch.Tensor | None,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`reduce_activation` into per-sample ``shape``.

    ``flatten`` is exact. Lossy reductions keep what the reduction ignored from ``like`` (a
    batch of real outputs, or one template broadcast over the batch): ``pool`` adds the
    least-norm change whose pooling is the change of the pooled map (nearest upsampling when
    the pool size divides the map, so ``reduce(expand(flat)) == flat`` for any size), ``cls``
    writes token 0, ``last`` each row's last real token, ``mean`` shifts every real token by the
    change of their mean (``mask`` says which tokens are real).
    """
    mode, size = parse_reduce(spec)
    if mode == "flatten":
        return flat.reshape(len(flat), *shape)
    if like is None:
        raise ValueError(f"reduce {spec!r} is lossy: decoding it needs the layer's real output or a template")
    like = like.to(flat.dtype).expand(len(flat), *shape)
    if mode == "pool":
        assert size is not None
        c = shape[0]
        pooled = rearrange(flat, "b (c h w) -> b c h w", c=c, h=size[0], w=size[1])
        delta = pooled - F.adaptive_avg_pool2d(like, size)
        # least-norm map change whose pooling is exactly ``delta``: pinv of the (separable)
        # pooling operator; for sizes that divide the map this is nearest upsampling
        up_h = torch.linalg.pinv(adaptive_pool_matrix(shape[1], size[0], flat.device))
        up_w = torch.linalg.pinv(adaptive_pool_matrix(shape[2], size[1], flat.device))
        return like + torch.einsum("Hh,bchw,Ww->bcHW", up_h.to(flat.dtype), delta, up_w.to(flat.dtype))
    if mode == "cls":
        return torch.cat([flat[:, None], like[:, 1:]], dim=1)
    valid = token_mask(mask, like)
    if mode == "last":
        rows = torch.arange(len(flat), device=flat.device)
        out = like.clone()
        out[rows, last_positions(valid, len(flat), shape[0], flat.device)] = flat
        return out
    shift = (flat - _masked_mean(like, valid))[:, None]
    return like + (shift if valid is None else shift * valid[..., None].to(shift.dtype))


def adaptive_pool_matrix(n_in: int, n_out: int, device: torch.device | None = None) -> torch.Tensor:
    """``(n_out, n_in)`` matrix of 1-D adaptive average pooling (PyTorch's window rule)."""
    matrix = torch.zeros(n_out, n_in, dtype=torch.float64, device=device)
    for i in range(n_out):
        start, end = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def reduced_dim(shape: Sequence[int], spec: str) -> int:
    """Number of features :func:`reduce_activation` gives for per-sample ``shape``."""
    mode, size = parse_reduce(spec)
    if mode == "flatten":
        return math.prod(shape)
    if mode == "pool":
        assert size is not None
        return shape[0] * size[0] * size[1]
    return shape[-1]


def is_lossy(spec: str, shape: Sequence[int]) -> bool:
    """Whether ``spec`` drops information of per-sample ``shape``."""
    return reduced_dim(shape, spec) < math.prod(shape)


def default_reduce(shape: Sequence[int], max_features: int = 4096) -> str:
    """``flatten`` when small enough, else pool conv maps or take the (real) tokens' mean."""
    if math.prod(shape) <= max_features:
        return "flatten"
    if len(shape) == 3:  # (C, H, W)
        side = max(1, int(math.sqrt(max_features / shape[0])))
        return f"pool:{min(side, shape[1])}x{min(side, shape[2])}"
    if len(shape) == 2:  # (N, D)
        return "mean"
    return "flatten"
