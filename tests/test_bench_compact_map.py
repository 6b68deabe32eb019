"""benchmarks/bench_compact_map.py: the compact id -> row map it times is the rule it states
(tiers first, each in id order, then the rest in id order), so its figures are those of a
map that would serve; the figures themselves are in the README, not asserted here."""

import os
import sys

import numpy as np
from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import bench_compact_map  # noqa: E402


def rule(rows: int, tiers: list) -> np.ndarray:
    """The layout written out: row of each id."""
    in_tier = np.zeros(rows, dtype=bool)
    for ids in tiers:
        in_tier[ids] = True
    order = np.concatenate(list(tiers) + [np.flatnonzero(~in_tier)])
    row = np.empty(rows, dtype=np.int64)
    row[order] = np.arange(rows)
    return row


def test_the_compact_map_lays_out_tiers_first_each_in_id_order_then_the_other_ids() -> None:
    rng = np.random.default_rng(3)
    rows = [1000, 130, 64, 7]
    tiers = []
    for r in rows:
        chosen = rng.permutation(r)[: r // 2]
        tiers.append([np.sort(chosen[: r // 8]), np.sort(chosen[r // 8 : r // 3]), np.sort(chosen[r // 3 :])])
    m = bench_compact_map.compact_map(rows, tiers)

    for f, (r, full) in enumerate(zip(rows, bench_compact_map.full_map(m, rows))):
        assert np.array_equal(full, rule(r, tiers[f])), f"table {f}"
    assert m["bits"].nbytes + m["rank"].nbytes < 4 * sum(rows)  # smaller than an int32 an id


def test_the_benchmark_times_maps_that_agree_with_the_rule() -> None:
    figures = bench_compact_map.run([5000, 300, 90], tiers=2, batch=4, batches=5)

    assert figures["ids_a_batch"] == 12 and figures["map_mb"] == 4 * 5390 / 1e6
    assert figures["fbgemm_us"] > 0 and figures["numpy_us"] > 0
