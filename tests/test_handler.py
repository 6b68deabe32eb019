"""The handler without a server (SPEC §4): ``dlrm_request.parse_request`` is the request
contract as a pure function (importable without TorchServe), ``to_key_major_kjt`` the
sample-major -> key-major step upstream got wrong, and ``TorchRecDLRMHandler`` run on a
stand-in TorchServe context.

Symbols: B samples, N = 13 dense features, F sparse features (3 tables of 1000, 2000 and
5000 rows in the small config).
"""

import json
import math
import os
import subprocess
import sys
import textwrap
from typing import Any, Dict, List

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.utils.util import list_classes_from_module

import dlrm_handler
import dlrm_request
from conftest import REPO, small_model_config
from dlrm_factory import DLRMFactory, resolve_model_config
from dlrm_handler import TorchRecDLRMHandler
from dlrm_request import parse_request, to_key_major_kjt

CFG = resolve_model_config(small_model_config(max_samples_per_request=4))
DENSE = [0.25 * i - 1.5 for i in range(13)]
REFERENCE = os.path.join(REPO, "tests", "data")  # upstream's request files, as they were


def one_sample(**overrides: Any) -> Dict[str, Any]:
    request = {
        "float_features": list(DENSE),
        "id_list_features.lengths": [1, 1, 1],
        "id_list_features.values": [1, 2, 3],
    }
    request.update(overrides)
    return request


def two_samples() -> Dict[str, Any]:
    """The preprocess docstring's example: B = 2, multi-hot (lengths 0, 1, 2)."""
    return {
        "float_features": [list(DENSE), [-x for x in DENSE]],
        "id_list_features.lengths": [1, 0, 2, 2, 1, 1],
        "id_list_features.values": [7, 42, 43, 5, 6, 9, 11],
    }


# --- parse_request: valid requests --------------------------------------------------------


def test_one_sample_request_parses_to_a_batch_of_one_with_int64_ids() -> None:
    dense, lengths, values, single = parse_request(one_sample(), CFG)
    assert (dense.shape, lengths.shape, values.shape) == ((1, 13), (1, 3), (3,))
    assert (dense.dtype, lengths.dtype, values.dtype) == (torch.float32, torch.int64, torch.int64)
    assert single is True
    assert dense[0].tolist() == DENSE
    assert values.tolist() == [1, 2, 3]


def test_multi_sample_request_keeps_its_samples_in_order() -> None:
    dense, lengths, values, single = parse_request(two_samples(), CFG)
    assert (dense.shape, lengths.shape, single) == ((2, 13), (2, 3), False)
    assert dense[1].tolist() == [-x for x in DENSE]
    assert lengths.tolist() == [[1, 0, 2], [2, 1, 1]]
    assert values.tolist() == [7, 42, 43, 5, 6, 9, 11]


@pytest.mark.parametrize("encode", [
    lambda r: r,
    lambda r: json.dumps(r).encode(),
    lambda r: bytearray(json.dumps(r).encode()),
    lambda r: json.dumps(r),
], ids=["parsed", "bytes", "bytearray", "str"])  # fmt: skip
def test_body_may_be_parsed_json_bytes_bytearray_or_str(encode: Any) -> None:
    dense, lengths, values, _ = parse_request(encode(two_samples()), CFG)
    assert values.tolist() == [7, 42, 43, 5, 6, 9, 11]
    assert dense[1, 12].item() == -1.5


def test_list_of_one_sample_is_answered_as_a_list() -> None:
    request = one_sample(float_features=[list(DENSE)])
    assert parse_request(request, CFG)[3] is False


def test_ids_beyond_float32_precision_stay_exact() -> None:
    """Upstream's float32 round trip turned 45821459 into 45821460."""
    assert float(torch.tensor(45821459, dtype=torch.float32)) == 45821460.0
    with open(os.path.join(REPO, "sample_data.json"), "rb") as f:
        _, _, values, _ = parse_request(f.read(), resolve_model_config(os.path.join(REPO, "model_config.json")))
    assert values[0].item() == 45821459
    assert values.dtype == torch.int64


def test_upstream_two_sample_file_is_rightly_a_400_under_the_default_error_policy() -> None:
    """Its second sample has id 77 for a 3-row table (SPEC §4)."""
    default = resolve_model_config(os.path.join(REPO, "model_config.json"))
    with open(os.path.join(REFERENCE, "upstream_dlrm_bs_2.json"), "rb") as f:
        body = f.read()
    with pytest.raises(ValueError, match=r"values\[31\]: got 77 for feature cat_5 of sample 1; expected an integer in \[0, 3\)"):
        parse_request(body, default)


