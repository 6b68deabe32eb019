"""``parse_request`` under any input (SPEC §4), by hypothesis: whatever the body - any JSON
value, its JSON text, any string or byte string - the answer is either a valid sample batch,
consistent with the config, or the InvalidInput ``ValueError`` (400, or 413 for too many
samples) whose message starts with the field it is about. Never another exception.
The same for the binary parser (SPEC §8, ``parse_binary_request``): any mutation of a
binary body (bytes spliced in, cut out or flipped, another header length, a header field
replaced by any JSON value), and any arrays sent as binary get exactly what the same arrays
get as JSON (the same tensors, or the same error message).

Deterministic and bounded for CI (``PROPERTY_SETTINGS``: the same 300 examples every run).

Requests are drawn by request_strategies.py (shared with test_fast_parse.py). Symbols: B
samples, N = 13 dense features, F = 3 sparse features (tables of 10, 20 and 5 rows), L ids.
"""

import json
import math
import re
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dlrm_request import (
    BINARY_HEADER,
    REQUEST_KEYS,
    binary_request_body,
    parse_batch,
    parse_binary_request,
    parse_request,
)
from request_strategies import (
    CONFIGS,
    MAX_SAMPLES,
    PROPERTY_SETTINGS,
    TABLE_SIZES,
    F,
    N,
    json_values,
    near_valid_requests,
)

