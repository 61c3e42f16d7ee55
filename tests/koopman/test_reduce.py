"""Tests of koopman_hooks/koopman/reduce.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from koopman_hooks.koopman.adapters import LayerAdapter, adapter_from_moments
from koopman_hooks.koopman.reduce import default_reduce, expand_activation, parse_reduce, reduce_activation, reduced_dim
from koopman_hooks.maths.stats import StreamingMoments


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def fit(x: torch.Tensor, width: int, reduce: str = "flatten") -> LayerAdapter:
    flat = reduce_activation(x, reduce).double()
    m = StreamingMoments(flat.shape[1])
    for chunk in flat.split(17):
        m.update(chunk)
    return adapter_from_moments(tuple(x.shape[1:]), reduce, m, width)



@pytest.mark.parametrize(
    "shape, reduce, features",
    [
        ((3, 4, 4), "flatten", 48),
        ((5, 3), "flatten", 15),
        ((3, 6, 6), "pool:2x2", 12),
        ((3, 6, 6), "pool", 12),
        ((2, 6, 9), "pool:2x3", 12),
        ((5, 4), "cls", 4),
        ((5, 4), "last", 4),
        ((5, 4), "mean", 4),
    ],
)
def test_reduced_dim_matches_reduce(shape, reduce, features):
    x = torch.randn(7, *shape)
    flat = reduce_activation(x, reduce)
    assert flat.shape == (7, features)
    assert reduced_dim(shape, reduce) == features



@pytest.mark.parametrize("shape", [(2, 3, 4), (5, 3)])
def test_flatten_full_width_round_trip(shape):
    x = torch.randn(60, *shape, generator=gen(10)) * 2 + 1
    adapter = fit(x, width=reduced_dim(shape, "flatten"))
    back = adapter.inverse(adapter(x), like=x)
    assert back.shape == x.shape
    torch.testing.assert_close(back, x, rtol=0, atol=1e-4)
    torch.testing.assert_close(adapter.inverse(adapter(x)), x, rtol=0, atol=1e-4)



def test_pool_round_trip_and_lossy_inverse():
    x = torch.randn(40, 3, 6, 6, generator=gen(11))
    adapter = fit(x, width=12, reduce="pool:2x2")
    a = adapter(x)
    assert a.shape == (40, 12)
    back = adapter.inverse(a, like=x)
    assert back.shape == x.shape
    torch.testing.assert_close(back, x, rtol=0, atol=1e-4)  # pooled delta is zero
    # for another latent, the result pools to the decoded features and keeps the detail of x
    a2 = a + torch.randn(a.shape, generator=gen(12))
    back2 = adapter.inverse(a2, like=x)
    pooled = F.adaptive_avg_pool2d(back2, 2).reshape(40, 12)
    torch.testing.assert_close(pooled, adapter.decode_features(a2), rtol=0, atol=1e-4)
    detail = back2 - F.interpolate(F.adaptive_avg_pool2d(back2, 2), size=(6, 6), mode="nearest")
    detail_x = x - F.interpolate(F.adaptive_avg_pool2d(x, 2), size=(6, 6), mode="nearest")
    torch.testing.assert_close(detail, detail_x, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="lossy"):
        adapter.inverse(a)



def test_cls_and_mean_inverse():
    x = torch.randn(50, 5, 4, generator=gen(13))
    for reduce in ("cls", "mean"):
        adapter = fit(x, width=4, reduce=reduce)
        a = adapter(x)
        back = adapter.inverse(a, like=x)
        assert back.shape == x.shape
        torch.testing.assert_close(back, x, rtol=0, atol=1e-4)
        a2 = a + 1.0
        back2 = adapter.inverse(a2, like=x)
        decoded = adapter.decode_features(a2)
        if reduce == "cls":
            torch.testing.assert_close(back2[:, 0], decoded, rtol=0, atol=1e-5)
            torch.testing.assert_close(back2[:, 1:], x[:, 1:])
        else:
            torch.testing.assert_close(back2.mean(1), decoded, rtol=0, atol=1e-5)
            shift = back2 - x  # the same shift for every token
            torch.testing.assert_close(shift, shift[:, :1].expand_as(shift), rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match="lossy"):
            adapter.inverse(a2)



def test_expand_activation_flatten_without_like():
    flat = torch.randn(3, 12)
    torch.testing.assert_close(expand_activation(flat, "flatten", (3, 2, 2), None), flat.reshape(3, 3, 2, 2))



def test_default_reduce():
    assert default_reduce((10,)) == "flatten"
    assert default_reduce((3, 8, 8)) == "flatten"
    assert default_reduce((256, 4, 4)) == "flatten"  # exactly 4096
    assert default_reduce((64, 32, 32)) == "pool:8x8"
    assert default_reduce((512, 8, 8)) == "pool:2x2"
    assert default_reduce((16, 1, 300)) == "pool:1x16"
    assert default_reduce((197, 768)) == "mean"
    assert default_reduce((10, 10), max_features=50) == "mean"
    for shape in [(64, 32, 32), (512, 8, 8), (197, 768)]:
        spec = default_reduce(shape)
        assert reduced_dim(shape, spec) <= 4096
        assert reduce_activation(torch.zeros(1, *shape), spec).shape == (1, reduced_dim(shape, spec))



@pytest.mark.parametrize("spec", ["max", "", "flatten:2", "cls:1", "mean:4", "pool:ax2", "pool:2xb", "Flatten"])
def test_bad_reduce_specs(spec):
    with pytest.raises(ValueError):
        parse_reduce(spec)
    with pytest.raises(ValueError):
        reduce_activation(torch.zeros(2, 3, 4, 4), spec)



def test_reduce_shape_errors():
    assert parse_reduce("pool") == ("pool", (2, 2))
    assert parse_reduce("pool:3") == ("pool", (3, 3))
    assert parse_reduce("pool:2x5") == ("pool", (2, 5))
    with pytest.raises(ValueError, match="pool"):
        reduce_activation(torch.zeros(2, 5, 4), "pool:2x2")
    with pytest.raises(ValueError, match="cls"):
        reduce_activation(torch.zeros(2, 3, 4, 4), "cls")
    with pytest.raises(ValueError, match="mean"):
        reduce_activation(torch.zeros(2, 4), "mean")





import pytest

CONV = (3, 7, 7)


TOKENS = (5, 4)



@pytest.mark.parametrize(
    "shape, reduce",
    [(CONV, "flatten"), (CONV, "pool:2x2"), (CONV, "pool:3x5"), (CONV, "pool:7x7"), (CONV, "pool:1x1"),
     (TOKENS, "flatten"), (TOKENS, "cls"), (TOKENS, "last"), (TOKENS, "mean")],
)
def test_reduce_round_trips(shape, reduce):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, *shape, generator=g) * 2 + 0.5
    features = reduced_dim(shape, reduce)
    flat = reduce_activation(x, reduce).double()
    moments = StreamingMoments(features).update(flat)
    adapter = adapter_from_moments(shape, reduce, moments, features)  # full width: lossless PCA
    a = adapter(x)
    assert a.shape == (300, features)
    back = adapter.inverse(a, like=x)
    assert back.shape == x.shape
    torch.testing.assert_close(back, x, rtol=0, atol=1e-4)
    # another latent: the decoded map reduces exactly to the decoded features (right inverse)
    a2 = a + torch.randn(a.shape, generator=g)
    back2 = adapter.inverse(a2, like=x)
    torch.testing.assert_close(adapter.reduced(back2), adapter.decode_features(a2), rtol=0, atol=1e-4)
    if reduce == "flatten":
        torch.testing.assert_close(adapter.inverse(a2), back2)
    else:
        with pytest.raises(ValueError, match="lossy"):
            adapter.inverse(a2)
    saved = LayerAdapter(shape, reduce, adapter.mean, adapter.basis, adapter.scale)
    torch.testing.assert_close(saved.inverse(a2, like=x), back2)



def test_reductions_refuse_the_wrong_kind_of_activation():
    with pytest.raises(ValueError, match="pool"):
        reduce_activation(torch.zeros(2, *TOKENS), "pool:2x2")
    for mode in ("cls", "last", "mean"):
        with pytest.raises(ValueError, match=mode):
            reduce_activation(torch.zeros(2, *CONV), mode)


def padded(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens ``(6, 5, 3)`` of rows with 5, 3, 1, 4, 2, 5 real tokens, their mask and lengths."""
    lengths = torch.tensor([5, 3, 1, 4, 2, 5])
    mask = (torch.arange(5)[None] < lengths[:, None]).long()
    return torch.randn(6, 5, 3, generator=gen(seed)), mask, lengths


