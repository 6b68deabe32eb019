"""Start and stop a private TorchServe: the one helper that the tests, ``make demo``
(scripts/demo.py), benchmarks/bench_serve.py and benchmarks/soak.py share.

    server = TorchServe(workdir="/tmp/x", model_store="/tmp/x/model_store")
    server.wait_for_ping()
    server.register("dlrm")                  # dlrm.mar from the model store, one worker
    server.wait_for_model("dlrm")            # until a worker is READY (or TorchServeError)
    ...                                      # requests to server.inference
    server.stop()                            # this server only

or ``with TorchServe.serving(workdir, model_store, models={"dlrm": {}}) as server: ...``.

"Private", and why (each point cost someone an afternoon):
- its own process group (``start_new_session``): ``stop`` signals the launcher, its Java
  frontend and the Python workers together, and nothing else. ``torchserve --stop`` stops
  every TorchServe on the machine: never used here.
- its own TMPDIR and TEMP: ``torchserve --start`` refuses to start while
  ``$TMPDIR/.model_server.pid`` names a live server, and the workers' sockets are
  ``$TEMP/.ts.sock.<port>``: two servers sharing them interfere.
- every address on 127.0.0.1, on free ports unless told otherwise, gRPC's too: TorchServe
  always starts its gRPC servers, on 7070/7071 unless given other ports, and a second
  server on those ports exits.
- ``TS_CONFIG_FILE`` removed from its environment: it would override ``--ts-config``.
- TorchServe 0.12 needs ``--disable-token-auth`` and ``--enable-model-api`` for the plain
  management API used here (register, describe).
- a request sent before the model's worker is READY waits (TorchServe shows a worker that is
  still loading as "UNLOADING"): ``wait_for_model`` polls the model's status, bounded in
  polls and seconds.

Logs (``LOG_LOCATION``, ``METRICS_LOCATION`` and the console as ``torchserve.out``) go to
``log_dir``. Errors are ``TorchServeError`` (a ``RuntimeError``) whose message ends with the
logs' last lines; no pytest here (tests turn the errors into ``pytest.fail``). Only the
standard library: importable by scripts that run before anything else is installed.
"""

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)

TORCHSERVE = os.path.join(os.path.dirname(sys.executable), "torchserve")
PING_TIMEOUT_S = 120  # the Java frontend starts in seconds
READY_TIMEOUT_S = 300  # a small model's worker; the full default needs more (make demo: 900)
STOP_TIMEOUT_S = 30  # SIGTERM, then SIGKILL
POLL_S = 0.5
# The addresses TorchServe 0.12 listens on: REST (URLs) and gRPC (address + port).
REST_ADDRESSES = ("inference_address", "management_address", "metrics_address")
GRPC_ADDRESSES = ("grpc_inference", "grpc_management")


class TorchServeError(RuntimeError):
    """TorchServe exited, or something was not ready in time; the message says which and
    ends with the logs' last lines."""


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


def read_properties(path: str, resolve_paths: bool = False) -> Dict[str, str]:
    """A config.properties as a dict (key=value lines; # comments and blank lines skipped).
    ``resolve_paths``: a relative value naming a file next to ``path`` (``metrics_config=
    metrics.yaml``) becomes its absolute path, so the server may start in any directory."""
    properties = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                properties[key.strip()] = value.strip()
    if resolve_paths:
        here = os.path.dirname(os.path.abspath(path))
        for key, value in properties.items():
            if value and not os.path.isabs(value) and os.path.isfile(os.path.join(here, value)):
                properties[key] = os.path.join(here, value)
    return properties


