"""Binary requests (SPEC §8), without a server: the open inference protocol's binary data
extension parsed by ``dlrm_request.parse_binary_request`` / ``parse_batch``.

- the same samples as JSON and as binary (INT32 or INT64 ids) give identical tensors;
- ``binary_request_body`` builds the very bytes of tritonclient's ``generate_request_body``,
  and a tritonclient-built body parses as its JSON twin;
- every malformed body is an InvalidInput error (400; 413 for too many samples) whose
  message starts with the tensor it is about, and spares its neighbours in a batch;
- answers: binary outputs as asked (``binary_data_output``, per-output ``binary_data``),
  read back by ``read_binary_answer`` and by tritonclient's ``parse_response_body``.

Symbols: B samples, N = 13 dense features, F = 3 sparse features (tables of 10, 20 and 5
rows), L ids.
"""

import json
import math
import random
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pytest
import torch
import tritonclient.http as triton_http
from ts.context import RequestProcessor

from dlrm_handler import TorchRecDLRMHandler
from dlrm_request import (
    BINARY_HEADER,
    answer_bodies,
    binary_request_body,
    encode_answer,
    parse_batch,
    parse_binary_request,
    parse_request,
    read_binary_answer,
)
from request_strategies import CONFIGS, MAX_SAMPLES, TABLE_SIZES, F, N
from test_handler import model_dir, stand_in_context  # noqa: F401 - model_dir: the fixture

CFG = CONFIGS["error"]


def json_request(num_samples: int, seed: int = 0, max_length: int = 3) -> Dict[str, Any]:
    """A valid JSON request of ``num_samples`` multi-hot samples (lengths 0 to max_length)."""
    rng = random.Random(seed)
    lengths = [rng.randint(0, max_length) for _ in range(num_samples * F)]
    return {
        "float_features": [[rng.uniform(-3, 3) for _ in range(N)] for _ in range(num_samples)],
        "id_list_features.lengths": lengths,
        "id_list_features.values": [rng.randrange(TABLE_SIZES[c % F]) for c, n in enumerate(lengths) for _ in range(n)],
    }


def binary_twin(request: Dict[str, Any], int_dtype: torch.dtype = torch.int64, **kwargs: Any) -> Tuple[bytes, int]:
    """The JSON request's samples as a binary body (``binary_request_body``)."""
    dense, lengths, values, _ = parse_request(request, CFG)
    return binary_request_body(dense, lengths.to(int_dtype), values.to(int_dtype), **kwargs)


def header_and_data(body: bytes, length: int) -> Tuple[Dict[str, Any], bytes]:
    return json.loads(body[:length]), body[length:]


def rebuild(header: Dict[str, Any], data: bytes) -> Tuple[bytes, int]:
    text = json.dumps(header).encode()
    return text + data, len(text)


def parse_error(body: bytes, header_length: Any, cfg: Dict[str, Any] = CFG) -> ValueError:
    with pytest.raises(ValueError) as error:
        parse_binary_request(body, header_length, cfg)
    return error.value


# --- the same samples, JSON or binary ------------------------------------------------------


@pytest.mark.parametrize("int_dtype", [torch.int64, torch.int32], ids=["INT64", "INT32"])
@pytest.mark.parametrize("num_samples", [1, 3, MAX_SAMPLES])
def test_binary_body_parses_to_the_tensors_of_its_json_twin(num_samples: int, int_dtype: torch.dtype) -> None:
    request = json_request(num_samples, seed=num_samples)
    body, length = binary_twin(request, int_dtype)
    _, dense, lengths, values = parse_batch([(body, str(length))], CFG)
    expected = parse_request(request, CFG)
    assert (dense.shape, lengths.shape, values.shape) == (expected[0].shape, expected[1].shape, expected[2].shape)
    assert torch.equal(dense, expected[0]) and torch.equal(lengths, expected[1]) and torch.equal(values, expected[2])
    assert values.dtype == torch.int64 and lengths.dtype == torch.int64


def test_hash_policy_takes_binary_ids_mod_their_table_size() -> None:
    body, length = binary_request_body(torch.zeros(1, N), torch.tensor([[1, 2, 1]]), torch.tensor([10, 25, 2**62, 7]))
    _, _, _, values = parse_batch([(body, str(length))], CONFIGS["hash"])
    assert values.tolist() == [0, 5, 2**62 % 20, 2]


