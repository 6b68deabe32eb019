"""The handler's batch path (``parse_batch``: the JSON fast path ``parse_plain_request``,
values checked for the whole batch at once) against the request contract
(``parse_request``): every request of a batch gets exactly what ``parse_request`` gives it
alone - the same tensors, or the same error (message and status) - and the batch's tensors
are the good requests' tensors concatenated. The fast path takes the common valid requests.

Requests are drawn by request_strategies.py (shared with test_parser_properties.py).
Symbols: B samples, N = 13 dense features, F = 3 sparse features (tables of 10, 20 and 5
rows, so that drawn ids now and then fall outside them), L ids.
"""

import json
import math
from typing import Any, Dict, List, Tuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dlrm_request import parse_batch, parse_plain_request, parse_request
from request_strategies import CONFIGS, MAX_SAMPLES, PROPERTY_SETTINGS, F, N, near_valid_requests

SETTINGS = settings(PROPERTY_SETTINGS, max_examples=1000)


def contract(request: Any, cfg: Dict[str, Any]) -> Any:
    """``parse_request``'s answer: its tensors, or (HTTP status, message) of its error."""
    try:
        return parse_request(request, cfg)
    except ValueError as error:
        return error.http_status, str(error)


def batch_outcomes(requests: List[Any], cfg: Dict[str, Any]) -> Tuple[List[Any], Tuple[torch.Tensor, ...]]:
    """``parse_batch`` of JSON requests: each request's (samples, one_sample) or (HTTP
    status, message), and the batch's tensors."""
    plan, dense, lengths, values = parse_batch([(request, None) for request in requests], cfg)
    outcomes = [(item.http_status, str(item)) if isinstance(item, ValueError) else item[:2] for item in plan]
    return outcomes, (dense, lengths, values)


def assert_batch_agrees_with_parse_request(requests: List[Any], cfg: Dict[str, Any]) -> None:
    outcomes, tensors = batch_outcomes(requests, cfg)
    alone = [contract(request, cfg) for request in requests]
    good = [a for a in alone if not isinstance(a[0], int)]
    assert outcomes == [a if isinstance(a[0], int) else (a[0].shape[0], a[3]) for a in alone]
    assert (tensors[0].dtype, tensors[1].dtype, tensors[2].dtype) == (torch.float32, torch.int64, torch.int64)
    for got, field in zip(tensors, range(3)):
        expected = torch.cat([a[field] for a in good]) if good else got[:0]
        assert torch.equal(got, expected), (requests, field)


@SETTINGS
@given(request=near_valid_requests(), policy=st.sampled_from(list(CONFIGS)))
def test_a_request_alone_gets_exactly_what_parse_request_gives(request: Dict[str, Any], policy: str) -> None:
    assert_batch_agrees_with_parse_request([request], CONFIGS[policy])


@settings(PROPERTY_SETTINGS, max_examples=100)  # batches of 2-5 requests: 100 draw ~350 requests
@given(requests=st.lists(near_valid_requests(), min_size=2, max_size=5), policy=st.sampled_from(list(CONFIGS)))
def test_each_request_of_a_batch_gets_what_it_gets_alone(requests: List[Dict[str, Any]], policy: str) -> None:
    """Bad neighbours (which fail the batch's one values check) change nothing for the others."""
    assert_batch_agrees_with_parse_request(requests, CONFIGS[policy])


@pytest.mark.parametrize("policy", list(CONFIGS))
def test_fast_path_takes_the_common_valid_requests(policy: str) -> None:
    """One-hot and multi-hot, one sample and several, ints and floats: none of these needs
    the slow path (else the fast path would be dead code)."""
    cfg = CONFIGS[policy]
    dense = [0.25 * i - 1.5 for i in range(N)]
    requests = [
        {"float_features": dense, "id_list_features.lengths": [1, 1, 1], "id_list_features.values": [9, 19, 4]},
        {"float_features": [dense, [1] * N], "id_list_features.lengths": [1, 0, 2, 3, 1, 1],
         "id_list_features.values": [7, 4, 3, 0, 1, 2, 19, 0]},
        {"float_features": [[3.4e38] * N], "id_list_features.lengths": [0, 0, 0], "id_list_features.values": []},
    ]  # fmt: skip
    for request in requests:
        assert parse_plain_request(request, cfg) is not None, request


def test_hash_policy_takes_ids_mod_their_table_size() -> None:
    request = {"float_features": [0.5] * N, "id_list_features.lengths": [1, 2, 1],
               "id_list_features.values": [10, 25, 2**62, 7]}  # fmt: skip
    assert parse_plain_request(request, CONFIGS["hash"]) is not None
    plan, _, _, values = parse_batch([(request, None)], CONFIGS["hash"])
    assert plan == [(1, True, None)] and values.tolist() == [0, 5, 2**62 % 20, 2]
    plan, _, _, values = parse_batch([(request, None)], CONFIGS["error"])  # 10 >= 10 rows
    assert str(plan[0]).startswith("id_list_features.values[0]: got 10 for feature cat_0") and values.numel() == 0


