"""Serving benchmark: samples/s and p50/p99 latency of the DLRM handler through a real
TorchServe, for requests of 1 to 1024 samples sent as JSON or as binary tensors, next to two
references measured in the same run: the same model in-process (the ceiling) and a
do-nothing handler answering the same bodies (``noop_handler.py``: TorchServe's floor).

    apt-get install -y wrk            # the load generator (macOS: brew install wrk)
    .venv/bin/python benchmarks/bench_serve.py                    # one-sample JSON and binary
    .venv/bin/python benchmarks/bench_serve.py --samples-per-request 1 64 256 1024 --connections 1 16
    .venv/bin/python benchmarks/bench_serve.py --quick            # short runs, one round

What runs: ONE TorchServe with the repo's config.properties (its addresses moved to free
loopback ports, gRPC's too; ``--ts-property KEY=VALUE`` to change a line), its own
TMPDIR/TEMP, stopped by its process group, and these models, all from the same per-model
YAML (the repo's ``model-config.yaml``, the one ``create_dlrm_mar.sh`` packages;
``--model-yaml`` to try another):

    dlrm      create_dlrm_mar.sh of the default architecture (D = 64, dense MLP 512-256-64,
              over MLP 512-512-256-1, 26 tables) with every table capped at ``--max-rows``
              rows (default 100,000: 917,618 rows, ~66 MB of int8 tables, so the worker
              starts in seconds); ``--full-config`` serves model_config.json (Criteo 1TB)
    dlrm_tT   the same with ``handler: {torch_num_threads: T}`` added to the YAML, one per
              ``--threads`` value (without ``--threads``: the YAML's own setting, as "dlrm")
    base      ``--baseline DIR``: dlrm packaged by another checkout's create_dlrm_mar.sh (its
              handler and request code): an older handler, A/B in the same run (JSON only)
    noop      benchmarks/noop_handler.py: a constant answer per request

The bodies: for one sample, sample_data.json with its ids taken modulo the served table
sizes; for B samples, B seeded random samples of 13 dense numbers and one valid id per
table (every answer must be a 200). Each is sent as compact ``application/json`` and as
``application/octet-stream`` in the open inference protocol's binary layout
(``dlrm_request.binary_request_body``: FP32 dense, INT64 lengths and ids, binary outputs),
with its ``Inference-Header-Content-Length``.

For each workers count (``--workers``, scaled with the management API), samples per request,
format and connection count, the models are measured back to back, each ``--warmup`` s
unmeasured and then ``--duration`` s measured; ``--rounds`` repeats the sweep and the table
shows each cell's best round (highest req/s, with that round's latencies): other work on a
shared machine only ever slows a run down. "batch" is requests per handler call
(TorchServe's dynamic batching), from the PredictionTime metric the worker emits per call.
"other load" is the CPU the rest of the machine used meanwhile (cores busy outside this
TorchServe and wrk), from /proc.

The in-process reference ("in-process" rows): the same model built in W fresh processes
(``DLRMFactory``, the table store entry the workers mapped, ``optimize_for_inference``, T
torch threads each, as the handler serves), each calling ``model(dense, kjt)`` on the
body's batch in a loop for ``--duration`` s: W = the workers count for the rows with more
than one connection (all cores busy, as under load), W = 1 for one connection (a lone
request's forward). Its samples/s is what the cores can do for that batch; "x in-process"
is a row's samples/s over it. The no-op rows are the floor for the same body; "x no-op"
is a row's req/s over the no-op's. "dlrm_request" below the table is the in-process cost
of the request path for each body (``parse_batch`` + ``to_key_major_kjt``, one thread,
median of 200): what the handler adds to the forward.

Why wrk: a closed loop of exactly N keep-alive connections (each sends its next request when
the previous answer arrives: bounded concurrency, no queue build-up in the client), written
in C with one event-loop thread, so on a 2-core machine it takes a few percent of a core at
thousands of requests/s. A Python client would need most of a core for that rate and take it
from the server it measures. A Lua script (``WRK_LUA``) sets the POST body, read from a file
in binary mode: Lua strings carry any bytes with their length, so wrk sends a binary body as
it is, with its headers; it prints the latency percentiles as JSON. Without wrk the
benchmark stops and says how to install it.

Output: a markdown table on stdout; ``--out`` (default benchmarks/results/bench_serve.png)
gets the plot, and a .json of every round next to it.
"""

