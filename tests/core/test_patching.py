"""Tests of koopman_hooks/core/patching.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from koopman_hooks import LayerError, PatchedModel
from koopman_hooks.core.select import OutputSelector
from koopman_hooks.models import ResMLP


def resmlp(depth: int = 3, batch_norm: bool = False) -> ResMLP:
    torch.manual_seed(0)
    return ResMLP(4, 3, width=6, depth=depth, batch_norm=batch_norm)



def test_patching_callable_select_raises():
    m = resmlp()
    with pytest.raises(LayerError, match="callable"):
        PatchedModel(m, nn.Identity(), "input", "head", OutputSelector(None, "input"), OutputSelector(lambda o: o, "head"))




class Tokens(torch.nn.Module):
    """``forward(input_ids, attention_mask)``: a layer ``block`` of token states, a head on token 0."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 4)
        self.block = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(input_ids))[:, 0])


class MaskEcho(nn.Module):
    """A surrogate that records the mask it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.masks: list[torch.Tensor | None] = []

    def forward(self, x: torch.Tensor, like: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        self.masks.append(mask)
        return x


@pytest.mark.parametrize("fast", [True, False])
def test_the_attention_mask_of_the_call_reaches_the_surrogate(fast):
    model, echo = Tokens(), MaskEcho()
    ids, mask = torch.randint(0, 10, (3, 5)), torch.tensor([[1, 1, 1, 0, 0]] * 3)
    patched = PatchedModel(model, echo, "embed", "block", fast=fast)
    reference = model(ids, mask)
    torch.testing.assert_close(patched(input_ids=ids, attention_mask=mask), model.head(model.embed(ids)[:, 0]))
    patched(ids, mask)  # positionally: bound to the model's signature
    assert len(echo.masks) >= 2 and all(m is not None and torch.equal(m, mask) for m in echo.masks)
    assert torch.equal(model(ids, mask), reference)
    # a surrogate without a mask argument is called without one
    class NoMask(nn.Module):
        def forward(self, x: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
            return x

    plain = PatchedModel(model, NoMask(), "embed", "block", fast=fast)
    assert plain(input_ids=ids, attention_mask=mask).shape == (3, 2)


def test_first_forward_under_autograd_reaches_the_surrogate():
    """The first call calibrates without autograd; its result must still carry gradients when
    the caller asked for them (the unlearning refinement differentiates through it)."""
    from koopman_hooks.core.patching import PatchedModel

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    weight = nn.Parameter(torch.eye(4))

    class Surrogate(nn.Module):
        def forward(self, x: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
            return x @ weight

    for fast in (True, False):
        patched = PatchedModel(model, Surrogate(), "1", "3", fast=fast)
        out = patched(torch.randn(5, 3))
        (grad,) = torch.autograd.grad(out.sum(), [weight])
        assert grad.abs().sum() > 0
        assert patched.path == ("fast" if fast else "full")
        assert all(p.grad is None for p in model.parameters())


class TwoOutputs(nn.Module):
    """Returns ``(scores, hidden)``: ``hidden`` is the output of ``b``, a module between the
    patched layers ``a`` and ``c`` -- the fast path would skip it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c, self.head = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor, with_hidden: bool = True) -> object:
        b = torch.relu(self.b(torch.relu(self.a(x))))
        scores = self.head(torch.relu(self.c(b)))
        return (scores, b) if with_hidden else scores


