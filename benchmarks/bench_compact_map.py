"""What a compact id -> row map would cost a batch: the design named (not built) to close the
gap left in "Tables larger than RAM" (README), measured before anyone builds it.

    .venv/bin/python benchmarks/bench_compact_map.py            # the full default's 26 tables, ~30 s
    .venv/bin/python benchmarks/bench_compact_map.py --tiers 2 --batches 500

Today an ordered entry's map is fbgemm's ``index_remappings_array``: an int32 per id, 0.71 GB
for the full default's 177.9M rows, and hashed hot ids touch every page of it, so under a
4 GiB cap the map holds 0.71 GB the hottest rows could use. The compact map keeps, for each
table, ``--tiers`` tiers of hot ids (tier 0 the hottest); rows are laid out tier after tier,
each tier's ids in id order, then the ids in no tier, in id order::

    row of id i = tier_start[f, t] + rank of i among tier t's ids     i in tier t
                = hot[f] + i - (ids of any tier below i)              otherwise

found with one bitmap per tier and the tier's set bits before each 64-bit word (``rank``):
12 B per 64 ids per tier (0.19 B an id; 4 tiers: 133 MB instead of 712 MB). The tiers'
words and counts of one id sit next to each other ([words, tiers] arrays): one or two cache
lines an id, as fbgemm's map is one.

Measured, one thread, on batches of ``--batch`` one-hot samples of every table, fresh ids
each batch (uniform over each table: every lookup cache-cold, as hashed ids are beyond the
hottest): fbgemm's ``pruned_array_lookup`` on a full int32 map (today's path; the map's
values do not change its cost), the compact map in numpy, and in numba when it is installed
(not a dependency: ``pip install numba``). Before timing, the numpy and numba remaps are
checked against each other on the measured batches, and on small tables against the full map
the rule gives (``full_map``). Tier sizes: 2^16 ids, then 8 times more each tier, a table's
tiers together at most half of it; which ids are hot is drawn at random (hashed ids).
Prints a table and the last line ``compact_map: fbgemm_us=.. numpy_us=.. numba_us=..
map_mb=.. compact_mb=..``.
"""

import argparse
import json
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FIRST_TIER_IDS = 1 << 16
TIER_GROWTH = 8
ONE = np.uint64(1)


def draw_tiers(rng: np.random.Generator, rows: int, tiers: int) -> List[np.ndarray]:
    """Disjoint sorted id arrays, tier 0 first: FIRST_TIER_IDS, then TIER_GROWTH times more
    each, together at most half the table; random ids (hashed hot ids are)."""
    sizes, room = [], rows // 2
    for t in range(tiers):
        sizes.append(min(FIRST_TIER_IDS * TIER_GROWTH**t, room))
        room -= sizes[-1]
    edges = np.cumsum([0] + sizes) / rows
    u = rng.random(rows)
    return [np.flatnonzero((u >= edges[t]) & (u < edges[t + 1])) for t in range(tiers)]


