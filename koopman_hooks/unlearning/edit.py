"""Class unlearning by editing the surrogate's *linear* latent dynamics, never the model's weights.

:func:`unlearning_statistics` streams a loader once (:mod:`~koopman_hooks.unlearning.statistics`);
:func:`unlearn` turns such statistics into an edited surrogate:

- ``"endpoint"``: ``E' = R E`` with ``R`` the redirect (:mod:`~koopman_hooks.unlearning.redirect`);
- ``"per_step"``: ``K'`` with ``E K'^k ≈ R E K^k`` (:mod:`~koopman_hooks.unlearning.per_step`);
- ``"leace"``: ``E' = L R E`` with ``L`` the latent LEACE eraser of the forgotten classes.

With ``refine > 0`` (the default) the redirect is first refined on the patched model's own
outputs (:mod:`~koopman_hooks.unlearning.refine`). ``probe.patch(edited)`` is then the
unlearned model; the model itself is only read.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from koopman_hooks.core.schema import check
from koopman_hooks.fitting.fitted import FittedProbe
from koopman_hooks.koopman.surrogate import KoopmanSurrogate, artifact_tensors
from koopman_hooks.unlearning.options import EditOptions, LabelSource, Method
from koopman_hooks.unlearning.per_step import per_step_operator
from koopman_hooks.unlearning.redirect import prepare_solver, redirect_map, redirect_targets
from koopman_hooks.unlearning.refine import refine_readout
from koopman_hooks.unlearning.statistics import LatentGroupStatistics, collect_statistics


def forget_list(forget_class: Any) -> list[int]:
    """``forget_class`` (an int, or a sequence/array of ints) as a list of distinct classes."""
    if isinstance(forget_class, (np.ndarray, torch.Tensor)):
        items = forget_class.reshape(-1).tolist()
    elif isinstance(forget_class, Sequence) and not isinstance(forget_class, str):
        items = list(forget_class)
    else:
        items = [forget_class]
    out: list[int] = []
    for c in items:
        if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, np.integer)):
            raise TypeError(f"forget_class must be an int or a sequence of ints, got {c!r} ({type(c).__name__})")
        if c < 0:
            raise ValueError(f"forget class {int(c)} is negative; classes are indices 0, 1, ...")
        if int(c) not in out:
            out.append(int(c))
    if not out:
        raise ValueError("forget_class is empty: name at least one class to forget")
    return out


def check_reusable(stats: LatentGroupStatistics, forget: list[int], labels: str, surrogate: KoopmanSurrogate,
                   options: EditOptions) -> None:
    """Raise unless ``stats`` equal what a fresh pass would collect for this edit."""
    wanted = {"labels": labels, "redirect": options.redirect, "metric": options.metric,
              "src": surrogate.src_layer, "dst": surrogate.dst_layer}
    got = {"labels": stats.labels, "redirect": stats.redirect, "metric": stats.metric_kind,
           "src": stats.src, "dst": stats.dst}
    for key, value in wanted.items():
        if got[key] != value:
            raise ValueError(f"these statistics were collected with {key}={got[key]!r}, the edit needs {value!r}; "
                             "collect them again with probe.unlearning_statistics(...)")
    if stats.power is None or not torch.allclose(stats.power, surrogate.endpoint_map().cpu(), rtol=1e-6, atol=1e-9):
        raise ValueError("these statistics come from a different surrogate (other operator or readout); "
                         "collect them again with probe.unlearning_statistics(...)")
    extra = sorted(set(stats.forget) - set(forget))
    if extra:
        raise ValueError(f"these statistics were collected to forget {list(stats.forget)}, which includes "
                         f"{extra} not forgotten now; collect them with forget_class={forget} or none")
    clash = sorted({(c, s) for c, s in stats.groups if c in forget and s in forget})
    if clash:
        raise ValueError(f"forgotten samples whose runner-up class is also forgotten {clash[:3]}: collect the "
                         f"statistics with probe.unlearning_statistics(loader, forget_class={forget})")


def check_classes(forget: list[int], stats: LatentGroupStatistics, labels: str = "loader") -> list[int]:
    """The retained classes; raises for a forget class out of range or never seen, or for all."""
    seen = stats.classes
    where = "in the loader" if labels == "loader" else "among the model's predictions on the loader"
    for c in forget:
        if stats.n_outputs is not None and c >= stats.n_outputs:
            raise ValueError(
                f"forget class {c} is out of range: the model scores {stats.n_outputs} classes "
                f"(0..{stats.n_outputs - 1}); classes seen in the loader: {seen}"
            )
        if c not in seen:
            raise ValueError(f"forget class {c} never appears {where}; classes seen: {seen}")
    retained = [c for c in seen if c not in forget]
    if not retained:
        raise ValueError(f"cannot forget every class at once: forget {forget}, classes seen {seen}")
    return retained


@artifact_tensors()  # inside torch.inference_mode() too: the refinement needs autograd, the edit ordinary tensors
def unlearning_statistics(
    probe: FittedProbe,
    loader: Iterable[Any] | None = None,
    labels: LabelSource = "loader",
    forget_class: int | Sequence[int] = (),
    src: str | None = None,
    dst: str | None = None,
    method: Method = "endpoint",
    **options: Any,
) -> LatentGroupStatistics:
    """Stream ``loader`` once and keep what :func:`unlearn` needs for ``method`` and ``options``,
    to reuse for many edits (every single-class edit, and any multi-class edit whose forgotten
    samples' runner-up classes are retained; pass ``forget_class`` when they are not). Memory is
    ``O(groups · d²)`` plus the rows the refinement samples. ``loader=None`` reads the rows the
    fit kept (``fit(loader, keep_cache=True)``) instead: the model does not run."""
    opts = EditOptions.for_method(method, options)
    check(labels, LabelSource, "labels")
    empty = isinstance(forget_class, Sequence) and not isinstance(forget_class, str) and len(forget_class) == 0
    forget = [] if empty else forget_list(forget_class)
    surrogate = probe.surrogate(src, dst)
    prepare_solver(surrogate.latent_dim, opts)
    stats = collect_statistics(probe, loader, forget, labels, surrogate, opts.redirect, opts.metric, opts.metric_rows,
                               refine_rows=opts.sample_rows)
    if forget:
        check_classes(forget, stats, labels)  # as unlearn would: in the model's range, seen, not every class
    return stats


@artifact_tensors()
def unlearn(
    probe: FittedProbe,
    forget_class: int | Sequence[int],
    loader: Iterable[Any] | LatentGroupStatistics | None = None,
    method: Method = "endpoint",
    labels: LabelSource = "loader",
    src: str | None = None,
    dst: str | None = None,
    **options: Any,
) -> KoopmanSurrogate:
    """Make the surrogate forget ``forget_class`` by editing its linear latent dynamics.

    Args:
        probe: a fitted probe; the model is only read.
        forget_class: a class index or a sequence of them (not all classes).
        loader: labelled batches (or any batches with ``labels="model"``), streamed once; or
            the statistics of such a pass from :func:`unlearning_statistics`, collected once
            and reused for every single-class edit (the edit is then all that runs); or
            ``None``: the rows the fit kept (``fit(loader, keep_cache=True)``).
        method: ``"endpoint"``, ``"per_step"`` or ``"leace"`` (see the module docstring).
        labels: class membership from the ``"loader"`` or from the ``"model"``'s predictions.
        src, dst: the layers of the surrogate (default: the first and last probed layers).
        **options: the fields of :class:`~koopman_hooks.unlearning.options.EditOptions`.

    Returns:
        ``probe.surrogate(src, dst).edited(...)``: a new surrogate, saved/loaded like any other,
        whose ``info`` records ``method``, ``forget_classes``, ``labels``, the options,
        ``edit_seconds`` and ``stats_seconds`` (and ``power_error`` for ``"per_step"``).

    Raises:
        TypeError: a class that is not an int. ValueError: a negative class, a class out of
        the model's output range or never seen in the loader, or every class at once.
        ConfigError: an unknown option or a value of the wrong type.
    """
    opts = EditOptions.for_method(method, options)
    check(labels, LabelSource, "labels")
    forget = forget_list(forget_class)
    surrogate = probe.surrogate(src, dst)
    reused = isinstance(loader, LatentGroupStatistics)
    if isinstance(loader, LatentGroupStatistics):
        check_reusable(loader, forget, labels, surrogate, opts)
        stats = loader.with_forget(forget)
    else:
        stats = collect_statistics(probe, loader, forget, labels, surrogate, opts.redirect, opts.metric,
                                   opts.metric_rows, refine_rows=opts.sample_rows)
    retained = check_classes(forget, stats, labels)
    prepare_solver(stats.latent_dim, opts)  # a no-op after unlearning_statistics

    start = time.perf_counter()
    endpoint = redirect_map(stats, retained, opts)
    base = surrogate.readout.double().cpu()  # the edit's algebra runs in float64 on the CPU, as the statistics
    operator: torch.Tensor | None = None
    readout: torch.Tensor | None = None
    extra: dict[str, float] = {}
    if opts.refine:
        if stats.reservoir is None or not len(stats.reservoir):
            raise ValueError("refine > 0 needs statistics with a sample of rows: collect them with "
                             "probe.unlearning_statistics(loader, refine_rows=...) or pass refine=0")
        held = stats.reservoir.inputs  # (rows, 0) where the collecting probe ran the tail from states alone
        if isinstance(held, torch.Tensor) and held.shape[1:] == (0,) and not probe.tail_reads_states(
                surrogate.dst_layer, False):
            raise ValueError("these statistics keep their refinement rows' source-layer states, not their model "
                             "inputs: the probe that collected them runs the model's tail from states alone, this one "
                             "cannot yet (a loaded probe finds its tail in a statistics pass of its own). Collect them with "
                             "this probe's unlearning_statistics(loader), or pass refine=0")
        refined, extra = refine_readout(probe.patched_outputs, probe.model, surrogate, endpoint @ base, stats.reservoir, forget,
                                        retained, iterations=opts.refine, proximal=opts.proximal,
                                        retain_weight=opts.retain_weight, sample_rows=opts.refine_rows)
        endpoint = refined.double().cpu() @ torch.linalg.inv(base)
    if method == "endpoint":
        readout = endpoint @ base
    elif method == "leace":
        from koopman_hooks.unlearning.leace import latent_leace_map  # needs the optional concept-erasure

        readout = latent_leace_map(stats, retained, endpoint) @ base
    else:
        operator, err = per_step_operator(stats, surrogate.operator.cpu(), surrogate.readout.cpu(), surrogate.steps, endpoint,
                                          redirect_targets(stats, retained, opts), opts)
        extra["power_error"] = err
    info = {
        "method": method,
        "forget_classes": forget,
        "retained_classes": retained,
        "labels": labels,
        "options": opts.as_dict(),
        "class_counts": {str(c): n for c, n in stats.counts().items()},
        "edit_seconds": time.perf_counter() - start,
        "stats_seconds": stats.seconds,
        "stats_reused": reused,
        **extra,
    }
    return surrogate.edited(operator=operator, readout=readout, **info)
