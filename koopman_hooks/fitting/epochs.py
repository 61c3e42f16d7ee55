"""Training epochs read from the cache, with a held-out score that decides which state is kept.

Every state is scored on the held-out rows: its agreement with the model (through the model's
own tail, when it can be run on its own), the KL divergence of its outputs from the model's, and
the fraction of the last layer's variance it leaves unexplained. The closed-form start is scored
first. A later state is kept if it has a lower loss (the mean state FVU over the later layers,
plus the KL divergence when there is one) and agrees with the model as often as the start does,
up to the held-out set's sampling noise (one row, or two standard errors), so the fit is not
worse on held-out data than where it started.

The learning rate follows a cosine from ``lr`` to zero over each cycle of ``CYCLE_EPOCHS`` epochs
(warm restarts; the last cycle takes the remainder of ``epochs``). A cycle ends the fit when it
lowers the kept held-out loss by less than ``CYCLE_GAIN`` (relatively), or by less than
``SIGNIFICANCE`` standard errors of that gain, paired over the held-out rows (each row's share
of the loss before and after the cycle): a gain the held-out rows cannot tell from noise. So do
``patience`` epochs without progress (a held-out loss at least 0.5% below the last progress):
easy fits stop after one or two cycles, hard ones go on up to ``epochs``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from koopman_hooks.core import distributed
from koopman_hooks.core.optim import adamw
from koopman_hooks.core.precision import autocast_to
from koopman_hooks.core.select import MODEL_OUTPUT
from koopman_hooks.errors import warn
from koopman_hooks.fitting.cache import StateCache
from koopman_hooks.koopman.adapters import LayerAdapter
from koopman_hooks.koopman.autoencoder import KoopmanAutoencoder
from koopman_hooks.koopman.linear import RidgeOperatorFitter
from koopman_hooks.koopman.losses import LossWeights, TopologicalLoss, koopman_losses, output_matching_loss
from koopman_hooks.maths.scores import StreamingFVU

LR_FAN_IN = 32  # weight matrices with a wider input learn at lr * 32 / fan_in

#: ``tail(rows, predicted last-layer activation)`` -> the model's output for cached rows
Tail = Callable[[Mapping[str, torch.Tensor], torch.Tensor], Any]


@dataclass(frozen=True)
class Score:
    """Held-out fidelity of one state."""

    agreement: float | None  # None: the model's tail cannot be run alone
    loss: float  # mean state FVU over the later layers (+ the KL divergence from the model's outputs)
    fvu: float  # the last layer's state FVU
    rows: int = 1
    # this process's held-out rows' shares of ``loss`` (summed over every process's rows: ``loss``)
    row_losses: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def better_than(self, kept: Score, start: Score) -> bool:
        """Lower loss, and the start's agreement up to sampling noise."""
        if self.agreement is not None and start.agreement is not None:
            p = start.agreement
            noise = max(1.0 / start.rows, 2.0 * (p * (1 - p) / start.rows) ** 0.5)
            if self.agreement < p - noise:
                return False
        return self.loss < kept.loss

    def gain_over(self, before: Score) -> tuple[float, float]:
        """``(before.loss - self.loss, its standard error)``, paired over the held-out rows that
        both were scored on (over every process's rows)."""
        if self.row_losses is None or before.row_losses is None:
            return before.loss - self.loss, 0.0
        diff = before.row_losses - self.row_losses
        total, squares, n = (float(v) for v in distributed.summed([float(diff.sum()), float(diff.pow(2).sum()), len(diff)]))
        variance = max(squares / max(n, 1.0) - (total / max(n, 1.0)) ** 2, 0.0)
        return total, math.sqrt(n * variance)

    def describe(self) -> str:
        agree = "" if self.agreement is None else f"agreement {self.agreement:.4f}, "
        return f"{agree}state FVU {self.fvu:.4f}"


EPOCH_ROWS = 16384  # an epoch reads at most this many random cached rows
AVERAGE_EVERY = 16  # under torch.distributed: at most this many local steps between two averages over ranks
SCORE_ROWS = 1024  # held-out rows scored per batch (no gradients: larger batches, fewer calls)
PROGRESS = 0.005  # a held-out loss this much (relatively) below the last progress resets the patience
CYCLE_EPOCHS = 5  # epochs per cosine cycle of the learning rate
CYCLE_GAIN = 0.05  # a cycle that lowers the kept held-out loss by less than this (relatively) ends the fit
SIGNIFICANCE = 2.0  # ... and so does one whose gain is under this many of its standard errors


