"""Load for a served DLRM, shared by tests/test_load_and_faults.py and benchmarks/soak.py:
a mix of request bodies with the scores each must get, and a client that sends them over
several keep-alive connections, every call with a timeout.

Symbols: B samples, N = 13 dense features, F sparse features (one table each).
"""

import itertools
import json
import math
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, List, NamedTuple, Optional, Sequence

import requests
import torch

from serving import Sample, direct_scores, make_request

KINDS = ("one_sample", "multi_sample", "multi_hot")
DIRECT_CHUNK_SAMPLES = 1024  # samples per in-process model call when computing expectations
PROBABILITY_TOLERANCE = 1e-6


class LoadRequest(NamedTuple):
    """One request body and what it must be answered with."""

    kind: str  # one of KINDS
    body: bytes
    samples: List[Sample]
    one_sample: bool  # float_features a flat list: the answer holds scalars


class Outcome(NamedTuple):
    """What one POST got: an HTTP status and its body, or the client error (e.g. a timeout)."""

    index: int  # into the list of LoadRequests
    status: Optional[int]
    answer: Any  # parsed JSON, or the text when it is not JSON
    error: Optional[str]
    started: float  # time.monotonic()
    ended: float


def mixed_requests(
    rng: random.Random, count: int, table_sizes: Sequence[int], dense_features: int = 13
) -> List[LoadRequest]:
    """``count`` distinct requests, cycling through KINDS: one sample with one id per
    feature; 2 to 8 samples, one id per feature; 1 to 4 samples with 0 to 5 ids per feature."""
    out = []
    for i in range(count):
        kind = KINDS[i % len(KINDS)]
        if kind == "one_sample":
            samples = _samples(rng, 1, table_sizes, dense_features, lengths=(1, 1))
        elif kind == "multi_sample":
            samples = _samples(rng, rng.randint(2, 8), table_sizes, dense_features, lengths=(1, 1))
        else:
            samples = _samples(rng, rng.randint(1, 4), table_sizes, dense_features, lengths=(0, 5))
        one_sample = kind == "one_sample"
        body = json.dumps(make_request(samples, one_sample=one_sample)).encode()
        out.append(LoadRequest(kind, body, samples, one_sample))
    return out


def _samples(
    rng: random.Random, count: int, table_sizes: Sequence[int], dense_features: int, lengths: Sequence[int]
) -> List[Sample]:
    return [
        (
            [rng.uniform(-3.0, 3.0) for _ in range(dense_features)],
            [[rng.randrange(size) for _ in range(rng.randint(*lengths))] for size in table_sizes],
        )
        for _ in range(count)
    ]


def expected_scores(model: torch.nn.Module, keys: Sequence[str], load: Sequence[LoadRequest]) -> List[List[float]]:
    """Each request's logits from ``model`` in-process (many requests per model call)."""
    flat: List[float] = []
    samples = [s for r in load for s in r.samples]
    for start in range(0, len(samples), DIRECT_CHUNK_SAMPLES):
        flat.extend(direct_scores(model, list(keys), samples[start : start + DIRECT_CHUNK_SAMPLES]))
    out, start = [], 0
    for r in load:
        out.append(flat[start : start + len(r.samples)])
        start += len(r.samples)
    return out


def matches(answer: Any, expected: List[float], one_sample: bool, tolerance: float) -> bool:
    """Whether ``answer`` is exactly this request's: its scores (scalars for a one-sample
    request) within ``tolerance`` of ``expected``, and its probabilities their sigmoid
    (within PROBABILITY_TOLERANCE: the handler's float32 sigmoid)."""
    if not isinstance(answer, dict) or set(answer) != {"score", "probability"}:
        return False
    scores, probabilities = answer["score"], answer["probability"]
    if one_sample:
        scores, probabilities = [scores], [probabilities]
    elif not isinstance(scores, list) or not isinstance(probabilities, list):
        return False
    if len(scores) != len(expected) or len(probabilities) != len(expected):
        return False
    return all(
        isinstance(s, float)
        and abs(s - e) <= tolerance
        and abs(p - 1 / (1 + math.exp(-s))) <= PROBABILITY_TOLERANCE
        for s, p, e in zip(scores, probabilities, expected)
    )


def twins(expected: Sequence[List[float]], tolerance: float) -> int:
    """How many requests share all their scores, within ``tolerance``, with an earlier one:
    answers swapped between such requests could not be told apart."""
    seen: List[List[float]] = []
    count = 0
    for scores in expected:
        if any(len(s) == len(scores) and all(abs(a - b) <= tolerance for a, b in zip(s, scores)) for s in seen):
            count += 1
        seen.append(scores)
    return count


def post(session: requests.Session, url: str, index: int, body: bytes, timeout: float) -> Outcome:
    started = time.monotonic()
    try:
        response = session.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=timeout)
    except requests.RequestException as e:
        return Outcome(index, None, None, f"{type(e).__name__}: {e}", started, time.monotonic())
    try:
        answer = response.json()
    except ValueError:
        answer = response.text
    return Outcome(index, response.status_code, answer, None, started, time.monotonic())


def send(
    url: str,
    bodies: Sequence[bytes],
    connections: int,
    timeout: float,
    stop: Optional[threading.Event] = None,
    outcomes: Optional[List[Outcome]] = None,
) -> List[Outcome]:
    """POST every body once over ``connections`` keep-alive connections (one thread and
    ``requests.Session`` each); with ``stop``, cycle through the bodies until it is set.
    Outcomes are appended to ``outcomes`` (if given) as they come, and returned."""
    outcomes = [] if outcomes is None else outcomes
    indices: Iterable[int] = itertools.cycle(range(len(bodies))) if stop is not None else iter(range(len(bodies)))
    lock = threading.Lock()

    def next_index() -> Optional[int]:
        with lock:
            return next(indices, None)

    def connection() -> None:
        with requests.Session() as session:
            while stop is None or not stop.is_set():
                index = next_index()
                if index is None:
                    return
                outcome = post(session, url, index, bodies[index], timeout)
                with lock:
                    outcomes.append(outcome)

    with ThreadPoolExecutor(max_workers=connections) as pool:
        for done in [pool.submit(connection) for _ in range(connections)]:
            done.result()
    return outcomes
