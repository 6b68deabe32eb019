"""A real TorchServe for end-to-end tests: packaging with create_dlrm_mar.sh, one server per
test module (scripts/torchserve_process.py: free loopback ports, its own logs, temp dir and
process group), requests, and the in-process reference scores.

A test module gets its server from one fixture factory::

    torchserve = torchserve_fixture(mars={"dlrm": CONFIG}, models={"dlrm": {}}, properties=LIMITS)

a module-scoped fixture named ``torchserve`` (conftest.py shows its logs when a test fails)
whose models all have a READY worker. ``served_models`` is the same as a context manager,
for a fixture that needs other fixtures first (test_kserve.py).
"""

import contextlib
import json
import os
import random
import subprocess
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest
import requests
import torch
import torchserve_process
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchserve_process import READY_TIMEOUT_S, TORCHSERVE, TorchServeError, free_ports, read_properties  # noqa: F401

from conftest import REPO

REQUEST_TIMEOUT_S = 120

# A sample: (N dense numbers, F bags of ids).
Sample = Tuple[List[float], List[List[int]]]


# --- requests and the in-process reference ---------------------------------------------


def make_request(samples: List[Sample], one_sample: bool = False) -> Dict[str, Any]:
    """Upstream's format: dense as one list (one_sample) or B lists; lengths and ids
    sample-major."""
    return {
        "float_features": samples[0][0] if one_sample else [dense for dense, _ in samples],
        "id_list_features.lengths": [len(bag) for _, bags in samples for bag in bags],
        "id_list_features.values": [i for _, bags in samples for bag in bags for i in bag],
    }


def direct_scores(model: torch.nn.Module, keys: List[str], samples: List[Sample]) -> List[float]:
    """The logits of ``model`` called in-process, its KJT built key-major feature by feature."""
    bags = [samples[b][1][f] for f in range(len(keys)) for b in range(len(samples))]
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=keys,
        values=torch.tensor([i for bag in bags for i in bag], dtype=torch.int64),
        lengths=torch.tensor([len(bag) for bag in bags], dtype=torch.int64),
    )
    dense = torch.tensor([d for d, _ in samples], dtype=torch.float32)
    with torch.inference_mode():
        return model(dense, kjt).view(-1).tolist()


def random_samples(rng: random.Random, count: int, table_sizes: List[int], max_length: int = 3) -> List[Sample]:
    """``count`` samples: 13 dense numbers in [-3, 3], 0 to ``max_length`` valid ids per table."""
    return [
        (
            [rng.uniform(-3.0, 3.0) for _ in range(13)],
            [[rng.randrange(size) for _ in range(rng.randint(0, max_length))] for size in table_sizes],
        )
        for _ in range(count)
    ]


# --- the server ---------------------------------------------------------------------------


def build_mar(
    config: Dict[str, Any], workdir: str, model_name: str = "dlrm", store: Optional[str] = None, version: str = "1.0"
) -> str:
    """``create_dlrm_mar.sh --config <config as JSON> --export-path store --version version``
    (default ``workdir/model_store``, 1.0) -> the .mar's path."""
    store = store or os.path.join(workdir, "model_store")
    config_path = os.path.join(workdir, f"{model_name}_{version}_config.json")
    with open(config_path, "w") as f:
        json.dump(config, f)
    subprocess.run(
        [os.path.join(REPO, "create_dlrm_mar.sh"), "--config", config_path,
         "--export-path", store, "--model-name", model_name, "--version", version],
        check=True,
        timeout=300,
    )  # fmt: skip
    return os.path.join(store, f"{model_name}.mar")


