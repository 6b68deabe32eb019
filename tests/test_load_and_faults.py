"""Under load and worker faults (SPEC §4): nothing lost, nothing mixed up.

A real TorchServe (the repo's config.properties limits, dynamic batching as packaged:
model-config.yaml's batchSize and maxBatchDelay) serves the small config. Every answer is compared with
the same config built in-process (same seed, same weights): batched and single matmuls
differ by a few float32 ulps (1.5e-8 at |score| ~ 0.15), so scores must agree within
SCORE_TOLERANCE - tight enough that no two of the requests sent could pass for each other.

- load: a few hundred one-sample, multi-sample and multi-hot requests over 16 keep-alive
  connections; every one gets exactly its own scores.
- fault: ``kill -9`` of the worker while 16 connections keep sending. TorchServe answers
  the batch the worker held with a 5xx, keeps the queued requests, restarts the worker;
  nothing hangs (every call has a timeout), and afterwards the answers are bit-identical.
  The recovery time is printed, not asserted (beyond READY_TIMEOUT_S: no hang).

The long run is ``benchmarks/soak.py`` (20,000 requests by default); a short run of it
against this server keeps it working.

Symbols: B samples, N = 13 dense features, F = 3 sparse features.
"""

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import List

import pytest
import torch
import yaml

from conftest import REPO, SMALL_TABLE_SIZES, small_model_config
from dlrm_factory import DLRMFactory
from load import Outcome, expected_scores, matches, mixed_requests, send, twins
from serving import READY_TIMEOUT_S, TorchServe, read_properties, torchserve_fixture
from torchserve_process import http_request

CONFIG = small_model_config(max_samples_per_request=64)
KEYS = [f"cat_{f}" for f in range(len(SMALL_TABLE_SIZES))]
# What the repo's config.properties says about requests, for this server too.
LIMITS = {k: v for k, v in read_properties(os.path.join(REPO, "config.properties")).items()
          if k in ("max_request_size", "decode_input_request")}  # fmt: skip
SCORE_TOLERANCE = 1e-7
CONNECTIONS = 16
LOAD_REQUESTS = 384
with open(os.path.join(REPO, "model-config.yaml")) as f:
    BATCH_SIZE = yaml.safe_load(f)["batchSize"]  # as packaged
FAULT_RESPONSE_TIMEOUT_S = 30  # TorchServe's per-batch timeout for the fault model
CLIENT_TIMEOUT_S = FAULT_RESPONSE_TIMEOUT_S + 30  # every call ends: an answer or this


# --- the server: dlrm.mar as packaged, and again for the worker kill ----------------------------

torchserve = torchserve_fixture(
    mars={"dlrm": CONFIG},
    models={
        "dlrm": {},  # the .mar's YAML: model-config.yaml's batching
        "dlrm_fault": {"mar": "dlrm.mar", "response_timeout": FAULT_RESPONSE_TIMEOUT_S},
    },
    properties=LIMITS,
)


@pytest.fixture(scope="module")
def direct_model() -> torch.nn.Module:
    return DLRMFactory(CONFIG)


def settled_handler_calls(server: TorchServe, model: str) -> int:
    """``handler_calls`` once the metrics log has stopped growing for a second."""
    counts = [server.handler_calls(model)]

    def settled() -> bool:
        time.sleep(1.0)
        counts.append(server.handler_calls(model))
        return counts[-1] == counts[-2]

    server.wait_until("the metrics log", settled, 30)
    return counts[-1]


def report(capsys: pytest.CaptureFixture, text: str) -> None:
    """Print to the terminal even under pytest's capture (the figures belong in CI's log)."""
    with capsys.disabled():
        print(f"\n    {text}", flush=True)


# --- load -----------------------------------------------------------------------------------


def test_mixed_load_over_16_connections_gets_every_request_exactly_its_own_scores(
    torchserve: TorchServe, direct_model: torch.nn.Module, capsys: pytest.CaptureFixture
) -> None:
    load = mixed_requests(random.Random(16), LOAD_REQUESTS, SMALL_TABLE_SIZES)
    expected = expected_scores(direct_model, KEYS, load)
    assert twins(expected, 2 * SCORE_TOLERANCE) == 0  # a swapped answer would show
    calls_before = settled_handler_calls(torchserve, "dlrm")
    started = time.monotonic()

    outcomes = send(f"{torchserve.inference}/predictions/dlrm", [r.body for r in load], CONNECTIONS, CLIENT_TIMEOUT_S)

    seconds = time.monotonic() - started
    assert sorted(o.index for o in outcomes) == list(range(LOAD_REQUESTS))  # each sent once
    assert [o for o in outcomes if o.error] == []
    assert Counter(o.status for o in outcomes) == {200: LOAD_REQUESTS}
    mixed_up = [o.index for o in outcomes if not matches(o.answer, expected[o.index], load[o.index].one_sample, SCORE_TOLERANCE)]
    assert mixed_up == []
    calls = settled_handler_calls(torchserve, "dlrm") - calls_before
    assert calls < LOAD_REQUESTS  # dynamic batching gathered requests
    samples = sum(len(r.samples) for r in load)
    report(capsys, f"load: {LOAD_REQUESTS} requests ({samples} samples; {dict(Counter(r.kind for r in load))}) over "
                   f"{CONNECTIONS} connections in {seconds:.1f} s ({LOAD_REQUESTS / seconds:.0f} req/s), "
                   f"{calls} handler calls (mean batch {LOAD_REQUESTS / calls:.1f}); 0 errors, 0 mismatches")  # fmt: skip


