"""Table store benchmark, part 1: tables larger than RAM. A Zipf-distributed id workload on
a model whose table store entry starts out of the page cache and may not fit in memory,
next to the same workload with the entry resident.

    .venv/bin/python benchmarks/bench_store.py --baseline        # full default, ordered entry, ~12 min
    .venv/bin/python benchmarks/bench_store.py --alpha 0.9        # flatter ids
    .venv/bin/python benchmarks/bench_store.py --drift 0.2        # 20 % of the ranks changed ids since counted
    .venv/bin/python benchmarks/bench_store.py --order none       # the unordered entry, as before
    .venv/bin/python benchmarks/bench_store.py --pin-mb 3200      # a pinned hot tier of 3.2 GB
    .venv/bin/python benchmarks/bench_store.py sizing --alpha 1.05  # RAM for a hit rate (no run)
    .venv/bin/python benchmarks/bench_store.py verify             # the background check's window
    .venv/bin/python benchmarks/bench_store.py resident --seconds 40 --warmup 10 --plot benchmarks/plots/bench_store_resident.png
                                                                  # resident: ordered + prefetch vs unordered, interleaved
    .venv/bin/python benchmarks/bench_store.py --quick            # small tables, ~1 min

What runs:
1. The entry of ``--config`` (default model_config.json, on the CPU) in ``--store``, built
   first if missing (DLRMFactory with ``table_store``). With ``--order counts`` (the
   default) the ids of ``--count-samples`` samples of the same distribution are counted
   from their own stream (seed 1; the measured stream is seed 0: the order never sees the
   measured batches), and the ordered entry (config ``id_counts``) is built from them.
2. In a fresh process each, the same stream of batches (``--batch`` one-hot samples, the
   served model: ``optimize_for_inference``, 1 torch thread), for ``--seconds``:
   - ``baseline`` (``--baseline``): the unordered entry resident, no prefetch: as before;
   - ``resident``: the entry read into the page cache first;
   - ``cold``: the entry's pages dropped from the page cache first
     (``posix_fadvise(DONTNEED)``), and the process placed in a memory cgroup capped at
     ``--memory-limit`` (RAM smaller than the entry: the kernel must evict table pages to
     bring others in). Without a writable memory cgroup the cap is skipped and said so.
   ``--prefetch`` on (the store's default): a batch's missing pages are asked for together
   before its lookup. ``--pin-mb`` (``DLRM_STORE_PIN_MB``): the ordered entry's maps and
   hottest rows locked in memory, in both runs. The batches are an endless stream (never one twice: a repeated set
   would end its misses after one pass), drawn in chunks outside the timed model calls.
   Every second: samples/s over the time spent in model calls, p99 of the batches'
   latency, the entry's resident fraction (``mincore``: pages in the page cache / pages of
   the file) and disk reads a sample (pages the prefetch asked for + the lookups' major faults).
3. A table of the windows and a plot (benchmarks/plots/bench_store.png), then the summary
   line: after warm-up (``--warmup`` seconds), the cold run's median samples/s over the
   resident run's, and the largest resident fraction meanwhile; the last line
   ``ltr: resident=R cold=C ratio=X resident_fraction=F p99_ratio=P``.

``resident``: the resident cost of order and prefetch, interleaved: ``--rounds`` rounds, each
running the unordered entry without prefetch and the ordered one with it (each read into the
page cache first, the other dropped), in alternating order; a table of each round's median
samples/s after ``--warmup`` and their ratio, and the JSON next to ``--plot``.

Ids: for each table of R rows, rank k in 1..R is drawn with probability ~ k^-alpha (alpha =
1.05 like real click logs; continuous inverse-CDF of the bounded power law), and rank k is
row (k * m + 12345) mod R with m coprime with R near R/1.618: hot ids scattered over the
table as hashed ids are, not packed into a few pages. ``--hot-rows first`` puts rank k at
row k - 1 instead. ``--drift D``: the measured traffic's popularity has moved since the
counted period: a fraction D of the ranks (at every popularity level) belong to other ids,
cold when counted. Dense features uniform on [0, 1).

Why scattered hot rows are hard: a 68 B row costs the page cache a 4 KiB page, so a page
cache of C bytes holds only the ~C/4096 hottest rows; ordered, 60 hot rows share a page.
``sizing`` computes the RAM a hit rate needs either way (``sizing``: the hottest pages, as an
ideal cache keeps them).
"""

