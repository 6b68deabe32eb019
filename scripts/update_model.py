"""Put a new version of a served model in front of traffic without failing a request, and
roll it back.

    python scripts/update_model.py --management http://127.0.0.1:8081 --mar build/dlrm.mar
    python scripts/update_model.py --management http://127.0.0.1:8081 --mar build/dlrm.mar \\
        --workers 2 --smoke request.json --keep-old --timeout 900
    python scripts/update_model.py --management http://127.0.0.1:8081 --rollback dlrm

The .mar comes from ``create_dlrm_mar.sh --version V`` (its MANIFEST names the model N and
the version V); it may sit anywhere on the server's host. An update runs these steps, each
printed with the seconds since the start; a failure names its step and why:

1. read the archive: N and V from ``MAR-INF/MANIFEST.json``; the smoke request from the
   packaged ``model_config.json`` (one sample: N_dense numbers, one id per table, the
   table's last row), or ``--smoke REQUEST.json``.
2. check the server: N is registered and serves a default version D; V is not registered
   and is greater than D (versions are numbers and dots, compared number by number).
3. register and load: ``POST /models?url=file://<copy of the .mar named N-V.mar>
   &initial_workers=<D's worker count>&synchronous=false``: TorchServe copies the file into
   its model store and starts the workers the .mar's model-config.yaml asks for, else as many
   as D has (``--workers W``: then ``PUT
   /models/N/V?min_worker=W&max_worker=W``); the default stays D. Then ``GET /models/N/V``
   until all are READY, at most ``--timeout`` s; a worker whose process changes meanwhile
   died while loading (its load failed, or it was killed): the step fails at once.
4. smoke test: the smoke request to ``/predictions/N/V``: a 200 whose scores are all
   finite numbers.
5. set default: ``PUT /models/N/V/set-default``: from here ``/predictions/N`` is V.
6. drain the old version: until D's job queue has stayed empty for DRAIN_SETTLE_S.
7. unregister the old version: ``DELETE /models/N/D`` (skipped with ``--keep-old``: D keeps
   its workers, for ``--rollback``).

A rollback (``--rollback N``): check the server (the default D, the previous version P =
the greatest registered version below D, with a READY worker), smoke-test P if ``--smoke``
is given, set P default. D stays registered (unregister it with ``curl -X DELETE
<management>/models/N/D``).

What TorchServe 0.12 does, read in its frontend (org.pytorch.serve.wlm) and seen under
load while this command was built - the reasons for the steps above:
- A request to ``/predictions/N`` picks its version when it arrives (``ModelManager.addJob``
  puts it on the default version's job queue). ``set-default`` is one field write: requests
  after it go to V, those already queued stay with D's workers, none fails.
- ``DELETE /models/N/D`` kills D's workers at once (``kill -9``) without waiting for the
  requests D holds (pytorch/serve#1101): those in a worker's batch are answered 500 "Worker
  died.", those still in D's queue are never answered (the client waits for its own
  timeout), and later requests naming D get 404. Hence step 6: after set-default D gets no
  new requests through ``/predictions/N``; once its queue (``jobQueueStatus.pendingRequests``
  of ``GET /models/N/D``) is empty, what is left is the batch each worker holds, answered
  in milliseconds to tens of milliseconds; DRAIN_SETTLE_S of empty queue is ample.
  Clients that name D in their URL (``/predictions/N/D``) lose it when it is unregistered.
- Registering a version never moves the default (only the first version of a name
  becomes it); a version already registered is refused.
- A register or scale call with ``synchronous=true`` holds one of the frontend's netty
  threads until the workers are up (``ApiUtils.updateModelWorkers`` waits on the future),
  and the inference connections served by that thread wait with it: under load one request
  took the whole load time (8.3 s for the tests' small model, against 0.16 s at most when
  asynchronous). Hence ``synchronous=false`` and polling. (Synchronously, TorchServe would
  also unregister a version whose worker fails; asynchronously it retries the worker
  forever: this command watches the workers' pids and unregisters V itself.) The .mar's
  model-config.yaml minWorkers/maxWorkers win over ``initial_workers``: hence ``--workers``
  scales after registering.
- ``url`` is a file name in the model store, or a URL that ``allowed_urls`` (default
  ``file://.*|http(s)?://.*``) matches: TorchServe copies a URL's file into the model store
  under its file name (refused with "Model file already exists" when one is there) and
  deletes that copy when the version is unregistered. Hence the copy named N-V.mar
  (``dlrm.mar`` may already be in the store, as v1). A server whose ``allowed_urls`` leave
  out ``file://`` refuses it: ``--model-store DIR`` (the server's model store, on this
  host) copies the .mar there as N-V.mar and registers it by name instead.

Exit status:
    0  done: V is the default (and D unregistered, unless --keep-old); for --rollback, P is
    1  a step failed; the server is as it was: D the default, serving, nothing of V left
    2  bad arguments, an unreadable archive, or a server state this command does not change
       (N not registered, V already registered or not newer, nothing to roll back to);
       nothing was sent that changes the server
    3  a step failed and the server is not as it was, nor as asked (e.g. V serves but D could
       not be unregistered); the message says what is registered and which is the default

Only the standard library (and scripts/torchserve_process.py's ``http_request``): it runs
wherever TorchServe's management address can be reached and the .mar can be read.
"""

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.parse
import zipfile
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from torchserve_process import http_request