@dataclass
class Schedule:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    patience: int
    ridge: float | None = None  # a closed-form K per batch (operator_fit="ridge")
    verbose: bool = False
    amp: bool = False  # the training steps' products in bfloat16 (autocast); the scores stay float32
    temperature: float = 1.0  # of the output-matching loss while training (the held-out score's KL: at 1)


@dataclass
class Outcome:
    history: list[dict[str, float]] = field(default_factory=list)
    kept_epoch: int = -1
    kept_score: Score | None = None
    start_score: Score | None = None
    epochs_run: int = 0
    stopped_because: str = "the epoch limit"


def parameter_groups(named: Sequence[tuple[str, nn.Parameter]], lr: float) -> list[dict[str, Any]]:
    """Adam moves every weight by about ``lr`` per step whatever its gradient, so a layer's output
    moves by about ``lr · fan_in``: weight matrices learn at ``lr · min(1, 32 / fan_in)``, so that
    a wide residual (or the closed-form linear maps, which start at their optimum) is nudged, not
    thrown off, by the first steps."""
    groups: dict[float, list[nn.Parameter]] = {}
    for _, param in named:
        rate = lr * min(1.0, LR_FAN_IN / param.shape[-1]) if param.ndim == 2 else lr
        groups.setdefault(rate, []).append(param)
    return [{"params": params, "lr": rate} for rate, params in groups.items()]


def cached_states(rows: Mapping[str, torch.Tensor], ae: KoopmanAutoencoder, device: torch.device) -> list[torch.Tensor]:
    """The cached adapted states of every probed layer (``s0``, ``s1``, ...), float32 on ``device``."""
    return [rows[f"s{i}"].to(device, torch.float32) for i in range(len(ae.config.segment_steps) + 1)]


def _mask(rows: Mapping[str, torch.Tensor], device: torch.device) -> torch.Tensor | None:
    """The cached rows' attention mask (for token reductions), if the inputs had one."""
    return rows["mask"].to(device) if "mask" in rows else None


@torch.no_grad()
def refit_operator(ae: KoopmanAutoencoder, cache: StateCache, rows: torch.Tensor, device: torch.device, ridge: float) -> None:
    """``operator_fit="ridge"``: K in closed form from the current encoder's latents of ``rows``."""
    fitter = RidgeOperatorFitter(ae.config.latent_dim, device=device)
    for batch in cache.batches(rows, 1024):
        fitter.update([ae.encoder(a) for a in cached_states(batch, ae, device)])
    ae.operator.set_matrix(distributed.merged(fitter).finalize(ridge))


@torch.no_grad()
def score(ae: KoopmanAutoencoder, cache: StateCache, rows: torch.Tensor, device: torch.device, tail: Tail | None,
          last: LayerAdapter, batch_size: int) -> tuple[Score, dict[str, float]]:
    """The held-out score, and the state FVU of every later layer and the latent FVU of the last."""
    ae.eval()
    layers = len(ae.config.segment_steps) + 1
    state_fvu = [StreamingFVU() for _ in range(layers - 1)]
    latent_fvu = StreamingFVU()
    hits = torch.zeros((), device=device)
    row_errors: list[list[torch.Tensor]] = [[] for _ in range(layers - 1)]  # per layer: each row's squared error
    row_kl: list[torch.Tensor] = []
    for batch in cache.batches(rows, max(batch_size, SCORE_ROWS)):
        states = cached_states(batch, ae, device)
        latents = ae.trajectory(ae.encoder(states[0]))
        decoded = [ae.decoder(z) for z in latents]
        for j, prediction in enumerate(decoded):
            state_fvu[j].update(prediction, states[j + 1])
            row_errors[j].append((prediction.double() - states[j + 1].double()).pow(2).sum(1))
        latent_fvu.update(latents[-1], ae.encoder(states[-1]))
        if tail is not None:
            predicted = last.inverse(decoded[-1], mask=_mask(batch, device))
            output = tail(batch, predicted)
            reference = batch["scores"].to(device)
            hits += (MODEL_OUTPUT.get(output).argmax(-1) == reference.argmax(-1)).sum()
            row_kl.append(output_matching_loss(output, reference, per_row=True).double())
    *state_fvu, latent_fvu = distributed.merged_each([*state_fvu, latent_fvu])  # every rank scored its own rows
    kl_rows = torch.cat(row_kl) if row_kl else torch.zeros(0, dtype=torch.float64, device=device)
    hits_kl_n = distributed.summed([float(hits), float(kl_rows.sum()), float(len(rows))])
    n = max(int(hits_kl_n[2]), 1)
    figures = {f"val_state_fvu_{j + 1}": f.compute() for j, f in enumerate(state_fvu)}
    figures["val_latent_fvu"] = latent_fvu.compute()
    fvu = state_fvu[-1].compute()
    trajectory = sum(_ranking_fvu(f) for f in state_fvu) / len(state_fvu)
    # each row's share of the loss: its squared errors over the layers' (merged) variances, and its KL / n
    nothing = torch.zeros(0, dtype=torch.float64, device=device)  # a process whose shard holds no held-out rows
    shares = sum((torch.cat(errors) if errors else nothing) / (len(state_fvu) * max(f.total_variance(), 1e-30))
                 for errors, f in zip(row_errors, state_fvu))
    assert isinstance(shares, torch.Tensor)
    if tail is None:
        return Score(None, trajectory, fvu, n, shares.cpu()), figures
    figures["val_agreement"], figures["val_kl"] = float(hits_kl_n[0]) / n, float(hits_kl_n[1]) / n
    return Score(figures["val_agreement"], trajectory + figures["val_kl"], fvu, n, (shares + kl_rows / n).cpu()), figures


