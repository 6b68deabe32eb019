"""Frequency-ordered table store entries (SPEC §8, dlrm_row_order.py): id counts -> an entry
whose rows are laid out hottest first, with its id -> row map, applied by fbgemm's TBEs.

What is shown here, with small configs: ordered and unordered entries score bit-identically
(int8, int4, fp16, fp32; world size 1 and 2; TorchRec's forward and the served lean one); the
rows really move (the hottest id's row is row 0) and the key covers the order; counts that do
not fit the config are refused naming the file, the table and what was wrong; the
overlapped page reads never change a result; a served, ordered entry is file pages, its map
too; the handler counts the ids it looks up and the merge command turns workers' counts
into a config for an ordered entry; training writes the counts of its data.
"""

import ctypes
import errno
import gc
import json
import mmap
import os
import random
import subprocess
import sys
from typing import Any, Dict, List

import numpy as np
import pytest
import torch
from conftest import REPO, small_model_config
from serving import direct_scores, random_samples
from test_handler import stand_in_context
from test_table_store import entries, smaps_of, temp_files

import dlrm_row_order
from dlrm_factory import DLRMFactory, resolve_model_config
from dlrm_handler import TorchRecDLRMHandler
from dlrm_lean_forward import optimize_for_inference


def write_counts(path: str, config: Dict[str, Any], seed: int = 0, ids_per_table: int = 400) -> str:
    """An id counts file for ``config``'s tables: ``ids_per_table`` random ids each, random
    counts (ties included)."""
    cfg = resolve_model_config(config)
    rng = np.random.default_rng(seed)
    counts = {}
    for feature, rows in zip(cfg["id_list_features_keys"], cfg["num_embeddings_per_feature"]):
        ids = np.unique(rng.integers(0, rows, ids_per_table))
        counts[feature] = (ids.astype(np.int64), rng.integers(1, 20, ids.size).astype(np.int64))
    tables = list(zip(cfg["id_list_features_keys"], cfg["num_embeddings_per_feature"]))
    dlrm_row_order.write_counts(path, tables, counts, samples=1000)
    return path


def scores_of(model: torch.nn.Module, config: Dict[str, Any], count: int = 16) -> List[float]:
    """The logits of ``count`` fixed samples (multi-hot, empty bags too)."""
    cfg = resolve_model_config(config)
    samples = random_samples(random.Random(7), count, cfg["num_embeddings_per_feature"])
    return direct_scores(model, cfg["id_list_features_keys"], samples)


def tbes_of(model: torch.nn.Module) -> List[Any]:
    return [tbe for tbe, _ in model.sparse_arch.embedding_bag_collection.tbes_configs().items()]


# --- same scores, rows moved ---------------------------------------------------------------

ORDER_CASES = [{"quant_dtype": dtype, "world_size": world_size} for dtype in ("int8", "int4", "fp16", "fp32") for world_size in (1, 2)]


@pytest.mark.parametrize("overrides", ORDER_CASES, ids=lambda o: f"{o['quant_dtype']}-ws{o['world_size']}")
def test_ordered_and_unordered_entries_score_bit_identically(tmp_path: Any, overrides: Dict[str, Any]) -> None:
    config = small_model_config(table_store=str(tmp_path / "store"), **overrides)
    counts = write_counts(str(tmp_path / "counts.safetensors"), config)
    unordered = DLRMFactory(config)
    built = DLRMFactory({**config, "id_counts": counts})
    mapped = DLRMFactory({**config, "id_counts": counts})

    assert built.table_store_entry["built"] and not mapped.table_store_entry["built"]
    assert built.table_store_entry["path"] != unordered.table_store_entry["path"]
    expected = scores_of(unordered, config)
    assert scores_of(built, config) == expected
    assert scores_of(mapped, config) == expected
    if overrides["world_size"] == 1:  # the served CPU forward: one TBE call, fbgemm's remapping inside
        assert scores_of(optimize_for_inference(mapped), config) == expected


