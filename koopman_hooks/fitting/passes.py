"""The passes of a fit over the user's data: calibrate on one batch, fit the adapters, fill the cache.

A fit passes over the fit data twice: pass 1 fits the adapters, pass 2 streams the exact
moments of every training sample's adapted states (for the closed-form start) while keeping a
bounded, seeded uniform sample of rows -- adapted states, the model's scores and labels -- in
the cache, split into training and held-out rows; everything after that reads the cache, so
memory does not grow with the data. The model runs in pass 1 only where its reduced activations
fit in ``replay_mb`` of disk (:class:`Replay`: pass 2 reads them back), in both otherwise (pass 1
then stopping after the last probed layer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from koopman_hooks.core.batches import BatchSpec, Inputs, batch_size_of, call_model, mask_of, repeated_rows, select_rows
from koopman_hooks.core.capture import Captured, capture_batch, iter_captures
from koopman_hooks.core.precision import autocast_to
from koopman_hooks.core.select import MODEL_OUTPUT, OutputSelector
from koopman_hooks.core.shapes import check_fit_batch
from koopman_hooks.core.skipping import Trace, skip_plan, trace
from koopman_hooks.core.tail import TailRunner
from koopman_hooks.errors import EmptyLoaderError
from koopman_hooks.fitting.cache import StateCache
from koopman_hooks.fitting.head import head_reduce, output_reads
from koopman_hooks.fitting.sizing import module_macs
from koopman_hooks.koopman.adapters import AdapterFitter, LayerAdapter
from koopman_hooks.koopman.reduce import default_reduce
from koopman_hooks.maths.stats import JointMoments, StreamingMoments

TailInputs = Literal["repeated", "real"]
CALIBRATION_ROWS = 8


@dataclass
class Calibration:
    """What one real batch tells about the model before the fit proper."""

    example: Inputs
    trace: Trace
    n_outputs: int | None
    replaced_macs: int | None = None
    tail: TailRunner | None = None
    tail_inputs: TailInputs | None = None
    reduce: str | None = None  # the token reduction that follows the head at the last layer, if found
    masked: bool = False  # the inputs carry an attention mask
    output_reads_last: bool | None = None  # the model's output moves with the last layer's selection
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def keeps_scores(self) -> bool:
        """Whether pass 2 keeps the model's scores (for the output-matching loss and the scores)."""
        return self.n_outputs is not None

    @property
    def keeps_inputs(self) -> bool:
        """Whether pass 2 keeps the model's inputs: its tail reads the real ones, or they carry an
        attention mask, which an edit's refinement from the kept rows reads (token ids and masks:
        a few integers per token)."""
        return self.tail_inputs == "real" or self.masked


def _per_sample_macs(model: nn.Module, example: Inputs, calib_trace: Trace, layers: Sequence[str]) -> int | None:
    """Multiply-adds per sample of the modules a fast patched path skips between ``layers[0]``
    and ``layers[-1]``, and of ``layers[-1]`` itself."""
    replaced = [*skip_plan(calib_trace, layers[-1], after=layers[0]), layers[-1]]
    try:
        counts = module_macs(model, select_rows(example, torch.tensor([0])))
    except Exception:  # noqa: BLE001 - a model the counter cannot follow: no budget
        return None
    total = sum(n for name, n in counts.items() if any(name == r or name.startswith(r + ".") for r in replaced))
    return total or None


