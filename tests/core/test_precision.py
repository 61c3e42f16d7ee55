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