def _steps_per_epoch(own: int, batch_size: int) -> int:
    """The steps every rank takes per epoch: the smallest shard's (one batch at least on every
    rank when any rank has one); a shard without a batch is an error on every rank."""
    per_rank = distributed.gathered(own)
    steps = min(per_rank)
    if steps == 0 and max(per_rank) > 0:
        empty = [r for r, n in enumerate(per_rank) if n == 0]
        raise ValueError(f"rank(s) {empty} hold fewer than two training rows, and the ranks take their steps together: "
                         f"give every rank a shard of its own (torch's DistributedSampler balances them)")
    if len(per_rank) > 1 and 2 * steps <= max(per_rank):
        warn(f"the ranks' shards hold {min(per_rank)} to {max(per_rank)} batches of {batch_size}: every rank "
             f"takes the smallest shard's {steps} steps per epoch; balance the shards (DistributedSampler) "
             "for the fit to use the others' rows as often")
    return steps


def _ranking_fvu(f: StreamingFVU) -> float:
    """The FVU, or where the held-out targets have no variance (e.g. a one-row ``val_loader``),
    where it is NaN, their squared error over the floored variance: it still ranks the states."""
    value = f.compute()
    return value if value == value else float(f.sq_error) / max(f.total_variance(), 1e-30)


