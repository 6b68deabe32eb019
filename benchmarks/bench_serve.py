"""Serving benchmark: requests/s and p50/p99 latency of the DLRM handler through a real
TorchServe, next to a do-nothing handler (``noop_handler.py``) served the same way.

    apt-get install -y wrk            # the load generator (macOS: brew install wrk)
    .venv/bin/python benchmarks/bench_serve.py          # ~4 minutes on 2 cores
    .venv/bin/python benchmarks/bench_serve.py --quick  # ~1 minute: short runs, one round

What runs: ONE TorchServe with the repo's config.properties (its addresses moved to free
loopback ports, gRPC's too; ``--ts-property KEY=VALUE`` to change a line), its own
TMPDIR/TEMP, stopped by its process group, and two models registered on it from the same
per-model YAML (the repo's ``model-config.yaml``, the one ``create_dlrm_mar.sh`` packages;
``--model-yaml`` to try another):

    dlrm  create_dlrm_mar.sh of the default architecture (D = 64, dense MLP 512-256-64,
          over MLP 512-512-256-1, 26 tables) with every table capped at ``--max-rows``
          rows (default 100,000: 917,618 rows, ~66 MB of int8 tables, so the worker starts
          in seconds); ``--full-config`` serves model_config.json (Criteo 1TB, ~12 GB, minutes)
    noop  benchmarks/noop_handler.py: a constant answer per request

Each request is one sample: sample_data.json with its ids taken modulo the served table
sizes (so every id is valid: every answer must be a 200), sent as ``application/json``
(``--content-type`` to compare others). For each connection count (1, 8, 32) the two
models are measured back to back (noop, then dlrm), each ``--warmup`` s unmeasured and
then ``--duration`` s measured; ``--rounds`` repeats the whole sweep and the table shows
each cell's best round (highest req/s, with that round's latencies): other work on a shared
machine only ever slows a run down. The ratio column is the row's req/s and p99 over the
no-op row's at the same connections. "batch" is requests per handler call (TorchServe's dynamic batching at work), from
the PredictionTime metric the worker emits per call, as TorchServe logs it. "other load" is
the CPU the rest of the machine used meanwhile (cores busy outside this TorchServe and wrk),
from /proc; "server" in the progress lines is this TorchServe's own CPU (frontend and
workers).

Why wrk: a closed loop of exactly N keep-alive connections (each sends its next request when
the previous answer arrives: bounded concurrency, no queue build-up in the client), written
in C with one event-loop thread, so on a 2-core machine it takes a few percent of a core at
thousands of requests/s. A Python client would need most of a core for that rate and take it
from the server it measures. A Lua script (``WRK_LUA``) sets the POST body and prints the
latency percentiles as JSON. Without wrk the benchmark stops and says how to
install it.

Output: a markdown table on stdout; ``--out`` (default benchmarks/results/bench_serve.png)
gets the plot, and a .json of every round next to it.
"""

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Any, Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(REPO, "scripts"), REPO]

from dlrm_factory import create_default_model_config, read_config_source, resolve_model_config  # noqa: E402
from torchserve_process import TorchServe, http_request, read_properties  # noqa: E402

BIN = os.path.dirname(sys.executable)
MODELS = ("noop", "dlrm")
READY_TIMEOUT_S = {"full": 900, "capped": 180}  # the full config builds 12 GB of tables
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