import argparse
import json
import math
import multiprocessing
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(REPO, "scripts"), REPO]

from dlrm_factory import create_default_model_config, read_config_source, resolve_model_config  # noqa: E402
from dlrm_request import binary_request_body, parse_batch, to_key_major_kjt  # noqa: E402
from torchserve_process import TorchServe, http_request, read_properties  # noqa: E402

BIN = os.path.dirname(sys.executable)
MODELS = ("noop", "base", "dlrm")  # the order of the table's rows (dlrm_tT after dlrm)
FORMATS = {"json": "application/json", "binary": "application/octet-stream"}
READY_TIMEOUT_S = {"full": 900, "capped": 180}  # the full config builds 12 GB of tables
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

WRK_LUA = r"""
-- POST the body in $BENCH_BODY as $BENCH_CONTENT_TYPE (with $BENCH_HEADER_LENGTH as its
-- Inference-Header-Content-Length when set: a binary body); print the summary as one JSON line.
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("BENCH_CONTENT_TYPE")
if os.getenv("BENCH_HEADER_LENGTH") ~= "" then
  wrk.headers["Inference-Header-Content-Length"] = os.getenv("BENCH_HEADER_LENGTH")
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, ' ..
    '"mean_us": %.1f, "max_us": %d, "errors": {"connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d}}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.mean, latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


# --- what is served -----------------------------------------------------------------------


def served_config(args: argparse.Namespace) -> Dict[str, Any]:
    """The DLRM config to serve: model_config.json, or the default architecture with every
    table capped at ``args.max_rows`` rows."""
    if args.full_config:
        config = read_config_source(os.path.join(REPO, "model_config.json"))
    else:
        config = create_default_model_config()
        config["num_embeddings_per_feature"] = [
            min(rows, args.max_rows) for rows in config["num_embeddings_per_feature"]
        ]
    config["device"] = "cpu"
    resolve_model_config(config)  # fail here, not in the worker
    return config


def request_body(config: Dict[str, Any]) -> bytes:
    """sample_data.json (one sample, one id per table) with each id taken modulo its table's
    size, as compact JSON."""
    with open(os.path.join(REPO, "sample_data.json")) as f:
        body = json.load(f)
    sizes = config["num_embeddings_per_feature"]
    ids = body["id_list_features.values"]
    if len(ids) != len(sizes):
        sys.exit(f"sample_data.json has {len(ids)} ids; the served config has {len(sizes)} tables")
    body["id_list_features.values"] = [i % rows for i, rows in zip(ids, sizes)]
    return json.dumps(body, separators=(",", ":")).encode()


def request_bodies(config: Dict[str, Any], num_samples: int, seed: int = 0) -> Dict[str, Tuple[bytes, Optional[int]]]:
    """The request of ``num_samples`` samples in each format: {"json": (compact JSON, None),
    "binary": (binary body, its header length)}. One sample: ``request_body``; more: seeded
    random samples, 13 float32 numbers in [-3, 3) (written in full, as a client's
    ``json.dumps(array.tolist())`` writes them: ~17 digits) and one valid id per table."""
    if num_samples == 1:
        request = json.loads(request_body(config))
    else:
        rng = random.Random(seed)
        sizes = config["num_embeddings_per_feature"]
        request = {
            "float_features": [[float(np.float32(rng.uniform(-3, 3))) for _ in range(config["dense_in_features"])]
                               for _ in range(num_samples)],
            "id_list_features.lengths": [1] * (num_samples * len(sizes)),
            "id_list_features.values": [rng.randrange(rows) for _ in range(num_samples) for rows in sizes],
        }  # fmt: skip
    dense = np.asarray(request["float_features"], dtype=np.float32).reshape(num_samples, -1)
    lengths = np.asarray(request["id_list_features.lengths"], dtype=np.int64).reshape(num_samples, -1)
    binary = binary_request_body(dense, lengths, np.asarray(request["id_list_features.values"], dtype=np.int64))
    as_json = json.dumps(request, separators=(",", ":")).encode()
    return {"json": (as_json, None), "binary": binary}


def yaml_with_threads(model_yaml: str, threads: int, path: str) -> str:
    """``model_yaml`` with ``handler: {torch_num_threads: threads}``, written to ``path``."""
    import yaml  # noqa: PLC0415 - TorchServe's own dependency

    with open(model_yaml) as f:
        settings = yaml.safe_load(f) or {}
    settings.setdefault("handler", {})["torch_num_threads"] = threads
    with open(path, "w") as f:
        yaml.safe_dump(settings, f)
    return path


def dlrm_models(args: argparse.Namespace) -> List[str]:
    """The DLRM models of the run: "dlrm" (the YAML as it is), or "dlrm_tT" per ``--threads``
    value; "base" first with ``--baseline``."""
    dlrm = [f"dlrm_t{t}" for t in args.threads] if args.threads else ["dlrm"]
    return (["base"] if args.baseline else []) + dlrm


def build_mars(workdir: str, config: Dict[str, Any], args: argparse.Namespace) -> str:
    """Every model's .mar (see the module docstring), all with ``args.model_yaml`` as their
    per-model YAML (plus the threads setting for dlrm_tT); returns the model store."""
    store = os.path.join(workdir, "model_store")
    config_file = os.path.join(workdir, "served_config.json")
    with open(config_file, "w") as f:
        json.dump(config, f, indent=2)
    for model in dlrm_models(args):
        yaml_file = args.model_yaml
        if model.startswith("dlrm_t"):
            yaml_file = yaml_with_threads(args.model_yaml, int(model[len("dlrm_t"):]), os.path.join(workdir, f"{model}.yaml"))
        repo = args.baseline if model == "base" else REPO
        subprocess.run(
            [os.path.join(repo, "create_dlrm_mar.sh"), "--config", config_file,
             "--export-path", store, "--model-name", model],
            env={**os.environ, "MODEL_YAML": yaml_file}, check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    archiver_tmp = os.path.join(workdir, "archiver_tmp")  # the archiver stages in $TMPDIR
    os.makedirs(archiver_tmp)
    subprocess.run(
        [os.path.join(BIN, "torch-model-archiver"),
         "--model-name", "noop",
         "--version", "1.0",
         "--handler", os.path.join(REPO, "benchmarks", "noop_handler.py"),
         "--config-file", args.model_yaml,
         "--export-path", store,
         "--force"],
        env={**os.environ, "TMPDIR": archiver_tmp}, check=True,
    )  # fmt: skip
    return store


# --- the in-process references ----------------------------------------------------------------


def _forward_loop(config: Dict[str, Any], body: bytes, header_length: Optional[int], threads: int, seconds: float,
                  ready: Any, start: Any, results: Any) -> None:  # fmt: skip
    """One process of ``in_process``: the model as a worker builds it, then ``model(dense,
    kjt)`` of the body's batch in a loop for ``seconds`` once ``start`` is set."""
    import torch  # noqa: PLC0415 - in the child

    import dlrm_table_store  # noqa: PLC0415
    from dlrm_factory import DLRMFactory  # noqa: PLC0415
    from dlrm_lean_forward import optimize_for_inference  # noqa: PLC0415

    cfg = resolve_model_config({**config, "table_store": dlrm_table_store.served_store_dir(None)})
    model = optimize_for_inference(DLRMFactory(cfg))
    torch.set_num_threads(threads)
    _, dense, lengths, values = parse_batch([(bytearray(body), header_length)], cfg)
    kjt = to_key_major_kjt(cfg["id_list_features_keys"], lengths, values)
    with torch.inference_mode():
        for _ in range(20):
            model(dense, kjt)
        ready.release()
        start.wait()
        latencies, ended = [], time.perf_counter() + seconds
        while time.perf_counter() < ended:
            started = time.perf_counter()
            model(dense, kjt)
            latencies.append(time.perf_counter() - started)
    results.put(latencies)