def test_last_and_mean_read_the_real_tokens_of_padded_rows():
    x, mask, lengths = padded()
    rows = torch.arange(6)
    torch.testing.assert_close(reduce_activation(x, "last", mask), x[rows, lengths - 1])
    torch.testing.assert_close(reduce_activation(x, "last"), x[:, -1])  # no mask: the last position
    means = torch.stack([x[i, : lengths[i]].mean(0) for i in range(6)])
    torch.testing.assert_close(reduce_activation(x, "mean", mask), means)
    torch.testing.assert_close(reduce_activation(x, "mean"), x.mean(1))
    torch.testing.assert_close(reduce_activation(x, "cls", mask), x[:, 0])  # the mask does not move token 0


@pytest.mark.parametrize("mode", ["last", "mean"])
def test_token_expansion_writes_where_the_reduction_read(mode):
    x, mask, lengths = padded(1)
    flat = torch.randn(6, 3, generator=gen(2))
    out = expand_activation(flat, mode, (5, 3), like=x, mask=mask)
    torch.testing.assert_close(reduce_activation(out, mode, mask), flat, rtol=0, atol=1e-5)  # a right inverse
    real = mask.bool()
    if mode == "last":
        touched = torch.zeros_like(real)
        touched[torch.arange(6), lengths - 1] = True
        torch.testing.assert_close(out[~touched], x[~touched])  # every other token is like's
    else:
        torch.testing.assert_close(out[~real], x[~real])  # padding is left alone
        shift = (out - x)[real]
        assert shift.abs().sum() > 0


