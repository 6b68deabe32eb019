"""The GPU worker's cold start from the table store, measured on the CPU: an entry whose pages
are not in the page cache, opened and copied into TBEs that own their weights with rows padded
to 16 B (what ``tables_from_store`` does on CUDA, with a CPU TBE standing in for the GPU's).

    .venv/bin/python benchmarks/bench_cold_copy.py              # 16M rows (1.09 GB entry), 3 rounds
    .venv/bin/python benchmarks/bench_cold_copy.py --rows 4000000 --rounds 1

Modes, each round in turn, the entry's pages dropped from the page cache before each
(``posix_fadvise(DONTNEED)``; ``mincore`` says how much stayed):
- ``before``: main before issue 17: ``open_entry`` advising ``MADV_RANDOM`` (no readahead:
  every 4 KiB page is its own read), then chunk after chunk copied;
- ``sequential, plain copy``: the open's ``MADV_SEQUENTIAL`` only;
- ``sequential, WILLNEED ahead``: and the next chunk asked for while one is copied;
- ``now`` (``copy_into_tbes``): and each copied chunk dropped from the process
  (``MADV_DONTNEED``).
Each: the open's seconds (cold; its CRC checks read blocks with pread), then - the pages
dropped again - the copy's seconds and GB/s from a cold page cache, and the entry's pages
this process still maps after (RSS of the mapping). A table, a plot (benchmarks/plots/bench_cold_copy.png), JSON with ``--out``.
The entry is built once in ``--store`` (a temp dir by default, removed after).
"""

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

from bench_store import drop_from_page_cache, resident_fraction  # noqa: E402
from fbgemm_gpu.split_embedding_configs import SparseType  # noqa: E402
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode  # noqa: E402
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen  # noqa: E402

import dlrm_table_store  # noqa: E402
from dlrm_factory import DLRMFactory, create_default_model_config  # noqa: E402

PLOT = os.path.join(REPO, "benchmarks", "plots", "bench_cold_copy.png")
CHUNK_ROWS = 1 << 18  # copy_into_tbes' default


