"""Tests of koopman_hooks/unlearning/edit.py."""

from __future__ import annotations

import json

import pytest
import torch

from koopman_hooks import KoopmanSurrogate
from koopman_hooks.data import TensorLoader
from koopman_hooks.errors import ConfigError
from koopman_hooks.training import predict
from koopman_hooks.unlearning import forget_retain_accuracy
from koopman_hooks.unlearning.edit import check_reusable
from koopman_hooks.unlearning.options import EditOptions

METHODS = ("endpoint", "per_step", "leace")

DOT = 2  # Yin-Yang classes: 0 yin, 1 yang, 2 dot


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _no_hooks(model: torch.nn.Module) -> bool:
    return all(
        not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks) for m in model.modules()
    )


def _accuracy(setup: dict, module: torch.nn.Module, forget) -> tuple[float, float]:
    logits, labels = predict(module, setup["test"])
    return forget_retain_accuracy(logits, labels, forget)


@pytest.fixture(scope="module")
def baseline(setup: dict) -> dict:
    """Forget/retain accuracies of the unedited surrogate, per forgotten class."""
    patched = setup["probe"].patch()
    return {c: _accuracy(setup, patched, c) for c in range(3)}


@pytest.fixture(scope="module")
def edited(setup: dict) -> dict:
    return {m: setup["probe"].unlearn(DOT, setup["loader"], method=m) for m in METHODS}



@pytest.mark.parametrize("method", METHODS)
def test_edit_forgets_the_class_and_keeps_the_others(setup: dict, baseline: dict, edited: dict, method: str) -> None:
    forget_acc, retain_acc = _accuracy(setup, setup["probe"].patch(edited[method]), DOT)
    base_forget, base_retain = baseline[DOT]
    assert base_forget > 0.8  # the surrogate recognised the class before the edit
    assert forget_acc <= 0.05, (method, forget_acc)
    assert retain_acc >= base_retain - 0.04, (method, retain_acc, base_retain)



def test_every_class_can_be_forgotten(setup: dict, baseline: dict) -> None:
    # Yin and yang each enclose a dot: the least-squares redirect alone, an affine map that moves
    # one of them onto the other, drags part of its dot along (~9 points of retained accuracy
    # lost here); the refinement on the patched outputs recovers it, still as one affine map.
    for c in (0, 1):
        least_squares = setup["probe"].unlearn(c, setup["loader"], refine=0)
        refined = setup["probe"].unlearn(c, setup["loader"])
        ls_forget, ls_retain = _accuracy(setup, setup["probe"].patch(least_squares), c)
        forget_acc, retain_acc = _accuracy(setup, setup["probe"].patch(refined), c)
        assert forget_acc <= 0.03, (c, forget_acc)
        assert retain_acc >= baseline[c][1] - 0.02, (c, retain_acc, baseline[c][1])
        assert retain_acc > ls_retain and forget_acc <= ls_forget + 0.01, (c, ls_forget, ls_retain)
        assert refined.info["refine_loss_after"] < refined.info["refine_loss_before"]
        assert refined.readout.shape == least_squares.readout.shape  # still one homogeneous map
        torch.testing.assert_close(refined.readout[-1], torch.eye(len(refined.readout))[-1])



def test_several_classes_at_once(setup: dict) -> None:
    surrogate = setup["probe"].unlearn([0, 2], setup["loader"])
    assert surrogate.info["forget_classes"] == [0, 2]
    assert surrogate.info["retained_classes"] == [1]
    logits, labels = predict(setup["probe"].patch(surrogate), setup["test"])
    forget_acc, retain_acc = forget_retain_accuracy(logits, labels, [0, 2])
    assert forget_acc <= 0.05
    assert retain_acc >= 0.9
    for c in (0, 2):  # each forgotten class separately
        mask = labels == c
        assert (logits[mask].argmax(1) == c).float().mean() <= 0.05



def test_model_labels(setup: dict) -> None:
    surrogate = setup["probe"].unlearn(DOT, setup["loader"], labels="model")
    assert surrogate.info["labels"] == "model"
    forget_acc, retain_acc = _accuracy(setup, setup["probe"].patch(surrogate), DOT)
    assert forget_acc <= 0.05
    assert retain_acc >= 0.85
    # the model's predictions, not the labels, define the forgotten class
    logits, _ = predict(setup["probe"].patch(surrogate), setup["test"])
    original, _ = predict(setup["model"], setup["test"])
    predicted_dot = original.argmax(1) == DOT
    assert (logits[predicted_dot].argmax(1) == DOT).float().mean() <= 0.05