def calibrate(model: nn.Module, captured: Captured, layers: Sequence[str], selectors: Mapping[str, OutputSelector],
              want_tail: bool, detect_head: bool = False, mask_key: str | None = None,
              reduce: Mapping[str, str | None] | None = None, amp: torch.dtype | None = None) -> Calibration:
    """Trace the model on (up to 8 rows of) the first batch; find its tail after the last probed
    layer and whether stand-in inputs (the first row repeated) are enough to run it; with
    ``detect_head``, the token reduction that follows what the head reads of the last layer.

    A head that reads the mean of every token is not followed when the probe has layers in
    between and every earlier probed layer is taken whole (by the user's ``reduce`` or by
    default), and the last layer is small enough to take whole: it is then taken whole too, so
    that the one operator K carries the same token states to the end instead of also pooling
    them in its last step (the model's head pools them, exactly). Every
    real token reaches such a head; a head that reads one token (``"cls"``, ``"last"``) is always
    followed, as the other tokens of the last layer reach nothing. On the 6-block ViT recipe
    (same model and data), taking its last block whole lowered the latent FVU at every layer
    (0.129 -> 0.081 at the last) and the intermediate layers' state FVU (0.121 -> 0.097 at
    blocks.4)."""
    rows = torch.arange(min(CALIBRATION_ROWS, batch_size_of(captured.inputs)))
    example = select_rows(captured.inputs, rows)
    calib_trace = trace(model, lambda: call_model(model, example))
    scores = None if captured.output is None else MODEL_OUTPUT.get(captured.output)
    n_outputs = int(scores.shape[-1]) if scores is not None and scores.dim() == 2 else None
    calibration = Calibration(example, calib_trace, n_outputs, masked=mask_of(example, mask_key) is not None)
    last = layers[-1]
    calibration.replaced_macs = _per_sample_macs(model, example, calib_trace, layers)
    if captured.output is not None:
        calibration.output_reads_last = output_reads(model, last, selectors[last], example, captured.activations[last][rows])
    if detect_head and captured.activations[last].ndim == 3:
        mask = mask_of(example, mask_key)
        reading = head_reduce(model, last, selectors[last], example, captured.activations[last][rows], mask)
        calibration.reduce = reading.reduce
        calibration.notes["reduce"] = reading.reason
        chosen = reduce or {}  # the user's reductions (None at the last layer: detect_head)
        if reading.reduce == "mean" and len(layers) > 2 and all(
                (chosen.get(name) or default_reduce(tuple(captured.activations[name].shape[1:]))) == "flatten"
                for name in layers):
            calibration.reduce = None
            calibration.notes["reduce"] = (f"{reading.reason}; taken whole like the layers before it, so that K "
                                           "carries token states to the end and the head pools them")
    labels = captured.labels
    classifier = (n_outputs is not None and isinstance(labels, torch.Tensor) and labels.dim() == 1
                  and not labels.dtype.is_floating_point and labels.dtype != torch.bool
                  and bool(((labels >= 0) & (labels < n_outputs)).all()))
    if not want_tail or not classifier:
        calibration.notes["tail"] = ("output loss switched off" if not want_tail
                                     else "not a classifier (no integer labels within the model's output width)")
        return calibration
    calibration.tail, calibration.tail_inputs = find_tail(model, example, captured.activations[last][rows], last,
                                                          selectors[last], amp)
    if calibration.tail is None:
        calibration.notes["tail"] = f"the model's output after {last!r} could not be reproduced from it alone"
    return calibration


def find_tail(model: nn.Module, example: Inputs, real: torch.Tensor, last: str,
              selector: OutputSelector, amp: torch.dtype | None = None) -> tuple[TailRunner | None, TailInputs | None]:
    """A runner of the model's tail after ``last`` that reproduces the model's output on ``example``
    from ``last``'s ``real`` activation, and whether stand-in inputs (the first row repeated) are
    enough for it (``"repeated"``) or it needs the real inputs (``"real"``); ``(None, None)`` if
    no tail reproduces the output. ``amp``: the autocast dtype the model runs in (the probe's
    ``amp=``), for the reference output and the runner alike."""
    with torch.no_grad(), autocast_to(real.device, amp):
        reference = call_model(model, example)
    try:
        runner = TailRunner(model, last, selector, example, amp)
    except Exception:  # noqa: BLE001 - a model the trace cannot follow has no tail runner
        return None, None
    if runner.check(repeated_rows(example, len(real)), real, reference):
        return runner, "repeated"
    if runner.check(example, real, reference):
        return runner, "real"
    return None, None


