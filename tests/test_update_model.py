"""scripts/update_model.py against a real TorchServe under load (SPEC §8, versions and
updates): a new version put in service, kept and rolled back, and refused, while 8 clients
send random valid requests to ``/predictions/dlrm`` the whole time.

One server for the module, its table store a read-only bind mount (as KServe mounts a
volume; ``unshare -rm``, scripts/torchserve_process.py's ``read_only_launcher``) holding
each version's entry, prebuilt. It serves ``dlrm`` 1.0 from its model store, as ``make demo``
does; the newer .mars are built by ``create_dlrm_mar.sh --version V`` outside the model
store, where a user builds them. The tests run in order, each on the state the previous one
left: 1.0 -> 2.0; 2.0 -> 3.0 kept, rolled back to 2.0; 3.0 deleted under load (what
TorchServe does to requests in flight); then three 4.0s that must fail.

Every answer is compared, within SCORE_TOLERANCE (as tests/test_load_and_faults.py), with
the in-process scores of each version (its seed: 1.0 seed 1, 2.0 seed 2, ...): no two
versions' scores come within it for any request sent, so each answer says which version
gave it.

Symbols: B samples, N = 13 dense features, F = 3 sparse features.
"""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Iterator, List, Optional

import pytest
import torch
import update_model as update_command
from conftest import REPO, SMALL_TABLE_SIZES, small_model_config
from load import Outcome, expected_scores, matches, mixed_requests, send
from serving import TorchServe, TorchServeError, build_mar
from test_table_store import flip_a_table_byte
from torchserve_process import http_request, read_only_launcher

from dlrm_factory import DLRMFactory, create_default_model_config, resolve_model_config
from dlrm_request import parse_request

UPDATE_MODEL = os.path.join(REPO, "scripts", "update_model.py")
KEYS = [f"cat_{f}" for f in range(len(SMALL_TABLE_SIZES))]
SCORE_TOLERANCE = 1e-7
CONNECTIONS = 8
CLIENT_TIMEOUT_S = 60
COMMAND_TIMEOUT_S = 300
# Version -> the seed of its config. 4.0 comes three ways, each refused: a config the
# factory rejects, a corrupted entry in the read-only store, a worker killed while loading.
SEEDS = {"1.0": 1, "2.0": 2, "3.0": 3}
CORRUPT_SEED, HEALTHY_4_SEED = 4, 5


def version_config(seed: int) -> Dict[str, Any]:
    return small_model_config(seed=seed)


def can_mount_read_only(path: str) -> bool:
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount --bind {path} {path}"], capture_output=True, timeout=30)
    return probe.returncode == 0


# --- the parts that need no server -----------------------------------------------------------