EXIT_DONE = 0
EXIT_FAILED_RESTORED = 1
EXIT_REFUSED = 2
EXIT_FAILED_CHANGED = 3

VERSION_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")  # as create_dlrm_mar.sh --version checks
DEFAULT_TIMEOUT_S = 900.0  # a worker that builds the full default's 12 GB entry: 60-140 s on 2 cores
REQUEST_TIMEOUT_S = 120.0  # the smoke request: the first answer of a new worker pages tables in
DRAIN_SETTLE_S = 2.0  # the old version's queue empty this long: its workers' last batches answered
POLL_S = 0.2  # TorchServe restarts a worker that died after >= 1 s: a poll sees the new pid
# create_default_model_config()'s sizes, for a packaged config that leaves them out.
DEFAULT_DENSE_FEATURES = 13
DEFAULT_TABLES = 26


class StepFailed(Exception):
    """A step that did not succeed: its name, why, and the exit status it leads to."""

    def __init__(self, step: str, reason: str, status: int = EXIT_FAILED_RESTORED) -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason
        self.status = status


class Archive(NamedTuple):
    """What the update needs from a .mar."""

    path: str
    name: str  # the model name N (MANIFEST model.modelName)
    version: str  # V (MANIFEST model.modelVersion)
    smoke: Any  # the smoke request body (JSON)