def in_process(config: Dict[str, Any], body: bytes, header_length: Optional[int], num_samples: int,
               processes: int, threads: int, seconds: float) -> Dict[str, Any]:  # fmt: skip
    """The ceiling: ``processes`` fresh processes of ``threads`` torch threads each run the
    body's batch through the model at once; total samples/s and the forwards' p50/p99."""
    context = multiprocessing.get_context("spawn")
    ready, start, results = context.Semaphore(0), context.Event(), context.Queue()
    children = [context.Process(target=_forward_loop, args=(config, body, header_length, threads, seconds, ready, start, results))
                for _ in range(processes)]  # fmt: skip
    for child in children:
        child.start()
    try:
        for _ in children:
            if not ready.acquire(timeout=READY_TIMEOUT_S["full"]):
                raise RuntimeError("an in-process reference did not build its model in time")
        start.set()
        latencies = [results.get(timeout=seconds + 120) for _ in children]
    finally:
        for child in children:
            child.join(timeout=60)
            if child.is_alive():
                child.kill()
    every = sorted(x for run in latencies for x in run)
    return {
        "model": "in-process", "processes": processes, "threads": threads,
        "rps": sum(map(len, latencies)) / seconds, "samples_per_s": sum(map(len, latencies)) * num_samples / seconds,
        "p50_ms": every[len(every) // 2] * 1e3, "p99_ms": every[min(len(every) - 1, int(len(every) * 0.99))] * 1e3,
        "requests": len(every), "batch": float("nan"), "other_cores": float("nan"),
    }  # fmt: skip


def request_path_cost(config: Dict[str, Any], body: bytes, header_length: Optional[int], repeats: int = 200) -> float:
    """Median seconds of the request path for one body, in this process on one thread:
    ``parse_batch`` + ``to_key_major_kjt``, from the bytes TorchServe hands over."""
    import torch  # noqa: PLC0415

    cfg = resolve_model_config(dict(config))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = []
        for i in range(repeats + 20):
            data = bytearray(body)
            started = time.perf_counter()
            _, _, lengths, values = parse_batch([(data, header_length)], cfg)
            to_key_major_kjt(cfg["id_list_features_keys"], lengths, values)
            if i >= 20:
                times.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times)


