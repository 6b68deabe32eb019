"""The GPU path, checked once on a host with CUDA GPUs (this project's CPU machines have none).

    python scripts/gpu_check.py [--out report.json] [--full]

For quant_dtype int8, int4 and fp16, and world_size 1 and min(2, N) on N visible GPUs, each
case in its own process (a TorchServe worker's, placed as the handler places it: gpu_id N-1,
world_size GPUs from there, wrapping), it checks and measures:

- fbgemm's CUDA kernels are present (the nbit TBE lookup; ``merge_pooled_embeddings``, which
  TorchRec's output dist needs for world_size > 1);
- every table shard is on the GPU of its rank, rows aligned to 16 B;
- the tables hold the same bytes as the CPU model's (the padding aside), and the table bytes
  per device are ``dlrm_factory.table_bytes_per_device``'s;
- the scores are within 1e-4 of the CPU model built from the same checkpoint;
- the table store: the entry built by ``create_dlrm_mar.sh --table-store`` (which must leave
  the GPUs empty), then opened cold (its pages dropped from the page cache) by the worker and
  copied to the GPUs: time and GB/s, and the same scores as without the store;
- the GPU memory the worker holds (allocated and reserved, per device).

A report at the end (and ``--out`` JSON); exit status 1 if a check failed. ``--full`` adds the
full default (Criteo 1TB, 12.1 GB at int8) at world_size 1 through the store. On a host
without CUDA it says so and exits 0.

Symbols as in ``dlrm_factory``: B samples, N dense features, F tables, D = embedding_dim.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SCORE_TOLERANCE = 1e-4
BATCH = 256  # samples scored in each comparison
CASE_TIMEOUT_S = 1200
# The checked model: 4 tables (253,010 rows; 17 MB of int8 tables), D = 64, the default MLPs.
CHECK_CONFIG: Dict[str, Any] = {
    "num_embeddings_per_feature": [200_000, 50_000, 3000, 10],
    "embedding_dim": 64,
    "dense_arch_layer_sizes": [512, 256, 64],
    "over_arch_layer_sizes": [512, 512, 256, 1],
    "seed": 0,
}
# fbgemm ops the CUDA path calls: (op, dispatch key, needed for).
CUDA_OPS = [
    ("fbgemm::int_nbit_split_embedding_codegen_lookup_function", "CUDA", "the quantized table lookup"),
    ("fbgemm::merge_pooled_embeddings", "CUDA", "world_size > 1 (TorchRec's output dist)"),
]


# --- the parent: cases in child processes, then the report -------------------------------------


def cuda_ops() -> List[Dict[str, Any]]:
    """Whether each fbgemm op of CUDA_OPS has a CUDA kernel in this process."""
    import fbgemm_gpu  # noqa: F401  (registers the ops)

    checks = []
    for op, key, why in CUDA_OPS:
        try:
            ok = torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
        except RuntimeError:  # the op is not registered at all
            ok = False
        checks.append({"check": f"{op} has a {key} kernel ({why})", "ok": ok, "detail": ""})
    return checks


def run_child(args: List[str], timeout: float) -> Dict[str, Any]:
    """``python gpu_check.py ARGS`` in a new process; its last ``RESULT {json}`` line."""
    done = subprocess.run([sys.executable, os.path.abspath(__file__), *args],
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    results = [line[len("RESULT ") :] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not results:
        tail = (done.stderr or done.stdout).strip().splitlines()[-15:]
        return {"checks": [{"check": f"child {' '.join(args[:3])} ran", "ok": False, "detail": "\n".join(tail)}]}
    return json.loads(results[-1])


def write_checkpoint(path: str, config: Dict[str, Any]) -> None:
    """A float TorchRec DLRM state_dict of ``config``, drawn on the CPU from a fixed seed."""
    from dlrm_factory import build_embedding_bag_configs, resolve_model_config
    from torchrec.models.dlrm import DLRM
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    cfg = resolve_model_config({**config, "device": "cpu"})
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(1)
        model = DLRM(
            embedding_bag_collection=EmbeddingBagCollection(tables=build_embedding_bag_configs(cfg)),
            dense_in_features=cfg["dense_in_features"],
            dense_arch_layer_sizes=cfg["dense_arch_layer_sizes"],
            over_arch_layer_sizes=cfg["over_arch_layer_sizes"],
        )
    torch.save(model.state_dict(), path)


def report(ops: List[Dict[str, Any]], cases: List[Dict[str, Any]]) -> bool:
    """Print the checks and the figures; True if every check passed."""
    print("\n== gpu_check report:", torch.cuda.get_device_name(0), f"x {torch.cuda.device_count()},",
          f"torch {torch.__version__} (CUDA {torch.version.cuda})")  # fmt: skip
    failed = [c for c in ops if not c["ok"]]
    for case in cases:
        failed += [dict(c, check=f"{case.get('case', '?')}: {c['check']}") for c in case["checks"] if not c["ok"]]
    print("| case | devices | checks | build s | max abs score diff | table bytes per device | "
          "GPU memory allocated / reserved | store: cold copy s (GB/s), warm s |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for case in cases:
        if "devices" not in case:
            continue
        passed = sum(c["ok"] for c in case["checks"])
        tables = ", ".join(f"{gb:.3f}" for gb in case["table_gb_per_rank"]) + " GB"
        memory = ", ".join(f"cuda:{d} {m['allocated_gb']:.3f} / {m['reserved_gb']:.3f} GB" for d, m in case["memory"].items())
        store = case.get("store", {})
        copy = (f"{store['cold_s']:.2f} ({store['entry_gb'] / store['cold_s']:.2f} GB/s), {store['warm_s']:.2f}"
                if store.get("cold_s") else "-")  # fmt: skip
        print(f"| {case['case']} | {', '.join(case['devices'])} | {passed}/{len(case['checks'])} | "
              f"{case['build_s']:.2f} | {case['max_score_diff']:.2e} | {tables} | {memory} | {copy} |")  # fmt: skip
    for check in ops:
        print(f"{'ok  ' if check['ok'] else 'FAIL'} {check['check']}")
    if failed:
        print(f"\n{len(failed)} check(s) FAILED:")
        for check in failed:
            print(f"  FAIL {check['check']}: {check['detail']}")
    else:
        print(f"\nall {len(ops) + sum(len(c['checks']) for c in cases)} checks passed")
    return not failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="write the report as JSON here")
    parser.add_argument("--full", action="store_true", help="also the full default config at world_size 1 (12 GB)")
    parser.add_argument("--case", nargs=3, metavar=("QUANT_DTYPE", "WORLD_SIZE", "WORKDIR"), help=argparse.SUPPRESS)
    parser.add_argument("--reference", nargs=3, metavar=("QUANT_DTYPE", "WORLD_SIZE", "WORKDIR"), help=argparse.SUPPRESS)
    parser.add_argument("--prebuild", metavar="CONFIG_JSON", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print("RESULT " + json.dumps(check_case(args.case[0], int(args.case[1]), args.case[2])), flush=True)
        return
    if args.reference:
        print("RESULT " + json.dumps(cpu_reference(args.reference[0], int(args.reference[1]), args.reference[2])), flush=True)
        return
    if args.prebuild:
        print("RESULT " + json.dumps(prebuild(args.prebuild)), flush=True)
        return
    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device is visible (torch {torch.__version__}, CUDA build: {torch.version.cuda}): "
              "nothing checked on this host; run it where `nvidia-smi` lists GPUs and the CUDA builds are "
              "installed (README, GPUs)")  # fmt: skip
        return
    gpus = torch.cuda.device_count()
    ops = cuda_ops()
    cases = []
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as workdir:
        write_checkpoint(os.path.join(workdir, "checkpoint.pt"), CHECK_CONFIG)
        plan = [(dtype, ws) for dtype in ("int8", "int4", "fp16") for ws in sorted({1, min(2, gpus)})]
        plan += [("full-int8", 1)] if args.full else []
        for dtype, world_size in plan:
            print(f"== {dtype}, world_size {world_size}", flush=True)
            result = run_child(["--case", dtype, str(world_size), workdir], CASE_TIMEOUT_S)
            result.setdefault("case", f"{dtype} ws{world_size}")
            cases.append(result)
    ok = report(ops, cases)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"ops": ops, "cases": cases, "ok": ok}, f, indent=2)
    sys.exit(0 if ok else 1)


# --- a child: one case -------------------------------------------------------------------------


def batch(config: Dict[str, Any], samples: int) -> Tuple[torch.Tensor, Any]:
    """``samples`` random requests (0-3 ids a table), fixed seed: (dense [B, N], key-major KJT)."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    rng = random.Random(5)
    sizes = config["num_embeddings_per_feature"]
    keys = [f"cat_{i}" for i in range(len(sizes))]
    bags = [[[rng.randrange(size) for _ in range(rng.randint(0, 3))] for _ in range(samples)] for size in sizes]
    dense = torch.randn(samples, 13, generator=torch.Generator().manual_seed(5))
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=keys,
        values=torch.tensor([i for table in bags for bag in table for i in bag], dtype=torch.int64),
        lengths=torch.tensor([len(bag) for table in bags for bag in table], dtype=torch.int32),
    )
    return dense, kjt


