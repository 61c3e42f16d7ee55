"""A bounded store of per-sample arrays for the epochs of a fit: RAM first, then a memory map.

Rows are appended batch by batch under named fields (adapted states, model scores, labels,
inputs). Up to ``budget_mb`` they stay in RAM; past it they move to one file of fixed-size
records (every field of a row side by side) in a temporary folder that is deleted when the
cache closes, also after an exception (use it as a context manager). Reading random rows is a
gather from RAM or from a memory map of the file, one region of ``REGION_BYTES`` at a time: the
region's pages are released from the process (``MADV_DONTNEED``; they stay in the page cache)
before the next region is read. The kernel maps pages around every touched row, so a random
batch read in one go would count most of the file in the process's resident memory; read by
regions, a cache on disk adds about one region and the batch.
"""

from __future__ import annotations

import math
import mmap
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import numpy as np
import torch

REGION_BYTES = 2 * 2**20  # a gather from the file reads, then releases, this much of the map at a time


class StateCache:
    """Per-sample fields appended in batches; RAM up to ``budget_mb``, then a file under ``folder``."""

    def __init__(self, budget_mb: float = 16.0, folder: str | os.PathLike[str] | None = None) -> None:
        self.budget = int(budget_mb * 2**20)
        self.parent = folder
        self._owner = os.getpid()  # a forked child that closes its copy leaves the folder alone
        self.n = 0
        self.nbytes = 0
        self.folder: str | None = None
        self._ram: dict[str, list[torch.Tensor]] = {}
        self._file: Any = None  # the records' file while appending on disk
        self._specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._map: mmap.mmap | None = None
        self._records: np.ndarray | None = None  # (n, bytes per row) uint8 view of the map
        self._frozen: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ writing

    def append(self, fields: Mapping[str, torch.Tensor]) -> StateCache:
        """Add one batch: every field has the same number of rows, and the same fields each time."""
        if self._frozen or self._records is not None:
            raise RuntimeError("the cache is finalised; no rows can be added")
        rows = {len(v) for v in fields.values()}
        if len(rows) != 1:
            raise ValueError(f"fields of one batch have different numbers of rows: {sorted(rows)}")
        if self._specs and set(fields) != set(self._specs):
            raise ValueError(f"expected fields {sorted(self._specs)}, got {sorted(fields)}")
        batch = {}
        for name, value in fields.items():
            value = value.detach().cpu().contiguous()
            spec = (tuple(value.shape[1:]), value.dtype)
            if self._specs.setdefault(name, spec) != spec:
                raise ValueError(f"field {name!r} changed shape or type: {self._specs[name]} then {spec}")
            self.nbytes += value.numel() * value.element_size()
            batch[name] = value
        if self.folder is None:
            for name, value in batch.items():
                self._ram.setdefault(name, []).append(value)
        else:
            self._write(batch)
        self.n += rows.pop()
        if self.folder is None and self.nbytes > self.budget:
            self._spill()
        return self

    def _write(self, batch: Mapping[str, torch.Tensor], file: Any = None) -> None:
        """Rows as records: each row's fields' bytes side by side, in ``_specs`` order."""
        n = len(next(iter(batch.values())))
        parts = [_as_bytes(batch[name], n, _row_bytes(self._specs[name])) for name in self._specs]
        (file or self._file).write(torch.cat(parts, dim=1).numpy().tobytes())

    def _spill(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="koopman_hooks_cache_", dir=self.parent)
        self._file = open(os.path.join(self.folder, "rows.bin"), "wb")  # noqa: SIM115 - closed in finalize/close
        chunks = {name: self._ram.pop(name) for name in list(self._ram)}
        for i in range(len(next(iter(chunks.values())))):
            self._write({name: parts[i] for name, parts in chunks.items()})

    def finalize(self) -> StateCache:
        """Stop appending; fields become readable."""
        if self.folder is None:
            for name in list(self._ram):  # one field at a time: its chunks go as its copy is made
                self._frozen[name] = torch.cat(self._ram.pop(name))
            return self
        if self._records is not None:  # finalised already
            return self
        if self._file is not None:  # (None when a transform rewrote the file)
            self._file.close()
            self._file = None
        width = sum(_row_bytes(spec) for spec in self._specs.values())
        path = os.path.join(self.folder, "rows.bin")
        if not os.path.getsize(path):  # rows without bytes: nothing to map
            self._records = np.empty((self.n, 0), dtype=np.uint8)
            return self
        with open(path, "rb") as file:
            self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        self._records = np.frombuffer(self._map, dtype=np.uint8).reshape(self.n, width)
        return self

    def transform(self, names: Sequence[str], fn: Callable[[dict[str, torch.Tensor]], Mapping[str, torch.Tensor]],
                  chunk_rows: int = 4096) -> StateCache:
        """Replace the fields ``names`` of every row by ``fn(rows)`` (same shapes and dtypes), a
        chunk of rows at a time, in RAM or by rewriting the file; the cache must be finalised."""
        if not self._frozen and self._records is None and self.n:
            raise RuntimeError("finalize() the cache before transforming it")
        missing = [name for name in names if name not in self._specs]
        if missing:
            raise KeyError(f"no fields {missing}; fields: {self.fields}")

        def changed(rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            new = fn({name: rows[name] for name in names})
            out = {name: new[name] for name in names}
            for name, value in out.items():
                want = self._specs[name]
                if (tuple(value.shape[1:]), value.dtype, len(value)) != (*want, len(rows[name])):
                    raise ValueError(f"transform changed field {name!r}: {(tuple(value.shape[1:]), value.dtype)} "
                                     f"instead of {want}, or its number of rows")
            return out

        chunks = [slice(start, min(start + chunk_rows, self.n)) for start in range(0, self.n, chunk_rows)]
        if self._records is None:  # every chunk first, then stored: an exception leaves the cache as it was
            done = [(chunk, changed({name: self._frozen[name][chunk] for name in names})) for chunk in chunks]
            for chunk, values in done:
                for name, value in values.items():
                    self._frozen[name][chunk] = value
            return self
        assert self.folder is not None
        path, fresh = os.path.join(self.folder, "rows.bin"), os.path.join(self.folder, "rows.new")
        try:
            with open(fresh, "wb") as file:
                for chunk in chunks:
                    rows = self.gather(chunk)
                    rows.update(changed(rows))
                    self._write(rows, file)
        except BaseException:
            os.remove(fresh)  # the records stay as they were
            raise
        self._records = None  # the view first: a map with exported buffers cannot close
        if self._map is not None:
            self._map.close()
            self._map = None
        os.replace(fresh, path)
        return self.finalize()

    # ------------------------------------------------------------------ reading

    @property
    def on_disk(self) -> bool:
        return self.folder is not None

    @property
    def fields(self) -> list[str]:
        return list(self._specs)

    def gather(self, index: torch.Tensor | slice | Sequence[int],
               names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """The rows at ``index`` of every field (or of ``names``); read from the file when on disk."""
        wanted = self.fields if names is None else list(names)
        if self._records is None:
            return {name: self._frozen[name][index] for name in wanted}
        records = self._read(self._positions(index))
        out, offset = {}, 0
        for name, (shape, dtype) in self._specs.items():
            size = _row_bytes((shape, dtype))
            if name in wanted:
                # the field's columns copied into fresh, aligned memory (also for one row, whose slice
                # would otherwise stay a strided view into the records), read back as its dtype
                field = torch.from_numpy(np.array(records[:, offset : offset + size], copy=True, order="C"))
                out[name] = (field.view(dtype) if size and len(field) else torch.empty(len(field), 0, dtype=dtype)
                             ).reshape(len(field), *shape)
            offset += size
        return out

    def _positions(self, index: torch.Tensor | slice | Sequence[int]) -> np.ndarray:
        """``index`` as row numbers (int64, negatives counted from the end), checked against ``n``."""
        if isinstance(index, slice):
            return np.arange(*index.indices(self.n), dtype=np.int64)
        rows = index.cpu().numpy() if isinstance(index, torch.Tensor) else np.asarray(index)
        if rows.dtype == np.bool_:
            raise TypeError("a cache on disk is read by row numbers, not by a boolean mask")
        rows = rows.astype(np.int64, copy=False).reshape(-1)
        if len(rows) and (rows.min() < -self.n or rows.max() >= self.n):
            raise IndexError(f"row index out of range for a cache of {self.n} rows")
        return np.where(rows < 0, rows + self.n, rows)

    def _read(self, rows: np.ndarray) -> np.ndarray:
        """The records of ``rows`` (in that order) as ``(len(rows), width)`` uint8, read from the
        map in file order, one region at a time, each region's pages released once read."""
        assert self._records is not None
        records = self._records
        out = np.empty((len(rows), records.shape[1]), dtype=np.uint8)
        if not out.size:
            return out
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):  # (Windows: no madvise)
            return np.take(records, rows, axis=0, out=out)
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        region_rows = max(REGION_BYTES // records.shape[1], 1)
        bounds = np.flatnonzero(np.diff(ordered // region_rows)) + 1
        for first, end in zip([0, *bounds.tolist()], [*bounds.tolist(), len(ordered)]):
            out[order[first:end]] = records[ordered[first:end]]
            begin = int(ordered[first]) * records.shape[1] // mmap.PAGESIZE * mmap.PAGESIZE
            self._map.madvise(mmap.MADV_DONTNEED, begin, (int(ordered[end - 1]) + 1) * records.shape[1] - begin)
        self._map.madvise(mmap.MADV_DONTNEED)  # and what the kernel mapped around the regions' edges
        return out

    def rows(self, name: str, index: torch.Tensor | slice | Sequence[int]) -> torch.Tensor:
        """Rows of one field."""
        if name not in self._specs:
            raise KeyError(f"no field {name!r}; fields: {self.fields}")
        return self.gather(index, [name])[name]

    def batches(self, indices: torch.Tensor, batch_size: int,
                names: Sequence[str] | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Every field (or those in ``names``) at ``indices``, ``batch_size`` rows at a time."""
        for start in range(0, len(indices), batch_size):
            # in the order asked for (a file is read in file order all the same, see _read): the
            # rows of a step, and so the fit's last digits, do not depend on where the cache lives
            yield self.gather(indices[start : start + batch_size], names)

    # ------------------------------------------------------------------ cleaning up

    def close(self) -> None:
        """Release everything; the temporary folder (if any) is deleted."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._records = None  # the view first: a map with exported buffers cannot close
        try:
            if self._map is not None:
                self._map.close()
        finally:
            self._map = None
            self._frozen.clear()
            self._ram.clear()
            if self.folder is not None and os.getpid() == self._owner:
                shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def __enter__(self) -> StateCache:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _row_bytes(spec: tuple[tuple[int, ...], torch.dtype]) -> int:
    shape, dtype = spec
    return math.prod(shape) * dtype.itemsize


def _as_bytes(value: torch.Tensor, n: int, size: int) -> torch.Tensor:
    """``(n, size)`` uint8: each row's bytes (any dtype, any shape, also 0 rows or 0 bytes)."""
    if not size or not n:
        return torch.empty(n, size, dtype=torch.uint8)
    return value.reshape(n, size // value.element_size()).view(torch.uint8)