# --- the server -----------------------------------------------------------------------------


class BenchServer(TorchServe):
    """The benchmark's TorchServe (scripts/torchserve_process.py: free loopback ports, its
    own TMPDIR/TEMP and process group) with what the benchmark reads from it: the CPU its
    processes use and how many times the handler ran."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._log_offsets: Dict[str, int] = {}  # handler_calls' place in each log
        self._metric_lines: set = set()
        self._calls: Counter = Counter()

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by this server's processes (frontend and workers)."""
        total = 0
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == self.process.pid:  # process group
                total += int(fields[11]) + int(fields[12])  # utime + stime
        return total / CLOCK_TICKS

    def handler_calls(self, model: str) -> int:
        """Handler calls so far for ``model``: the worker emits one PredictionTime metric per
        call, and TorchServe's console log (torchserve.out, which this benchmark writes and
        TorchServe never rolls over, unlike ts_log.log at 100 MB) echoes each worker line
        "[METRICS]PredictionTime...", under metrics_mode log or prometheus (log mode adds
        its own rewritten copy, not counted). Distinct lines are counted (each names its
        batch's request ids); the file is read on from where the last call stopped."""
        for name in ("torchserve.out",):
            path = os.path.join(self.log_dir, name)
            try:
                with open(path, errors="replace") as f:
                    f.seek(self._log_offsets.get(path, 0))
                    for line in f:
                        at = line.find("[METRICS]PredictionTime")  # the worker's own line
                        if at >= 0 and line[at:] not in self._metric_lines:
                            self._metric_lines.add(line[at:])
                            found = re.search(r"ModelName:([^,|]+)", line)
                            self._calls[found.group(1) if found else "?"] += 1
                    self._log_offsets[path] = f.tell()
            except FileNotFoundError:
                pass
        return self._calls[model]


# --- load -----------------------------------------------------------------------------------


