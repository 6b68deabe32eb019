"""Background verification of table store entries (SPEC §8): an entry checked only by sample
at open (above ``FULL_VERIFY_MAX_BYTES``) is checked whole while it serves, around the page
cache; a bad block takes the worker out and no later start serves that file (a writable store
rebuilds it, a read-only one refuses it).

Here a small entry counts as large: the tests set ``DLRM_STORE_FULL_VERIFY_MAX_BYTES`` (and
``DLRM_STORE_SAMPLED_BLOCKS=0``: the sample at open is the first and last block of each
tensor), so a byte flipped in a middle block passes the open and only the background check
can find it.
"""

import json
import os
import random
import subprocess
import sys
from typing import Any, Dict, Tuple

import pytest
from conftest import REPO, small_model_config
from safetensors import safe_open
from serving import direct_scores, make_request, predict, random_samples, served_models
from test_row_order import write_counts
from test_store_serving import ready_workers, wait_for_workers
from test_table_store import run_read_only, write_config

import dlrm_table_store
from dlrm_factory import DLRMFactory, resolve_model_config

# 7M rows of D = 16 int8 (20 B a row): tbe0 is 140 MB, three 64 MiB CRC blocks (0, 1, 2).
CONFIG = small_model_config(num_embeddings_per_feature=[4_000_000, 2_000_000, 1_000_000])
LARGE_ENOUGH = {"DLRM_STORE_FULL_VERIFY_MAX_BYTES": str(1 << 20), "DLRM_STORE_SAMPLED_BLOCKS": "0"}
MIDDLE = 1  # tbe0's middle block: never in the sample at open
VERIFY_MB_S = 16  # the background check reaches the middle block ~4 s after the worker starts


def flip_byte(path: str, tensor: str, block: int) -> Tuple[str, int]:
    """XOR the byte 4 KiB + 1 into ``block`` of ``tensor`` (in CONFIG's tbe0: the high byte of
    a row's float16 scale); (table, row) it belongs to."""
    first, _ = dlrm_table_store.tensor_file_offsets(path, [tensor])[tensor]
    position = block * dlrm_table_store.BLOCK_BYTES + 4097
    with open(path, "r+b") as f:
        f.seek(first + position)
        byte = f.read(1)
        f.seek(first + position)
        f.write(bytes([byte[0] ^ 0xFF]))
    with safe_open(path, framework="pt") as f:
        layouts = json.loads(f.metadata()["layouts"])
    (table,) = [t for t in layouts[int(tensor[3:])]["tables"] if t["offset"] <= position < t["offset"] + t["rows"] * t["row_bytes"]]
    return table["name"], (position - table["offset"]) // table["row_bytes"]


def ordered_entry(workdir: Any) -> Tuple[Dict[str, Any], str, Any]:
    """CONFIG ordered by counts, its entry built in ``workdir/store``: (config, entry, model)."""
    config = {**CONFIG, "id_counts": write_counts(str(workdir / "counts.safetensors"), CONFIG, ids_per_table=3000)}
    model = DLRMFactory({**config, "table_store": str(workdir / "store")})
    return config, model.table_store_entry["path"], model


def test_the_background_check_reads_every_block_around_the_page_cache_and_names_a_bad_one(tmp_path: Any) -> None:
    _, path, model = ordered_entry(tmp_path)
    del model
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        before = dlrm_table_store.resident_pages(f.fileno(), 0, os.path.getsize(path)).mean()
    identity = dlrm_table_store.file_identity(path)

    assert dlrm_table_store.verify_every_block(path, identity, bytes_per_s=1e12) is None
    with open(path, "rb") as f:
        after = dlrm_table_store.resident_pages(f.fileno(), 0, os.path.getsize(path)).mean()
    assert before < 0.02 and after < 0.02  # read with O_DIRECT: the page cache kept none of it

    flip_byte(path, "tbe0", MIDDLE)
    problem = dlrm_table_store.verify_every_block(path, dlrm_table_store.file_identity(path), bytes_per_s=1e12)
    first, _ = dlrm_table_store.tensor_file_offsets(path, ["tbe0"])["tbe0"]
    start = first + MIDDLE * dlrm_table_store.BLOCK_BYTES
    assert problem.startswith(f"{path}: block 1 of tbe0 (file bytes [{start}, {start + dlrm_table_store.BLOCK_BYTES})): CRC-32 ")