import argparse
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dlrm_table_store import default_store_dir, resident_pages  # noqa: E402

PLOT = os.path.join(REPO, "benchmarks", "plots", "bench_store.png")
CGROUP_NAME = "dlrm-bench-store"
CHUNK_BATCHES = 256  # batches drawn at once (outside the timed model calls)
PAGE = 4096
COUNT_CHUNK = 1 << 22  # ids drawn at once when counting


# --- the workload ---------------------------------------------------------------------------


def zipf_rows(rng: np.random.Generator, rows: int, count: int, alpha: float, scattered: bool = True,
              drift: float = 0.0) -> np.ndarray:  # fmt: skip
    """``count`` row ids of a table of ``rows`` rows: ranks ~ k^-alpha on 1..rows, scattered
    over the table (hashed ids), or rank k = row k - 1 (``scattered=False``: hot rows first,
    the layout of a table whose rows are ordered by frequency).

    ``drift``: the popularity has moved since a period without drift: that fraction of the
    ranks, at every popularity level (a fixed pseudo-random choice of ranks), belong to
    other ids now, ids half the table away in rank (cold in that period)."""
    u = rng.random(count)
    if rows == 1:
        return np.zeros(count, dtype=np.int64)
    top = float(rows + 1) ** (1.0 - alpha)
    ranks = np.floor((1.0 + u * (top - 1.0)) ** (1.0 / (1.0 - alpha))).astype(np.int64)
    ranks = np.clip(ranks, 1, rows)
    if drift:
        moved = (ranks * 2654435761 % 2**32) < drift * 2**32  # the same ranks in every batch
        ranks = np.where(moved, (ranks - 1 + rows // 2) % rows + 1, ranks)
    return (ranks * scatter_multiplier(rows) + 12345) % rows if scattered else ranks - 1


def scatter_multiplier(rows: int) -> int:
    """A multiplier coprime with ``rows`` near rows/golden ratio (Fibonacci hashing): rank ->
    rank * m mod rows is a bijection that puts consecutive ranks far apart."""
    m = max(1, int(rows * 0.6180339887)) | 1
    while math.gcd(m, rows) != 1:
        m += 2 if rows % 2 == 0 else 1
    return m


def make_batches(rng: np.random.Generator, table_rows: List[int], dense_features: int, batch: int, count: int,
                 alpha: float, scattered: bool = True, drift: float = 0.0) -> Tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The next ``count`` batches of ``rng``'s stream: (dense [count, batch, N] float32,
    ids [count, F, batch] int64, key-major per batch)."""
    dense = rng.random((count, batch, dense_features), dtype=np.float32)
    ids = np.stack([zipf_rows(rng, rows, count * batch, alpha, scattered, drift).reshape(count, batch)
                    for rows in table_rows], axis=1)  # fmt: skip
    return dense, ids


def write_id_counts(path: str, features: List[str], table_rows: List[int], samples: int, alpha: float,
                    scattered: bool, seed: int = 1) -> None:  # fmt: skip
    """The id counts file of ``samples`` samples of the workload's distribution, drawn from
    their own stream (``seed``; the measured stream is seed 0): what a day of counted
    traffic or the training data gives the order, never the measured batches."""
    from dlrm_row_order import write_counts

    rng = np.random.default_rng(seed)
    counts = {}
    for feature, rows in zip(features, table_rows):
        seen = np.zeros(rows, dtype=np.int64)
        for start in range(0, samples, COUNT_CHUNK):
            seen += np.bincount(zipf_rows(rng, rows, min(COUNT_CHUNK, samples - start), alpha, scattered), minlength=rows)
        ids = np.flatnonzero(seen)
        counts[feature] = (ids.astype(np.int64), seen[ids])
    write_counts(path, list(zip(features, table_rows)), counts, samples)


# --- residency --------------------------------------------------------------------------------

def resident_fraction(path: str) -> float:
    """Pages of ``path`` in the page cache / pages of the file (``mincore``, through the
    store's ``resident_pages``)."""
    with open(path, "rb") as f:
        return float(resident_pages(f.fileno(), 0, os.path.getsize(path)).mean())


def drop_from_page_cache(path: str) -> None:
    """Evict the file's clean, unmapped pages (all of them, once no process maps it)."""
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def read_into_page_cache(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


# --- a memory cgroup for the cold run ----------------------------------------------------------


def memory_cgroup(limit_bytes: int) -> Tuple[Optional[str], str]:
    """A child of this process's memory cgroup capped at ``limit_bytes`` (cgroup v1 or v2):
    (its cgroup.procs path, what was done) or (None, why not)."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = [line.strip().split(":", 2) for line in f]
    except OSError as e:
        return None, f"no /proc/self/cgroup ({e})"
    candidates = []
    for _, controllers, path in lines:
        if "memory" in controllers.split(","):
            candidates.append((os.path.join("/sys/fs/cgroup/memory", path.lstrip("/")), "memory.limit_in_bytes"))
        if controllers == "":
            candidates.append((os.path.join("/sys/fs/cgroup", path.lstrip("/")), "memory.max"))
    errors = []
    for parent, limit_file in candidates:
        child = os.path.join(parent, CGROUP_NAME)
        try:
            os.makedirs(child, exist_ok=True)
            with open(os.path.join(child, limit_file), "w") as f:
                f.write(str(limit_bytes))
            return os.path.join(child, "cgroup.procs"), f"capped at {limit_bytes / 2**30:.1f} GiB ({child})"
        except OSError as e:
            errors.append(f"{child}: {e.strerror}")
    return None, "no writable memory cgroup (" + "; ".join(errors or ["none found"]) + "): RAM not capped"


# --- one run (a child process) -----------------------------------------------------------------


def run_workload(args: argparse.Namespace) -> None:
    """Child process: map the model, run the batches for --seconds, print one JSON per window."""
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from dlrm_factory import DLRMFactory, resolve_model_config
    from dlrm_lean_forward import optimize_for_inference

    torch.set_num_threads(1)
    config = {**json.loads(args.config_json), "table_store": args.store}
    started = time.perf_counter()
    model = optimize_for_inference(DLRMFactory(config))
    cfg = resolve_model_config(config)
    path = model.table_store_entry["path"]
    prefetchers = getattr(model, "page_prefetchers", [])
    print(json.dumps({"event": "mapped", "seconds": time.perf_counter() - started, "path": path,
                      "built": model.table_store_entry["built"], "resident": resident_fraction(path),
                      "prefetch": bool(prefetchers), "pinned": getattr(model, "pinned_rows", None) is not None}), flush=True)  # fmt: skip
    keys = cfg["id_list_features_keys"]
    lengths = torch.ones(len(keys) * args.batch, dtype=torch.int64)
    rng = np.random.default_rng(0)  # the same endless stream in every run: no batch comes twice
    window_start = run_start = time.perf_counter()
    latencies: List[float] = []
    reads_before = lookup_before = 0
    with torch.inference_mode():
        while True:
            dense, ids = make_batches(rng, cfg["num_embeddings_per_feature"], cfg["dense_in_features"], args.batch,
                                      CHUNK_BATCHES, args.alpha, args.hot_rows == "scattered", args.drift)  # fmt: skip
            for i in range(CHUNK_BATCHES):
                kjt = KeyedJaggedTensor(keys=keys, values=torch.from_numpy(ids[i].reshape(-1)), lengths=lengths)
                t = time.perf_counter()
                model(torch.from_numpy(dense[i]), kjt)
                now = time.perf_counter()
                latencies.append(now - t)
                if now - window_start >= 1.0:
                    reads = sum(p.stats["asked"] + p.stats["lookup_reads"] for p in prefetchers)
                    lookup_reads = sum(p.stats["lookup_reads"] for p in prefetchers)
                    print(json.dumps({
                        "event": "window", "t": round(now - run_start, 2),
                        "samples_per_s": len(latencies) * args.batch / sum(latencies),  # model time only
                        "p99_ms": float(np.percentile(latencies, 99)) * 1000, "resident": resident_fraction(path),
                        "reads_per_sample": (reads - reads_before) / (len(latencies) * args.batch),
                        "lookup_reads_per_sample": (lookup_reads - lookup_before) / (len(latencies) * args.batch),
                        "prefetching": any(p.active for p in prefetchers),
                    }), flush=True)  # fmt: skip
                    window_start, latencies, reads_before, lookup_before = now, [], reads, lookup_reads
                    if now - run_start >= args.seconds:
                        return


def run_child(args: argparse.Namespace, config: Dict[str, Any], cgroup_procs: Optional[str],
              prefetch: bool) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:  # fmt: skip
    """Run the workload in a fresh process (in the cgroup, if given): (mapped event, windows)."""
    command = [sys.executable, os.path.abspath(__file__), "_run", "--config-json", json.dumps(config), "--store", args.store,
               "--seconds", str(args.seconds), "--batch", str(args.batch), "--alpha", str(args.alpha),
               "--hot-rows", args.hot_rows, "--drift", str(args.drift)]  # fmt: skip

    def enter_cgroup() -> None:
        if cgroup_procs:
            with open(cgroup_procs, "w") as f:
                f.write(str(os.getpid()))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "DLRM_STORE_PREFETCH": "1" if prefetch else "0", "DLRM_STORE_PIN_MB": str(args.pin_mb)}
    run = subprocess.run(command, preexec_fn=enter_cgroup, capture_output=True, text=True, env=env, timeout=args.seconds + 1800)
    events = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    if run.returncode != 0 or not events:
        sys.exit(f"workload process failed ({run.returncode}):\n{run.stderr[-3000:]}")
    return events[0], events[1:]


# --- sizing: how much RAM a hit rate needs ------------------------------------------------------


def page_heat(rows: int, row_bytes: int, alpha: float, ordered: bool) -> np.ndarray:
    """Each 4 KiB page's share of a table's lookups (the workload's Zipf law), rows laid out
    hottest first (``ordered``) or scattered as hashed ids are (``zipf_rows``'s bijection)."""
    ranks = np.arange(1, rows + 1, dtype=np.float64)
    if rows == 1:
        share = np.ones(1)
    else:  # P(rank = k) of the continuous inverse-CDF draw
        a = 1.0 - alpha
        share = np.diff(((np.concatenate([[1.0], ranks + 1.0])) ** a - 1.0) / ((rows + 1.0) ** a - 1.0))
    row = np.arange(rows, dtype=np.int64) if ordered else (ranks.astype(np.int64) * scatter_multiplier(rows) + 12345) % rows
    return np.bincount(row * row_bytes // PAGE, weights=share, minlength=-(-rows * row_bytes // PAGE))


def sizing(table_rows: List[int], row_bytes: int, alpha: float, hit_rates: List[float]) -> List[Dict[str, float]]:
    """RAM for each page-cache hit rate of the workload's lookups, for ordered and scattered
    rows: the hottest pages of all tables, as an ideal cache would keep them (an LRU keeps
    close to it for a stationary workload; measured in the README). The ordered entry's maps
    (4 B an id, looked up at every id) count as resident."""
    result = []
    for ordered in (True, False):
        heat = np.sort(np.concatenate([page_heat(r, row_bytes, alpha, ordered) for r in table_rows]))[::-1]
        covered = np.cumsum(heat) / len(table_rows)  # the share of all lookups hitting the first n pages
        maps = 4 * sum(table_rows) if ordered else 0
        for rate in hit_rates:
            pages = int(np.searchsorted(covered, rate)) + 1
            result.append({"layout": "ordered" if ordered else "scattered", "hit_rate": rate,
                           "ram_gib": (pages * PAGE + maps) / 2**30, "misses_per_sample": (1 - rate) * len(table_rows)})  # fmt: skip
    return result


def sizing_main(args: argparse.Namespace, table_rows: List[int], row_bytes: int) -> None:
    print(f"RAM for a page-cache hit rate: {len(table_rows)} tables, {sum(table_rows):,} rows of {row_bytes} B, "
          f"Zipf alpha {args.alpha} (hot ids scattered over each table when not ordered)")  # fmt: skip
    print("| hit rate | misses a sample | RAM, ordered entry (rows + maps) | RAM, scattered rows |")
    print("| ---: | ---: | ---: | ---: |")
    rows = sizing(table_rows, row_bytes, args.alpha, args.hit_rates)
    for ordered, scattered in zip(rows[: len(args.hit_rates)], rows[len(args.hit_rates) :]):
        print(f"| {ordered['hit_rate']:.1%} | {ordered['misses_per_sample']:.2f} | {ordered['ram_gib']:.2f} GiB | "
              f"{scattered['ram_gib']:.2f} GiB |")  # fmt: skip


# --- the background check's window --------------------------------------------------------------


def verify_window(args: argparse.Namespace, config: Dict[str, Any]) -> None:
    """Seconds from a worker's start (``DLRMFactory`` mapping the entry, as the handler's
    ``initialize`` does) until the background check (``verify_every_block``, what
    ``verify_in_background``'s thread runs) has read every block at the default rate, and
    the entry's share of the page cache before and after (dropped first: it should stay out)."""
    from dlrm_factory import DLRMFactory
    from dlrm_table_store import VERIFY_BYTES_PER_S, checked_in_background, file_identity, verify_every_block

    path = run_child(argparse.Namespace(**{**vars(args), "seconds": 0}), config, None, False)[0]["path"]
    drop_from_page_cache(path)
    before = resident_fraction(path)
    started = time.perf_counter()
    model = DLRMFactory({**config, "table_store": args.store})
    mapped = time.perf_counter() - started
    problem = verify_every_block(path, file_identity(path), VERIFY_BYTES_PER_S)
    window = time.perf_counter() - started
    after = resident_fraction(path)
    del model
    print(f"{path} ({os.path.getsize(path) / 1e9:.2f} GB, checked by sample at open: {checked_in_background(path)}): "
          f"mapped {mapped:.1f} s after start, every block verified {window:.0f} s after start at "
          f"{VERIFY_BYTES_PER_S / 1e6:.0f} MB/s ({problem or 'no bad block'}); entry in the page cache {before:.1%} before, "
          f"{after:.1%} after")  # fmt: skip


# --- report ------------------------------------------------------------------------------------


def summarize(resident: List[Dict[str, Any]], cold: List[Dict[str, Any]], warmup: float) -> Dict[str, float]:
    after = lambda windows: [w for w in windows if w["t"] > warmup]  # noqa: E731
    r, c = after(resident), after(cold)
    return {
        "resident_samples_per_s": statistics.median(w["samples_per_s"] for w in r),
        "cold_samples_per_s": statistics.median(w["samples_per_s"] for w in c),
        "ratio": statistics.median(w["samples_per_s"] for w in c) / statistics.median(w["samples_per_s"] for w in r),
        "resident_p99_ms": statistics.median(w["p99_ms"] for w in r),
        "cold_p99_ms": statistics.median(w["p99_ms"] for w in c),
        "cold_max_resident": max(w["resident"] for w in c),
        "cold_reads_per_sample": statistics.median(w.get("reads_per_sample", 0.0) for w in c),
        "cold_lookup_reads_per_sample": statistics.median(w.get("lookup_reads_per_sample", 0.0) for w in c),
        "first_cold_samples_per_s": cold[0]["samples_per_s"],
    }


def markdown(resident: List[Dict[str, Any]], cold: List[Dict[str, Any]], every: int) -> str:
    lines = ["| t (s) | resident: samples/s | p99 ms | cold: samples/s | p99 ms | cold: entry resident | cold: disk reads a sample |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for k, (r, c) in enumerate(zip(resident, cold)):
        if k % every == 0 or k == len(cold) - 1:
            lines.append(f"| {c['t']:.0f} | {r['samples_per_s']:,.0f} | {r['p99_ms']:.2f} | {c['samples_per_s']:,.0f} | "
                         f"{c['p99_ms']:.2f} | {c['resident']:.1%} | {c.get('reads_per_sample', 0.0):.3f} |")  # fmt: skip
    return "\n".join(lines)


def plot(resident: List[Dict[str, Any]], cold: List[Dict[str, Any]], title: str, warmup: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rate, ax_p99) = plt.subplots(1, 2, figsize=(11, 4.2))
    for windows, label, color in ((resident, "entry resident", "tab:gray"), (cold, "entry cold, RAM capped", "tab:blue")):
        ax_rate.plot([w["t"] for w in windows], [w["samples_per_s"] for w in windows], "-", color=color, label=label)
        ax_p99.plot([w["t"] for w in windows], [w["p99_ms"] for w in windows], "-", color=color, label=label)
    share = ax_rate.twinx()
    share.plot([w["t"] for w in cold], [100 * w["resident"] for w in cold], ":", color="tab:orange", label="cold: entry resident (%)")
    share.set_ylim(0, 100)
    share.set_ylabel("entry resident (%)")
    for ax, ylabel in ((ax_rate, "samples/s"), (ax_p99, "p99 batch latency (ms)")):
        ax.axvline(warmup, color="k", alpha=0.2)
        ax.set_xlabel("seconds")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax_rate.set_ylim(bottom=0)
    ax_p99.set_yscale("log")
    lines = ax_rate.get_legend_handles_labels()
    extra = share.get_legend_handles_labels()
    ax_rate.legend(lines[0] + extra[0], lines[1] + extra[1], fontsize=8, loc="lower right")
    ax_p99.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)


def plot_title(entry: str, size: int, order: str, args: argparse.Namespace, how: str) -> str:
    return (f"{entry} ({size / 1e9:.1f} GB, {order})\nZipf alpha {args.alpha} ({args.hot_rows} hot ids"
            f"{f', drift {args.drift:.0%}' if args.drift else ''}), batch {args.batch}, 1 thread, prefetch {args.prefetch}"
            f"{f', pinned {args.pin_mb:.0f} MB' if args.pin_mb else ''}; "
            f"cold run: {how.split(' (')[0]}")  # fmt: skip


def parse_size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="paging", choices=["paging", "sizing", "verify", "resident", "_run"])
    parser.add_argument("--config", default=os.path.join(REPO, "model_config.json"), help="model config JSON (served on the CPU)")
    parser.add_argument("--store", default=default_store_dir(),
                        help="table store directory (default: serving's, $DLRM_TABLE_STORE or ~/.cache/dlrm/table_store)")
    parser.add_argument("--memory-limit", default="4G", help="RAM cap of the cold run (a memory cgroup), e.g. 4G")
    parser.add_argument("--seconds", type=float, default=120, help="length of each run")
    parser.add_argument("--warmup", type=float, default=60, help="seconds before the summary's windows")
    parser.add_argument("--batch", type=int, default=32, help="samples per batch (the served batchSize)")
    parser.add_argument("--alpha", type=float, default=1.05, help="Zipf exponent of the ids")
    parser.add_argument("--hot-rows", choices=["scattered", "first"], default="scattered",
                        help="where the hot ids are: scattered over each table (hashed ids, the default), or the "
                             "first rows of an unordered entry")  # fmt: skip
    parser.add_argument("--order", choices=["counts", "none"], default="counts",
                        help="counts: the entry ordered by the id counts of --count-samples samples of a separate "
                             "stream of the same distribution (never the measured one); none: the unordered entry")  # fmt: skip
    parser.add_argument("--count-samples", type=int, default=64_000_000, help="samples counted for the order")
    parser.add_argument("--drift", type=float, default=0.0,
                        help="share of the ranks whose ids changed between the counted period and the measured one")
    parser.add_argument("--prefetch", choices=["on", "off"], default="on",
                        help="a batch's missing pages asked for together before its lookup (the store's default: on)")
    parser.add_argument("--rounds", type=int, default=3, help="resident: rounds of the interleaved comparison")
    parser.add_argument("--pin-mb", type=float, default=0,
                        help="DLRM_STORE_PIN_MB of the runs: MB of the ordered entry's maps and hottest rows locked in memory")
    parser.add_argument("--baseline", action="store_true",
                        help="also run the unordered entry, resident, without prefetch: the throughput before ordering")
    parser.add_argument("--keep-ordered", action="store_true", help="keep the ordered entry (default: deleted after the runs)")
    parser.add_argument("--hit-rates", type=float, nargs="+", default=[0.9, 0.95, 0.98, 0.99, 0.995],
                        help="sizing: the hit rates to size RAM for")
    parser.add_argument("--quick", action="store_true", help="small tables, 20 s runs: a smoke test")
    parser.add_argument("--plot", default=PLOT)
    parser.add_argument("--config-json", help=argparse.SUPPRESS)
    return parser.parse_args()


def ordered_entry(args: argparse.Namespace, config: Dict[str, Any], cfg: Dict[str, Any]) -> str:
    """The ordered entry's path, built if missing from the counts of ``--count-samples`` samples
    of a separate stream (counted first if missing); sets ``config["id_counts"]``."""
    tables = hashlib.sha256(json.dumps(cfg["num_embeddings_per_feature"]).encode()).hexdigest()[:8]  # --quick's differ
    counts = os.path.join(args.store, "bench_counts",
                          f"alpha{args.alpha}-{args.hot_rows}-n{args.count_samples}-tables{tables}.safetensors")  # fmt: skip
    if not os.path.exists(counts):
        os.makedirs(os.path.dirname(counts), exist_ok=True)
        started = time.perf_counter()
        write_id_counts(counts, cfg["id_list_features_keys"], cfg["num_embeddings_per_feature"], args.count_samples,
                        args.alpha, args.hot_rows == "scattered")  # fmt: skip
        print(f"   counted {args.count_samples:,} samples of a separate stream in {time.perf_counter() - started:.1f} s: {counts}")
    config["id_counts"] = counts
    mapped, _ = run_child(argparse.Namespace(**{**vars(args), "seconds": 0}), config, None, False)
    print(f"   ordered: {mapped['path']}: {os.path.getsize(mapped['path']) / 1e9:.2f} GB "
          f"({'built' if mapped['built'] else 'found'} in {mapped['seconds']:.1f} s)", flush=True)  # fmt: skip
    return mapped["path"]


def resident_ab(args: argparse.Namespace, config: Dict[str, Any], plain: str, ordered: str) -> None:
    """The resident cost of order and prefetch, interleaved: each round runs the unordered
    entry without prefetch (as before ordering) and the ordered one with it, each read into
    the page cache first (the other dropped: RAM may not hold both), in alternating order;
    the median samples/s after ``--warmup`` of each run, and the ratio of each round."""
    variants = {"unordered": ({**config, "id_counts": None}, plain, False), "ordered": (config, ordered, True)}
    rows = []
    for k in range(args.rounds):
        medians = {}
        for name in (["unordered", "ordered"] if k % 2 == 0 else ["ordered", "unordered"]):
            variant_config, path, prefetch = variants[name]
            drop_from_page_cache(ordered if path == plain else plain)
            read_into_page_cache(path)
            windows = run_child(args, variant_config, None, prefetch)[1]
            medians[name] = statistics.median(w["samples_per_s"] for w in windows if w["t"] > args.warmup)
            print(f"   round {k + 1}, {name}: {medians[name]:,.0f} samples/s", flush=True)
        rows.append({**medians, "ratio": medians["ordered"] / medians["unordered"]})
    print("| round | unordered, no prefetch: samples/s | ordered + prefetch: samples/s | ratio |")
    print("| ---: | ---: | ---: | ---: |")
    for k, row in enumerate(rows):
        print(f"| {k + 1} | {row['unordered']:,.0f} | {row['ordered']:,.0f} | {row['ratio']:.3f}× |")
    ratios = sorted(row["ratio"] for row in rows)
    print(f"ordered + prefetch, resident: median ratio {statistics.median(ratios):.3f}x the unordered entry "
          f"(rounds: {', '.join(f'{r:.3f}' for r in ratios)})")  # fmt: skip
    with open(os.path.splitext(args.plot)[0] + ".json", "w") as f:
        json.dump({"args": {k: v for k, v in vars(args).items() if k != "config_json"}, "rounds": rows}, f, indent=1)


def main() -> None:
    args = parse_args()
    if args.mode == "_run":
        return run_workload(args)
    from dlrm_factory import read_config_source, resolve_model_config, row_bytes

    config = read_config_source(args.config)
    config["device"] = "cpu"
    if args.quick:
        config["num_embeddings_per_feature"] = [min(rows, 200_000) for rows in config["num_embeddings_per_feature"]]
        args.seconds, args.warmup, args.memory_limit = 20, 5, args.memory_limit if "--memory-limit" in sys.argv else "1G"
    config.pop("table_store", None)
    cfg = resolve_model_config({**config, "id_counts": None})
    if args.mode == "sizing":
        return sizing_main(args, cfg["num_embeddings_per_feature"], row_bytes(cfg, "cpu"))
    if args.mode == "verify":
        return verify_window(args, config)
    limit = parse_size(args.memory_limit)
    prefetch = args.prefetch == "on"

    print(f"== entry for {args.config}{' (quick: tables capped at 200,000 rows)' if args.quick else ''} in {args.store}", flush=True)
    plain, _ = run_child(argparse.Namespace(**{**vars(args), "seconds": 0}), config, None, False)
    print(f"   {plain['path']}: {os.path.getsize(plain['path']) / 1e9:.2f} GB ({'built' if plain['built'] else 'found'} "
          f"in {plain['seconds']:.1f} s)", flush=True)  # fmt: skip
    if args.mode == "resident":
        return resident_ab(args, config, plain["path"], ordered_entry(args, config, cfg))
    baseline = None
    if args.baseline:
        read_into_page_cache(plain["path"])
        print("== baseline: the unordered entry, resident, no prefetch (as before ordering)", flush=True)
        baseline = run_child(args, config, None, False)[1]
    path = ordered_entry(args, config, cfg) if args.order == "counts" else plain["path"]
    size = os.path.getsize(path)

    if path != plain["path"]:
        drop_from_page_cache(plain["path"])  # RAM for the ordered entry, as if it were the only one
    read_into_page_cache(path)
    print(f"== resident run: entry {resident_fraction(path):.0%} in the page cache, prefetch {args.prefetch}", flush=True)
    r_mapped, resident = run_child(args, config, None, prefetch)

    drop_from_page_cache(path)
    procs, how = memory_cgroup(limit)
    print(f"== cold run: entry {resident_fraction(path):.0%} in the page cache; RAM {how}", flush=True)
    c_mapped, cold = run_child(args, config, procs, prefetch)
    print(f"   model mapped in {c_mapped['seconds']:.1f} s with the entry cold (resident run: {r_mapped['seconds']:.1f} s)"
          f"{'; pinned ' + str(args.pin_mb) + ' MB' if c_mapped.get('pinned') else ''}")  # fmt: skip
    if args.pin_mb and not (c_mapped.get("pinned") and r_mapped.get("pinned")):
        sys.exit("--pin-mb: the workload could not lock its pinned tier (mlock refused: raise `ulimit -l`, or run with CAP_IPC_LOCK)")
    if args.order == "counts" and not args.keep_ordered:
        os.unlink(path)
        print(f"   deleted {path} (--keep-ordered keeps it)")

    every = max(1, len(cold) // 20)
    table = markdown(resident, cold, every)
    summary = summarize(resident, cold, args.warmup)
    print(table)
    order = f"ordered by {args.count_samples:,} counted samples" if args.order == "counts" else "unordered"
    title = plot_title(os.path.basename(path), size, order, args, how)
    plot(resident, cold, title, args.warmup, args.plot)
    print(f"plot: {args.plot}")
    print(f"after {args.warmup:.0f} s: cold {summary['cold_samples_per_s']:,.0f} samples/s = {summary['ratio']:.2f}x resident "
          f"({summary['resident_samples_per_s']:,.0f}), p99 {summary['cold_p99_ms']:.2f} ms vs {summary['resident_p99_ms']:.2f} ms, "
          f"entry resident at most {summary['cold_max_resident']:.1%}, {summary['cold_reads_per_sample']:.3f} disk reads a sample "
          f"({summary['cold_lookup_reads_per_sample']:.3f} not prefetched); "
          f"first second cold: {summary['first_cold_samples_per_s']:,.0f} samples/s")  # fmt: skip
    if baseline is not None:
        before = statistics.median(w["samples_per_s"] for w in baseline if w["t"] > args.warmup)
        summary["baseline_samples_per_s"] = before
        summary["resident_vs_baseline"] = summary["resident_samples_per_s"] / before
        print(f"resident, ordered + prefetch: {summary['resident_samples_per_s']:,.0f} samples/s = "
              f"{summary['resident_vs_baseline']:.3f}x the unordered entry without prefetch ({before:,.0f})")  # fmt: skip
    with open(os.path.splitext(args.plot)[0] + ".json", "w") as f:
        json.dump({"entry": path, "bytes": size, "memory": how, "args": {k: v for k, v in vars(args).items() if k != "config_json"},
                   "summary": summary, "baseline": baseline, "resident": resident, "cold": cold}, f, indent=1)  # fmt: skip
    print(f"ltr: resident={summary['resident_samples_per_s']:.0f} cold={summary['cold_samples_per_s']:.0f} "
          f"ratio={summary['ratio']:.2f} resident_fraction={summary['cold_max_resident']:.3f} "
          f"p99_ratio={summary['cold_p99_ms'] / summary['resident_p99_ms']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