def scale(server: BenchServer, models: List[str], workers: int) -> None:
    """Every model to exactly ``workers`` READY workers (the management API's scale call),
    then a short pause for the stopped ones to go."""
    for model in models:
        status, body = http_request("PUT", f"{server.management}/models/{model}?min_worker={workers}&max_worker={workers}")
        if status not in (200, 202):
            raise RuntimeError(f"scaling {model} to {workers} workers: HTTP {status} {body[:200]!r}")
    for model in models:
        server.wait_until(f"{workers} READY workers of {model}",
                          lambda m=model: sum(w.get("status") == "READY" for w in server.workers(m)) == workers
                          and len(server.workers(m)) == workers, READY_TIMEOUT_S["full"])  # fmt: skip
    time.sleep(1.0)


def machine_busy_seconds() -> float:
    """CPU seconds all cores have been busy since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / CLOCK_TICKS


def wrk(url: str, connections: int, seconds: float, lua: str, body_file: str, content_type: str,
        header_length: Optional[int]) -> Dict[str, Any]:  # fmt: skip
    """One wrk run: ``connections`` keep-alive connections for ``seconds``; its summary."""
    env = {**os.environ, "BENCH_BODY": body_file, "BENCH_CONTENT_TYPE": content_type,
           "BENCH_HEADER_LENGTH": "" if header_length is None else str(header_length)}  # fmt: skip
    command = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "60s", "-s", lua, url]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=seconds + 120)
    match = re.search(r"^BENCH_JSON (.*)$", done.stdout, re.MULTILINE)
    if done.returncode != 0 or not match:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return json.loads(match.group(1))


def measure(server: BenchServer, model: str, connections: int, args: argparse.Namespace, lua: str,
            body_file: str, fmt: str, header_length: Optional[int]) -> Dict[str, Any]:  # fmt: skip
    """Warm up, then measure ``model`` at ``connections`` with one body: req/s, samples/s,
    latencies, batch, load."""
    url = f"{server.inference}/predictions/{model}"
    if args.warmup > 0:
        wrk(url, connections, args.warmup, lua, body_file, FORMATS[fmt], header_length)
    calls, server_cpu, busy = server.handler_calls(model), server.cpu_seconds(), machine_busy_seconds()
    wrk_cpu = os.times().children_user + os.times().children_system
    r = wrk(url, connections, args.duration, lua, body_file, FORMATS[fmt], header_length)
    seconds = r["duration_us"] / 1e6
    wrk_cpu = os.times().children_user + os.times().children_system - wrk_cpu
    own = server.cpu_seconds() - server_cpu + wrk_cpu
    other = max(0.0, machine_busy_seconds() - busy - own)
    errors = sum(r["errors"].values())
    if errors:
        raise RuntimeError(f"{model} ({fmt}) at {connections} connections: errors {r['errors']} (see {server.log_dir})")
    time.sleep(1.0)  # the last metrics reach the log
    calls = server.handler_calls(model) - calls
    return {
        "model": model,
        "format": fmt,
        "connections": connections,
        "rps": r["requests"] / seconds,
        "p50_ms": r["p50_us"] / 1e3,
        "p99_ms": r["p99_us"] / 1e3,
        "mean_ms": r["mean_us"] / 1e3,
        "requests": r["requests"],
        "batch": r["requests"] / calls if calls else float("nan"),
        "server_cores": (own - wrk_cpu) / seconds,
        "other_cores": other / seconds,
    }


# --- report ---------------------------------------------------------------------------------

CELL = ("model", "format", "samples", "workers", "threads", "connections")


def best_rounds(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per cell (model, format, samples per request, workers, threads, connections) the
    round with the highest req/s, in the order of the runs, with its ratios: samples/s over
    the in-process row of the same samples and threads (processes = workers, or 1 for one
    connection) and req/s over the no-op's row of the same format, samples, workers and
    connections."""
    best: Dict[tuple, Dict[str, Any]] = {}
    for run in runs:
        key = tuple(run[k] for k in CELL)
        if key not in best or run["rps"] > best[key]["rps"]:
            best[key] = dict(run)
    table = list(best.values())
    for row in table:
        processes = row["workers"] if row["connections"] > 1 else 1
        ceiling = best.get(("in-process", "-", row["samples"], processes, row["threads"], row["connections"]))
        floor = next((r for r in table if r["model"] == "noop" and all(r[k] == row[k] for k in ("format", "samples", "workers", "connections"))), None)
        row["vs_in_process"] = row["samples_per_s"] / ceiling["samples_per_s"] if ceiling else float("nan")
        row["p50_over_in_process_ms"] = row["p50_ms"] - ceiling["p50_ms"] if ceiling else float("nan")
        row["vs_noop"] = row["rps"] / floor["rps"] if floor else float("nan")
    return table


