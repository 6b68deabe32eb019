"""The handler's custom metrics on TorchServe's Prometheus endpoint, end to end.

The server runs the repo's config.properties (metrics_mode=prometheus, metrics_config=
metrics.yaml: with prometheus TorchServe publishes only declared backend metrics), on free
loopback ports. Known traffic goes in - bad requests first, then good ones, one at a time so
that each is its own batch - and GET <metrics_address>/metrics must show it.
"""

import os
import re
from typing import Any, Dict, List, Tuple

import pytest
import requests

from conftest import small_model_config
from serving import REPO, TorchServe, predict, read_properties, torchserve_fixture

METRICS = {  # name: Prometheus type (metrics.yaml)
    "DLRMSamplesPerBatch": "gauge",
    "DLRMPreprocessTime": "gauge",
    "DLRMInferenceTime": "gauge",
    "DLRMInvalidRequests": "counter",
}
DENSE = [0.25 * i - 1.5 for i in range(13)]
BAD_REQUESTS = [
    b"not json",
    {"float_features": DENSE[:12], "id_list_features.lengths": [1, 1, 1], "id_list_features.values": [1, 2, 3]},
    {"float_features": DENSE, "id_list_features.lengths": [1, 1, 1], "id_list_features.values": [1, 2, 5000]},
]
GOOD_REQUESTS = [  # the last one scores 2 samples: the last batch's DLRMSamplesPerBatch
    {"float_features": DENSE, "id_list_features.lengths": [1, 0, 2], "id_list_features.values": [7, 42, 43]},
    {"float_features": [DENSE] * 3, "id_list_features.lengths": [1] * 9, "id_list_features.values": list(range(9))},
    {"float_features": [DENSE] * 2, "id_list_features.lengths": [1] * 6, "id_list_features.values": list(range(6))},
]


def scrape(server: TorchServe) -> Dict[str, List[Tuple[Dict[str, str], float]]]:
    """GET /metrics -> {metric name: [(labels, value), ...]} (Prometheus text format)."""
    text = requests.get(f"{server.metrics}/metrics", timeout=10).text
    samples: Dict[str, List[Tuple[Dict[str, str], float]]] = {}
    for name, labels, value in re.findall(r"^(\w+)\{(.*)\} (\S+)$", text, re.MULTILINE):
        samples.setdefault(name, []).append((dict(re.findall(r'(\w+)="([^"]*)"', labels)), float(value)))
    samples["# TYPE"] = [({"name": n, "type": t}, 0.0) for n, t in re.findall(r"^# TYPE (\w+) (\w+)$", text, re.MULTILINE)]
    return samples


def value(samples: Dict[str, Any], name: str) -> float:
    """The value of ``name`` for the model dlrm (one series)."""
    (series,) = [v for labels, v in samples.get(name, []) if labels.get("ModelName") == "dlrm"]
    return series


# The repo's config.properties; its metrics_config (relative to the directory torchserve
# starts in: the repo root, as the README runs it) made absolute.
torchserve = torchserve_fixture(
    mars={"dlrm": small_model_config()},
    models={"dlrm": {}},
    properties=read_properties(os.path.join(REPO, "config.properties"), resolve_paths=True),
)


@pytest.fixture(scope="module")
def traffic(torchserve: TorchServe) -> Dict[str, Any]:
    """The metrics before any request, then BAD_REQUESTS and GOOD_REQUESTS one at a time,
    then the metrics once the last batch's have arrived (they come from the worker's log)."""
    before: Dict[str, Any] = {}
    after: Dict[str, Any] = {}

    def initialized() -> bool:  # the worker reports DLRMInvalidRequests 0 once it has loaded
        before.update(scrape(torchserve))
        return "DLRMInvalidRequests" in before

    def settled() -> bool:
        after.update(scrape(torchserve))
        return "DLRMSamplesPerBatch" in after and value(after, "DLRMSamplesPerBatch") == 2

    torchserve.wait_until("the worker's initial metrics", initialized, 30)
    statuses = [predict(torchserve, "dlrm", body)[0] for body in BAD_REQUESTS + GOOD_REQUESTS]
    torchserve.wait_until("the last batch's metrics", settled, 30)
    return {"before": before, "statuses": statuses, "after": after}


def test_traffic_was_answered_as_sent(traffic: Dict[str, Any]) -> None:
    assert traffic["statuses"] == [400] * len(BAD_REQUESTS) + [200] * len(GOOD_REQUESTS)


def test_every_handler_metric_is_published_with_its_type_and_the_model_name(traffic: Dict[str, Any]) -> None:
    types = {labels["name"]: labels["type"] for labels, _ in traffic["after"]["# TYPE"]}
    for name, kind in METRICS.items():
        assert types.get(name) == kind, name
        ((labels, _),) = traffic["after"][name]
        assert labels["ModelName"] == "dlrm" and labels["Level"] == "Model"


def test_invalid_request_counter_starts_at_0_and_counts_each_bad_request(traffic: Dict[str, Any]) -> None:
    assert value(traffic["before"], "DLRMInvalidRequests") == 0
    assert value(traffic["after"], "DLRMInvalidRequests") == len(BAD_REQUESTS)


def test_samples_per_batch_is_the_last_batchs_sample_count(traffic: Dict[str, Any]) -> None:
    assert value(traffic["after"], "DLRMSamplesPerBatch") == len(GOOD_REQUESTS[-1]["float_features"])


def test_preprocess_and_inference_times_are_plausible_milliseconds(traffic: Dict[str, Any]) -> None:
    preprocess = value(traffic["after"], "DLRMPreprocessTime")
    inference = value(traffic["after"], "DLRMInferenceTime")
    assert 0 < preprocess < 5_000  # a 2-sample request: well under a millisecond to a few
    assert 0 < inference < 30_000
    handler = value(traffic["after"], "HandlerTime")  # TorchServe's: the whole handle call
    assert preprocess + inference <= handler + 1  # HandlerTime is rounded to 0.01 ms
