"""The GPU path, checked on the CPU: everything of it that does not need a GPU (issue 17).

- which devices a model (and a TorchServe worker) takes: ``choose_devices``, a pure function
  of the config's device and world_size, the visible GPUs and TorchServe's gpu_id, over a
  table of cases; ``serving_config``: a worker's share of each GPU;
- a config that cannot fit its GPUs is refused before anything is allocated, naming bytes;
- TorchRec's ranks mapped to the worker's GPUs (``place_ranks_on_gpus``);
- the store entry opened for the GPU copy is advised sequential (lookups: random), as the
  kernel records it (VmFlags ``sr``/``rr`` in /proc/self/smaps), and the copy drops the
  pages it has copied;
- the same seed gives the same weights whatever device was asked for, and leaves the
  caller's RNG states (CPU and CUDA) as they were;
- the small refusals: embedding_dim per quant dtype, table names in the copy, the lean
  forward on a non-CPU model;
- ``scripts/gpu_check.py`` (the check for a GPU host) says so and exits 0 here.

The GPU itself is exercised by ``scripts/gpu_check.py`` on a host that has one.
"""

import json
import os
import subprocess
import sys
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch
import torchrec.distributed.dist_data as torchrec_dist_data
import torchrec.distributed.embedding_lookup as torchrec_embedding_lookup
from fbgemm_gpu.split_embedding_configs import SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen

import dlrm_factory
import dlrm_table_store
from conftest import REPO, small_model_config
from dlrm_factory import (
    DLRMFactory,
    build_store_entry,
    choose_devices,
    plan_to_fit,
    resolve_model_config,
    serving_config,
    table_bytes_per_device,
    workers_per_gpu,
)
from dlrm_lean_forward import optimize_for_inference
from test_factory import score
from test_table_store import _metadata

# --- which devices: choose_devices, a pure function ------------------------------------------

TEST_CASES = [
    # (device, world_size, visible GPUs, TorchServe's gpu_id, served) -> (compute, world size, GPU of each rank)
    (("auto", None, 0, None, False), ("cpu", 1, [])),  # a CPU host
    (("auto", 2, 0, None, False), ("cpu", 2, [])),  # CPU ranks simulated
    (("cpu", None, 4, None, False), ("cpu", 1, [])),  # asked for the CPU on a GPU host
    (("auto", None, 4, None, False), ("cuda", 4, [0, 1, 2, 3])),  # DLRMFactory: every visible GPU
    (("cuda", 2, 4, None, False), ("cuda", 2, [0, 1])),
    (("cuda:2", 1, 4, None, False), ("cuda", 1, [2])),  # a pinned first GPU
    (("cuda:3", 2, 4, None, False), ("cuda", 2, [3, 0])),  # wrapping around
    (("auto", None, 4, 0, True), ("cuda", 1, [0])),  # a worker: its own GPU, one per GPU
    (("auto", None, 4, 3, True), ("cuda", 1, [3])),
    (("auto", 2, 4, 3, True), ("cuda", 2, [3, 0])),  # world_size GPUs from its gpu_id, wrapping
    (("cuda", 4, 4, 1, True), ("cuda", 4, [1, 2, 3, 0])),
    (("cuda:1", None, 4, 3, True), ("cuda", 1, [1])),  # the config's pinned GPU wins
    (("auto", None, 4, None, True), ("cpu", 1, [])),  # number_of_gpu=0: TorchServe gave no GPU
    (("auto", None, 0, None, True), ("cpu", 1, [])),  # a CPU host under TorchServe
    (("cpu", None, 2, 1, True), ("cpu", 1, [])),
]


@pytest.mark.parametrize("args, expected", TEST_CASES, ids=[",".join(map(str, args)) for args, _ in TEST_CASES])
def test_devices_follow_the_config_the_visible_gpus_and_torchserves_gpu_id(
    args: Tuple[str, Optional[int], int, Optional[int], bool], expected: Tuple[str, int, List[int]]
) -> None:
    assert choose_devices(*args) == expected