def test_patch_leaves_the_model_untouched(setup: dict) -> None:
    model, probe = setup["model"], setup["probe"]
    x = setup["train"].inputs[:64]
    model.train()  # the mode must come back as it was
    before_state = _state(model)
    with torch.no_grad():
        model.eval()
        before = model(x)
        model.train()
    surrogate = probe.unlearn([1], setup["loader"], method="per_step")
    patched = probe.patch(surrogate)
    with torch.no_grad():
        patched_out = patched.eval()(x)
    model.train()
    assert model.training and all(m.training for m in model.modules())
    now = model.state_dict()
    assert now.keys() == before_state.keys() and all(torch.equal(now[k], before_state[k]) for k in now)
    assert _no_hooks(model)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x), before)
    assert not torch.equal(patched_out, before)
    model.eval()



def test_only_the_linear_dynamics_change(setup: dict, edited: dict) -> None:
    original = setup["probe"].surrogate()
    for method, surrogate in edited.items():
        for name, tensor in original.state_dict().items():
            if name in ("operator", "readout"):
                continue
            assert torch.equal(tensor, surrogate.state_dict()[name]), (method, name)
        changed = "operator" if method == "per_step" else "readout"
        kept = "readout" if method == "per_step" else "operator"
        assert not torch.equal(getattr(surrogate, changed), getattr(original, changed))
        assert torch.equal(getattr(surrogate, kept), getattr(original, kept))
        last = getattr(surrogate, changed)[-1]  # still homogeneous affine
        assert torch.equal(last, torch.eye(len(last))[-1])



def test_unknown_and_out_of_range_classes(setup: dict) -> None:
    probe, loader = setup["probe"], setup["loader"]
    with pytest.raises(ValueError, match=r"forget class 7 is out of range.*\[0, 1, 2\]"):
        probe.unlearn(7, loader)
    with pytest.raises(ValueError, match="negative"):
        probe.unlearn(-1, loader)
    train = setup["train"]
    keep = train.targets != 2
    partial = TensorLoader(train.inputs[keep], train.targets[keep], batch_size=256)
    with pytest.raises(ValueError, match=r"forget class 2 never appears.*classes seen: \[0, 1\]"):
        probe.unlearn(2, partial)



def test_forgetting_every_class_is_refused(setup: dict) -> None:
    with pytest.raises(ValueError, match="every class"):
        setup["probe"].unlearn([0, 1, 2], setup["loader"])
    with pytest.raises(ValueError, match="empty"):
        setup["probe"].unlearn([], setup["loader"])



@pytest.mark.parametrize("bad", [1.0, "1", True, [0, 1.5], None])
def test_non_int_class_is_a_type_error(setup: dict, bad) -> None:
    with pytest.raises(TypeError, match="forget_class"):
        setup["probe"].unlearn(bad, setup["loader"])



def test_bad_options(setup: dict) -> None:
    with pytest.raises(ConfigError, match="method"):
        setup["probe"].unlearn(DOT, setup["loader"], method="magic")
    with pytest.raises(ConfigError, match="labels"):
        setup["probe"].unlearn(DOT, setup["loader"], labels="oracle")
    with pytest.raises(ConfigError, match="unknown key.*'strenght'.*did you mean 'strength'"):
        setup["probe"].unlearn(DOT, setup["loader"], strenght=2.0)
    with pytest.raises(ConfigError, match="strength: expected float"):
        setup["probe"].unlearn(DOT, setup["loader"], strength="strong")



def test_edited_surrogates_save_and_load(setup: dict, edited: dict, tmp_path) -> None:
    model = setup["model"]
    x = setup["train"].inputs[:100]
    with torch.no_grad():
        acts = model.blocks[0](model.input(x))  # the surrogate's input: blocks.0's output
    for method, surrogate in edited.items():
        path = tmp_path / f"{method}.safetensors"
        surrogate.save(path)
        loaded = KoopmanSurrogate.load(path)
        assert torch.equal(loaded.operator, surrogate.operator)
        assert torch.equal(loaded.readout, surrogate.readout)
        with torch.no_grad():
            assert torch.equal(loaded(acts), surrogate(acts))
        assert loaded.info["method"] == method
        assert loaded.info["forget_classes"] == [DOT]
        json.dumps(loaded.info)  # the header stays JSON
        with torch.no_grad():  # and patches like the original
            a = setup["probe"].patch(loaded)(x)
            b = setup["probe"].patch(surrogate)(x)
        assert torch.equal(a, b)



def test_info_reports_timing(edited: dict) -> None:
    for surrogate in edited.values():
        info = surrogate.info
        assert info["stats_seconds"] > 0
        assert info["edit_seconds"] >= 0  # the speed itself is measured by benchmarks/fit_cost.py
        assert info["options"]["strength"] == EditOptions().strength
    assert edited["per_step"].info["power_error"] >= 0



