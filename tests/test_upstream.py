"""Upstream compatibility (SPEC §7): a client or a test written for pytorch/serve's
``examples/torchrec_dlrm`` keeps working against ``"response_format": "upstream"``.

- upstream's handler test flow as upstream writes it (``test/pytest/
  test_example_torchrec_dlrm.py``, ``test_handler``): TorchServe's own ``MockContext`` (no
  response statuses, content types or request ids), ``initialize``, then ``preprocess`` ->
  ``inference`` -> ``postprocess`` on a row whose ``.get`` returns the request's JSON text.
  The answer is ``[{"default": [logit, ...]}]``, the logits of the model called in-process;
- the same requests through a real TorchServe, posted as text and as JSON, as upstream's
  full-circle tests post them: ``{"default": [logit, ...]}``, a list even for one sample;
- errors stay ours: a 4xx with ``{"code", "type": "InvalidInput", "message"}``.

The config: upstream's 26 features over small tables (D = 16, TABLE_SIZES rows) under
``id_overflow: hash``. Upstream's ids are Criteo-sized (45821459 for table 0), and its second
sample has 77 for a 3-row table: under the default ``error`` policy both files are 400s.
``hash`` takes each id modulo its table's size; the in-process reference does the same.

Symbols: B samples, N = 13 dense features, F = 26 sparse features.
"""

import json
import os
from typing import Any, Dict, List
from unittest.mock import Mock

import pytest
import requests
import torch
from ts.torch_handler.unit_tests.test_utils.mock_context import MockContext

from conftest import REPO, small_model_config
from dlrm_factory import DLRMFactory
from dlrm_handler import TorchRecDLRMHandler
from dlrm_request import request_body
from serving import REQUEST_TIMEOUT_S, Sample, TorchServe, direct_scores, torchserve_fixture
from test_handler import stand_in_context

DATA = os.path.join(REPO, "tests", "data")  # upstream's request files, as they were
TABLE_SIZES = [50 + 10 * f for f in range(26)]
KEYS = [f"cat_{f}" for f in range(len(TABLE_SIZES))]
CONFIG = small_model_config(num_embeddings_per_feature=TABLE_SIZES, id_overflow="hash", response_format="upstream")
# Batched and single matmuls, the lean forward and TorchRec's: a few float32 ulps apart.
SCORE_TOLERANCE = 1e-7
# (upstream's request file, its number of samples)
TEST_CASES = [("upstream_sample_data.json", 1), ("upstream_dlrm_bs_2.json", 2)]


def read_request(file: str) -> Dict[str, Any]:
    with open(os.path.join(DATA, file)) as f:
        return json.load(f)


def expected_logits(model: torch.nn.Module, request: Dict[str, Any]) -> List[float]:
    """``model`` called in-process on ``request``'s samples, each id modulo its table's size."""
    rows = request["float_features"]
    rows = [rows] if not isinstance(rows[0], list) else rows
    ids = iter(request["id_list_features.values"])
    lengths = request["id_list_features.lengths"]
    samples: List[Sample] = []
    for b, dense in enumerate(rows):
        bags = [[next(ids) % size for _ in range(lengths[b * len(TABLE_SIZES) + f])] for f, size in enumerate(TABLE_SIZES)]
        samples.append((dense, bags))
    return direct_scores(model, KEYS, samples)


def approx(logits: List[float]) -> Any:
    return pytest.approx(logits, rel=0, abs=SCORE_TOLERANCE)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An unpacked .mar's config: model_config.json of CONFIG."""
    path = tmp_path_factory.mktemp("model_dir")
    (path / "model_config.json").write_text(json.dumps(CONFIG))
    return str(path)


@pytest.fixture(scope="module")
def direct_model() -> torch.nn.Module:
    return DLRMFactory(CONFIG)  # same config and seed as served: identical weights


# --- upstream's handler test, in-process -----------------------------------------------------


@pytest.mark.parametrize("file, num_samples", TEST_CASES)
def test_upstream_handler_test_flow_answers_default_with_the_models_logits(
    model_dir: str, direct_model: torch.nn.Module, file: str, num_samples: int
) -> None:
    handler = TorchRecDLRMHandler()
    ctx = MockContext(model_pt_file=None, model_dir=model_dir, model_file="dlrm_factory.py")
    torch.manual_seed(42 * 42)
    handler.initialize(ctx)

    data = read_request(file)
    x = Mock(get=lambda x: json.dumps(data))

    x = handler.preprocess([x])
    x = handler.inference(x)
    x = handler.postprocess(x)

    assert len(x) == 1 and list(x[0]) == ["default"]
    assert isinstance(x[0]["default"], list) and len(x[0]["default"]) == num_samples
    assert x == [{"default": approx(expected_logits(direct_model, data))}]


