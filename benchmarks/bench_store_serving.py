"""Table store benchmark, part 2: serving the full default through a real TorchServe with
its table store entry already built. Start, restart after ``kill -9``, and memory of 1, 2
and 4 workers of one model.

    .venv/bin/python benchmarks/bench_store_serving.py               # ~5 min, full default
    .venv/bin/python benchmarks/bench_store_serving.py --workers 1,2 --no-compare

What runs (one TorchServe at a time, private ports, its own temp dir; the repo's
config.properties and model-config.yaml):
1. ``create_dlrm_mar.sh --table-store STORE`` packages ``--config`` and builds its entry in
   STORE if it is not there (what the first worker would do).
2. **Start**: TorchServe started with ``--models dlrm=dlrm.mar`` and DLRM_TABLE_STORE=STORE;
   seconds from starting it to the model's READY worker and to the first answer of
   sample_data.json (as ``make demo`` counts). ``--compare`` (default on) does the same with
   the store off (DLRM_TABLE_STORE=off: the worker builds 12 GB of tables in its memory).
3. **Memory** of each worker (``/proc/<pid>/smaps_rollup``: Rss, Pss, Anonymous) after
   ``--load-seconds`` of requests with uniform random ids (touching table pages all over),
   for each count of ``--workers`` (scaled with the management API). The rule of the issue:
   the workers' PSS summed <= 1.15 x table bytes + N GiB.
4. **Restart**: under load (``--connections`` clients sending random one-sample requests),
   ``kill -9`` of one worker; seconds until the new worker is READY and until the first
   request sent after the kill is answered 200, what the requests in flight got, and a probe request's score
   before and after (bit-identical expected).
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(REPO, "tests"), os.path.join(REPO, "scripts"), REPO]

from dlrm_table_store import default_store_dir  # noqa: E402
from load import Outcome, send  # noqa: E402
from torchserve_process import TorchServe, http_request, read_properties  # noqa: E402

GiB = 2**30
READY_TIMEOUT_S = 900


def package(config_path: str, store: str, workdir: str) -> Tuple[str, str]:
    """(model store with dlrm.mar, the entry's path): the .mar, its entry built in ``store``."""
    model_store = os.path.join(workdir, "model_store")
    run = subprocess.run([os.path.join(REPO, "create_dlrm_mar.sh"), "--config", config_path, "--export-path", model_store,
                          "--table-store", store], capture_output=True, text=True, check=True)  # fmt: skip
    line = next(line for line in run.stdout.splitlines() if line.startswith("table store: "))
    return model_store, line.split()[2]


def server(workdir: str, model_store: str, store: str) -> TorchServe:
    properties = read_properties(os.path.join(REPO, "config.properties"), resolve_paths=True)
    properties["metrics_mode"] = "log"  # no prometheus scraping needed here
    return TorchServe(workdir, model_store, properties=properties, env={"DLRM_TABLE_STORE": store}, models=["dlrm=dlrm.mar"])


def random_request(rng: random.Random, sizes: List[int]) -> bytes:
    return json.dumps({
        "float_features": [rng.random() for _ in range(13)],
        "id_list_features.lengths": [1] * len(sizes),
        "id_list_features.values": [rng.randrange(size) for size in sizes],
    }).encode()  # fmt: skip


class Load:
    """``connections`` clients sending random one-sample requests until stopped, through
    the tests' load sender (``tests/load.py``'s ``send``, as soak.py uses it); ``outcomes``
    fills as answers come back."""

    def __init__(self, url: str, sizes: List[int], connections: int) -> None:
        rng = random.Random(0)
        bodies = [random_request(rng, sizes) for _ in range(2000)]
        self.outcomes: List[Outcome] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=send, args=(url, bodies, connections, 120, self.stopped, self.outcomes), daemon=True)
        self.thread.start()

    def answers(self) -> List[Tuple[float, float, Optional[int]]]:
        """(when it was sent, when it came back, HTTP status) of every request so far."""
        return [(o.started, o.ended, o.status) for o in list(self.outcomes)]

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=130)