# What an error message starts with: a request key or "request body", then an optional
# index ([i] or [b][i]), then ":".
FIELD = re.compile(r"^(?:" + "|".join(map(re.escape, REQUEST_KEYS + ("request body",))) + r")(?:\[\d+\]){0,2}: ")
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """parse_request's tensors are tiny: on a busy 2-core machine, torch's intra-op threads
    only wait for each other (10x slower). One thread for this module, restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def encode(value: Any) -> Optional[bytes]:
    """``value`` as JSON text, or None when JSON cannot hold it (NaN, infinities)."""
    try:
        return json.dumps(value, allow_nan=False).encode()
    except ValueError:
        return None


# --- the property -------------------------------------------------------------------------


def check(body: Any, cfg: Dict[str, Any]) -> Optional[tuple]:
    """``parse_request(body, cfg)``: a batch consistent with ``cfg`` (returned), or the
    InvalidInput ValueError (None). Any other exception fails the test."""
    try:
        dense, lengths, values, one_sample = parse_request(body, cfg)
    except ValueError as error:
        status = getattr(error, "http_status", None)
        assert status in (400, 413), f"{error!r} carries http_status {status}"
        assert FIELD.match(str(error)), f"message does not start with a field: {error}"
        assert "expected" in str(error)
        if status == 413:
            assert str(error).startswith("float_features: ")
        return None
    num_samples = dense.shape[0]
    assert 1 <= num_samples <= cfg["max_samples_per_request"]
    assert dense.shape == (num_samples, N) and dense.dtype == torch.float32
    assert bool(torch.isfinite(dense).all()) and float(dense.abs().max()) <= FLOAT32_MAX
    assert lengths.shape == (num_samples, F) and lengths.dtype == torch.int64
    assert bool((lengths >= 0).all())
    assert values.dtype == torch.int64 and values.shape == (int(lengths.sum()),)
    feature = torch.arange(num_samples * F).repeat_interleave(lengths.reshape(-1)) % F
    assert bool((values >= 0).all()) and bool((values < torch.tensor(TABLE_SIZES)[feature]).all())
    assert one_sample is False or num_samples == 1
    return dense, lengths, values, one_sample


@PROPERTY_SETTINGS
@given(value=json_values, policy=st.sampled_from(list(CONFIGS)))
def test_any_json_value_is_a_batch_or_invalid_input(value: Any, policy: str) -> None:
    check(value, CONFIGS[policy])


@PROPERTY_SETTINGS
@given(request=near_valid_requests(), policy=st.sampled_from(list(CONFIGS)))
def test_near_valid_request_parsed_or_as_json_text_gets_the_same_answer(request: Dict[str, Any], policy: str) -> None:
    """The dict TorchServe hands over for application/json and the raw body the shipped
    config.properties hands over (decode_input_request=false) give the same batch, or both
    an InvalidInput error. (A request holding NaN or an infinity has no JSON text: skipped.)"""
    cfg = CONFIGS[policy]
    parsed = check(request, cfg)
    text = encode(request)
    if text is None:
        return
    from_text = check(text, cfg)
    assert (parsed is None) == (from_text is None), (request, parsed, from_text)
    if parsed is not None:
        for a, b in zip(parsed[:3], from_text[:3]):
            assert torch.equal(a, b)
        assert parsed[3] == from_text[3]


def test_near_valid_strategy_reaches_valid_batches_and_every_field_error() -> None:
    """The strategy is not vacuous: its fixed draw holds valid batches, 413s and an error for
    each field."""
    outcomes = set()

    @PROPERTY_SETTINGS
    @given(request=near_valid_requests())
    def collect(request: Dict[str, Any]) -> None:
        try:
            parse_request(request, CONFIGS["error"])
            outcomes.add("valid")
        except ValueError as error:
            outcomes.add(413 if error.http_status == 413 else re.match(r"[^\[:]+", str(error)).group())

    collect()
    assert {"valid", 413, *REQUEST_KEYS} <= outcomes, outcomes


@PROPERTY_SETTINGS
@given(policy=st.sampled_from(list(CONFIGS)), body=st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200),
    st.builds(lambda r: json.dumps(r), near_valid_requests()),
    # JSON text with a few bytes spliced in somewhere
    st.builds(lambda r, at, junk: (lambda t: t[: at % (len(t) + 1)] + junk + t[at % (len(t) + 1):])(json.dumps(r).encode()),
              near_valid_requests(), st.integers(min_value=0), st.binary(min_size=1, max_size=4)),
    # a request with one of its keys given twice
    st.builds(lambda r, key, v: json.dumps(r)[:-1].encode() + f', "{key}": {json.dumps(v)}}}'.encode(),
              near_valid_requests(), st.sampled_from(REQUEST_KEYS), json_values),
))  # fmt: skip
def test_any_bytes_or_text_is_a_batch_or_invalid_input(policy: str, body: Any) -> None:
    check(body, CONFIGS[policy])
    if isinstance(body, bytes):
        check(bytearray(body), CONFIGS[policy])


@PROPERTY_SETTINGS
@given(request=near_valid_requests(junk=False), data=st.data())
def test_a_key_given_twice_is_refused_naming_the_key(request: Dict[str, Any], data: st.DataObject) -> None:
    """orjson and json keep the last copy silently; the handler refuses the body, whatever
    the copies hold and however the key is spelled (JSON escapes)."""
    key = data.draw(st.sampled_from(REQUEST_KEYS))
    spelled = data.draw(st.sampled_from([key, key.replace("_", "\\u005f"), key.replace("f", "\\u0066")]))
    copy = json.dumps(data.draw(st.one_of(json_values, st.just(request[key]))))
    text = json.dumps(request)
    at = data.draw(st.sampled_from(["first", "last"]))
    body = "{" + f'"{spelled}": {copy}, ' + text[1:] if at == "first" else text[:-1] + f', "{spelled}": {copy}}}'
    if "NaN" in body or "Infinity" in body:
        return  # not JSON for orjson: refused earlier, as not valid JSON
    with pytest.raises(ValueError, match=rf"^{re.escape(key)}: given 2 times in one JSON object; expected each key once"):
        parse_request(body.encode(), CONFIGS["error"])


@pytest.mark.parametrize("depth", [2_000, 100_000])
@pytest.mark.parametrize("opening, closing", [("[", "]"), ('{"a":', "}")], ids=["lists", "objects"])
def test_deep_nesting_is_a_400_not_a_recursion_error(depth: int, opening: str, closing: str) -> None:
    body = opening * depth + "1" + closing * depth
    for encoded in (body, body.encode()):
        with pytest.raises(ValueError, match=r"^request body: ") as error:
            parse_request(encoded, CONFIGS["error"])
        assert error.value.http_status == 400


def test_deep_nesting_already_parsed_is_a_400() -> None:
    """TorchServe's own json.loads gives up on such a body (RecursionError) and forwards the
    bytes; a deep value built in Python is refused without walking it."""
    value: Any = 1
    for _ in range(100_000):
        value = [value]
    with pytest.raises(ValueError, match=r"^request body: got a list of 1 items"):
        parse_request(value, CONFIGS["error"])
    nested = {"float_features": value, "id_list_features.lengths": value, "id_list_features.values": value}
    with pytest.raises(ValueError, match=r"^float_features\[0\]: got a list of 1 items"):
        parse_request(nested, CONFIGS["error"])


@pytest.mark.parametrize("text, message", [
    ("18446744073709551616", r"values\[0\]: got the float 1.8446744073709552e\+19; expected a JSON integer within int64"),
    ("9223372036854775808", r"values\[0\]: got 9223372036854775808; expected an integer within int64"),
    ("-9223372036854775809", r"values\[0\]: got the float -9.223372036854776e\+18; expected a JSON integer within int64"),
    ("1" + "0" * 30, r"values\[0\]: got the float 1e\+30; expected a JSON integer within int64"),
    ("1" + "0" * 400, r"request body: not valid JSON \(number is infinity"),
], ids=["2^64", "2^63", "-2^63-1", "10^30", "10^400"])  # fmt: skip
def test_ids_beyond_int64_in_json_text_are_400s_naming_the_field(text: str, message: str) -> None:
    """orjson reads integers beyond 64 bits as floats: the message still says int64."""
    body = '{"float_features": [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5], '
    body += f'"id_list_features.lengths": [1, 0, 0], "id_list_features.values": [{text}]}}'
    with pytest.raises(ValueError, match=message) as error:
        parse_request(body.encode(), CONFIGS["error"])
    assert error.value.http_status == 400


@pytest.mark.parametrize("number", ["3.4028235e38", "-3.4028235e38", "1e-45"])
def test_dense_at_the_edges_of_float32_is_accepted(number: str) -> None:
    body = '{"float_features": [' + ", ".join([number] * N) + '], "id_list_features.lengths": [0, 0, 0], '
    body += '"id_list_features.values": []}'
    dense = parse_request(body.encode(), CONFIGS["error"])[0]
    assert math.isfinite(float(dense[0, 0])) and float(dense[0, 0]) == float(torch.tensor(float(number)).float())


@pytest.mark.parametrize("number", ["3.5e38", "-1e39", "1e308"])
def test_dense_beyond_float32_is_a_400_naming_the_field(number: str) -> None:
    body = '{"float_features": [0.5, ' + ", ".join([number] * (N - 1)) + '], "id_list_features.lengths": [0, 0, 0], '
    body += '"id_list_features.values": []}'
    with pytest.raises(ValueError, match=r"^float_features\[1\]: got the float .*; expected a finite number within float32"):
        parse_request(body.encode(), CONFIGS["error"])


# --- the binary parser (SPEC §8): the same contract for tensors -------------------------------

# What a binary error message starts with: a request key (with an index), "request body",
# the header, "inputs", "outputs" or "parameters".
BINARY_FIELD = re.compile(
    r"^(?:" + "|".join(map(re.escape, REQUEST_KEYS + ("request body", BINARY_HEADER, "inputs", "outputs", "parameters")))
    + r")(?:\[\d+\]){0,2}: "
)  # fmt: skip


def check_binary(body: bytes, header_length: Any, cfg: Dict[str, Any]) -> Optional[tuple]:
    """``parse_binary_request``: a batch consistent with ``cfg`` (as ``check`` asks of
    ``parse_request``), or the InvalidInput ValueError naming its field (None)."""
    try:
        dense, lengths, values, one_sample, answer = parse_binary_request(body, header_length, cfg)
    except ValueError as error:
        status = getattr(error, "http_status", None)
        assert status in (400, 413), f"{error!r} carries http_status {status}"
        assert BINARY_FIELD.match(str(error)), f"message does not start with a field: {error}"
        assert "expected" in str(error)
        return None
    assert one_sample is False and set(answer) == {"id", "outputs"}
    num_samples = dense.shape[0]
    assert 1 <= num_samples <= cfg["max_samples_per_request"] and dense.shape == (num_samples, N)
    assert dense.dtype == np.float32 and bool(np.isfinite(dense).all())
    assert lengths.shape == (num_samples, F) and lengths.dtype == np.int64 and bool((lengths >= 0).all())
    assert values.dtype == np.int64 and values.shape == (int(lengths.sum()),) and bool((values >= 0).all())
    if cfg["id_overflow"] == "error":
        feature = np.repeat(np.tile(np.arange(F), num_samples), lengths.reshape(-1))
        assert bool((values < np.asarray(TABLE_SIZES)[feature]).all())
    return dense, lengths, values


@st.composite
def tensor_requests(draw: st.DrawFn) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Arrays of a request with any values (NaN, infinities, negative or huge lengths and ids):
    dense float32 [B, N], lengths int64 [B, F], values int64 [L], L near the lengths' sum."""
    num_samples = draw(st.integers(min_value=1, max_value=MAX_SAMPLES + 1))
    dense = draw(st.lists(st.floats(width=32) | st.sampled_from([0.5, -1.0]), min_size=num_samples * N,
                          max_size=num_samples * N))  # fmt: skip
    small = st.integers(min_value=0, max_value=3)
    lengths = draw(st.lists(small | st.integers(-(2**63), 2**63 - 1), min_size=num_samples * F, max_size=num_samples * F))
    total = sum(max(0, n) for n in lengths) if max(lengths) < 64 else 4
    count = draw(st.sampled_from([total, total, max(0, total - 1), total + 1]))
    values = draw(st.lists(st.integers(0, 21) | st.integers(-(2**63), 2**63 - 1), min_size=count, max_size=count))
    return (np.asarray(dense, dtype=np.float32).reshape(num_samples, N), np.asarray(lengths, dtype=np.int64).reshape(num_samples, F),
            np.asarray(values, dtype=np.int64))  # fmt: skip


