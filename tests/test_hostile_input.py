"""Hostile input through a real TorchServe (SPEC §4): every malformed body is answered 4xx
with ``{"code": <the HTTP status>, "type": "InvalidInput", "message": "<field>: ..."}``, the
worker never dies, and the limits answer clearly: a body over ``max_request_size`` is a 413
from TorchServe itself, more than ``max_samples_per_request`` samples a 413 from the handler.

The server runs with the request settings of the repo's config.properties
(``max_request_size``, ``decode_input_request=false``: the handler reads the body as sent,
so that a key given twice can be refused).

Symbols: B samples, N = 13 dense features, F = 3 sparse features (1000, 2000, 5000 rows).
"""

import json
import os
import types
from typing import Any, List, Tuple

import pytest
import requests

from conftest import REPO, SMALL_TABLE_SIZES, small_model_config
from dlrm_factory import DLRMFactory
from serving import REQUEST_TIMEOUT_S, TorchServe, direct_scores, make_request, read_properties, torchserve_fixture

SHIPPED = read_properties(os.path.join(REPO, "config.properties"))
LIMITS = {k: SHIPPED[k] for k in ("max_request_size", "decode_input_request")}
MAX_REQUEST_SIZE = int(SHIPPED["max_request_size"])
MAX_SAMPLES = 16
CONFIG = small_model_config(max_samples_per_request=MAX_SAMPLES)
KEYS = [f"cat_{f}" for f in range(len(SMALL_TABLE_SIZES))]
SAMPLE = ([0.25 * i - 1.5 for i in range(13)], [[1], [2], [3]])
VALID = make_request([SAMPLE], one_sample=True)


# --- the server -------------------------------------------------------------------------------

torchserve = torchserve_fixture(mars={"dlrm": CONFIG}, models={"dlrm": {}}, properties=LIMITS)


@pytest.fixture(scope="module")
def worker_pid(torchserve: TorchServe) -> int:
    """The worker's pid before any hostile body: it must be the same after all of them."""
    return torchserve.workers("dlrm")[0]["pid"]


def post(server: TorchServe, body: Any, content_type: str = "application/json") -> requests.Response:
    data = body if isinstance(body, (bytes, types.GeneratorType)) else json.dumps(body).encode()
    headers = {"Content-Type": content_type} if content_type else {}
    return requests.post(f"{server.inference}/predictions/dlrm", data=data, headers=headers, timeout=REQUEST_TIMEOUT_S)


# --- the corpus -------------------------------------------------------------------------------


def raw(**fields: Any) -> bytes:
    """VALID with some fields replaced (``__`` for ``.`` in the key), as JSON text."""
    return json.dumps({**VALID, **{k.replace("__", "."): v for k, v in fields.items()}}).encode()


def text_with(key: str, literal: str) -> bytes:
    """VALID with ``key``'s value written as the JSON text ``literal`` (what json.dumps
    cannot write: NaN, 1e400, integers orjson reads as floats)."""
    body = {k: v for k, v in VALID.items() if k != key}
    return json.dumps(body)[:-1].encode() + f', "{key}": {literal}}}'.encode()


def duplicated(key: str, spelled: str, copy: Any) -> bytes:
    """VALID with ``key`` given a second time, spelled ``spelled`` (JSON escapes allowed)."""
    return json.dumps(VALID)[:-1].encode() + f', "{spelled}": {json.dumps(copy)}}}'.encode()


