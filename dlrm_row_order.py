"""Frequency-ordered table store entries: id counts, the row order they give, and counting ids.

An *id counts file* is data only (safetensors: a JSON header, then raw arrays): for each table
of a config, the ids seen and how often::

    id_counts.safetensors
        __metadata__   format "dlrm-id-counts/1", tables [[feature, rows], ...] (the config's
                       id_list_features_keys and num_embeddings_per_feature), samples counted
        <feature>.ids     int64[K_f]   the distinct ids of feature f seen, increasing, in [0, R_f)
        <feature>.counts  int64[K_f]   how often each was seen (each > 0)

Who writes one: ``examples/train_dlrm.py`` (the training data's ids, next to the checkpoint),
and every serving worker when ``$DLRM_ID_COUNTS_DIR`` names a folder (``ServedIdCounts``: the
ids it looked up, one cumulative file per worker, rewritten every minute). ``python
dlrm_row_order.py merge --config C --out FILE COUNTS...`` sums files (or folders of them)
into one and checks it against the config.

A config's ``id_counts`` names such a file; its table store entry then lays every table's rows
out hottest first (``row_order``, the rule ``ORDER_RULE``)::

    row of id i = its rank among the counted ids (count descending, then id)        i counted
                = K_f + its rank among the ids not counted (in id order)            otherwise

so the rows that are looked up most share pages (an int8 row of D = 64 is 68 B: 60 rows to a
4 KiB page) instead of costing a page each, and the map id -> row (int32[R_f] per table) is
stored in the entry next to the rows. fbgemm's TBE applies it natively
(``index_remappings_array``: ``pruned_array_lookup`` before the lookup), from the entry's
mapped pages. Scores are bit-identical to the unordered entry's: the same row bytes, found
through the map.
"""

import argparse
import glob
import json
import logging
import os
import struct
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from safetensors import safe_open

logger = logging.getLogger(__name__)

COUNTS_FORMAT = "dlrm-id-counts/1"
ORDER_RULE = "counted-first/1"  # bump when row_order's rule changes (it is in the entry key)
MAX_ORDERED_ROWS = 2**31 - 1  # the map is int32, as fbgemm's TBEs index rows
COUNTS_ENV = "DLRM_ID_COUNTS_DIR"  # where serving workers write the ids they looked up
FLUSH_SECONDS = 60.0  # a worker rewrites its counts file this often
FLUSH_IDS = 1 << 22  # ... or when this many ids wait to be counted

# One table's counts: (distinct ids int64[K], their counts int64[K]).
TableCounts = Tuple[np.ndarray, np.ndarray]


# ---------------------------------------------------------------------------------------
# Counts files: write, read, check against a config, merge.
# ---------------------------------------------------------------------------------------