def http_request(
    method: str, url: str, body: Optional[bytes] = None, content_type: str = "application/json", timeout: float = 30.0
) -> Tuple[int, bytes]:
    """(HTTP status, body) of one request; status 0 when nothing answered."""
    headers = {"Content-Type": content_type} if body is not None else {}
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def process_group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_process_group(pgid: int, process: Optional[subprocess.Popen] = None, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the process group ``pgid`` (a TorchServe launcher started in its own session:
    its pid is the group's id), wait up to ``timeout`` s for all of it to exit, then SIGKILL.
    ``process``: its Popen, reaped as it exits (a zombie launcher keeps the group alive)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    for _ in range(int(timeout / POLL_S) + 1):
        if process is not None:
            process.poll()
        if not process_group_alive(pgid):
            break
        time.sleep(POLL_S)
    else:
        logger.warning("TorchServe process group %d still alive after %.0f s: SIGKILL", pgid, timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    if process is not None:
        process.wait(timeout=10)


class TorchServe:
    """One private TorchServe, started by the constructor; its addresses, logs and process.

    ``properties`` are written to its config.properties over ``DEFAULT_PROPERTIES``; with
    ``private_ports`` (the default) every REST and gRPC address is then moved to a free port
    on 127.0.0.1, whatever they said. ``env`` is added to the environment of the server and
    its workers. ``models``: ``--models`` entries loaded at start (``"dlrm=dlrm.mar"``).
    Files: ``workdir/config.properties``, ``workdir/tmp`` (TMPDIR, TEMP), ``log_dir``
    (default ``workdir/logs``). ``launcher``: a command the server is started under, which
    must ``exec`` its arguments (so the pid and process group stay the server's): e.g.
    ``read_only_launcher(store)``, to serve a table store from a read-only mount."""

    # No worker count: a model loaded at start (``models``) gets TorchServe's own default,
    # one worker per GPU, else one per CPU core, as with the shipped config.properties
    # (``make demo``, the benchmarks). The tests' servers set one (tests/serving.py).
    DEFAULT_PROPERTIES = {
        "disable_token_authorization": "true",
        "enable_model_api": "true",
        "install_py_dep_per_model": "false",
    }

    def __init__(
        self,
        workdir: str,
        model_store: str,
        properties: Optional[Dict[str, str]] = None,
        env: Optional[Dict[str, str]] = None,
        models: Sequence[str] = (),
        private_ports: bool = True,
        log_dir: Optional[str] = None,
        launcher: Sequence[str] = (),
    ) -> None:
        self.workdir = workdir
        self.log_dir = log_dir or os.path.join(workdir, "logs")
        tmp = os.path.join(workdir, "tmp")  # pid file and worker sockets: not shared
        os.makedirs(self.log_dir, exist_ok=True)
        os.makedirs(tmp, exist_ok=True)
        self.properties = {**self.DEFAULT_PROPERTIES, **(properties or {})}
        if private_ports:
            self.properties.update(private_addresses())
        self.properties["model_store"] = model_store
        self.inference = self.properties.get("inference_address", "http://127.0.0.1:8080")
        self.management = self.properties.get("management_address", "http://127.0.0.1:8081")
        self.metrics = self.properties.get("metrics_address", "http://127.0.0.1:8082")
        config_file = os.path.join(workdir, "config.properties")
        with open(config_file, "w") as f:
            f.writelines(f"{key}={value}\n" for key, value in self.properties.items())
        server_env = {**os.environ, "LOG_LOCATION": self.log_dir, "METRICS_LOCATION": self.log_dir,
                      "TMPDIR": tmp, "TEMP": tmp, **(env or {})}  # fmt: skip
        server_env.pop("TS_CONFIG_FILE", None)  # it would override --ts-config
        self.command = [
            *launcher, TORCHSERVE, "--start", "--foreground", "--ncs",
            "--model-store", model_store,
            *(["--models", *models] if models else []),
            "--ts-config", config_file,
            "--disable-token-auth", "--enable-model-api",
        ]  # fmt: skip
        with open(os.path.join(self.log_dir, "torchserve.out"), "w") as out:
            self.process = subprocess.Popen(
                self.command, cwd=workdir, env=server_env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: the frontend and its workers
            )  # fmt: skip
        logger.info("TorchServe started: pid %d, %s, logs in %s", self.process.pid, self.inference, self.log_dir)

    @classmethod
    @contextlib.contextmanager
    def serving(
        cls,
        workdir: str,
        model_store: str,
        models: Optional[Dict[str, Dict[str, Any]]] = None,
        preloaded: Sequence[str] = (),
        ready_timeout: float = READY_TIMEOUT_S,
        **server_args: Any,
    ) -> Iterator["TorchServe"]:
        """A server with these models READY; stopped on leaving the block. ``models``: name
        -> ``register`` parameters (``{}``: ``<name>.mar`` as packaged). ``preloaded``:
        models the server loads itself (``model_snapshot`` in its properties, ``--models``),
        only waited for. ``server_args`` go to the constructor."""
        server = cls(workdir, model_store, **server_args)
        try:
            server.wait_for_ping()
            for name, params in (models or {}).items():
                server.register(name, **params)
            for name in [*(models or {}), *preloaded]:
                server.wait_for_model(name, ready_timeout)
            yield server
        finally:
            server.stop()

    # --- waiting ----------------------------------------------------------------------------

    def wait_until(
        self,
        what: str,
        ready: Callable[[], Any],
        timeout: float,
        progress: Optional[Callable[[float], None]] = None,
        progress_every: float = 10.0,
    ) -> None:
        """Poll ``ready()`` every POLL_S seconds, at most ``timeout`` seconds (an OSError from
        it counts as not ready: e.g. the port not open yet); ``progress(elapsed_s)`` every
        ``progress_every`` seconds. TorchServeError if the server exits or time runs out."""
        start = time.monotonic()
        next_progress = start + progress_every
        for _ in range(int(timeout / POLL_S) + 1):
            if self.process.poll() is not None:
                raise TorchServeError(f"TorchServe exited with {self.process.returncode}\n{self.log_tail()}")
            try:
                if ready():
                    return
            except OSError:
                pass
            now = time.monotonic()
            if now - start > timeout:
                break
            if progress is not None and now >= next_progress:
                progress(now - start)
                next_progress += progress_every
            time.sleep(POLL_S)
        raise TorchServeError(f"{what} not ready after {timeout:.0f} s\n{self.log_tail()}")

    def wait_for_ping(self, timeout: float = PING_TIMEOUT_S) -> None:
        self.wait_until("TorchServe", lambda: http_request("GET", f"{self.inference}/ping", timeout=5)[0] == 200, timeout)

    def wait_for_model(
        self, model: str, timeout: float = READY_TIMEOUT_S, progress: Optional[Callable[[float], None]] = None
    ) -> None:
        """Until a worker of ``model`` is READY: a request sent before would wait for it."""
        self.wait_until(
            f"model {model}",
            lambda: any(w.get("status") == "READY" for w in self.workers(model)),
            timeout,
            progress,
        )

    # --- the management API -----------------------------------------------------------------

    def workers(self, model: str) -> List[Dict[str, Any]]:
        """The workers of ``model`` (pid, status, ...); [] while it is not registered."""
        status, body = http_request("GET", f"{self.management}/models/{model}", timeout=10)
        return json.loads(body)[0].get("workers", []) if status == 200 else []

    def describe(self, model: str) -> Dict[str, Any]:
        """The management API's description of ``model`` (batchSize, workers, ...)."""
        status, body = http_request("GET", f"{self.management}/models/{model}", timeout=10)
        if status != 200:
            raise TorchServeError(f"describing model {model}: HTTP {status} {body[:300].decode(errors='replace')}")
        return json.loads(body)[0]

    def register(self, model: str, mar: Optional[str] = None, **params: Any) -> None:
        """Register ``mar`` (default ``<model>.mar`` of the model store) as ``model`` with one
        worker, without waiting for it. ``params``: more of the register API's query
        parameters (``batch_size``, ``max_batch_delay``, ``response_timeout``, ...)."""
        query = {"url": mar or f"{model}.mar", "model_name": model, "initial_workers": 1,
                 "synchronous": "false", **params}  # fmt: skip
        url = f"{self.management}/models?{urllib.parse.urlencode(query)}"
        status, body = http_request("POST", url, timeout=30)  # no body: the query says it all
        if status not in (200, 202):
            raise TorchServeError(f"registering {model}: HTTP {status} {body[:300].decode(errors='replace')}")

    # --- stopping and logs ------------------------------------------------------------------

    def stop(self) -> None:
        """Stop this server only: its process group (launcher, Java frontend, workers)."""
        stop_process_group(self.process.pid, self.process)
        logger.info("TorchServe stopped: pid %d", self.process.pid)

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` of the console, TorchServe's and the workers' logs."""
        tails = []
        for name in ("torchserve.out", "ts_log.log", "model_log.log"):
            try:
                with open(os.path.join(self.log_dir, name), errors="replace") as f:
                    tails.append(f"--- {name}\n" + "".join(line[:500] for line in f.readlines()[-lines:]))
            except OSError:
                pass
        return "\n".join(tails)


def read_only_launcher(path: str) -> List[str]:
    """A ``launcher`` that serves with ``path`` bind-mounted read-only (as KServe mounts a
    volume): in a user and mount namespace of its own (``unshare -rm``), so no privilege is
    needed and nothing else on the machine sees the mount."""
    remount = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0" && exec "$@"'
    return ["unshare", "-rm", "sh", "-c", remount, path]


def private_addresses() -> Dict[str, str]:
    """Every address TorchServe listens on, each on its own free port of 127.0.0.1."""
    ports = free_ports(len(REST_ADDRESSES) + len(GRPC_ADDRESSES))
    addresses = {key: f"http://127.0.0.1:{port}" for key, port in zip(REST_ADDRESSES, ports)}
    for key, port in zip(GRPC_ADDRESSES, ports[len(REST_ADDRESSES):]):
        addresses[f"{key}_address"] = "127.0.0.1"
        addresses[f"{key}_port"] = str(port)
    return addresses
