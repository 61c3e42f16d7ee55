"""Tests of koopman_hooks/fitting/trainer.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from koopman_hooks import KoopmanProbe, NotFittedError
from koopman_hooks.core.hooks import hooked
from koopman_hooks.data import TensorLoader
from koopman_hooks.models import ResMLP

TINY = dict(latent_dim=6, steps=1, hidden=(8,), width=4, verbose=False)


def resmlp(depth: int = 3, batch_norm: bool = False) -> ResMLP:
    torch.manual_seed(0)
    return ResMLP(4, 3, width=6, depth=depth, batch_norm=batch_norm)


def loader(n: int = 48, batch_size: int = 16, seed: int = 0) -> TensorLoader:
    g = torch.Generator().manual_seed(seed)
    return TensorLoader(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g), batch_size=batch_size)


class MaybeNaN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.make_nan = False

    def forward(self, x):
        return torch.sqrt(x) if self.make_nan else torch.relu(x)


class CleanupNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input = nn.Linear(4, 6)
        self.norm = nn.BatchNorm1d(6)
        self.mid = MaybeNaN()
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(self.drop(self.mid(self.norm(self.input(x)))))


class FailingLoader:
    """Yields batches from ``inner`` and raises RuntimeError after ``after`` batches in total."""

    def __init__(self, inner, after: int) -> None:
        self.inner, self.after, self.count = inner, after, 0

    def __iter__(self):
        for batch in self.inner:
            if self.count == self.after:
                raise RuntimeError("loader broke")
            self.count += 1
            yield batch



@pytest.mark.parametrize("failure", ["loader_adapters", "loader_training", "nan"])
def test_model_restored_after_exception_in_fit(failure):
    torch.manual_seed(0)
    m = CleanupNet()
    with torch.no_grad():
        m.norm.running_mean.uniform_(-1, 1)
    m.train()
    m.norm.eval()  # a mixed state
    calls = []
    user_handle = m.mid.register_forward_hook(lambda mod, args, out: calls.append(out.shape))
    modes = {name: mod.training for name, mod in m.named_modules()}
    hooks = {name: dict(mod._forward_hooks) for name, mod in m.named_modules()}
    pre_hooks = {name: dict(mod._forward_pre_hooks) for name, mod in m.named_modules()}
    state = {k: v.clone() for k, v in m.state_dict().items()}

    data = loader(n=48, batch_size=16)  # 3 batches per pass
    # the loader fails in its second pass: only a fit that does not replay pass 1 reads it twice
    probe = KoopmanProbe(m, ["input", "mid", "out"], **TINY, replay_mb=0 if failure == "loader_training" else 64)
    if failure == "nan":
        m.mid.make_nan = True
        with pytest.raises(ValueError, match="'mid'") as err:
            probe.fit(data, epochs=2)
        assert "non-finite" in str(err.value)
        m.mid.make_nan = False
    else:
        after = 2 if failure == "loader_adapters" else 5
        with pytest.raises(RuntimeError, match="loader broke"):
            probe.fit(FailingLoader(data, after), epochs=2)
    # a failed fit leaves nothing half-made: the probe stays unfitted
    assert not probe.is_fitted
    with pytest.raises(NotFittedError):
        probe.surrogate()

    assert {name: dict(mod._forward_hooks) for name, mod in m.named_modules()} == hooks
    assert {name: dict(mod._forward_pre_hooks) for name, mod in m.named_modules()} == pre_hooks
    assert {name: mod.training for name, mod in m.named_modules()} == modes
    assert m.training and not m.norm.training and m.drop.training
    after_state = m.state_dict()
    assert after_state.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(after_state[key], value), key
    assert all(p.grad is None for p in m.parameters())
    # the user's hook is still registered and still fires
    n = len(calls)
    m.eval()
    m(torch.randn(2, 4))
    assert len(calls) == n + 1 and calls[-1] == (2, 6)
    user_handle.remove()
    assert all(not mod._forward_hooks for mod in m.modules())



def test_successful_fit_also_restores_model():
    torch.manual_seed(0)
    m = resmlp(batch_norm=True)
    m.train()
    m.blocks[1].eval()
    modes = {name: mod.training for name, mod in m.named_modules()}
    state = {k: v.clone() for k, v in m.state_dict().items()}
    KoopmanProbe(m, ["input", "blocks.*"], **TINY).fit(loader(), epochs=1)
    assert {name: mod.training for name, mod in m.named_modules()} == modes
    assert all(torch.equal(m.state_dict()[k], v) for k, v in state.items())
    assert all(p.grad is None for p in m.parameters())
    assert all(not mod._forward_hooks for mod in m.modules())




import math

import pytest
from torch import nn


def damped_rotation_system(d: int = 4, depth: int = 5, r: float = 0.9, n: int = 2048):
    """``depth`` identical bias-free layers ``x -> A x`` with ``A = r C^½ Q C^-½`` (Q: two
    rotations, by 0.5 and 1.2 rad), on inputs whose sample covariance is exactly ``C``.

    Then every layer's covariance is ``r^{2l} C``: the PCA adapters of all layers share one
    basis and their unit-RMS scales shrink by ``r`` per layer, so one latent K fits every
    segment, and in adapted coordinates K's eigenvalues are A's divided by ``r``."""
    c = torch.tensor([4.0, 1.0, 0.25, 0.0625], dtype=torch.float64)[:d]

    def rot(t: float) -> torch.Tensor:
        return torch.tensor([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]], dtype=torch.float64)

    q = torch.block_diag(rot(0.5), rot(1.2))[:d, :d]
    a = r * torch.diag(c.sqrt()) @ q @ torch.diag(c.rsqrt())
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z -= z.mean(0)
    evals, evecs = torch.linalg.eigh(z.T @ z / n)
    x = (z @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T * c.sqrt()).float()
    model = nn.Sequential(*[nn.Linear(d, d, bias=False) for _ in range(depth)])
    with torch.no_grad():
        for layer in model:
            layer.weight.copy_(a.float())
    return model, a, x


def _sorted_eigs(m: torch.Tensor) -> torch.Tensor:
    e = torch.linalg.eigvals(m.double())
    return e[torch.argsort(e.real * 10 + e.imag)]



def test_known_linear_dynamics_are_recovered():
    model, a, x = damped_rotation_system()
    probe = KoopmanProbe(model, "*", latent_dim=4, steps=1, operator="dense", operator_fit="ridge", hidden=(),
                         lr=2e-2, verbose=False)
    assert probe.layers == ["0", "1", "2", "3", "4"]
    probe.fit(TensorLoader(x, batch_size=128, shuffle=True), epochs=30)
    metrics = probe.evaluate(TensorLoader(x[:512], batch_size=256))
    assert set(metrics["state_fvu_per_layer"]) == {"1", "2", "3", "4"}
    assert max(metrics["state_fvu_per_layer"].values()) < 1e-3, metrics["state_fvu_per_layer"]
    assert metrics["linear_baseline"]["state_fvu"] < 1e-6
    assert metrics["agreement"] == 1.0
    # the closed-form K, in the unit-RMS latent space: A's eigenvalues without the damping r
    k = probe.autoencoder.operator.matrix().detach()
    torch.testing.assert_close(_sorted_eigs(k), _sorted_eigs(a / 0.9), rtol=0, atol=1e-2)

    def raw_jacobian(module: nn.Module) -> torch.Tensor:
        return torch.autograd.functional.jacobian(lambda v: module(v[None])[0], torch.zeros(4)).double()

    # in the layers' own coordinates every one-segment surrogate is A itself (damping included)
    for i in range(4):
        jac = raw_jacobian(probe.surrogate(probe.layers[i], probe.layers[i + 1]))
        torch.testing.assert_close(jac, a, rtol=0, atol=2e-2)
    torch.testing.assert_close(_sorted_eigs(raw_jacobian(probe.surrogate())), _sorted_eigs(torch.linalg.matrix_power(a, 4)),
                               rtol=0, atol=1e-2)
    # the linear baseline to layers[1] is A too: the data are exactly linear
    torch.testing.assert_close(raw_jacobian(probe.linear_baseline("1")), a, rtol=0, atol=1e-3)




def test_pass_two_replays_pass_one_instead_of_running_the_model_again_with_the_same_fit():
    import glob
    import tempfile

    torch.manual_seed(0)
    model = resmlp(depth=3, batch_norm=True).eval()
    data = loader(n=600, batch_size=100)
    calls: list[int] = []

    class Counted(nn.Module):  # counts the rows the model really computes (its hooks would also see skipped calls)
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if len(x) == 100:  # a data batch, not the calibration's 8 rows
                calls.append(len(x))
            return self.inner(x)

    model.input = Counted(model.input)
    before = set(glob.glob(f"{tempfile.gettempdir()}/koopman_hooks_cache_*"))
    fits = {}
    # 0.001 MB of RAM: the kept batches go to a temporary file; 0.05 MB of replay: given up mid-pass
    for replay_mb in (64.0, 0.05, 0.0):
        calls.clear()
        probe = KoopmanProbe(model, ["blocks.0", "blocks.1", "blocks.2"], replay_mb=replay_mb, cache_mb=0.001,
                             verbose=False)
        fits[replay_mb] = (probe.fit(data, epochs=2).fetch_model(), sum(calls))
    assert set(glob.glob(f"{tempfile.gettempdir()}/koopman_hooks_cache_*")) == before  # nothing left behind
    replayed, rows = fits[64.0]
    assert rows == 600 and replayed.info["model_passes"] == 1 and "ran once" in replayed.sizes.notes["passes"]
    for replay_mb in (0.05, 0.0):
        twice, rows = fits[replay_mb]
        assert rows == 1200 and twice.info["model_passes"] == 2
        assert ("replay_mb=0.05" if replay_mb else "replay_mb=0") in twice.sizes.notes["passes"]
        for name in replayed.layers:
            torch.testing.assert_close(replayed.adapters[name].basis, twice.adapters[name].basis)
        for (wa, ba), (wb, bb) in zip(replayed.baselines.values(), twice.baselines.values(), strict=True):
            torch.testing.assert_close(wa, wb, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(ba, bb, rtol=1e-5, atol=1e-6)
        for key in ("val_state_fvu_1", "val_state_fvu_2", "val_kl"):  # the closed-form start's held-out scores
            assert replayed.history[0][key] == pytest.approx(twice.history[0][key], rel=1e-4, abs=1e-7)
        torch.testing.assert_close(replayed.autoencoder.operator.matrix(), twice.autoencoder.operator.matrix(),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cache_mb", [64.0, 0.001])  # the kept rows in RAM / in a temporary file
def test_kept_rows_hold_every_layers_states_in_the_fitted_adapters_coordinates(cache_mb, monkeypatch):
    # the later layers' cached states are rotated into the closed-form start's coordinates once,
    # in place: a kept row must equal the fitted adapter applied to that row's activation
    import koopman_hooks.fitting.trainer as trainer

    model = resmlp(depth=3).eval()
    data = loader(n=96, batch_size=32)  # few rows: every one is cached, in the loader's order
    layers = ["blocks.0", "blocks.1", "blocks.2"]
    acts: dict[str, torch.Tensor] = {}
    with hooked(model, {n: lambda m, a, out, n=n: acts.__setitem__(n, out) for n in layers}), torch.no_grad():
        model(data.tensors[0])

    def largest_gap() -> float:
        probe = KoopmanProbe(model, layers, cache_mb=cache_mb, verbose=False).fit(data, epochs=1, keep_cache=True)
        fitted = probe.fetch_model()
        cache, _ = fitted.kept_rows()
        assert cache.n == 96 and cache.on_disk == (cache_mb < 1)
        with torch.no_grad():
            gaps = [(cache.rows(f"s{j}", slice(None)) - fitted.adapters[name](acts[name])).abs().max()
                    for j, name in enumerate(layers)]
        probe.release_cache()
        return float(max(gaps))

    assert largest_gap() < 1e-5
    monkeypatch.setattr(trainer, "rotate_cached_states", lambda cache, rotations: None)
    assert largest_gap() > 1e-2  # without the rotation the rows are in other coordinates: the check can fail


def test_bf16_training_steps_score_and_keep_in_float32(trained_resmlp, yinyang_small):
    """train_amp: the steps' products in bfloat16; the start and the held-out scores are the
    float32 fit's, and the fitted surrogate is as faithful."""
    train, test = yinyang_small
    fits = {}
    for amp in (None, "bf16"):
        probe = KoopmanProbe(trained_resmlp, ["blocks.0", "blocks.2"], verbose=False, train_amp=amp)
        probe.fit(TensorLoader.from_dataset(train, 256, shuffle=True), epochs=10)
        fits[amp] = (probe.fetch_model(), probe.evaluate(TensorLoader.from_dataset(test, 500)))
    (f32, m32), (f16, m16) = fits[None], fits["bf16"]
    assert f32.info["train_amp"] == "float32 (train_amp=None)"
    assert f16.info["train_amp"] == "bf16 (train_amp='bf16')"
    assert f16.info["start_score"] == f32.info["start_score"]  # the closed-form start, scored in float32
    assert m16["agreement"] >= m32["agreement"] - 0.01
    assert m16["state_fvu"] <= 1.5 * m32["state_fvu"] + 1e-3