def memory_of(pid: int) -> Dict[str, float]:
    """Rss, Pss, Anonymous of a process in GiB (smaps_rollup)."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("Rss", "Pss", "Anonymous"):
                fields[name] = int(rest.split()[0]) * 1024 / GiB
    return fields


def ready_pids(ts: TorchServe) -> List[int]:
    return sorted(int(w["pid"]) for w in ts.workers("dlrm") if w.get("status") == "READY")


def wait_workers(ts: TorchServe, count: int, exclude: Tuple[int, ...] = ()) -> List[int]:
    ts.wait_until(f"{count} READY workers", lambda: len([p for p in ready_pids(ts) if p not in exclude]) == count,
                  READY_TIMEOUT_S)  # fmt: skip
    return ready_pids(ts)


def probe_score(ts: TorchServe) -> float:
    with open(os.path.join(REPO, "sample_data.json"), "rb") as f:
        status, body = http_request("POST", f"{ts.inference}/predictions/dlrm", f.read(), timeout=120)
    assert status == 200, body
    return json.loads(body)["score"]


def measure_start(workdir: str, model_store: str, store: str) -> Dict[str, Any]:
    """TorchServe start -> READY -> first answer (sample_data.json)."""
    started = time.monotonic()
    ts = server(workdir, model_store, store)
    try:
        ts.wait_for_model("dlrm", READY_TIMEOUT_S)
        ready = time.monotonic() - started
        score = probe_score(ts)
        answered = time.monotonic() - started
        pid = ready_pids(ts)[0]  # model-config.yaml may start several: the memory of one
        return {"ready_s": ready, "first_answer_s": answered, "score": score, **memory_of(pid)}
    finally:
        ts.stop()


def measure_workers_and_restart(args: argparse.Namespace, workdir: str, model_store: str, store: str, sizes: List[int],
                                table_gib: float) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:  # fmt: skip
    ts = server(workdir, model_store, store)
    rows: List[Dict[str, Any]] = []
    try:
        ts.wait_for_model("dlrm", READY_TIMEOUT_S)
        url = f"{ts.inference}/predictions/dlrm"
        for count in args.workers:
            asked = time.monotonic()
            status, body = http_request("PUT", f"{ts.management}/models/dlrm?min_worker={count}&max_worker={count}")
            assert status in (200, 202), body
            pids = wait_workers(ts, count)
            scaled = time.monotonic() - asked
            load = Load(url, sizes, args.connections)
            time.sleep(args.load_seconds)
            load.stop()
            memory = {pid: memory_of(pid) for pid in pids}
            pss = sum(m["Pss"] for m in memory.values())
            answered = len(load.answers())
            rows.append({"workers": count, "scaled_s": scaled, "answers": answered, "rps": answered / args.load_seconds,
                         "pss_sum": pss, "bound": 1.15 * table_gib + count, "anon_max": max(m["Anonymous"] for m in memory.values()),
                         "rss_max": max(m["Rss"] for m in memory.values())})  # fmt: skip
            print(f"   {count} worker(s): READY {scaled:.1f} s after the scale request; PSS summed {pss:.2f} GiB "
                  f"(rule: <= {1.15 * table_gib + count:.2f}), largest Anonymous {rows[-1]['anon_max']:.2f} GiB", flush=True)  # fmt: skip

        # Restart under load: back to one worker, kill it, wait for its replacement.
        http_request("PUT", f"{ts.management}/models/dlrm?min_worker=1&max_worker=1")
        (victim,) = wait_workers(ts, 1)
        before = probe_score(ts)
        load = Load(url, sizes, args.connections)
        time.sleep(3)
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        wait_workers(ts, 1, exclude=(victim,))
        ready = time.monotonic() - killed
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(sent > killed and s == 200 for sent, _, s in load.answers()):
            time.sleep(0.05)
        time.sleep(2)
        load.stop()
        # The first request sent after the kill that was answered, and what those already in
        # flight got (answers that came back after the kill).
        first_ok = min((back - killed for sent, back, s in load.answers() if sent > killed and s == 200), default=float("nan"))
        failed = {}
        for _, back, s in load.answers():
            if back > killed and s != 200:
                failed[s] = failed.get(s, 0) + 1
        after = probe_score(ts)
        restart = {"ready_s": ready, "first_200_s": first_ok, "failed": failed, "identical": before == after,
                   "before": before, "after": after}  # fmt: skip
    finally:
        ts.stop()
    return rows, restart


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.path.join(REPO, "model_config.json"))
    parser.add_argument("--store", default=default_store_dir(), help="table store (default: serving's)")
    parser.add_argument("--workers", default="1,2,4", help="worker counts for the memory table")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--load-seconds", type=float, default=15)
    parser.add_argument("--no-compare", dest="compare", action="store_false", help="skip the start without a store")
    args = parser.parse_args()
    args.workers = [int(n) for n in args.workers.split(",")]
    return args


def main() -> None:
    args = parse_args()
    with open(args.config) as f:
        sizes = json.load(f)["num_embeddings_per_feature"]
    with tempfile.TemporaryDirectory(prefix="bench_store_serving.") as workdir:
        print(f"== packaging {args.config}; its table store entry in {args.store}", flush=True)
        model_store, entry = package(args.config, args.store, workdir)
        table_gib = os.path.getsize(entry) / GiB
        print(f"   {entry}: {table_gib:.2f} GiB", flush=True)

        starts = {}
        print("== start with the store (entry in the page cache)", flush=True)
        starts["table store"] = measure_start(os.path.join(workdir, "start-store"), model_store, args.store)
        if args.compare:
            print("== start without a store (DLRM_TABLE_STORE=off)", flush=True)
            starts["no store"] = measure_start(os.path.join(workdir, "start-off"), model_store, "off")
        print("\n| start | READY (s) | first answer (s) | worker Anonymous (GiB) | worker RSS (GiB) | score |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for name, s in starts.items():
            print(f"| {name} | {s['ready_s']:.1f} | {s['first_answer_s']:.1f} | {s['Anonymous']:.2f} | {s['Rss']:.2f} | {s['score']:.9g} |")

        print(f"\n== workers {args.workers} under {args.connections} connections, then kill -9 under load", flush=True)
        rows, restart = measure_workers_and_restart(args, os.path.join(workdir, "workers"), model_store, args.store, sizes, table_gib)
        print("\n| workers | READY after scaling (s) | req/s | PSS summed (GiB) | rule 1.15 x tables + N GiB | largest Anonymous (GiB) | largest RSS (GiB) |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in rows:
            print(f"| {r['workers']} | {r['scaled_s']:.1f} | {r['rps']:.0f} | {r['pss_sum']:.2f} | {r['bound']:.2f} | {r['anon_max']:.2f} | {r['rss_max']:.2f} |")
        print(f"\nkill -9 under load: new worker READY {restart['ready_s']:.1f} s after the kill, first 200 after the kill at "
              f"{restart['first_200_s']:.1f} s; other answers after the kill {restart['failed'] or 'none'}; probe score "
              f"{'bit-identical' if restart['identical'] else 'DIFFERENT'} ({restart['before']!r} / {restart['after']!r})")  # fmt: skip
        summary = {"entry_gib": table_gib, "starts": starts, "workers": rows, "restart": restart}
        print("store_serving: " + json.dumps({"start_s": starts["table store"]["first_answer_s"], "restart_s": restart["first_200_s"],
                                                "anon_gib": starts["table store"]["Anonymous"],
                                                "pss_ok": all(r["pss_sum"] <= r["bound"] for r in rows)}))  # fmt: skip
        os.makedirs(os.path.join(REPO, "benchmarks", "results"), exist_ok=True)
        with open(os.path.join(REPO, "benchmarks", "results", "bench_store_serving.json"), "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
