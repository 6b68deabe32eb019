"""Binary requests through a real TorchServe (SPEC §8): ``POST /predictions/dlrm`` with
``Content-Type: application/octet-stream`` and ``Inference-Header-Content-Length``.

- the same samples sent as JSON and as binary (INT64 or INT32 ids) get identical scores;
- a body built by tritonclient's ``generate_request_body`` scores as its JSON twin, and its
  binary answer is read by tritonclient's ``parse_response_body`` with the answer's
  ``Inference-Header-Content-Length``;
- malformed binary bodies get a 400 ``InvalidInput`` naming the tensor, good requests sent
  at the same time are answered as usual, and the worker never restarts.

The server runs with the request settings of the repo's config.properties and the model
YAML create_dlrm_mar.sh packages (dynamic batching). Symbols: B samples, N = 13 dense
features, F = 3 sparse features (1000, 2000, 5000 rows).
"""

import json
import os
import random
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pytest
import requests
import torch
import tritonclient.http as triton_http

from conftest import REPO, SMALL_TABLE_SIZES, small_model_config
from dlrm_request import BINARY_HEADER, binary_request_body, read_binary_answer
from serving import REQUEST_TIMEOUT_S, TorchServe, make_request, random_samples, read_properties, torchserve_fixture
from test_binary_request import MALFORMED

SHIPPED = read_properties(os.path.join(REPO, "config.properties"))
LIMITS = {k: SHIPPED[k] for k in ("max_request_size", "decode_input_request")}
CONFIG = small_model_config(max_samples_per_request=16)
SAMPLES = random_samples(random.Random(14), 6, SMALL_TABLE_SIZES)
JSON_REQUEST = make_request(SAMPLES)

torchserve = torchserve_fixture(mars={"dlrm": CONFIG}, models={"dlrm": {}}, properties=LIMITS)


@pytest.fixture(scope="module")
def worker_pids(torchserve: TorchServe) -> List[int]:
    """The workers' pids before any binary body: they must be the same after all of them."""
    return sorted(w["pid"] for w in torchserve.workers("dlrm"))


def post_binary(server: TorchServe, body: bytes, header_length: Any, header_name: str = BINARY_HEADER) -> requests.Response:
    headers = {"Content-Type": "application/octet-stream", header_name: str(header_length)}
    return requests.post(f"{server.inference}/predictions/dlrm", data=body, headers=headers, timeout=REQUEST_TIMEOUT_S)


def json_scores(server: TorchServe, request: Dict[str, Any]) -> List[float]:
    response = requests.post(f"{server.inference}/predictions/dlrm", json=request, timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 200, response.text
    return response.json()["score"]


def tensors(request: Dict[str, Any], int_dtype: type = np.int64) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The request's dense [B, N] float32, lengths [B, F] and values [L] as numpy arrays."""
    num_samples = len(request["float_features"])
    return (
        np.asarray(request["float_features"], dtype=np.float32),
        np.asarray(request["id_list_features.lengths"], dtype=int_dtype).reshape(num_samples, -1),
        np.asarray(request["id_list_features.values"], dtype=int_dtype),
    )


@pytest.mark.parametrize("int_dtype", [np.int64, np.int32], ids=["INT64", "INT32"])
def test_the_same_samples_as_json_and_as_binary_score_identically(torchserve: TorchServe, worker_pids: List[int],
                                                                   int_dtype: type) -> None:  # fmt: skip
    expected = json_scores(torchserve, JSON_REQUEST)
    body, header_length = binary_request_body(*tensors(JSON_REQUEST, int_dtype))
    response = post_binary(torchserve, body, header_length)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/octet-stream"
    outputs = read_binary_answer(response.content, response.headers[BINARY_HEADER])
    assert outputs["score"].shape == (len(SAMPLES),)
    assert outputs["score"].tolist() == expected
    np.testing.assert_allclose(outputs["probability"], 1 / (1 + np.exp(-np.asarray(expected))), rtol=1e-6)


def test_a_tritonclient_body_scores_as_its_json_twin(torchserve: TorchServe, worker_pids: List[int]) -> None:
    expected = json_scores(torchserve, JSON_REQUEST)
    inputs = []
    for name, array, datatype in zip(("float_features", "id_list_features.lengths", "id_list_features.values"),
                                     tensors(JSON_REQUEST), ("FP32", "INT64", "INT64")):  # fmt: skip
        tensor = triton_http.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=True)
        inputs.append(tensor)
    body, header_length = triton_http.InferenceServerClient.generate_request_body(inputs, request_id="ranker-1")
    response = post_binary(torchserve, body, header_length, header_name=BINARY_HEADER.lower())
    assert response.status_code == 200, response.text
    result = triton_http.InferenceServerClient.parse_response_body(
        response.content, header_length=int(response.headers[BINARY_HEADER])
    )
    assert result.get_response()["id"] == "ranker-1" and result.get_response()["model_name"] == "dlrm"
    assert result.as_numpy("score").tolist() == expected