DEVICE_ERRORS = [
    # (device, world_size, visible GPUs, gpu_id, served), the message
    (("cuda", None, 0, None, False), r"'device' is 'cuda'; expected 'cpu' or 'auto': no CUDA device is visible"),
    (("cuda", None, 2, None, True), r"'device' is 'cuda'; expected 'auto' or 'cpu' for this worker: TorchServe gave it no GPU"),
    (("auto", 3, 2, None, False), r"'world_size' is 3; expected at most 2, the number of visible GPUs"),
    (("auto", 3, 2, 1, True), r"'world_size' is 3; expected at most 2"),
    (("cuda:2", 1, 2, None, False), r"'device' is 'cuda:2'; expected a GPU below 2"),
    (("auto", None, 2, 5, True), r"TorchServe's gpu_id is 5; expected a GPU below 2"),
]


@pytest.mark.parametrize("args, message", DEVICE_ERRORS, ids=[",".join(map(str, args)) for args, _ in DEVICE_ERRORS])
def test_devices_that_cannot_be_had_are_a_value_error_naming_the_key(
    args: Tuple[str, Optional[int], int, Optional[int], bool], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        choose_devices(*args)


WORKERS_PER_GPU = [
    # (workers, world_size, GPUs) -> the most workers with shards on one GPU
    ((4, 1, 4), 1),  # TorchServe's default on 4 GPUs: one worker each
    ((4, 2, 4), 2),  # each worker on two GPUs: every GPU holds two workers' shards
    ((1, 2, 4), 1),
    ((2, 2, 4), 2),  # gpu_ids are handed out in turn: the two workers' GPUs overlap on one
    ((2, 1, 1), 2),  # two workers on one GPU
    ((3, 1, 2), 2),
]


@pytest.mark.parametrize("args, expected", WORKERS_PER_GPU, ids=[str(a) for a, _ in WORKERS_PER_GPU])
def test_workers_sharing_a_gpu_are_counted_from_torchserves_round_robin(args: Tuple[int, int, int], expected: int) -> None:
    assert workers_per_gpu(*args) == expected


def test_a_served_worker_plans_on_its_share_of_each_gpu() -> None:
    cfg = resolve_model_config(small_model_config(device="auto"))
    own = serving_config(cfg, gpu_id=2, cuda_count=4)
    assert (own["device"], own["world_size"], own["gpu_memory_fraction"]) == ("cuda:2", 1, 1.0)
    spread = serving_config({**cfg, "world_size": 2, "gpu_memory_fraction": 0.9}, gpu_id=3, cuda_count=4)
    assert (spread["device"], spread["world_size"], spread["gpu_memory_fraction"]) == ("cuda:3", 2, 0.45)
    two_on_one = serving_config(cfg, gpu_id=0, cuda_count=1, workers=2)  # maxWorkers 2, one GPU
    assert two_on_one["gpu_memory_fraction"] == 0.5
    assert serving_config(cfg, gpu_id=None, cuda_count=4)["device"] == "cpu"  # number_of_gpu=0


def test_the_handler_serves_on_the_cpu_when_torchserve_gives_it_no_gpu(tmp_path: Any) -> None:
    from test_handler import stand_in_context  # TorchServe's own Context, gpu=None

    from dlrm_handler import TorchRecDLRMHandler

    with open(tmp_path / "model_config.json", "w") as f:
        json.dump(small_model_config(device="auto"), f)
    handler = TorchRecDLRMHandler()
    handler.initialize(stand_in_context(str(tmp_path), 0))
    assert handler.config["device"] == "cpu"
    assert handler.device == torch.device("cpu")


# --- a config that cannot fit its GPUs: refused before allocating ------------------------------


def planned_model(config: Dict[str, Any]) -> Tuple[torch.nn.Module, List[Any], Dict[str, Any]]:
    """Steps 2-4 of ``config`` (the tables on meta: nothing allocated)."""
    cfg = resolve_model_config(config)
    eb_configs = dlrm_factory.build_embedding_bag_configs(cfg)
    model = dlrm_factory.quantize_tables(dlrm_factory.build_dlrm(cfg, eb_configs, torch.device("meta")), cfg["quant_dtype"])
    return model, eb_configs, cfg


def test_tables_larger_than_the_gpu_share_are_refused_naming_bytes_per_rank() -> None:
    """The small config's int8 tables on CUDA: 8,000 rows x 32 B (16 B rows padded) = 256,000 B,
    planned for a worker whose share of cuda:3 is 200,000 B."""
    model, eb_configs, cfg = planned_model(small_model_config())
    with pytest.raises(ValueError) as error:
        plan_to_fit(model, eb_configs, cfg, "cuda", 1, {3: (200_000, 10**10)})
    message = str(error.value)
    assert "tables do not fit the GPU memory this process may use (TorchRec's planner found no plan" in message
    assert "rank 0 on cuda:3: 256,000 B (0.00 GB) of tables, 200,000 B (0.00 GB) to plan on" in message
    assert "quant_dtype is 'int8'" in message and "world_size is 1" in message and "gpu_memory_fraction" in message


def test_tables_larger_than_the_free_gpu_memory_are_refused() -> None:
    model, eb_configs, cfg = planned_model(small_model_config(world_size=2))
    with pytest.raises(ValueError, match=r"\(not enough free memory\): rank 0 on cuda:1: .* 50,000 B \(0.00 GB\) free"):
        plan_to_fit(model, eb_configs, cfg, "cuda", 2, {1: (10**9, 50_000), 0: (10**9, 10**9)})


def test_a_plan_that_fits_puts_each_rank_on_its_logical_device() -> None:
    """The plan (and so the store entry's key) names cuda:0..k-1 whichever GPUs the worker has."""
    model, eb_configs, cfg = planned_model(small_model_config(world_size=2))
    plan = plan_to_fit(model, eb_configs, cfg, "cuda", 2, {3: (10**9, 10**9), 0: (10**9, 10**9)})
    per_device = table_bytes_per_device(plan, cfg, "cuda")
    assert sorted(per_device) == ["rank 0 (cuda:0)", "rank 1 (cuda:1)"]
    assert sum(per_device.values()) == 8000 * 32


def test_torchrec_ranks_run_on_the_workers_gpus_and_one_placement_per_process(monkeypatch: Any) -> None:
    """``place_ranks_on_gpus`` points TorchRec's callers of rank_device at the worker's GPUs
    (the devices are only named here: no GPU is touched)."""
    monkeypatch.setattr(dlrm_factory, "_RANK_GPUS", {})
    monkeypatch.setattr(torchrec_dist_data, "rank_device", torchrec_dist_data.rank_device)  # restored after
    monkeypatch.setattr(torchrec_embedding_lookup, "rank_device", torchrec_embedding_lookup.rank_device)

    dlrm_factory.place_ranks_on_gpus([3, 0])

    assert torchrec_embedding_lookup.rank_device("cuda", 0) == torch.device("cuda", 3)  # the TBEs
    assert torchrec_dist_data.rank_device("cuda", 1) == torch.device("cuda", 0)  # KJTOneToAll's copies
    assert torchrec_dist_data.rank_device("cpu", 1) == torch.device("cpu")
    dlrm_factory.place_ranks_on_gpus([3])  # a second model on the same GPU: fine
    with pytest.raises(ValueError, match=r"rank: \(there, asked\)\) \{0: \(3, 1\)\}: one GPU placement per process"):
        dlrm_factory.place_ranks_on_gpus([1])


# --- the store entry: sequential for the GPU copy, random for CPU lookups ----------------------


def vma_at(address: int) -> Dict[str, Any]:
    """The mapping of this process holding ``address``: its VmFlags and Rss (kB), as the
    kernel reports them in /proc/self/smaps."""
    found: Optional[Dict[str, Any]] = None
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" not in fields[0]:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                found = {"range": (start, end)} if start <= address < end else None
                if found is None and start > address:
                    break
            elif found is not None and fields[0] == "Rss:":
                found["Rss"] = int(fields[1])
            elif found is not None and fields[0] == "VmFlags:":
                found["VmFlags"] = fields[1:]
                return found
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.fixture(scope="module")
def entry_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small config's store entry (int8, D = 20: rows of 24 B on the CPU, 32 B on a GPU)."""
    store = str(tmp_path_factory.mktemp("store"))
    config = small_model_config(embedding_dim=20, dense_arch_layer_sizes=[32, 20], table_store=store,
                                num_embeddings_per_feature=[60_000, 2000, 5000])  # fmt: skip
    return DLRMFactory(config).table_store_entry["path"]


def open_for(path: str, access: str) -> dlrm_table_store.Entry:
    digest = dlrm_table_store.key_digest(json.loads(_metadata(path)["key_json"]))
    return dlrm_table_store.open_entry(path, digest, access=access)


@pytest.mark.parametrize("access, flag", [("sequential", "sr"), ("random", "rr")])
def test_the_entry_is_advised_as_it_will_be_read(entry_path: str, access: str, flag: str) -> None:
    """VmFlags sr: sequential read advised (the GPU copy: readahead); rr: random read (CPU lookups)."""
    entry = open_for(entry_path, access)
    flags = vma_at(entry.tensors[0].data_ptr())["VmFlags"]
    assert flag in flags
    assert ({"sr", "rr"} - {flag}).isdisjoint(flags)


def padded_tbe_like(entry: dlrm_table_store.Entry) -> IntNBitTableBatchedEmbeddingBagsCodegen:
    """A CPU TBE of the entry's tables with rows padded to 16 B, as a GPU's are."""
    specs = [(t["name"], t["rows"], t["dim"], SparseType(t["dtype"]), EmbeddingLocation.HOST)
             for t in entry.layouts[0]["tables"]]  # fmt: skip
    tbe = IntNBitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=specs, pooling_mode=PoolingMode.SUM, output_dtype=SparseType.FP32, device="cpu", row_alignment=16
    )
    tbe.initialize_weights()
    return tbe