def scores(model: torch.nn.Module, dense: torch.Tensor, kjt: Any, device: torch.device) -> torch.Tensor:
    with torch.inference_mode():
        return model(dense.to(device), kjt.to(device)).float().cpu().flatten()


def table_rows(model: torch.nn.Module) -> Dict[str, Tuple[torch.Tensor, int]]:
    """{table: (its stored rows on the CPU, the TorchRec rank holding it)}; rows padded as the
    TBE holds them."""
    from dlrm_factory import _sharded_tbes

    rows = {}
    for tbe, grouped in _sharded_tbes(model).items():
        for (weights, _), table in zip(tbe.split_embedding_weights(split_scale_shifts=False), grouped.embedding_tables):
            rows[table.name] = (weights.cpu(), table.local_metadata.placement.rank())
    return rows


def checked(checks: List[Dict[str, Any]], name: str, ok: bool, detail: Any = "") -> bool:
    checks.append({"check": name, "ok": bool(ok), "detail": str(detail)})
    return bool(ok)


def case_configs(dtype: str, world_size: int, workdir: str) -> Dict[str, Dict[str, Any]]:
    """The case's configs: "checkpoint" (the checked model from the shared checkpoint; none for
    the full default) and "seeded" (the same, its weights drawn from the seed)."""
    from dlrm_factory import create_default_model_config

    if dtype.startswith("full-"):
        return {"seeded": {**create_default_model_config(), "quant_dtype": dtype.removeprefix("full-"), "world_size": world_size}}
    seeded = {**CHECK_CONFIG, "quant_dtype": dtype, "world_size": world_size}
    return {"checkpoint": {**seeded, "checkpoint": os.path.join(workdir, "checkpoint.pt")}, "seeded": seeded}