def test_binary_and_json_requests_batch_together_each_with_its_own_samples() -> None:
    first, second = json_request(2, seed=1), json_request(3, seed=2)
    body, length = binary_twin(second)
    plan, dense, lengths, values = parse_batch([(first, None), (body, str(length)), (b"{}", None)], CFG)
    assert [item[:2] for item in plan[:2]] == [(2, False), (3, False)] and isinstance(plan[2], ValueError)
    expected = [parse_request(r, CFG) for r in (first, second)]
    assert torch.equal(dense, torch.cat([e[0] for e in expected]))
    assert torch.equal(values, torch.cat([e[2] for e in expected]))


def tritonclient_body(dense: np.ndarray, lengths: np.ndarray, values: np.ndarray, **kwargs: Any) -> Tuple[bytes, Optional[int]]:
    """tritonclient's own ``generate_request_body`` of the three inputs."""
    inputs = []
    for name, array, datatype in (("float_features", dense, "FP32"), ("id_list_features.lengths", lengths, "INT64"),
                                  ("id_list_features.values", values, "INT64")):  # fmt: skip
        tensor = triton_http.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=True)
        inputs.append(tensor)
    return triton_http.InferenceServerClient.generate_request_body(inputs, **kwargs)


def test_binary_request_body_is_byte_for_byte_tritonclients_generate_request_body() -> None:
    dense, lengths, values, _ = parse_request(json_request(3), CFG)
    ours = binary_request_body(dense, lengths, values, request_id="r-7")
    theirs = tritonclient_body(dense.numpy(), lengths.numpy(), values.numpy(), request_id="r-7")
    assert ours == theirs


def test_tritonclient_body_parses_as_its_json_twin_and_asks_for_binary_outputs() -> None:
    request = json_request(4, seed=3)
    dense, lengths, values, _ = parse_request(request, CFG)
    body, length = tritonclient_body(dense.numpy(), lengths.numpy(), values.numpy())
    parsed = parse_binary_request(body, length, CFG)
    assert np.array_equal(parsed[0], dense.numpy()) and np.array_equal(parsed[2], values.numpy())
    assert parsed[4] == {"id": None, "outputs": [("score", True), ("probability", True)]}


# --- malformed bodies: a 400 naming the tensor ------------------------------------------------

VALID = json_request(2, seed=5)


def mutated(change: Any) -> Tuple[bytes, Any]:
    """VALID as a binary body, its header changed by ``change(header, data) -> (header, data)``."""
    header, data = header_and_data(*binary_twin(VALID))
    return rebuild(*change(header, data))


def set_input(input_name: str, **fields: Any) -> Any:
    def change(header: Dict[str, Any], data: bytes) -> Tuple[Dict[str, Any], bytes]:
        for tensor in header["inputs"]:
            if tensor["name"] == input_name:
                tensor.update(fields)
        return header, data

    return change


def nan_dense(header: Dict[str, Any], data: bytes) -> Tuple[Dict[str, Any], bytes]:
    return header, np.float32(math.nan).tobytes() + data[4:]


def out_of_range_id(header: Dict[str, Any], data: bytes) -> Tuple[Dict[str, Any], bytes]:
    return header, data[:-8] + np.int64(10**6).tobytes()


def billion_samples(header: Dict[str, Any], data: bytes) -> Tuple[Dict[str, Any], bytes]:
    header["inputs"][0]["shape"] = [10**9, N]
    header["inputs"][0]["parameters"]["binary_data_size"] = 10**9 * N * 4
    return header, data


def key_twice(header: Dict[str, Any], data: bytes) -> Tuple[bytes, int]:
    """VALID's binary body with float_features' datatype given twice in its JSON header."""
    text = json.dumps(header).replace('"datatype": "FP32"', '"datatype": "FP32", "datatype": "FP64"', 1).encode()
    return text + data, len(text)


