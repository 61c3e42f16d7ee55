"""How faithful a fitted probe is on held-out data: accuracies, agreement, state and latent FVU.

Every figure that says "surrogate" comes from the surrogate alone: the patched model is strict
(what a lossy reduction at the last layer ignores is the training mean, never the real forward
pass's). The "mixed" agreement (that part copied from the real forward pass) is reported only
as a diagnostic, next to whether that part reaches the model's output at all.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch

from koopman_hooks.core import distributed
from koopman_hooks.core.batches import call_model, class_labels, padding_differs, padding_side
from koopman_hooks.core.hooks import preserved_state
from koopman_hooks.core.select import MODEL_OUTPUT
from koopman_hooks.errors import warn
from koopman_hooks.fitting.fitted import FittedProbe
from koopman_hooks.fitting.head import outputs_differ, template_outputs
from koopman_hooks.maths.scores import ClassificationCounts, StreamingFVU

IGNORE_INDEX = -100  # HuggingFace's label for a token that is not scored


@torch.no_grad()
def evaluate(probe: FittedProbe, loader: Iterable[Any], baseline: bool = True) -> dict[str, Any]:
    """Fidelity on held-out data.

    Returns ``n_samples``, ``agreement`` (the strict patched model's argmax equals the model's)
    and its per-class values, ``state_fvu`` (last layer) and ``state_fvu_per_layer``,
    ``latent_fvu`` (last layer: ``K^k φ(a_0)`` against ``φ(a_L)``) and ``latent_fvu_per_layer``,
    with labels ``model_accuracy``/``surrogate_accuracy`` (and per class), and with
    ``baseline`` the same for the linear (DMD) baseline under ``linear_baseline``. Surrogate
    figures go through :meth:`FittedProbe.patch`, i.e. through the model's real head. Labels
    must be classes of the model's scores (``ValueError`` naming one that is not). Under
    ``torch.distributed`` each rank passes its shard and every rank gets the figures of the union.

    A head that scores every token (``(batch, tokens, classes)``: token classification, a
    language model) is scored per token, over the real ones (the attention mask's; every token
    without one): ``n_tokens`` counts them, ``per_token`` is true, and labels, if any, are
    ``(batch, tokens)`` classes read at the same position (-100: unlabelled, as HuggingFace's
    token classifiers use it; a causal LM's labels are its inputs, shifted inside its loss:
    give none).

    ``reduce`` names the last layer's reduction. When it is lossy, ``mixed_agreement`` is the
    agreement of the mixed patch (``strict=False``: the ignored part from the real forward
    pass; a diagnostic only), ``template_agreement`` that of the model whose last layer keeps
    only what the reduction reads (the rest: its training mean), and
    ``lossy_reduction_reaches_output`` is true when that replacement changes any output or
    the strict and mixed agreements differ (``None`` for an exact reduction, where both
    agreements are the same figure).
    """
    ae = probe.autoencoder
    layers = probe.layers
    last = layers[-1]
    out_adapter = probe.adapters[last]
    lossy = out_adapter.lossy and out_adapter.template is not None
    patched = {"surrogate": probe.patch()}
    if lossy:
        with warnings.catch_warnings():  # the mixed model is measured here as the diagnostic it is
            warnings.simplefilter("ignore")
            patched["mixed"] = probe.patch(strict=False)
    linear = probe.linear_baseline() if baseline and probe.baselines else None
    if linear is not None:
        patched["linear_baseline"] = probe.patch(linear)
    counts = ClassificationCounts(reference="model")
    state_fvu = {name: StreamingFVU() for name in layers[1:]}
    latent_fvu = {name: StreamingFVU() for name in layers[1:]}
    baseline_fvu = StreamingFVU()
    template_moves, warned, rows, per_token = 0, False, 0, False
    with preserved_state(probe.model), distributed.empty_shards(allowed=True):
        for captured in probe.captures(loader):
            acts = captured.activations
            mask = probe.mask_of(captured.inputs)
            side = None if warned else padding_side(mask)  # told once
            if padding_differs(probe.info.get("padding"), side):
                warned = True
                warn(f"these batches are padded on the {side}, the fit's were padded on the "
                     f"{probe.info['padding']}: a layer read by token position sees other tokens at each "
                     "position (agreement falls); pad them as the fit's data was")
            states = probe.adapted(acts, mask)
            for name, z, state in zip(layers[1:], ae.trajectory(ae.encoder(states[0])), states[1:]):
                adapter = probe.adapters[name]
                state_fvu[name].update(adapter.decode_features(ae.decoder(z)), adapter.reduced(acts[name], mask))
                latent_fvu[name].update(z, ae.encoder(state))
            if linear is not None:
                pred = out_adapter.decode_features(linear.decoder(linear.final_latent(acts[layers[0]], mask)))
                baseline_fvu.update(pred, out_adapter.reduced(acts[last], mask))
            scores = {"model": MODEL_OUTPUT.get(captured.output)}
            labels, tokens = captured.labels, None
            rows += len(scores["model"])
            if scores["model"].dim() == 3:  # a score per token: the real tokens', labels at their position
                tokens, per_token = real_tokens(scores["model"], mask), True
                labels = None if labels is None else token_labels(labels, scores["model"])[tokens]
            elif scores["model"].dim() > 3:
                raise ValueError(f"evaluate() reads (batch, classes) or (batch, tokens, classes) scores, got "
                                 f"{tuple(scores['model'].shape)}")
            elif labels is not None and scores["model"].dim() == 2:  # class indices of the model's scores
                labels = class_labels(labels, scores["model"].shape[-1])
            for key, module in patched.items():
                scores[key] = MODEL_OUTPUT.get(call_model(module, captured.inputs))
            if lossy:
                filled = template_outputs(probe.model, last, probe.selector(last), out_adapter, captured.inputs, mask)
                template_moves += int(outputs_differ(filled, captured.output).sum())
                scores["template"] = MODEL_OUTPUT.get(filled)
            if tokens is not None:
                scores = {k: v.reshape(-1, v.shape[-1]).cpu()[tokens] for k, v in scores.items()}
            counts.update(labels, ignore_index=IGNORE_INDEX if tokens is not None else None, **scores)
    # under torch.distributed every rank evaluated its shard: combine the sums exactly
    fvus = distributed.merged_each([baseline_fvu, *state_fvu.values(), *latent_fvu.values()])  # one gather
    counts = distributed.merged(counts)
    baseline_fvu, n = fvus[0], len(state_fvu)
    state_fvu, latent_fvu = dict(zip(state_fvu, fvus[1 : 1 + n])), dict(zip(latent_fvu, fvus[1 + n :]))
    template_moves, rows, token_ranks = (int(v) for v in distributed.summed([template_moves, rows, per_token]))
    result: dict[str, Any] = {"n_samples": rows, "reduce": out_adapter.reduce, "per_token": token_ranks > 0}
    if result["per_token"]:
        result["n_tokens"] = counts.n
    if counts.has_labels:
        result["model_accuracy"], result["model_per_class_accuracy"] = counts.accuracy("model")
        result["surrogate_accuracy"], result["surrogate_per_class_accuracy"] = counts.accuracy("surrogate")
    result["agreement"], result["agreement_per_class"] = counts.agreement("surrogate")
    if lossy:
        result["mixed_agreement"], _ = counts.agreement("mixed")
        result["template_agreement"], _ = counts.agreement("template")
        result["lossy_reduction_reaches_output"] = template_moves > 0 or result["mixed_agreement"] != result["agreement"]
    else:
        result["mixed_agreement"] = result["template_agreement"] = result["agreement"]
        result["lossy_reduction_reaches_output"] = None
    result["state_fvu"] = state_fvu[last].compute()
    result["state_fvu_per_layer"] = {name: fvu.compute() for name, fvu in state_fvu.items()}
    result["latent_fvu"] = latent_fvu[last].compute()
    result["latent_fvu_per_layer"] = {name: fvu.compute() for name, fvu in latent_fvu.items()}
    if "linear_baseline" in patched:
        base: dict[str, Any] = {"state_fvu": baseline_fvu.compute()}
        base["agreement"], _ = counts.agreement("linear_baseline")
        if counts.has_labels:
            base["accuracy"], base["per_class_accuracy"] = counts.accuracy("linear_baseline")
        result["linear_baseline"] = base
    return result


def real_tokens(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Which of the ``(batch * tokens)`` flattened positions of ``(batch, tokens, classes)``
    scores are real tokens: the attention mask's ones, every position without a mask."""
    batch, length = scores.shape[:2]
    if mask is None:
        return torch.ones(batch * length, dtype=torch.bool)
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"the attention mask {tuple(mask.shape)} does not match the model's per-token scores "
                         f"{tuple(scores.shape)}: cannot tell which scores are real tokens'")
    return mask.reshape(-1).cpu() != 0


def token_labels(labels: Any, scores: torch.Tensor) -> torch.Tensor:
    """``(batch, tokens)`` integer labels of per-token scores, flattened (:func:`class_labels`:
    classes of the scores or ``IGNORE_INDEX``)."""
    y = torch.as_tensor(labels).cpu()
    if tuple(y.shape) != tuple(scores.shape[:2]) or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"per-token scores {tuple(scores.shape)} need integer labels of shape "
                         f"{tuple(scores.shape[:2])} (one class per token, {IGNORE_INDEX}: none), got {tuple(y.shape)} {y.dtype}")
    return class_labels(y.reshape(-1), scores.shape[-1], ignore_index=IGNORE_INDEX)