DENSE = VALID["float_features"]
TOO_MANY = make_request([SAMPLE] * (MAX_SAMPLES + 1))
DEEP = 100_000
# (case, body, Content-Type, HTTP status, the field the message must start with)
CORPUS: List[Tuple[str, bytes, str, int, str]] = [
    ("empty_body", b"", "application/json", 400, "request body"),
    ("form_field", b"float_features=1", "application/json", 400, "request body"),
    ("truncated", raw()[:-7], "application/json", 400, "request body"),
    ("not_utf8", b"\xff\xfe{}", "application/json", 400, "request body"),
    ("lone_surrogate", b'{"float_features": "\\ud800"}', "application/json", 400, "request body"),
    ("null", b"null", "application/json", 400, "request body"),
    ("array", b"[1, 2, 3]", "application/json", 400, "request body"),
    ("string", b'"float_features"', "application/json", 400, "request body"),
    ("number", b"42", "application/json", 400, "request body"),
    ("nested_lists_100k", b"[" * DEEP + b"]" * DEEP, "application/json", 400, "request body"),
    ("nested_objects_100k", b'{"a":' * DEEP + b"1" + b"}" * DEEP, "application/json", 400, "request body"),
    ("deep_inside_a_field", raw()[:-1] + b', "x": ' + b"[" * DEEP + b"]" * DEEP + b"}", "application/json", 400,
     "request body"),
    ("nan_literal", text_with("float_features", "[NaN" + ", 0.5" * 12 + "]"), "application/json", 400, "request body"),
    ("infinity_literal", text_with("float_features", "[Infinity" + ", 0.5" * 12 + "]"), "application/json", 400,
     "request body"),
    ("beyond_float64", text_with("float_features", "[1e400" + ", 0.5" * 12 + "]"), "application/json", 400,
     "request body"),
    ("beyond_float32", raw(float_features=DENSE[:5] + [3.5e38] + DENSE[6:]), "application/json", 400,
     "float_features[5]"),
    ("beyond_float32_negative", raw(float_features=[-1e39] + DENSE[1:]), "application/json", 400, "float_features[0]"),
    ("missing_float_features", json.dumps({k: v for k, v in VALID.items() if k != "float_features"}).encode(),
     "application/json", 400, "float_features"),
    ("missing_lengths", json.dumps({k: v for k, v in VALID.items() if k != "id_list_features.lengths"}).encode(),
     "application/json", 400, "id_list_features.lengths"),
    ("missing_values", json.dumps({k: v for k, v in VALID.items() if k != "id_list_features.values"}).encode(),
     "application/json", 400, "id_list_features.values"),
    ("duplicate_key", duplicated("float_features", "float_features", DENSE), "application/json", 400,
     "float_features"),
    ("duplicate_key_escaped", duplicated("id_list_features.values", "id_list_features\\u002evalues", [4, 5, 6]),
     "application/json", 400, "id_list_features.values"),
    ("duplicate_key_nested", raw()[:-1] + b', "x": {"a": 1, "a": 2}}', "application/json", 400, "request body"),
    ("dense_empty", raw(float_features=[]), "application/json", 400, "float_features"),
    ("dense_12_numbers", raw(float_features=DENSE[:12]), "application/json", 400, "float_features"),
    ("dense_14_numbers", raw(float_features=DENSE + [0.5]), "application/json", 400, "float_features"),
    ("dense_a_string", raw(float_features="0.5"), "application/json", 400, "float_features"),
    ("dense_string_number", raw(float_features=["0.5"] + DENSE[1:]), "application/json", 400, "float_features[0]"),
    ("dense_boolean", raw(float_features=DENSE[:12] + [True]), "application/json", 400, "float_features[12]"),
    ("dense_null", raw(float_features=DENSE[:3] + [None] + DENSE[4:]), "application/json", 400, "float_features[3]"),
    ("dense_object", raw(float_features={"0": 0.5}), "application/json", 400, "float_features"),
    ("dense_ragged_samples", raw(float_features=[DENSE, DENSE[:12]], id_list_features__lengths=[1] * 6,
                                 id_list_features__values=[1, 2, 3] * 2), "application/json", 400, "float_features[1]"),
    ("too_many_samples", json.dumps(TOO_MANY).encode(), "application/json", 413, "float_features"),
    ("lengths_negative", raw(id_list_features__lengths=[1, 3, -1]), "application/json", 400,
     "id_list_features.lengths[2]"),
    ("lengths_float", raw(id_list_features__lengths=[1.0, 1, 1]), "application/json", 400,
     "id_list_features.lengths[0]"),
    ("lengths_too_few", raw(id_list_features__lengths=[1, 1]), "application/json", 400, "id_list_features.lengths"),
    ("lengths_beyond_int64", raw(id_list_features__lengths=[2**63, 1, 1]), "application/json", 400,
     "id_list_features.lengths[0]"),
    ("lengths_an_object", raw(id_list_features__lengths={}), "application/json", 400, "id_list_features.lengths"),
    ("lengths_not_summing_to_values", raw(id_list_features__lengths=[1, 2, 1]), "application/json", 400,
     "id_list_features.values"),
    ("id_negative", raw(id_list_features__values=[1, -2, 3]), "application/json", 400, "id_list_features.values[1]"),
    ("id_of_table_size", raw(id_list_features__values=[1, 2, 5000]), "application/json", 400,
     "id_list_features.values[2]"),
    ("id_2_63", raw(id_list_features__values=[2**63, 2, 3]), "application/json", 400, "id_list_features.values[0]"),
    ("id_2_64", text_with("id_list_features.values", f"[{2**64}, 2, 3]"), "application/json", 400,
     "id_list_features.values[0]"),
    ("id_10_30", text_with("id_list_features.values", f"[1, {10**30}, 3]"), "application/json", 400,
     "id_list_features.values[1]"),
    ("id_float", raw(id_list_features__values=[1, 2.5, 3]), "application/json", 400, "id_list_features.values[1]"),
    ("id_string", raw(id_list_features__values=[1, 2, "3"]), "application/json", 400, "id_list_features.values[2]"),
    ("id_boolean", raw(id_list_features__values=[True, 2, 3]), "application/json", 400, "id_list_features.values[0]"),
    ("values_a_string", raw(id_list_features__values="oops"), "application/json", 400, "id_list_features.values"),
    ("octet_stream_bad", raw(float_features=DENSE[:12]), "application/octet-stream", 400, "float_features"),
    ("text_plain_bad", raw(id_list_features__values=[1, 2, -3]), "text/plain", 400, "id_list_features.values[2]"),
    ("no_content_type_bad", b"{", "", 400, "request body"),
    ("posted_as_a_form", json.dumps(VALID).encode(), "application/x-www-form-urlencoded", 400, "float_features"),
]  # fmt: skip


