"""The table store through a real TorchServe: the .mar's entry prebuilt by
``create_dlrm_mar.sh --table-store``, two workers of one model mapping that one file, and a
worker killed with -9 replaced by one that maps it again and answers bit-identically.
(The full default's start times and memory are in benchmarks/bench_store.py's serving run.)"""

import json
import os
import random
import signal
import subprocess
import time
from typing import Any, Dict, Iterator, List

import pytest
from conftest import REPO, small_model_config
from serving import TorchServe, make_request, predict, random_samples, served_models
from torchserve_process import http_request
from test_table_store import smaps_of

# 1.5M rows of D = 16 int8 (20 B a row): ~30 MB of tables, two workers.
CONFIG = small_model_config(num_embeddings_per_feature=[1_000_000, 400_000, 100_000])
WORKERS = 2
READY_TIMEOUT_S = 120


def ready_workers(server: TorchServe) -> List[Dict[str, Any]]:
    return [w for w in server.workers("dlrm") if w.get("status") == "READY"]


def wait_for_workers(server: TorchServe, count: int, exclude: int = -1) -> List[Dict[str, Any]]:
    """Until ``count`` workers are READY, none of them the process ``exclude``."""
    server.wait_until(
        f"{count} READY workers",
        lambda: len([w for w in ready_workers(server) if int(w["pid"]) != exclude]) == count,
        READY_TIMEOUT_S,
    )
    return ready_workers(server)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A store holding the config's entry, prebuilt by create_dlrm_mar.sh --table-store."""
    workdir = tmp_path_factory.mktemp("prebuild")
    config = workdir / "config.json"
    config.write_text(json.dumps(CONFIG))
    store = str(workdir / "store")
    subprocess.run([os.path.join(REPO, "create_dlrm_mar.sh"), "--config", str(config), "--export-path",
                    str(workdir / "unused"), "--table-store", store], check=True, timeout=300)  # fmt: skip
    return store


@pytest.fixture(scope="module")
def torchserve(tmp_path_factory: pytest.TempPathFactory, store: str) -> Iterator[TorchServe]:
    workdir = str(tmp_path_factory.mktemp("torchserve"))
    with served_models(workdir, mars={"dlrm": CONFIG}, models={"dlrm": {}}, env={"DLRM_TABLE_STORE": store}) as server:
        # However many workers the packaged YAML asks for, scale to WORKERS.
        status, body = http_request("PUT", f"{server.management}/models/dlrm?min_worker={WORKERS}&max_worker={WORKERS}")
        assert status in (200, 202), body
        wait_for_workers(server, WORKERS)
        yield server


def entry_of(store: str) -> str:
    (name,) = [n for n in os.listdir(store) if n.endswith(".safetensors")]
    return os.path.join(store, name)


def scores(server: TorchServe) -> List[float]:
    samples = random_samples(random.Random(11), 8, CONFIG["num_embeddings_per_feature"])
    status, body = predict(server, "dlrm", make_request(samples))
    assert status == 200, body
    return body["score"]


def test_the_workers_map_the_prebuilt_entry_instead_of_building_it(torchserve: TorchServe, store: str) -> None:
    log = torchserve.model_log(f"table store: mapped {entry_of(store)}", count=WORKERS)
    assert log.count(f"table store: mapped {entry_of(store)}") == WORKERS
    assert "table store: built" not in log


def test_two_workers_of_one_model_hold_one_copy_of_the_tables(torchserve: TorchServe, store: str) -> None:
    for _ in range(20):  # requests through both workers
        scores(torchserve)
    path = entry_of(store)

    mappings = [smaps_of(int(w["pid"]), path) for w in ready_workers(torchserve)]

    assert len(mappings) == WORKERS
    for pages in mappings:
        assert pages["Rss"] > 0  # each worker's tables are pages of the one entry file ...
        assert pages["Anonymous"] == 0  # ... none copied into its private memory


def test_a_killed_worker_is_replaced_by_one_that_maps_the_entry_and_answers_identically(
    torchserve: TorchServe, store: str
) -> None:
    before = scores(torchserve)
    victim = int(ready_workers(torchserve)[0]["pid"])
    mapped_before = torchserve.model_log().count("table store: mapped")

    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while any(int(w["pid"]) == victim for w in ready_workers(torchserve)) and time.monotonic() < deadline:
        time.sleep(0.2)
    wait_for_workers(torchserve, WORKERS, exclude=victim)

    log = torchserve.model_log("table store: mapped", count=mapped_before + 1)
    assert log.count("table store: mapped") == mapped_before + 1
    assert "table store: built" not in log
    assert scores(torchserve) == before