def test_bad_request_under_mock_context_is_answered_with_its_error_body(model_dir: str) -> None:
    """MockContext cannot carry a response status: the error body still comes back."""
    handler = TorchRecDLRMHandler()
    handler.initialize(MockContext(model_pt_file=None, model_dir=model_dir, model_file="dlrm_factory.py"))
    (answer,) = handler.postprocess(handler.inference(handler.preprocess([Mock(get=lambda x: "not json")])))
    assert (answer["code"], answer["type"]) == (400, "InvalidInput")
    assert answer["message"].startswith("request body: not valid JSON")


def test_bad_request_in_an_upstream_batch_gets_our_4xx_and_its_neighbour_its_default(
    model_dir: str, direct_model: torch.nn.Module
) -> None:
    handler = TorchRecDLRMHandler()
    handler.initialize(stand_in_context(model_dir, 0))
    data = read_request("upstream_sample_data.json")
    context = stand_in_context(model_dir, 2)
    answers = handler.handle([{"body": b"not json"}, {"body": json.dumps(data).encode()}], context)
    assert [context.get_response_status(i)[0] for i in range(2)] == [400, 200]
    assert answers[0] == {"code": 400, "type": "InvalidInput", "message": answers[0]["message"]}
    assert answers[1] == {"default": approx(expected_logits(direct_model, data))}


ROW_CASES = [
    ("data_key", {"data": b"{}"}, b"{}"),
    ("body_key", {"body": {"float_features": []}}, {"float_features": []}),
    ("data_before_body", {"data": b"1", "body": b"2"}, b"1"),
    ("empty_data_falls_back_to_body", {"data": b"", "body": b"2"}, b"2"),
    ("object_with_get", Mock(get=lambda key: f"<{key}>"), "<data>"),
    ("bare_request", {"float_features": [0.5]}, {"float_features": [0.5]}),
    ("raw_bytes", b"{}", b"{}"),
]  # fmt: skip


@pytest.mark.parametrize("row, payload", [c[1:] for c in ROW_CASES], ids=[c[0] for c in ROW_CASES])
def test_row_is_read_as_base_handler_reads_it(row: Any, payload: Any) -> None:
    """``row.get("data") or row.get("body")`` on anything with ``.get``."""
    assert request_body(row) == payload


# --- through a real TorchServe -------------------------------------------------------------

torchserve = torchserve_fixture(mars={"dlrm": CONFIG}, models={"dlrm": {}})


def post_as_upstream(server: TorchServe, file: str, how: str) -> requests.Response:
    """Upstream's full-circle tests: the file's bytes as they are, or its JSON (``json=``)."""
    url = f"{server.inference}/predictions/dlrm"
    if how == "text":
        with open(os.path.join(DATA, file), "rb") as f:
            return requests.post(url, data=f, timeout=REQUEST_TIMEOUT_S)
    return requests.post(url, json=read_request(file), timeout=REQUEST_TIMEOUT_S)


@pytest.mark.parametrize("how", ["text", "json"])
@pytest.mark.parametrize("file, num_samples", TEST_CASES)
def test_upstream_request_through_torchserve_is_answered_in_upstreams_shape(
    torchserve: TorchServe, direct_model: torch.nn.Module, file: str, num_samples: int, how: str
) -> None:
    response = post_as_upstream(torchserve, file, how)
    assert response.status_code == 200, response.text
    answer = json.loads(response.text)
    assert list(answer) == ["default"] and len(answer["default"]) == num_samples
    assert answer == {"default": approx(expected_logits(direct_model, read_request(file)))}


def test_bad_request_through_torchserve_is_still_our_400_json(torchserve: TorchServe) -> None:
    body = read_request("upstream_sample_data.json")
    body["id_list_features.lengths"] = body["id_list_features.lengths"][:25]
    response = requests.post(f"{torchserve.inference}/predictions/dlrm", json=body, timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 400
    answer = response.json()
    assert (answer["code"], answer["type"]) == (400, "InvalidInput")
    assert answer["message"].startswith("id_list_features.lengths: got 25 items; expected B x F = 1 x 26")
