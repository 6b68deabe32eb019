"""The table store (SPEC §7, dlrm_table_store.py): a config's quantized tables written once to
a safetensors file, then memory-mapped by every process that serves that config.

What is shown here, with small configs: store on and off score bit-identically; an entry is
found again by its key and only by it; the tables are file pages, not anonymous memory; two
processes map one entry; two processes starting together build it once; a truncated,
corrupted or mismatched entry is never served; a killed or failed build leaves nothing a
later start uses; a read-only store serves its prebuilt entry and refuses what it cannot
rebuild; the CUDA path's copy (entry -> TBEs with padded rows) gives the same lookups.
"""

import glob
import json
import os
import random
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Tuple

import pytest
import torch
from conftest import REPO, small_model_config
from fbgemm_gpu.split_embedding_configs import SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen
from serving import direct_scores, random_samples

import dlrm_table_store
from dlrm_factory import DLRMFactory, resolve_model_config

STORE_PROCESS = os.path.join(REPO, "tests", "store_process.py")
PROCESS_TIMEOUT_S = 240


def scores_of(model: torch.nn.Module, config: Dict[str, Any]) -> List[float]:
    """The logits of 16 fixed samples (multi-hot, empty bags too)."""
    cfg = resolve_model_config(config)
    samples = random_samples(random.Random(7), 16, cfg["num_embeddings_per_feature"])
    return direct_scores(model, cfg["id_list_features_keys"], samples)


def entries(store: str) -> List[str]:
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(store, "*.safetensors")))


def temp_files(store: str) -> List[str]:
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(store, ".*.tmp.*")))


def write_config(path: str, config: Dict[str, Any]) -> str:
    with open(path, "w") as f:
        json.dump(config, f)
    return path


def start_store_process(config_path: str, *flags: str) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, STORE_PROCESS, config_path, *flags],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stdout.readline().strip() == "ready", process.stderr.read()
    return process


def result_of(process: subprocess.Popen) -> Dict[str, Any]:
    """The JSON line a store process prints after building (fails with its stderr)."""
    line = process.stdout.readline()
    if not line:
        process.wait(timeout=PROCESS_TIMEOUT_S)
        pytest.fail(f"store process exited {process.returncode}:\n{process.stderr.read()[-3000:]}")
    return json.loads(line)


# --- where serving keeps its store ---------------------------------------------------------


def test_a_serving_worker_takes_the_environments_store_then_the_configs_then_the_cache(monkeypatch: Any) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", "/var/cache/x")
    monkeypatch.delenv("DLRM_TABLE_STORE", raising=False)
    assert dlrm_table_store.served_store_dir(None) == "/var/cache/x/dlrm/table_store"
    assert dlrm_table_store.served_store_dir("/srv/store") == "/srv/store"
    monkeypatch.setenv("DLRM_TABLE_STORE", "/mnt/models/table_store")  # the deployment's say wins
    assert dlrm_table_store.served_store_dir("/srv/store") == "/mnt/models/table_store"
    monkeypatch.setenv("DLRM_TABLE_STORE", "off")
    assert dlrm_table_store.served_store_dir("/srv/store") is None


def test_a_served_relative_table_store_is_refused_naming_the_key(monkeypatch: Any) -> None:
    monkeypatch.delenv("DLRM_TABLE_STORE", raising=False)
    with pytest.raises(ValueError, match=r"'table_store' is 'store'; expected an absolute path when served"):
        dlrm_table_store.served_store_dir("store")


# --- same bytes, store on or off ---------------------------------------------------------

STORE_CASES = [
    {"quant_dtype": dtype, "world_size": world_size}
    for dtype in ("int8", "int4", "fp16", "fp32")
    for world_size in (1, 2)
] + [{"quant_dtype": "int8", "world_size": 2, "sharding_type": "row_wise"}]