def cpu_reference(dtype: str, world_size: int, workdir: str) -> Dict[str, Any]:
    """The CPU models of the case (their own process: CPU sharding switches TorchRec's device
    propagation on for the process): their table bytes, dense weights and scores, saved."""
    from dlrm_factory import DLRMFactory

    saved = {}
    for name, config in case_configs(dtype, world_size, workdir).items():
        model = DLRMFactory({**config, "device": "cpu"})
        dense, kjt = batch(config, BATCH)
        saved[name] = {"rows": {t: rows for t, (rows, _) in table_rows(model).items()},
                       "dense": {n: p.detach().clone() for n, p in model.named_parameters()},
                       "scores": scores(model, dense, kjt, torch.device("cpu"))}  # fmt: skip
        del model
    path = os.path.join(workdir, f"reference-{dtype}-{world_size}.pt")
    torch.save(saved, path)
    return {"path": path}


def check_case(dtype: str, world_size: int, workdir: str) -> Dict[str, Any]:
    """One (quant dtype, world_size) case, as a TorchServe worker on gpu_id N-1 builds it,
    against the CPU models of ``cpu_reference``."""
    from dlrm_factory import DLRMFactory, _sharded_tbes, resolve_model_config, row_bytes, serving_config, table_bytes_per_device

    gpus = torch.cuda.device_count()
    configs = case_configs(dtype, world_size, workdir)
    case: Dict[str, Any] = {"case": f"{dtype} ws{world_size}", "checks": []}
    built = run_child(["--reference", dtype, str(world_size), workdir], CASE_TIMEOUT_S)
    if "path" not in built:
        return {**case, "checks": built["checks"]}
    reference = torch.load(built["path"])
    checks = case["checks"]
    name = "checkpoint" if "checkpoint" in configs else "seeded"
    served = serving_config(resolve_model_config(configs[name]), gpu_id=gpus - 1, cuda_count=gpus)
    dense, kjt = batch(served, BATCH)

    started = time.perf_counter()
    model = DLRMFactory(served)
    torch.cuda.synchronize()
    case["build_s"] = time.perf_counter() - started
    first = int(served["device"].split(":")[1])
    ranks = [(first + r) % gpus for r in range(world_size)]
    case["devices"] = [f"cuda:{g}" for g in ranks]
    case["memory"] = {g: {"allocated_gb": torch.cuda.memory_allocated(g) / 1e9,
                          "reserved_gb": torch.cuda.memory_reserved(g) / 1e9} for g in ranks}  # fmt: skip

    # Placement: each shard on its rank's GPU, rows aligned to 16 B; dense layers on the first.
    for tbe, grouped in _sharded_tbes(model).items():
        rank = grouped.embedding_tables[0].local_metadata.placement.rank()
        tables = [t.name for t in grouped.embedding_tables]
        checked(checks, f"tables {tables} on cuda:{ranks[rank]} (rank {rank})",
                tbe.weights_dev.device == torch.device("cuda", ranks[rank]), tbe.weights_dev.device)  # fmt: skip
        widths = [w.shape[1] for w, _ in tbe.split_embedding_weights(split_scale_shifts=False)]
        checked(checks, f"tables {tables}: rows of {widths} B, 16-B aligned",
                tbe.row_alignment == 16 and all(w % 16 == 0 for w in widths)
                and all(o % 16 == 0 for o in tbe.weights_physical_offsets), tbe.weights_physical_offsets)  # fmt: skip
    dense_device = {str(p.device) for p in model.parameters()}
    checked(checks, f"dense layers on cuda:{ranks[0]}", dense_device == {f"cuda:{ranks[0]}"}, dense_device)

    # The tables: the CPU model's bytes (padding aside), table_bytes_per_device per rank.
    compare_weights(checks, name, model, reference[name], row_bytes(served, "cpu"))
    per_device = table_bytes_per_device(model.plan, served, "cuda")
    held: Dict[int, int] = {}
    for rows, rank in table_rows(model).values():
        held[rank] = held.get(rank, 0) + rows.numel()
    case["table_gb_per_rank"] = [held.get(r, 0) / 1e9 for r in range(world_size)]
    checked(checks, "table bytes per rank = table_bytes_per_device",
            [held.get(r, 0) for r in range(world_size)] == list(per_device.values()), (held, per_device))  # fmt: skip
    gpu_scores = scores(model, dense, kjt, torch.device("cuda", ranks[0]))
    case["max_score_diff"] = (gpu_scores - reference[name]["scores"]).abs().max().item()
    checked(checks, f"scores within {SCORE_TOLERANCE} of the CPU model's ({BATCH} samples, {name})",
            case["max_score_diff"] <= SCORE_TOLERANCE, case["max_score_diff"])  # fmt: skip
    del model
    torch.cuda.empty_cache()
    if name == "checkpoint":  # the same seed, the same weights on the GPU as on the CPU
        seeded = DLRMFactory(serving_config(resolve_model_config(configs["seeded"]), gpu_id=gpus - 1, cuda_count=gpus))
        compare_weights(checks, "seeded", seeded, reference["seeded"], row_bytes(served, "cpu"))
        del seeded
        torch.cuda.empty_cache()

    case["store"] = check_store(configs[name], served, workdir, checks, dense, kjt, gpu_scores, torch.device("cuda", ranks[0]))
    return case


