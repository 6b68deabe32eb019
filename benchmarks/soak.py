"""Soak a served DLRM: many requests over keep-alive connections, every answer compared with
the same config built in-process (same seed, same weights), optionally a worker killed
mid-run. The long version of tests/test_load_and_faults.py.

    .venv/bin/python benchmarks/soak.py                        # 20,000 requests, own server
    .venv/bin/python benchmarks/soak.py --requests 2000 --connections 32
    .venv/bin/python benchmarks/soak.py --kill-worker-at 10000 # kill -9 the worker mid-run
    .venv/bin/python benchmarks/soak.py --url http://127.0.0.1:8080 --model dlrm \\
        --config model_config.json                             # a running server (make demo)

Without ``--url`` it packages ``--config`` (default: the tests' small config, 3 tables of
1000, 2000 and 5000 rows, D = 16) with create_dlrm_mar.sh, starts TorchServe on free
loopback ports with the request settings of config.properties (max_request_size,
decode_input_request) and the .mar's batching (batchSize 8, maxBatchDelay 5 ms), and stops
it at the end. With ``--url``, ``--config`` must be what that server serves (the in-process
reference is built from it: the full default needs ~12 GB).

The requests cycle through one sample (one id per feature), 2 to 8 samples, and 1 to 4
multi-hot samples (0 to 5 ids per feature). Printed: requests sent, answered (any HTTP
answer), answered 200, errors (by status, and client errors such as timeouts), mismatches
(a 200 whose scores are not the request's own, within --tolerance), req/s and latency; with
``--kill-worker-at``, the 5xx it cost and the seconds until a new worker was READY.
Exit status 1 if anything but the killed batch failed, or any answer was mismatched.
"""

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [os.path.join(REPO, "tests"), os.path.join(REPO, "scripts"), REPO]

import requests  # noqa: E402

from conftest import small_model_config  # noqa: E402
from dlrm_factory import DLRMFactory, read_config_source, resolve_model_config  # noqa: E402
from load import Outcome, expected_scores, matches, mixed_requests, send, twins  # noqa: E402
from serving import TorchServe, TorchServeError, build_mar, read_properties  # noqa: E402

REQUEST_SETTINGS = ("max_request_size", "decode_input_request")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000, help="requests to send (default 20,000)")
    parser.add_argument("--connections", type=int, default=16, help="keep-alive connections (default 16)")
    parser.add_argument("--url", help="inference address of a running server (default: start one)")
    parser.add_argument("--management-url", help="its management address (for --kill-worker-at)")
    parser.add_argument("--model", default="dlrm", help="model name (default dlrm)")
    parser.add_argument("--config", help="model config JSON the server serves (default: the small test config)")
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds per call (default 150)")
    parser.add_argument("--tolerance", type=float, default=1e-7, help="score tolerance (default 1e-7)")
    parser.add_argument("--kill-worker-at", type=int, help="kill -9 the worker after this many answers")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.kill_worker_at is not None and args.url and not args.management_url:
        parser.error("--kill-worker-at with --url needs --management-url")
    return args


def worker(management: str, model: str) -> Optional[Dict[str, Any]]:
    workers = requests.get(f"{management}/models/{model}", timeout=10).json()[0]["workers"]
    return workers[0] if workers else None


def kill_worker_when(
    outcomes: List[Outcome], at: int, management: str, model: str, stop: threading.Event, result: Dict[str, Any]
) -> None:
    """Once ``at`` answers are in, kill -9 the worker; note when a new one is READY."""
    while len(outcomes) < at and not stop.is_set():
        time.sleep(0.01)
    if stop.is_set():
        return
    old = worker(management, model)
    result["killed"] = time.monotonic()
    os.kill(old["pid"], signal.SIGKILL)
    while not stop.is_set():
        try:
            new = worker(management, model)
        except requests.RequestException:
            new = None
        if new and new["pid"] != old["pid"] and new["status"] == "READY":
            result["ready"] = time.monotonic()
            return
        time.sleep(0.1)