@PROPERTY_SETTINGS
@given(arrays=tensor_requests(), policy=st.sampled_from(list(CONFIGS)), int32=st.booleans())
def test_binary_request_gets_what_its_json_twin_gets(arrays: Tuple[np.ndarray, ...], policy: str, int32: bool) -> None:
    """The same arrays sent as binary and as a JSON object (TorchServe's parsed dict, NaN
    allowed) give the same tensors, or errors with the same message and status."""
    cfg = CONFIGS[policy]
    dense, lengths, values = arrays
    if int32 and lengths.size and values.size and max(abs(lengths).max(), abs(values).max()) < 2**31:
        lengths, values = lengths.astype(np.int32), values.astype(np.int32)
    as_json = {"float_features": dense.tolist(), "id_list_features.lengths": lengths.reshape(-1).tolist(),
               "id_list_features.values": values.tolist()}  # fmt: skip
    body, header_length = binary_request_body(dense, lengths, values)
    try:
        expected = parse_request(as_json, cfg)
    except ValueError as error:
        with pytest.raises(ValueError) as binary_error:
            parse_binary_request(body, header_length, cfg)
        assert (str(binary_error.value), binary_error.value.http_status) == (str(error), error.http_status)
        return
    plan, *tensors = parse_batch([(body, str(header_length))], cfg)
    assert plan[0][0] == expected[0].shape[0]
    for got, want in zip(tensors, expected[:3]):
        assert torch.equal(got, want)