def test_corpus_is_at_least_30_distinct_bodies() -> None:
    assert len({(body, content_type) for _, body, content_type, _, _ in CORPUS}) == len(CORPUS) >= 30


@pytest.mark.parametrize("body, content_type, status, field", [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS])
def test_hostile_body_is_answered_4xx_with_a_json_error_naming_the_field(
    torchserve: TorchServe, worker_pid: int, body: bytes, content_type: str, status: int, field: str
) -> None:
    response = post(torchserve, body, content_type)
    assert response.status_code == status, response.text
    answer = response.json()
    assert answer["code"] == status and answer["type"] == "InvalidInput"
    assert answer["message"].startswith(f"{field}:"), answer["message"]
    assert "expected" in answer["message"]


# --- limits -----------------------------------------------------------------------------------


def test_config_properties_caps_the_body_size() -> None:
    """1024 samples (max_samples_per_request's default) of 13 numbers and 26 one-hot ids
    must fit; a body many times that must not."""
    full = make_request([([-1.2345678901234567] * 13, [[45833187]] * 26)] * 1024)
    assert len(json.dumps(full)) < MAX_REQUEST_SIZE <= 16 * 1024 * 1024


def test_body_over_max_request_size_is_a_413_from_torchserve(torchserve: TorchServe, worker_pid: int) -> None:
    """TorchServe 0.12 answers it before any worker sees it: status 413, an empty body."""
    response = post(torchserve, b" " * MAX_REQUEST_SIZE + b"{}")
    assert response.status_code == 413
    assert response.content == b""


def test_body_of_unknown_length_over_max_request_size_is_a_413_too(torchserve: TorchServe, worker_pid: int) -> None:
    """Chunked transfer (no Content-Length): TorchServe counts the bytes as they come."""
    chunks = (b" " * (1 << 20) for _ in range(MAX_REQUEST_SIZE // (1 << 20) + 1))
    response = post(torchserve, chunks)
    assert response.status_code == 413


def test_body_of_exactly_max_request_size_reaches_the_handler(torchserve: TorchServe, worker_pid: int) -> None:
    """The limit is inclusive: this body is JSON ({} after spaces), so the handler answers."""
    response = post(torchserve, b" " * (MAX_REQUEST_SIZE - 2) + b"{}")
    assert response.status_code == 400
    assert response.json()["message"].startswith("float_features: missing")


def test_too_many_samples_is_a_413_naming_the_limit(torchserve: TorchServe, worker_pid: int) -> None:
    response = post(torchserve, TOO_MANY)
    assert response.status_code == 413
    assert response.json() == {
        "code": 413,
        "type": "InvalidInput",
        "message": f"float_features: {MAX_SAMPLES + 1} samples in one request; expected at most "
        f"max_samples_per_request = {MAX_SAMPLES} (split the request)",
    }


def test_valid_body_is_scored_alike_whatever_its_content_type(torchserve: TorchServe, worker_pid: int) -> None:
    expected = direct_scores(DLRMFactory(CONFIG), KEYS, [SAMPLE])[0]
    for content_type in ("application/json", "application/octet-stream", "text/plain", ""):
        response = post(torchserve, VALID, content_type)
        assert response.status_code == 200, (content_type, response.text)
        assert response.json()["score"] == pytest.approx(expected, rel=0, abs=1e-7)


def test_worker_survived_every_hostile_body(torchserve: TorchServe, worker_pid: int) -> None:
    """Runs last in this file: the worker that answered the corpus is the one that started."""
    assert torchserve.workers("dlrm")[0]["pid"] == worker_pid
    assert post(torchserve, VALID).status_code == 200
