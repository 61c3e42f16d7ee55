"""Tests of koopman_hooks/koopman/surrogate.py."""

from __future__ import annotations

import pytest
import torch

from koopman_hooks.koopman.adapters import adapter_from_moments
from koopman_hooks.koopman.autoencoder import SkipMLP
from koopman_hooks.koopman.surrogate import KoopmanSurrogate
from koopman_hooks.maths.linalg import homogeneous
from koopman_hooks.maths.stats import StreamingMoments


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_surrogate(latent: int = 3, width: int = 4, steps: int = 3, bias: bool = True, seed: int = 0) -> KoopmanSurrogate:
    torch.manual_seed(seed)
    g = gen(seed)
    xs = torch.randn(64, 6, generator=g, dtype=torch.float64)
    xd = torch.randn(64, 5, generator=g, dtype=torch.float64) * 2 + 1
    ain = adapter_from_moments((6,), "flatten", StreamingMoments(6).update(xs), width)
    aout = adapter_from_moments((5,), "flatten", StreamingMoments(5).update(xd), width)
    k = torch.eye(latent) + 0.3 * torch.randn(latent, latent, generator=g)
    b = 0.5 * torch.randn(latent, generator=g) if bias else None
    return KoopmanSurrogate(ain, aout, SkipMLP([width, 8, latent]), SkipMLP([latent, 8, width]), homogeneous(k, b),
                            steps, "src.layer", "dst.layer", info={"kind": "test"})



@pytest.mark.parametrize("bias", [False, True])
def test_advance_is_affine_power(bias):
    sur = make_surrogate(bias=bias)
    k, b = sur.operator[:3, :3], sur.operator[:3, 3]
    z = torch.randn(5, 3, generator=gen(4))
    for s in range(0, 5):
        expected = z.clone()
        for _ in range(s):
            expected = expected @ k.T + b
        affine = sum((torch.linalg.matrix_power(k, i) @ b for i in range(s)), torch.zeros(3))
        torch.testing.assert_close(z @ torch.linalg.matrix_power(k, s).T + affine, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(sur.advance(z, s), expected, rtol=0, atol=1e-5)
    # the default is all steps
    torch.testing.assert_close(sur.advance(z), sur.advance(z, 3))
    traj = sur.latent_trajectory(torch.randn(2, 6))
    assert len(traj) == 4
    torch.testing.assert_close(traj[-1], sur.advance(traj[0]), rtol=0, atol=1e-5)



def test_forward_composition():
    sur = make_surrogate()
    x = torch.randn(7, 6, generator=gen(5))
    with torch.no_grad():
        expected = sur.out_adapter.inverse(sur.decoder(sur.read_out(sur.advance(sur.encoder(sur.in_adapter(x))))))
        out = sur(x)
    assert out.shape == (7, 5)
    torch.testing.assert_close(out, expected)
    assert not any(p.requires_grad for p in sur.parameters())
    assert not sur.training



def test_edited_returns_new_and_leaves_original():
    sur = make_surrogate()
    op0, ro0 = sur.operator.clone(), sur.readout.clone()
    x = torch.randn(4, 6, generator=gen(6))
    out0 = sur(x)
    new_op = homogeneous(torch.zeros(3, 3), torch.ones(3))
    readout = homogeneous(2 * torch.eye(3))
    edited = sur.edited(operator=new_op, readout=readout, note="edit")
    assert edited is not sur
    assert torch.equal(sur.operator, op0) and torch.equal(sur.readout, ro0)
    assert torch.equal(edited.operator, new_op) and torch.equal(edited.readout, readout)
    assert edited.info == {"kind": "test", "note": "edit"} and sur.info == {"kind": "test"}
    torch.testing.assert_close(sur(x), out0)
    # the edit acts: every input maps to the same latent 2 * 1 after the constant operator
    z = edited.final_latent(x)
    torch.testing.assert_close(z, torch.full((4, 3), 2.0))
    # deep copy: changing the edited one's modules does not reach the original
    with torch.no_grad():
        edited.encoder.linear.weight.add_(1.0)
        edited.operator.add_(1.0)
    torch.testing.assert_close(sur(x), out0)
    assert torch.equal(sur.operator, op0)
    only_readout = sur.edited(readout=readout)
    assert torch.equal(only_readout.operator, op0)



def test_save_load_round_trip(tmp_path):
    sur = make_surrogate().edited(readout=homogeneous(0.5 * torch.eye(3), torch.ones(3)), note="x")
    path = tmp_path / "sur.safetensors"
    sur.save(path)
    loaded = KoopmanSurrogate.load(path)
    x = torch.randn(9, 6, generator=gen(7))
    assert torch.equal(loaded(x), sur(x))
    assert torch.equal(loaded.operator, sur.operator) and torch.equal(loaded.readout, sur.readout)
    assert (loaded.src_layer, loaded.dst_layer, loaded.steps) == ("src.layer", "dst.layer", 3)
    assert loaded.info == sur.info
    for a, b in ((loaded.in_adapter, sur.in_adapter), (loaded.out_adapter, sur.out_adapter)):
        assert a.shape == b.shape and a.reduce == b.reduce
        assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())



def test_save_load_identity_encoder(tmp_path):
    base = make_surrogate(latent=4, width=4)
    lin = KoopmanSurrogate(base.in_adapter, base.out_adapter, torch.nn.Identity(), torch.nn.Identity(),
                           homogeneous(torch.randn(4, 4, generator=gen(8)), torch.randn(4, generator=gen(9))),
                           1, "a", "b")
    path = tmp_path / "lin.safetensors"
    lin.save(path)
    loaded = KoopmanSurrogate.load(path)
    x = torch.randn(5, 6, generator=gen(10))
    assert torch.equal(loaded(x), lin(x))
    with pytest.raises(ValueError, match="surrogate"):
        from koopman_hooks.core.serialization import load_tensors

        load_tensors(path, "probe")