class TorchServe(torchserve_process.TorchServe):
    """A private TorchServe (scripts/torchserve_process.py) that counts the handler's runs.
    Its waits raise ``TorchServeError`` with the server's logs: in a test, a failure.
    A model loaded at start gets one worker (``default_workers_per_model``), not TorchServe's
    one per core: the tests that want more scale them."""

    DEFAULT_PROPERTIES = {**torchserve_process.TorchServe.DEFAULT_PROPERTIES, "default_workers_per_model": "1"}

    def model_log(self, text: str = "", count: int = 1, timeout: float = 30) -> str:
        """The workers' log (model_log.log) once it holds ``text`` at least ``count`` times:
        the frontend writes a worker's lines a little after the worker said them, so a line
        said before READY may land after it."""
        path = os.path.join(self.log_dir, "model_log.log")

        def read() -> str:
            with open(path, errors="replace") as f:
                return f.read()

        self.wait_until(f"{count} x {text!r} in model_log.log", lambda: read().count(text) >= count, timeout)
        return read()

    def handler_calls(self, model: str) -> int:
        """How many times the handler ran for ``model``: TorchServe logs one HandlerTime
        metric per ``handle`` call (metrics_mode log, the default)."""
        try:
            with open(os.path.join(self.log_dir, "model_metrics.log")) as f:
                return sum(1 for line in f if "HandlerTime" in line and f"ModelName:{model}," in line)
        except FileNotFoundError:  # written with the first metric
            return 0


@contextlib.contextmanager
def served_models(
    workdir: str,
    mars: Dict[str, Dict[str, Any]],
    models: Dict[str, Dict[str, Any]],
    properties: Optional[Dict[str, str]] = None,
    env: Optional[Dict[str, str]] = None,
    model_store: Optional[str] = None,
    preloaded: Sequence[str] = (),
) -> Iterator[TorchServe]:
    """A TorchServe serving these models under these properties, each with a READY worker;
    stopped on leaving the block.

    ``mars``: .mar name -> the config ``create_dlrm_mar.sh`` packages into
    ``model_store`` (default ``workdir/model_store``). ``models``: model name -> the
    register API's parameters (``{}``: ``<name>.mar`` with its own YAML; ``{"mar":
    "dlrm.mar", "batch_size": 8}``: another registration of it). ``preloaded``: models the
    properties load themselves (``model_snapshot``). A server that fails to start or a
    model that never gets READY fails the test with the server's logs."""
    model_store = model_store or os.path.join(workdir, "model_store")
    # The workers' table store: this server's own (the handler's default is ~/.cache/...).
    env = {"DLRM_TABLE_STORE": os.path.join(workdir, "table_store"), **(env or {})}
    for name, config in mars.items():
        build_mar(config, workdir, name, model_store)
    try:
        with TorchServe.serving(workdir, model_store, models=models, preloaded=preloaded,
                                properties=properties, env=env) as server:  # fmt: skip
            yield server
    except TorchServeError as error:
        pytest.fail(str(error))


def torchserve_fixture(
    mars: Dict[str, Dict[str, Any]],
    models: Dict[str, Dict[str, Any]],
    properties: Optional[Dict[str, str]] = None,
    env: Optional[Dict[str, str]] = None,
) -> Any:
    """The module-scoped fixture ``torchserve`` of a test module: ``served_models`` of these
    arguments (see there), in a fresh temp dir. In a test module::

        torchserve = torchserve_fixture(mars={"dlrm": CONFIG}, models={"dlrm": {}})

    (conftest.py shows the logs of the fixture named ``torchserve`` when a test fails)."""

    @pytest.fixture(scope="module", name="torchserve")
    def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServe]:
        workdir = str(tmp_path_factory.mktemp("torchserve"))
        with served_models(workdir, mars, models, properties, env) as server:
            yield server

    return served


def post_json(url: str, body: Any, content_type: str = "application/json") -> Tuple[int, Any]:
    """POST ``body`` (bytes as they are, anything else as JSON); (HTTP status, parsed JSON
    answer, or its text when it is not JSON)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = requests.post(url, data=data, headers={"Content-Type": content_type}, timeout=REQUEST_TIMEOUT_S)
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, response.text


def predict(server: TorchServe, model: str, body: Any, content_type: str = "application/json") -> Tuple[int, Any]:
    """POST one request to /predictions/<model>; (HTTP status, parsed JSON answer)."""
    return post_json(f"{server.inference}/predictions/{model}", body, content_type)