def test_without_binary_outputs_the_answer_is_v2_json(torchserve: TorchServe, worker_pids: List[int]) -> None:
    expected = json_scores(torchserve, JSON_REQUEST)
    body, header_length = binary_request_body(*tensors(JSON_REQUEST), binary_outputs=False)
    response = post_binary(torchserve, body, header_length)
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/json"
    assert BINARY_HEADER not in response.headers
    score = response.json()["outputs"][0]
    assert (score["name"], score["datatype"], score["shape"]) == ("score", "FP32", [len(SAMPLES)])
    assert score["data"] == pytest.approx(expected, rel=1e-6)  # float32 values written as JSON numbers


ON_THE_WIRE = [m for m in MALFORMED if m[0] not in ("header_length_zero",)]


@pytest.mark.parametrize("body, header_length, status, message", [m[1:] for m in ON_THE_WIRE], ids=[m[0] for m in ON_THE_WIRE])
def test_malformed_binary_body_is_a_400_naming_the_tensor(torchserve: TorchServe, worker_pids: List[int], body: bytes,
                                                          header_length: Any, status: int, message: str) -> None:  # fmt: skip
    response = post_binary(torchserve, body, header_length)
    assert response.status_code == status, response.text
    answer = response.json()
    assert (answer["code"], answer["type"]) == (status, "InvalidInput") and answer["message"].startswith(message)


def test_malformed_bodies_sent_with_good_ones_spare_them(torchserve: TorchServe, worker_pids: List[int]) -> None:
    """Good JSON, good binary and malformed binary requests sent at once from 12 threads:
    dynamic batching may put them in one handler call; each gets its own answer."""
    expected = json_scores(torchserve, JSON_REQUEST)
    good_body, good_length = binary_request_body(*tensors(JSON_REQUEST))
    bad = [m for m in MALFORMED if m[0] in ("nan", "id_out_of_range", "billion_samples_claimed", "truncated_body")]

    def send(i: int) -> Tuple[str, Optional[str], int, Any]:
        if i % 3 == 0:
            response = requests.post(f"{torchserve.inference}/predictions/dlrm", json=JSON_REQUEST, timeout=REQUEST_TIMEOUT_S)
            return "json", None, response.status_code, response.json()["score"]
        if i % 3 == 1:
            response = post_binary(torchserve, good_body, good_length)
            scores = read_binary_answer(response.content, response.headers[BINARY_HEADER])["score"]
            return "binary", None, response.status_code, scores.tolist()
        case = bad[i % len(bad)]
        response = post_binary(torchserve, case[1], case[2])
        return "bad", case[4], response.status_code, response.json()["message"]

    with ThreadPoolExecutor(max_workers=12) as pool:
        outcomes = list(pool.map(send, range(48)))
    for kind, message, status, answer in outcomes:
        if kind == "bad":
            assert status == 400 and answer.startswith(message)
        else:
            # batched with others: equal up to float32 rounding of batched matrix multiplies
            assert status == 200 and answer == pytest.approx(expected, rel=0, abs=1e-6), kind


def test_worker_survived_every_binary_body(torchserve: TorchServe, worker_pids: List[int]) -> None:
    """Runs last in this file: the worker that answered them all is the one that started."""
    workers = torchserve.workers("dlrm")
    assert sorted(w["pid"] for w in workers) == worker_pids and {w["status"] for w in workers} == {"READY"}
