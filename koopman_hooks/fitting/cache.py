"""A bounded store of per-sample arrays for the epochs of a fit: RAM first, then a memory map.

Rows are appended batch by batch under named fields (adapted states, model scores, labels,
inputs). Up to ``budget_mb`` they stay in RAM; past it, every field moves to a file in a
temporary folder that is deleted when the cache closes, also after an exception (use it as a
context manager). Reading random rows is a gather from RAM or from the memory map.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import numpy as np
import torch

_NUMPY = {torch.float32: np.float32, torch.float64: np.float64, torch.int64: np.int64, torch.int32: np.int32,
          torch.bool: np.bool_, torch.float16: np.float16, torch.uint8: np.uint8, torch.int16: np.int16}


class StateCache:
    """Per-sample fields appended in batches; RAM up to ``budget_mb``, then files under ``folder``."""

    def __init__(self, budget_mb: float = 1024.0, folder: str | os.PathLike[str] | None = None) -> None:
        self.budget = int(budget_mb * 2**20)
        self.parent = folder
        self.n = 0
        self.nbytes = 0
        self.folder: str | None = None
        self._ram: dict[str, list[torch.Tensor]] = {}
        self._files: dict[str, Any] = {}
        self._specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._maps: dict[str, np.memmap] = {}
        self._frozen: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ writing

    def append(self, fields: Mapping[str, torch.Tensor]) -> StateCache:
        """Add one batch: every field has the same number of rows, and the same fields each time."""
        if self._frozen or self._maps:
            raise RuntimeError("the cache is finalised; no rows can be added")
        rows = {len(v) for v in fields.values()}
        if len(rows) != 1:
            raise ValueError(f"fields of one batch have different numbers of rows: {sorted(rows)}")
        if self._specs and set(fields) != set(self._specs):
            raise ValueError(f"expected fields {sorted(self._specs)}, got {sorted(fields)}")
        for name, value in fields.items():
            value = value.detach().cpu().contiguous()
            spec = (tuple(value.shape[1:]), value.dtype)
            if self._specs.setdefault(name, spec) != spec:
                raise ValueError(f"field {name!r} changed shape or type: {self._specs[name]} then {spec}")
            self.nbytes += value.numel() * value.element_size()
            if self.folder is None:
                self._ram.setdefault(name, []).append(value)
            else:
                self._files[name].write(value.numpy().tobytes())
        self.n += rows.pop()
        if self.folder is None and self.nbytes > self.budget:
            self._spill()
        return self

    def _spill(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="koopman_hooks_cache_", dir=self.parent)
        for name, chunks in self._ram.items():
            handle = open(os.path.join(self.folder, f"{name}.bin"), "wb")  # noqa: SIM115 - closed in finalize/close
            for chunk in chunks:
                handle.write(chunk.numpy().tobytes())
            self._files[name] = handle
        self._ram.clear()

    def finalize(self) -> StateCache:
        """Stop appending; fields become readable."""
        if self.folder is None:
            self._frozen = {name: torch.cat(chunks) for name, chunks in self._ram.items()}
            self._ram.clear()
            return self
        for name, handle in self._files.items():
            handle.close()
            shape, dtype = self._specs[name]
            self._maps[name] = np.memmap(os.path.join(self.folder, f"{name}.bin"), dtype=_NUMPY[dtype], mode="r",
                                         shape=(self.n, *shape))
        self._files.clear()
        return self

    # ------------------------------------------------------------------ reading

    @property
    def on_disk(self) -> bool:
        return self.folder is not None

    @property
    def fields(self) -> list[str]:
        return list(self._specs)

    def rows(self, name: str, index: torch.Tensor | slice | Sequence[int]) -> torch.Tensor:
        """Rows of a field (a copy when read from the memory map)."""
        if name in self._frozen:
            return self._frozen[name][index]
        if name not in self._maps:
            raise KeyError(f"no field {name!r}; fields: {self.fields}")
        rows = index.cpu().numpy() if isinstance(index, torch.Tensor) else index
        return torch.from_numpy(np.ascontiguousarray(self._maps[name][rows]))

    def batches(self, indices: torch.Tensor, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Every field at ``indices``, ``batch_size`` rows at a time."""
        for start in range(0, len(indices), batch_size):
            rows = indices[start : start + batch_size]
            if self.on_disk:
                rows = rows.sort().values  # sequential reads from the memory map
            yield {name: self.rows(name, rows) for name in self.fields}

    # ------------------------------------------------------------------ cleaning up

    def close(self) -> None:
        """Release everything; the temporary folder (if any) is deleted."""
        for handle in self._files.values():
            handle.close()
        self._files.clear()
        self._maps.clear()
        self._frozen.clear()
        self._ram.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def __enter__(self) -> StateCache:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