# --- a worker killed under load -------------------------------------------------------------


def test_killed_worker_costs_only_its_batch_and_comes_back_with_identical_answers(
    torchserve: TorchServe, direct_model: torch.nn.Module, capsys: pytest.CaptureFixture
) -> None:
    server, model = torchserve, "dlrm_fault"
    url = f"{server.inference}/predictions/{model}"
    # One worker (whatever the server started): its batch is the one lost, its restart the wait.
    status, body = http_request("PUT", f"{server.management}/models/{model}?min_worker=1&max_worker=1")
    assert status in (200, 202), body
    server.wait_until("one worker", lambda: len(server.workers(model)) == 1, READY_TIMEOUT_S)
    load = mixed_requests(random.Random(9), 64, SMALL_TABLE_SIZES)
    expected = expected_scores(direct_model, KEYS, load)
    bodies = [r.body for r in load]
    # Sent one at a time: each alone in its batch, so before and after must be bit-identical.
    before = send(url, bodies[:8], 1, CLIENT_TIMEOUT_S)
    assert [o.status for o in before] == [200] * 8

    stop = threading.Event()
    outcomes: List[Outcome] = []
    sender = threading.Thread(target=send, args=(url, bodies, CONNECTIONS, CLIENT_TIMEOUT_S, stop, outcomes))
    sender.start()
    try:
        server.wait_until("requests flowing", lambda: len(outcomes) >= 50, 60)
        (worker,) = server.workers(model)
        killed = time.monotonic()
        os.kill(worker["pid"], signal.SIGKILL)
        server.wait_until(
            "a new worker",
            lambda: any(w["status"] == "READY" and w["pid"] != worker["pid"] for w in server.workers(model)),
            READY_TIMEOUT_S,
        )
        ready = time.monotonic()
        server.wait_until(
            "answers after the restart",
            lambda: sum(o.status == 200 and o.started > ready for o in list(outcomes)) >= 50,
            60,
        )
    finally:
        stop.set()
        sender.join(timeout=CLIENT_TIMEOUT_S + 10)
    assert not sender.is_alive()  # every call ended

    assert [o for o in outcomes if o.error] == []  # no timeouts, no dropped connections
    statuses = Counter(o.status for o in outcomes)
    failed = [o for o in outcomes if o.status != 200]
    assert all(o.status >= 500 for o in failed), statuses
    assert all(isinstance(o.answer, dict) and o.answer.get("code") == o.status for o in failed)
    assert len(failed) <= BATCH_SIZE, statuses  # at most the batch the worker held
    answered = [o for o in outcomes if o.status == 200]
    assert [o.index for o in answered if not matches(o.answer, expected[o.index], load[o.index].one_sample,
                                                     SCORE_TOLERANCE)] == []  # fmt: skip
    after = send(url, bodies[:8], 1, CLIENT_TIMEOUT_S)
    assert [o.answer for o in after] == [o.answer for o in before]  # bit-identical

    first_answer = min(o.ended for o in answered if o.started > killed)  # sent after the kill
    waited = max((o.ended - o.started for o in outcomes if o.started < ready and o.ended > killed), default=0.0)
    failed_within = max((o.ended - killed for o in failed), default=0.0)
    report(capsys, f"kill -9 of the worker: {len(failed)} in-flight requests answered "
                   f"{dict(Counter(o.status for o in failed))} ({failed[0].answer.get('message') if failed else '-'}) "
                   f"within {failed_within:.2f} s of the kill; "
                   f"new worker READY {ready - killed:.1f} s after the kill, the first request sent after the kill "
                   f"answered 200 at {first_answer - killed:.1f} s; "
                   f"{len(outcomes)} requests, {len(answered)} answered 200 with their own scores, the longest "
                   f"wait across the restart {waited:.1f} s; answers after = before")  # fmt: skip


# --- benchmarks/soak.py, briefly, against this server ---------------------------------------


def test_soak_script_reports_every_request_answered_and_matched(torchserve: TorchServe) -> None:
    """The long run's script stays runnable: 60 requests with --url against this server."""
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "soak.py"), "--url", torchserve.inference,
         "--model", "dlrm", "--requests", "60", "--connections", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:]
    for line in ("sent        60", "answered    60", "200         60", "errors      0", "mismatches  0"):
        assert f"  {line}" in done.stdout, done.stdout[-3000:]