def test_the_copy_to_the_tables_drops_the_pages_it_has_copied(entry_path: str) -> None:
    entry = open_for(entry_path, "sequential")
    tbe = padded_tbe_like(entry)
    mapped = entry.tensors[0]
    assert mapped.numel() > 1 << 20  # 1.5 MB: 20 chunks of 4096 rows, several pages each

    dlrm_table_store.copy_into_tbes(entry, [tbe], chunk_rows=4096)

    assert vma_at(mapped.data_ptr())["Rss"] == 0  # every copied chunk dropped from this process
    rows = dlrm_table_store.table_shards(open_for(entry_path, "random").tensors[0], entry.layouts[0])
    copied = tbe.split_embedding_weights(split_scale_shifts=False)
    assert [c.shape[1] for c, _ in copied] == [32, 32, 32]  # rows of 24 B padded to 16 B multiples
    for (name, _, codes, scale_bias), (padded, _) in zip(rows, copied):
        stored = codes if scale_bias is None else torch.cat([scale_bias, codes], dim=1)
        assert torch.equal(padded[:, : stored.shape[1]], stored), name


def test_a_copy_into_tables_of_other_names_is_refused(entry_path: str) -> None:
    entry = open_for(entry_path, "sequential")
    tbe = padded_tbe_like(entry)
    renamed = [("t_other" if i == 1 else n, *rest) for i, (n, *rest) in enumerate(tbe.embedding_specs)]
    tbe.embedding_specs = renamed
    with pytest.raises(dlrm_table_store.StoreError, match=r"the TBE holds tables \['t_cat_0', 't_other', 't_cat_2'\]"):
        dlrm_table_store.copy_into_tbes(entry, [tbe])


