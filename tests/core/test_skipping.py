"""Tests of koopman_hooks/core/skipping.py and the fast paths built on it (core/patching.py)."""

from __future__ import annotations

import torch
from torch import nn

from koopman_hooks.core.batches import call_model
from koopman_hooks.core.patching import PatchedModel
from koopman_hooks.core.select import OutputSelector
from koopman_hooks.core.skipping import skip_plan, trace
from koopman_hooks.core.tail import TailRunner, tail_runner
from koopman_hooks.models import ResMLP


class Counting(nn.Module):
    """Counts its calls."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x)


def test_the_plan_skips_exactly_the_modules_between_two_layers():
    model = ResMLP(4, 3, width=6, depth=5).eval()
    x = torch.randn(5, 4)
    seen = trace(model, lambda: model(x))
    assert skip_plan(seen, "blocks.4", after="blocks.0") == ["blocks.1", "blocks.2", "blocks.3"]
    assert skip_plan(seen, "blocks.4") == ["input", "blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    assert skip_plan(seen, "blocks.1", after="blocks.0") == []


def test_a_module_used_outside_the_window_is_never_skipped():
    shared = nn.ReLU()

    class Reuse(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c, self.act = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3), shared

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.c(self.act(self.b(self.act(self.a(x))))))

    model = Reuse()
    plan = skip_plan(trace(model, lambda: model(torch.randn(2, 3))), "c", after="a")
    assert plan == ["b"]  # act runs inside the window too, but also after it


def test_the_fast_patched_path_skips_work_and_equals_the_full_one():
    torch.manual_seed(0)
    model = ResMLP(4, 3, width=6, depth=5)
    model.blocks[2] = Counting(model.blocks[2])
    model.eval()  # every module: one in training mode takes the full path
    surrogate = nn.Linear(6, 6)

    class Sur(nn.Module):
        def forward(self, x: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
            return surrogate(x)

    patched = PatchedModel(model, Sur(), "blocks.0", "blocks.4")
    assert patched.path == "pending"
    x = torch.randn(8, 4)
    with torch.no_grad():
        first = patched(x)  # calibration: full path, then the fast one compared on this batch
    assert patched.path == "fast" and patched.skipped_modules == ["blocks.1", "blocks.2", "blocks.3"]
    before = model.blocks[2].calls
    with torch.no_grad():
        again = patched(x)
        full = PatchedModel(model, Sur(), "blocks.0", "blocks.4", fast=False)(x)
    assert model.blocks[2].calls == before + 1  # the fast call skipped it; only the full one ran it
    torch.testing.assert_close(again, first)
    torch.testing.assert_close(again, full)
    assert "path=fast" in repr(patched)
    assert all(not m._forward_hooks and "forward" not in m.__dict__ for m in model.modules())


def test_a_patch_whose_skipped_modules_feed_the_rest_falls_back_to_the_full_path():
    class Skip(nn.Module):  # blocks.1's output reaches the head around blocks.2: skipping it is wrong
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h0 = self.blocks[0](x)
            h1 = self.blocks[1](h0)
            return self.head(self.blocks[2](h1) + h1)

    class Sur(nn.Module):
        def forward(self, x: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
            return x * 2

    model = Skip().eval()
    patched = PatchedModel(model, Sur(), "blocks.0", "blocks.2")
    x = torch.randn(6, 4)
    with torch.no_grad():
        out = patched(x)
        assert patched.path == "full"
        torch.testing.assert_close(patched(x), out)
    h0 = model.blocks[0](x)
    torch.testing.assert_close(out, model.head(h0 * 2 + model.blocks[1](h0)), rtol=1e-5, atol=1e-6)


def resmlp_tail(seed: int) -> tuple[ResMLP, torch.Tensor, torch.Tensor, torch.Tensor, TailRunner | None]:
    """A 3-block ResMLP, a batch, its ``blocks.2`` activation and output, and the tail runner."""
    torch.manual_seed(seed)
    model = ResMLP(4, 3, width=6, depth=3).eval()
    x = torch.randn(10, 4)
    with torch.no_grad():
        real = model.blocks[2](model.blocks[1](model.blocks[0](model.input(x))))
        expected = model(x)
    return model, x, real, expected, tail_runner(model, "blocks.2", OutputSelector(None, "blocks.2"), x, real, expected)


def test_the_tail_runner_reproduces_the_output_from_the_last_layer_alone():
    model, x, real, expected, runner = resmlp_tail(1)
    assert isinstance(runner, TailRunner)
    with torch.no_grad():
        torch.testing.assert_close(runner(torch.zeros(10, 4), real), expected)  # the inputs do not matter here
        assert not torch.allclose(runner(x, real + 1.0), expected)
    assert call_model(model, x).shape == (10, 3)


def test_the_tail_runner_calls_no_forward_hook_of_a_skipped_module():
    """A skipped module's output is a placeholder: a user's forward hook on it must not see it
    as its output (the fit runs the tail on every step). Hooks on the supplied layer and after
    it see the tail's run; every hook is in place afterwards."""
    model, x, real, expected, runner = resmlp_tail(1)
    assert isinstance(runner, TailRunner)
    seen: dict[str, list[torch.Tensor]] = {"blocks.0": [], "blocks.2": [], "head": []}
    handles = [model.get_submodule(name).register_forward_hook(lambda m, a, out, name=name: seen[name].append(out))
               for name in seen]
    pre_calls = []
    handles.append(model.blocks[0].register_forward_pre_hook(lambda m, a: pre_calls.append(1)))
    with torch.no_grad():
        torch.testing.assert_close(runner(x, real), expected)
    assert seen["blocks.0"] == []  # skipped: its hook is not called with zeros
    torch.testing.assert_close(seen["blocks.2"][0], real)  # the supplied value
    torch.testing.assert_close(seen["head"][0], expected)
    assert pre_calls == [1]  # pre-hooks still run (weight_norm, pruning and the like compute weights there)
    assert all(len(model.get_submodule(name)._forward_hooks) == 1 for name in seen)
    with torch.no_grad():
        model(x)
    assert len(seen["blocks.0"]) == 1  # a real forward pass calls it again
    for handle in handles:
        handle.remove()


