"""The handler's fast path (``parse_plain_request``) against the request contract
(``parse_request``): for any request it either declines (None) or gives exactly what
``parse_request`` gives; it takes the common valid requests; a batch parsed through it
(``parse_request_lists`` + ``stack_requests``) equals the per-request tensors concatenated.

Symbols: B samples, N = 13 dense features, F = 3 sparse features (tables of 10, 20 and 5
rows, so that drawn ids often fall outside them), L ids.
"""

import json
import math
from typing import Any, Dict, List

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlrm_request import REQUEST_KEYS, parse_plain_request, parse_request, parse_request_lists, stack_requests
from test_parser_properties import CONFIGS, MAX_SAMPLES, TABLE_SIZES, F, N  # the same small configs

SETTINGS = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=1000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Values at the edges of every rule: floats beyond float32, ints beyond int64 and float64,
# booleans, strings, NaN, infinities, lists where numbers belong.
edge_values = st.one_of(
    st.sampled_from([True, False, None, "1", [], [1], {}, 3.5e38, -3.4028235e38, 1e39, 2**63, 2**64,
                     -(2**63) - 1, 10**400, math.nan, math.inf, -math.inf, -1, 0, 1.0, -0.0]),
    st.integers(),
    st.floats(),
)  # fmt: skip


@st.composite
def requests_near_valid(draw: st.DrawFn) -> Dict[str, Any]:
    """A request of 1 to MAX_SAMPLES + 1 samples, ids up to one past their table's end; now
    and then one element, one field or one key replaced, dropped or added."""
    num_samples = draw(st.integers(1, MAX_SAMPLES + 1))
    one_sample = num_samples == 1 and draw(st.booleans())
    numbers = st.one_of(st.floats(-10, 10), st.integers(-10, 10))
    rows = [draw(st.lists(numbers, min_size=N, max_size=N)) for _ in range(num_samples)]
    lengths = draw(st.lists(st.integers(0, 3), min_size=num_samples * F, max_size=num_samples * F))
    ids = [draw(st.integers(0, TABLE_SIZES[cell % F])) for cell, n in enumerate(lengths) for _ in range(n)]
    request: Dict[str, Any] = {
        "float_features": rows[0] if one_sample else rows,
        "id_list_features.lengths": lengths,
        "id_list_features.values": ids,
    }
    if draw(st.integers(0, 2)) == 0:  # one element of one list
        target = draw(st.sampled_from([rows[0], rows[-1], lengths] + ([ids] if ids else [])))
        target[draw(st.integers(0, len(target) - 1))] = draw(edge_values)
    if draw(st.integers(0, 5)) == 0:  # one row of the wrong length or type
        if not one_sample:
            rows[draw(st.integers(0, num_samples - 1))] = draw(st.one_of(edge_values, st.lists(numbers, max_size=N + 1)))
    if draw(st.integers(0, 5)) == 0:  # one field replaced
        request[draw(st.sampled_from(REQUEST_KEYS))] = draw(st.one_of(edge_values, st.lists(edge_values, max_size=4)))
    if draw(st.integers(0, 7)) == 0:
        del request[draw(st.sampled_from(REQUEST_KEYS))]
    if draw(st.integers(0, 7)) == 0:
        request[draw(st.text(max_size=3))] = 0
    return request


def contract(request: Any, cfg: Dict[str, Any]) -> Any:
    """``parse_request``'s answer: its tensors, or None for an InvalidInput error."""
    try:
        return parse_request(request, cfg)
    except ValueError:
        return None


@SETTINGS
@given(request=requests_near_valid(), policy=st.sampled_from(list(CONFIGS)))
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