def test_hash_policy_takes_ids_modulo_their_table_size() -> None:
    cfg = resolve_model_config(small_model_config(id_overflow="hash"))
    request = one_sample(**{"id_list_features.values": [1000, 2**24 + 1, 2**62]})
    values = parse_request(request, cfg)[2]
    assert values.tolist() == [0, (2**24 + 1) % 2000, 2**62 % 5000]


def test_hash_policy_still_refuses_negative_ids() -> None:
    cfg = resolve_model_config(small_model_config(id_overflow="hash"))
    with pytest.raises(ValueError, match=r"values\[1\]: got -5 .*expected a non-negative integer"):
        parse_request(one_sample(**{"id_list_features.values": [1, -5, 3]}), cfg)


# --- parse_request: invalid requests ------------------------------------------------------

TOO_MANY = {
    "float_features": [list(DENSE)] * 5,
    "id_list_features.lengths": [1, 1, 1] * 5,
    "id_list_features.values": [1, 2, 3] * 5,
}
# (case, body, status, message pattern: the field, what it held, what was expected)
TEST_CASES = [
    ("not_json", b'{"float_features": [', 400, r"request body: not valid JSON"),
    ("not_utf8", b"\xff\xfe", 400, r"request body: not valid JSON"),
    ("nan_literal_in_bytes", json.dumps(one_sample(float_features=[math.nan] * 13)).encode(), 400, r"not valid JSON"),
    ("json_array", b"[1, 2]", 400, r"request body: got a list of 2 items; expected a JSON object"),
    ("json_null", None, 400, r"request body: got null"),
    ("missing_key", {k: v for k, v in one_sample().items() if k != "id_list_features.values"}, 400,
     r"id_list_features.values: missing"),
    ("posted_as_a_form", {json.dumps(one_sample()): ""}, 400, r"float_features: missing.*Content-Type: application/json"),
    ("dense_not_a_list", one_sample(float_features=0.5), 400, r"float_features: got the float 0.5; expected a list of 13"),
    ("dense_empty", one_sample(float_features=[]), 400, r"float_features: got a list of 0 items"),
    ("dense_wrong_count", one_sample(float_features=DENSE[:12]), 400, r"float_features: got 12 numbers; expected a list of 13"),
    ("dense_sample_wrong_count", dict(two_samples(), float_features=[DENSE, DENSE[:12]]), 400,
     r"float_features\[1\]: got a list of 12 items; expected a list of 13 numbers"),
    ("dense_string_number", one_sample(float_features=["0.5"] + DENSE[1:]), 400,
     r"float_features\[0\]: got the string '0.5'; expected a JSON number"),
    ("dense_bool", one_sample(float_features=DENSE[:3] + [True] + DENSE[4:]), 400,
     r"float_features\[3\]: got the boolean true; expected a JSON number"),
    ("dense_null_in_sample", dict(two_samples(), float_features=[DENSE, DENSE[:5] + [None] + DENSE[6:]]), 400,
     r"float_features\[1\]\[5\]: got null"),
    ("dense_nan", one_sample(float_features=DENSE[:4] + [math.nan] + DENSE[5:]), 400,
     r"float_features\[4\]: got the float nan; expected a finite number"),
    ("dense_inf", one_sample(float_features=[-math.inf] + DENSE[1:]), 400, r"float_features\[0\]: got the float -inf"),
    ("dense_beyond_float32", one_sample(float_features=[1e39] + DENSE[1:]), 400,
     r"float_features\[0\]: got the float 1e\+39; expected a finite number within float32"),
    ("dense_int_beyond_float64", one_sample(float_features=[10**400] + DENSE[1:]), 400,
     r"float_features\[0\]: got an integer of 401 digits"),
    ("lengths_wrong_count", one_sample(**{"id_list_features.lengths": [1, 1]}), 400,
     r"id_list_features.lengths: got 2 items; expected B x F = 1 x 3 = 3"),
    ("lengths_float", one_sample(**{"id_list_features.lengths": [1, 1.0, 1]}), 400,
     r"id_list_features.lengths\[1\]: got the float 1.0; expected a JSON integer"),
    ("lengths_bool", one_sample(**{"id_list_features.lengths": [True, 1, 1]}), 400,
     r"id_list_features.lengths\[0\]: got the boolean true"),
    ("lengths_negative", one_sample(**{"id_list_features.lengths": [2, -1, 2], "id_list_features.values": [1, 2, 3]}),
     400, r"id_list_features.lengths\[1\]: got -1 \(sample 0, feature cat_1\); expected a non-negative"),
    ("lengths_wrapping_int64", one_sample(**{"id_list_features.lengths": [2**63 - 1, 2**63 - 1, 2], "id_list_features.values": []}),
     400, r"id_list_features.values: got 0 items; expected 18446744073709551616 ids"),
    ("lengths_not_summing_to_values", one_sample(**{"id_list_features.lengths": [1, 2, 1]}), 400,
     r"id_list_features.values: got 3 items; expected 4 ids \(the sum of id_list_features.lengths"),
    ("id_negative", one_sample(**{"id_list_features.values": [-1, 2, 3]}), 400,
     r"id_list_features.values\[0\]: got -1 for feature cat_0 of sample 0; expected an integer in \[0, 1000\)"),
    ("id_of_table_size", one_sample(**{"id_list_features.values": [1, 2, 5000]}), 400,
     r"id_list_features.values\[2\]: got 5000 for feature cat_2 of sample 0; expected an integer in \[0, 5000\)"),
    ("id_float", one_sample(**{"id_list_features.values": [1, 2.0, 3]}), 400,
     r"id_list_features.values\[1\]: got the float 2.0; expected a JSON integer"),
    ("id_string", one_sample(**{"id_list_features.values": [1, 2, "3"]}), 400,
     r"id_list_features.values\[2\]: got the string '3'"),
    ("id_beyond_int64", one_sample(**{"id_list_features.values": [1, 2**63, 3]}), 400,
     r"id_list_features.values\[1\]: got 9223372036854775808; expected an integer within int64"),
    ("too_many_samples", TOO_MANY, 413, r"float_features: 5 samples in one request; expected at most max_samples_per_request = 4"),
]  # fmt: skip