def test_the_fit_calls_a_users_hook_before_the_last_layer_only_on_real_activations():
    from koopman_hooks import KoopmanProbe

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = torch.randn(320, 6)
    batches = [(x[i : i + 32], model(x[i : i + 32]).argmax(1)) for i in range(0, 320, 32)]
    outputs: list[torch.Tensor] = []
    handle = model[0].register_forward_hook(lambda m, a, out: outputs.append(out.detach().clone()))
    try:
        probe = KoopmanProbe(model, ["1", "3"], latent_dim=8, hidden=(8,), verbose=False).fit(batches, epochs=2)
    finally:
        handle.remove()
    assert probe.fetch_model().info["output_loss"]  # the tail ran on every step
    assert len(outputs) < 2 * len(batches)  # the data pass and the first batch's checks, not every step
    real = torch.cat([b[0] for b in batches]) @ model[0].weight.T + model[0].bias
    for out in outputs:  # every call saw real rows of the data, never placeholder zeros
        assert out.abs().sum() > 0
        assert torch.isclose(out[:1], real, atol=1e-5).all(1).any()


class InPlace(nn.Module):
    """Writes into ``a``'s and ``b``'s outputs between modules: a broadcast zero cannot take that."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h.mul_(2.0)
        g = self.b(h)
        g.add_(1.0)
        return self.head(self.c(g))


def test_skipped_modules_return_one_broadcast_zero_unless_the_model_writes_into_it():
    resmlp, x, real, expected, runner = resmlp_tail(2)
    assert runner is not None and runner._shared_zeros  # nothing is allocated for the skipped modules
    seen: list[torch.Tensor] = []
    # blocks.0's placeholder output, as the next skipped module receives it (pre-hooks still run)
    handle = resmlp.blocks[1].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            runner(x, real)
    finally:
        handle.remove()
    assert seen[0].shape == (10, 6) and seen[0].stride() == (0, 0) and not seen[0].any()

    model = InPlace().eval()  # the write raises on a broadcast zero: allocated zeros instead, still exact
    with torch.no_grad():
        h = model.b(model.a(x) * 2.0) + 1.0
        real, expected = model.c(h), model(x)
    runner = tail_runner(model, "c", OutputSelector(None, "c"), x, real, expected)
    assert runner is not None and not runner._shared_zeros
    with torch.no_grad():
        torch.testing.assert_close(runner(x, real), expected)

    class Sur(nn.Module):
        def forward(self, x: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
            return x + 1.0

    patched = PatchedModel(model, Sur(), "a", "c")  # the same fallback on the fast patched path
    with torch.no_grad():
        patched(x)
    assert patched.path == "fast" and not patched._shared_zeros


class LateWrite(nn.Module):
    """Writes into ``b``'s output with ``masked_fill_`` (only a warning on a broadcast tensor) and,
    on batches larger than 8 rows only, with ``add_`` (an error on a broadcast tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, fill: bool = False) -> torch.Tensor:
        g = self.b(self.a(x))
        if fill:
            g.masked_fill_(g > 0, 0.5)
        if len(x) > 8:
            g.add_(1.0)
        return self.head(self.c(g))


class Doubled(nn.Module):
    def forward(self, x: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        return 2 * x


def test_a_write_into_a_broadcast_zero_never_goes_through_silently():
    torch.manual_seed(3)
    model = LateWrite().eval()
    small, large = torch.randn(6, 4), torch.randn(12, 4)
    patched = PatchedModel(model, Doubled(), "a", "c")
    full = PatchedModel(model, Doubled(), "a", "c", fast=False)
    with torch.no_grad():
        patched(small)  # calibrated on 6 rows: no write, so the broadcast zeros are used
        assert patched.path == "fast" and patched._shared_zeros
        # 12 rows: add_ into b's skipped output raises on the broadcast zero; retried with allocated zeros
        torch.testing.assert_close(patched(large), full(large))
        assert patched.path == "fast" and not patched._shared_zeros

        masked = PatchedModel(model, Doubled(), "a", "c")  # masked_fill_ only warns on a broadcast tensor:
        masked(small, fill=True)  # the calibration takes the warning as a failure
        assert masked.path == "fast" and not masked._shared_zeros
        torch.testing.assert_close(masked(small, fill=True), full(small, fill=True))