WRK_LUA = r"""
-- POST the body in $BENCH_BODY as $BENCH_CONTENT_TYPE; print the summary as one JSON line.
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("BENCH_CONTENT_TYPE")

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


def build_mars(workdir: str, config: Dict[str, Any], model_yaml: str) -> str:
    """dlrm.mar (create_dlrm_mar.sh) and noop.mar (noop_handler.py), both with ``model_yaml``
    as their per-model YAML; returns the model store."""
    store = os.path.join(workdir, "model_store")
    config_file = os.path.join(workdir, "served_config.json")
    with open(config_file, "w") as f:
        json.dump(config, f, indent=2)
    env = {**os.environ, "MODEL_YAML": model_yaml}
    subprocess.run(
        [os.path.join(REPO, "create_dlrm_mar.sh"), "--config", config_file,
         "--export-path", store, "--model-name", "dlrm"],
        env=env, check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    archiver_tmp = os.path.join(workdir, "archiver_tmp")  # the archiver stages in $TMPDIR
    os.makedirs(archiver_tmp)
    subprocess.run(
        [os.path.join(BIN, "torch-model-archiver"),
         "--model-name", "noop",
         "--version", "1.0",
         "--handler", os.path.join(REPO, "benchmarks", "noop_handler.py"),
         "--config-file", model_yaml,
         "--export-path", store,
         "--force"],
        env={**os.environ, "TMPDIR": archiver_tmp}, check=True,
    )  # fmt: skip
    return store


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


def wrk(url: str, connections: int, seconds: float, lua: str, body_file: str, content_type: str) -> Dict[str, Any]:
    """One wrk run: ``connections`` keep-alive connections for ``seconds``; its summary."""
    env = {**os.environ, "BENCH_BODY": body_file, "BENCH_CONTENT_TYPE": content_type}
    command = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "60s", "-s", lua, url]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=seconds + 120)
    match = re.search(r"^BENCH_JSON (.*)$", done.stdout, re.MULTILINE)
    if done.returncode != 0 or not match:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return json.loads(match.group(1))


def measure(server: BenchServer, model: str, workers: int, connections: int, args: argparse.Namespace,
            lua: str, body_file: str) -> Dict[str, Any]:  # fmt: skip
    """Warm up, then measure ``model`` (``workers`` workers) at ``connections``: req/s,
    latencies, batch, load."""
    url = f"{server.inference}/predictions/{model}"
    if args.warmup > 0:
        wrk(url, connections, args.warmup, lua, body_file, args.content_type)
    calls, server_cpu, busy = server.handler_calls(model), server.cpu_seconds(), machine_busy_seconds()
    wrk_cpu = os.times().children_user + os.times().children_system
    r = wrk(url, connections, args.duration, lua, body_file, args.content_type)
    seconds = r["duration_us"] / 1e6
    wrk_cpu = os.times().children_user + os.times().children_system - wrk_cpu
    own = server.cpu_seconds() - server_cpu + wrk_cpu
    other = max(0.0, machine_busy_seconds() - busy - own)
    errors = sum(r["errors"].values())
    if errors:
        raise RuntimeError(f"{model} at {connections} connections: errors {r['errors']} (see {server.log_dir})")
    time.sleep(1.0)  # the last metrics reach model_metrics.log
    calls = server.handler_calls(model) - calls
    return {
        "model": model,
        "workers": workers,
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


def best_rounds(runs: List[Dict[str, Any]], workers: List[int], connections: List[int], models: List[str]) -> List[Dict[str, Any]]:
    """Per (model, workers, connections) the round with the highest req/s, and its req/s and
    p99 over the no-op's row (its best round) at the same workers and connections: the
    ratios of the table."""
    table = []
    for count in workers:
        for conns in connections:
            best = {}
            for model in models:
                cell = [r for r in runs if r["model"] == model and r["workers"] == count and r["connections"] == conns]
                best[model] = dict(max(cell, key=lambda r: r["rps"]))
            noop = best.get("noop")
            for model in models:
                row = best[model]
                row["ratio"] = row["rps"] / noop["rps"] if noop else float("nan")
                row["p99_ratio"] = row["p99_ms"] / noop["p99_ms"] if noop else float("nan")
                table.append(row)
    return table


def markdown(table: List[Dict[str, Any]]) -> str:
    lines = [
        "| handler | workers | connections | req/s | p50 ms | p99 ms | ratio to no-op (req/s, p99) | batch | other load (cores) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in table:
        ratio = "1" if r["model"] == "noop" else f"{r['ratio']:.2f}x, {r['p99_ratio']:.2f}x"
        lines.append(
            f"| {r['model']} | {r['workers']} | {r['connections']} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
            f"| {ratio} | {'-' if math.isnan(r['batch']) else format(r['batch'], '.1f')} | {r['other_cores']:.2f} |"
        )
    return "\n".join(lines)


def plot(table: List[Dict[str, Any]], title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rps, ax_lat) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"noop": "tab:gray", "dlrm": "tab:blue"}
    styles = {1: "-", 2: "--", 4: ":"}
    for model in sorted({r["model"] for r in table}, key=MODELS.index):
        for count in sorted({r["workers"] for r in table}):
            rows = [r for r in table if r["model"] == model and r["workers"] == count]
            conns = [r["connections"] for r in rows]
            label = f"{model}, {count} worker{'s' if count > 1 else ''}"
            style = styles.get(count, "-.")
            ax_rps.plot(conns, [r["rps"] for r in rows], "o" + style, color=colors[model], label=label)
            ax_lat.plot(conns, [r["p99_ms"] for r in rows], "s" + style, color=colors[model], label=f"{label} p99")
    for ax, ylabel in ((ax_rps, "requests/s"), (ax_lat, "latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["connections"] for r in table}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("connections")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    ax_lat.set_yscale("log")
    ax_lat.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1, 2, 5)))
    ax_lat.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax_lat.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fig.suptitle(title, fontsize=9)
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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="workers per model, each count measured (scaled with the management API)")  # fmt: skip
    parser.add_argument("--duration", type=float, help="measured seconds per run (default 10)")
    parser.add_argument("--warmup", type=float, help="unmeasured seconds before each run (default 3)")
    parser.add_argument("--rounds", type=int, help="sweeps; each cell shows its best round (default 2)")
    parser.add_argument("--quick", action="store_true", help="defaults --duration 4 --warmup 2 --rounds 1")
    parser.add_argument("--max-rows", type=int, default=100_000, help="cap on each table's rows (default 100,000)")
    parser.add_argument("--full-config", action="store_true", help="serve model_config.json as it is (12 GB, minutes to start)")
    parser.add_argument("--model-yaml", default=os.path.join(REPO, "model-config.yaml"),
                        help="per-model YAML for both models (default: the shipped model-config.yaml)")  # fmt: skip
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--content-type", default="application/json")
    parser.add_argument("--ts-property", action="append", default=[], metavar="KEY=VALUE",
                        help="override a line of the shipped config.properties, e.g. metrics_mode=log")  # fmt: skip
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment of TorchServe and its workers, e.g. OMP_NUM_THREADS=1")  # fmt: skip
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "bench_serve.png"))
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, .mar files)")
    args = parser.parse_args()
    defaults = {"duration": 4.0, "warmup": 2.0, "rounds": 1} if args.quick else {"duration": 10.0, "warmup": 3.0, "rounds": 2}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.models = [m for m in MODELS if m in args.models]
    return args


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
    body_file, lua = os.path.join(workdir, "body.json"), os.path.join(workdir, "post.lua")
    body = request_body(config)
    with open(body_file, "wb") as f:
        f.write(body)
    with open(lua, "w") as f:
        f.write(WRK_LUA)

    print(f"== packaging dlrm ({len(config['num_embeddings_per_feature'])} tables, {rows:,} rows) "
          f"and noop with {os.path.relpath(args.model_yaml)}", flush=True)  # fmt: skip
    store = build_mars(workdir, config, args.model_yaml)
    properties = read_properties(os.path.join(REPO, "config.properties"), resolve_paths=True)
    properties.update(item.split("=", 1) for item in args.ts_property)
    server = BenchServer(workdir, store, properties=properties, env=extra_env)
    runs: List[Dict[str, Any]] = []
    start = time.monotonic()
    try:
        server.wait_for_ping()
        for model in args.models:
            server.register(model)
        for model in args.models:
            server.wait_for_model(model, READY_TIMEOUT_S["full" if args.full_config else "capped"])
            described = server.describe(model)
            status, answer = http_request("POST", f"{server.inference}/predictions/{model}", body, args.content_type)
            if status != 200:
                raise RuntimeError(f"{model} answered {status}: {answer.decode(errors='replace')}")
            print(f"== {model}: ready after {time.monotonic() - start:.0f} s, batchSize "
                  f"{described.get('batchSize')}, maxBatchDelay {described.get('maxBatchDelay')} ms; "
                  f"answer {answer.decode(errors='replace')[:80]!r}", flush=True)  # fmt: skip
        for round_ in range(args.rounds):
            for workers in args.workers:
                scale(server, args.models, workers)
                for connections in args.connections:
                    for model in args.models:
                        r = measure(server, model, workers, connections, args, lua, body_file)
                        r["round"] = round_
                        runs.append(r)
                        print(f"  round {round_ + 1}/{args.rounds}  {model:4s} x{workers} {connections:3d} conn: "
                              f"{r['rps']:7,.0f} req/s  p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms  "
                              f"batch {r['batch']:4.1f}  server {r['server_cores']:.2f} cores  "
                              f"other {r['other_cores']:.2f} cores", flush=True)  # fmt: skip
    except (RuntimeError, KeyboardInterrupt) as error:
        sys.exit(f"{error}\n{server.log_tail()}")
    finally:
        server.stop()
        if args.keep:
            print(f"work dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    table = best_rounds(runs, args.workers, args.connections, args.models)
    what = "full model_config.json" if args.full_config else f"default architecture, tables capped at {args.max_rows:,} rows"
    yaml_name = os.path.relpath(args.model_yaml, REPO)
    title = (f"TorchServe 0.12, {'/'.join(map(str, args.workers))} worker(s) per model, {yaml_name} (batchSize {described.get('batchSize')}, "
             f"maxBatchDelay {described.get('maxBatchDelay')} ms); dlrm: {what}\n"
             f"one-sample {args.content_type} requests, wrk, {args.duration:g} s per run, best of "
             f"{args.rounds} round(s); {machine()}")  # fmt: skip
    print()
    print(title)
    print()
    print(markdown(table))
    print(f"\nother load: mean {statistics.mean(r['other_cores'] for r in runs):.2f} cores busy outside "
          f"this benchmark during the runs (max {max(r['other_cores'] for r in runs):.2f})")  # fmt: skip
    plot(table, title, args.out)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"title": title, "args": vars(args), "runs": runs, "table": table}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