BODY, LENGTH = binary_twin(VALID)
VALUES_SIZE = len(VALID["id_list_features.values"]) * 8
# (case, body, Inference-Header-Content-Length, HTTP status, what the message starts with)
MALFORMED: List[Tuple[str, bytes, Any, int, str]] = [
    ("header_length_past_the_end", BODY, len(BODY) + 1, 400, "Inference-Header-Content-Length: got"),
    ("header_length_not_a_number", BODY, "12a", 400, "Inference-Header-Content-Length: got '12a'"),
    ("header_length_zero", BODY, 0, 400, "Inference-Header-Content-Length: got '0'"),
    ("header_length_cuts_the_json", BODY, LENGTH - 1, 400, "request body: its first"),
    ("header_not_an_object", b"[1, 2]", 6, 400, "request body: the JSON header"),
    ("no_inputs", *rebuild({"outputs": []}, b""), 400, "request body: the JSON header"),
    ("truncated_body", BODY[:-1], LENGTH, 400, "id_list_features.values: its"),
    ("trailing_bytes", BODY + b"\0", LENGTH, 400, "request body: 1 bytes after the last input's data"),
    ("size_not_shape", *mutated(set_input("id_list_features.values", parameters={"binary_data_size": VALUES_SIZE - 8})),
     400, "id_list_features.values: got parameters.binary_data_size"),
    ("billion_samples_claimed", *mutated(billion_samples), 400, "float_features: its 52000000000 bytes"),
    ("billion_samples_size_unchanged", *mutated(set_input("float_features", shape=[10**9, N])),
     400, "float_features: got parameters.binary_data_size 104; expected 52000000000"),
    ("wrong_datatype", *mutated(set_input("float_features", datatype="FP64")), 400, "float_features: got datatype 'FP64'"),
    ("ids_as_floats", *mutated(set_input("id_list_features.values", datatype="FP32")), 400,
     "id_list_features.values: got datatype 'FP32'; expected 'INT64' or 'INT32'"),
    ("missing_tensor", *mutated(lambda h, d: ({"inputs": h["inputs"][:2]}, d[: -VALUES_SIZE])), 400,
     "id_list_features.values: missing"),
    ("unknown_tensor", *mutated(set_input("float_features", name="dense")), 400, "inputs: got an input named 'dense'"),
    ("tensor_twice", *mutated(set_input("id_list_features.values", name="id_list_features.lengths")), 400,
     "id_list_features.lengths: given twice"),
    ("data_inline", *mutated(set_input("float_features", parameters={}, data=[0.5] * 26)), 400,
     "float_features: no parameters.binary_data_size"),
    ("shape_not_a_list", *mutated(set_input("float_features", shape="2x13")), 400, "float_features: got shape"),
    ("dense_rows_of_2", *mutated(set_input("float_features", shape=[N, 2])), 400, "float_features: got shape [13, 2]; expected [B, 13]"),
    ("lengths_of_another_batch", *mutated(set_input("id_list_features.lengths", shape=[3, 2])), 400,
     "id_list_features.lengths: got shape [3, 2]; expected [2, 3]"),
    ("nan", *mutated(nan_dense), 400, "float_features[0][0]: got the float nan; expected a finite number"),
    ("id_out_of_range", *mutated(out_of_range_id), 400, "id_list_features.values["),
    ("key_twice_in_header", *key_twice(*header_and_data(BODY, LENGTH)), 400,
     "request body: the key 'datatype': given 2 times in one JSON object"),
    ("bad_outputs", *mutated(lambda h, d: ({**h, "outputs": [{"name": "logit"}]}, d)), 400,
     "outputs: got an output named 'logit'"),
]  # fmt: skip


def test_malformed_corpus_holds_the_issues_cases() -> None:
    assert len({case for case, *_ in MALFORMED}) == len(MALFORMED) >= 20


