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

import contextlib
import functools
import time
from collections.abc import Callable
from typing import Any

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


def _cuda_native(device: torch.device) -> bool:
    if torch.version.hip:  # ROCm: torch's own answer, without emulation where it can say so
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:
            return bool(torch.cuda.is_bf16_supported())
    return torch.cuda.get_device_properties(device).major >= 8  # bfloat16 tensor cores from Ampere on


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """``(whether bfloat16 products are natively fast on device, why)``."""
    if device.type == "cuda":
        native = _cuda_native(device)
        return native, f"{torch.cuda.get_device_name(device)} {'has' if native else 'has no'} native bfloat16"
    if device.type != "cpu":
        return False, f"not measured on {device.type}"
    speedup = _cpu_speedup()
    verdict = ">=" if speedup >= MIN_SPEEDUP else "<"
    return speedup >= MIN_SPEEDUP, f"bfloat16 products measured {speedup:.1f} x float32's on this CPU ({verdict} {MIN_SPEEDUP})"


def bf16_pays(device: torch.device, step_macs: int) -> tuple[bool, str]:
    """``(whether autocasting a training step to bfloat16 pays, why)``; ``step_macs``: the step's
    size as the batch's forward multiply-adds through φ, K and ψ (the rows times the surrogate's
    per row; the step itself encodes and decodes several layers and runs backward: a few times more)."""
    size = f"a step's {step_macs / 1e6:.1f}M forward multiply-adds"
    if step_macs < MIN_STEP_MACS:
        return False, f"{size} (< {MIN_STEP_MACS / 1e6:.0f}M: bound by its fixed costs)"
    fast, why = native_bf16(device)
    return fast, f"{size}; {why}"


def autocast_to(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """Autocast to ``dtype`` on ``device``; ``None``: nothing at all (not even a disabled autocast,
    which some torch versions refuse for some devices)."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def _autocast_on(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))  # torch >= 2.4
    except TypeError:
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    except RuntimeError:  # a device type autocast does not know: never on
        return False


def float32_region(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Autocast switched off on ``device`` where it is on (e.g. for a solve or a matrix power
    inside a bfloat16 step), else nothing."""
    return torch.autocast(device.type, enabled=False) if _autocast_on(device.type) else contextlib.nullcontext()