class Shift(nn.Module):
    """A stand-in surrogate: the source plus one."""

    def forward(self, x: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        return x + 1.0


def test_fast_path_is_used_only_where_every_output_agrees():
    model = TwoOutputs().eval()
    x = torch.randn(6, 4)
    full = PatchedModel(model, Shift(), "a", "c", fast=False)
    returning_b = PatchedModel(model, Shift(), "a", "c")
    out = returning_b(x)
    assert returning_b.path == "full" and returning_b.skipped_modules == []  # b is returned: not skipped
    for got, want in zip(out, full(x)):
        torch.testing.assert_close(got, want)
    # without b among the outputs the fast path skips it; a call of another kind (a keyword
    # asking for b) is checked again and answered by the full path, whose b is real
    scores_only = PatchedModel(model, Shift(), "a", "c")
    torch.testing.assert_close(scores_only(x, with_hidden=False), full(x, with_hidden=False))
    assert scores_only.path == "fast" and scores_only.skipped_modules == ["b"]
    again = scores_only(x, with_hidden=True)
    assert not bool((again[1] == 0).all())
    torch.testing.assert_close(again[1], full(x, with_hidden=True)[1])
    torch.testing.assert_close(scores_only(x, with_hidden=False), full(x, with_hidden=False))


def test_fast_path_gives_way_to_hooks_on_skipped_modules_and_to_training_mode():
    model = TwoOutputs().eval()
    x = torch.randn(6, 4)
    patched = PatchedModel(model, Shift(), "a", "c")
    patched(x, with_hidden=False)
    assert patched.path == "fast"
    seen: list[torch.Tensor] = []
    handle = model.b.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    try:
        patched(x, with_hidden=False)
    finally:
        handle.remove()
    torch.testing.assert_close(seen[0], torch.relu(model.a(x)) @ model.b.weight.T + model.b.bias)  # really ran
    # a hook there before the first call: no calibration while it sits there (it would see zeros)
    early = PatchedModel(model, Shift(), "a", "c")
    seen.clear()
    handle = model.b.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    try:
        early(x, with_hidden=False)
        early(x, with_hidden=False)
    finally:
        handle.remove()
    assert early.path == "pending" and seen and not any(bool((o == 0).all()) for o in seen)
    early(x, with_hidden=False)
    assert early.path == "fast"

    class Norm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.a, self.bn, self.c, self.head = nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 5), nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.c(self.bn(self.a(x))))

    net = Norm().train()
    patched_net = PatchedModel(net, Shift(), "a", "c")
    patched_net(x)
    assert int(net.bn.num_batches_tracked) == 1  # one pass, as model(x) makes: no calibration passes
    assert patched_net.path == "pending"  # checked on the first call in eval mode
    net.eval()
    patched_net(x)
    assert patched_net.path == "fast" and int(net.bn.num_batches_tracked) == 1


def test_the_source_is_read_as_the_layer_returned_it():
    """An in-place op after the source layer (ReLU(inplace=True)) must not change what the
    surrogate reads."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 5), nn.Linear(5, 3)).eval()
    x = torch.randn(6, 4)
    for fast in (True, False):
        patched = PatchedModel(model, Shift(), "0", "2", fast=fast)
        patched(x)
        torch.testing.assert_close(patched(x), model[3](model[0](x) + 1.0))


class Gated(nn.Module):
    """``src -> mid -> dst -> head``, plus a side branch out of ``mid`` that a flag or a gate opens."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.src, self.mid, self.dst, self.head = nn.Linear(4, 6), nn.Linear(6, 6), nn.Sequential(nn.Linear(6, 6)), \
            nn.Linear(6, 3)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, aux: bool = False, p: float = 0.0) -> torch.Tensor:
        m = torch.relu(self.mid(self.src(x)))
        m = nn.functional.dropout(m, p, self.training)  # functional: no Dropout module to find
        out = self.head(self.dst(m)) + self.gate * m[:, :3]
        return out + m[:, :3] if aux else out


def paths(model: nn.Module) -> tuple[PatchedModel, PatchedModel]:
    return PatchedModel(model, Shift(), "src", "dst"), PatchedModel(model, Shift(), "src", "dst", fast=False)


def calibrated() -> tuple[Gated, torch.Tensor, PatchedModel, PatchedModel]:
    """A gated model in eval mode, a batch, its patch calibrated on it (fast path) and the full path."""
    model, x = Gated().eval(), torch.randn(8, 4)
    fast, full = paths(model)
    fast(x)
    assert fast.path == "fast" and fast.skipped_modules == ["mid"]
    return model, x, fast, full


def test_a_flags_value_or_a_weight_update_is_checked_again_before_the_fast_path_serves_it():
    model, x, fast, full = calibrated()
    torch.testing.assert_close(fast(x, aux=True), full(x, aux=True))  # mid reaches the output: checked, full path
    torch.testing.assert_close(fast(x, aux=True), full(x, aux=True))
    torch.testing.assert_close(fast(x), full(x))  # the checked kind keeps the fast path
    with torch.no_grad():
        model.gate.fill_(1.0)  # now mid reaches the output through the gate
    torch.testing.assert_close(fast(x), full(x))
    torch.testing.assert_close(fast(x), full(x))


def test_training_mode_takes_the_full_path_also_for_functional_dropout():
    model, x, fast, full = calibrated()
    model.train()
    assert "full while a module trains" in repr(fast)
    torch.manual_seed(3)
    got, state = fast(x, p=0.5), torch.get_rng_state()
    torch.manual_seed(3)
    torch.testing.assert_close(got, full(x, p=0.5))
    assert torch.equal(state, torch.get_rng_state())