def fit_adapters(
    model: nn.Module, layers: Sequence[str], selectors: Mapping[str, OutputSelector], loader: Iterable[Any],
    spec: BatchSpec, reduce: Mapping[str, str | None], device: torch.device,
    on_first: Callable[[Captured], Mapping[str, str] | None] | None = None, mask_key: str | None = None,
    replay: Replay | None = None,
) -> AdapterFitter:
    """Pass 1: stream every probed layer's reduced activations, stopping each forward pass after
    the last probed layer -- except on the first batch, which ``on_first(captured)`` sees whole
    (it may return reductions for layers left to the default) -- and, while ``replay`` holds
    them, every batch's reduced activations and what pass 2 keeps beside them (then each pass
    runs the whole model when pass 2 keeps its scores)."""
    fitter = AdapterFitter(layers, reduce, device=device)
    first: dict[str, tuple[int, ...]] = {}
    for i, batch in enumerate(loader):
        whole = i == 0 or (replay is not None and replay.active and replay.keep_scores)
        with torch.no_grad():
            captured = capture_batch(model, selectors, batch, spec, stop_early=not whole)
        if i == 0:
            first = {name: tuple(captured.activations[name].shape[1:]) for name in layers}
        check_fit_batch(captured.activations, first, i)
        if i == 0 and on_first is not None:
            chosen = on_first(captured) or {}
            fitter.reduce.update({name: r for name, r in chosen.items() if fitter.reduce.get(name) is None})
        mask = mask_of(captured.inputs, mask_key)
        reduced = fitter.update_reduced(captured.activations, mask)
        if replay is not None and replay.active:
            replay.add([reduced[name] for name in layers], captured, mask)
    if not first:
        raise EmptyLoaderError()
    return fitter


class Replay:
    """Pass 1's reduced activations and what pass 2 keeps beside them (scores, labels, mask,
    inputs), so that pass 2 reads them back instead of running the model again: RAM up to
    ``ram_mb``, then a temporary file; given up (and deleted) once it would pass ``limit_mb``.
    ``keep_scores`` / ``keep_inputs`` are set from the calibration on the first batch."""

    def __init__(self, limit_mb: float, ram_mb: float) -> None:
        self.limit_mb, self.limit = limit_mb, int(limit_mb * 2**20)
        self.store: StateCache | None = StateCache(ram_mb) if self.limit > 0 else None
        self.keep_scores = False
        self.keep_inputs = False
        self.dropped_because: str | None = None if self.limit > 0 else "replay_mb=0"

    @property
    def active(self) -> bool:
        return self.store is not None

    def add(self, reduced: Sequence[torch.Tensor], captured: Captured, mask: torch.Tensor | None) -> None:
        """Keep one batch (a no-op once given up)."""
        if self.store is None:
            return
        fields = {f"r{i}": r for i, r in enumerate(reduced)}
        fields.update(_kept_fields(captured, mask, self.keep_scores, self.keep_inputs))
        size = sum(v.numel() * v.element_size() for v in fields.values())
        if self.store.nbytes + size > self.limit:
            self.drop(f"pass 1's reduced activations pass replay_mb={self.limit_mb:g}")
            return
        try:
            self.store.append(fields)
        except ValueError as error:  # batches with other fields (e.g. labels on some only): no replay
            self.drop(str(error))

    def drop(self, why: str) -> None:
        self.close()
        self.dropped_because = why

    def rows(self, adapters: Sequence[LayerAdapter], device: torch.device, batch_size: int) -> Iterator[PassRows]:
        """Pass 2 from the kept batches: every layer's adapted states and the kept fields."""
        assert self.store is not None
        store = self.store.finalize()
        for rows in store.batches(torch.arange(store.n), batch_size):
            mask = rows.get("mask")
            states = [adapter.from_features(rows[f"r{i}"].to(device)) for i, adapter in enumerate(adapters)]
            inputs = inputs_of(rows) if self.keep_inputs else None
            yield PassRows(states, None if mask is None else mask.to(device), rows.get("scores"), rows.get("labels"),
                           inputs)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None