class Progress:
    """Prints each step with the seconds since the command started."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def step(self, name: str, what: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {name}: {what}", flush=True)


# --- versions and the archive ----------------------------------------------------------------


def version_key(version: str) -> Optional[Tuple[int, ...]]:
    """``"2.10"`` -> (2, 10): versions compare number by number; None if not numbers and dots."""
    return tuple(int(part) for part in version.split(".")) if VERSION_PATTERN.match(version) else None


def smoke_request(config: Dict[str, Any]) -> Dict[str, Any]:
    """One sample (sample_data.json's shape) that ``config`` must accept: N_dense numbers in
    [-0.3, 0.3], one id per table, the table's last row (0 where the config leaves the sizes
    to the defaults, or gives something the worker will refuse anyway)."""
    dense = config.get("dense_in_features", DEFAULT_DENSE_FEATURES)
    dense = dense if isinstance(dense, int) and dense > 0 else DEFAULT_DENSE_FEATURES
    sizes = config.get("num_embeddings_per_feature")
    sizes = sizes if isinstance(sizes, list) and sizes else [1] * DEFAULT_TABLES
    return {
        "float_features": [round(0.1 * (i % 7) - 0.3, 1) for i in range(dense)],
        "id_list_features.lengths": [1] * len(sizes),
        "id_list_features.values": [s - 1 if isinstance(s, int) and s > 0 else 0 for s in sizes],
    }


def read_archive(path: str, smoke_file: Optional[str]) -> Archive:
    """Step 1: the model name and version of the .mar at ``path``, and the smoke request."""
    step = "read the archive"
    try:
        with zipfile.ZipFile(path) as mar:
            manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
            config = json.loads(mar.read("model_config.json")) if smoke_file is None else {}
    except (OSError, zipfile.BadZipFile, KeyError, ValueError) as e:
        raise StepFailed(step, f"{path} is not a readable .mar of create_dlrm_mar.sh: {e}", status=EXIT_REFUSED) from e
    model = manifest.get("model") or {}
    name, version = model.get("modelName"), str(model.get("modelVersion"))
    if not name or version_key(version) is None:
        raise StepFailed(step, f"{path}: MANIFEST model {name!r} version {version!r}: package it with "
                               "create_dlrm_mar.sh --version V (numbers and dots, e.g. 2.0)", status=EXIT_REFUSED)  # fmt: skip
    if not isinstance(config, dict):
        raise StepFailed(step, f"{path}: model_config.json holds {type(config).__name__}, not a JSON object", status=EXIT_REFUSED)
    smoke = smoke_request(config) if smoke_file is None else read_smoke(smoke_file, step)
    return Archive(path=path, name=name, version=version, smoke=smoke)


def read_smoke(path: str, step: str) -> Any:
    """The request body in the JSON file ``path`` (``--smoke``)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise StepFailed(step, f"--smoke {path}: not a readable JSON request: {e}", status=EXIT_REFUSED) from e


# --- the management API ----------------------------------------------------------------------


def answer_text(status: int, body: bytes) -> str:
    """TorchServe's answer in a sentence: its "message" (or "status"), else the raw body."""
    if status == 0:
        return "no answer (is the server running, and the address right?)"
    try:
        parsed = json.loads(body)
        text = parsed.get("message") or parsed.get("status") if isinstance(parsed, dict) else None
    except ValueError:
        text = None
    return f"HTTP {status}: {text or body[:300].decode(errors='replace').strip()}"


def registered_versions(management: str, name: str) -> Optional[List[Dict[str, Any]]]:
    """``GET /models/N/all``: each version's description; None if N is not registered."""
    status, body = http_request("GET", f"{management}/models/{name}/all", timeout=30)
    if status == 404:
        return None
    if status != 200:
        raise StepFailed("check the server", f"GET /models/{name}/all: {answer_text(status, body)}", status=EXIT_REFUSED)
    return json.loads(body)


def default_version(management: str, name: str) -> Optional[str]:
    """The version ``/predictions/N`` serves (``GET /models/N`` describes the default)."""
    status, body = http_request("GET", f"{management}/models/{name}", timeout=30)
    return json.loads(body)[0]["modelVersion"] if status == 200 else None


def ready_workers(description: Dict[str, Any]) -> int:
    return sum(1 for w in description.get("workers", []) if w.get("status") == "READY")


def describe_version(management: str, name: str, version: str) -> Optional[Dict[str, Any]]:
    status, body = http_request("GET", f"{management}/models/{name}/{version}", timeout=30)
    return json.loads(body)[0] if status == 200 else None


def server_state(management: str, name: str) -> str:
    """What is registered now, for a failure message: "dlrm: 1.0 (default, 2 READY), 2.0"."""
    try:
        versions = registered_versions(management, name)
    except StepFailed as e:
        return f"unknown ({e.reason})"
    if not versions:
        return f"{name}: not registered"
    default = default_version(management, name)
    return f"{name}: " + ", ".join(
        f"{v['modelVersion']} ({'default, ' if v['modelVersion'] == default else ''}{ready_workers(v)} READY)"
        for v in versions
    )


# --- the steps of an update ------------------------------------------------------------------