def test_an_entry_built_for_serving_is_the_one_the_worker_maps(tmp_path: Any) -> None:
    """``build_store_entry`` (create_dlrm_mar.sh --table-store) builds the entry the first
    worker looks for, and that worker maps it instead of building it."""
    config = small_model_config(device="auto", table_store=str(tmp_path))
    built = build_store_entry(config)
    served = DLRMFactory(serving_config(resolve_model_config(config), gpu_id=None, cuda_count=0)).table_store_entry
    assert built["built"] is True
    assert served == {"path": built["path"], "built": False}


def test_a_gpu_workers_entry_is_built_without_putting_a_table_on_a_device(tmp_path: Any) -> None:
    """What ``build_store_entry`` does on a GPU host, run here: the CUDA plan (16-B rows on the
    device), TorchRec sharding onto ``meta``. The entry is built, no TBE holds memory, and its
    bytes are the CPU entry's (the host layout is the same on every device)."""
    config = small_model_config(table_store=str(tmp_path))
    model, eb_configs, cfg = planned_model(config)
    plan = plan_to_fit(model, eb_configs, cfg, "cuda", 1, {0: (10**9, 10**9)})
    with dlrm_factory.tables_on_meta():
        gpu_model = dlrm_factory.tables_from_store(model, plan, cfg, eb_configs, "cuda", 1)
    tbes = list(dlrm_factory._sharded_tbes(gpu_model))
    assert [(tbe.row_alignment, tbe.weights_dev.is_meta, tbe.weights_host.is_meta) for tbe in tbes] == [(16, True, True)]
    gpu_entry = gpu_model.table_store_entry
    cpu_entry = DLRMFactory(config).table_store_entry
    assert gpu_entry["built"] and "-cuda1-" in gpu_entry["path"] and "-cpu1-" in cpu_entry["path"]
    assert torch.equal(open_for(gpu_entry["path"], "random").tensors[0], open_for(cpu_entry["path"], "random").tensors[0])