def build_entry(store: str, rows: int) -> str:
    """The entry of a 4-table int8 config of ``rows`` rows (D = 64: 68 B a row), in ``store``."""
    config = create_default_model_config()
    config.update(num_embeddings_per_feature=[rows // 2, rows // 4, rows // 8, rows - rows // 2 - rows // 4 - rows // 8],
                  device="cpu", table_store=store)  # fmt: skip
    model = DLRMFactory(config)
    path = model.table_store_entry["path"]
    del model
    gc.collect()
    return path


def padded_tbes(entry: dlrm_table_store.Entry) -> List[IntNBitTableBatchedEmbeddingBagsCodegen]:
    """CPU TBEs of the entry's tables with rows padded to 16 B, as a GPU's are (allocated once)."""
    tbes = []
    for layout in entry.layouts:
        specs = [(t["name"], t["rows"], t["dim"], SparseType(t["dtype"]), EmbeddingLocation.HOST) for t in layout["tables"]]
        tbe = IntNBitTableBatchedEmbeddingBagsCodegen(embedding_specs=specs, pooling_mode=PoolingMode.SUM,
                                                      output_dtype=SparseType.FP32, device="cpu", row_alignment=16)  # fmt: skip
        tbe.initialize_weights()
        tbes.append(tbe)
    return tbes


Copy = Callable[[dlrm_table_store.Entry, List[IntNBitTableBatchedEmbeddingBagsCodegen]], None]


def plain_copy(willneed: bool) -> Copy:
    """main's copy_into_tbes before issue 17 (chunk after chunk, no advice), or with the next
    chunk asked for ahead (``willneed``) but nothing dropped: to tell the two advices apart."""

    def copy(entry: dlrm_table_store.Entry, tbes: List[IntNBitTableBatchedEmbeddingBagsCodegen]) -> None:
        for tbe, buffer, layout in zip(tbes, entry.tensors, entry.layouts):
            for (target, _), table in zip(tbe.split_embedding_weights(split_scale_shifts=False), layout["tables"]):
                width = table["row_bytes"]
                source = buffer[table["offset"] : table["offset"] + table["rows"] * width].view(table["rows"], width)
                for start in range(0, table["rows"], CHUNK_ROWS):
                    if willneed:
                        dlrm_table_store.advise(source[start + CHUNK_ROWS : start + 2 * CHUNK_ROWS], dlrm_table_store.MADV_WILLNEED)
                    target[start : start + CHUNK_ROWS, :width].copy_(source[start : start + CHUNK_ROWS])

    return copy


MODES: Dict[str, Any] = {
    "before: random, plain copy": ("random", plain_copy(willneed=False)),
    "sequential, plain copy": ("sequential", plain_copy(willneed=False)),
    "sequential, WILLNEED ahead": ("sequential", plain_copy(willneed=True)),
    "now: sequential, WILLNEED ahead, DONTNEED behind (copy_into_tbes)": ("sequential", dlrm_table_store.copy_into_tbes),
}


def mapped_rss_kb(path: str) -> int:
    """kB of ``path`` this process maps (Rss over its mappings, /proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and ":" not in fields[0]:
                inside = fields[-1] == path
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


def measure(path: str, digest: str, mode: str, tbes: List[IntNBitTableBatchedEmbeddingBagsCodegen]) -> Dict[str, Any]:
    """The open (its CRC checks read blocks with pread), then the pages dropped again, then
    the copy alone from a cold page cache: the part the advice is about."""
    access, copy = MODES[mode]
    gc.collect()  # no mapping of an earlier round left: its pages could not be dropped
    drop_from_page_cache(path)
    started = time.perf_counter()
    entry = dlrm_table_store.open_entry(path, digest, access=access)
    opened = time.perf_counter() - started
    drop_from_page_cache(path)
    resident = resident_fraction(path)
    started = time.perf_counter()
    copy(entry, tbes)
    seconds = time.perf_counter() - started
    result = {"mode": mode, "open_s": opened, "seconds": seconds, "gb_per_s": os.path.getsize(path) / 1e9 / seconds,
              "resident_before": resident, "mapped_after_mb": mapped_rss_kb(path) / 1024}  # fmt: skip
    del entry
    return result


def plot(rows: List[Dict[str, Any]], title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.6))
    ax.barh([r["mode"].split(" (")[0].replace(", DONTNEED", ",\nDONTNEED") for r in rows], [r["gb_per_s"] for r in rows],
            color=["#bbbbbb", "#99bbdd", "#6688bb", "#3366aa"])  # fmt: skip
    for i, r in enumerate(rows):
        ax.text(r["gb_per_s"], i, f" {r['gb_per_s']:.2f} GB/s ({r['seconds']:.1f} s)", va="center")
    ax.set_xlabel("cold copy, GB/s (median of rounds)")
    ax.set_xlim(0, max(r["gb_per_s"] for r in rows) * 1.45)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=16_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--store", help="where to build the entry (default: a temp dir, removed after)")
    parser.add_argument("--out", help="JSON of every run")
    parser.add_argument("--plot", default=PLOT)
    args = parser.parse_args()
    store = args.store or tempfile.mkdtemp(prefix="bench_cold_copy-", dir=os.path.expanduser("~"))
    try:
        path = build_entry(store, args.rows)
        size = os.path.getsize(path)
        digest = dlrm_table_store.key_digest(_key_of(path))
        tbes = padded_tbes(dlrm_table_store.open_entry(path, digest))
        runs = [measure(path, digest, mode, tbes) for _ in range(args.rounds) for mode in MODES]
    finally:
        if not args.store:
            shutil.rmtree(store, ignore_errors=True)
    table = [{"mode": mode, **{k: statistics.median(r[k] for r in runs if r["mode"] == mode)
                               for k in ("open_s", "seconds", "gb_per_s", "resident_before", "mapped_after_mb")}}
             for mode in MODES]  # fmt: skip
    print(f"\ncold copy of a {size / 1e9:.2f} GB entry into 16-B-row TBEs, median of {args.rounds} round(s):")
    print("| mode | open s | copy s | copy GB/s | resident before the copy | mapped after (MB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in table:
        print(f"| {r['mode']} | {r['open_s']:.2f} | {r['seconds']:.2f} | {r['gb_per_s']:.2f} | "
              f"{r['resident_before']:.1%} | {r['mapped_after_mb']:.0f} |")  # fmt: skip
    plot(table, f"cold table store copy, {size / 1e9:.2f} GB entry, {os.cpu_count()} cores, local ext4 (virtio)", args.plot)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"runs": runs, "table": table}, f, indent=2)


def _key_of(path: str) -> Dict[str, Any]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return json.loads(f.metadata()["key_json"])


if __name__ == "__main__":
    main()