def compact_map(rows: Sequence[int], tiers: Sequence[Sequence[np.ndarray]]) -> Dict[str, np.ndarray]:
    """The compact map of tables of ``rows`` with ``tiers[f][t]`` the sorted ids of table f's
    tier t: word base of each table, bits [words, tiers], rank [words, tiers] (set bits of the
    tier in the table's words before this one), tier_start [tables, tiers], hot [tables]."""
    words = [-(-r // 64) for r in rows]
    count = len(tiers[0])
    bits = np.zeros((sum(words), count), dtype=np.uint64)
    rank = np.zeros((sum(words), count), dtype=np.uint32)
    tier_start = np.zeros((len(rows), count), dtype=np.int64)
    hot = np.zeros(len(rows), dtype=np.int64)
    base = np.concatenate([[0], np.cumsum(words)]).astype(np.int64)
    for f, r in enumerate(rows):
        for t, ids in enumerate(tiers[f]):
            mask = np.zeros(words[f] * 64, dtype=bool)
            mask[ids] = True
            table_bits = np.packbits(mask, bitorder="little").view(np.uint64)
            bits[base[f] : base[f + 1], t] = table_bits
            per_word = np.bitwise_count(table_bits).astype(np.uint32)
            rank[base[f] : base[f + 1], t] = np.cumsum(per_word, dtype=np.uint32) - per_word
            tier_start[f, t] = hot[f]
            hot[f] += ids.size
    return {"base": base[:-1], "bits": bits, "rank": rank, "tier_start": tier_start, "hot": hot}


def remap_numpy(m: Dict[str, np.ndarray], table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Rows of ``ids`` (int64) of tables ``table``, numpy only."""
    w = m["base"][table] + (ids >> 6)
    b = (ids & 63).astype(np.uint64)[:, None]
    words = m["bits"][w]  # [n, tiers]: one gather of neighbouring words
    below = m["rank"][w].astype(np.int64) + np.bitwise_count(words & ((ONE << b) - ONE))
    inside = ((words >> b) & ONE).astype(bool)
    tier = inside.argmax(1)
    n = np.arange(ids.size)
    return np.where(inside[n, tier], m["tier_start"][table, tier] + below[n, tier], m["hot"][table] + ids - below.sum(1))


def full_map(m: Dict[str, np.ndarray], rows: Sequence[int]) -> List[np.ndarray]:
    """Each table's whole id -> row map by the rule (small tables: checks)."""
    return [remap_numpy(m, np.full(r, f), np.arange(r, dtype=np.int64)) for f, r in enumerate(rows)]


def numba_remap() -> Optional[Callable[..., None]]:
    """The same remap compiled by numba (a loop an id, SWAR popcount), or None if numba is
    not installed."""
    try:
        import numba
    except ImportError:
        return None

    @numba.njit(nogil=True, cache=False)
    def popcount(v: Any) -> Any:
        v = v - ((v >> np.uint64(1)) & np.uint64(0x5555555555555555))
        v = (v & np.uint64(0x3333333333333333)) + ((v >> np.uint64(2)) & np.uint64(0x3333333333333333))
        v = (v + (v >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
        return (v * np.uint64(0x0101010101010101)) >> np.uint64(56)

    @numba.njit(nogil=True, cache=False)
    def remap(base: Any, bits: Any, rank: Any, tier_start: Any, hot: Any, table: Any, ids: Any, out: Any) -> None:
        for i in range(ids.size):
            f, x = table[i], ids[i]
            w = base[f] + (x >> 6)
            b = np.uint64(x & 63)
            low = (np.uint64(1) << b) - np.uint64(1)
            below_all, row = 0, -1
            for t in range(bits.shape[1]):
                word = bits[w, t]
                below = np.int64(rank[w, t]) + np.int64(popcount(word & low))
                if row < 0 and (word >> b) & np.uint64(1):
                    row = tier_start[f, t] + below
                below_all += below
            out[i] = row if row >= 0 else hot[f] + x - below_all

    return remap


def per_batch_us(fn: Callable[[int], Any], batches: int, passes: int = 3) -> float:
    """Microseconds a batch, the best of ``passes`` passes over the batches."""
    best = float("inf")
    for _ in range(passes):
        started = time.perf_counter()
        for k in range(batches):
            fn(k)
        best = min(best, (time.perf_counter() - started) / batches * 1e6)
    return best


def run(rows: Sequence[int], tiers: int, batch: int, batches: int, seed: int = 0) -> Dict[str, Any]:
    """Build the maps, check the remaps agree, time them; the figures."""
    import torch

    import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)

    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    m = compact_map(rows, [draw_tiers(rng, r, tiers) for r in rows])
    table = np.repeat(np.arange(len(rows)), batch)  # feature-major, as a TBE sees a KJT
    limits = np.asarray(rows, dtype=np.int64)[table]
    ids = [(rng.random(table.size) * limits).astype(np.int64) for _ in range(batches)]
    expected = [remap_numpy(m, table, x) for x in ids]
    table_offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
    if sum(rows) <= 10_000_000:  # the rule, whole: each table's map is a permutation of its rows
        maps = full_map(m, rows)
        assert all(np.array_equal(np.sort(mp), np.arange(r)) for mp, r in zip(maps, rows))
        whole = np.concatenate(maps)
        assert all(np.array_equal(e, whole[table_offsets[table] + x]) for e, x in zip(expected, ids))

    # today: fbgemm's map, an int32 an id (the same bytes touched, whatever the values)
    offsets_of_tables = torch.from_numpy(table_offsets)
    full = torch.arange(int(sum(rows)), dtype=torch.int32) - torch.repeat_interleave(offsets_of_tables[:-1].to(torch.int32), torch.tensor(rows))
    bag_offsets = torch.arange(table.size + 1, dtype=torch.int32)
    indices = [torch.from_numpy(x.astype(np.int32)) for x in ids]
    fbgemm_us = per_batch_us(lambda k: torch.ops.fbgemm.pruned_array_lookup(indices[k], bag_offsets, full, offsets_of_tables), batches)
    numpy_us = per_batch_us(lambda k: remap_numpy(m, table, ids[k]), batches)
    compiled, numba_us = numba_remap(), None
    if compiled is not None:
        out = np.empty(table.size, dtype=np.int64)
        args = (m["base"], m["bits"], m["rank"], m["tier_start"], m["hot"], table)
        for k in range(batches):
            compiled(*args, ids[k], out)
            assert np.array_equal(out, expected[k]), "numba and numpy remaps disagree"
        numba_us = per_batch_us(lambda k: compiled(*args, ids[k], out), batches)
    return {
        "tables": len(rows), "rows": int(sum(rows)), "tiers": tiers, "batch": batch, "ids_a_batch": int(table.size),
        "map_mb": full.numel() * 4 / 1e6, "compact_mb": (m["bits"].nbytes + m["rank"].nbytes) / 1e6,
        "fbgemm_us": fbgemm_us, "numpy_us": numpy_us, "numba_us": numba_us,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(REPO, "model_config.json"), help="model config JSON (its table sizes)")
    parser.add_argument("--tiers", type=int, default=4, help="tiers of hot ids a table")
    parser.add_argument("--batch", type=int, default=32, help="one-hot samples a batch (the served batchSize)")
    parser.add_argument("--batches", type=int, default=2000, help="fresh batches a pass (3 passes, the best kept)")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    with open(args.config) as f:
        rows = json.load(f)["num_embeddings_per_feature"]
    r = run(rows, args.tiers, args.batch, args.batches)
    numba_cell = f"{r['numba_us']:.1f}" if r["numba_us"] is not None else "not installed"
    numba_ratio = f"{r['numba_us'] / r['fbgemm_us']:.2f}x" if r["numba_us"] is not None else "-"
    print(f"{r['tables']} tables, {r['rows']:,} rows; batches of {r['batch']} samples ({r['ids_a_batch']} ids); 1 thread\n")
    print("| id -> row map | bytes | us a batch | vs fbgemm |\n| --- | ---: | ---: | ---: |")
    print(f"| fbgemm `pruned_array_lookup`, int32 an id (today) | {r['map_mb']:.0f} MB | {r['fbgemm_us']:.1f} | 1.00x |")
    print(f"| compact, {r['tiers']} tiers, numpy | {r['compact_mb']:.0f} MB | {r['numpy_us']:.1f} | {r['numpy_us'] / r['fbgemm_us']:.2f}x |")
    print(f"| compact, {r['tiers']} tiers, numba | {r['compact_mb']:.0f} MB | {numba_cell} | {numba_ratio} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(r, f, indent=1)
    print(f"\ncompact_map: fbgemm_us={r['fbgemm_us']:.1f} numpy_us={r['numpy_us']:.1f} numba_us={numba_cell} "
          f"map_mb={r['map_mb']:.0f} compact_mb={r['compact_mb']:.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
