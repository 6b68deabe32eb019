"""Updating the full default model under load: scripts/update_model.py replaces dlrm 1.0
(model_config.json, seed 0) by 2.0 (the same sizes, seed 1) while 8 connections send
random one-sample requests to /predictions/dlrm.

    .venv/bin/python benchmarks/bench_update.py   # ~7 min

Three swaps, each on a TorchServe of its own (the repo's config.properties and
model-config.yaml: 2 workers a version), 1.0's entry in the table store (``--store``,
default serving's ~/.cache/dlrm/table_store; built first if missing, not timed):
1. **entry built during the swap**: 2.0's entry is not in the store: its first worker builds
   it (12 GB) while 1.0 serves, the second waits on its lock and maps it.
2. **entry prebuilt, in the page cache**: the entry swap 1 built, its pages as that left them
   (an entry just built with ``create_dlrm_mar.sh --table-store``).
3. **entry prebuilt, cold**: the same, its pages dropped from the page cache first
   (``posix_fadvise(DONTNEED)``: a prebuilt entry on a volume, never read yet).
(In this order 2.0's entry is built once.) Each swap: ``--warmup`` s of load, ``--steady``
s of load measured as the steady state, then the command, then ``--after`` s.

Printed per swap: seconds from the command to ``/predictions/dlrm`` serving 2.0 (``GET
/models/dlrm`` polled every 0.1 s), the command's total, latency p50 / p99 / max of the
requests sent during the command against the steady state, the non-200 answers over the
whole run, p99 while 2.0 loads (command to default) and in the first 5 s after the switch,
and memory sampled every second (``/proc/meminfo``; the workers'
``smaps_rollup``): the peak of memory in use (MemTotal - MemAvailable), of the page cache,
and of the workers' private (anonymous) memory summed. A table, ``benchmarks/plots/
bench_update.png`` (latency over time around each swap), ``benchmarks/results/
bench_update.json``. 2.0's entry is deleted at the end (the store is shared; 12 GB).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional, Set

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(REPO, "tests"), os.path.join(REPO, "scripts"), REPO]

from bench_store_serving import Load, memory_of, package, server  # noqa: E402
from dlrm_table_store import default_store_dir  # noqa: E402
from torchserve_process import TorchServe, http_request  # noqa: E402
from update_model import smoke_request  # noqa: E402

GiB = 2**30
READY_TIMEOUT_S = 900
UPDATE_TIMEOUT_S = 900


# --- what is measured while the load runs -------------------------------------------------------


class Sampler:
    """Every ``every`` s until stopped: memory (/proc/meminfo, the server's workers) and the
    version ``/predictions/dlrm`` serves."""

    def __init__(self, ts: TorchServe, every: float = 1.0) -> None:
        self.ts = ts
        self.samples: List[Dict[str, Any]] = []
        self.switched: Optional[float] = None  # when GET /models/dlrm first said 2.0
        self.stopped = threading.Event()
        self.threads = [threading.Thread(target=self.memory, args=(every,), daemon=True),
                        threading.Thread(target=self.default, daemon=True)]  # fmt: skip
        for thread in self.threads:
            thread.start()

    def memory(self, every: float) -> None:
        while not self.stopped.wait(every):
            info = meminfo()
            workers = []
            for pid in worker_pids(self.ts):
                try:
                    workers.append(memory_of(pid))
                except OSError:  # exited meanwhile (1.0's workers, unregistered)
                    pass
            self.samples.append({"t": time.monotonic(), "used": (info["MemTotal"] - info["MemAvailable"]) / GiB,
                                 "cache": info["Cached"] / GiB, "anon": sum(w.get("Anonymous", 0) for w in workers),
                                 "pss": sum(w.get("Pss", 0) for w in workers), "workers": len(workers)})  # fmt: skip

    def default(self) -> None:
        while not self.stopped.wait(0.1):
            status, body = http_request("GET", f"{self.ts.management}/models/dlrm", timeout=10)
            if self.switched is None and status == 200 and json.loads(body)[0]["modelVersion"] == "2.0":
                self.switched = time.monotonic()

    def stop(self) -> None:
        self.stopped.set()
        for thread in self.threads:
            thread.join(timeout=30)


def meminfo() -> Dict[str, int]:
    with open("/proc/meminfo") as f:
        return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}


def worker_pids(ts: TorchServe) -> List[int]:
    """The server's Python workers (its process group), whatever their version or state."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.getpgid(int(entry)) == ts.process.pid:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if b"model_service_worker" in f.read():
                        pids.append(int(entry))
        except (OSError, ProcessLookupError):
            pass
    return pids


def latency_ms(answers: List[Any], start: float, end: float) -> Dict[str, float]:
    """p50 / p99 / max (ms) and count of the 200s among requests sent in [start, end)."""
    times = sorted(1000 * (back - sent) for sent, back, status in answers if start <= sent < end and status == 200)
    if not times:
        return {"n": 0, "p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    return {"n": len(times), "p50": statistics.median(times), "p99": times[int(0.99 * (len(times) - 1))], "max": times[-1]}


def probe_score(ts: TorchServe, config: Dict[str, Any]) -> float:
    """The score /predictions/dlrm gives update_model.py's smoke request for ``config`` (for
    the default config: sample_data.json's shape, the tables' last rows)."""
    status, body = http_request("POST", f"{ts.inference}/predictions/dlrm", json.dumps(smoke_request(config)).encode(), timeout=120)
    if status != 200:
        raise SystemExit(f"probe answered {status}: {body[:300]!r}")
    return json.loads(body)["score"]


def drop_from_page_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# --- one swap -----------------------------------------------------------------------------------


def swap(args: argparse.Namespace, label: str, workdir: str, v1_mar: str, v2_mar: str, config: Dict[str, Any]) -> Dict[str, Any]:
    """A fresh server serving 1.0 (``v1_mar`` in a model store of its own: TorchServe copies
    2.0's .mar there), load, then update_model.py to 2.0; the figures."""
    print(f"== {label}: starting TorchServe with dlrm 1.0", flush=True)
    model_store = os.path.join(workdir, "model_store")
    os.makedirs(model_store)
    shutil.copyfile(v1_mar, os.path.join(model_store, "dlrm.mar"))
    ts = server(workdir, model_store, args.store)
    try:
        ts.wait_for_model("dlrm", READY_TIMEOUT_S)
        before = probe_score(ts, config)
        load = Load(f"{ts.inference}/predictions/dlrm", config["num_embeddings_per_feature"], args.connections)
        time.sleep(args.warmup)
        sampler = Sampler(ts)
        time.sleep(args.steady)
        print(f"   steady state measured; running update_model.py --mar {v2_mar}", flush=True)
        started = time.monotonic()
        run = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "update_model.py"), "--management",
                              ts.management, "--inference", ts.inference, "--mar", v2_mar,
                              "--timeout", str(UPDATE_TIMEOUT_S)], capture_output=True, text=True)  # fmt: skip
        ended = time.monotonic()
        time.sleep(args.after)
        load.stop()
        sampler.stop()
        after = probe_score(ts, config)
    finally:
        ts.stop()
    print(run.stdout + run.stderr, flush=True)
    if run.returncode != 0:
        raise SystemExit(f"update_model.py exited {run.returncode}")
    answers = load.answers()
    steady = latency_ms(answers, started - args.steady, started)
    during = latency_ms(answers, started, ended)
    window = [s for s in sampler.samples if started - 1 <= s["t"] <= ended + 1]
    switched = sampler.switched or float("nan")
    return {
        "label": label, "to_default_s": switched - started, "command_s": ended - started,
        "steady": steady, "swap": during, "p99_ratio": during["p99"] / steady["p99"],
        "loading": latency_ms(answers, started, switched), "after_switch": latency_ms(answers, switched, switched + 5),
        "non_200": sum(1 for _, _, status in answers if status != 200), "requests": len(answers),
        "peak_used_gib": max(s["used"] for s in window), "peak_cache_gib": max(s["cache"] for s in window),
        "peak_anon_gib": max(s["anon"] for s in window), "peak_pss_gib": max(s["pss"] for s in window),
        "score_before": before, "score_after": after, "command_output": run.stdout,
        "timeline": [(sent - started, back - sent, status) for sent, back, status in answers],
        "memory": [{**s, "t": s["t"] - started} for s in sampler.samples],
    }  # fmt: skip


