"""Whether bfloat16 pays for a training step: a device that multiplies it natively, a step large enough.

The autoencoder's training steps are matrix products; where the hardware has bfloat16 units
(CUDA GPUs that support it, CPUs with AVX512-BF16 or AMX) autocasting them to bfloat16 makes
a large step several times faster, where it is emulated it makes it slower. CUDA reports its
support; a CPU's is measured once per process, as the speed of the products themselves (the
flags that would tell are not exposed by torch). A small step is bound by its fixed costs
(Python, autograd, the optimiser), which the casts only add to: on an AVX512-BF16 CPU, one
thread, an autoencoder step of 0.6M multiply-adds took 0.42 ms in float32 and 0.63 ms under
autocast, one of 3.4M 0.82 and 0.78 ms, of 11M 1.55 and 1.02 ms, of 40M 5.1 and 2.2 ms.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch

#: bfloat16 products must be at least this much faster than float32 ones to be used
MIN_SPEEDUP = 1.5
#: ... and a step must hold at least this many multiply-adds (rows x the autoencoder's per row)
MIN_STEP_MACS = 8_000_000
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


def bf16_pays(device: torch.device, step_macs: int) -> tuple[bool, str]:
    """``(whether autocasting a training step of step_macs multiply-adds to bfloat16 pays, why)``."""
    size = f"a step's {step_macs / 1e6:.1f}M multiply-adds"
    if step_macs < MIN_STEP_MACS:
        return False, f"{size} (< {MIN_STEP_MACS / 1e6:.0f}M: bound by its fixed costs)"
    fast, why = native_bf16(device)
    return fast, f"{size}; {why}"
