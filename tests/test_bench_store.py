"""benchmarks/bench_store.py's parts: the Zipf id workload and the page-cache residency it
reports (the figures themselves are in the README, not asserted here)."""

import os
import sys
from typing import Any

import numpy as np
from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import bench_store  # noqa: E402


def test_zipf_ids_stay_in_their_table_and_follow_rank_to_the_minus_alpha() -> None:
    rows = 1_000_000
    ids = bench_store.zipf_rows(np.random.default_rng(0), rows, 400_000, alpha=1.05)

    assert ids.min() >= 0 and ids.max() < rows
    counts = np.bincount(ids, minlength=rows)
    hottest = np.sort(counts)[::-1]
    # P(rank k) ~ k^-1.05: rank 1 against rank 10 is ~10^1.05 = 11.2 (continuous approximation)
    assert 8 < hottest[0] / hottest[9] < 15
    # a heavy tail: the top 1% of rows hold well under all lookups, and most rows are never hit
    assert 0.5 < hottest[: rows // 100].sum() / len(ids) < 0.9


def test_hot_ids_are_scattered_over_the_table_not_packed_in_a_few_pages() -> None:
    rows = 1_000_000
    ids = bench_store.zipf_rows(np.random.default_rng(1), rows, 100_000, alpha=1.05)
    hottest = np.argsort(np.bincount(ids, minlength=rows))[::-1][:100]

    pages = set((hottest * 68) // 4096)  # 68 B int8 rows, 4 KiB pages
    assert len(pages) > 90


def test_a_one_row_table_always_gets_row_zero() -> None:
    ids = bench_store.zipf_rows(np.random.default_rng(0), 1, 10, alpha=1.05)
    assert ids.tolist() == [0] * 10


def test_residency_is_read_from_the_page_cache(tmp_path: Any) -> None:
    path = str(tmp_path / "data")
    with open(path, "wb") as f:
        f.write(os.urandom(4 << 20))
        f.flush()
        os.fsync(f.fileno())  # clean pages: posix_fadvise(DONTNEED) may evict them

    bench_store.read_into_page_cache(path)
    assert bench_store.resident_fraction(path) == 1.0
    bench_store.drop_from_page_cache(path)
    assert bench_store.resident_fraction(path) < 0.1


def test_hot_rows_first_puts_rank_k_at_row_k_minus_1() -> None:
    ids = bench_store.zipf_rows(np.random.default_rng(2), 1_000_000, 100_000, alpha=1.05, scattered=False)
    counts = np.bincount(ids, minlength=1_000_000)
    assert counts.argmax() == 0 and counts[0] > counts[1] > counts[5] > counts[100]
