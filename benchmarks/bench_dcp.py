"""Training as TorchRec does (torchrun, sharded tables) and serving its DCP checkpoint: the figures.

    .venv/bin/python benchmarks/bench_dcp.py train
    .venv/bin/python benchmarks/bench_dcp.py build
    .venv/bin/python benchmarks/bench_dcp.py data

``train``: ``examples/train_dlrm.py`` with the same arguments (its defaults: 8M synthetic
samples, Criteo's 26 tables capped at 100,000 rows, D = 32) in one process and under
``torchrun --standalone --nproc_per_node 2`` (gloo, ``DistributedModelParallel``, the 8
tables of 100,000 rows row-wise, the others table-wise). All see the same samples (each
global batch cut in two). The 1-process run and the first 2-rank run start from the same
weights (the single process's seeded init, written as a DCP checkpoint and given with
``--init-from``), so that they differ only in how they train; the second 2-rank run draws its
own init, as a user's would. Prints the samples/s of the training steps and the held-out AUC
of each, and |AUC(2 ranks) - AUC(1 process)| against the goal 0.002; plots
``benchmarks/plots/bench_dcp_train.png``.

``build``: a DCP checkpoint of more than 10 GB of float tables, written by 2 gloo ranks under
torchrun as ``DistributedModelParallel.state_dict()`` would save it - TorchRec's planner places
the tables (row-wise from ``--row-wise-min-rows`` rows, table-wise below), each rank fills
its own shards with random values (as ``ShardedTensor``s, one storage each) and
``dcp.save`` writes them - then ``DLRMFactory`` built from it (int8, one CPU device) in a
fresh process, through a table store (what a serving worker does) and without one. The
tables are Criteo 1TB's at D = 64 with the largest cut to ``--big-rows`` rows (row-wise over
the 2 ranks: each rank's item of it is over 4 GiB, a zip64 record) and the others capped at
``--cap`` rows. Before each build the checkpoint's pages are dropped from the page cache, so
it is read from disk. Prints build seconds and peak RSS (``ru_maxrss``: the entry's mapped
pages count) against the goal, peak RSS <= 1.1 x the entry's bytes + 1 GiB; plots
``benchmarks/plots/bench_dcp_build.png``; deletes the checkpoint and the entry.

``data``: whether TorchRec's Criteo tooling would serve the multi-rank TSV path better than
``examples/criteo_data.py``'s reader, which every rank runs over the whole file (keeping its
slice of each batch). On ``--lines`` Criteo lines (the synthetic samples written as TSV):
samples/s of our reader on one core, and of TorchRec's path - ``BinaryCriteoUtils.tsv_to_npys``
once, then ``InMemoryBinaryCriteoIterDataPipe`` per rank (its slice of the npy files, as
batches).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples")
for _path in (REPO, EXAMPLES):
    if _path not in sys.path:
        sys.path.insert(0, _path)

GIB = 1024**3
AUC_GOAL = 0.002
PLOTS = os.path.join(REPO, "benchmarks", "plots")
TRAIN_SCRIPT = os.path.join(EXAMPLES, "train_dlrm.py")

# The build child: DLRMFactory from the DCP checkpoint, in a fresh process.
CHILD = r"""
import json, os, resource, sys, time
import dlrm_factory
config = json.loads(sys.argv[1])
started = time.perf_counter()
model = dlrm_factory.DLRMFactory(config)
seconds = time.perf_counter() - started
entry = getattr(model, "table_store_entry", None)
if entry:
    entry_bytes = os.path.getsize(entry["path"])
else:
    entry_bytes = sum(w.numel() + (sb.numel() if sb is not None else 0) for _, _, w, sb in dlrm_factory._table_shards(model))