def test_train_amp_auto_takes_bf16_only_where_it_pays(trained_resmlp, yinyang_small):
    from koopman_hooks.core.precision import MIN_STEP_MACS, bf16_pays, native_bf16
    from koopman_hooks.fitting.sizing import surrogate_macs

    train, _ = yinyang_small
    for latent_dim in (12, 512):  # a step far below and far above MIN_STEP_MACS
        probe = KoopmanProbe(trained_resmlp, ["blocks.0", "blocks.2"], latent_dim=latent_dim, batch_size=128,
                             verbose=False)  # train_amp="auto"
        fitted = probe.fit(TensorLoader.from_dataset(train, 256), epochs=1).fetch_model()
        sizes = fitted.sizes
        step = sizes.batch_size * surrogate_macs(0, 0, sizes.width, sizes.latent_dim, sizes.hidden)
        pays, why = bf16_pays(torch.device("cpu"), step)
        assert fitted.info["train_amp"] == f"{'bf16' if pays else 'float32'} ({why})"
        if step < MIN_STEP_MACS:
            assert not pays and "fixed costs" in why
        else:
            assert pays == native_bf16(torch.device("cpu"))[0]


def test_train_amp_is_validated():
    from koopman_hooks.errors import ConfigError

    with pytest.raises(ConfigError, match="train_amp"):
        KoopmanProbe(resmlp(), ["blocks.0", "blocks.2"], train_amp="fp8", verbose=False)  # type: ignore[arg-type]


def test_train_amp_auto_is_one_answer_for_every_rank(monkeypatch):
    """A rank whose device has no native bfloat16 takes every rank to float32."""
    import koopman_hooks.fitting.trainer as trainer
    from koopman_hooks.core import precision

    big = 10 * precision.MIN_STEP_MACS
    monkeypatch.setattr(precision, "_cpu_speedup", lambda: 3.0)
    assert trainer._train_amp("auto", torch.device("cpu"), big)[0]
    monkeypatch.setattr(trainer.distributed, "minimum", lambda value: 0)  # another rank said no
    fast, why = trainer._train_amp("auto", torch.device("cpu"), big)
    assert not fast and "not on every rank" in why
    assert trainer._train_amp("bf16", torch.device("cpu"), 1) == (True, "train_amp='bf16'")
    assert trainer._train_amp(None, torch.device("cpu"), big) == (False, "train_amp=None")