def test_the_counted_ids_come_first_hottest_first_the_others_in_id_order() -> None:
    counts = (np.array([2, 5, 7, 9], dtype=np.int64), np.array([3, 10, 3, 1], dtype=np.int64))

    order = dlrm_row_order.row_order(10, counts)

    assert order.dtype == np.int32
    assert order[[5, 2, 7, 9]].tolist() == [0, 1, 2, 3]  # by count, a tie (2, 7) by id
    assert order[[0, 1, 3, 4, 6, 8]].tolist() == [4, 5, 6, 7, 8, 9]


def test_an_ordered_entry_puts_the_hottest_rows_first_and_holds_its_map(tmp_path: Any) -> None:
    config = small_model_config(table_store=str(tmp_path / "store"))
    counts_path = write_counts(str(tmp_path / "counts.safetensors"), config)
    unordered = DLRMFactory(config)
    ordered = DLRMFactory({**config, "id_counts": counts_path})
    (plain_tbe,), (tbe,) = tbes_of(unordered), tbes_of(ordered)
    _, counts, _ = dlrm_row_order.read_counts(counts_path)
    ids, seen = counts["cat_2"]
    hottest = int(ids[np.lexsort((ids, -seen))][0])

    plain_rows = plain_tbe.split_embedding_weights(split_scale_shifts=False)[2][0]
    rows = tbe.split_embedding_weights(split_scale_shifts=False)[2][0]
    table_map = tbe.index_remappings_array[1000 + 2000 :]  # cat_2's map, after cat_0's and cat_1's
    assert table_map.dtype == torch.int32 and table_map.numel() == 5000
    assert table_map[hottest].item() == 0 and torch.equal(rows[0], plain_rows[hottest])
    assert torch.equal(rows[table_map.long()], plain_rows)  # every row moved, none changed
    assert not torch.equal(rows, plain_rows)


def test_the_entry_key_covers_the_order(tmp_path: Any) -> None:
    config = small_model_config(table_store=str(tmp_path / "store"))
    first = write_counts(str(tmp_path / "a.safetensors"), config, seed=1)
    same = write_counts(str(tmp_path / "b.safetensors"), config, seed=1)
    other = write_counts(str(tmp_path / "c.safetensors"), config, seed=2)

    entry = DLRMFactory({**config, "id_counts": first}).table_store_entry
    again = DLRMFactory({**config, "id_counts": same}).table_store_entry  # same counts, another file
    moved = DLRMFactory({**config, "id_counts": other}).table_store_entry

    assert entry["built"] and "-ordered-" in os.path.basename(entry["path"])
    assert not again["built"] and again["path"] == entry["path"]
    assert moved["built"] and moved["path"] != entry["path"]


# --- counts that do not fit --------------------------------------------------------------------


def counts_with(path: str, tables: List[Any], cat_0: Any) -> str:
    """A counts file of ``tables`` whose cat_0 arrays are ``cat_0`` (ids, counts)."""
    counts = {feature: (np.zeros(0, np.int64), np.zeros(0, np.int64)) for feature, _ in tables}
    counts["cat_0"] = tuple(np.array(a, dtype=np.int64) for a in cat_0)
    dlrm_row_order.write_counts(path, tables, counts, samples=1)
    return path