def progress(outcomes: List[Outcome], total: int, stop: threading.Event) -> None:
    step = max(1, total // 10)
    shown = 0
    while not stop.wait(1.0):
        if len(outcomes) >= shown + step:
            shown = len(outcomes) // step * step
            print(f"  {len(outcomes):>7,} / {total:,} answered", flush=True)


def run(args: argparse.Namespace, url: str, management: Optional[str], cfg: Dict[str, Any]) -> int:
    print(f"building {args.requests:,} requests and their scores in-process ...", flush=True)
    load = mixed_requests(random.Random(args.seed), args.requests, cfg["num_embeddings_per_feature"],
                          cfg["dense_in_features"])  # fmt: skip
    expected = expected_scores(DLRMFactory(cfg), cfg["id_list_features_keys"], load)
    print(f"sending to {url} over {args.connections} connections ...", flush=True)

    outcomes: List[Outcome] = []
    stop = threading.Event()
    kill: Dict[str, Any] = {}
    helpers = [threading.Thread(target=progress, args=(outcomes, args.requests, stop), daemon=True)]
    if args.kill_worker_at is not None:
        helpers.append(threading.Thread(target=kill_worker_when, daemon=True,
                                        args=(outcomes, args.kill_worker_at, management, args.model, stop, kill)))  # fmt: skip
    for helper in helpers:
        helper.start()
    started = time.monotonic()
    send(url, [r.body for r in load], args.connections, args.timeout, outcomes=outcomes)
    seconds = time.monotonic() - started
    stop.set()
    for helper in helpers:
        helper.join(timeout=10)

    answered = [o for o in outcomes if o.status is not None]
    ok = [o for o in answered if o.status == 200]
    mismatched = [o for o in ok if not matches(o.answer, expected[o.index], load[o.index].one_sample, args.tolerance)]
    errors = Counter(str(o.status) if o.status is not None else o.error.split(":")[0] for o in outcomes if o.status != 200)
    latencies = sorted(o.ended - o.started for o in ok)
    samples = sum(len(r.samples) for r in load)
    print(f"\nsoak: {len(load):,} requests ({samples:,} samples: {dict(Counter(r.kind for r in load))}), "
          f"{args.connections} connections, {seconds:.1f} s")  # fmt: skip
    print(f"  sent        {len(outcomes):,}")
    print(f"  answered    {len(answered):,}")
    print(f"  200         {len(ok):,}")
    print(f"  errors      {sum(errors.values()):,} {dict(errors) if errors else ''}")
    print(f"  mismatches  {len(mismatched):,} (tolerance {args.tolerance:g}; requests with a twin within it: "
          f"{twins(expected, 2 * args.tolerance) if len(load) <= 2000 else 'not counted'})")  # fmt: skip
    print(f"  throughput  {len(ok) / seconds:.1f} req/s, {sum(len(load[o.index].samples) for o in ok) / seconds:.0f} samples/s")
    if latencies:
        print(f"  latency     p50 {1000 * statistics.median(latencies):.0f} ms, "
              f"p99 {1000 * latencies[int(0.99 * (len(latencies) - 1))]:.0f} ms, max {1000 * latencies[-1]:.0f} ms")  # fmt: skip
    for o in mismatched[:5]:
        print(f"  mismatch: request {o.index} ({load[o.index].kind}) got {json.dumps(o.answer)[:200]}, "
              f"expected scores {expected[o.index]}")  # fmt: skip
    allowed = 0
    if args.kill_worker_at is not None:
        failed = [o for o in outcomes if o.status is not None and o.status >= 500]
        allowed = len(failed)
        recovery = kill["ready"] - kill["killed"] if "ready" in kill else float("nan")
        first = min((o.ended for o in ok if "killed" in kill and o.started > kill["killed"]), default=float("nan"))
        within = max((o.ended - kill["killed"] for o in failed), default=0.0) if "killed" in kill else float("nan")
        print(f"  worker kill -9 after {args.kill_worker_at:,} answers: {len(failed)} requests answered "
              f"{dict(Counter(o.status for o in failed))} ({failed[0].answer.get('message') if failed else '-'}) "
              f"within {within:.2f} s of the kill; "
              f"new worker READY after {recovery:.1f} s; the first request sent after the kill answered 200 at "
              f"{first - kill.get('killed', first):.1f} s")  # fmt: skip
    return 1 if mismatched or len(outcomes) - len(ok) > allowed or len(outcomes) != len(load) else 0


def main() -> int:
    args = parse_args()
    config = small_model_config() if args.config is None else read_config_source(args.config)
    cfg = resolve_model_config(config)
    if args.url:
        return run(args, f"{args.url.rstrip('/')}/predictions/{args.model}", args.management_url, cfg)
    workdir = tempfile.mkdtemp(prefix="soak_")
    try:
        mar = build_mar(config, workdir, args.model)
        limits = read_properties(os.path.join(REPO, "config.properties"))
        print(f"starting TorchServe and waiting for the worker of {args.model} ...", flush=True)
        with TorchServe.serving(workdir, os.path.dirname(mar), models={args.model: {}},
                                properties={k: limits[k] for k in REQUEST_SETTINGS}) as server:  # fmt: skip
            calls_before = server.handler_calls(args.model)
            status = run(args, f"{server.inference}/predictions/{args.model}", server.management, cfg)
            time.sleep(2)  # the metrics log trails the answers
            calls = server.handler_calls(args.model) - calls_before
            print(f"  batching    {calls:,} handler calls, mean {args.requests / max(calls, 1):.1f} requests per call")
            return status
    except TorchServeError as error:
        sys.exit(str(error))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

if __name__ == "__main__":
    sys.exit(main())