def _kept_fields(captured: Captured, mask: torch.Tensor | None, keep_scores: bool,
                 keep_inputs: bool) -> dict[str, torch.Tensor]:
    """What pass 2 keeps of a batch beside its states: attention ``mask``, ``scores``, ``labels``
    (one row each; integer labels as int64) and, with ``keep_inputs``, the tensor inputs (``in``/``in.<key>``)."""
    fields: dict[str, torch.Tensor] = {}
    if mask is not None:
        fields["mask"] = mask
    if keep_scores:
        fields["scores"] = MODEL_OUTPUT.get(captured.output).detach().float()
    if captured.labels is not None:
        labels = torch.as_tensor(captured.labels)
        # integer labels of any dtype are classes: one dtype for every batch (and val_loader's)
        fields["labels"] = labels.long() if not labels.is_floating_point() and not labels.is_complex() else labels
    if keep_inputs:
        fields.update(input_fields(captured.inputs))
    return fields


def input_fields(inputs: Inputs) -> dict[str, torch.Tensor]:
    """Model inputs as cache fields: ``in``, or ``in.<key>`` for every tensor of dict inputs
    (:func:`inputs_of` reads them back)."""
    if isinstance(inputs, torch.Tensor):
        return {"in": inputs}
    return {f"in.{k}": v for k, v in inputs.items() if isinstance(v, torch.Tensor)}


def is_input_field(name: str) -> bool:
    return name == "in" or name.startswith("in.")


@dataclass
class PassRows:
    """One batch of pass 2: every probed layer's adapted states and what the cache keeps beside them."""

    states: list[torch.Tensor]
    mask: torch.Tensor | None
    scores: torch.Tensor | None
    labels: torch.Tensor | None
    inputs: Inputs | None


def live_rows(model: nn.Module, layers: Sequence[str], selectors: Mapping[str, OutputSelector],
              adapters: Mapping[str, LayerAdapter], loader: Iterable[Any], spec: BatchSpec,
              shapes: Mapping[str, Sequence[int]], device: torch.device, keep_scores: bool,
              mask_key: str | None = None) -> Iterator[PassRows]:
    """Pass 2 over the data: the model runs (to the end only when its scores are kept)."""
    for captured in iter_captures(model, selectors, loader, spec, stop_early=not keep_scores, shapes=shapes):
        mask = mask_of(captured.inputs, mask_key)
        with torch.no_grad():
            states = [adapters[name](captured.activations[name].to(device, torch.float32),
                                     None if mask is None else mask.to(device)) for name in layers]
        kept = _kept_fields(captured, mask, keep_scores, False)
        yield PassRows(states, mask, kept.get("scores"), kept.get("labels"), captured.inputs)


@dataclass
class Sample:
    """Which of a pass's ``n`` rows are held out, and which are kept in the cache."""

    held_out: torch.Tensor  # bool (n,)
    kept: torch.Tensor  # bool (n,): cached rows (every held-out row, and a sample of the others)

    @classmethod
    def draw(cls, n: int, held_out: int, kept_train: int, generator: torch.Generator) -> Sample:
        order = torch.randperm(n, generator=generator)
        out = torch.zeros(n, dtype=torch.bool)
        out[order[:held_out]] = True
        keep = out.clone()
        keep[order[held_out : held_out + kept_train]] = True
        return cls(out, keep)


