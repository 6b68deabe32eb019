"""The handler's fast path (``parse_plain_request``) against the request contract
(``parse_request``): for any request it either declines (None) or gives exactly what
``parse_request`` gives; it takes the common valid requests; a batch parsed through it
(``parse_request_lists`` + ``stack_requests``) equals the per-request tensors concatenated.

Requests are drawn by request_strategies.py (shared with test_parser_properties.py).
Symbols: B samples, N = 13 dense features, F = 3 sparse features (tables of 10, 20 and 5
rows, so that drawn ids now and then fall outside them), L ids.
"""

import json
import math
from typing import Any, Dict, List

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dlrm_request import parse_plain_request, parse_request, parse_request_lists, stack_requests
from request_strategies import CONFIGS, MAX_SAMPLES, PROPERTY_SETTINGS, F, N, near_valid_requests

SETTINGS = settings(PROPERTY_SETTINGS, max_examples=1000)


def contract(request: Any, cfg: Dict[str, Any]) -> Any:
    """``parse_request``'s answer: its tensors, or None for an InvalidInput error."""
    try:
        return parse_request(request, cfg)
    except ValueError:
        return None


@SETTINGS
@given(request=near_valid_requests(), policy=st.sampled_from(list(CONFIGS)))
def test_fast_path_declines_or_gives_exactly_what_parse_request_gives(request: Dict[str, Any], policy: str) -> None:
    cfg = CONFIGS[policy]
    fast = parse_plain_request(request, cfg)
    expected = contract(request, cfg)
    if fast is None:
        return
    assert expected is not None, f"fast path accepted a request parse_request refuses: {request}"
    dense, lengths, values = stack_requests([fast], cfg)
    assert (dense.dtype, lengths.dtype, values.dtype) == (torch.float32, torch.int64, torch.int64)
    assert torch.equal(dense, expected[0]) and torch.equal(lengths, expected[1]) and torch.equal(values, expected[2])
    assert (fast[3], fast[4]) == (expected[0].shape[0], expected[3])


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


def test_hash_policy_takes_ids_mod_their_table_size_on_the_fast_path() -> None:
    request = {"float_features": [0.5] * N, "id_list_features.lengths": [1, 2, 1],
               "id_list_features.values": [10, 25, 2**62, 7]}  # fmt: skip
    fast = parse_plain_request(request, CONFIGS["hash"])
    assert fast is not None and fast[2] == [0, 5, 2**62 % 20, 2]
    assert parse_plain_request(request, CONFIGS["error"]) is None  # 10 >= 10 rows: parse_request's 400


@pytest.mark.parametrize("request_", [
    {"float_features": [0.5] * 12, "id_list_features.lengths": [1, 1, 1], "id_list_features.values": [1, 2, 3]},
    {"float_features": [0.5] * 12 + [True], "id_list_features.lengths": [1, 1, 1], "id_list_features.values": [1, 2, 3]},
    {"float_features": [0.5] * 12 + [math.nan], "id_list_features.lengths": [1, 1, 1], "id_list_features.values": [1, 2, 3]},
    {"float_features": [0.5] * 12 + [1e39], "id_list_features.lengths": [1, 1, 1], "id_list_features.values": [1, 2, 3]},
    {"float_features": [0.5] * 12 + [10**400], "id_list_features.lengths": [1, 1, 1], "id_list_features.values": [1, 2, 3]},
    {"float_features": [[0.5] * N] * (MAX_SAMPLES + 1), "id_list_features.lengths": [1, 1, 1] * (MAX_SAMPLES + 1),
     "id_list_features.values": [1, 2, 3] * (MAX_SAMPLES + 1)},
    {"float_features": [0.5] * N, "id_list_features.lengths": [1, -1, 3], "id_list_features.values": [1, 2, 3]},
    {"float_features": [0.5] * N, "id_list_features.lengths": [1, 1, 1], "id_list_features.values": [1, 2]},
    {"float_features": [0.5] * N, "id_list_features.lengths": [1, 1, 1], "id_list_features.values": [1, 2, 5]},
    {"float_features": [0.5] * N, "id_list_features.lengths": [1, 1, 1], "id_list_features.values": [1.0, 2, 3]},
    {"float_features": [0.5] * N, "id_list_features.lengths": [1, 1, 1], "id_list_features.values": [-1, 2, 3]},
    {"float_features": [0.5] * N, "id_list_features.lengths": [1, 1, 1]},
    [1, 2, 3],
], ids=["12_numbers", "bool", "nan", "beyond_float32", "beyond_float64", "too_many_samples", "negative_length",
        "too_few_ids", "id_of_table_size", "float_id", "negative_id", "missing_key", "not_an_object"])  # fmt: skip
def test_fast_path_leaves_every_bad_request_to_parse_request(request_: Any) -> None:
    assert parse_plain_request(request_, CONFIGS["error"]) is None
    assert contract(request_, CONFIGS["error"]) is None


def test_batch_through_the_fast_path_equals_the_requests_parsed_alone_and_concatenated() -> None:
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
    parsed = [parse_request_lists(body, cfg) for body in bodies]
    dense_t, lengths_t, values_t = stack_requests(parsed, cfg)
    alone = [parse_request(body, cfg) for body in bodies]
    assert dense_t.shape == (4, N) and lengths_t.shape == (4, F)
    assert torch.equal(dense_t, torch.cat([a[0] for a in alone]))
    assert torch.equal(lengths_t, torch.cat([a[1] for a in alone]))
    assert torch.equal(values_t, torch.cat([a[2] for a in alone]))
    assert [(p[3], p[4]) for p in parsed] == [(1, True), (2, False), (1, False)]


def test_empty_batch_stacks_to_empty_tensors_of_the_right_width() -> None:
    dense, lengths, values = stack_requests([], CONFIGS["error"])
    assert (dense.shape, lengths.shape, values.shape) == ((0, N), (0, F), (0,))