@pytest.mark.parametrize("body, header_length, status, message", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_binary_body_is_an_invalid_input_naming_the_tensor(
    body: bytes, header_length: Any, status: int, message: str
) -> None:
    error = parse_error(body, header_length)
    assert str(error).startswith(message), str(error)
    assert error.http_status == status and "expected" in str(error)


def test_negative_length_and_ids_not_adding_up_are_named_as_for_json() -> None:
    lengths = torch.tensor([[1, -1, 1]])
    body, length = binary_request_body(torch.zeros(1, N), lengths, torch.tensor([1]))
    assert str(parse_error(body, length)).startswith("id_list_features.lengths[1]: got -1 (sample 0, feature cat_1)")
    body, length = binary_request_body(torch.zeros(1, N), torch.tensor([[1, 1, 1]]), torch.tensor([1, 2]))
    assert str(parse_error(body, length)).startswith("id_list_features.values: got 2 items; expected 3 ids")
    huge = torch.tensor([[2**62, 2**62, 2**62]])  # an int64 sum would wrap around
    body, length = binary_request_body(torch.zeros(1, N), huge, torch.tensor([1]))
    assert f"expected {3 * 2**62} ids" in str(parse_error(body, length))


def test_too_many_samples_is_a_413_as_for_json() -> None:
    body, length = binary_request_body(torch.zeros(MAX_SAMPLES + 1, N), torch.zeros(MAX_SAMPLES + 1, F, dtype=torch.int64), [])
    error = parse_error(body, length)
    assert error.http_status == 413 and str(error).startswith(f"float_features: {MAX_SAMPLES + 1} samples in one request")


def test_a_malformed_binary_body_spares_its_neighbours_in_a_batch() -> None:
    body, length = binary_twin(VALID)
    bad_body, bad_length = mutated(nan_dense)
    plan, dense, _, _ = parse_batch([(body, str(length)), (bad_body, str(bad_length)), (VALID, None)], CFG)
    assert isinstance(plan[1], ValueError) and [p[0] for p in (plan[0], plan[2])] == [2, 2]
    assert torch.equal(dense, torch.cat([parse_request(VALID, CFG)[0]] * 2))


# --- answers ----------------------------------------------------------------------------------


def answer_of(body: bytes, length: int, logits: List[float]) -> Tuple[bytes, str, Dict[str, str]]:
    plan, _, _, _ = parse_batch([(body, str(length))], CFG)
    (status, answer), = answer_bodies(plan, torch.tensor(logits), "dlrm", model_name="dlrm")
    assert status == 200
    return encode_answer(answer)


def test_binary_outputs_come_back_in_the_binary_layout_tritonclient_reads() -> None:
    body, length = binary_twin(VALID, request_id="r-1")
    payload, content_type, headers = answer_of(body, length, [0.5, -1.0])
    assert content_type == "application/octet-stream" and int(headers[BINARY_HEADER]) < len(payload)
    result = triton_http.InferenceServerClient.parse_response_body(payload, header_length=int(headers[BINARY_HEADER]))
    assert result.get_response()["id"] == "r-1" and result.get_response()["model_name"] == "dlrm"
    assert result.as_numpy("score").tolist() == [0.5, -1.0]
    np.testing.assert_allclose(result.as_numpy("probability"), 1 / (1 + np.exp([-0.5, 1.0])), rtol=1e-6)
    assert read_binary_answer(payload, headers[BINARY_HEADER])["score"].tolist() == [0.5, -1.0]


def test_without_binary_outputs_the_answer_is_v2_json() -> None:
    body, length = binary_twin(VALID, binary_outputs=False)
    payload, content_type, headers = answer_of(body, length, [0.5, -1.0])
    assert content_type == "application/json" and headers == {}
    answer = json.loads(payload)
    assert answer["outputs"][0] == {"name": "score", "datatype": "FP32", "shape": [2], "data": [0.5, -1.0]}
    assert triton_http.InferenceServerClient.parse_response_body(payload).as_numpy("score").tolist() == [0.5, -1.0]


def test_each_requested_output_has_its_own_binary_data_parameter() -> None:
    header, data = header_and_data(*binary_twin(VALID))
    header["outputs"] = [{"name": "probability", "parameters": {"binary_data": True}}, {"name": "score"}]
    header["parameters"] = {"binary_data_output": False}
    payload, _, headers = answer_of(*rebuild(header, data), [0.0, 2.0])
    outputs = read_binary_answer(payload, headers[BINARY_HEADER])
    assert list(outputs) == ["probability", "score"] and outputs["score"].tolist() == [0.0, 2.0]
    assert json.loads(payload[: int(headers[BINARY_HEADER])])["outputs"][1]["data"] == [0.0, 2.0]


# --- the handler on a stand-in TorchServe context ----------------------------------------------


def test_handler_answers_a_binary_row_in_binary_and_its_json_neighbour_in_json(model_dir: str) -> None:
    """The handler's side (TorchServe's own Context, as test_handler.py builds it): the
    row with an Inference-Header-Content-Length header (any case) is parsed as binary and
    answered with that header; the JSON row next to it gets its JSON answer."""
    handler = TorchRecDLRMHandler()
    handler.initialize(stand_in_context(model_dir, 0))
    request = json_request(2, seed=9)
    body, length = binary_twin(request)
    context = stand_in_context(model_dir, 2)
    context.request_processor = [RequestProcessor({}), RequestProcessor({BINARY_HEADER.lower(): str(length)})]
    handler.context = context
    json_answer, binary_answer = handler.handle([{"body": json.dumps(request).encode()}, {"body": bytearray(body)}], context)
    assert context.get_response_content_type(0) == "application/json"
    headers = context.get_response_headers(1)
    assert headers["content-type"] == "application/octet-stream"
    header = json.loads(binary_answer[: int(headers[BINARY_HEADER])])
    assert [output["name"] for output in header["outputs"]] == ["score", "probability"]
    scores = read_binary_answer(binary_answer, headers[BINARY_HEADER])["score"]
    assert scores.tolist() == json.loads(json_answer)["score"]
