"""torch.distributed, when a process group is initialised: every rank holds a shard of the data.

Streaming statistics are combined exactly by gathering every rank's fitter and merging them in
rank order (:func:`merged`), so every rank ends with the same result; the autoencoder trains by
post-local SGD (:func:`local_sgd`: each rank steps on its own shard, the parameters are averaged
every few steps and after every epoch); decisions (keep a state, stop) are taken on reduced
figures, so all ranks take them together. Without a process group every function is the identity.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as dist

from koopman_hooks.errors import EmptyLoaderError


class Mergeable(Protocol):
    def merge(self, other: Any) -> Any: ...


M = TypeVar("M", bound=Mergeable)


def active() -> bool:
    """Whether a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, or the only process: the one that writes files."""
    return rank() == 0


def gathered(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` without a process group)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def empty_shards(allowed: bool) -> Iterator[None]:
    """Around a pass over each rank's loader, merged over ranks afterwards: a rank whose loader
    yields nothing (:class:`EmptyLoaderError`) goes on, and every rank then raises alike -- with
    ``allowed``, only when every shard was empty (the others' statistics stand); without, when
    any was (naming the ranks), so that no rank raises alone and leaves the others waiting.
    Without a process group: the error as it was."""
    empty = False
    try:
        yield
    except EmptyLoaderError:
        if not active():
            raise
        empty = True
    if not active():
        return
    flags = gathered(empty)
    if allowed and all(flags):
        raise EmptyLoaderError("every rank's loader")
    if not allowed and any(flags):
        raise EmptyLoaderError(f"the loader of rank(s) {[r for r, e in enumerate(flags) if e]}",
                               "every rank needs batches of its own")


def merged(fitter: M) -> M:
    """The merge of every rank's ``fitter`` (statistics of disjoint shards), in rank order; every
    rank gets the same result. ``fitter`` is returned unchanged without a process group."""
    return merged_each([fitter])[0]


def merged_each(fitters: Sequence[M]) -> list[M]:
    """:func:`merged` for several fitters at once, with one gather instead of one per fitter."""
    if not active():
        return list(fitters)
    parts = gathered(list(fitters))
    totals = parts[0]
    for part in parts[1:]:
        for total, other in zip(totals, part, strict=True):
            total.merge(other)
    return totals


def summed(values: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (float64, on the CPU)."""
    tensor = torch.as_tensor(values, dtype=torch.float64).reshape(-1).clone()
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def minimum(value: int) -> int:
    """The smallest ``value`` over ranks."""
    if not active():
        return value
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def local_sgd(optimiser: torch.optim.Optimizer, period: int) -> torch.optim.Optimizer:
    """Under a process group, ``optimiser`` wrapped in torch's post-local SGD: every rank steps on
    its own gradients and the parameters are averaged over ranks every ``period`` steps (one
    flat all-reduce). Without one, ``optimiser`` itself."""
    if not active():
        return optimiser
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
    from torch.distributed.optim import PostLocalSGDOptimizer

    with warnings.catch_warnings():  # period 1 (tiny shards): torch advises DDP instead; the average is the same
        warnings.filterwarnings("ignore", message="When period is 1", category=UserWarning)
        averager = PeriodicModelAverager(period=period)
    return PostLocalSGDOptimizer(optimiser, averager)


def average_parameters(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace every parameter by its mean over ranks (one flat all-reduce), so that all ranks
    hold the same model."""
    if not active():
        return
    from torch.distributed.algorithms.model_averaging.utils import average_parameters as average

    group = dist.group.WORLD
    assert group is not None
    average(iter(list(params)), group)