@pytest.mark.parametrize("overrides", STORE_CASES, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_store_on_and_off_score_bit_identically(tmp_path: Any, overrides: Dict[str, Any]) -> None:
    config = small_model_config(**overrides)
    without = scores_of(DLRMFactory(config), config)

    built = DLRMFactory({**config, "table_store": str(tmp_path)})
    mapped = DLRMFactory({**config, "table_store": str(tmp_path)})

    assert built.table_store_entry["built"] and not mapped.table_store_entry["built"]
    assert built.table_store_entry["path"] == mapped.table_store_entry["path"]
    assert scores_of(built, config) == without
    assert scores_of(mapped, config) == without


def test_a_checkpoint_served_through_the_store_scores_as_without_it(tmp_path: Any) -> None:
    config = small_model_config(seed=3)
    checkpoint = str(tmp_path / "float.pt")
    float_model = DLRMFactory(small_model_config(quant_dtype="fp32", seed=5))  # any weights
    state = {}
    for name, tensor in float_model.state_dict().items():
        if "embedding_bags" not in name:
            state[name] = tensor
    for feature, rows in zip(["cat_0", "cat_1", "cat_2"], config["num_embeddings_per_feature"]):
        state[f"sparse_arch.embedding_bag_collection.embedding_bags.t_{feature}.weight"] = torch.randn(rows, 16) * 0.1
    torch.save(state, checkpoint)
    config["checkpoint"] = checkpoint

    without = scores_of(DLRMFactory(config), config)
    built = DLRMFactory({**config, "table_store": str(tmp_path / "store")})
    mapped = DLRMFactory({**config, "table_store": str(tmp_path / "store")})

    assert not mapped.table_store_entry["built"]
    assert scores_of(built, config) == without == scores_of(mapped, config)


# --- the key ---------------------------------------------------------------------------------

BYTES_CHANGE = [
    {"seed": 1},
    {"quant_dtype": "int4"},
    {"num_embeddings_per_feature": [1000, 2000, 5001]},
    {"embedding_dim": 8, "dense_arch_layer_sizes": [32, 8]},
    {"world_size": 2},
    {"id_list_features_keys": ["a", "b", "c"]},
]
SERVING_ONLY = [
    {"id_overflow": "hash"},
    {"max_samples_per_request": 7},
    {"response_format": "upstream"},
    {"over_arch_layer_sizes": [64, 1]},  # dense layers: rebuilt from the seed at every start
]


def test_what_decides_the_bytes_names_another_entry_and_serving_keys_do_not(tmp_path: Any) -> None:
    store = str(tmp_path)
    base = DLRMFactory(small_model_config(table_store=store)).table_store_entry["path"]

    for overrides in BYTES_CHANGE:
        entry = DLRMFactory(small_model_config(table_store=store, **overrides)).table_store_entry
        assert entry["built"] and entry["path"] != base, overrides
    for overrides in SERVING_ONLY:
        entry = DLRMFactory(small_model_config(table_store=store, **overrides)).table_store_entry
        assert not entry["built"] and entry["path"] == base, overrides
    assert len(entries(store)) == 1 + len(BYTES_CHANGE)


def test_a_changed_checkpoint_is_another_entry(tmp_path: Any) -> None:
    """A checkpoint's identity is its content (sha256), not its path."""
    config = small_model_config()
    checkpoint = str(tmp_path / "ckpt.pt")
    state = DLRMFactory(small_model_config(quant_dtype="fp32")).state_dict()
    float_state = {k: v for k, v in state.items() if "embedding_bags" not in k}
    for feature, rows in zip(["cat_0", "cat_1", "cat_2"], config["num_embeddings_per_feature"]):
        float_state[f"sparse_arch.embedding_bag_collection.embedding_bags.t_{feature}.weight"] = torch.ones(rows, 16)
    torch.save(float_state, checkpoint)
    first = DLRMFactory({**config, "checkpoint": checkpoint, "table_store": str(tmp_path)}).table_store_entry

    float_state["sparse_arch.embedding_bag_collection.embedding_bags.t_cat_0.weight"][0, 0] = 2.0
    torch.save(float_state, checkpoint)
    second = DLRMFactory({**config, "checkpoint": checkpoint, "table_store": str(tmp_path)}).table_store_entry

    assert first["built"] and second["built"] and first["path"] != second["path"]


# --- file pages, shared ----------------------------------------------------------------------


def smaps_of(pid: int, path: str) -> Dict[str, int]:
    """Summed kB fields (Rss, Anonymous, Shared_Clean, ...) of ``pid``'s mappings of ``path``."""
    totals: Dict[str, int] = {}
    inside = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's first line
                inside = fields[-1] == path
            elif inside and fields[0].endswith(":") and len(fields) >= 2 and fields[1].isdigit():
                totals[fields[0][:-1]] = totals.get(fields[0][:-1], 0) + int(fields[1])
    return totals


def test_the_served_tables_are_file_pages_not_anonymous_memory(tmp_path: Any) -> None:
    config = small_model_config(num_embeddings_per_feature=[200_000, 100_000, 50_000], table_store=str(tmp_path))
    model = DLRMFactory(config)
    scores_of(model, config)

    mapped = smaps_of(os.getpid(), model.table_store_entry["path"])
    assert mapped["Rss"] > 0  # the tables are this file's pages ...
    assert mapped["Anonymous"] == 0  # ... none copied into private memory


def test_two_processes_map_one_entry_and_score_identically(tmp_path: Any) -> None:
    config = small_model_config(num_embeddings_per_feature=[200_000, 100_000, 50_000], table_store=str(tmp_path / "store"))
    prebuilt = DLRMFactory(config)
    expected = scores_of(prebuilt, config)
    config_path = write_config(str(tmp_path / "config.json"), config)

    processes = [start_store_process(config_path, "--hold") for _ in range(2)]
    try:
        results = [result_of(p) for p in processes]
        shared = [smaps_of(p.pid, prebuilt.table_store_entry["path"]) for p in processes]
    finally:
        for p in processes:
            p.communicate(timeout=PROCESS_TIMEOUT_S)
    assert [r["built"] for r in results] == [False, False]
    assert [r["scores"] for r in results] == [expected, expected]
    for pages in shared:
        assert pages["Rss"] > 0 and pages["Anonymous"] == 0
        assert pages["Shared_Clean"] > 0  # the same page-cache pages as the other process


def test_two_processes_starting_together_build_the_entry_once(tmp_path: Any) -> None:
    # ~160 MB of tables: a build lasts long enough for the other process to find it running.
    config = small_model_config(num_embeddings_per_feature=[4_000_000, 2_000_000, 2_000_000], table_store=str(tmp_path / "store"))
    config_path = write_config(str(tmp_path / "config.json"), config)
    go = str(tmp_path / "go")

    processes = [start_store_process(config_path, "--go", go) for _ in range(2)]
    open(go, "w").close()  # both call DLRMFactory now
    results = [result_of(p) for p in processes]
    for p in processes:
        p.communicate(timeout=PROCESS_TIMEOUT_S)

    assert sorted(r["built"] for r in results) == [False, True]
    assert results[0]["path"] == results[1]["path"] and results[0]["scores"] == results[1]["scores"]
    assert len(entries(config["table_store"])) == 1 and temp_files(config["table_store"]) == []


# --- never serve a bad entry -------------------------------------------------------------


def truncate(path: str) -> None:
    os.truncate(path, os.path.getsize(path) - 100)


def flip_a_table_byte(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def break_the_header(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"[not json")


DAMAGE = {"truncated": truncate, "a table byte flipped": flip_a_table_byte, "header broken": break_the_header}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_entry_is_rebuilt_not_served(tmp_path: Any, damage: str, caplog: Any) -> None:
    config = small_model_config(table_store=str(tmp_path))
    expected = scores_of(DLRMFactory({**config, "table_store": None}), config)
    path = DLRMFactory(config).table_store_entry["path"]
    DAMAGE[damage](path)

    with caplog.at_level("WARNING", logger="dlrm_table_store"):
        model = DLRMFactory(config)

    assert model.table_store_entry == {"path": path, "built": True}
    assert scores_of(model, config) == expected
    assert any(path in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records)


def test_another_configs_entry_under_this_name_is_rebuilt_not_served(tmp_path: Any) -> None:
    config = small_model_config(table_store=str(tmp_path))
    expected = scores_of(DLRMFactory({**config, "table_store": None}), config)
    path = DLRMFactory(config).table_store_entry["path"]
    other = DLRMFactory({**config, "seed": 1}).table_store_entry["path"]
    os.replace(other, path)  # seed 1's tables where seed 0's belong

    model = DLRMFactory(config)

    assert model.table_store_entry["built"]
    assert scores_of(model, config) == expected


def test_the_verify_command_checks_every_block_and_names_the_bad_entry(tmp_path: Any) -> None:
    good = DLRMFactory(small_model_config(table_store=str(tmp_path))).table_store_entry["path"]
    bad = DLRMFactory(small_model_config(table_store=str(tmp_path), seed=2)).table_store_entry["path"]
    flip_a_table_byte(bad)

    run = subprocess.run([sys.executable, os.path.join(REPO, "dlrm_table_store.py"), "verify", str(tmp_path)],
                         capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S)  # fmt: skip

    assert run.returncode == 1
    assert f"ok       {good}" in run.stdout
    assert f"BAD      {bad}: corrupted: tbe0 bytes" in run.stdout


# --- builds that do not finish ------------------------------------------------------------


def test_a_killed_build_leaves_nothing_a_later_start_uses(tmp_path: Any) -> None:
    store = str(tmp_path / "store")
    # ~1.2 GB of int8 tables: seconds to fill, so the kill lands in the middle.
    config = small_model_config(num_embeddings_per_feature=[30_000_000, 20_000_000, 10_000_000], table_store=store)
    process = start_store_process(write_config(str(tmp_path / "config.json"), config))
    deadline = time.monotonic() + PROCESS_TIMEOUT_S
    while not temp_files(store) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=PROCESS_TIMEOUT_S)

    assert process.returncode == -signal.SIGKILL
    assert entries(store) == [] and len(temp_files(store)) == 1  # nothing published

    small = small_model_config(num_embeddings_per_feature=[30_000, 20_000, 10_000], table_store=store)
    name = os.path.basename(DLRMFactory(small).table_store_entry["path"])
    assert entries(store) == [name]  # another config's build leaves the stale temp alone ...
    model = DLRMFactory(config)  # ... its own next build removes it
    assert model.table_store_entry["built"] and temp_files(store) == []


def test_a_build_that_runs_out_of_space_fails_clearly_and_leaves_nothing(tmp_path: Any) -> None:
    """The file-size limit makes the kernel refuse the space reservation, as a full disk does."""
    store = str(tmp_path / "store")
    config_path = write_config(str(tmp_path / "config.json"), small_model_config(table_store=store))
    limited = (
        "import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); "
        f"sys.argv = [{STORE_PROCESS!r}, {config_path!r}]; runpy.run_path({STORE_PROCESS!r}, run_name='__main__')"
    )
    run = subprocess.run([sys.executable, "-c", limited], capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S)

    assert run.returncode != 0
    assert "table store: cannot reserve" in run.stderr and store in run.stderr
    assert "free some space or point table_store elsewhere" in run.stderr
    assert entries(store) == [] and temp_files(store) == []


# --- read-only stores ----------------------------------------------------------------------


def run_read_only(store: str, config_path: str) -> subprocess.CompletedProcess:
    """store_process.py with ``store`` bind-mounted read-only (a KServe PVC mounted ro): in a
    user and mount namespace, so no privilege is needed and nothing else sees the mount."""
    script = f"mount --bind {store} {store} && mount -o remount,ro,bind {store} && exec {sys.executable} {STORE_PROCESS} {config_path}"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount --bind {store} {store}"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"no user namespaces here for a read-only mount: {probe.stderr.decode().strip()}")
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S)


