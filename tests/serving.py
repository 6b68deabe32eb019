"""A real TorchServe for end-to-end tests: packaging with create_dlrm_mar.sh, one server per
test module on free loopback ports (its own logs, temp dir and process group), requests.

Used by test_serving.py, test_kserve.py and test_metrics.py through module-scoped fixtures
(``mar_file`` -> ``torchserve`` -> the registered model). Name the server fixture
``torchserve``: conftest.py then shows its logs when a test fails.
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import pytest
import requests
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from conftest import REPO

READY_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 120
TORCHSERVE = os.path.join(os.path.dirname(sys.executable), "torchserve")

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


def free_ports(count: int) -> List[int]:
    """``count`` distinct free loopback ports (bound at once, then released)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def build_mar(config: Dict[str, Any], workdir: str, model_name: str = "dlrm", store: Optional[str] = None) -> str:
    """``create_dlrm_mar.sh --config <config as JSON> --export-path store`` (default
    ``workdir/model_store``) -> the .mar's path."""
    store = store or os.path.join(workdir, "model_store")
    config_path = os.path.join(workdir, f"{model_name}_config.json")
    with open(config_path, "w") as f:
        json.dump(config, f)
    subprocess.run(
        [os.path.join(REPO, "create_dlrm_mar.sh"), "--config", config_path,
         "--export-path", store, "--model-name", model_name],
        check=True,
        timeout=300,
    )  # fmt: skip
    return os.path.join(store, f"{model_name}.mar")


def read_properties(path: str) -> Dict[str, str]:
    """A config.properties as a dict (key=value lines; # comments and blank lines skipped)."""
    properties = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                properties[key.strip()] = value.strip()
    return properties


class TorchServe:
    """One TorchServe started by these tests: its addresses, logs and process group.

    ``properties`` are written to its config.properties over the defaults below; whatever
    they say, every address is a free port on 127.0.0.1 (REST and gRPC). ``env`` is added
    to the server's environment."""

    DEFAULT_PROPERTIES = {
        "disable_token_authorization": "true",
        "enable_model_api": "true",
        "install_py_dep_per_model": "false",
        "default_workers_per_model": "1",
    }

    def __init__(
        self,
        workdir: str,
        model_store: str,
        properties: Optional[Dict[str, str]] = None,
        env: Optional[Dict[str, str]] = None,
    ) -> None:
        self.workdir = workdir
        self.log_dir = os.path.join(workdir, "logs")
        tmp = os.path.join(workdir, "tmp")  # pid file and worker sockets: not shared
        os.makedirs(self.log_dir)
        os.makedirs(tmp)
        inference, management, metrics, grpc_inference, grpc_management = free_ports(5)
        self.inference = f"http://127.0.0.1:{inference}"
        self.management = f"http://127.0.0.1:{management}"
        self.metrics = f"http://127.0.0.1:{metrics}"
        self.properties = {
            **self.DEFAULT_PROPERTIES,
            **(properties or {}),
            "inference_address": self.inference,
            "management_address": self.management,
            "metrics_address": self.metrics,
            "grpc_inference_address": "127.0.0.1",
            "grpc_inference_port": str(grpc_inference),
            "grpc_management_address": "127.0.0.1",
            "grpc_management_port": str(grpc_management),
            "model_store": model_store,
        }
        config_file = os.path.join(workdir, "config.properties")
        with open(config_file, "w") as f:
            f.writelines(f"{key}={value}\n" for key, value in self.properties.items())
        server_env = {**os.environ, "LOG_LOCATION": self.log_dir, "METRICS_LOCATION": self.log_dir,
                      "TMPDIR": tmp, "TEMP": tmp, **(env or {})}  # fmt: skip
        server_env.pop("TS_CONFIG_FILE", None)  # it would override --ts-config
        command = [
            TORCHSERVE, "--start", "--foreground", "--ncs",
            "--model-store", model_store,
            "--ts-config", config_file,
            "--disable-token-auth", "--enable-model-api",
        ]  # fmt: skip
        with open(os.path.join(self.log_dir, "torchserve.out"), "w") as out:
            self.process = subprocess.Popen(
                command, cwd=workdir, env=server_env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: the frontend and its workers
            )  # fmt: skip

    def wait_until(self, what: str, ready: Any, timeout: float) -> None:
        """Poll ``ready()`` every 0.5 s, at most ``timeout`` seconds; fail with the logs."""
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.5) + 1):
            if self.process.poll() is not None:
                pytest.fail(f"TorchServe exited with {self.process.returncode}\n{self.log_tail()}")
            try:
                if ready():
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        pytest.fail(f"{what} not ready after {timeout} s\n{self.log_tail()}")

    def wait_for_ping(self) -> None:
        self.wait_until("TorchServe", lambda: requests.get(f"{self.inference}/ping", timeout=5).ok, 120)

    def workers(self, model: str) -> List[Dict[str, Any]]:
        response = requests.get(f"{self.management}/models/{model}", timeout=10)
        return response.json()[0]["workers"] if response.status_code == 200 else []

    def describe(self, model: str) -> Dict[str, Any]:
        """The management API's description of ``model`` (batchSize, workers, ...)."""
        response = requests.get(f"{self.management}/models/{model}", timeout=10)
        assert response.status_code == 200, response.text
        return response.json()[0]

    def register(self, model: str, mar: str, **params: Any) -> None:
        """Register ``mar`` as ``model`` with one worker, without waiting for it."""
        query = {"url": mar, "model_name": model, "initial_workers": 1, "synchronous": "false", **params}
        response = requests.post(f"{self.management}/models", params=query, timeout=30)
        assert response.status_code in (200, 202), response.text

    def wait_for_model(self, model: str) -> None:
        """A request sent before the worker is up would wait: wait on the model's status."""
        self.wait_until(
            f"model {model}",
            lambda: any(w["status"] == "READY" for w in self.workers(model)),
            READY_TIMEOUT_S,
        )

    def stop(self) -> None:
        """Stop this server only: its process group (launcher, Java frontend, workers)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
        for _ in range(60):
            self.process.poll()  # reap the launcher: a zombie would keep the group alive
            try:
                os.killpg(self.process.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.5)
        else:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def log_tail(self, lines: int = 40) -> str:
        tails = []
        for name in ("torchserve.out", "ts_log.log", "model_log.log"):
            try:
                with open(os.path.join(self.log_dir, name), errors="replace") as f:
                    tails.append(f"--- {name}\n" + "".join(f.readlines()[-lines:]))
            except OSError:
                pass
        return "\n".join(tails)

    def handler_calls(self, model: str) -> int:
        """How many times the handler ran for ``model``: TorchServe logs one HandlerTime
        metric per ``handle`` call (metrics_mode log, the default)."""
        try:
            with open(os.path.join(self.log_dir, "model_metrics.log")) as f:
                return sum(1 for line in f if "HandlerTime" in line and f"ModelName:{model}," in line)
        except FileNotFoundError:  # written with the first metric
            return 0


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
