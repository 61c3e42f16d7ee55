"""``KoopmanProbe``: the estimator users call -- configure, ``fit``, then analyse and edit.

The probe holds a validated :class:`~koopman_hooks.fitting.config.ProbeConfig`; ``fit`` streams
a loader and produces a :class:`~koopman_hooks.fitting.fitted.FittedProbe` (``fetch_model()``),
the artifact that analysis and editing work on. The methods below that need a fit delegate to
it and to :mod:`koopman_hooks.analysis` / :mod:`koopman_hooks.unlearning`. The user's model is
never modified.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from koopman_hooks.analysis.fidelity import evaluate
from koopman_hooks.analysis.spectrum import KoopmanSpectrum, koopman_spectrum
from koopman_hooks.analysis.topology import compare_topology
from koopman_hooks.core.layers import LayerSpec, resolve_layers
from koopman_hooks.core.patching import PatchedModel, check_patch_layers
from koopman_hooks.core.select import OutputSelector, Select, make_selectors, per_layer
from koopman_hooks.errors import ConfigError, NotFittedError
from koopman_hooks.fitting.config import OperatorFit, ProbeConfig
from koopman_hooks.fitting.fitted import FittedProbe
from koopman_hooks.fitting.trainer import fit_probe
from koopman_hooks.koopman.losses import LossWeights
from koopman_hooks.koopman.operator import Parametrization
from koopman_hooks.koopman.surrogate import KoopmanSurrogate
from koopman_hooks.unlearning.edit import unlearn, unlearning_statistics
from koopman_hooks.unlearning.options import LabelSource, Method
from koopman_hooks.unlearning.statistics import LatentGroupStatistics


class KoopmanProbe:
    """Fit ``ψ(K^k φ(x_0)) ≈ x_L`` over the hidden states of any ``nn.Module``.

    Args:
        model: the trained model; it is only read (eval mode, no grad) and left as it was.
        layers: module names, glob patterns (``"blocks.*"``) or module objects, in forward order.
        latent_dim: width of the shared latent space (at least the adapted width; ``None``:
            the adapted width plus a lifting of a quarter of it).
        steps: applications of K per consecutive pair of layers (an int, or one per pair;
            ``None``: one per module the pair spans).
        select: which tensor of a layer's output to probe: ``None`` (first tensor), an index,
            a key or a callable; one for all layers, a list, or a ``{layer: select}`` dict.
        width: common adapter width; ``None`` keeps enough principal components for
            ``variance`` of every layer's variance (at most ``max_width``).
        reduce: per-layer reduction (``"flatten"``, ``"pool:HxW"``, ``"cls"``, ``"last"``,
            ``"mean"``); ``None``: at the last layer of a token model, the token the head reads
            (``"cls"``, ``"last"`` real token or ``"mean"``, found by perturbing a real batch;
            a ``"mean"`` head's layer is taken whole instead when the probe has layers in between
            and every earlier probed layer is taken whole); else ``"flatten"`` for small layers,
            pooling/averaging for large ones.
        operator: ``"dense"``, ``"exp"`` (K = exp(M/k), the paper's) or ``"lowrank"`` (``rank``).
        operator_fit: ``"gradient"`` (K trained with the autoencoder) or ``"ridge"`` (ridge
            EDMD: K in closed form from latent covariances; one step per layer pair).
        hidden: hidden widths of the encoder's and decoder's nonlinear residuals (``None``: one
            layer, as wide as the multiply-add budget of the replaced modules allows; 128 where
            the adapted width is at most 32, as no surrogate undercuts such tiny layers).
        loss_weights: weights of reconstruction, state, latent, isometry, topological and
            output-matching losses (a :class:`LossWeights` or a dict; each term is a fraction of
            its target's variance).
        output_temperature: softening of both softmaxes in the output-matching loss while
            training (KL times its square, as in distillation): the targets then carry the
            model's ranking of every class, which is what keeps its argmax on unseen inputs
            (the held-out score that picks the kept state reads the KL at 1).
        lr, weight_decay: AdamW settings of the autoencoder (``lr`` is the peak of each cosine cycle).
        ridge: relative ridge of the closed-form fits.
        batch_size: rows per gradient step and process, read from the fit's cache (``None``: about
            50 steps per epoch over all processes' rows, 64 to 512 rows; under ``torch.distributed``
            each of W processes then takes 1/W of the steps, as with DDP).
        patience: epochs without progress (a held-out loss 0.5% below the last progress) before
            the fit stops.
        val_fraction: share of the fit data held out to score and choose the kept state
            (unless ``fit(val_loader=...)``): at least 250 rows (at most a fifth of the data), at
            most 5,000; none below 20 rows or at 0.
        cache_mb: RAM for the cached states; beyond it they go to a temporary file (in ``TMPDIR``,
            Python's ``tempfile`` folder), read through the page cache, so that the fit's resident
            memory does not grow with the data. Where that folder is a RAM disk (tmpfs), point
            ``TMPDIR`` at a disk or raise ``cache_mb``.
        replay_mb: disk for the first pass's reduced activations (and the scores and labels
            beside them), which the second pass then reads back instead of running the model
            again: one model pass where they fit (``cache_mb`` of them in RAM, the rest in a
            temporary file deleted after the fit), two otherwise; ``0`` always runs it twice.
        amp: ``"bf16"``/``"fp16"`` autocast for the model's forward passes (activations become
            float32 in the adapters); ``None`` runs the model as it is.
        train_amp: bfloat16 autocast of the autoencoder's training steps (the products of φ, K
            and ψ, K's powers included; weights, optimiser, closed forms, the model's own tail and
            the held-out scores stay float32): ``"auto"`` where it pays -- a batch of at least 8M
            forward multiply-adds through φ, K and ψ on a device that multiplies bfloat16
            natively (a CUDA GPU from Ampere on; a CPU where it measures at least 1.5 x
            float32's speed, e.g. AVX512-BF16 or AMX) --, ``"bf16"`` always, ``None`` never. The
            fit's ``info["train_amp"]`` says what ran and why; "auto" can differ between machines.
        input_key, label_key, ignore_keys: how dict batches reach the model (see
            :class:`~koopman_hooks.core.batches.BatchSpec`): by default every key but the label.
        mask_key: the key of dict inputs holding the ``(B, N)`` attention mask that the
            ``"last"`` and ``"mean"`` token reductions read (``None``: no mask).
        device: where the autoencoder is fitted (default: the model's device).
        seed: seeds the fit's own random stream (the global RNG is left as it was).
        verbose: show a progress bar while fitting.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[LayerSpec] | LayerSpec,
        latent_dim: int | None = None,
        steps: int | Sequence[int] | None = None,
        select: Select | Sequence[Select] | Mapping[str, Select] = None,
        *,
        width: int | None = None,
        variance: float = 0.999,
        max_width: int = 256,
        reduce: str | Sequence[str | None] | Mapping[str, str] | None = None,
        operator: Parametrization = "dense",
        rank: int | None = None,
        operator_fit: OperatorFit = "gradient",
        hidden: Sequence[int] | None = None,
        loss_weights: LossWeights | Mapping[str, float | None] | None = None,
        output_temperature: float = 4.0,
        lr: float = 6e-3,
        weight_decay: float = 0.0,
        ridge: float = 1e-6,
        batch_size: int | None = None,
        patience: int = 8,
        val_fraction: float = 0.1,
        cache_mb: float = 16.0,
        replay_mb: float = 2048.0,
        amp: Literal["bf16", "fp16"] | None = None,
        train_amp: Literal["auto", "bf16"] | None = "auto",
        input_key: str | None = None,
        label_key: str | None = None,
        ignore_keys: Sequence[str] = (),
        mask_key: str | None = "attention_mask",
        device: str | torch.device | None = None,
        seed: int = 0,
        verbose: bool = True,
    ) -> None:
        names = resolve_layers(model, layers)
        selectors = make_selectors(names, select)
        n_segments = len(names) - 1
        config = ProbeConfig(
            layers=tuple(names),
            latent_dim=latent_dim,
            steps=(steps,) * n_segments if isinstance(steps, int) and not isinstance(steps, bool) else steps,  # type: ignore[arg-type]
            select=tuple(s.describe() for s in selectors.values()),
            callable_select=tuple(name for name, s in selectors.items() if not s.writable),
            width=width,
            variance=variance,
            max_width=max_width,
            reduce=tuple(per_layer(names, reduce, "reduce").values()),  # type: ignore[arg-type]
            operator=operator,
            rank=rank,
            operator_fit=operator_fit,
            hidden=hidden,  # type: ignore[arg-type]
            loss_weights=LossWeights() if loss_weights is None else loss_weights,  # type: ignore[arg-type]
            output_temperature=output_temperature,
            lr=lr,
            weight_decay=weight_decay,
            ridge=ridge,
            batch_size=batch_size,
            patience=patience,
            val_fraction=val_fraction,
            cache_mb=cache_mb,
            replay_mb=replay_mb,
            amp=amp,
            train_amp=train_amp,
            input_key=input_key,
            label_key=label_key,
            ignore_keys=ignore_keys,  # type: ignore[arg-type]
            mask_key=mask_key,
            seed=seed,
        )
        self._setup(model, config, selectors, device, verbose)

    def _setup(self, model: nn.Module, config: ProbeConfig, selectors: Mapping[str, OutputSelector],
               device: str | torch.device | None, verbose: bool) -> None:
        self.model = model
        self.config = config
        self.selectors = dict(selectors)
        if not isinstance(verbose, bool):
            raise ConfigError(f"verbose must be a bool, got {verbose!r} ({type(verbose).__name__})")
        try:
            self.device = torch.device(device) if device is not None else None
        except (RuntimeError, TypeError) as err:
            raise ConfigError(f"device must be a torch.device or a name such as 'cpu' or 'cuda:0', got {device!r}: "
                              f"{err}") from None
        self.verbose = verbose
        self._fitted: FittedProbe | None = None

    @classmethod
    def from_fitted(cls, fitted: FittedProbe, verbose: bool = True) -> KoopmanProbe:
        """A probe around an existing fit (e.g. one loaded with :meth:`FittedProbe.load`)."""
        probe = cls.__new__(cls)
        probe._setup(fitted.model, fitted.config, fitted.selectors, fitted.device, verbose)
        probe._fitted = fitted
        return probe

    # ------------------------------------------------------------------ fitting

    def fit(self, loader: Iterable[Any], epochs: int | None = None, val_loader: Iterable[Any] | None = None,
            keep_cache: bool = False) -> KoopmanProbe:
        """Fit adapters, autoencoder and operator on ``loader``; returns ``self``.

        The model runs once over ``loader`` (twice where pass 1's reduced activations pass
        ``replay_mb``): adapters, then a cache of adapted states; the
        fit starts from the closed-form linear model and trains from the cache in cosine cycles
        of 5 epochs for at most ``epochs`` (default 60), keeping the state that scores best on
        held-out data (``val_loader``, or ``val_fraction`` of ``loader``); it stops after a
        cycle that lowers the held-out loss by less than 5% or by less than two standard errors
        of that gain, or after ``patience`` epochs without progress. The model's weights, modes, hooks
        and the global RNG are the same afterwards, even if fitting raises; a fit that raises
        leaves the probe as it was (unfitted, or with its previous fit).

        ``keep_cache=True`` keeps the cached rows (at most ``cache_mb`` in RAM, the rest in a
        temporary file) until :meth:`release_cache`, so that ``unlearning_statistics()`` and
        ``unlearn(c)`` without a loader read them instead of running the model again.
        """
        fitted = fit_probe(self.model, self.config, self.selectors, loader, epochs, self.device, self.verbose,
                           val_loader, keep_cache)
        if self._fitted is not None:
            self._fitted.release_cache()
        self._fitted = fitted
        return self

    def release_cache(self) -> None:
        """Free the rows a ``fit(..., keep_cache=True)`` kept (a no-op otherwise)."""
        if self._fitted is not None:
            self._fitted.release_cache()

    def fetch_model(self) -> FittedProbe:
        """The fitted artifact (:class:`~koopman_hooks.errors.NotFittedError` before a fit)."""
        if self._fitted is None:
            raise NotFittedError("call probe.fit(loader) (or KoopmanProbe.load) first")
        return self._fitted

    @property
    def is_fitted(self) -> bool:
        return self._fitted is not None

    # ------------------------------------------------------------------ settings and fitted state

    @property
    def layers(self) -> list[str]:
        return list(self.config.layers)

    @property
    def steps(self) -> list[int] | None:
        """Steps per segment: as fitted, else as configured (``None``: chosen by the fit)."""
        if self.is_fitted:
            return list(self.fetch_model().autoencoder.config.segment_steps)
        return None if self.config.steps is None else list(self.config.steps)

    @property
    def latent_dim(self) -> int | None:
        """Latent dimension: as fitted, else as configured (``None``: chosen by the fit)."""
        return self.fetch_model().autoencoder.config.latent_dim if self.is_fitted else self.config.latent_dim

    @property
    def operator(self) -> str:
        return self.config.operator

    @property
    def adapters(self) -> dict[str, Any]:
        return self.fetch_model().adapters

    @property
    def autoencoder(self) -> Any:
        return self.fetch_model().autoencoder

    @property
    def baselines(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return self.fetch_model().baselines

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.fetch_model().history if self.is_fitted else []

    @property
    def fit_seconds(self) -> float | None:
        return self.fetch_model().fit_seconds if self.is_fitted else None

    # ------------------------------------------------------------------ artifacts

    def surrogate(self, src: str | None = None, dst: str | None = None) -> KoopmanSurrogate:
        """A frozen, independent surrogate from ``src`` (default layers[0]) to ``dst`` (layers[-1])."""
        return self.fetch_model().surrogate(src, dst)

    def linear_baseline(self, dst: str | None = None) -> KoopmanSurrogate:
        """The "linear surrogate without lifting": ridge DMD from layers[0]'s adapted state to ``dst``'s."""
        return self.fetch_model().linear_baseline(dst)

    def patch(self, surrogate: nn.Module | None = None, src: str | None = None, dst: str | None = None,
              strict: bool = True, fast: bool = True) -> PatchedModel:
        """A new module: the model with ``dst``'s output replaced by the surrogate's prediction
        (the fitted one by default; any module ``surrogate(x_src, like=x_dst)`` works, fitted or not;
        ``strict``/``fast`` as in :class:`~koopman_hooks.core.patching.PatchedModel`)."""
        if surrogate is None or self.is_fitted:
            return self.fetch_model().patch(surrogate, src, dst, strict, fast)
        check_patch_layers(surrogate, src, dst)
        src_layer = src or getattr(surrogate, "src_layer", None) or self.layers[0]
        dst_layer = dst or getattr(surrogate, "dst_layer", None) or self.layers[-1]
        return PatchedModel(self.model, surrogate, src_layer, dst_layer, self.selectors.get(src_layer),
                            self.selectors.get(dst_layer), strict=strict, fast=fast)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Save the fit and every setting to one safetensors file."""
        self.fetch_model().save(path)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        model: nn.Module,
        select: Select | Sequence[Select] | Mapping[str, Select] | None = None,
        device: str | torch.device | None = None,
        verbose: bool = True,
    ) -> KoopmanProbe:
        """Load a probe saved by :meth:`save` onto ``model``, which must have the same layers."""
        return cls.from_fitted(FittedProbe.load(path, model, select, device), verbose)

    # ------------------------------------------------------------------ analysis and editing

    def evaluate(self, loader: Iterable[Any], baseline: bool = True) -> dict[str, Any]:
        """Fidelity on held-out data (:func:`koopman_hooks.analysis.evaluate`)."""
        return evaluate(self.fetch_model(), loader, baseline)

    def spectrum(self, surrogate: KoopmanSurrogate | None = None) -> KoopmanSpectrum:
        """Eigenvalues, modes and eigenfunctions of the fitted K, or of an edited surrogate's
        (``unlearn(..., method="per_step")`` edits K itself, and may add a translation: the
        spectrum is then ``affine``): see :class:`~koopman_hooks.analysis.KoopmanSpectrum`."""
        if surrogate is None:
            ae = self.fetch_model().autoencoder
            return koopman_spectrum(ae.operator.matrix(), ae.offsets)
        homogeneous = surrogate.operator  # [[K, b], [0, 1]]: affine where an edit added a translation b
        if bool((homogeneous[:-1, -1] == 0).all()):
            return koopman_spectrum(homogeneous[:-1, :-1], (0, surrogate.steps))
        return koopman_spectrum(homogeneous, (0, surrogate.steps), affine=True)

    def topology(self, loader: Iterable[Any], n_points: int = 2000, layers: Sequence[str] | str | None = None,
                 **options: Any) -> dict[str, Any]:
        """Betti numbers of network layers vs surrogate steps (:func:`koopman_hooks.analysis.compare_topology`)."""
        return compare_topology(self.fetch_model(), loader, n_points, layers, **options)

    def unlearn(self, forget_class: int | Sequence[int], loader: Iterable[Any] | LatentGroupStatistics | None = None,
                method: Method = "endpoint", labels: LabelSource = "loader", **options: Any) -> KoopmanSurrogate:
        """An edited surrogate that forgets ``forget_class`` (:func:`koopman_hooks.unlearning.unlearn`);
        patch it in with ``probe.patch(edited)``. Without a ``loader``, the rows the fit kept
        (``fit(loader, keep_cache=True)``) are read."""
        return unlearn(self.fetch_model(), forget_class, loader, method, labels, **options)

    def unlearning_statistics(self, loader: Iterable[Any] | None = None, labels: LabelSource = "loader",
                              forget_class: int | Sequence[int] = (), **options: Any) -> LatentGroupStatistics:
        """One pass over ``loader`` (default: the rows the fit kept) that many :meth:`unlearn`
        calls can reuse (:func:`koopman_hooks.unlearning.unlearning_statistics`)."""
        return unlearning_statistics(self.fetch_model(), loader, labels, forget_class, **options)

    def __repr__(self) -> str:
        c = self.config
        if not self.is_fitted:
            def shown(v: Any) -> str:
                return "auto" if v is None else str(list(v) if isinstance(v, tuple) else v)

            return (f"KoopmanProbe(layers={list(c.layers)}, latent_dim={shown(c.latent_dim)}, steps={shown(c.steps)}, "
                    f"hidden={shown(c.hidden)}, operator={c.operator!r}, not fitted)")
        fitted = self.fetch_model()
        sizes = fitted.sizes
        ae = fitted.autoencoder.config
        macs = ""
        if sizes is not None:
            macs = (f", surrogate {sizes.surrogate_macs} multiply-adds/sample (the replaced modules' are not counted: "
                    "only linear layers and convolutions are)" if sizes.replaced_macs is None else
                    f", surrogate {sizes.surrogate_macs} vs replaced {sizes.replaced_macs} multiply-adds/sample")
        return (f"KoopmanProbe(layers={list(c.layers)}, width={ae.width}, latent_dim={ae.latent_dim}, "
                f"hidden={list(ae.hidden)}, steps={list(ae.segment_steps)}, operator={c.operator!r}{macs}, fitted)")