def _ratio(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}x"


def markdown(table: List[Dict[str, Any]]) -> str:
    lines = [
        "| handler | format | samples/request | workers x threads | connections | req/s | samples/s | p50 ms | p99 ms "
        "| p50 - in-process p50 | samples/s ÷ in-process | req/s ÷ no-op | batch | other load (cores) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in table:
        reference = r["model"] in ("in-process", "noop")
        over = "-" if reference or math.isnan(r["p50_over_in_process_ms"]) else f"{r['p50_over_in_process_ms']:+.2f} ms"
        lines.append(
            f"| {r['model']} | {r['format']} | {r['samples']} | {r['workers']} x {r['threads']} | {r['connections']} "
            f"| {r['rps']:,.0f} | {r['samples_per_s']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {over} "
            f"| {'1' if r['model'] == 'in-process' else '-' if r['model'] == 'noop' else _ratio(r['vs_in_process'])} "
            f"| {'-' if r['model'] == 'in-process' else '1' if r['model'] == 'noop' else _ratio(r['vs_noop'])} "
            f"| {'-' if math.isnan(r['batch']) else format(r['batch'], '.1f')} "
            f"| {'-' if math.isnan(r['other_cores']) else format(r['other_cores'], '.2f')} |"
        )
    return "\n".join(lines)


def request_cost_markdown(costs: List[Dict[str, Any]]) -> str:
    lines = ["| samples/request | format | body bytes | dlrm_request ms (parse_batch + KJT) |", "| ---: | --- | ---: | ---: |"]
    lines += [f"| {c['samples']} | {c['format']} | {c['bytes']:,} | {c['seconds'] * 1e3:.3f} |" for c in costs]
    return "\n".join(lines)


def plot(table: List[Dict[str, Any]], title: str, path: str) -> None:
    """samples/s at the most connections and p50 at one connection, against samples per
    request: the DLRM handler per format and threads, the no-op, the in-process model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rate, ax_lat) = plt.subplots(1, 2, figsize=(12, 4.6))
    most = max(r["connections"] for r in table)
    styles = {"json": "-", "binary": "--", "-": ":"}
    lines: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in table:
        lines.setdefault((r["model"], r["format"], r["workers"], r["threads"]), []).append(r)
    for (model, fmt, workers, threads), rows in lines.items():
        color = {"in-process": "black", "noop": "tab:gray", "base": "tab:orange"}.get(model, "tab:blue")
        label = f"{model}{'' if fmt == '-' else ', ' + fmt}, {workers}x{threads}"
        for ax, connections, key in ((ax_rate, most, "samples_per_s"), (ax_lat, 1, "p50_ms")):
            points = sorted((r["samples"], r[key]) for r in rows if r["connections"] == connections)
            if points:
                ax.plot(*zip(*points), "o" + styles[fmt], color=color, label=label, alpha=0.9)
    ax_rate.set_title(f"{most} connections (in-process: one process per worker)", fontsize=9)
    ax_lat.set_title("1 connection: a lone request (in-process: one forward)", fontsize=9)
    for ax, ylabel in ((ax_rate, "samples/s"), (ax_lat, "p50 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sorted({r["samples"] for r in table}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("samples per request")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax_lat.legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)


def machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown CPU"
    return f"{os.cpu_count()} cores ({cpu}), {platform.system()}"


# --- main -----------------------------------------------------------------------------------


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples-per-request", type=int, nargs="+", default=[1], help="samples in each request (default 1)")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--workers", type=int, nargs="+", default=[2],
                        help="workers per model, each count measured (scaled with the management API; default 2)")  # fmt: skip
    parser.add_argument("--threads", type=int, nargs="+",
                        help="torch threads per worker, one dlrm_tT model each (default: the YAML's setting)")  # fmt: skip
    parser.add_argument("--baseline", metavar="DIR", help="also serve dlrm as packaged by this checkout (model 'base')")
    parser.add_argument("--no-in-process", action="store_true", help="skip the in-process reference")
    parser.add_argument("--duration", type=float, help="measured seconds per run (default 10)")
    parser.add_argument("--warmup", type=float, help="unmeasured seconds before each run (default 3)")
    parser.add_argument("--rounds", type=int, help="sweeps; each cell shows its best round (default 2)")
    parser.add_argument("--quick", action="store_true", help="defaults --duration 4 --warmup 2 --rounds 1")
    parser.add_argument("--max-rows", type=int, default=100_000, help="cap on each table's rows (default 100,000)")
    parser.add_argument("--full-config", action="store_true", help="serve model_config.json as it is (12 GB, minutes to start)")
    parser.add_argument("--model-yaml", default=os.path.join(REPO, "model-config.yaml"),
                        help="per-model YAML for every model (default: the shipped model-config.yaml)")  # fmt: skip
    parser.add_argument("--no-noop", action="store_true", help="skip the no-op handler")
    parser.add_argument("--ts-property", action="append", default=[], metavar="KEY=VALUE",
                        help="override a line of the shipped config.properties, e.g. metrics_mode=log")  # fmt: skip
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment of TorchServe and its workers, e.g. OMP_NUM_THREADS=1")  # fmt: skip
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "bench_serve.png"))
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, .mar files)")
    args = parser.parse_args(argv)
    defaults = {"duration": 4.0, "warmup": 2.0, "rounds": 1} if args.quick else {"duration": 10.0, "warmup": 3.0, "rounds": 2}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def yaml_threads(model_yaml: str) -> int:
    """The torch threads a worker serves with under ``model_yaml`` (the handler's rule)."""
    import yaml  # noqa: PLC0415

    from dlrm_handler import serving_threads  # noqa: PLC0415 - TorchServe's imports, only here

    with open(model_yaml) as f:
        return serving_threads(yaml.safe_load(f) or {})


def model_threads(models: List[str], args: argparse.Namespace) -> Dict[str, int]:
    """Each model's torch threads per worker (0 for the no-op), read once before the run."""
    own = yaml_threads(args.model_yaml)
    return {m: 0 if m == "noop" else int(m[len("dlrm_t"):]) if m.startswith("dlrm_t") else own for m in models}


def main() -> None:
    args = parse_args()
    if shutil.which("wrk") is None:
        sys.exit(
            "bench_serve.py needs wrk (https://github.com/wg/wrk), the HTTP load generator.\n"
            "Install it: Debian/Ubuntu: sudo apt-get install -y wrk; macOS: brew install wrk."
        )
    extra_env = dict(item.split("=", 1) for item in args.server_env)
    config = served_config(args)
    rows = sum(config["num_embeddings_per_feature"])
    workdir = tempfile.mkdtemp(prefix="bench_serve_")
    lua = os.path.join(workdir, "post.lua")
    with open(lua, "w") as f:
        f.write(WRK_LUA)
    bodies: Dict[Tuple[int, str], Tuple[str, bytes, Optional[int]]] = {}
    for samples in args.samples_per_request:
        for fmt, (body, header_length) in request_bodies(config, samples).items():
            path = os.path.join(workdir, f"body_{samples}.{fmt}")
            with open(path, "wb") as f:
                f.write(body)
            bodies[samples, fmt] = (path, body, header_length)
    costs = [{"samples": samples, "format": fmt, "bytes": len(body), "seconds": request_path_cost(config, body, header_length)}
             for (samples, fmt), (_, body, header_length) in bodies.items() if fmt in args.formats]  # fmt: skip
    print(request_cost_markdown(costs), flush=True)

    models = (["noop"] if not args.no_noop else []) + dlrm_models(args)
    threads_of = model_threads(models, args)
    print(f"== packaging {', '.join(models)} ({len(config['num_embeddings_per_feature'])} tables, {rows:,} rows) "
          f"with {os.path.relpath(args.model_yaml)}", flush=True)  # fmt: skip
    store = build_mars(workdir, config, args)
    properties = read_properties(os.path.join(REPO, "config.properties"), resolve_paths=True)
    properties.update(item.split("=", 1) for item in args.ts_property)
    server = BenchServer(workdir, store, properties=properties, env=extra_env)
    runs: List[Dict[str, Any]] = []
    start = time.monotonic()
    try:
        server.wait_for_ping()
        for model in models:
            server.register(model)
        for model in models:
            server.wait_for_model(model, READY_TIMEOUT_S["full" if args.full_config else "capped"])
            described = server.describe(model)
            status, answer = http_request("POST", f"{server.inference}/predictions/{model}", bodies[args.samples_per_request[0], "json"][1])
            if status != 200:
                raise RuntimeError(f"{model} answered {status}: {answer.decode(errors='replace')}")
            print(f"== {model}: ready after {time.monotonic() - start:.0f} s, batchSize "
                  f"{described.get('batchSize')}, maxBatchDelay {described.get('maxBatchDelay')} ms; "
                  f"answer {answer.decode(errors='replace')[:80]!r}", flush=True)  # fmt: skip
        for round_ in range(args.rounds):
            for workers in args.workers:
                scale(server, models, workers)
                for samples in args.samples_per_request:
                    cell = {"samples": samples, "workers": workers, "round": round_}
                    for threads in [] if args.no_in_process else sorted({threads_of[m] for m in models if m != "noop"}):
                        for processes in sorted({workers if c > 1 else 1 for c in args.connections}):
                            r = in_process(config, bodies[samples, "json"][1], None, samples, processes, threads, args.duration)
                            for connections in (c for c in args.connections if (workers if c > 1 else 1) == processes):
                                runs.append({**r, **cell, "format": "-", "workers": processes, "threads": threads, "connections": connections})
                            print(f"  round {round_ + 1}/{args.rounds}  in-process {processes}x{threads} {samples:4d} samples: "
                                  f"{r['samples_per_s']:9,.0f} samples/s  p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms", flush=True)  # fmt: skip
                    for fmt in args.formats:
                        path, _, header_length = bodies[samples, fmt]
                        for connections in args.connections:
                            for model in (m for m in models if not (m == "base" and fmt == "binary")):  # before binary
                                r = measure(server, model, connections, args, lua, path, fmt, header_length)
                                r.update(cell, threads=threads_of[model],
                                         samples_per_s=r["rps"] * samples)  # fmt: skip
                                runs.append(r)
                                print(f"  round {round_ + 1}/{args.rounds}  {model:8s} {fmt:6s} x{workers} {samples:4d} samples "
                                      f"{connections:3d} conn: {r['rps']:7,.0f} req/s {r['samples_per_s']:9,.0f} samples/s  "
                                      f"p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms  batch {r['batch']:4.1f}  "
                                      f"server {r['server_cores']:.2f} cores  other {r['other_cores']:.2f} cores", flush=True)  # fmt: skip
    except (RuntimeError, KeyboardInterrupt) as error:
        sys.exit(f"{error}\n{server.log_tail()}")
    finally:
        server.stop()
        if args.keep:
            print(f"work dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    table = best_rounds(runs)
    what = "full model_config.json" if args.full_config else f"default architecture, tables capped at {args.max_rows:,} rows"
    title = (f"TorchServe 0.12, {os.path.relpath(args.model_yaml, REPO)} (batchSize {described.get('batchSize')}, "
             f"maxBatchDelay {described.get('maxBatchDelay')} ms); dlrm: {what}\n"
             f"wrk, {args.duration:g} s per run, best of {args.rounds} round(s); {machine()}")  # fmt: skip
    print()
    print(title)
    print()
    print(markdown(table))
    print()
    print(request_cost_markdown(costs))
    measured = [r["other_cores"] for r in runs if not math.isnan(r["other_cores"])]
    if measured:
        print(f"\nother load: mean {statistics.mean(measured):.2f} cores busy outside this benchmark during the "
              f"runs (max {max(measured):.2f})")  # fmt: skip
    plot(table, title, args.out)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"title": title, "args": vars(args), "runs": runs, "table": table, "request_cost": costs}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
