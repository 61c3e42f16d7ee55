"""``KoopmanProbe``: fit a Koopman autoencoder surrogate of any model's layer dynamics.

The probe is the *estimator*: it owns the fitting state (adapters, autoencoder, history).
:meth:`KoopmanProbe.surrogate` returns an independent, frozen *artifact*
(:class:`~koopman_hooks.surrogate.KoopmanSurrogate`), and :meth:`KoopmanProbe.patch` a new
module that routes the model's forward pass through it. The user's model is never modified.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from koopman_hooks.adapters import (
    LayerAdapter,
    adapter_from_moments,
    components_for_variance,
    default_reduce,
    procrustes_rotation,
    reduce_activation,
    reduced_dim,
)
from koopman_hooks.autoencoder import AutoencoderConfig, KoopmanAutoencoder, LossWeights, koopman_losses
from koopman_hooks.batches import call_model, move_inputs, split_batch
from koopman_hooks.hooks import (
    LayerError,
    LayerSpec,
    OutputSelector,
    Select,
    check_order,
    get_module,
    make_selectors,
    preserved_state,
    record,
    resolve_layers,
    run_until_stop,
    unwrap_model,
)
from koopman_hooks.metrics import ClassificationCounts, StreamingFVU
from koopman_hooks.patching import PatchedModel
from koopman_hooks.serialization import load_tensors, prefixed, save_tensors, unprefixed
from koopman_hooks.stats import StreamingMoments, ridge_regression
from koopman_hooks.surrogate import KoopmanSurrogate, homogeneous

if TYPE_CHECKING:
    from koopman_hooks.unlearning.edits import LatentGroupStatistics

OPERATOR_FITS = ("gradient", "ridge")


class Captured(NamedTuple):
    """One batch seen through the hooks."""

    inputs: Any
    activations: dict[str, torch.Tensor]
    output: Any
    labels: torch.Tensor | None


class NotFittedError(RuntimeError):
    """The probe has not been fitted (or loaded) yet."""


class KoopmanProbe:
    """Fit ``ψ(K^k φ(x_0)) ≈ x_L`` over the hidden states of any ``nn.Module``.

    Args:
        model: the trained model; it is only read (eval mode, no grad) and left as it was.
        layers: module names, glob patterns (``"blocks.*"``) or module objects, in forward order.
        latent_dim: width of the shared latent space.
        steps: applications of K per consecutive pair of layers (an int, or one per pair).
        select: which tensor of a layer's output to probe: ``None`` (first tensor), an index,
            a key or a callable; one for all layers, a list, or a ``{layer: select}`` dict.
        width: common adapter width; ``None`` keeps enough principal components for
            ``variance`` of every layer's variance (at most ``max_width``).
        reduce: per-layer reduction (``"flatten"``, ``"pool:HxW"``, ``"cls"``, ``"mean"``);
            ``None`` flattens small layers and pools/averages large ones.
        procrustes: rotate each layer's PCA coordinates onto the last layer's.
        operator: ``"exp"`` (K = exp(M/k), the paper's), ``"dense"`` or ``"lowrank"``.
        operator_fit: ``"gradient"`` (K trained with the autoencoder) or ``"ridge"`` (ridge
            EDMD: K in closed form from latent covariances, per batch while training and from
            covariances streamed over the whole loader at the end; one step per layer pair).
        loss_weights: weights of reconstruction, state, latent, isometry, topological losses.
        device: where the autoencoder is fitted (default: the model's device).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[LayerSpec] | str,
        latent_dim: int = 32,
        steps: int | Sequence[int] = 10,
        select: Select | Sequence[Select] | Mapping[str, Select] = None,
        *,
        width: int | None = None,
        variance: float = 0.999,
        max_width: int = 256,
        reduce: str | Sequence[str] | Mapping[str, str] | None = None,
        procrustes: bool = False,
        operator: str = "exp",
        rank: int | None = None,
        operator_fit: str = "gradient",
        hidden: Sequence[int] = (128, 128),
        loss_weights: LossWeights | Mapping[str, float] | None = None,
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        ridge: float = 1e-6,
        input_key: str | None = None,
        label_key: str | None = None,
        device: str | torch.device | None = None,
        seed: int = 0,
        verbose: bool = True,
    ) -> None:
        self.model = model
        self._inner = unwrap_model(model)
        self.layers = resolve_layers(self._inner, layers)
        self.selectors = make_selectors(self.layers, select)
        n_segments = len(self.layers) - 1
        self.steps = [int(steps)] * n_segments if isinstance(steps, int) else [int(s) for s in steps]
        if len(self.steps) != n_segments or min(self.steps) < 1:
            raise ValueError(f"steps needs {n_segments} positive entries (one per layer pair), got {steps}")
        if operator_fit not in OPERATOR_FITS:
            raise ValueError(f"operator_fit must be one of {OPERATOR_FITS}, got {operator_fit!r}")
        if operator_fit == "ridge" and (operator != "dense" or set(self.steps) != {1}):
            raise ValueError(
                "operator_fit='ridge' needs operator='dense' and steps=1 per layer pair: the closed form "
                "fits the layer-to-layer map itself, whose k-th root need not be real"
            )
        if not 0.0 < variance <= 1.0:
            raise ValueError(f"variance must be in (0, 1], got {variance}")
        self.latent_dim = int(latent_dim)
        self.width = width
        self.variance = variance
        self.max_width = max_width
        self.reduce = self._per_layer(reduce, "reduce")
        self.procrustes = procrustes
        self.operator = operator
        self.rank = rank
        self.operator_fit = operator_fit
        self.hidden = tuple(int(h) for h in hidden)
        if isinstance(loss_weights, LossWeights):
            self.loss_weights = loss_weights
        else:
            self.loss_weights = LossWeights(**dict(loss_weights or {}))
        self.lr = lr
        self.weight_decay = weight_decay
        self.ridge = ridge
        self.input_key = input_key
        self.label_key = label_key
        self.device = torch.device(device) if device is not None else _module_device(self._inner)
        self.seed = seed
        self.verbose = verbose
        self.topological_loss: nn.Module | None = None
        # fitted state
        self.adapters: dict[str, LayerAdapter] = {}
        self.autoencoder: KoopmanAutoencoder | None = None
        self.baselines: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.history: list[dict[str, float]] = []
        self.fit_seconds: float | None = None

    def _per_layer(self, value: Any, what: str) -> dict[str, Any]:
        if isinstance(value, Mapping):
            unknown = set(value) - set(self.layers)
            if unknown:
                raise LayerError(f"{what} names layers that are not probed: {sorted(unknown)}")
            return {name: value.get(name) for name in self.layers}
        if isinstance(value, (list, tuple)):
            if len(value) != len(self.layers):
                raise ValueError(f"{what} has {len(value)} entries for {len(self.layers)} layers")
            return dict(zip(self.layers, value))
        return {name: value for name in self.layers}

    # ------------------------------------------------------------------ capturing

    def _forward(self, batch: Any, stop_early: bool) -> Captured:
        """Run the model on a batch; return its inputs, probed activations, output and labels."""
        inputs, labels = split_batch(batch, self.input_key, self.label_key)
        inputs = move_inputs(inputs, _module_device(self._inner))
        stop = self.layers[-1] if stop_early else None
        with record(self._inner, self.selectors, stop_after=stop) as rec:
            output = run_until_stop(lambda: call_model(self.model, inputs))
        check_order(self.layers, rec)
        for name, act in rec.activations.items():
            if not torch.isfinite(act).all():
                bad = (~torch.isfinite(act)).sum().item()
                raise ValueError(f"layer {name!r} produced {bad} non-finite (NaN/inf) activation values")
        return Captured(inputs, rec.activations, output, labels)

    def _batches(self, loader: Iterable, stop_early: bool) -> Iterable[Captured]:
        empty = True
        for batch in loader:
            empty = False
            with torch.no_grad():
                captured = self._forward(batch, stop_early)
            yield captured  # outside no_grad: the consumer may train on it
        if empty:
            raise ValueError("the loader yielded no batches")

    def _adapted(self, acts: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        return [self.adapters[name](acts[name].to(self.device, torch.float32)) for name in self.layers]

    # ------------------------------------------------------------------ fitting

    def fit(self, loader: Iterable, epochs: int = 50) -> KoopmanProbe:
        """Fit adapters, autoencoder and operator by streaming ``loader``; returns ``self``.

        One pass fits the adapters, then ``epochs`` passes train the autoencoder. Only one
        batch of activations is held at a time. The model's weights, train/eval modes and
        hooks are the same afterwards, even if fitting raises.
        """
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        start = time.perf_counter()
        torch.manual_seed(self.seed)
        with preserved_state(self.model):
            self._fit_adapters(loader)
            self._train(loader, epochs)
        self.fit_seconds = time.perf_counter() - start
        return self

    def _fit_adapters(self, loader: Iterable) -> None:
        moments: dict[str, StreamingMoments] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        last = self.layers[-1]
        for _, acts, _, _ in self._batches(loader, stop_early=True):
            if not moments:
                for name in self.layers:
                    shapes[name] = tuple(acts[name].shape[1:])
                    self.reduce[name] = self.reduce[name] or default_reduce(shapes[name])
                dims = {name: reduced_dim(shapes[name], self.reduce[name]) for name in self.layers}
                for name in self.layers:
                    cross = dims[last] if self.procrustes and name != last else None
                    moments[name] = StreamingMoments(dims[name], cross, device=self.device)
            flat = {n: reduce_activation(acts[n].to(self.device, torch.float32), self.reduce[n]) for n in self.layers}
            for name in self.layers:
                cross = flat[last] if moments[name].cross_dim is not None else None
                moments[name].update(flat[name], cross)
        width = self.width or min(
            self.max_width, max(components_for_variance(m, self.variance) for m in moments.values())
        )
        self.adapters = {
            name: adapter_from_moments(shapes[name], self.reduce[name], moments[name], width) for name in self.layers
        }
        if self.procrustes:
            target = self.adapters[last]
            for name in self.layers[:-1]:
                source = self.adapters[name]
                cross = source.basis.double().T @ moments[name].cov_xy @ target.basis.double()
                cross /= float(source.scale) * float(target.scale)
                self.adapters[name] = source.rotated(procrustes_rotation(cross))

    def _train(self, loader: Iterable, epochs: int) -> None:
        width = next(iter(self.adapters.values())).width
        config = AutoencoderConfig(width, self.latent_dim, self.hidden, self.operator, self.rank, tuple(self.steps))
        self.autoencoder = ae = KoopmanAutoencoder(config).to(self.device)
        if self.loss_weights.topological and self.topological_loss is None:
            from koopman_hooks.topology import TopologicalLoss

            self.topological_loss = TopologicalLoss()
        ridge_fit = self.operator_fit == "ridge"
        params = [p for n, p in ae.named_parameters() if not (ridge_fit and n.startswith("operator."))]
        ae.operator.requires_grad_(not ridge_fit)
        optimiser = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=epochs)
        baseline_moments = [StreamingMoments(width, width, device=self.device) for _ in self.layers[1:]]
        live_patch = None
        if self.loss_weights.output:
            first, last = self.layers[0], self.layers[-1]
            live = _LiveSurrogate(self.adapters[first], self.adapters[last], ae, ae.offsets[-1])
            live_patch = PatchedModel(self.model, live, first, last, self._selector(first), self._selector(last))
        self.history = []
        bar = tqdm(range(epochs), desc="koopman fit", disable=not self.verbose)
        for epoch in bar:
            ae.train()
            sums: dict[str, float] = {}
            n_batches = 0
            for inputs, acts, output, _ in self._batches(loader, stop_early=live_patch is None):
                states = self._adapted(acts)
                if epoch == 0:
                    for moments, target in zip(baseline_moments, states[1:]):
                        moments.update(states[0], target)
                losses = koopman_losses(ae, states, self.loss_weights, self.topological_loss,
                                        self.ridge if ridge_fit else None)
                if live_patch is not None:
                    losses["output"] = output_matching_loss(call_model(live_patch, inputs), output)
                    losses["total"] = losses["total"] + self.loss_weights.output * losses["output"]
                # gradients of the autoencoder only: the model's parameters never get a .grad
                grads = torch.autograd.grad(losses["total"], params, allow_unused=True)
                for param, grad in zip(params, grads):
                    param.grad = grad
                nn.utils.clip_grad_norm_(params, 1.0)
                optimiser.step()
                for key, value in losses.items():
                    sums[key] = sums.get(key, 0.0) + value.item()
                n_batches += 1
            schedule.step()
            record_ = {key: value / n_batches for key, value in sums.items()}
            record_["epoch"] = epoch
            self.history.append(record_)
            bar.set_postfix({k: f"{v:.4f}" for k, v in record_.items() if k != "epoch"})
        if ridge_fit:
            final = StreamingMoments(self.latent_dim, self.latent_dim, device=self.device)
            for _, acts, _, _ in self._batches(loader, stop_early=True):
                self._update_latent_moments(final, self._adapted(acts))
            self._solve_operator(final)
        ae.eval()
        self.baselines = {}
        for name, moments in zip(self.layers[1:], baseline_moments):
            weight, bias = ridge_regression(moments, self.ridge)
            self.baselines[name] = (weight.float(), bias.float())

    @torch.no_grad()
    def _update_latent_moments(self, moments: StreamingMoments, states: list[torch.Tensor]) -> None:
        latents = [self.autoencoder.encoder(a) for a in states]
        for z_in, z_out in zip(latents[:-1], latents[1:]):
            moments.update(z_in, z_out)

    def _solve_operator(self, moments: StreamingMoments) -> None:
        weight, _ = ridge_regression(moments, self.ridge, intercept=False)
        self.autoencoder.operator.set_matrix(weight.T)

    # ------------------------------------------------------------------ artifacts

    def _check_fitted(self) -> KoopmanAutoencoder:
        if self.autoencoder is None:
            raise NotFittedError("call probe.fit(loader) (or KoopmanProbe.load) first")
        return self.autoencoder

    def _layer_index(self, layer: str | None, default: int) -> int:
        if layer is None:
            return default % len(self.layers)
        if layer not in self.layers:
            raise LayerError(f"{layer!r} is not a probed layer; probed: {self.layers}")
        return self.layers.index(layer)

    def surrogate(self, src: str | None = None, dst: str | None = None) -> KoopmanSurrogate:
        """A frozen, independent surrogate from ``src`` (default layers[0]) to ``dst`` (layers[-1])."""
        ae = self._check_fitted()
        i, j = self._layer_index(src, 0), self._layer_index(dst, -1)
        if j <= i:
            raise LayerError(f"dst must come after src in forward order, got {self.layers[i]!r} -> {self.layers[j]!r}")
        with torch.no_grad():
            k = ae.operator.matrix().detach().cpu()
        return KoopmanSurrogate(
            copy.deepcopy(self.adapters[self.layers[i]]).cpu(),
            copy.deepcopy(self.adapters[self.layers[j]]).cpu(),
            copy.deepcopy(ae.encoder).cpu(),
            copy.deepcopy(ae.decoder).cpu(),
            homogeneous(k),
            ae.offsets[j] - ae.offsets[i],
            self.layers[i],
            self.layers[j],
            info={"kind": "koopman", "operator": self.operator},
        ).to(self.device)

    def linear_baseline(self, dst: str | None = None) -> KoopmanSurrogate:
        """The "linear surrogate without lifting": ridge DMD from layers[0]'s adapted state to ``dst``'s."""
        self._check_fitted()
        j = self._layer_index(dst, -1)
        if j == 0:
            raise LayerError("the linear baseline maps layers[0] to a later layer")
        weight, bias = self.baselines[self.layers[j]]
        return KoopmanSurrogate(
            copy.deepcopy(self.adapters[self.layers[0]]).cpu(),
            copy.deepcopy(self.adapters[self.layers[j]]).cpu(),
            nn.Identity(),
            nn.Identity(),
            homogeneous(weight.T.cpu(), bias.cpu()),
            1,
            self.layers[0],
            self.layers[j],
            info={"kind": "linear_baseline"},
        ).to(self.device)

    def patch(self, surrogate: nn.Module | None = None, src: str | None = None, dst: str | None = None) -> PatchedModel:
        """A new module: the model with ``dst``'s output replaced by the surrogate's prediction.

        ``surrogate`` defaults to :meth:`surrogate` (``src``/``dst`` choose the layers); an
        edited surrogate from :meth:`unlearn` patches the same way. The model is shared.
        """
        if surrogate is None:
            surrogate = self.surrogate(src, dst)
        src_layer = getattr(surrogate, "src_layer", None) or self.layers[self._layer_index(src, 0)]
        dst_layer = getattr(surrogate, "dst_layer", None) or self.layers[self._layer_index(dst, -1)]
        return PatchedModel(
            self.model, surrogate, src_layer, dst_layer, self._selector(src_layer), self._selector(dst_layer)
        )

    def _selector(self, name: str) -> OutputSelector:
        return self.selectors.get(name) or OutputSelector(None, name)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, loader: Iterable, baseline: bool = True) -> dict[str, Any]:
        """Fidelity on held-out data: accuracies, agreement, state and latent FVU.

        Accuracies need labels; without them only agreement and FVU are reported. The
        surrogate accuracy is measured through :meth:`patch`, i.e. on real model outputs.
        """
        ae = self._check_fitted()
        patched = {"surrogate": self.patch()}
        if baseline and self.baselines:
            patched["linear_baseline"] = self.patch(self.linear_baseline())
        counts = ClassificationCounts()
        state_fvu = {name: StreamingFVU() for name in self.layers[1:]}
        baseline_fvu = StreamingFVU()
        latent_fvu = StreamingFVU()
        logits_of = OutputSelector(None, "model output")
        with preserved_state(self.model):
            for inputs, acts, output, labels in self._batches(loader, stop_early=False):
                states = self._adapted(acts)
                z0 = ae.encoder(states[0])
                for name, offset, state in zip(self.layers[1:], ae.offsets[1:], states[1:]):
                    z = ae.operator.step(z0, offset)
                    adapter = self.adapters[name]
                    state_fvu[name].update(adapter.decode_features(ae.decoder(z)), adapter.features(acts[name]))
                latent_fvu.update(ae.operator.step(z0, ae.offsets[-1]), ae.encoder(states[-1]))
                if "linear_baseline" in patched:
                    lin = patched["linear_baseline"].surrogate
                    adapter = self.adapters[self.layers[-1]]
                    pred = adapter.decode_features(lin.decoder(lin.final_latent(acts[self.layers[0]])))
                    baseline_fvu.update(pred, adapter.features(acts[self.layers[-1]]))
                preds = {"model": logits_of.get(output)}
                for key, module in patched.items():
                    preds[key] = logits_of.get(call_model(module, inputs))
                counts.update(labels, **preds)
        result: dict[str, Any] = {"n_samples": len(counts.predictions("model"))}
        if counts.has_labels:
            result["model_accuracy"], result["model_per_class_accuracy"] = counts.accuracy("model")
            result["surrogate_accuracy"], result["surrogate_per_class_accuracy"] = counts.accuracy("surrogate")
        result["agreement"], result["agreement_per_class"] = counts.agreement("surrogate", "model")
        result["state_fvu"] = state_fvu[self.layers[-1]].compute()
        result["state_fvu_per_layer"] = {name: fvu.compute() for name, fvu in state_fvu.items()}
        result["latent_fvu"] = latent_fvu.compute()
        if "linear_baseline" in patched:
            base: dict[str, Any] = {"state_fvu": baseline_fvu.compute()}
            base["agreement"], _ = counts.agreement("linear_baseline", "model")
            if counts.has_labels:
                base["accuracy"], base["per_class_accuracy"] = counts.accuracy("linear_baseline")
            result["linear_baseline"] = base
        return result

    # ------------------------------------------------------------------ editing

    def unlearn(
        self,
        forget_class: int | Sequence[int],
        loader: Iterable | LatentGroupStatistics,
        method: str = "endpoint",
        labels: str = "loader",
        **options: Any,
    ) -> KoopmanSurrogate:
        """An edited surrogate whose latent dynamics forget ``forget_class`` (one or several).

        Class membership comes from the loader's labels or, with ``labels="model"``, from the
        model's predictions. Only the latent linear (homogeneous affine) operators change; the
        model's weights never do. Patch it in with ``probe.patch(edited)``. ``loader`` may be
        :meth:`unlearning_statistics` collected once, so that many edits share one data pass.
        """
        from koopman_hooks.unlearning.edits import unlearn

        return unlearn(self, forget_class, loader, method=method, labels=labels, **options)

    def unlearning_statistics(
        self,
        loader: Iterable,
        labels: str = "loader",
        forget_class: int | Sequence[int] = (),
        src: str | None = None,
        dst: str | None = None,
        redirect: str = "runner_up",
        metric: str = "decoder",
        refine_rows: int | None = None,
    ) -> LatentGroupStatistics:
        """Stream ``loader`` once and keep what :meth:`unlearn` needs, to reuse for many edits.

        ``probe.unlearn(c, stats)`` then skips the pass over the data: one pass serves every
        single-class edit (and any multi-class edit whose forgotten samples' runner-up classes
        are retained; pass ``forget_class`` when they are not). Memory is ``O(groups · d²)``
        plus ``refine_rows`` sampled rows (default: what :meth:`unlearn` refines on).
        """
        from koopman_hooks.unlearning.edits import DEFAULTS, _forget_list, latent_statistics

        empty = isinstance(forget_class, Sequence) and len(forget_class) == 0
        forget = [] if empty else _forget_list(forget_class)
        rows = DEFAULTS["refine_rows"] if refine_rows is None else refine_rows
        return latent_statistics(self, loader, forget, labels, self.surrogate(src, dst), redirect, metric,
                                 DEFAULTS["metric_rows"], refine_rows=rows)

    # ------------------------------------------------------------------ analysis

    def topology(
        self,
        loader: Iterable,
        n_points: int = 2000,
        layers: Sequence[str] | None = None,
        epsilon: float | None = None,
        quantile: float = 0.99,
        k: int = 1,
        dims: Sequence[int] = (0, 1),
        per_class: bool = False,
        seed: int = 0,
        metric: str = "euclidean",
        n_neighbors: int = 10,
        variance: float | None = None,
    ) -> dict[str, Any]:
        """Betti numbers of the network's layers and of the surrogate's steps 0..k, at one ε.

        ``layers`` (names or globs; default the probed layers) are read from the network;
        surrogate steps are decoded by ψ into the adapted space. Every cloud is centred and
        scaled to unit RMS, the same ``n_points`` samples are used throughout, and ε (unless
        given) is the ``quantile`` of ``k``-th-neighbour distances in the first network layer.
        ``metric="knn"`` counts on each cloud's ``n_neighbors``-NN graph instead (Naitzat et
        al.; ε in hops, default 1, so β0 counts its components). With ``per_class`` each class
        is counted on its own and the headline counts are the sums over classes. ``variance``
        (e.g. 0.99) first reduces every cloud to the principal components holding that share
        of its variance, the lens the probe's PCA adapters see layers through.
        """
        from koopman_hooks.topology_report import probe_topology

        return probe_topology(self, loader, n_points, layers, epsilon, quantile, k, dims, per_class, seed,
                              metric, n_neighbors, variance)

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike) -> None:
        """Save adapters, autoencoder, baselines and settings to one safetensors file."""
        ae = self._check_fitted()
        tensors: dict[str, torch.Tensor] = {}
        for i, name in enumerate(self.layers):
            tensors.update(prefixed(f"adapter.{i}", self.adapters[name].state_dict()))
        tensors.update(prefixed("autoencoder", ae.state_dict()))
        for name, (weight, bias) in self.baselines.items():
            i = self.layers.index(name)
            tensors[f"baseline.{i}.weight"], tensors[f"baseline.{i}.bias"] = weight, bias
        config = {
            "layers": self.layers,
            "select": {name: sel.describe() for name, sel in self.selectors.items()},
            "callable_select": [name for name, sel in self.selectors.items() if not sel.writable],
            "shapes": {name: list(a.shape) for name, a in self.adapters.items()},
            "reduce": {name: a.reduce for name, a in self.adapters.items()},
            "autoencoder": {**ae.config.__dict__, "hidden": list(ae.config.hidden), "segment_steps": list(ae.config.segment_steps)},
            "settings": {
                "procrustes": self.procrustes, "operator_fit": self.operator_fit, "variance": self.variance,
                "loss_weights": self.loss_weights.as_dict(), "lr": self.lr, "ridge": self.ridge,
                "input_key": self.input_key, "label_key": self.label_key, "seed": self.seed,
            },
            "history": self.history,
            "fit_seconds": self.fit_seconds,
        }
        save_tensors(path, tensors, "probe", config)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        model: nn.Module,
        select: Select | Sequence[Select] | Mapping[str, Select] | None = None,
        device: str | torch.device | None = None,
        verbose: bool = True,
    ) -> KoopmanProbe:
        """Load a probe saved by :meth:`save` onto ``model``, which must have the same layers.

        Callable ``select`` functions are not saved: pass them again as ``select``.
        """
        tensors, config = load_tensors(path, "probe")
        inner = unwrap_model(model)
        for name in config["layers"]:
            get_module(inner, name)  # a clear LayerError with suggestions when missing
        if config["callable_select"] and select is None:
            raise ValueError(f"layers {config['callable_select']} were probed with a callable select; pass select=")
        ae_config = AutoencoderConfig(**{**config["autoencoder"], "hidden": tuple(config["autoencoder"]["hidden"]),
                                          "segment_steps": tuple(config["autoencoder"]["segment_steps"])})
        settings = config["settings"]
        probe = cls(
            model, config["layers"], ae_config.latent_dim, list(ae_config.segment_steps),
            select if select is not None else config["select"],
            reduce=config["reduce"], procrustes=settings["procrustes"], operator=ae_config.operator,
            rank=ae_config.rank, operator_fit=settings["operator_fit"], hidden=ae_config.hidden,
            loss_weights=settings["loss_weights"], lr=settings["lr"], ridge=settings["ridge"],
            input_key=settings["input_key"], label_key=settings["label_key"], device=device,
            seed=settings["seed"], verbose=verbose, width=ae_config.width, variance=settings["variance"],
        )
        for i, name in enumerate(probe.layers):
            t = unprefixed(f"adapter.{i}", tensors)
            probe.adapters[name] = LayerAdapter(config["shapes"][name], config["reduce"][name], t["mean"], t["basis"], t["scale"]).to(probe.device)
        probe.autoencoder = KoopmanAutoencoder(ae_config)
        probe.autoencoder.load_state_dict(unprefixed("autoencoder", tensors))
        probe.autoencoder.to(probe.device).eval()
        for i, name in enumerate(probe.layers):
            if f"baseline.{i}.weight" in tensors:
                probe.baselines[name] = (tensors[f"baseline.{i}.weight"].to(probe.device), tensors[f"baseline.{i}.bias"].to(probe.device))
        probe.history = config["history"]
        probe.fit_seconds = config["fit_seconds"]
        return probe

    def __repr__(self) -> str:
        state = "fitted" if self.autoencoder is not None else "not fitted"
        return f"KoopmanProbe(layers={self.layers}, latent_dim={self.latent_dim}, steps={self.steps}, operator={self.operator!r}, {state})"


class _LiveSurrogate(nn.Module):
    """The surrogate being trained (shares the autoencoder's parameters), for the output loss."""

    def __init__(self, src: LayerAdapter, dst: LayerAdapter, autoencoder: KoopmanAutoencoder, steps: int) -> None:
        super().__init__()
        self.src, self.dst, self.autoencoder, self.steps = src, dst, autoencoder, steps

    def forward(self, x: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        a = self.src(x.to(self.src.basis.device, torch.float32))
        return self.dst.inverse(self.autoencoder.predict(a, self.steps), like)


def output_matching_loss(patched_output: Any, model_output: Any) -> torch.Tensor:
    """KL divergence from the model's softmax output to the patched model's."""
    select = OutputSelector(None, "model output")
    student = torch.log_softmax(select.get(patched_output).float(), dim=-1)
    teacher = torch.log_softmax(select.get(model_output).float().detach(), dim=-1)
    return torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean")


def _module_device(module: nn.Module) -> torch.device:
    for tensor in [*module.parameters(), *module.buffers()]:
        return tensor.device
    return torch.device("cpu")