def check_server(management: str, archive: Archive) -> Tuple[str, Dict[str, Any]]:
    """Step 2: (the default version D, its description). Refuses (exit 2) what an update
    does not change: N not registered, V registered already, V not newer than D."""
    step, name, version = "check the server", archive.name, archive.version
    versions = registered_versions(management, name)
    if versions is None:
        raise StepFailed(step, f"no model {name} on {management}: this command replaces a served version; register the "
                               f"first one with POST /models?url=...", status=EXIT_REFUSED)  # fmt: skip
    if any(v["modelVersion"] == version for v in versions):
        raise StepFailed(step, f"{name} {version} is registered already ({server_state(management, name)}): package the "
                               f"new model with another create_dlrm_mar.sh --version, or unregister {version} first",
                         status=EXIT_REFUSED)  # fmt: skip
    default = default_version(management, name)
    old = next((v for v in versions if v["modelVersion"] == default), None)
    if old is None:
        raise StepFailed(step, f"{name} has no default version ({server_state(management, name)})", status=EXIT_REFUSED)
    if version_key(default) is not None and version_key(version) <= version_key(default):
        raise StepFailed(step, f"{name} {version} is not newer than the default {default}: package it with "
                               f"create_dlrm_mar.sh --version greater than {default}", status=EXIT_REFUSED)  # fmt: skip
    return default, old


def stage_archive(archive: Archive, model_store: Optional[str], stage_dir: str) -> Tuple[str, Optional[str]]:
    """(the register API's url, the file this command put in the model store or None).
    Without ``model_store``: a file:// URL of a copy (a hard link where possible) of the .mar
    named N-V.mar in ``stage_dir``, readable by the server. With it: a copy there as N-V.mar,
    registered by name."""
    file_name = f"{archive.name}-{archive.version}.mar"
    try:
        if model_store is not None:
            target = os.path.join(model_store, file_name)
            if os.path.exists(target):
                raise StepFailed("register and load", f"{target} exists already: remove it, or package the model "
                                                      "with another --version", status=EXIT_REFUSED)  # fmt: skip
            shutil.copyfile(archive.path, target)
            return file_name, target
        staged = os.path.join(stage_dir, file_name)
        try:
            os.link(os.path.abspath(archive.path), staged)
        except OSError:  # another file system
            shutil.copyfile(archive.path, staged)
        os.chmod(stage_dir, 0o755)  # the server may run as another user
        os.chmod(staged, 0o644)
    except OSError as e:
        raise StepFailed("register and load", f"copying {archive.path} as {file_name}: {e}", status=EXIT_REFUSED) from e
    return "file://" + urllib.parse.quote(os.path.abspath(staged)), None


def register(management: str, archive: Archive, url: str, workers: Optional[int], initial_workers: int) -> None:
    """Step 3, first half: ``POST /models?url=...&initial_workers=...&synchronous=false``
    (answered at once), then ``--workers``' scaling, also asynchronous. ``initial_workers``:
    the old version's worker count, for a .mar whose model-config.yaml sets none (the shipped
    one: TorchServe picks the count from the devices at startup, but registers a model with
    ``default_workers_per_model`` workers, 0 when unset); the YAML's minWorkers wins if set."""
    step, name, version = "register and load", archive.name, archive.version
    query = urllib.parse.urlencode(
        {"url": url, "model_name": name, "initial_workers": initial_workers, "synchronous": "false"}
    )
    status, body = http_request("POST", f"{management}/models?{query}", timeout=120)
    if status not in (200, 202):
        why = answer_text(status, body)
        if "does not match any allowed URL" in why:
            why += " (the server's allowed_urls leave out file://: give --model-store DIR, its model store)"
        elif "Model file already exists" in why:
            why += f" (the model store holds a {name}-{version}.mar already: remove it)"
        raise StepFailed(step, why)
    if workers is not None:
        query = urllib.parse.urlencode({"min_worker": workers, "max_worker": workers, "synchronous": "false"})
        status, body = http_request("PUT", f"{management}/models/{name}/{version}?{query}", timeout=120)
        if status not in (200, 202):
            raise StepFailed(step, f"scaling {name} {version} to {workers} workers: {answer_text(status, body)}")