print(json.dumps({"seconds": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "entry_bytes": entry_bytes, "store": bool(entry)}))
"""


# ---------------------------------------------------------------------------------------
# train: 1 process against 2 ranks.
# ---------------------------------------------------------------------------------------


def run_training(out: str, ranks: int, train_args: Sequence[str]) -> Dict[str, Any]:
    """train_dlrm.py in one process (ranks 0) or under torchrun with ``ranks`` processes;
    its training.json."""
    launcher = [sys.executable] if ranks == 0 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", str(ranks)]  # fmt: skip
    started = time.perf_counter()
    subprocess.run([*launcher, TRAIN_SCRIPT, "--out", out, "--no-progress", *train_args], check=True)
    with open(os.path.join(out, "training.json")) as f:
        training = json.load(f)
    training["wall_seconds"] = time.perf_counter() - started
    return training


def write_initial_weights(path: str, train_args: Sequence[str]) -> None:
    """The single process's seeded init of ``train_args``' model, as a DCP checkpoint."""
    import torch.distributed.checkpoint as dcp

    import criteo_data
    import train_dlrm

    args = train_dlrm.parse_args(["--out", path, *train_args])
    config = train_dlrm.model_config(criteo_data.capped_table_sizes(args.table_cap), args.embedding_dim,
                                     args.dense_arch, args.over_arch)  # fmt: skip
    dcp.save(train_dlrm.build_train_model(config, args.seed).state_dict(), checkpoint_id=path, no_dist=True)


def bench_train(args: argparse.Namespace) -> Dict[str, Any]:
    train_args = ["--train-samples", str(args.train_samples), "--seed", str(args.seed)]
    with tempfile.TemporaryDirectory(prefix="bench_dcp_train_") as tmp:
        init = os.path.join(tmp, "init.dcp")
        write_initial_weights(init, train_args)
        one = run_training(os.path.join(tmp, "one"), 0, [*train_args, "--init-from", init])
        two = run_training(os.path.join(tmp, "two"), 2, [*train_args, "--init-from", init])
        own = run_training(os.path.join(tmp, "own"), 2, train_args)
    rows = [("1 process (torch threads: one a core)", one), ("torchrun, 2 ranks (gloo, 1 thread each), same init", two),
            ("torchrun, 2 ranks, their own init", own)]  # fmt: skip
    print(f"\nexamples/train_dlrm.py, {args.train_samples:,} synthetic samples (defaults otherwise), "
          f"{os.cpu_count()} cores")  # fmt: skip
    print("| run | samples seen | training samples/s | train seconds | held-out AUC | log loss | oracle AUC |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, t in rows:
        f = t["figures"]
        print(f"| {name} | {f['samples']:,} | {f['samples_per_second']:,.0f} | {f['train_seconds']:.0f} | "
              f"{f['auc']:.4f} | {f['log_loss']:.4f} | {f['oracle_auc']:.4f} |")  # fmt: skip
    difference = abs(two["figures"]["auc"] - one["figures"]["auc"])
    own_difference = abs(own["figures"]["auc"] - one["figures"]["auc"])
    print(f"\nsharding of the 2-rank runs: {sorted(set(two['sharding'].values()))} "
          f"({sum(v == 'row_wise' for v in two['sharding'].values())} tables row-wise)")  # fmt: skip
    print(f"|AUC(2 ranks) - AUC(1 process)|, same init: {difference:.4f} (goal <= {AUC_GOAL}: "
          f"{'met' if difference <= AUC_GOAL else 'NOT met'}); own init: {own_difference:.4f}")  # fmt: skip
    plot_train(rows, args.plot or os.path.join(PLOTS, "bench_dcp_train.png"))
    return {"one": one, "two": two, "own": own, "auc_difference": difference, "own_init_auc_difference": own_difference}


def plot_train(rows: List[Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["1 process", "2 ranks,\nsame init", "2 ranks,\nown init"][: len(rows)]
    colors = ["#555555", "#1f77b4", "#7fb2d9"][: len(rows)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    speeds = [t["figures"]["samples_per_second"] for _, t in rows]
    left.bar(names, speeds, color=colors)
    left.set_ylabel("training samples/s")
    for x, v in enumerate(speeds):
        left.text(x, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
    aucs = [t["figures"]["auc"] for _, t in rows]
    right.bar(names, aucs, color=colors)
    right.axhline(rows[0][1]["figures"]["oracle_auc"], color="green", linestyle="--", label="oracle")
    right.set_ylim(min(aucs) - 0.01, max(aucs + [rows[0][1]["figures"]["oracle_auc"]]) + 0.01)
    right.set_ylabel("held-out AUC (same samples seen)")
    right.legend(fontsize=8, loc="lower right")
    for x, v in enumerate(aucs):
        right.text(x, v, f"{v:.4f}", ha="center", va="bottom", fontsize=8)
    fig.suptitle(f"train_dlrm.py, {rows[0][1]['figures']['samples']:,} samples, {os.cpu_count()} cores", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


# ---------------------------------------------------------------------------------------
# build: a 10 GB+ DCP checkpoint, served.
# ---------------------------------------------------------------------------------------


def table_sizes(big_rows: int, cap: int) -> List[int]:
    """Criteo 1TB's 26 tables: the largest cut to ``big_rows``, the others capped at ``cap``."""
    import criteo_data

    sizes = list(criteo_data.CRITEO_1TB_NUM_EMBEDDINGS)
    largest = sizes.index(max(sizes))
    return [big_rows if i == largest else min(rows, cap) for i, rows in enumerate(sizes)]


