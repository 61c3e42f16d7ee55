"""Tests of koopman_hooks/fitting/cache.py: RAM up to a budget, then a memory map that is removed."""

from __future__ import annotations

import os

import pytest
import torch

from koopman_hooks.fitting.cache import StateCache


def batches(n_batches: int = 6, rows: int = 50):
    g = torch.Generator().manual_seed(0)
    for i in range(n_batches):
        yield {"s0": torch.randn(rows, 8, generator=g), "labels": torch.arange(rows) + i * rows,
               "in": torch.randint(0, 9, (rows, 3, 2), generator=g)}


@pytest.mark.parametrize("budget_mb", [100.0, 0.002])  # everything in RAM / spilled to disk after a batch
def test_rows_come_back_exactly_from_ram_or_disk(budget_mb):
    expected = list(batches())
    with StateCache(budget_mb) as cache:
        for batch in expected:
            assert cache.append(batch) is cache
        cache.finalize()
        assert cache.n == 300 and cache.on_disk == (budget_mb < 1)
        folder = cache.folder
        whole = {k: torch.cat([b[k] for b in expected]) for k in expected[0]}
        index = torch.tensor([299, 0, 17, 150, 151])
        for name, value in whole.items():
            assert torch.equal(cache.rows(name, index), value[index])
            assert cache.rows(name, index).dtype == value.dtype
        seen = torch.cat([b["labels"] for b in cache.batches(torch.randperm(300), 64)])
        assert sorted(seen.tolist()) == list(range(300))  # every row once
    assert folder is None or not os.path.exists(folder)  # the temporary folder is gone


@pytest.mark.parametrize("budget_mb", [100.0, 0.002])
def test_transform_rewrites_fields_in_ram_or_on_disk_and_refuses_changes_of_layout(budget_mb):
    expected = list(batches())
    whole = {k: torch.cat([b[k] for b in expected]) for k in expected[0]}
    rotation = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(1)))[0]
    with StateCache(budget_mb) as cache:
        with pytest.raises(RuntimeError, match="finalize"):
            cache.append(expected[0]).transform(["s0"], lambda rows: rows)
        for batch in expected[1:]:
            cache.append(batch)
        cache.finalize()
        with pytest.raises(KeyError, match="no fields"):
            cache.transform(["s9"], lambda rows: rows)
        with pytest.raises(ValueError, match="transform changed field 's0'"):
            cache.transform(["s0"], lambda rows: {"s0": rows["s0"].double()})
        assert torch.equal(cache.rows("s0", slice(None)), whole["s0"])  # a refused transform changes nothing
        assert cache.folder is None or os.listdir(cache.folder) == ["rows.bin"]
        seen = []

        def rotate(rows):
            seen.append(len(rows["s0"]))
            return {"s0": rows["s0"] @ rotation}

        assert cache.transform(["s0"], rotate, chunk_rows=128) is cache
        assert seen == [128, 128, 44] and cache.on_disk == (budget_mb < 1)
        torch.testing.assert_close(cache.rows("s0", slice(None)), whole["s0"] @ rotation, rtol=0, atol=1e-6)
        for name in ("labels", "in"):  # the other fields are untouched
            assert torch.equal(cache.rows(name, slice(None)), whole[name])
        folder = cache.folder
        assert folder is None or os.listdir(folder) == ["rows.bin"]
    assert folder is None or not os.path.exists(folder)


def test_the_temporary_folder_goes_away_after_an_exception():
    folder = None
    with pytest.raises(RuntimeError, match="boom"):
        with StateCache(0.001) as cache:
            for batch in batches():
                cache.append(batch)
            folder = cache.folder
            assert folder is not None and os.path.isdir(folder)
            raise RuntimeError("boom")
    assert folder is not None and not os.path.exists(folder)