def wait_until_ready(management: str, name: str, version: str, timeout: float) -> Dict[str, Any]:
    """Step 3, second half: until every worker of ``version`` (minWorkers of them) is READY;
    its description. A worker whose process changes while this waits exited (its load
    failed, or it was killed): StepFailed at once rather than TorchServe's retries."""
    step = "register and load"
    pids: Dict[str, int] = {}  # worker id -> the process seen
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        description = describe_version(management, name, version)
        if description is None:
            raise StepFailed(step, f"{name} {version} is no longer registered (unregistered by someone else?)")
        for worker in description.get("workers", []):
            pid, seen = worker.get("pid", -1), pids.get(worker.get("id"))
            if seen is not None and pid != seen:
                raise StepFailed(step, f"a worker of {name} {version} (pid {seen}) exited while loading: its error is in "
                                       "TorchServe's model_log.log")  # fmt: skip
            if pid > 0:
                pids[worker.get("id")] = pid
        workers = description.get("workers", [])
        if workers and len(workers) == description.get("minWorkers") and ready_workers(description) == len(workers):
            return description
        time.sleep(POLL_S)
    raise StepFailed(step, f"the workers of {name} {version} were not READY within {timeout:.0f} s (--timeout)")


def finite_scores(answer: Any) -> Optional[List[float]]:
    """The scores of a DLRM answer ({"score": s or [...]} or upstream's {"default": [...]}),
    if every one is a finite number; else None (NaN and inf reach JSON as null)."""
    scores = answer.get("score", answer.get("default")) if isinstance(answer, dict) else None
    scores = scores if isinstance(scores, list) else [scores]
    good = all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in scores)
    return scores if scores and good else None


def smoke_test(inference: str, inference_path: str, body: Any) -> str:
    """Step 4: POST ``body`` to ``inference + inference_path``; the answer if it is a 200 with
    finite scores, else StepFailed."""
    status, answer = http_request("POST", f"{inference}{inference_path}", json.dumps(body).encode(), timeout=REQUEST_TIMEOUT_S)
    text = answer[:300].decode(errors="replace")
    if status != 200:
        raise StepFailed("smoke test", f"{inference_path} answered {answer_text(status, answer)}")
    try:
        parsed = json.loads(answer)
    except ValueError:
        parsed = None
    if finite_scores(parsed) is None:
        raise StepFailed("smoke test", f"{inference_path} answered 200 without finite scores: {text}")
    return text


def set_default(management: str, name: str, version: str) -> None:
    """Step 5: ``/predictions/N`` serves ``version`` from the next request on."""
    status, body = http_request("PUT", f"{management}/models/{name}/{version}/set-default", timeout=30)
    if status != 200:
        raise StepFailed("set default", f"PUT /models/{name}/{version}/set-default: {answer_text(status, body)}")


def drain(management: str, name: str, version: str, timeout: float) -> None:
    """Step 6: until ``version``'s job queue has been empty for DRAIN_SETTLE_S (no longer the
    default, it gets no new requests through /predictions/N)."""
    deadline = time.monotonic() + timeout
    empty_since: Optional[float] = None
    while time.monotonic() < deadline:
        description = describe_version(management, name, version)
        if description is None:
            raise StepFailed("drain the old version", f"{name} {version} is no longer registered", status=EXIT_FAILED_CHANGED)
        pending = (description.get("jobQueueStatus") or {}).get("pendingRequests", 0)
        now = time.monotonic()
        empty_since = (empty_since or now) if pending == 0 else None
        if empty_since is not None and now - empty_since >= DRAIN_SETTLE_S:
            return
        time.sleep(POLL_S)
    raise StepFailed("drain the old version", f"{name} {version}'s queue did not stay empty within {timeout:.0f} s "
                                              f"(clients naming /predictions/{name}/{version}?); it stays registered: "
                                              f"unregister it later (DELETE /models/{name}/{version})",
                     status=EXIT_FAILED_CHANGED)  # fmt: skip


def unregister(management: str, name: str, version: str, step: str) -> None:
    """``DELETE /models/N/version``; a version already gone counts as done."""
    status, body = http_request("DELETE", f"{management}/models/{name}/{version}", timeout=120)
    if status not in (200, 404):
        raise StepFailed(step, f"DELETE /models/{name}/{version}: {answer_text(status, body)}", status=EXIT_FAILED_CHANGED)