@pytest.mark.parametrize("request_", [
    {"float_features": [0.5] * 12, "id_list_features.lengths": [1, 1, 1], "id_list_features.values": [1, 2, 3]},
    {"float_features": [0.5] * 12 + [True], "id_list_features.lengths": [1, 1, 1], "id_list_features.values": [1, 2, 3]},
    {"float_features": [0.5] * 12 + [10**400], "id_list_features.lengths": [1, 1, 1], "id_list_features.values": [1, 2, 3]},
    {"float_features": [[0.5] * N] * (MAX_SAMPLES + 1), "id_list_features.lengths": [1, 1, 1] * (MAX_SAMPLES + 1),
     "id_list_features.values": [1, 2, 3] * (MAX_SAMPLES + 1)},
    {"float_features": [0.5] * N, "id_list_features.lengths": [1, -1, 3], "id_list_features.values": [1, 2, 3]},
    {"float_features": [0.5] * N, "id_list_features.lengths": [1, 1, 1], "id_list_features.values": [1, 2]},
    {"float_features": [0.5] * N, "id_list_features.lengths": [1, 1, 1], "id_list_features.values": [1.0, 2, 3]},
    {"float_features": [0.5] * N, "id_list_features.lengths": [1, 1, 1], "id_list_features.values": [2**64, 2, 3]},
    {"float_features": [0.5] * N, "id_list_features.lengths": [1, 1, 1]},
    [1, 2, 3],
], ids=["12_numbers", "bool", "beyond_float64", "too_many_samples", "negative_length", "too_few_ids", "float_id",
        "id_beyond_int64", "missing_key", "not_an_object"])  # fmt: skip
def test_fast_path_leaves_every_structural_error_to_parse_request(request_: Any) -> None:
    assert parse_plain_request(request_, CONFIGS["error"]) is None
    assert isinstance(contract(request_, CONFIGS["error"])[0], int)


@pytest.mark.parametrize("request_, message", [
    ({"float_features": [0.5] * 12 + [math.nan], "id_list_features.lengths": [1, 1, 1], "id_list_features.values": [1, 2, 3]},
     "float_features[12]: got the float nan; expected a finite number"),
    ({"float_features": [0.5] * 12 + [1e39], "id_list_features.lengths": [1, 1, 1], "id_list_features.values": [1, 2, 3]},
     "float_features[12]: got the float 1e+39; expected a finite number within float32"),
    ({"float_features": [0.5] * N, "id_list_features.lengths": [1, 1, 1], "id_list_features.values": [1, 2, 5]},
     "id_list_features.values[2]: got 5 for feature cat_2 of sample 0; expected an integer in [0, 5)"),
    ({"float_features": [0.5] * N, "id_list_features.lengths": [1, 1, 1], "id_list_features.values": [-1, 2, 3]},
     "id_list_features.values[0]: got -1 for feature cat_0 of sample 0; expected an integer in [0, 10)"),
], ids=["nan", "beyond_float32", "id_of_table_size", "negative_id"])  # fmt: skip
def test_a_bad_value_in_a_batch_gets_parse_requests_words_and_spares_its_neighbours(request_: Any, message: str) -> None:
    good = {"float_features": [0.5] * N, "id_list_features.lengths": [1, 1, 1], "id_list_features.values": [1, 2, 3]}
    plan, dense, _, values = parse_batch([(good, None), (request_, None), (good, None)], CONFIGS["error"])
    assert plan[0] == plan[2] == (1, True, None)
    assert str(plan[1]).startswith(message) and plan[1].http_status == 400
    assert dense.shape == (2, N) and values.tolist() == [1, 2, 3, 1, 2, 3]


def test_batch_of_fast_path_json_text_and_slow_path_requests_equals_each_parsed_alone() -> None:
    """A batch mixing fast-path requests, slow-path ones (an extra key) and JSON text."""
    dense = [0.1 * i for i in range(N)]
    bodies: List[Any] = [
        {"float_features": dense, "id_list_features.lengths": [1, 1, 1], "id_list_features.values": [1, 2, 3]},
        {"float_features": [dense, [-x for x in dense]], "id_list_features.lengths": [2, 0, 1, 1, 1, 1],
         "id_list_features.values": [9, 8, 4, 0, 19, 3], "note": "an extra key: parse_request's path"},
        json.dumps({"float_features": [[1.5] * N], "id_list_features.lengths": [0, 3, 1],
                    "id_list_features.values": [5, 6, 7, 0]}).encode(),
    ]  # fmt: skip
    cfg = CONFIGS["error"]
    assert [parse_plain_request(b, cfg) is None for b in bodies[:2]] == [False, True]
    outcomes, (dense_t, lengths_t, _) = batch_outcomes(bodies, cfg)
    assert dense_t.shape == (4, N) and lengths_t.shape == (4, F)
    assert outcomes == [(1, True), (2, False), (1, False)]
    assert_batch_agrees_with_parse_request(bodies, cfg)


def test_empty_batch_and_all_bad_batch_give_empty_tensors_of_the_right_width() -> None:
    for requests in ([], [(b"{}", None), (b"[1]", None)]):
        plan, dense, lengths, values = parse_batch(requests, CONFIGS["error"])
        assert (dense.shape, lengths.shape, values.shape) == ((0, N), (0, F), (0,))
        assert all(isinstance(item, ValueError) for item in plan) and len(plan) == len(requests)