@pytest.mark.parametrize("body, status, message", [c[1:] for c in TEST_CASES], ids=[c[0] for c in TEST_CASES])
def test_invalid_request_is_a_value_error_naming_the_field(body: Any, status: int, message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        parse_request(body, CFG)
    assert dlrm_request.error_response(error.value) == (
        status,
        {"code": status, "type": "InvalidInput", "message": str(error.value)},
    )


# --- sample-major request -> key-major KJT -------------------------------------------------


def test_kjt_is_key_major_as_the_preprocess_docstring_draws_it() -> None:
    _, lengths, values, _ = parse_request(two_samples(), CFG)
    kjt = to_key_major_kjt(CFG["id_list_features_keys"], lengths, values)
    assert kjt.keys() == ["cat_0", "cat_1", "cat_2"]
    assert kjt.stride() == 2
    assert kjt.lengths().tolist() == [1, 2, 0, 1, 2, 1]
    assert kjt.values().tolist() == [7, 5, 6, 9, 42, 43, 11]
    per_feature = {k: [t.tolist() for t in jt.to_dense()] for k, jt in kjt.to_dict().items()}
    assert per_feature == {"cat_0": [[7], [5, 6]], "cat_1": [[], [9]], "cat_2": [[42, 43], [11]]}


def test_kjt_of_no_ids_at_all_is_valid() -> None:
    kjt = to_key_major_kjt(["a", "b"], torch.zeros(3, 2, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
    assert (kjt.stride(), kjt.lengths().tolist(), kjt.values().numel()) == (3, [0] * 6, 0)


# --- the handler on a stand-in TorchServe context -------------------------------------------


def worker_metrics() -> MetricsCacheYamlImpl:
    """The metrics cache a TorchServe 0.12 worker gives its handler (``context.metrics``),
    read from the repo's metrics.yaml."""
    metrics = MetricsCacheYamlImpl(config_file_path=os.path.join(REPO, "metrics.yaml"))
    metrics.initialize_cache()
    metrics.model_name = "dlrm"
    return metrics


def stand_in_context(model_dir: str, batch: int) -> Context:
    """TorchServe's own Context, as its worker builds it, for a batch of ``batch`` requests."""
    context = Context(
        model_name="dlrm",
        model_dir=model_dir,
        manifest={"model": {"modelName": "dlrm", "handler": "dlrm_handler.py"}},
        batch_size=8,
        gpu=None,
        mms_version="0.12.0",
        metrics=worker_metrics(),
        model_yaml_config={},
    )
    context.request_processor = [RequestProcessor({}) for _ in range(batch)]
    return context


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An unpacked .mar's config: model_config.json of the small config."""
    path = tmp_path_factory.mktemp("model_dir")
    with open(path / "model_config.json", "w") as f:
        json.dump(small_model_config(max_samples_per_request=4), f)
    return str(path)


@pytest.fixture(scope="module")
def handler(model_dir: str) -> TorchRecDLRMHandler:
    handler = TorchRecDLRMHandler()
    handler.initialize(stand_in_context(model_dir, 0))
    return handler


def direct_scores(model: torch.nn.Module, request: Dict[str, Any]) -> List[float]:
    """The model called in-process on one request's samples, KJT built feature by feature."""
    dense = torch.tensor(request["float_features"], dtype=torch.float32).view(-1, 13)
    lengths = request["id_list_features.lengths"]
    num_samples, bags, position = dense.shape[0], [], 0
    for length in lengths:  # sample-major bags, cut in the order they were sent
        bags.append(request["id_list_features.values"][position : position + length])
        position += length
    key_major = [bags[b * 3 + f] for f in range(3) for b in range(num_samples)]
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["cat_0", "cat_1", "cat_2"],
        values=torch.tensor([i for bag in key_major for i in bag], dtype=torch.int64),
        lengths=torch.tensor([len(bag) for bag in key_major], dtype=torch.int64),
    )
    with torch.inference_mode():
        return model(dense, kjt).view(-1).tolist()


def test_handler_file_defines_exactly_one_class_for_torchserve() -> None:
    assert list_classes_from_module(dlrm_handler) == [TorchRecDLRMHandler]
    assert not hasattr(dlrm_handler, "handle")  # else TorchServe would take it as the entry point


def test_request_contract_imports_and_parses_without_torchserve() -> None:
    """A notebook or another server uses ``dlrm_request`` with torch and torchrec only: here
    any import of ``ts`` fails, and the module still imports and parses a request."""
    script = textwrap.dedent(f"""
        import sys
        class NoTorchServe:
            def find_spec(self, name, path=None, target=None):
                if name == "ts" or name.startswith("ts."):
                    raise ImportError("TorchServe is not installed here")
        sys.meta_path.insert(0, NoTorchServe())
        sys.path.insert(0, {REPO!r})
        import dlrm_request
        cfg = {{"dense_in_features": 13, "max_samples_per_request": 4, "id_overflow": "error",
               "num_embeddings_per_feature": [1000, 2000, 5000], "id_list_features_keys": ["a", "b", "c"]}}
        parsed = dlrm_request.parse_request({json.dumps(one_sample())!r}, cfg)
        print(parsed[2].tolist(), "ts" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-2] == "[1, 2, 3] False"


def test_request_module_holds_functions_only() -> None:
    assert list_classes_from_module(dlrm_request) == []


def test_handler_builds_the_model_of_the_packaged_config(handler: TorchRecDLRMHandler) -> None:
    assert handler.initialized
    assert handler.config["num_embeddings_per_feature"] == [1000, 2000, 5000]
    assert handler.config["id_list_features_keys"] == ["cat_0", "cat_1", "cat_2"]
    assert not handler.model.training


def test_each_request_of_a_batch_gets_its_own_answer_and_a_bad_one_its_own_4xx(
    handler: TorchRecDLRMHandler, model_dir: str
) -> None:
    batch = [
        {"body": one_sample()},
        {"body": json.dumps(two_samples()).encode()},
        {"body": b"not json"},
        {"body": TOO_MANY},
        {"data": one_sample(**{"id_list_features.values": [999, 1999, 4999]})},
    ]
    context = stand_in_context(model_dir, len(batch))
    answers = [json.loads(answer) for answer in handler.handle(batch, context)]  # JSON bodies

    statuses = [context.get_response_status(i)[0] for i in range(len(batch))]
    assert statuses == [200, 200, 400, 413, 200]
    assert context.get_response_status(3) == (413, "Request Entity Too Large")
    assert answers[2]["type"] == "InvalidInput" and answers[2]["code"] == 400
    assert answers[3]["code"] == 413
    model = DLRMFactory(small_model_config())  # same config and seed: identical weights
    for i in (0, 1, 4):
        request = batch[i].get("body", batch[i].get("data"))
        request = json.loads(request) if isinstance(request, bytes) else request
        expected = direct_scores(model, request)
        answer = answers[i]
        if i == 1:
            assert answer["score"] == pytest.approx(expected, rel=0, abs=1e-7)
            assert answer["probability"] == pytest.approx([1 / (1 + math.exp(-s)) for s in expected], abs=1e-7)
        else:
            assert answer["score"] == pytest.approx(expected[0], rel=0, abs=1e-7)
            assert isinstance(answer["score"], float)


def test_batch_of_only_bad_requests_is_answered_without_calling_the_model(
    handler: TorchRecDLRMHandler, model_dir: str
) -> None:
    context = stand_in_context(model_dir, 2)
    answers = [json.loads(answer) for answer in handler.handle([{"body": b""}, {"body": {}}], context)]
    assert [a["code"] for a in answers] == [400, 400]
    assert answers[1]["message"].startswith("float_features: missing")


def test_packaged_checkpoint_replaces_the_configs_checkpoint(tmp_path: Any) -> None:
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    with open(tmp_path / "model_config.json", "w") as f:
        json.dump(small_model_config(checkpoint="checkpoint.pt"), f)
    cfg = dlrm_handler.read_served_config(str(tmp_path))
    assert cfg["checkpoint"] == str(tmp_path / "checkpoint.pt")