def test_mismatched_batches_are_refused():
    with StateCache() as cache:
        cache.append({"a": torch.zeros(3, 2)})
        with pytest.raises(ValueError, match="expected fields"):
            cache.append({"b": torch.zeros(3, 2)})
        with pytest.raises(ValueError, match="changed shape"):
            cache.append({"a": torch.zeros(3, 5)})
        with pytest.raises(ValueError, match="different numbers of rows"):
            cache.append({"a": torch.zeros(3, 2), "c": torch.zeros(4)})
        cache.finalize()
        with pytest.raises(RuntimeError, match="finalised"):
            cache.append({"a": torch.zeros(3, 2)})


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(key + ":"))


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as refs:  # Linux: the peak (VmHWM) restarts at the current RSS
            refs.write("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak RSS from Linux's /proc")
def test_reading_a_cache_on_disk_adds_only_the_batch_to_resident_memory():
    rows, width = 8192, 1024  # 32 MiB on disk
    with StateCache(0.0) as cache:
        for start in range(0, rows, 1024):
            cache.append({"s0": torch.arange(start, start + 1024, dtype=torch.float32)[:, None].expand(1024, width),
                          "empty": torch.zeros(1024, 0)})
        cache.finalize()
        assert cache.on_disk
        if not _reset_peak_rss():
            pytest.skip("cannot reset the peak RSS here")
        before = _status_kb("VmRSS")
        total = 0.0
        for batch in cache.batches(torch.randperm(rows), 512):  # every row once, in random batches, as an epoch
            total += float(batch["s0"][:, 0].sum())
            assert batch["empty"].shape == (len(batch["s0"]), 0)
        assert total == rows * (rows - 1) / 2  # the rows came back exactly
        # the whole 32 MiB was read; at its peak the process held about a batch (2 MiB) more, not the file
        assert _status_kb("VmHWM") - before < 8 * 1024


@pytest.mark.parametrize("region_bytes", [2 * 2**20, 64])  # one region, or a region per 5 rows
def test_rows_are_read_from_disk_in_any_order_with_repeats_and_negative_indices(monkeypatch, region_bytes):
    import koopman_hooks.fitting.cache as cache_module

    monkeypatch.setattr(cache_module, "REGION_BYTES", region_bytes)
    whole = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    with StateCache(-1.0) as cache:
        for start in range(0, 50, 7):
            cache.append({"x": whole[start : start + 7]})
        cache.finalize()
        for index in ([4, 5, 6, 7, 2, 3, 3, 49, 0], [-1, -50, 10], torch.tensor([9, 8, 7]), slice(None, None, 3),
                      slice(45, None), []):
            assert torch.equal(cache.rows("x", index), whole[index])
        with pytest.raises(IndexError, match="out of range"):
            cache.rows("x", [50])


@pytest.mark.parametrize("budget_mb", [100.0, -1.0])  # in RAM / on disk from the first row
def test_every_dtype_and_single_rows_come_back_exactly(budget_mb):
    g = torch.Generator().manual_seed(1)

    def batch(n: int) -> dict[str, torch.Tensor]:
        return {"mask": torch.rand(n, 3, generator=g) > 0.5, "s0": torch.randn(n, 3, generator=g),
                "labels": torch.randint(0, 9, (n,), generator=g), "half": torch.randn(n, 2, 1, generator=g).bfloat16(),
                "small": torch.randint(-5, 5, (n, 5), generator=g, dtype=torch.int8), "none": torch.zeros(n, 0)}

    batches = [batch(4), batch(0), batch(3)]  # an empty batch too
    with StateCache(budget_mb) as cache:
        for b in batches:
            cache.append(b)
        assert cache.finalize() is cache.finalize()  # finalising twice is harmless
        assert cache.on_disk == (budget_mb < 0) and cache.n == 7
        whole = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
        for index in (torch.tensor([2]), torch.tensor([6, 0, 3]), slice(1, 5), [5]):
            rows = cache.gather(index)
            for name, value in whole.items():  # one row too: every field aligned, its own dtype, exact
                assert rows[name].dtype == value.dtype and torch.equal(rows[name], value[index])
                assert rows[name].is_contiguous() and rows[name].data_ptr() % max(value.element_size(), 1) == 0
