"""Tests of koopman_hooks/core/precision.py."""

from __future__ import annotations

import torch

from koopman_hooks.core import precision


def test_cpu_answer_is_measured_once_and_explained():
    precision._cpu_speedup.cache_clear()
    fast, why = precision.native_bf16(torch.device("cpu"))
    speedup = precision._cpu_speedup()
    assert precision._cpu_speedup.cache_info().misses == 1  # one measurement per process
    assert speedup > 0
    assert fast == (speedup >= precision.MIN_SPEEDUP)
    assert f"{speedup:.1f} x" in why


def test_devices_without_a_measurement_say_no():
    fast, why = precision.native_bf16(torch.device("meta"))
    assert not fast and "meta" in why


def test_small_steps_never_pay_large_ones_follow_the_device():
    small, why = precision.bf16_pays(torch.device("cpu"), precision.MIN_STEP_MACS - 1)
    assert not small and "fixed costs" in why
    large, why = precision.bf16_pays(torch.device("cpu"), 10 * precision.MIN_STEP_MACS)
    assert large == precision.native_bf16(torch.device("cpu"))[0] and "80.0M" in why


def test_the_measured_speedup_decides(monkeypatch):
    big = 10 * precision.MIN_STEP_MACS
    for speedup, expected in ((1.0, False), (precision.MIN_SPEEDUP - 0.01, False), (3.0, True)):
        monkeypatch.setattr(precision, "_cpu_speedup", lambda s=speedup: s)
        assert precision.native_bf16(torch.device("cpu"))[0] is expected
        assert precision.bf16_pays(torch.device("cpu"), big)[0] is expected
        assert precision.bf16_pays(torch.device("cpu"), precision.MIN_STEP_MACS - 1)[0] is False


def test_autocast_regions():
    cpu = torch.device("cpu")
    a = torch.randn(8, 8)
    with precision.autocast_to(cpu, torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
        with precision.float32_region(cpu):
            assert (a @ a).dtype == torch.float32
    with precision.autocast_to(torch.device("meta"), None):  # nothing entered, whatever the device
        assert (a @ a).dtype == torch.float32
        with precision.float32_region(torch.device("meta")):
            assert (a @ a).dtype == torch.float32


def test_operator_powers_in_a_bf16_step_stay_close_to_float32():
    """K's powers take the step's precision; over a few steps bfloat16 stays within 2% of float32."""
    from koopman_hooks.koopman.operator import KoopmanOperator, advance

    torch.manual_seed(0)
    for parametrization in ("dense", "exp", "lowrank"):
        op = KoopmanOperator(16, parametrization, total_steps=4)
        with torch.no_grad():
            for p in op.parameters():
                p.add_(0.05 * torch.randn_like(p))
        with torch.no_grad():
            exact = op.power(3)
            with precision.autocast_to(torch.device("cpu"), torch.bfloat16):
                inside = op.power(3)
        assert float((inside.float() - exact).norm() / exact.norm()) < 2e-2, parametrization
    k, z = 0.3 * torch.randn(16, 16), torch.randn(32, 16)
    with precision.autocast_to(torch.device("cpu"), torch.bfloat16):
        out = advance(k, z, 3)
    reference = z @ torch.linalg.matrix_power(k, 3).T
    assert float((out.float() - reference).norm() / reference.norm()) < 2e-2