def restore(management: str, archive: Archive, old: str, stored_copy: Optional[str]) -> Optional[str]:
    """After a failure before the switch: V unregistered (TorchServe may have done it), its
    model store copy removed, D still the default. None if so, else what is wrong."""
    problems = []
    if describe_version(management, archive.name, archive.version) is not None:
        status, body = http_request("DELETE", f"{management}/models/{archive.name}/{archive.version}", timeout=120)
        if status not in (200, 404):
            problems.append(f"{archive.name} {archive.version} could not be unregistered: {answer_text(status, body)}")
    if stored_copy is not None and os.path.exists(stored_copy):
        os.remove(stored_copy)
    if default_version(management, archive.name) != old:
        problems.append(f"the default is not {old}")
    return "; ".join(problems) or None


def update(args: argparse.Namespace, archive: Archive, progress: Progress) -> int:
    """Steps 2-7 (the module docstring); StepFailed for a step that fails."""
    name, version = archive.name, archive.version
    old, old_description = check_server(args.management, archive)
    old_pids = [w.get("pid") for w in old_description.get("workers", [])]
    progress.step("check the server", f"{name} serves {old} ({ready_workers(old_description)} READY workers, pids "
                                      f"{old_pids}); {version} is new")  # fmt: skip
    stored_copy: Optional[str] = None
    stage_dir = tempfile.mkdtemp(prefix="update_model.")
    try:
        url, stored_copy = stage_archive(archive, args.model_store, stage_dir)
        register(args.management, archive, url, args.workers, max(1, len(old_description.get("workers", []))))
        description = wait_until_ready(args.management, name, version, args.timeout)
        progress.step("register and load", f"{name} {version} from {url}: {ready_workers(description)} READY workers "
                                           f"(pids {[w.get('pid') for w in description['workers']]}); the default is "
                                           f"still {old}")  # fmt: skip
        answer = smoke_test(args.inference, f"/predictions/{name}/{version}", archive.smoke)
        progress.step("smoke test", f"/predictions/{name}/{version} answered 200 {answer}")
        set_default(args.management, name, version)
    except StepFailed as failure:
        if failure.status == EXIT_FAILED_RESTORED:
            problem = restore(args.management, archive, old, stored_copy)
            if problem is not None:
                failure.status, failure.reason = EXIT_FAILED_CHANGED, f"{failure.reason}; restoring failed: {problem}"
        raise
    finally:
        shutil.rmtree(stage_dir, ignore_errors=True)
    progress.step("set default", f"/predictions/{name} serves {version} (was {old})")
    if args.keep_old:
        progress.step("done", f"{name} {version} is the default; {old} keeps its workers (--rollback {name} returns to it)")
        return EXIT_DONE
    drain(args.management, name, old, args.timeout)
    progress.step("drain the old version", f"{name} {old}'s queue empty for {DRAIN_SETTLE_S:.0f} s")
    unregister(args.management, name, old, "unregister the old version")
    progress.step("unregister the old version", f"{name} {old} unregistered (its workers {old_pids} stopped)")
    progress.step("done", f"{name} {version} serves /predictions/{name}")
    return EXIT_DONE


# --- rollback --------------------------------------------------------------------------------


def previous_version(versions: List[Dict[str, Any]], default: str) -> Optional[Dict[str, Any]]:
    """The greatest registered version below ``default`` (numbers and dots only)."""
    key = version_key(default)
    older = [(version_key(v["modelVersion"]), v) for v in versions]
    older = [(k, v) for k, v in older if key is not None and k is not None and k < key]
    return max(older, key=lambda kv: kv[0], default=(None, None))[1]