@pytest.mark.parametrize("version", ["1.x", "latest", "2/0", "all", "-1"])
def test_create_dlrm_mar_refuses_a_version_that_is_not_numbers_and_dots(tmp_path: Any, version: str) -> None:
    run = subprocess.run([os.path.join(REPO, "create_dlrm_mar.sh"), "--version", version, "--export-path", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip

    assert run.returncode == 2
    assert f"--version '{version}': use numbers separated by dots" in run.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "config",
    [create_default_model_config(), small_model_config(), {"embedding_dim": 128, "dense_arch_layer_sizes": [512, 256, 128]}],
    ids=["default", "small", "sizes left to the defaults"],
)
def test_the_default_smoke_request_is_one_valid_sample_for_its_config(config: Dict[str, Any]) -> None:
    resolved = resolve_model_config(config)

    body = update_command.smoke_request(config)
    dense, lengths, values, one_sample = parse_request(json.dumps(body).encode(), resolved)

    assert (dense.shape, one_sample) == ((1, resolved["dense_in_features"]), True)
    assert lengths.tolist() == [[1] * len(resolved["num_embeddings_per_feature"])]
    expected = [size - 1 for size in config["num_embeddings_per_feature"]] if "num_embeddings_per_feature" in config else [0] * 26
    assert values.tolist() == expected  # each table's last row (0 where the sizes are the defaults)


# --- fixtures: the store, the .mars, the server, the load --------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("update_model"))


@pytest.fixture(scope="module")
def models(workdir: str) -> Dict[Any, torch.nn.Module]:
    """Each version's model built in-process into the module's table store (the entries the
    server maps, read-only). Keys: the versions of SEEDS, and the seeds of the two 4.0s; the
    CORRUPT_SEED entry gets a table byte flipped."""
    store = os.path.join(workdir, "table_store")
    built: Dict[Any, torch.nn.Module] = {}
    for key, seed in [*SEEDS.items(), (CORRUPT_SEED, CORRUPT_SEED), (HEALTHY_4_SEED, HEALTHY_4_SEED)]:
        built[key] = DLRMFactory({**version_config(seed), "table_store": store})
    flip_a_table_byte(built[CORRUPT_SEED].table_store_entry["path"])
    return built


@pytest.fixture(scope="module")
def mars(workdir: str) -> Dict[str, str]:
    """create_dlrm_mar.sh --version V into workdir/out/<case>/ (outside the model store):
    2.0, 3.0, and 4.0 as "corrupt entry", "worker killed" and "invalid config" (the corrupt
    one's .mar with embedding_dim -1 written into its model_config.json, as a .mar built by
    another tool could hold: create_dlrm_mar.sh refuses such a config)."""
    cases = {"2.0": ("2.0", SEEDS["2.0"]), "3.0": ("3.0", SEEDS["3.0"]),
             "corrupt entry": ("4.0", CORRUPT_SEED), "worker killed": ("4.0", HEALTHY_4_SEED)}  # fmt: skip

    def package(case: str) -> str:
        version, seed = cases[case]
        out = os.path.join(workdir, "out", case.replace(" ", "_"))
        os.makedirs(out)
        return build_mar(version_config(seed), out, "dlrm", out, version=version)

    with ThreadPoolExecutor(max_workers=2) as pool:
        built = dict(zip(cases, pool.map(package, cases)))
    built["invalid config"] = os.path.join(workdir, "out", "invalid_config", "dlrm.mar")
    os.makedirs(os.path.dirname(built["invalid config"]))
    with zipfile.ZipFile(built["corrupt entry"]) as source, zipfile.ZipFile(built["invalid config"], "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "model_config.json":
                data = json.dumps({**json.loads(data), "embedding_dim": -1}).encode()
            target.writestr(item, data)
    return built


@pytest.fixture(scope="module")
def torchserve(workdir: str, models: Dict[Any, torch.nn.Module]) -> Iterator[TorchServe]:
    """dlrm 1.0 served from the model store; the table store read-only where the machine
    allows a mount namespace (else writable: the corrupt-entry case is then skipped)."""
    store = os.path.join(workdir, "table_store")
    model_store = os.path.join(workdir, "model_store")
    build_mar(version_config(SEEDS["1.0"]), workdir, "dlrm", model_store)
    launcher = read_only_launcher(store) if can_mount_read_only(store) else []
    try:
        # 2 workers, as the shipped files give on this 2-core host; registering 2.0 must not fall
        # back to the server's default_workers_per_model (1 here; unset in config.properties: 0)
        with TorchServe.serving(os.path.join(workdir, "server"), model_store, models={"dlrm": {"initial_workers": 2}},
                                env={"DLRM_TABLE_STORE": store}, launcher=launcher) as server:  # fmt: skip
            server.read_only_store = bool(launcher)
            yield server
    except TorchServeError as error:
        pytest.fail(str(error))


@pytest.fixture(scope="module")
def load(models: Dict[Any, torch.nn.Module]) -> Dict[str, Any]:
    """The requests the clients cycle through, and each version's scores for them."""
    requests = mixed_requests(random.Random(15), 240, SMALL_TABLE_SIZES)
    expected = {version: expected_scores(models[version], KEYS, requests) for version in SEEDS}
    for i in range(len(requests)):  # no answer could pass for another version's
        scores = [expected[version][i] for version in SEEDS]
        assert all(max(abs(a - b) for a, b in zip(x, y)) > 2 * SCORE_TOLERANCE for x in scores for y in scores if x is not y)
    return {"requests": requests, "expected": expected}


class Clients:
    """CONNECTIONS clients sending ``bodies`` to ``url`` until stopped (tests/load.py's
    ``send``); ``outcomes`` fills as answers come back."""

    def __init__(self, url: str, bodies: List[bytes], timeout: float = CLIENT_TIMEOUT_S) -> None:
        self.outcomes: List[Outcome] = []
        self.stopped = threading.Event()
        self.timeout = timeout
        self.thread = threading.Thread(target=send, args=(url, bodies, CONNECTIONS, timeout, self.stopped, self.outcomes))
        self.thread.start()

    def wait_for(self, server: TorchServe, count: int, after: float = 0.0) -> None:
        """Until ``count`` requests sent after ``after`` (time.monotonic()) are answered."""
        server.wait_until(f"{count} answers", lambda: sum(o.started > after for o in list(self.outcomes)) >= count, 60)

    def stop(self) -> List[Outcome]:
        self.stopped.set()
        self.thread.join(timeout=self.timeout + 10)
        assert not self.thread.is_alive()  # every call ended
        return list(self.outcomes)


@pytest.fixture
def clients(torchserve: TorchServe, load: Dict[str, Any]) -> Iterator[Clients]:
    """Clients on /predictions/dlrm for the test's whole length, 50 answers in already."""
    running = Clients(f"{torchserve.inference}/predictions/dlrm", [r.body for r in load["requests"]])
    try:
        running.wait_for(torchserve, 50)
        yield running
    finally:
        running.stop()


# --- helpers ----------------------------------------------------------------------------------


def update_model(server: TorchServe, *args: str) -> subprocess.CompletedProcess:
    """scripts/update_model.py against ``server``, as a user runs it."""
    return subprocess.run([sys.executable, UPDATE_MODEL, "--management", server.management, "--inference",
                           server.inference, *args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)  # fmt: skip


def answered_by(outcome: Outcome, load: Dict[str, Any]) -> Optional[str]:
    """The version whose scores this 200 holds (None: no version's, or not a 200)."""
    request = load["requests"][outcome.index]
    for version, expected in load["expected"].items():
        if outcome.status == 200 and matches(outcome.answer, expected[outcome.index], request.one_sample, SCORE_TOLERANCE):
            return version
    return None


def registered(server: TorchServe) -> Dict[str, Any]:
    """{"default": the version /predictions/dlrm serves, "versions": {version: READY workers}}."""
    status, body = http_request("GET", f"{server.management}/models/dlrm/all")
    assert status == 200, body
    versions = {m["modelVersion"]: sum(w["status"] == "READY" for w in m["workers"]) for m in json.loads(body)}
    return {"default": server.describe("dlrm")["modelVersion"], "versions": versions}


def worker_pids(server: TorchServe, version: str) -> List[int]:
    status, body = http_request("GET", f"{server.management}/models/dlrm/{version}")
    assert status == 200, body
    return [int(w["pid"]) for w in json.loads(body)[0]["workers"]]


def exited(pids: List[int], timeout: float = 30) -> bool:
    """Whether every process of ``pids`` has exited (a reaped pid, or a zombie) within ``timeout``."""

    def gone(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            return True

    deadline = time.monotonic() + timeout
    while not all(gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return all(gone(pid) for pid in pids)


def probe(server: TorchServe, load: Dict[str, Any]) -> List[Any]:
    """The answers of the first 6 requests of the load, sent one at a time to an otherwise
    idle server (each alone in its batch: comparable bit for bit)."""
    return [o.answer for o in send(f"{server.inference}/predictions/dlrm", [r.body for r in load["requests"][:6]], 1, 60)]


# --- an update under load ---------------------------------------------------------------------


def test_update_replaces_1_0_by_2_0_under_load_without_a_failed_request(
    torchserve: TorchServe, mars: Dict[str, str], load: Dict[str, Any], clients: Clients
) -> None:
    old_pids = worker_pids(torchserve, "1.0")

    run = update_model(torchserve, "--mar", mars["2.0"])
    returned = time.monotonic()
    clients.wait_for(torchserve, 100, after=returned)
    outcomes = clients.stop()

    assert run.returncode == 0, run.stdout + run.stderr
    for step in ("register and load", "smoke test", "set default", "drain the old version", "unregister the old version"):
        assert f"] {step}: " in run.stdout
    assert [o for o in outcomes if o.error or o.status != 200] == []  # zero failed requests
    versions = [answered_by(o, load) for o in outcomes]
    assert None not in versions  # every answer 1.0's or 2.0's own scores for its request
    assert {"1.0", "2.0"} <= set(versions)  # the swap happened under load
    assert {v for o, v in zip(outcomes, versions) if o.started > returned} == {"2.0"}
    assert registered(torchserve) == {"default": "2.0", "versions": {"2.0": 2}}
    assert exited(old_pids)


# --- kept, then rolled back -------------------------------------------------------------------


def test_keep_old_then_rollback_serves_the_previous_version_bit_identically(
    torchserve: TorchServe, mars: Dict[str, str], load: Dict[str, Any]
) -> None:
    before = probe(torchserve, load)  # 2.0's answers, the server otherwise idle
    clients = Clients(f"{torchserve.inference}/predictions/dlrm", [r.body for r in load["requests"]])
    clients.wait_for(torchserve, 50)

    kept = update_model(torchserve, "--mar", mars["3.0"], "--keep-old", "--workers", "1",
                        "--model-store", torchserve.properties["model_store"])  # as for a server without file:// URLs
    kept_at = time.monotonic()
    clients.wait_for(torchserve, 100, after=kept_at)
    after_update = registered(torchserve)
    rollback_sent = time.monotonic()
    rolled_back = update_model(torchserve, "--rollback", "dlrm")
    rolled_back_at = time.monotonic()
    clients.wait_for(torchserve, 100, after=rolled_back_at)
    outcomes = clients.stop()

    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert "] register and load: dlrm 3.0 from dlrm-3.0.mar: " in kept.stdout  # by its name in the model store
    assert after_update == {"default": "3.0", "versions": {"2.0": 2, "3.0": 1}}  # --workers 1
    assert rolled_back.returncode == 0, rolled_back.stdout + rolled_back.stderr
    assert registered(torchserve) == {"default": "2.0", "versions": {"2.0": 2, "3.0": 1}}
    assert [o for o in outcomes if o.error or o.status != 200] == []
    versions = [answered_by(o, load) for o in outcomes]
    assert {v for o, v in zip(outcomes, versions) if kept_at < o.started and o.ended < rollback_sent} == {"3.0"}
    assert {v for o, v in zip(outcomes, versions) if o.started > rolled_back_at} == {"2.0"}
    assert probe(torchserve, load) == before  # 2.0 again, bit for bit


def test_rollback_with_no_earlier_version_registered_is_refused(torchserve: TorchServe) -> None:
    """2.0 is the default and 3.0 the only other version: nothing to roll back to."""
    run = update_model(torchserve, "--rollback", "dlrm")

    assert run.returncode == 2
    assert "FAILED at step 'check the server': nothing to roll back to" in run.stderr
    assert registered(torchserve)["default"] == "2.0"


def test_an_update_to_a_version_already_registered_is_refused(torchserve: TorchServe, mars: Dict[str, str]) -> None:
    before = registered(torchserve)

    run = update_model(torchserve, "--mar", mars["3.0"])

    assert run.returncode == 2
    assert "FAILED at step 'check the server': dlrm 3.0 is registered already" in run.stderr
    assert registered(torchserve) == before


# --- updates that fail ------------------------------------------------------------------------


def kill_a_loading_worker(server: TorchServe, version: str, done: threading.Event) -> None:
    """SIGKILL a worker of ``version`` once TorchServe shows its process and before it is
    READY: a worker dying while it loads (e.g. killed for memory)."""
    while not done.is_set():
        status, body = http_request("GET", f"{server.management}/models/dlrm/{version}")
        loading = [w for w in json.loads(body)[0]["workers"] if w["pid"] > 0 and w["status"] != "READY"] if status == 200 else []
        if loading:
            os.kill(loading[0]["pid"], signal.SIGKILL)
            return
        time.sleep(0.05)


@pytest.mark.parametrize("case", ["invalid config", "corrupt entry", "worker killed"])
def test_a_failed_update_names_its_step_and_leaves_the_old_version_serving(
    torchserve: TorchServe, mars: Dict[str, str], load: Dict[str, Any], clients: Clients, case: str
) -> None:
    if case == "corrupt entry" and not torchserve.read_only_store:
        pytest.skip("no user namespaces here for a read-only mount")
    before = registered(torchserve)
    killer_done = threading.Event()
    killer = threading.Thread(target=kill_a_loading_worker, args=(torchserve, "4.0", killer_done))
    if case == "worker killed":
        killer.start()

    run = update_model(torchserve, "--mar", mars[case])
    returned = time.monotonic()
    killer_done.set()
    if killer.is_alive():
        killer.join(timeout=10)
    clients.wait_for(torchserve, 50, after=returned)
    outcomes = clients.stop()

    assert run.returncode == 1, run.stdout + run.stderr
    assert "FAILED at step 'register and load': a worker of dlrm 4.0 (pid " in run.stderr
    assert "exited while loading: its error is in TorchServe's model_log.log" in run.stderr
    assert f"the server is as it was: dlrm: {before['default']} (default, 2 READY)" in run.stderr
    assert registered(torchserve) == before  # nothing of 4.0 registered
    assert "dlrm-4.0.mar" not in os.listdir(torchserve.properties["model_store"])  # TorchServe's copy removed
    assert [o for o in outcomes if o.error or o.status != 200] == []
    assert {answered_by(o, load) for o in outcomes} == {before["default"]}
    if case == "corrupt entry":  # the worker said why
        assert "is read-only and its entry" in torchserve.model_log("is corrupted")