def build_config(args: argparse.Namespace) -> Dict[str, Any]:
    """The served config of the checkpoint: the default MLPs, D = 64, int8."""
    import train_dlrm

    return train_dlrm.model_config(table_sizes(args.big_rows, args.cap), 64, [512, 256, 64], [512, 512, 256, 1])


def make_dcp(args: argparse.Namespace) -> None:
    """Under torchrun: each rank's shards of the planner's plan, random, saved with dcp.save."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed._shard.sharded_tensor import Shard, init_from_local_shards
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.models.dlrm import DLRM, DLRMTrain
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    import train_dlrm
    from dlrm_factory import build_embedding_bag_configs, resolve_model_config

    ranks = train_dlrm.init_ranks()
    assert ranks is not None, "make-dcp runs under torchrun"
    cfg = resolve_model_config(build_config(args))
    eb_configs = build_embedding_bag_configs(cfg)
    torch.manual_seed(args.seed)
    model = DLRMTrain(dlrm_module=DLRM(
        embedding_bag_collection=EmbeddingBagCollection(tables=eb_configs, device=torch.device("meta")),
        dense_in_features=cfg["dense_in_features"], dense_arch_layer_sizes=cfg["dense_arch_layer_sizes"],
        over_arch_layer_sizes=cfg["over_arch_layer_sizes"]))  # fmt: skip
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=ranks.world_size, compute_device="cpu"),
        constraints=train_dlrm.table_constraints(eb_configs, args.row_wise_min_rows),
    )
    plan = planner.collective_plan(model, [train_dlrm.RowWiseShardingSharder()], dist.GroupMember.WORLD)
    state: Dict[str, Any] = {k: v for k, v in model.state_dict().items() if ".embedding_bags." not in k}
    for index, table in enumerate(eb_configs):
        sharding = next(p[table.name] for p in plan.plan.values() if table.name in p)
        bound = (1.0 / table.num_embeddings) ** 0.5
        shards = []
        for meta in sharding.sharding_spec.shards:
            if meta.placement.rank() == ranks.rank:
                weights = torch.empty(meta.shard_sizes)
                weights.uniform_(-bound, bound, generator=torch.Generator().manual_seed(args.seed * 1000 + index))
                shards.append(Shard(tensor=weights, metadata=meta))
        state[f"model.sparse_arch.embedding_bag_collection.embedding_bags.{table.name}.weight"] = init_from_local_shards(
            shards, [table.num_embeddings, table.embedding_dim]
        )
    started = time.perf_counter()
    dcp.save(state, checkpoint_id=args.dcp)
    if ranks.rank == 0:
        print(f"dcp.save: {time.perf_counter() - started:.1f} s; sharding "
              f"{ {t: s.sharding_type for p in plan.plan.values() for t, s in p.items()} }", flush=True)  # fmt: skip
    dist.destroy_process_group()


def directory_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def evict_from_page_cache(path: str) -> None:
    """Drop a directory's file pages from the page cache (POSIX_FADV_DONTNEED): read from disk next."""
    for root, _, names in os.walk(path):
        for name in names:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def build_once(config: Dict[str, Any]) -> Dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": REPO}
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(config)], env=env, stdout=subprocess.PIPE,
                          check=True, text=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_build(args: argparse.Namespace) -> Dict[str, Any]:
    workdir = tempfile.mkdtemp(prefix="bench_dcp_build_", dir=args.workdir)
    args.dcp = os.path.join(workdir, "checkpoint.dcp")
    try:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.abspath(__file__), "make-dcp", "--dcp", args.dcp, "--big-rows", str(args.big_rows),
                        "--cap", str(args.cap), "--row-wise-min-rows", str(args.row_wise_min_rows),
                        "--seed", str(args.seed)], check=True)  # fmt: skip
        make_seconds = time.perf_counter() - started
        checkpoint_bytes = directory_bytes(args.dcp)
        sizes = table_sizes(args.big_rows, args.cap)
        print(f"DCP checkpoint: {checkpoint_bytes / 1e9:.2f} GB in {make_seconds:.0f} s "
              f"(float tables {sum(sizes) * 64 * 4 / 1e9:.2f} GB, {sum(sizes):,} rows; files "
              f"{sorted(os.listdir(args.dcp))})", flush=True)  # fmt: skip
        config = {**build_config(args), "checkpoint": args.dcp, "device": "cpu"}
        results = []
        for store in (os.path.join(workdir, "table_store"), None):
            evict_from_page_cache(args.dcp)
            result = build_once({**config, "table_store": store})
            results.append(result)
            print(f"  built {'through a table store' if store else 'in memory'}: {result['seconds']:.1f} s, "
                  f"peak RSS {result['peak_rss'] / GIB:.2f} GiB", flush=True)  # fmt: skip
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\nDLRMFactory (int8, CPU) from a DCP checkpoint written by 2 ranks: {checkpoint_bytes / 1e9:.2f} GB "
          f"({sum(sizes):,} rows of D = 64, the largest table {args.big_rows:,} rows row-wise), read from disk")  # fmt: skip
    print("| build | seconds | checkpoint GB / build s | peak RSS | entry bytes | goal: 1.1 x entry + 1 GiB | met |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in results:
        goal = 1.1 * r["entry_bytes"] + GIB
        print(f"| {'table store (a worker)' if r['store'] else 'in memory (no store)'} | {r['seconds']:.1f} | "
              f"{checkpoint_bytes / r['seconds'] / 1e9:.2f} | {r['peak_rss'] / GIB:.2f} GiB | {r['entry_bytes'] / GIB:.2f} GiB | "
              f"{goal / GIB:.2f} GiB | {'yes' if r['peak_rss'] <= goal else 'NO'} |")  # fmt: skip
    plot_build(results, checkpoint_bytes, args.plot or os.path.join(PLOTS, "bench_dcp_build.png"))
    return {"checkpoint_bytes": checkpoint_bytes, "make_seconds": make_seconds, "builds": results}


def plot_build(results: List[Dict[str, Any]], checkpoint_bytes: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["table store" if r["store"] else "in memory" for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8))
    peaks = [r["peak_rss"] / GIB for r in results]
    goals = [(1.1 * r["entry_bytes"] + GIB) / GIB for r in results]
    left.bar(names, peaks, color="#1f77b4", label="peak RSS")
    left.scatter(names, goals, color="red", marker="_", s=2000, label="goal 1.1 x entry + 1 GiB")
    left.set_ylabel("GiB")
    left.set_ylim(0, max(goals + peaks) * 1.3)
    left.legend(fontsize=8, loc="upper center", ncol=2)
    for x, v in enumerate(peaks):
        left.text(x, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    seconds = [r["seconds"] for r in results]
    right.bar(names, seconds, color="#555555")
    right.set_ylabel("build seconds")
    for x, v in enumerate(seconds):
        right.text(x, v, f"{v:.0f} s", ha="center", va="bottom", fontsize=8)
    fig.suptitle(f"DLRMFactory (int8) from a {checkpoint_bytes / 1e9:.1f} GB DCP checkpoint of 2 ranks, "
                 f"{os.cpu_count()} cores", fontsize=9)  # fmt: skip
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


# ---------------------------------------------------------------------------------------
# data: our TSV reader against TorchRec's npy tooling.
# ---------------------------------------------------------------------------------------


def write_tsv(path: str, lines: int) -> None:
    """``lines`` synthetic samples as Criteo TSV lines (counts exp(x) - 1, ids in hex)."""
    import math

    import criteo_data

    samples = criteo_data.SyntheticCriteo(table_sizes=criteo_data.capped_table_sizes(), seed=0).sample(lines, criteo_data.HELD_OUT)
    with open(path, "w") as f:
        for label, dense, ids in zip(samples.labels.tolist(), samples.dense.tolist(), samples.ids.tolist()):
            f.write("\t".join([str(int(label))] + [str(round(math.expm1(x))) for x in dense] + [format(i, "x") for i in ids]) + "\n")


def bench_data(args: argparse.Namespace) -> Dict[str, float]:
    import criteo_data
    from torchrec.datasets.criteo import BinaryCriteoUtils, InMemoryBinaryCriteoIterDataPipe

    import train_dlrm

    sizes = criteo_data.capped_table_sizes()
    with tempfile.TemporaryDirectory(prefix="bench_dcp_data_") as tmp:
        tsv = os.path.join(tmp, "day_0")
        write_tsv(tsv, args.lines)
        started = time.perf_counter()
        batches = sum(1 for _ in train_dlrm.tsv_batches([tsv], sizes, args.batch_size))
        ours = args.lines / (time.perf_counter() - started)
        npys = [os.path.join(tmp, f"day_0_{kind}.npy") for kind in ("dense", "sparse", "labels")]
        started = time.perf_counter()
        BinaryCriteoUtils.tsv_to_npys(tsv, *npys)
        preprocess = args.lines / (time.perf_counter() - started)
        started = time.perf_counter()
        rank_batches = sum(1 for _ in InMemoryBinaryCriteoIterDataPipe(
            stage="train", dense_paths=[npys[0]], sparse_paths=[npys[1]], labels_paths=[npys[2]],
            batch_size=args.batch_size // 2, rank=0, world_size=2, hashes=sizes))  # fmt: skip
        per_rank = rank_batches * args.batch_size // 2 / (time.perf_counter() - started)
    print(f"\n{args.lines:,} Criteo TSV lines, batches of {args.batch_size} ({batches} batches), one core each")
    print("| path | samples/s |")
    print("| --- | ---: |")
    print(f"| examples/criteo_data.py reader (each rank reads every line) | {ours:,.0f} |")
    print(f"| TorchRec BinaryCriteoUtils.tsv_to_npys (once, before training) | {preprocess:,.0f} |")
    print(f"| TorchRec InMemoryBinaryCriteoIterDataPipe, one of 2 ranks (its half, from the npy files) | {per_rank:,.0f} |")
    return {"ours": ours, "tsv_to_npys": preprocess, "npy_per_rank": per_rank}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="samples/s and AUC: 1 process against 2 torchrun ranks")
    train.add_argument("--train-samples", type=int, default=8_000_000)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--plot", default=None)
    data = sub.add_parser("data", help="our TSV reader against TorchRec's npy preprocessing and per-rank loading")
    data.add_argument("--lines", type=int, default=500_000)
    data.add_argument("--batch-size", type=int, default=4096)
    for name in ("build", "make-dcp"):
        build = sub.add_parser(name, help="a 10 GB+ DCP checkpoint, built into a served model" if name == "build"
                               else "(internal, under torchrun) write the DCP checkpoint")  # fmt: skip
        build.add_argument("--big-rows", type=int, default=36_000_000, help="rows of the largest table")
        build.add_argument("--cap", type=int, default=1_000_000, help="rows of the other tables at most")
        build.add_argument("--row-wise-min-rows", type=int, default=1_000_000)
        build.add_argument("--seed", type=int, default=0)
        build.add_argument("--workdir", default=None, help="where the checkpoint and entry go (deleted after)")
        build.add_argument("--dcp", default=None, help=argparse.SUPPRESS)
        build.add_argument("--plot", default=None)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.command == "make-dcp":
        make_dcp(args)
        return {}
    return {"train": bench_train, "build": bench_build, "data": bench_data}[args.command](args)


if __name__ == "__main__":
    main()
