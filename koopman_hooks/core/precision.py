"""Whether a device multiplies bfloat16 matrices natively, i.e. faster than float32.

The autoencoder's training steps are matrix products; where the hardware has bfloat16 units
(CUDA GPUs that support it, CPUs with AVX512-BF16 or AMX) autocasting them to bfloat16 makes
a step several times faster, where it is emulated it makes it slower. CUDA reports its support;
a CPU's is measured once per process, as the speed of the products themselves (the flags that
would tell are not exposed by torch).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch

#: bfloat16 products must be at least this much faster than float32 ones to be used
MIN_SPEEDUP = 1.5
PROBE_SIZE = (256, 512)  # rows x features of the measured product, the size of an autoencoder step's


def _fastest(run: Callable[[], torch.Tensor], repeats: int = 5) -> float:
    run()  # the first call pays oneDNN's kernel selection
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def _cpu_speedup() -> float:
    generator = torch.Generator().manual_seed(0)
    rows, features = PROBE_SIZE
    a = torch.randn(rows, features, generator=generator)
    b = torch.randn(features, features, generator=generator)
    a16, b16 = a.bfloat16(), b.bfloat16()
    with torch.no_grad():
        return _fastest(lambda: a @ b) / _fastest(lambda: a16 @ b16)


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """``(whether bfloat16 products are natively fast on device, why)``."""
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
        return supported, f"CUDA {'supports' if supported else 'does not support'} bfloat16"
    if device.type != "cpu":
        return False, f"not measured on {device.type}"
    speedup = _cpu_speedup()
    verdict = ">=" if speedup >= MIN_SPEEDUP else "<"
    return speedup >= MIN_SPEEDUP, f"bfloat16 products measured {speedup:.1f} x float32's on this CPU ({verdict} {MIN_SPEEDUP})"