# --- init that does not depend on the device ---------------------------------------------------


def weights_of(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The dense layers' parameters and every table's stored bytes."""
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    for tbe in dlrm_factory._sharded_tbes(model):
        for (rows, _), spec in zip(tbe.split_embedding_weights(split_scale_shifts=False), tbe.embedding_specs):
            weights[spec[0]] = rows.clone()
    return weights


def test_the_same_seed_gives_bit_identical_weights_whatever_device_was_asked_for() -> None:
    """Every request that ends on this host's CPU goes through select_devices and build_dlrm
    (the dense layers are drawn on the CPU, then moved), with one rank or two."""
    asked = [
        small_model_config(device="cpu"),
        small_model_config(device="auto"),
        serving_config(resolve_model_config(small_model_config(device="auto")), gpu_id=None, cuda_count=0),
        small_model_config(device="auto", world_size=2),
    ]
    models = [DLRMFactory(config) for config in asked]
    reference = weights_of(models[0])
    assert len(reference) == 3 + 2 * 2 + 3 * 2  # 3 tables, dense 2 layers, over 3 layers (w, b)
    for model in models[1:]:
        weights = weights_of(model)
        tables = [n for n in reference if n.startswith("t_")]
        dense = [n for n in reference if not n.startswith("t_")]
        assert all(torch.equal(weights[n], reference[n]) for n in dense)
        assert all(torch.equal(weights[n], reference[n]) for n in tables if n in weights)
        assert torch.equal(score(model), score(models[0]))


def test_the_dense_layers_are_drawn_on_the_cpu_as_torchrec_draws_them_for_the_seed() -> None:
    """build_dlrm draws on the CPU, then moves: its dense layers are plain TorchRec's on the CPU
    for that seed, whatever ``dense_device`` it is given."""
    cfg = resolve_model_config(small_model_config(seed=7))
    eb_configs = dlrm_factory.build_embedding_bag_configs(cfg)
    on_cpu = dlrm_factory.build_dlrm(cfg, eb_configs, torch.device("cpu"))
    torch.manual_seed(7)  # what plain TorchRec gives on the CPU for this seed
    plain = dlrm_factory.DLRM(
        embedding_bag_collection=dlrm_factory.EmbeddingBagCollection(tables=eb_configs, device=torch.device("meta")),
        dense_in_features=13, dense_arch_layer_sizes=[32, 16], over_arch_layer_sizes=[32, 16, 1],
    )  # fmt: skip
    dense = [n for n, _ in on_cpu.named_parameters() if "sparse_arch" not in n]
    assert len(dense) == 10
    assert all(torch.equal(dict(on_cpu.named_parameters())[n], dict(plain.named_parameters())[n]) for n in dense)


def test_building_leaves_the_callers_cpu_and_cuda_rng_states_as_they_were() -> None:
    """CPU: the generator's state. CUDA: this host has none, but ``torch.manual_seed`` would
    queue a seed for every CUDA generator (``torch.cuda._lazy_seed_tracker``, run when CUDA
    starts); the build queues none."""
    torch.manual_seed(1234)
    cpu_state = torch.get_rng_state()
    cuda_seeds = torch.cuda._lazy_seed_tracker.get_calls()
    DLRMFactory(small_model_config(seed=5))
    assert torch.equal(torch.get_rng_state(), cpu_state)
    after = torch.cuda._lazy_seed_tracker.get_calls()
    assert all(a is b for a, b in zip(after, cuda_seeds)) and len(after) == len(cuda_seeds)


# --- the small refusals ------------------------------------------------------------------------


@pytest.mark.parametrize("quant_dtype, embedding_dim", [("int8", 6), ("int4", 8), ("fp16", 5), ("fp32", 3)])
def test_embedding_dims_the_quant_dtype_allows_build_and_score(quant_dtype: str, embedding_dim: int) -> None:
    model = DLRMFactory(small_model_config(quant_dtype=quant_dtype, embedding_dim=embedding_dim,
                                          dense_arch_layer_sizes=[32, embedding_dim]))  # fmt: skip
    assert torch.isfinite(score(model)).all()


def test_the_lean_forward_refuses_a_model_that_is_not_on_the_cpu() -> None:
    model = DLRMFactory(small_model_config())
    model.dense_arch.to("meta")  # stands for a GPU: the dense layers elsewhere than the CPU
    with pytest.raises(ValueError, match=r"optimize_for_inference: the model is on \['cpu', 'meta'\]; the lean forward is for CPU models"):
        optimize_for_inference(model)


# --- scripts/gpu_check.py ----------------------------------------------------------------------


def test_the_gpu_check_says_there_is_no_gpu_here_and_exits_0() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: run scripts/gpu_check.py itself")
    done = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "gpu_check.py")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "gpu_check: no CUDA device is visible" in done.stdout
    assert "nothing checked" in done.stdout


# --- workers: TorchServe's default, from the devices --------------------------------------------


def test_the_shipped_configs_let_torchserve_start_its_default_workers(tmp_path: Any) -> None:
    """Neither model-config.yaml nor config.properties sets a worker count, so TorchServe 0.12
    starts a preloaded dlrm.mar with its default: one worker per GPU, else (here) one per CPU
    core, the counts its log states. The server is scripts/torchserve_process.py's, as
    ``make demo`` and the benchmarks start it (the tests' servers set one worker)."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: scripts/gpu_check.py covers GPU hosts")
    from serving import build_mar
    from torchserve_process import TorchServe, read_properties

    build_mar(small_model_config(device="auto"), str(tmp_path))
    properties = read_properties(os.path.join(REPO, "config.properties"), resolve_paths=True)
    server = TorchServe(str(tmp_path), str(tmp_path / "model_store"), properties=properties, models=["dlrm=dlrm.mar"],
                        env={"DLRM_TABLE_STORE": str(tmp_path / "table_store")})  # fmt: skip
    try:
        server.wait_for_model("dlrm")
        with open(os.path.join(server.log_dir, "ts_log.log"), errors="replace") as f:
            log = f.read()
        cpus = int(log.split("Number of CPUs: ")[1].split()[0])
        assert "Number of GPUs: 0" in log and f"Default workers per model: {cpus}" in log
        server.wait_until(f"{cpus} READY workers",
                          lambda: sum(w.get("status") == "READY" for w in server.workers("dlrm")) == cpus, 300)  # fmt: skip
        assert len(server.workers("dlrm")) == cpus
    finally:
        server.stop()