def test_strict_decoding_puts_the_prediction_where_the_head_reads():
    x, mask, lengths = padded(3)
    template = torch.randn(5, 3, generator=gen(4))
    adapter = LayerAdapter((5, 3), "last", torch.zeros(3), torch.eye(3), 1.0, template)
    a = torch.randn(6, 3, generator=gen(5))
    out = adapter.inverse(a, mask=mask)  # strict: no real output at hand
    rows = torch.arange(6)
    torch.testing.assert_close(out[rows, lengths - 1], a)
    for i, n in enumerate(lengths.tolist()):
        keep = [j for j in range(5) if j != n - 1]
        torch.testing.assert_close(out[i, keep], template[keep])
    # with_template keeps what the reduction reads and puts the training mean everywhere else
    filled = adapter.with_template(x, mask)
    torch.testing.assert_close(filled[rows, lengths - 1], x[rows, lengths - 1])
    torch.testing.assert_close(filled[0, :4], template[:4])
    assert adapter.lossy and not fit(x, width=15).lossy


def test_a_mask_that_does_not_index_the_tokens_is_refused():
    x, mask, _ = padded()
    for mode in ("last", "mean"):
        with pytest.raises(ValueError, match="attention mask has shape"):
            reduce_activation(x, mode, mask[:, :4])
    assert parse_reduce("last") == ("last", None)
    with pytest.raises(ValueError, match="takes no size"):
        parse_reduce("last:2")