# --- the run --------------------------------------------------------------------------------------


def entries(store: str) -> Set[str]:
    return {name for name in os.listdir(store) if name.endswith(".safetensors")} if os.path.isdir(store) else set()


def plot(results: List[Dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False, sharey=True)
    for ax, r in zip(axes[0], results):
        ok = [(t, 1000 * dt) for t, dt, status in r["timeline"] if status == 200]
        ax.plot([t for t, _ in ok], [ms for _, ms in ok], ".", markersize=1.5, alpha=0.4, color="tab:blue", label="request latency")
        ax.axvline(0, color="k", alpha=0.4, label="update_model.py started")
        ax.axvline(r["to_default_s"], color="tab:green", label=f"2.0 default at {r['to_default_s']:.1f} s")
        ax.axvline(r["command_s"], color="tab:red", alpha=0.6, label=f"command done at {r['command_s']:.1f} s")
        ax.axhline(r["steady"]["p99"], color="tab:gray", linestyle=":", label=f"steady p99 {r['steady']['p99']:.1f} ms")
        ax.set_yscale("log")
        ax.set_xlabel("seconds since update_model.py started")
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"{r['label']}:\np99 {r['swap']['p99']:.1f} ms during the swap, {r['non_200']} non-200", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("Full default DLRM, 1.0 -> 2.0 under 8 connections (2 cores)", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.path.join(REPO, "model_config.json"), help="1.0's config; 2.0 = its seed + 1")
    parser.add_argument("--store", default=default_store_dir(), help="table store (default: serving's)")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--warmup", type=float, default=15.0, help="seconds of load before the steady window")
    parser.add_argument("--steady", type=float, default=20.0, help="seconds of steady state measured")
    parser.add_argument("--after", type=float, default=10.0, help="seconds of load after the command")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    with open(args.config) as f:
        v1 = json.load(f)
    v2 = {**v1, "seed": v1.get("seed", 0) + 1}
    results: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_update.") as workdir:
        for name, config in (("v1", v1), ("v2", v2)):
            with open(os.path.join(workdir, f"{name}.json"), "w") as f:
                json.dump(config, f)
        print(f"== 1.0: packaging {args.config} (its entry built in {args.store} if missing)", flush=True)
        model_store, _ = package(os.path.join(workdir, "v1.json"), args.store, workdir)
        v1_mar = os.path.join(model_store, "dlrm.mar")
        out = os.path.join(workdir, "out")  # 2.0's .mar, outside the model store
        subprocess.run([os.path.join(REPO, "create_dlrm_mar.sh"), "--config", os.path.join(workdir, "v2.json"),
                        "--version", "2.0", "--export-path", out], check=True, capture_output=True)  # fmt: skip
        v2_mar = os.path.join(out, "dlrm.mar")
        existing = entries(args.store)
        built: Set[str] = set()
        try:
            results.append(swap(args, "entry built during the swap", os.path.join(workdir, "built"), v1_mar, v2_mar, v1))
            built = entries(args.store) - existing
            print(f"   2.0's entry built: {sorted(built)}", flush=True)
            results.append(swap(args, "entry prebuilt, in the page cache", os.path.join(workdir, "warm"), v1_mar, v2_mar, v1))
            for name in built:
                drop_from_page_cache(os.path.join(args.store, name))
            results.append(swap(args, "entry prebuilt, cold", os.path.join(workdir, "cold"), v1_mar, v2_mar, v1))
        finally:  # 2.0's entry and its lock file (the store is shared: 12 GB)
            for name in built or entries(args.store) - existing:
                for path in (os.path.join(args.store, name), os.path.join(args.store, f".{name}.lock")):
                    if os.path.exists(path):
                        os.remove(path)
                        print(f"   deleted {path}", flush=True)

    print("\n| swap | to 2.0 default | command | non-200 / requests | p50 / p99 / max steady (ms) | "
          "p50 / p99 / max during the swap (ms) | p99 ratio (goal ≤ 3×) | peak in use | peak page cache | "
          "peak workers' anonymous |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        s, w = r["steady"], r["swap"]
        print(f"| {r['label']} | {r['to_default_s']:.1f} s | {r['command_s']:.1f} s | {r['non_200']} / {r['requests']:,} | "
              f"{s['p50']:.1f} / {s['p99']:.1f} / {s['max']:.0f} | {w['p50']:.1f} / {w['p99']:.1f} / {w['max']:.0f} | "
              f"{r['p99_ratio']:.2f}× | {r['peak_used_gib']:.1f} GiB | {r['peak_cache_gib']:.1f} GiB | "
              f"{r['peak_anon_gib']:.2f} GiB |")  # fmt: skip
    print("\n| swap | p99 steady (ms) | p99 while 2.0 loads (ms) | p99 in the 5 s after the switch (ms) |")
    print("| --- | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['label']} | {r['steady']['p99']:.1f} | {r['loading']['p99']:.1f} | {r['after_switch']['p99']:.1f} |")
    for r in results:
        print(f"{r['label']}: the probe scored {r['score_before']!r} by 1.0, {r['score_after']!r} by 2.0")
    plot(results, os.path.join(REPO, "benchmarks", "plots", "bench_update.png"))
    os.makedirs(os.path.join(REPO, "benchmarks", "results"), exist_ok=True)
    with open(os.path.join(REPO, "benchmarks", "results", "bench_update.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