def compare_weights(checks: List[Dict[str, Any]], name: str, model: torch.nn.Module, reference: Dict[str, Any], width: int) -> None:
    """The GPU model's table bytes (its rows cut to ``width``) and dense weights against the
    CPU model's, bit for bit."""
    rows = table_rows(model)
    same = [t for t, expected in reference["rows"].items() if torch.equal(rows[t][0][:, :width], expected)]
    checked(checks, f"table bytes equal the CPU model's ({name})", len(same) == len(reference["rows"]), f"equal: {same}")
    dense = {n: p.detach().cpu() for n, p in model.named_parameters()}
    differ = [n for n, p in reference["dense"].items() if not torch.equal(dense[n], p)]
    checked(checks, f"dense weights equal the CPU model's ({name})", not differ, f"differ: {differ}")


def prebuild(config_path: str) -> Dict[str, Any]:
    """create_dlrm_mar.sh --table-store's step (``build_store_entry``) in this process: the
    entry, and the most GPU memory it allocated."""
    from dlrm_factory import build_store_entry

    with open(config_path) as f:
        config = json.load(f)
    started = time.perf_counter()
    entry = build_store_entry(config)
    return {"entry": entry, "seconds": time.perf_counter() - started,
            "gpu_bytes": max(torch.cuda.max_memory_allocated(g) for g in range(torch.cuda.device_count()))}  # fmt: skip


