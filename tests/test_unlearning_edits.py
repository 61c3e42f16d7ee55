"""Class unlearning by editing the surrogate's latent linear dynamics (koopman_hooks.unlearning.edits)."""

from __future__ import annotations

import json

import pytest
import torch

from koopman_hooks import KoopmanProbe, KoopmanSurrogate
from koopman_hooks.data import TensorLoader, YinYangDataset
from koopman_hooks.models import ResMLP
from koopman_hooks.training import predict, train_classifier
from koopman_hooks.unlearning import forget_retain_accuracy
from koopman_hooks.unlearning.refine import SampleReservoir
from koopman_hooks.unlearning.edits import (
    DEFAULTS,
    METHODS,
    LatentGroupStatistics,
    _check_reusable,
    latent_statistics,
    redirect_map,
    unlearn,
)

DOT = 2  # Yin-Yang classes: 0 yin, 1 yang, 2 dot


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _no_hooks(model: torch.nn.Module) -> bool:
    return all(
        not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks) for m in model.modules()
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run much faster on one thread (and do not fight other tests for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(one_thread) -> dict:
    torch.manual_seed(0)
    train = YinYangDataset(3000, seed=0)
    test = YinYangDataset(1500, seed=1)
    model = ResMLP(4, 3, width=10, depth=4)
    train_classifier(model, TensorLoader.from_dataset(train, 32, shuffle=True), epochs=30, lr=2e-2, verbose=False)
    loader = TensorLoader.from_dataset(train, batch_size=128, shuffle=True)
    probe = KoopmanProbe(model, ["blocks.0", "blocks.3"], latent_dim=16, steps=6, hidden=(64, 64), verbose=False)
    probe.fit(loader, epochs=30)
    test_loader = TensorLoader.from_dataset(test, 500)
    return {"model": model, "probe": probe, "loader": loader, "test": test_loader, "train": train}


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
    return {m: unlearn(setup["probe"], DOT, setup["loader"], method=m) for m in METHODS}


# --------------------------------------------------------------------------- forgetting


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
        least_squares = unlearn(setup["probe"], c, setup["loader"], refine=0)
        refined = unlearn(setup["probe"], c, setup["loader"])
        ls_forget, ls_retain = _accuracy(setup, setup["probe"].patch(least_squares), c)
        forget_acc, retain_acc = _accuracy(setup, setup["probe"].patch(refined), c)
        assert forget_acc <= 0.03, (c, forget_acc)
        assert retain_acc >= baseline[c][1] - 0.02, (c, retain_acc, baseline[c][1])
        assert retain_acc > ls_retain and forget_acc <= ls_forget + 0.01, (c, ls_forget, ls_retain)
        assert refined.info["refine_loss_after"] < refined.info["refine_loss_before"]
        assert refined.readout.shape == least_squares.readout.shape  # still one homogeneous map
        torch.testing.assert_close(refined.readout[-1], torch.eye(len(refined.readout))[-1])


def test_several_classes_at_once(setup: dict) -> None:
    surrogate = unlearn(setup["probe"], [0, 2], setup["loader"])
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
    surrogate = unlearn(setup["probe"], DOT, setup["loader"], labels="model")
    assert surrogate.info["labels"] == "model"
    forget_acc, retain_acc = _accuracy(setup, setup["probe"].patch(surrogate), DOT)
    assert forget_acc <= 0.05
    assert retain_acc >= 0.85
    # the model's predictions, not the labels, define the forgotten class
    logits, _ = predict(setup["probe"].patch(surrogate), setup["test"])
    original, _ = predict(setup["model"], setup["test"])
    predicted_dot = original.argmax(1) == DOT
    assert (logits[predicted_dot].argmax(1) == DOT).float().mean() <= 0.05


# --------------------------------------------------------------------------- the model is untouched


def test_patch_leaves_the_model_untouched(setup: dict) -> None:
    model, probe = setup["model"], setup["probe"]
    x = setup["train"].inputs[:64]
    model.train()  # the mode must come back as it was
    before_state = _state(model)
    with torch.no_grad():
        model.eval()
        before = model(x)
        model.train()
    surrogate = unlearn(probe, [1], setup["loader"], method="per_step")
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


# --------------------------------------------------------------------------- validation


def test_unknown_and_out_of_range_classes(setup: dict) -> None:
    probe, loader = setup["probe"], setup["loader"]
    with pytest.raises(ValueError, match=r"forget class 7 is out of range.*\[0, 1, 2\]"):
        unlearn(probe, 7, loader)
    with pytest.raises(ValueError, match="negative"):
        unlearn(probe, -1, loader)
    train = setup["train"]
    keep = train.targets != 2
    partial = TensorLoader(train.inputs[keep], train.targets[keep], batch_size=256)
    with pytest.raises(ValueError, match=r"forget class 2 never appears.*classes seen: \[0, 1\]"):
        unlearn(probe, 2, partial)


def test_forgetting_every_class_is_refused(setup: dict) -> None:
    with pytest.raises(ValueError, match="every class"):
        unlearn(setup["probe"], [0, 1, 2], setup["loader"])
    with pytest.raises(ValueError, match="empty"):
        unlearn(setup["probe"], [], setup["loader"])


@pytest.mark.parametrize("bad", [1.0, "1", True, [0, 1.5], None])
def test_non_int_class_is_a_type_error(setup: dict, bad) -> None:
    with pytest.raises(TypeError, match="forget_class"):
        unlearn(setup["probe"], bad, setup["loader"])


def test_bad_options(setup: dict) -> None:
    with pytest.raises(ValueError, match="method"):
        unlearn(setup["probe"], DOT, setup["loader"], method="magic")
    with pytest.raises(ValueError, match="labels"):
        unlearn(setup["probe"], DOT, setup["loader"], labels="oracle")
    with pytest.raises(TypeError, match="unknown options"):
        unlearn(setup["probe"], DOT, setup["loader"], strenght=2.0)


# --------------------------------------------------------------------------- artifact


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
    for method, surrogate in edited.items():
        info = surrogate.info
        assert info["stats_seconds"] > 0
        assert 0 <= info["edit_seconds"] < 2.0, (method, info["edit_seconds"])  # ≤ 1 s unloaded
        assert info["options"]["strength"] == DEFAULTS["strength"]
    assert edited["per_step"].info["power_error"] >= 0


# --------------------------------------------------------------------------- statistics


def test_streamed_statistics_match_the_direct_computation(setup: dict) -> None:
    probe = setup["probe"]
    surrogate = probe.surrogate()
    stats = latent_statistics(probe, setup["loader"], [DOT], metric="euclidean")
    assert isinstance(stats, LatentGroupStatistics)
    assert stats.n_outputs == 3 and stats.classes == [0, 1, 2] and stats.metric is None
    assert sum(stats.counts().values()) == len(setup["train"])
    train = setup["train"]
    with torch.no_grad():
        acts = {}
        handle = probe.model.blocks[0].register_forward_hook(lambda m, i, o: acts.setdefault("a", o))
        logits = probe.model(train.inputs)
        handle.remove()
        z = surrogate.advance(surrogate.encode(acts["a"])).double()
    mask = train.targets == DOT
    # forgotten samples are grouped by the best retained class
    runner_up = torch.tensor([0, 1])[logits[mask][:, [0, 1]].argmax(1)]
    for s in (0, 1):
        group = stats.groups[(DOT, s)]
        rows = z[mask][runner_up == s]
        assert group.n == len(rows)
        torch.testing.assert_close(group.mean_x, rows.mean(0), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(group.cov_xx, torch.cov(rows.T, correction=0), atol=1e-4, rtol=1e-3)
    n, mean, _ = stats.class_moments([DOT])
    assert n == int(mask.sum())
    torch.testing.assert_close(mean, z[mask].mean(0), atol=1e-4, rtol=1e-4)
    # memory: a few d x d moments per group, whatever the dataset size
    d = surrogate.latent_dim
    assert all(m.cov_xx.shape == (d, d) for m in stats.groups.values())
    assert len(stats.groups) <= 3 * 3


def test_metric_solvers_agree(setup: dict) -> None:
    stats = latent_statistics(setup["probe"], setup["loader"], [DOT])
    direct = redirect_map(stats, [0, 1], solver="direct")
    cg = redirect_map(stats, [0, 1], solver="cg")
    # CG stops at a 1e-4 relative residual: entries along directions the data barely span stay
    # loose, but where the samples lie (every group's mapped mean and spread) the maps agree
    for m in stats.groups.values():
        d = len(m.mean_x)
        ends = [h[:d, :d] @ m.mean_x + h[:d, d] for h in (direct, cg)]
        spread = float(m.cov_xx.trace().sqrt()) + float(ends[0].norm())
        assert float((ends[0] - ends[1]).norm()) <= 0.02 * spread
        covs = [h[:d, :d] @ m.cov_xx @ h[:d, :d].T for h in (direct, cg)]
        assert float((covs[0] - covs[1]).norm()) <= 0.05 * float(covs[0].norm()) + 1e-9
    euclid = redirect_map(stats, [0, 1], metric="euclidean")
    assert euclid.shape == direct.shape
    assert torch.equal(direct[-1], torch.eye(len(direct), dtype=direct.dtype)[-1])


def test_nearest_redirect_without_runner_up(setup: dict) -> None:
    surrogate = unlearn(setup["probe"], DOT, setup["loader"], redirect="nearest", metric="euclidean")
    forget_acc, _ = _accuracy(setup, setup["probe"].patch(surrogate), DOT)
    assert forget_acc <= 0.1


# --------------------------------------------------------------------------- reusable statistics


def test_reused_statistics_give_the_fresh_edit(setup: dict) -> None:
    probe = setup["probe"]
    stats = probe.unlearning_statistics(setup["loader"], metric="euclidean")
    assert stats.forget == () and stats.power is not None
    for c in (0, DOT):  # the least-squares redirect: moments do not depend on the (shuffled) order
        fresh = unlearn(probe, c, setup["loader"], metric="euclidean", refine=0)
        reused = probe.unlearn(c, stats, metric="euclidean", refine=0)
        assert reused.info["stats_reused"] and not fresh.info["stats_reused"]
        torch.testing.assert_close(reused.readout, fresh.readout, atol=1e-5, rtol=1e-4)  # float32 sums, other order
    # with the refinement too, given the same stream (its sample of rows is seeded by the order)
    ordered = setup["test"]
    fresh = unlearn(probe, DOT, ordered, metric="euclidean")
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
        _check_reusable(stats, [DOT], "loader", other, {**DEFAULTS, "metric": "euclidean"})


# --------------------------------------------------------------------------- refinement


def test_sample_reservoir_is_bounded_uniform_seeded_and_aligned() -> None:
    def stream(seed: int) -> SampleReservoir:
        reservoir = SampleReservoir(100, seed=seed)
        for start in range(0, 5000, 250):
            rows = torch.arange(start, start + 250)
            reservoir.update(rows[:, None].float(), rows % 3, (rows + 1) % 3, rows % 5)
        return reservoir

    a = stream(0)
    assert len(a) == 100 and a.inputs.shape == (100, 1)
    index = a.inputs[:, 0].long()
    assert torch.equal(a.labels, index % 3) and torch.equal(a.keys, (index + 1) % 3)
    assert torch.equal(a.predictions, index % 5)  # rows stay aligned
    assert len(index.unique()) == 100
    assert 1500 < index.float().mean() < 3500  # drawn from the whole stream, not its start
    assert torch.equal(stream(0).inputs, a.inputs) and not torch.equal(stream(1).inputs, a.inputs)
    with pytest.raises(TypeError, match="refine=0"):
        a.update({"x": torch.zeros(2, 1)}, torch.zeros(2), torch.zeros(2), None)


def test_refinement_leaves_the_model_untouched(setup: dict) -> None:
    model, probe = setup["model"], setup["probe"]
    before = _state(model)
    model.blocks[0].requires_grad_(False)  # flags must come back exactly as they were
    flags = [p.requires_grad for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.train()
    try:
        unlearn(probe, DOT, setup["loader"])
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