SMALL_TABLES = [("cat_0", 1000), ("cat_1", 2000), ("cat_2", 5000)]
REFUSED = {
    "other tables": (SMALL_TABLES[:2], ([1], [1]), r"are for the tables \[cat_0: 1000, cat_1: 2000\] \(2 tables\); the config has "
                                                   r"\[cat_0: 1000, cat_1: 2000, cat_2: 5000\] \(3 tables\)"),
    "other sizes": ([("cat_0", 999)] + SMALL_TABLES[1:], ([1], [1]), r"are for the tables \[cat_0: 999, "),
    "an id beyond its table": (SMALL_TABLES, ([3, 1000], [1, 1]), r"table 'cat_0' \(1000 rows\): ids from 3 to 1000; expected ids in \[0, 1000\)"),
    "a negative id": (SMALL_TABLES, ([-1, 3], [1, 1]), r"table 'cat_0' \(1000 rows\): ids from -1 to 3"),
    "ids out of order": (SMALL_TABLES, ([5, 3], [1, 1]), r"table 'cat_0' \(1000 rows\): ids not strictly increasing"),
    "a zero count": (SMALL_TABLES, ([3, 5], [0, 1]), r"table 'cat_0' \(1000 rows\): a count of 0; expected counts > 0"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_counts_that_do_not_fit_the_config_are_refused_naming_the_table(tmp_path: Any, case: str) -> None:
    tables, cat_0, message = REFUSED[case]
    counts = counts_with(str(tmp_path / "counts.safetensors"), tables, cat_0)

    with pytest.raises(ValueError, match=message):
        DLRMFactory(small_model_config(table_store=str(tmp_path / "store"), id_counts=counts))
    assert entries(str(tmp_path / "store")) == [] and temp_files(str(tmp_path / "store")) == []  # nothing published


def test_id_counts_that_are_not_a_counts_file_or_meet_row_wise_shards_are_config_errors(tmp_path: Any) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors")
    counts = write_counts(str(tmp_path / "counts.safetensors"), small_model_config())

    with pytest.raises(ValueError, match=r"'id_counts' is '/nowhere'; expected null or the path of an existing id counts file"):
        resolve_model_config(small_model_config(id_counts="/nowhere"))
    with pytest.raises(ValueError, match=r"'id_counts': id counts '.*junk.safetensors' could not be read as an id counts file"):
        resolve_model_config(small_model_config(id_counts=str(junk)))
    with pytest.raises(ValueError, match=r"expected null with sharding_type 'row_wise' \(an ordered entry keeps whole tables"):
        resolve_model_config(small_model_config(id_counts=counts, sharding_type="row_wise", world_size=2))


# --- overlapped reads ----------------------------------------------------------------------------


def test_overlapped_page_reads_never_change_a_result(tmp_path: Any) -> None:
    """The served forward with the entry dropped from the page cache, its missing pages asked
    for before every lookup, against the same entry resident, no prefetch."""
    config = small_model_config(num_embeddings_per_feature=[200_000, 100_000, 50_000], table_store=str(tmp_path / "store"))
    config["id_counts"] = write_counts(str(tmp_path / "counts.safetensors"), config, ids_per_table=2000)
    plain = optimize_for_inference(DLRMFactory(config))
    plain.page_prefetchers[0].detach()  # the reference: no prefetch at all
    expected = [scores_of(plain, config, count=64)] * 3
    del plain  # its mapping keeps the pages it looked up in memory
    gc.collect()
    served = optimize_for_inference(DLRMFactory(config))
    (prefetcher,) = served.page_prefetchers
    path = served.table_store_entry["path"]

    results = []
    for _ in range(3):
        with open(path, "rb") as f:  # pages out of the cache: the prefetch has pages to ask for
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        prefetcher.refresh()
        prefetcher.active = True
        results.append(scores_of(served, config, count=64))

    assert results == expected
    assert prefetcher.stats["prefetched"] >= 3 and prefetcher.stats["asked"] > 0


def test_the_prefetch_stands_down_when_no_lookup_reads_from_disk(tmp_path: Any) -> None:
    config = small_model_config(table_store=str(tmp_path / "store"))
    served = optimize_for_inference(DLRMFactory(config))
    (prefetcher,) = served.page_prefetchers
    cfg = resolve_model_config(config)
    samples = random_samples(random.Random(3), 4, cfg["num_embeddings_per_feature"])

    for _ in range(300):  # a small entry, resident since its check at open: nothing to read
        direct_scores(served, cfg["id_list_features_keys"], samples)

    assert not prefetcher.active and prefetcher.stats["asked"] == prefetcher.stats["lookup_reads"] == 0
    assert 0 < prefetcher.stats["prefetched"] < 300  # on at the start, off once no batch reads from disk


def test_the_hottest_pages_over_all_tables_are_chosen_for_the_pinned_tier(tmp_path: Any) -> None:
    """hottest_rows: the budget's pages go to the pages with the most counted lookups, over
    all tables: a hot table's whole prefix before a cold table's first page."""
    hot, cold = (np.arange(2000), np.full(2000, 1000)), (np.arange(2000), np.ones(2000, np.int64))
    path = str(tmp_path / "counts.safetensors")
    dlrm_row_order.write_counts(path, [("cat_0", 10_000), ("cat_1", 10_000)], {"cat_0": cold, "cat_1": hot}, samples=1000)
    tables = [("cat_0", 20), ("cat_1", 20)]  # 204 rows a 4 KiB page; 2,000 counted ids: 10 pages a table

    assert dlrm_row_order.hottest_rows(path, tables, 5 * 4096) == {"cat_0": 0, "cat_1": 5 * 204}
    assert dlrm_row_order.hottest_rows(path, tables, 12 * 4096) == {"cat_0": 2 * 204, "cat_1": 10 * 204}
    assert dlrm_row_order.hottest_rows(path, tables, 4095) == {"cat_0": 0, "cat_1": 0}


def test_the_pinned_tier_is_locked_file_pages_and_scores_do_not_change(tmp_path: Any, monkeypatch: Any) -> None:
    """DLRM_STORE_PIN_MB: the ordered entry's maps and hottest rows locked in memory (the
    file's pages: VmLck grows, no private copy)."""
    config = small_model_config(num_embeddings_per_feature=[200_000, 100_000, 50_000], table_store=str(tmp_path / "store"))
    config["id_counts"] = write_counts(str(tmp_path / "counts.safetensors"), config, ids_per_table=5000)
    pin_bytes = 4 * sum(config["num_embeddings_per_feature"]) + 64 * 4096  # the maps and 64 pages of rows
    if not mlock_allowed(2 * pin_bytes):
        pytest.skip(f"this process may not lock {2 * pin_bytes} bytes (ulimit -l, no CAP_IPC_LOCK)")
    expected = scores_of(DLRMFactory(config), config)
    monkeypatch.setattr("dlrm_table_store.PIN_BYTES", pin_bytes)
    locked_before = vm_locked_kib()

    pinned = DLRMFactory(config)

    assert pinned.pinned_rows is not None
    assert scores_of(pinned, config) == expected
    assert vm_locked_kib() - locked_before >= pin_bytes // 1024  # a few pages more at range edges
    assert smaps_of(os.getpid(), pinned.table_store_entry["path"])["Anonymous"] == 0


def test_a_refused_pin_warns_and_leaves_the_rows_in_the_page_cache(tmp_path: Any, monkeypatch: Any, caplog: Any) -> None:
    """mlock refused (``ulimit -l``, a memory limit): a warning that says what to change,
    nothing locked, the same scores."""
    config = small_model_config(num_embeddings_per_feature=[20_000, 10_000, 5_000], table_store=str(tmp_path / "store"))
    config["id_counts"] = write_counts(str(tmp_path / "counts.safetensors"), config)
    expected = scores_of(DLRMFactory(config), config)
    monkeypatch.setattr("dlrm_table_store.PIN_BYTES", 10**6)
    monkeypatch.setattr("dlrm_table_store._libc", RefusingMlock())
    locked_before = vm_locked_kib()

    unpinned = DLRMFactory(config)

    assert unpinned.pinned_rows is None
    assert scores_of(unpinned, config) == expected
    assert vm_locked_kib() == locked_before
    assert "could not pin" in caplog.text and "ulimit -l" in caplog.text and "DLRM_STORE_PIN_MB" in caplog.text


class RefusingMlock:
    """libc as the kernel of a process over its RLIMIT_MEMLOCK sees it: mlock fails, ENOMEM."""

    def __init__(self) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.libc, name)

    def mlock(self, address: int, length: int) -> int:
        ctypes.set_errno(errno.ENOMEM)
        return -1


def mlock_allowed(nbytes: int) -> bool:
    """Whether this process may lock ``nbytes`` (tried on an anonymous mapping)."""
    libc = ctypes.CDLL(None, use_errno=True)
    probe = mmap.mmap(-1, nbytes)
    address = ctypes.addressof(ctypes.c_char.from_buffer(probe))
    try:
        return libc.mlock(ctypes.c_void_p(address), ctypes.c_size_t(nbytes)) == 0
    finally:
        libc.munlock(ctypes.c_void_p(address), ctypes.c_size_t(nbytes))
        del address
        gc.collect()
        probe.close()


def vm_locked_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmLck:"))


# --- file pages, not private copies --------------------------------------------------------------


def test_a_served_ordered_entry_is_file_pages_its_map_too(tmp_path: Any) -> None:
    config = small_model_config(num_embeddings_per_feature=[200_000, 100_000, 50_000], table_store=str(tmp_path / "store"))
    config["id_counts"] = write_counts(str(tmp_path / "counts.safetensors"), config)
    DLRMFactory(config)  # built; the served process maps it
    served = optimize_for_inference(DLRMFactory(config))
    scores_of(served, config)
    (tbe,) = tbes_of(served)
    path = served.table_store_entry["path"]

    mapped = smaps_of(os.getpid(), path)
    assert mapped["Rss"] > 0 and mapped["Anonymous"] == 0  # tables and map: the file's pages ...
    table_start, map_start = tbe.weights_host.data_ptr(), tbe.index_remappings_array.data_ptr()
    assert table_start < map_start < table_start + os.path.getsize(path)  # ... the map inside the tables' mapping


# --- counting ids ---------------------------------------------------------------------------------


def test_the_handler_counts_the_ids_it_looks_up_and_merge_makes_an_ordered_config(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("DLRM_ID_COUNTS_DIR", str(tmp_path / "counts"))
    config = small_model_config()
    with open(tmp_path / "model_config.json", "w") as f:
        json.dump(config, f)
    handler = TorchRecDLRMHandler()
    handler.initialize(stand_in_context(str(tmp_path), 0))
    requests = [{"float_features": [0.5] * 13, "id_list_features.lengths": [1, 2, 0], "id_list_features.values": [7, 42, 42]},
                {"float_features": [[0.1] * 13] * 2, "id_list_features.lengths": [1, 1, 1, 1, 0, 1],
                 "id_list_features.values": [7, 3, 4999, 8, 1]}]  # fmt: skip
    for request in requests:
        handler.handle([{"body": request}], stand_in_context(str(tmp_path), 1))
    handler.id_counts.flush()

    (written,) = os.listdir(tmp_path / "counts")
    assert written == f"dlrm-{os.getpid()}.safetensors"
    _, counts, samples = dlrm_row_order.read_counts(str(tmp_path / "counts" / written))
    assert samples == 3
    assert {f: dict(zip(ids.tolist(), seen.tolist())) for f, (ids, seen) in counts.items()} == {
        "cat_0": {7: 2, 8: 1}, "cat_1": {42: 2, 3: 1}, "cat_2": {4999: 1, 1: 1}}  # fmt: skip

    run = subprocess.run([sys.executable, os.path.join(REPO, "dlrm_row_order.py"), "merge", "--config", str(tmp_path / "model_config.json"),
                          "--out", str(tmp_path / "merged.safetensors"), str(tmp_path / "counts"), str(tmp_path / "counts" / written)],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    _, merged, samples = dlrm_row_order.read_counts(str(tmp_path / "merged.safetensors"))
    assert samples == 6 and merged["cat_0"][1].tolist() == [4, 2]  # the folder and the file: counted twice
    with open(tmp_path / "merged.safetensors.config.json") as f:
        ordered_config = json.load(f)
    assert ordered_config == {**config, "id_counts": str(tmp_path / "merged.safetensors")}
    model = DLRMFactory({**ordered_config, "table_store": str(tmp_path / "store")})
    assert "-ordered-" in model.table_store_entry["path"]