def cycle_of(epoch: int, epochs: int) -> tuple[int, int]:
    """The first epoch and the length of the cycle holding ``epoch``: cycles of ``CYCLE_EPOCHS``
    epochs, the last one taking the remainder of ``epochs`` (one cycle when there are fewer)."""
    last = max(epochs // CYCLE_EPOCHS - 1, 0) * CYCLE_EPOCHS
    first = min(epoch - epoch % CYCLE_EPOCHS, last)
    return first, (epochs - first if first == last else CYCLE_EPOCHS)


def cycle_factor(epoch: int, step: int, steps: int, epochs: int) -> float:
    """The learning rate's factor at ``step`` of ``steps`` in ``epoch``: a cosine from 1 to 0 over
    each cycle (:func:`cycle_of`)."""
    first, length = cycle_of(epoch, epochs)
    return 0.5 * (1.0 + math.cos(math.pi * ((epoch - first) * steps + step) / max(length * steps, 1)))


@torch.enable_grad()
def train(
    ae: KoopmanAutoencoder,
    cache: StateCache,
    train_rows: torch.Tensor,
    val_rows: torch.Tensor,
    weights: LossWeights,
    schedule: Schedule,
    device: torch.device,
    last: LayerAdapter,
    tail: Tail | None,
    generator: torch.Generator,
) -> Outcome:
    """Train ``ae`` in place from the cache; on return it holds the best-scoring state."""
    named = [(n, p) for n, p in ae.named_parameters() if not (schedule.ridge is not None and n.startswith("operator."))]
    ae.operator.requires_grad_(schedule.ridge is None)
    params = [p for _, p in named]
    # every rank takes the same number of full batches per epoch (their parameters are averaged in step)
    rows = min(len(train_rows), EPOCH_ROWS // distributed.world_size())
    n_steps = _steps_per_epoch(max(rows // schedule.batch_size, 1 if rows > 1 else 0), schedule.batch_size)
    # each average is one all-reduce that waits for the slowest rank: as few as the fit allows, but
    # at least two per epoch, so that short epochs (small data) do not let the ranks drift apart
    optimiser = distributed.local_sgd(adamw(parameter_groups(named, schedule.lr), schedule.lr, schedule.weight_decay),
                                      max(1, min(AVERAGE_EVERY, n_steps // 2)))
    # W processes take 1/W of the steps, each averaging W batches: the learning rate scales with W
    for group in optimiser.param_groups:
        group["lr"] *= distributed.world_size()
    cycles = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda t: cycle_factor(t // max(n_steps, 1), t % max(n_steps, 1), n_steps, schedule.epochs))
    topological = TopologicalLoss() if weights.topological else None
    outcome = Outcome()
    has_val = distributed.summed([len(val_rows)])[0] > 0
    if has_val:
        outcome.start_score, figures = score(ae, cache, val_rows, device, tail, last, schedule.batch_size)
        outcome.kept_score = outcome.start_score
        outcome.history.append({"epoch": -1, **figures})
    best = copy.deepcopy(ae.state_dict())
    stale = 0
    mark = outcome.kept_score.loss if outcome.kept_score is not None else float("inf")
    cycle_start = outcome.kept_score
    bar = tqdm(range(schedule.epochs), desc="koopman fit", disable=not schedule.verbose)
    for epoch in bar:
        ae.train()
        order = train_rows[torch.randperm(len(train_rows), generator=generator)[: EPOCH_ROWS // distributed.world_size()]]
        lr = float(cycles.get_last_lr()[0])
        sums: dict[str, torch.Tensor] = {}
        steps = 0
        for batch in cache.batches(order[: n_steps * schedule.batch_size], schedule.batch_size):
            states = cached_states(batch, ae, device)
            with autocast_to(device, torch.bfloat16 if schedule.amp else None):
                losses = koopman_losses(ae, states, weights, topological, schedule.ridge)
            prediction = losses.pop("prediction")
            if tail is not None and weights.output:  # the model's own tail in its own precision
                predicted = last.inverse(prediction.float(), mask=_mask(batch, device))
                losses["output"] = output_matching_loss(tail(batch, predicted), batch["scores"].to(device),
                                                        temperature=schedule.temperature)
                losses["total"] = losses["total"] + weights.output * losses["output"]
            optimiser.zero_grad(set_to_none=True)
            losses["total"].backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            optimiser.step()
            cycles.step()
            for key, value in losses.items():
                sums[key] = sums.get(key, torch.zeros((), device=device)) + value.detach()
            steps += 1
        distributed.average_parameters(params)  # every rank scores, keeps and goes on from the same state
        record: dict[str, float] = {"epoch": float(epoch), "lr": lr,
                                    **{k: float(v) / max(steps, 1) for k, v in sums.items()}}
        outcome.epochs_run = epoch + 1
        if schedule.ridge is not None:
            refit_operator(ae, cache, train_rows, device, schedule.ridge)
        if has_val:
            current, figures = score(ae, cache, val_rows, device, tail, last, schedule.batch_size)
            record.update(figures)
            assert outcome.kept_score is not None and outcome.start_score is not None
            if current.better_than(outcome.kept_score, outcome.start_score):
                outcome.kept_score, outcome.kept_epoch = current, epoch
                best = copy.deepcopy(ae.state_dict())
            if current.loss < mark * (1 - PROGRESS):
                mark, stale = current.loss, 0
            else:
                stale += 1
        else:
            best, outcome.kept_epoch = copy.deepcopy(ae.state_dict()), epoch
        outcome.history.append(record)
        bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k in ("total", "val_agreement", "val_state_fvu_1")})
        if not has_val:
            continue
        if stale >= schedule.patience:
            outcome.stopped_because = f"{schedule.patience} epochs without progress"
            break
        if sum(cycle_of(epoch, schedule.epochs)) == epoch + 1:  # the end of a cycle
            assert outcome.kept_score is not None and cycle_start is not None
            before = cycle_start.loss
            gain = 1.0 - outcome.kept_score.loss / before if math.isfinite(before) and before > 0 else 0.0
            if gain < CYCLE_GAIN:
                outcome.stopped_because = f"a cycle lowered the held-out loss by {gain:.1%} (< {CYCLE_GAIN:.0%})"
                break
            lowered, error = outcome.kept_score.gain_over(cycle_start)
            if lowered < SIGNIFICANCE * error:
                outcome.stopped_because = (f"a cycle lowered the held-out loss by {gain:.1%}, within the held-out "
                                           f"rows' noise ({lowered:.2g} < {SIGNIFICANCE:g} × {error:.2g})")
                break
            cycle_start = outcome.kept_score
    ae.load_state_dict(best)
    ae.eval()
    return outcome