def fill_cache(
    cache: StateCache,
    batches: Iterable[PassRows],
    keep_inputs: bool,
    sample: Sample | None,
    moments: PairMoments | None = None,
) -> torch.Tensor:
    """Pass 2: the rows ``sample`` keeps go to the cache -- adapted states (``s0``, ``s1``, ...),
    scores, labels, the attention ``mask`` and, with ``keep_inputs``, inputs (``in`` or
    ``in.<key>``) -- and every row it does not hold out updates ``moments`` (``sample=None``:
    every row is kept, as a held-out row). Returns, for each cached row, whether it is held out."""
    start = 0
    held: list[torch.Tensor] = []
    for batch in batches:
        states = batch.states
        n = len(states[0])
        if sample is None:
            keep = out = torch.ones(n, dtype=torch.bool)
        elif start + n > len(sample.kept):
            raise ValueError("the loader yielded more rows in its second pass than in its first; "
                             "give the fit a loader that yields the same data each time it is iterated")
        else:
            keep, out = sample.kept[start : start + n], sample.held_out[start : start + n]
        start += n
        if moments is not None and (~out).any():
            moments.update([s[(~out).to(s.device)] for s in states])
        if not keep.any():
            continue
        rows = keep.nonzero().squeeze(1)
        fields: dict[str, torch.Tensor] = {f"s{i}": s[rows.to(s.device)] for i, s in enumerate(states)}
        for name, value in (("mask", batch.mask), ("scores", batch.scores), ("labels", batch.labels)):
            if value is not None:
                fields[name] = value[rows.to(value.device)]
        if keep_inputs:
            assert batch.inputs is not None
            fields.update(input_fields(select_rows(batch.inputs, rows)))
        cache.append(fields)
        held.append(out[rows])
    return torch.cat(held) if held else torch.zeros(0, dtype=torch.bool)


def rotate_cached_states(cache: StateCache, rotations: Sequence[torch.Tensor]) -> None:
    """The cached states of every later layer (``s1``, ``s2``, ...) into the start's rotated
    coordinates (``s_j @ R_j``), once, so that the epochs read them as they are; ``s0`` is not
    rotated (what the unlearning statistics read from a kept cache)."""
    names = [f"s{j}" for j in range(1, len(rotations) + 1)]

    def rotate(rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: (rows[name].float() @ r.to(rows[name].device, torch.float32)).to(rows[name].dtype)
                for name, r in zip(names, rotations, strict=True)}

    cache.transform(names, rotate)


class PairMoments:
    """Streamed moments of ``(a_0, a_j)`` and ``(a_{j-1}, a_j)`` for every later layer ``j``
    (each layer's covariance taken once)."""

    def __init__(self, layers: int, width: int, device: torch.device | str = "cpu") -> None:
        self.layers = layers
        pairs = [(0, j) for j in range(1, layers)] + [(j - 1, j) for j in range(2, layers)]
        self.joint = JointMoments([width] * layers, pairs, device=device)

    @property
    def first(self) -> list[StreamingMoments]:
        """``(a_0, a_j)`` for every later layer ``j``."""
        return [self.joint.pair(0, j) for j in range(1, self.layers)]

    @property
    def consecutive(self) -> list[StreamingMoments]:
        """``(a_{j-1}, a_j)`` for every later layer ``j`` (none for two layers)."""
        return [self.joint.pair(j - 1, j) for j in range(1, self.layers)] if self.layers > 2 else []

    def update(self, states: Sequence[torch.Tensor]) -> PairMoments:
        self.joint.update(states)
        return self

    def merge(self, other: PairMoments) -> PairMoments:
        self.joint.merge(other.joint)
        return self


def inputs_of(rows: Mapping[str, torch.Tensor], example: Inputs | None = None) -> Inputs:
    """The model inputs of cached rows (``in`` or ``in.<key>`` fields, non-tensors from ``example``)."""
    if "in" in rows:
        return rows["in"]
    if example is None:
        return {k[3:]: v for k, v in rows.items() if is_input_field(k)}
    assert isinstance(example, dict)
    return {k: rows.get(f"in.{k}", v) for k, v in example.items()}