def write_counts(path: str, tables: Sequence[Tuple[str, int]], counts: Dict[str, TableCounts], samples: int) -> None:
    """Write an id counts file atomically (a temp file renamed over ``path``). The same
    counts always give the same bytes (the header's keys sorted; safetensors' own writer
    orders the metadata at random): the file's sha256 is the order's identity in the key."""
    arrays = {}
    for feature, _ in tables:
        ids, seen = counts.get(feature, (np.zeros(0, np.int64), np.zeros(0, np.int64)))
        arrays[f"{feature}.ids"] = np.ascontiguousarray(ids, dtype="<i8")
        arrays[f"{feature}.counts"] = np.ascontiguousarray(seen, dtype="<i8")
    header: Dict[str, Any] = {"__metadata__": {"format": COUNTS_FORMAT, "samples": str(int(samples)),
                                               "tables": json.dumps([[f, int(r)] for f, r in tables])}}  # fmt: skip
    start = 0
    for name in sorted(arrays):
        header[name] = {"dtype": "I64", "shape": [arrays[name].size], "data_offsets": [start, start + arrays[name].nbytes]}
        start += arrays[name].nbytes
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data 8-byte aligned
    temp = f"{path}.tmp.{os.getpid()}"
    with open(temp, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name in sorted(arrays):
            f.write(arrays[name].tobytes())
    os.replace(temp, path)


def read_counts(path: str, arrays: bool = True) -> Tuple[List[Tuple[str, int]], Dict[str, TableCounts], int]:
    """(tables [(feature, rows)], {feature: (ids, counts)}, samples) of an id counts file
    (``arrays=False``: the header only, no counts); ``ValueError`` naming the file if it is
    not one."""
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != COUNTS_FORMAT:
                raise ValueError(f"format {metadata.get('format')!r}, expected {COUNTS_FORMAT!r}")
            tables = [(str(feature), int(rows)) for feature, rows in json.loads(metadata["tables"])]
            counts = {feature: (f.get_tensor(f"{feature}.ids").numpy(), f.get_tensor(f"{feature}.counts").numpy())
                      for feature, _ in tables} if arrays else {}  # fmt: skip
            samples = int(metadata.get("samples", 0))
    except ValueError as e:
        raise ValueError(f"id counts {path!r}: {e}") from None
    except Exception as e:  # missing file, not safetensors, a table's arrays missing
        raise ValueError(f"id counts {path!r} could not be read as an id counts file ({type(e).__name__}: {e})") from None
    return tables, counts, samples


def check_counts(path: str, features: Sequence[str], rows: Sequence[int], full: bool = True) -> Dict[str, TableCounts]:
    """The counts of ``path`` for a config's tables (``features``, ``rows``), or a
    ``ValueError`` that names the file, the table, what is wrong and what was expected.
    ``full=False`` checks the header only (tables and sizes), not every id."""
    tables, counts, _ = read_counts(path, arrays=full)
    expected = [(f, int(r)) for f, r in zip(features, rows)]
    if tables != expected:
        raise ValueError(f"id counts {path!r} are for the tables {_describe(tables)}; the config has "
                         f"{_describe(expected)} (id_list_features_keys, num_embeddings_per_feature): count this config's ids")  # fmt: skip
    too_big = [f for f, r in expected if r > MAX_ORDERED_ROWS]
    if too_big:
        raise ValueError(f"id counts {path!r}: tables {too_big} have more than {MAX_ORDERED_ROWS} rows; an ordered entry maps rows with int32")
    if not full:
        return counts
    for feature, table_rows in expected:
        ids, seen = counts[feature]
        where = f"id counts {path!r}, table {feature!r} ({table_rows} rows)"
        if ids.dtype != np.int64 or seen.dtype != np.int64 or ids.shape != seen.shape or ids.ndim != 1:
            raise ValueError(f"{where}: ids {ids.dtype}{list(ids.shape)} and counts {seen.dtype}{list(seen.shape)}; "
                             "expected two int64 arrays of one length")  # fmt: skip
        if ids.size and (ids[0] < 0 or ids[-1] >= table_rows):
            raise ValueError(f"{where}: ids from {int(ids.min())} to {int(ids.max())}; expected ids in [0, {table_rows})")
        if ids.size > 1 and not (np.diff(ids) > 0).all():
            raise ValueError(f"{where}: ids not strictly increasing; expected each id once, in order")
        if seen.size and seen.min() <= 0:
            raise ValueError(f"{where}: a count of {int(seen.min())}; expected counts > 0 (leave unseen ids out)")
    return counts


def _describe(tables: Sequence[Tuple[str, int]]) -> str:
    shown = ", ".join(f"{f}: {r}" for f, r in tables[:4])
    return f"[{shown}{', ...' if len(tables) > 4 else ''}] ({len(tables)} tables)"


def merge_counts(paths: Sequence[str]) -> Tuple[List[Tuple[str, int]], Dict[str, TableCounts], int]:
    """The sum of id counts files of one config's tables (e.g. every worker's)."""
    if not paths:
        raise ValueError("no id counts files to merge")
    tables, total, samples = read_counts(paths[0])
    for path in paths[1:]:
        other_tables, other, other_samples = read_counts(path)
        if other_tables != tables:
            raise ValueError(f"id counts {path!r} are for the tables {_describe(other_tables)}, {paths[0]!r} for {_describe(tables)}")
        total = {f: add_counts(total[f], other[f]) for f, _ in tables}
        samples += other_samples
    return tables, total, samples


def add_counts(a: TableCounts, b: TableCounts) -> TableCounts:
    """(ids, counts) + (ids, counts), ids sorted and distinct."""
    ids = np.concatenate([a[0], b[0]])
    counts = np.concatenate([a[1], b[1]])
    distinct, inverse = np.unique(ids, return_inverse=True)
    summed = np.zeros(distinct.size, dtype=np.int64)
    np.add.at(summed, inverse, counts)
    return distinct, summed


def counts_files(paths: Sequence[str]) -> List[str]:
    """``paths`` with each folder replaced by the ``*.safetensors`` files in it."""
    files: List[str] = []
    for path in paths:
        files += sorted(glob.glob(os.path.join(path, "*.safetensors"))) if os.path.isdir(path) else [path]
    return files


# ---------------------------------------------------------------------------------------
# The order.
# ---------------------------------------------------------------------------------------


def row_order(rows: int, counts: TableCounts) -> np.ndarray:
    """int32[rows]: the row of each id in an ordered table (ORDER_RULE): counted ids first,
    by count descending, then id; then the others in id order."""
    ids, seen = counts
    hot = ids[np.lexsort((ids, -seen))]  # lexsort: last key first
    order = np.empty(rows, dtype=np.int32)
    order[hot] = np.arange(hot.size, dtype=np.int32)
    cold = np.ones(rows, dtype=bool)
    cold[hot] = False
    order[cold] = np.arange(hot.size, rows, dtype=np.int32)
    return order


def hottest_rows(path: str, tables: Sequence[Tuple[str, int]], budget_bytes: int, page: int = 4096) -> Dict[str, int]:
    """How many leading rows of each table of an entry ordered by the id counts at ``path`` to
    keep in memory for ``budget_bytes``: the pages with the most counted lookups over all
    ``tables`` ((feature, row bytes) each), as an ideal cache would keep them. In an ordered
    table a page's lookups only fall from its first page on (rows by count descending), so
    each table's share is a prefix: {feature: rows}. Reads one table's counts at a time."""
    heats, owners = [], []
    with safe_open(path, framework="np") as f:
        names = set(f.keys())
        seen_of = {feature: f.get_slice(f"{feature}.counts") for feature, _ in tables if f"{feature}.counts" in names}
        for t, (feature, row_bytes) in enumerate(tables):
            seen = np.sort(seen_of[feature][:])[::-1] if feature in seen_of else np.zeros(0, np.int64)
            per_page = max(1, page // row_bytes)
            if seen.size:
                heats.append(np.add.reduceat(seen, np.arange(0, seen.size, per_page)))
                owners.append(np.full(heats[-1].size, t))
    if not heats or budget_bytes < page:
        return {feature: 0 for feature, _ in tables}
    heat, owner = np.concatenate(heats), np.concatenate(owners)
    chosen = owner[np.argsort(-heat, kind="stable")[: budget_bytes // page]]
    pages = np.bincount(chosen, minlength=len(tables))
    return {feature: int(pages[t]) * max(1, page // row_bytes) for t, (feature, row_bytes) in enumerate(tables)}


# ---------------------------------------------------------------------------------------
# Counting ids: training batches, served batches.
# ---------------------------------------------------------------------------------------


class IdCounter:
    """Counts the ids of a config's tables, batch after batch, in O(distinct ids) memory.

    ``add_key_major(values, per_table)``: a KJT's values with the number of ids of each table
    (key-major, as the model sees them); ``add_sample_major(ids)``: ids [N, F], one per table.
    Ids are turned into one global number (table base + id) and kept as sorted
    (distinct, counts) arrays, merged every ``batch_ids`` ids."""

    def __init__(self, features: Sequence[str], rows: Sequence[int], batch_ids: int = 1 << 20) -> None:
        self.tables = [(f, int(r)) for f, r in zip(features, rows)]
        self.bases = np.concatenate([[0], np.cumsum([r for _, r in self.tables])]).astype(np.int64)
        self.batch_ids = batch_ids
        self.samples = 0
        self._pending: List[np.ndarray] = []
        self._pending_ids = 0
        self._total: TableCounts = (np.zeros(0, np.int64), np.zeros(0, np.int64))

    def add_key_major(self, values: torch.Tensor, per_table: Sequence[int], samples: int) -> None:
        table = np.repeat(np.arange(len(self.tables)), np.asarray(per_table, dtype=np.int64))
        self._add(values.numpy().astype(np.int64, copy=False) + self.bases[table], samples)

    def add_sample_major(self, ids: torch.Tensor) -> None:
        self._add((ids.numpy().astype(np.int64, copy=False) + self.bases[:-1]).reshape(-1), ids.shape[0])

    def _add(self, global_ids: np.ndarray, samples: int) -> None:
        self._pending.append(global_ids)
        self._pending_ids += global_ids.size
        self.samples += samples
        if self._pending_ids >= self.batch_ids:
            self._fold()

    def _fold(self) -> None:
        if self._pending:
            distinct, counts = np.unique(np.concatenate(self._pending), return_counts=True)
            self._total = add_counts(self._total, (distinct, counts.astype(np.int64)))
            self._pending, self._pending_ids = [], 0

    def counts(self) -> Dict[str, TableCounts]:
        """{feature: (ids, counts)} of everything added so far."""
        self._fold()
        ids, seen = self._total
        table = np.searchsorted(self.bases, ids, side="right") - 1
        return {f: (ids[table == t] - self.bases[t], seen[table == t]) for t, (f, _) in enumerate(self.tables)}

    def write(self, path: str) -> None:
        write_counts(path, self.tables, self.counts(), self.samples)


class ServedIdCounts:
    """What a serving worker looked up, counted off the request path: ``record`` keeps a
    reference to the batch's ids (no copy, no arithmetic); every ``FLUSH_SECONDS`` (or
    ``FLUSH_IDS`` ids) a background thread counts them and rewrites ``path``, this worker's
    cumulative counts file."""

    def __init__(self, features: Sequence[str], rows: Sequence[int], path: str) -> None:
        self.counter = IdCounter(features, rows)
        self.path = path
        self._waiting: List[Tuple[torch.Tensor, torch.Tensor, int]] = []
        self._waiting_ids = 0
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()  # one flush at a time
        self._flusher: Optional[threading.Thread] = None

    def record(self, values: torch.Tensor, lengths: torch.Tensor, samples: int) -> None:
        """One batch: a key-major KJT's values and lengths (F x ``samples`` bags)."""
        self._waiting.append((values, lengths, samples))
        self._waiting_ids += values.numel()
        if (self._waiting_ids >= FLUSH_IDS or time.monotonic() - self._last_flush >= FLUSH_SECONDS) and not self._flushing():
            batches, self._waiting, self._waiting_ids = self._waiting, [], 0
            self._last_flush = time.monotonic()
            self._flusher = threading.Thread(target=self.flush, args=(batches,), name="dlrm-id-counts", daemon=True)
            self._flusher.start()

    def _flushing(self) -> bool:
        return self._flusher is not None and self._flusher.is_alive()

    def flush(self, batches: Optional[List[Tuple[torch.Tensor, torch.Tensor, int]]] = None) -> None:
        """Count ``batches`` (default: every batch waiting) and rewrite the counts file."""
        if batches is None:
            batches, self._waiting, self._waiting_ids = self._waiting, [], 0
        with self._lock:
            for values, lengths, samples in batches:
                per_table = lengths.view(len(self.counter.tables), samples).sum(dim=1).numpy()
                self.counter.add_key_major(values, per_table, samples)
            try:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                self.counter.write(self.path)
            except OSError as e:
                logger.warning("id counts: cannot write %s: %s", self.path, e)


def served_counts_path(model_name: str) -> Optional[str]:
    """This worker's counts file, ``$DLRM_ID_COUNTS_DIR/<model>-<pid>.safetensors``, or None
    when the variable is unset (no counting)."""
    folder = os.environ.get(COUNTS_ENV)
    if not folder:
        return None
    return os.path.join(os.path.abspath(os.path.expanduser(folder)), f"{model_name}-{os.getpid()}.safetensors")


# ---------------------------------------------------------------------------------------
# The command: merge counts for an ordered entry.
# ---------------------------------------------------------------------------------------


def merge_command(argv: Optional[Sequence[str]] = None) -> str:
    """``merge --config C --out FILE COUNTS...``: sum the counts (files, or folders such as
    $DLRM_ID_COUNTS_DIR), check them against the config, write FILE, and write next to it
    the config with ``id_counts`` set (``<FILE>.config.json``), ready for
    ``create_dlrm_mar.sh --config ... --table-store DIR``. Returns that config's path."""
    parser = argparse.ArgumentParser(prog="python dlrm_row_order.py merge", description=merge_command.__doc__)
    parser.add_argument("counts", nargs="+", help="id counts files, or folders of them")
    parser.add_argument("--config", required=True, help="the model config the counts are for")
    parser.add_argument("--out", required=True, help="the merged id counts file to write")
    args = parser.parse_args(argv)
    from dlrm_factory import read_config_source, resolve_model_config

    config = read_config_source(args.config)
    cfg = resolve_model_config({**config, "id_counts": None})
    files = counts_files(args.counts)
    tables, counts, samples = merge_counts(files)
    out = os.path.abspath(args.out)
    write_counts(out, tables, counts, samples)
    check_counts(out, cfg["id_list_features_keys"], cfg["num_embeddings_per_feature"])
    config_path = f"{out}.config.json"
    with open(config_path, "w") as f:
        json.dump({**config, "id_counts": out}, f, indent=2)
    distinct = sum(ids.size for ids, _ in counts.values())
    print(f"merged {len(files)} counts files ({samples} samples, {distinct} distinct ids) into {out}")
    print(f"config with id_counts: {config_path}")
    return config_path


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "merge":
        sys.exit("usage: python dlrm_row_order.py merge --config CONFIG --out FILE COUNTS...")
    merge_command(sys.argv[2:])
