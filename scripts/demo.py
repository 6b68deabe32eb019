"""`make demo` / `make stop`: serve the DLRM with TorchServe and score sample_data.json.

    python scripts/demo.py start [--config model_config.json] [--timeout 900]
    python scripts/demo.py stop

``start`` packages ``dlrm.mar`` with create_dlrm_mar.sh, starts TorchServe on 127.0.0.1
(ports from config.properties) in its own process group, waits - showing progress - until
the model has a READY worker, POSTs sample_data.json and prints the answer and the seconds
from start to first answer. The server keeps running for your own curls; its pid, logs and
temp files live in .demo/.

``stop`` stops that server only: the process group of the pid in .demo/torchserve.pid.
(``torchserve --stop`` would stop every TorchServe on the machine.)

Two TorchServes on one machine must not share a temp dir: ``torchserve --start`` refuses to
start while $TMPDIR/.model_server.pid names a live server, and the workers' sockets are
$TEMP/.ts.sock.<port>. Both point into .demo/tmp here.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Dict, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_DIR = os.path.join(REPO, ".demo")
PID_FILE = os.path.join(DEMO_DIR, "torchserve.pid")
LOG_DIR = os.path.join(DEMO_DIR, "logs")
TMP_DIR = os.path.join(DEMO_DIR, "tmp")
MODEL_STORE = os.path.join(REPO, "model_store")
MODEL_NAME = "dlrm"
POLL_SECONDS = 2.0
PROGRESS_SECONDS = 10.0


def read_properties(path: str) -> Dict[str, str]:
    """config.properties as a dict (key=value lines, # comments)."""
    props = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                props[key.strip()] = value.strip()
    return props


def http(method: str, url: str, body: Optional[bytes] = None, timeout: float = 10.0) -> Tuple[int, str]:
    """(status, body) of one HTTP request; status 0 when the server did not answer."""
    request = urllib.request.Request(
        url, data=body, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (urllib.error.URLError, OSError):
        return 0, ""


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


def wait_until_ready(management: str, server: subprocess.Popen, timeout: float) -> None:
    """Poll GET /models/dlrm until a worker is READY; progress every PROGRESS_SECONDS."""
    start = time.monotonic()
    next_progress = start
    for _ in range(int(timeout / POLL_SECONDS) + 1):
        elapsed = time.monotonic() - start
        if server.poll() is not None:
            sys.exit(f"TorchServe exited (code {server.returncode}); see {LOG_DIR}/ts_log.log")
        status, body = http("GET", f"{management}/models/{MODEL_NAME}")
        workers = json.loads(body)[0].get("workers", []) if status == 200 else []
        if any(w.get("status") == "READY" for w in workers):
            print(f"  model ready after {elapsed:.0f} s")
            return
        if elapsed >= timeout:
            break
        if time.monotonic() >= next_progress:
            # TorchServe reports a worker that is still loading as "UNLOADING".
            state = "loading the model" if workers else "starting"
            print(f"  {elapsed:4.0f} s  {state}  | {last_worker_line()}", flush=True)
            next_progress += PROGRESS_SECONDS
        time.sleep(POLL_SECONDS)
    sys.exit(
        f"model {MODEL_NAME!r} not ready after {timeout:.0f} s; see {LOG_DIR}/model_log.log "
        "(stop the server with `make stop`)"
    )


def start(config: str, timeout: float) -> None:
    if running_pid():
        sys.exit(f"the demo's TorchServe is already running (pid {running_pid()}): `make stop` first")
    props = read_properties(os.path.join(REPO, "config.properties"))
    inference, management = props["inference_address"], props["management_address"]
    if http("GET", f"{inference}/ping", timeout=2)[0]:
        sys.exit(f"something already answers on {inference}: stop it first (or edit config.properties)")

    print(f"== packaging {config} into {MODEL_STORE}/{MODEL_NAME}.mar")
    subprocess.run(
        [os.path.join(REPO, "create_dlrm_mar.sh"), "--config", config,
         "--export-path", MODEL_STORE, "--model-name", MODEL_NAME],
        check=True,
    )  # fmt: skip

    shutil.rmtree(LOG_DIR, ignore_errors=True)  # this run's logs only
    os.makedirs(LOG_DIR)
    os.makedirs(TMP_DIR, exist_ok=True)
    env = {**os.environ, "LOG_LOCATION": LOG_DIR, "METRICS_LOCATION": LOG_DIR,
           "TMPDIR": TMP_DIR, "TEMP": TMP_DIR}  # fmt: skip
    env.pop("TS_CONFIG_FILE", None)  # it would override --ts-config
    command = [
        os.path.join(os.path.dirname(sys.executable), "torchserve"),
        "--start", "--foreground", "--ncs",
        "--model-store", MODEL_STORE,
        "--models", f"{MODEL_NAME}={MODEL_NAME}.mar",
        "--ts-config", os.path.join(REPO, "config.properties"),
        "--disable-token-auth", "--enable-model-api",
    ]  # fmt: skip
    print("== " + " ".join(command[1:]).replace(REPO + "/", ""))
    started = time.monotonic()
    with open(os.path.join(DEMO_DIR, "torchserve.out"), "w") as out:
        # Own session, so `make stop` can stop this server and its workers as one group.
        # cwd: config.properties' relative paths (metrics_config) are the repo root's.
        server = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    with open(PID_FILE, "w") as f:
        f.write(str(server.pid))
    print(f"== waiting for the model (building it takes minutes for the full Criteo size; "
          f"at most {timeout:.0f} s); logs in {os.path.relpath(LOG_DIR, REPO)}/")  # fmt: skip
    wait_until_ready(management, server, timeout)

    print("== curl -H 'Content-Type: application/json' --data @sample_data.json "
          f"{inference}/predictions/{MODEL_NAME}")  # fmt: skip
    with open(os.path.join(REPO, "sample_data.json"), "rb") as f:
        status, body = http("POST", f"{inference}/predictions/{MODEL_NAME}", f.read(), timeout=120)
    print(f"HTTP {status}\n{body}")
    print(f"== first answer {time.monotonic() - started:.1f} s after TorchServe started. "
          "The server keeps running: curl away, then `make stop`.")  # fmt: skip
    if status != 200:
        sys.exit(1)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop() -> None:
    pid = running_pid()
    if pid is None:
        print("the demo's TorchServe is not running")
    else:
        os.killpg(pid, signal.SIGTERM)  # the launcher, its Java frontend and the workers
        for _ in range(60):
            if not group_alive(pid):
                break
            time.sleep(0.5)
        else:
            os.killpg(pid, signal.SIGKILL)
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