def binary_body_of(request: Dict[str, Any]) -> Tuple[bytes, int]:
    """A near-valid JSON request as a binary body: its tensors when parse_request takes it,
    else arrays of whatever numbers it holds (a body still worth mutating)."""
    try:
        dense, lengths, values, _ = parse_request(request, CONFIGS["hash"])
        return binary_request_body(dense, lengths, values)
    except ValueError:
        return binary_request_body(np.zeros((1, N)), np.ones((1, F), dtype=np.int64), [1, 2, 3])


@PROPERTY_SETTINGS
@given(
    request=near_valid_requests(junk=False),
    policy=st.sampled_from(list(CONFIGS)),
    mutation=st.one_of(
        # bytes spliced in, or cut out, anywhere
        st.tuples(st.just("splice"), st.integers(min_value=0), st.binary(min_size=1, max_size=8)),
        st.tuples(st.just("cut"), st.integers(min_value=0), st.integers(min_value=1, max_value=16)),
        # a byte flipped in the header or the data
        st.tuples(st.just("flip"), st.integers(min_value=0), st.integers(min_value=1, max_value=255)),
        # another Inference-Header-Content-Length
        st.tuples(st.just("length"), st.integers(min_value=-3, max_value=3), st.sampled_from(["", " ", "x", "+", "-"])),
        # a field of the JSON header replaced by any JSON value
        st.tuples(st.just("field"), st.sampled_from(["name", "datatype", "shape", "parameters", "binary_data_size",
                                                      "inputs", "outputs", "id"]), json_values),
    ),
)  # fmt: skip
def test_any_mutated_binary_body_is_a_batch_or_invalid_input(request: Dict[str, Any], policy: str, mutation: tuple) -> None:
    body, header_length = binary_body_of(request)
    kind, a, b = mutation
    length: Any = header_length
    if kind == "splice":
        at = a % (len(body) + 1)
        body = body[:at] + b + body[at:]
    elif kind == "cut":
        at = a % len(body)
        body = body[:at] + body[at + b:]
    elif kind == "flip":
        at = a % len(body)
        body = body[:at] + bytes([body[at] ^ b]) + body[at + 1:]
    elif kind == "length":
        length = f"{b}{header_length + a}"
    else:
        header = json.loads(body[:header_length])
        target = header if a in ("inputs", "outputs", "id") else header["inputs"][len(a) % 3]
        if a == "binary_data_size":
            target["parameters"][a] = b
        else:
            target[a] = b
        text = json.dumps(header).encode()
        body, length = text + body[header_length:], len(text)
    check_binary(body, length, CONFIGS[policy])
    check_binary(bytearray(body), length, CONFIGS[policy])


def test_tensor_strategy_reaches_valid_batches_and_every_field_error() -> None:
    """The arrays strategy is not vacuous: its fixed draw holds valid batches, 413s and an
    error for each tensor."""
    outcomes = set()

    @PROPERTY_SETTINGS
    @given(arrays=tensor_requests())
    def collect(arrays: Tuple[np.ndarray, ...]) -> None:
        body, header_length = binary_request_body(*arrays)
        try:
            parse_binary_request(body, header_length, CONFIGS["error"])
            outcomes.add("valid")
        except ValueError as error:
            outcomes.add(413 if error.http_status == 413 else re.match(r"[^\[:]+", str(error)).group())

    collect()
    assert {"valid", 413, *REQUEST_KEYS} <= outcomes, outcomes