def test_a_read_only_store_serves_its_prebuilt_entry(tmp_path: Any) -> None:
    store = str(tmp_path / "store")
    config = small_model_config(table_store=store)
    prebuilt = DLRMFactory(config)

    run = run_read_only(store, write_config(str(tmp_path / "config.json"), config))

    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["built"] is False and result["scores"] == scores_of(prebuilt, config)


@pytest.mark.parametrize("state", ["missing", "corrupted"])
def test_a_read_only_store_refuses_what_it_cannot_rebuild_naming_the_file(tmp_path: Any, state: str) -> None:
    store = str(tmp_path / "store")
    config = small_model_config(table_store=store)
    os.makedirs(store)
    if state == "corrupted":
        flip_a_table_byte(DLRMFactory(config).table_store_entry["path"])

    run = run_read_only(store, write_config(str(tmp_path / "config.json"), config))

    assert run.returncode != 0
    assert f"table store {store} is read-only and its entry {store}/int8-3t-cpu1-" in run.stderr
    assert ("is missing" if state == "missing" else "is corrupted: tbe0 bytes") in run.stderr
    assert "./create_dlrm_mar.sh --table-store DIR" in run.stderr


# --- the CUDA path's layout, on the CPU ------------------------------------------------------


@pytest.mark.parametrize("quant_dtype", ["int8", "int4", "fp16"])
def test_copying_an_entry_into_tbes_with_padded_rows_gives_the_same_lookups(tmp_path: Any, quant_dtype: str) -> None:
    """On CUDA the TBEs own their weights, rows padded to 16 B: ``copy_into_tbes`` fills
    them from the entry. Here a CPU TBE with 16 B row alignment stands in for a GPU's
    (D = 20: rows of 24, 14 and 40 B, padded to 32, 16 and 48)."""
    config = small_model_config(quant_dtype=quant_dtype, embedding_dim=20, dense_arch_layer_sizes=[32, 20], table_store=str(tmp_path))
    model = DLRMFactory(config)
    entry = dlrm_table_store.open_entry(model.table_store_entry["path"], dlrm_table_store.key_digest(
        json.loads(_metadata(model.table_store_entry["path"])["key_json"])))  # fmt: skip
    (mapped_tbe,) = model.sparse_arch.embedding_bag_collection.tbes_configs()
    padded = IntNBitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[(n, rows, dim, ty, EmbeddingLocation.HOST) for n, rows, dim, ty, _ in mapped_tbe.embedding_specs],
        pooling_mode=PoolingMode.SUM,
        output_dtype=SparseType.FP32,
        device="cpu",
        row_alignment=16,
    )
    padded.initialize_weights()

    dlrm_table_store.copy_into_tbes(entry, [padded])

    sizes = config["num_embeddings_per_feature"]
    ids, offsets = _random_bags(sizes)
    assert padded.row_alignment == 16 and padded.weights_host.numel() > entry.tensors[0].numel()
    torch.testing.assert_close(padded(ids, offsets), mapped_tbe(ids, offsets), rtol=0, atol=0)


def _metadata(path: str) -> Dict[str, str]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.metadata()


def _random_bags(sizes: List[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Ids and offsets of 8 bags per table (0-3 ids each), table after table."""
    rng = random.Random(3)
    bags = [[rng.randrange(size) for _ in range(rng.randint(0, 3))] for size in sizes for _ in range(8)]
    offsets = [0]
    for bag in bags:
        offsets.append(offsets[-1] + len(bag))
    return torch.tensor([i for bag in bags for i in bag], dtype=torch.int32), torch.tensor(offsets, dtype=torch.int32)