def test_a_bad_entry_found_in_a_read_only_store_is_refused_by_the_next_start(tmp_path: Any) -> None:
    config, path, model = ordered_entry(tmp_path)
    del model
    store = str(tmp_path / "store")
    flip_byte(path, "tbe0", MIDDLE)
    check = ("import sys; sys.path.insert(0, sys.argv[1]); import dlrm_table_store as s; p = sys.argv[2]; "
             "i = s.file_identity(p); s.condemn_entry(p, i, s.verify_every_block(p, i, 1e12))")  # fmt: skip
    found = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount --bind {store} {store} && mount -o remount,ro,bind {store} && "
                            f"exec {sys.executable} -c '{check}' {REPO} {path}"], capture_output=True, text=True, timeout=120)  # fmt: skip
    if found.returncode != 0 and "mount" in found.stderr:
        pytest.skip(f"no user namespaces here for a read-only mount: {found.stderr.strip()}")
    try:
        assert found.returncode == 0, found.stderr[-2000:]
        assert "is in a read-only store: recorded" in found.stderr and os.path.exists(path)

        run = run_read_only(store, write_config(str(tmp_path / "config.json"), {**config, "table_store": store}))

        assert run.returncode != 0
        assert f"table store {store} is read-only and its entry {path} is corrupted: {path}: block 1 of tbe0" in run.stderr
        assert "(found by a background check)" in run.stderr
    finally:
        os.unlink(dlrm_table_store._failure_record(path))


def test_a_byte_flipped_in_a_middle_block_is_caught_while_serving_and_the_worker_replaced(
    tmp_path: Any, monkeypatch: Any
) -> None:
    config, path, model = ordered_entry(tmp_path)
    cfg = resolve_model_config(config)
    samples = random_samples(random.Random(5), 4, cfg["num_embeddings_per_feature"])
    table, row = flip_byte(path, "tbe0", MIDDLE)
    (tbe,) = [t for t, _ in model.sparse_arch.embedding_bag_collection.tbes_configs().items()]
    feature = cfg["id_list_features_keys"].index(table[2:])
    map_start = [t["map_offset"] for t in json.loads(_metadata(path)["layouts"])[0]["tables"] if t["name"] == table][0]
    rows = cfg["num_embeddings_per_feature"][feature]
    (bad_id,) = (tbe.index_remappings_array[map_start : map_start + rows] == row).nonzero().view(-1).tolist()
    samples[0][1][feature] = [bad_id]  # the request looks up the flipped row
    del model, tbe
    expected = direct_scores(DLRMFactory({**config, "table_store": None}), cfg["id_list_features_keys"], samples)
    yaml = tmp_path / "one-worker.yaml"
    yaml.write_text("minWorkers: 1\nmaxWorkers: 1\nbatchSize: 1\nmaxBatchDelay: 1\nresponseTimeout: 120\nstartupTimeout: 600\n")
    monkeypatch.setenv("MODEL_YAML", str(yaml))  # create_dlrm_mar.sh packages it
    env = {"DLRM_TABLE_STORE": str(tmp_path / "store"), "DLRM_STORE_VERIFY_MB_S": str(VERIFY_MB_S), **LARGE_ENOUGH}

    with served_models(str(tmp_path), mars={"dlrm": config}, models={"dlrm": {}}, env=env) as server:
        (first,) = ready_workers(server)
        status, served = predict(server, "dlrm", make_request(samples))  # served while its check runs
        log = server.model_log("this worker exits", timeout=60)
        (second,) = wait_for_workers(server, 1, exclude=int(first["pid"]))
        server.model_log(f"table store: built {path}", timeout=60)
        status_after, answered = predict(server, "dlrm", make_request(samples))

    assert status == 200 and served["score"][0] != pytest.approx(expected[0], abs=1e-6)  # the bad row was live ...
    assert f"{path}: block 1 of tbe0" in log and f"table store: removed {path}" in log
    assert status_after == 200 and answered["score"] == pytest.approx(expected, rel=0, abs=1e-7)  # ... then rebuilt
    assert second["pid"] != first["pid"]


def _metadata(path: str) -> Dict[str, str]:
    with safe_open(path, framework="pt") as f:
        return f.metadata()
