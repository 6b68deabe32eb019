"""`make demo` / `make stop`: serve the DLRM with TorchServe and score sample_data.json.

    python scripts/demo.py start [--config model_config.json] [--timeout 900]
    python scripts/demo.py stop

``start`` packages ``dlrm.mar`` with create_dlrm_mar.sh, starts TorchServe on 127.0.0.1
(ports from config.properties) in its own process group, waits - showing progress - until
the model has a READY worker, POSTs sample_data.json and prints the answer and the seconds
from start to first answer. Workers: TorchServe's default, from the devices (neither
config.properties nor model-config.yaml sets a count): one per GPU, each on its own GPU, or
one per CPU core; ``start`` says how many it started. The server keeps running for your own curls; its pid, logs and
temp files (TMPDIR/TEMP: not shared with any other TorchServe) live in .demo/.

``stop`` stops that server only: the process group of the pid in .demo/torchserve.pid.
(``torchserve --stop`` would stop every TorchServe on the machine.)

Starting and stopping are scripts/torchserve_process.py's, shared with the tests and the
benchmarks.
"""

import argparse
import os
import shutil
import subprocess
import sys
import time
from typing import Callable, Optional

from torchserve_process import TorchServe, TorchServeError, http_request, read_properties, stop_process_group

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from dlrm_table_store import default_store_dir  # noqa: E402
DEMO_DIR = os.path.join(REPO, ".demo")
PID_FILE = os.path.join(DEMO_DIR, "torchserve.pid")
LOG_DIR = os.path.join(DEMO_DIR, "logs")
MODEL_STORE = os.path.join(REPO, "model_store")
MODEL_NAME = "dlrm"
PROGRESS_SECONDS = 10.0


def running_pid() -> Optional[int]:
    """The pid of the demo's TorchServe if it is still running, else None."""
    try:
        with open(PID_FILE) as f:
            pid = int(f.read().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except (OSError, ValueError):
        return None
    return pid if b"torchserve" in cmdline else None


def last_worker_line() -> str:
    """The worker's latest log message (the factory's progress bar shows there)."""
    try:
        with open(os.path.join(LOG_DIR, "model_log.log"), "rb") as f:
            f.seek(max(0, os.path.getsize(f.name) - 8192))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    messages = [line.split(" - ", 1)[1].strip() for line in lines if " - " in line]
    messages = [m for m in messages if m and len(m) < 200]  # skip config dumps
    return messages[-1] if messages else ""


def tables_line() -> str:
    """What the worker said of its tables: mapped from or built into the store."""
    try:
        with open(os.path.join(LOG_DIR, "model_log.log"), errors="replace") as f:
            lines = [line for line in f if "table store: " in line]
    except OSError:
        return "no worker log"
    return lines[-1].split("MODEL_LOG - ", 1)[-1].strip() if lines else "no table store"


def workers_line(server: TorchServe) -> str:
    """How many workers TorchServe started for the model, and on what."""
    workers = server.workers(MODEL_NAME)
    on_gpu = sum(bool(w.get("gpu")) for w in workers)
    devices = f"each on its own GPU ({on_gpu} GPU workers)" if on_gpu else f"on the CPU ({os.cpu_count()} cores)"
    return (f"TorchServe started {len(workers)} worker(s), {devices}: its default from the devices "
            "(one per GPU, else one per CPU core); set minWorkers/maxWorkers in model-config.yaml to choose")


def show_progress(server: TorchServe) -> Callable[[float], None]:
    """What the server is doing while the model loads, every PROGRESS_SECONDS."""

    def progress(elapsed: float) -> None:
        # TorchServe reports a worker that is still loading as "UNLOADING".
        state = "loading the model" if server.workers(MODEL_NAME) else "starting"
        print(f"  {elapsed:4.0f} s  {state}  | {last_worker_line()}", flush=True)

    return progress


def start(config: str, timeout: float) -> None:
    if running_pid():
        sys.exit(f"the demo's TorchServe is already running (pid {running_pid()}): `make stop` first")
    # The repo's config.properties as it is (ports 8080-8082, as the README's curl uses),
    # its relative paths (metrics_config) made absolute.
    properties = read_properties(os.path.join(REPO, "config.properties"), resolve_paths=True)
    inference = properties["inference_address"]
    if http_request("GET", f"{inference}/ping", timeout=2)[0]:
        sys.exit(f"something already answers on {inference}: stop it first (or edit config.properties)")

    print(f"== packaging {config} into {MODEL_STORE}/{MODEL_NAME}.mar")
    subprocess.run(
        [os.path.join(REPO, "create_dlrm_mar.sh"), "--config", config,
         "--export-path", MODEL_STORE, "--model-name", MODEL_NAME],
        check=True,
    )  # fmt: skip

    shutil.rmtree(LOG_DIR, ignore_errors=True)  # this run's logs only
    started = time.monotonic()
    server = TorchServe(DEMO_DIR, MODEL_STORE, properties=properties, models=[f"{MODEL_NAME}={MODEL_NAME}.mar"],
                        private_ports=False, log_dir=LOG_DIR)  # fmt: skip
    print("== " + " ".join(server.command[1:]).replace(REPO + "/", ""))
    with open(PID_FILE, "w") as f:  # `make stop` stops this process group
        f.write(str(server.process.pid))
    store = default_store_dir()
    print(f"== waiting for the model (at most {timeout:.0f} s; logs in {os.path.relpath(LOG_DIR, REPO)}/): its "
          f"worker maps the tables from the table store {store} (set DLRM_TABLE_STORE to move it), "
          "building them there first if they are not there yet (~1 min for the full Criteo size)")  # fmt: skip
    try:
        server.wait_for_model(MODEL_NAME, timeout, progress=show_progress(server))
    except TorchServeError as error:
        sys.exit(f"{error}\n(logs in {LOG_DIR}; stop the server with `make stop`)")
    print(f"  model ready after {time.monotonic() - started:.0f} s ({tables_line()})")
    print(f"  {workers_line(server)}")

    print("== curl -H 'Content-Type: application/json' --data @sample_data.json "
          f"{inference}/predictions/{MODEL_NAME}")  # fmt: skip
    with open(os.path.join(REPO, "sample_data.json"), "rb") as f:
        status, body = http_request("POST", f"{inference}/predictions/{MODEL_NAME}", f.read(), timeout=120)
    print(f"HTTP {status}\n{body.decode(errors='replace')}")
    print(f"== first answer {time.monotonic() - started:.1f} s after TorchServe started. "
          "The server keeps running: curl away, then `make stop`.")  # fmt: skip
    if status != 200:
        sys.exit(1)


def stop() -> None:
    pid = running_pid()
    if pid is None:
        print("the demo's TorchServe is not running")
    else:
        stop_process_group(pid)  # the launcher, its Java frontend and the workers
        print(f"stopped the demo's TorchServe (process group {pid})")
    if os.path.exists(PID_FILE):
        os.remove(PID_FILE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--config", default=os.path.join(REPO, "model_config.json"))
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the model")
    args = parser.parse_args()
    start(args.config, args.timeout) if args.action == "start" else stop()


if __name__ == "__main__":
    main()