def test_hooks_on_dst_or_inside_it_take_the_full_path():
    model, x, fast, full = calibrated()
    inputs: list[torch.Tensor] = []
    inner_calls: list[int] = []
    handles = [model.dst.register_forward_hook(lambda m, i, o: inputs.append(i[0])),
               model.dst[0].register_forward_hook(lambda m, i, o: inner_calls.append(1))]
    try:
        torch.testing.assert_close(fast(x), full(x))
    finally:
        for handle in handles:
            handle.remove()
    assert len(inner_calls) == 2 and not any(bool((i == 0).all()) for i in inputs)


def test_a_calibrated_fast_path_follows_the_models_dtype():
    model, x, fast, full = calibrated()
    model.double()
    got = fast(x.double())
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, full(x.double()))
    fast(x.double())
    assert fast.path == "fast"


def test_the_first_call_runs_the_model_twice_and_later_calls_once():
    model, x = Gated().eval(), torch.randn(8, 4)
    fast, _ = paths(model)
    calls: list[int] = []
    handle = model.head.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        counts = []
        for _ in range(3):
            calls.clear()
            fast(x)
            counts.append(len(calls))
    finally:
        handle.remove()
    assert counts == [2, 1, 1]  # the full path (traced), then the fast one checked against it


def test_a_destination_that_runs_twice_is_named():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.src, self.act, self.head = nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.act(self.act(self.src(x))))

    for fast in (True, False):
        with pytest.raises(LayerError, match="'act' ran more than once"):
            PatchedModel(Twice().eval(), Shift(), "src", "act", fast=fast)(torch.randn(3, 4))


def test_a_first_call_that_raises_leaves_the_fast_path_to_a_later_good_call():
    model, x = Gated().eval(), torch.randn(8, 4)
    fast, full = paths(model)
    with pytest.raises(RuntimeError):
        fast(torch.randn(8, 5))  # the model's own error
    assert fast.path == "pending"
    torch.testing.assert_close(fast(x), full(x))
    assert fast.path == "fast"


class Churning(nn.Module):
    """Rebuilds a buffer on every call (a rotary cache, a call counter) and takes a float."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.src, self.mid, self.dst, self.head = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.register_buffer("cache", torch.zeros(6))
        self.calls = 0

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        self.calls += 1
        self.cache = torch.full((6,), float(self.calls))  # a new buffer every call
        return self.head(self.dst(torch.relu(self.mid(self.src(x))))) * scale


def test_rebuilt_buffers_and_changing_numbers_keep_one_pass_per_call_also_in_inference_mode():
    model, x = Churning().eval(), torch.randn(5, 4)
    fast = PatchedModel(model, Shift(), "src", "dst")
    fast(x, scale=0.5)
    assert fast.path == "fast"
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            before = model.calls
            for i in range(10):
                fast(x, scale=1.0 + i / 10)
            assert model.calls - before == 10  # after the one check of this kind of call: one pass each
    assert len(fast._checked_calls) == 1


def test_reset_rechecks_after_a_write_the_wrapper_cannot_see():
    model, x, fast, full = calibrated()
    model.gate.data.fill_(1.0)  # through .data: no version counter, same storage
    fast.reset()
    torch.testing.assert_close(fast(x), full(x))
    torch.testing.assert_close(fast(x), full(x))
    model.gate = nn.Parameter(torch.zeros(()))  # a replaced parameter is seen
    torch.testing.assert_close(fast(x), full(x))


class Cached(nn.Module):
    """Returns ``(scores, cache)`` with ``use_cache`` (a cache object compared by identity, holding
    the skipped layer's output, as a decoder's KV cache does), else the scores alone."""

    class Cache:
        def __init__(self, held: torch.Tensor) -> None:
            self.held = held

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.src, self.mid, self.dst, self.head = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, use_cache: bool = True) -> object:
        m = self.mid(self.src(x))
        scores = self.head(self.dst(m))
        return (scores, Cached.Cache(m)) if use_cache else scores


def test_a_kind_of_call_that_disagrees_leaves_the_other_kinds_to_their_own_check():
    model, x = Cached().eval(), torch.randn(5, 4)
    fast, full = PatchedModel(model, Shift(), "src", "dst"), PatchedModel(model, Shift(), "src", "dst", fast=False)
    fast(x)  # returns a cache: the fast path's would lack mid's output
    assert fast.path == "full" and "disagreed" in repr(fast)
    torch.testing.assert_close(fast(x, use_cache=False), full(x, use_cache=False))
    assert fast.path == "fast" and fast.skipped_modules == ["mid"]
    out = fast(x)
    assert torch.equal(out[1].held, model.mid(model.src(x)))  # that kind still runs the full path