def rollback(args: argparse.Namespace, progress: Progress) -> int:
    """The previous version made the default again; StepFailed if there is none to go to."""
    step, name = "check the server", args.rollback
    versions = registered_versions(args.management, name)
    if versions is None:
        raise StepFailed(step, f"no model {name} on {args.management}", status=EXIT_REFUSED)
    default = default_version(args.management, name)
    previous = previous_version(versions, default)
    if previous is None:
        raise StepFailed(step, f"nothing to roll back to: no registered version of {name} below the default {default} "
                               f"({server_state(args.management, name)}); an update keeps the old one with --keep-old",
                         status=EXIT_REFUSED)  # fmt: skip
    target = previous["modelVersion"]
    if ready_workers(previous) == 0:
        raise StepFailed(step, f"{name} {target} has no READY worker ({server_state(args.management, name)})", status=EXIT_REFUSED)
    progress.step(step, f"{name} serves {default}; the previous version {target} has {ready_workers(previous)} READY workers")
    if args.smoke is not None:
        answer = smoke_test(args.inference, f"/predictions/{name}/{target}", read_smoke(args.smoke, "smoke test"))
        progress.step("smoke test", f"/predictions/{name}/{target} answered 200 {answer}")
    set_default(args.management, name, target)
    progress.step("set default", f"/predictions/{name} serves {target} (was {default}, still registered)")
    return EXIT_DONE


# --- the command -----------------------------------------------------------------------------


def inference_address(management: str) -> str:
    """The inference API next to ``management``: TorchServe's default ports 8080/8081 (one
    address for both, as KServe's config has, stays as it is)."""
    parsed = urllib.parse.urlsplit(management)
    if parsed.port == 8081:
        return urllib.parse.urlunsplit(parsed._replace(netloc=f"{parsed.hostname}:8080"))
    return management


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__[__doc__.index("Exit status:"):].split("\n\nOnly")[0])  # fmt: skip
    parser.add_argument("--management", required=True, help="TorchServe's management address, e.g. http://127.0.0.1:8081")
    parser.add_argument("--inference", help="its inference address (default: the management address on port 8080 "
                                            "when that is 8081, else the management address itself)")  # fmt: skip
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--mar", help="the new version's .mar (create_dlrm_mar.sh --version V)")
    action.add_argument("--rollback", metavar="NAME", help="make the version before the default of NAME the default")
    parser.add_argument("--workers", type=int, help="workers of the new version (default: the .mar's model-config.yaml, else as "
                                                "many as the old version has)")
    parser.add_argument("--smoke", metavar="REQUEST.json", help="the smoke request (default: one sample made to fit "
                                                                 "the .mar's model_config.json)")  # fmt: skip
    parser.add_argument("--keep-old", action="store_true", help="leave the old version registered with its workers")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help=f"seconds for the new version's workers to be READY, and for the old one to drain "
                             f"(default {DEFAULT_TIMEOUT_S:.0f})")  # fmt: skip
    parser.add_argument("--model-store", help="the server's model store on this host, for a server whose allowed_urls "
                                              "leave out file://")  # fmt: skip
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers {args.workers}: give 1 or more")
    if args.timeout <= 0:
        parser.error(f"--timeout {args.timeout}: give seconds > 0")
    if args.model_store is not None and not os.path.isdir(args.model_store):
        parser.error(f"--model-store {args.model_store}: not a directory")
    args.management = args.management.rstrip("/")
    args.inference = (args.inference or inference_address(args.management)).rstrip("/")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    progress = Progress()
    name = args.rollback
    try:
        if args.rollback:
            return rollback(args, progress)
        archive = read_archive(args.mar, args.smoke)
        name = archive.name
        progress.step("read the archive", f"{name} {archive.version} ({args.mar}); smoke request "
                                          f"{json.dumps(archive.smoke)[:120]}")  # fmt: skip
        return update(args, archive, progress)
    except StepFailed as failure:
        print(f"[{progress.elapsed():6.1f} s] FAILED at step '{failure.step}': {failure.reason}", file=sys.stderr)
        if name is not None and failure.status != EXIT_REFUSED:
            print(f"  {'the server is as it was' if failure.status == EXIT_FAILED_RESTORED else 'the server now'}: "
                  f"{server_state(args.management, name)}", file=sys.stderr)  # fmt: skip
        return failure.status


if __name__ == "__main__":
    sys.exit(main())