def test_nearest_redirect_without_runner_up(setup: dict) -> None:
    surrogate = setup["probe"].unlearn(DOT, setup["loader"], redirect="nearest", metric="euclidean")
    forget_acc, _ = _accuracy(setup, setup["probe"].patch(surrogate), DOT)
    assert forget_acc <= 0.1



def test_reused_statistics_give_the_fresh_edit(setup: dict) -> None:
    probe = setup["probe"]
    stats = probe.unlearning_statistics(setup["loader"], metric="euclidean")
    assert stats.forget == () and stats.power is not None
    for c in (0, DOT):  # the least-squares redirect: moments do not depend on the (shuffled) order
        fresh = probe.unlearn(c, setup["loader"], metric="euclidean", refine=0)
        reused = probe.unlearn(c, stats, metric="euclidean", refine=0)
        assert reused.info["stats_reused"] and not fresh.info["stats_reused"]
        torch.testing.assert_close(reused.readout, fresh.readout, atol=1e-5, rtol=1e-4)  # float32 sums, other order
    # with the refinement too, given the same stream (its sample of rows is seeded by the order)
    ordered = setup["test"]
    fresh = probe.unlearn(DOT, ordered, metric="euclidean")
    reused = probe.unlearn(DOT, probe.unlearning_statistics(ordered, metric="euclidean"), metric="euclidean")
    torch.testing.assert_close(reused.readout, fresh.readout, atol=1e-4, rtol=1e-3)



def test_reused_statistics_are_checked(setup: dict) -> None:
    probe = setup["probe"]
    stats = probe.unlearning_statistics(setup["loader"], metric="euclidean")
    with pytest.raises(ValueError, match="metric='euclidean'"):
        probe.unlearn(DOT, stats)  # the edit's default metric is the decoder's
    with pytest.raises(ValueError, match="labels='loader'"):
        probe.unlearn(DOT, stats, labels="model", metric="euclidean")
    # yin's runner-up is often yang: forgetting both needs statistics that know it
    with pytest.raises(ValueError, match="runner-up class is also forgotten"):
        probe.unlearn([0, 1], stats, metric="euclidean")
    both = probe.unlearning_statistics(setup["loader"], forget_class=[0, 1], metric="euclidean")
    assert probe.unlearn([0, 1], both, metric="euclidean").info["forget_classes"] == [0, 1]
    with pytest.raises(ValueError, match="includes \\[1\\]"):
        probe.unlearn(0, both, metric="euclidean")
    # statistics of one surrogate do not fit another one
    readout = probe.surrogate().readout.clone()
    readout[0, 0] += 0.5
    other = probe.surrogate().edited(readout=readout)
    with pytest.raises(ValueError, match="different surrogate"):
        check_reusable(stats, [DOT], "loader", other, EditOptions(metric="euclidean"))



def test_refinement_leaves_the_model_untouched(setup: dict) -> None:
    model, probe = setup["model"], setup["probe"]
    before = _state(model)
    model.blocks[0].requires_grad_(False)  # flags must come back exactly as they were
    flags = [p.requires_grad for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.train()
    try:
        probe.unlearn(DOT, setup["loader"])
        assert [p.requires_grad for p in model.parameters()] == flags
        for param, grad in zip(model.parameters(), grads):  # no gradient reached the model
            assert (param.grad is None and grad is None) or torch.equal(param.grad, grad)
        assert model.training and _no_hooks(model)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    finally:
        model.requires_grad_(True)
        model.eval()



def test_refinement_needs_sampled_rows(setup: dict) -> None:
    stats = setup["probe"].unlearning_statistics(setup["loader"], refine_rows=0)
    assert stats.reservoir is None
    with pytest.raises(ValueError, match="refine_rows"):
        setup["probe"].unlearn(DOT, stats)
    assert setup["probe"].unlearn(DOT, stats, refine=0).info["forget_classes"] == [DOT]




def test_statistics_without_inputs_are_refused_by_a_loaded_probe_that_cannot_run_the_tail_yet(setup, tmp_path):
    from koopman_hooks import KoopmanProbe

    probe = setup["probe"]
    stats = probe.unlearning_statistics(setup["loader"], refine_rows=64)  # this probe runs the tail from states
    assert stats.reservoir is not None and stats.reservoir.inputs.shape[1:] == (0,)
    probe.save(tmp_path / "p.safetensors")
    loaded = KoopmanProbe.load(tmp_path / "p.safetensors", setup["model"], verbose=False)
    with pytest.raises(ValueError, match="Collect them with this probe's unlearning_statistics"):
        loaded.unlearn(2, stats, refine=3)
    loaded.unlearn(2, stats, refine=0)  # the least-squares edit needs no rows
    own = loaded.unlearning_statistics(setup["loader"], refine_rows=64)
    loaded.unlearn(2, own, refine=3)