def drop_from_page_cache(path: str) -> None:
    """The file's cached pages dropped (clean pages: no root needed), so the next read is cold."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def check_store(config: Dict[str, Any], served: Dict[str, Any], workdir: str, checks: List[Dict[str, Any]],
                dense: torch.Tensor, kjt: Any, expected: torch.Tensor, device: torch.device) -> Dict[str, Any]:  # fmt: skip
    """The entry prebuilt (GPUs untouched), then served cold and warm: times and scores."""
    from dlrm_factory import DLRMFactory

    store = os.path.join(workdir, f"store-{served['quant_dtype']}-{served['world_size']}")
    config_path = os.path.join(workdir, f"config-{served['quant_dtype']}-{served['world_size']}.json")
    with open(config_path, "w") as f:
        json.dump({**config, "table_store": store}, f)
    built = run_child(["--prebuild", config_path], CASE_TIMEOUT_S)
    if not checked(checks, "create_dlrm_mar.sh --table-store's step builds the entry", "entry" in built, built):
        return {}
    checked(checks, "... and leaves the GPUs empty (< 64 MB: the dense layers at most)",
            built["gpu_bytes"] < 64 << 20, f"{built['gpu_bytes']:,} B")  # fmt: skip
    path = built["entry"]["path"]
    result = {"entry_gb": os.path.getsize(path) / 1e9, "prebuild_s": built["seconds"]}
    drop_from_page_cache(path)
    started = time.perf_counter()
    model = DLRMFactory({**served, "table_store": store})
    torch.cuda.synchronize()
    result["cold_s"] = time.perf_counter() - started
    checked(checks, "the worker opens the prebuilt entry (cold) instead of building it",
            model.table_store_entry == {"path": path, "built": False}, model.table_store_entry)  # fmt: skip
    checked(checks, "scores through the store = without it", torch.equal(scores(model, dense, kjt, device), expected))
    del model
    torch.cuda.empty_cache()
    started = time.perf_counter()
    DLRMFactory({**served, "table_store": store})
    torch.cuda.synchronize()
    result["warm_s"] = time.perf_counter() - started
    return result


if __name__ == "__main__":
    main()
