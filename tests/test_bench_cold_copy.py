"""benchmarks/bench_cold_copy.py's parts: its modes copy the same bytes, so their times compare
like with like (the figures themselves are in the README, not asserted here)."""

import os
import sys
from typing import Any

import torch
from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import bench_cold_copy  # noqa: E402

import dlrm_table_store  # noqa: E402


def test_every_mode_copies_the_same_bytes_and_only_now_leaves_nothing_mapped(tmp_path: Any) -> None:
    path = bench_cold_copy.build_entry(str(tmp_path), 40_000)  # 2.7 MB of int8 rows
    digest = dlrm_table_store.key_digest(bench_cold_copy._key_of(path))
    copied, mapped = [], {}
    for mode in bench_cold_copy.MODES:
        tbes = bench_cold_copy.padded_tbes(dlrm_table_store.open_entry(path, digest))
        result = bench_cold_copy.measure(path, digest, mode, tbes)
        copied.append(torch.cat([tbe.weights_host for tbe in tbes]))
        mapped[mode.split(":")[0]] = result["mapped_after_mb"]

    assert copied[0].count_nonzero() > 0.9 * copied[0].numel() * 68 / 80  # rows of 68 B padded to 80
    assert all(torch.equal(c, copied[0]) for c in copied[1:])
    assert mapped["now"] <= 4 / 1024 and mapped["before"] > 2  # now: the header's page at most
