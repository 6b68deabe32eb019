"""KServe's open inference protocol (v2) through TorchServe's ``kservev2`` envelope.

Three layers:
- kserve/: the InferenceService manifest and config/config.properties agree with each other
  and with the tree ``make kserve`` lays out (model name, .mar name and version, the
  /mnt/models paths);
- the handler under the real ``KServev2Envelope``, in-process: a v2 request is scored exactly
  as the same request in plain JSON; a bad one is a 4xx naming the field;
- end to end: TorchServe started from kserve/config/config.properties - its /mnt/models
  paths pointed at a temp tree built by ``make kserve``, its addresses at free loopback
  ports, ``TS_SERVICE_ENVELOPE=kservev2`` set as KServe's runtime sets it - answers
  ``POST /v2/models/dlrm/infer``.

Symbols: B samples, N = 13 dense features, F = 3 sparse features (the small config).
"""

import json
import os
import random
import re
import shutil
import subprocess
import zipfile
from typing import Any, Dict, Iterator, List

import pytest
import requests
import yaml
from ts.torch_handler.request_envelope.kservev2 import KServev2Envelope
from ts.utils.util import PredictionException

from conftest import REPO, SMALL_TABLE_SIZES, small_model_config
from dlrm_handler import TorchRecDLRMHandler
from serving import Sample, TorchServe, make_request, post_json, random_samples, read_properties, served_models
from test_handler import stand_in_context

KSERVE = os.path.join(REPO, "kserve")
MOUNT = "/mnt/models"  # where KServe mounts the storageUri
CONFIG = small_model_config()
SCORE_TOLERANCE = 1e-7  # float32 ulps between batch compositions and thread counts


def v2_request(samples: List[Sample], lengths_shape: str = "BxF", one_sample: bool = False) -> Dict[str, Any]:
    """The open inference protocol's form of ``make_request(samples, one_sample)``: row-major
    flat data, lengths of shape [B, F] ("BxF") or [B*F] ("flat")."""
    plain = make_request(samples, one_sample)
    num_samples, num_features = len(samples), len(SMALL_TABLE_SIZES)
    dense = plain["float_features"] if one_sample else [x for row in plain["float_features"] for x in row]
    lengths, values = plain["id_list_features.lengths"], plain["id_list_features.values"]
    return {
        "id": "dlrm-test",
        "inputs": [
            {"name": "float_features", "shape": [13] if one_sample else [num_samples, 13], "datatype": "FP32", "data": dense},
            {"name": "id_list_features.lengths", "datatype": "INT64", "data": lengths,
             "shape": [num_samples, num_features] if lengths_shape == "BxF" else [len(lengths)]},
            {"name": "id_list_features.values", "shape": [len(values)], "datatype": "INT64", "data": values},
        ],
    }  # fmt: skip


def with_input(body: Dict[str, Any], input_name: str, **fields: Any) -> Dict[str, Any]:
    """A copy of ``body`` with these ``fields`` of input ``input_name`` replaced."""
    body = json.loads(json.dumps(body))
    for tensor in body["inputs"]:
        if tensor["name"] == input_name:
            tensor.update(fields)
    return body


SAMPLES = random_samples(random.Random(6), 3, SMALL_TABLE_SIZES)
VALID = v2_request(SAMPLES)

# (case, v2 body, HTTP status, the field the message must name first)
BAD_V2_CASES = [
    ("ids_as_fp32", with_input(VALID, "id_list_features.values", datatype="FP32"), 400, "id_list_features.values"),
    ("unknown_input", with_input(VALID, "float_features", name="dense"), 400, "inputs"),
    ("missing_input", {**VALID, "inputs": VALID["inputs"][:2]}, 400, "id_list_features.values"),
    ("dense_of_12", with_input(VALID, "float_features", shape=[3, 12], data=[0.5] * 36), 400, "float_features[0]"),
    ("id_beyond_its_table", with_input(VALID, "id_list_features.values", data=[5000] + VALID["inputs"][2]["data"][1:]),
     400, "id_list_features.values[0]"),
    ("lengths_not_summing_to_values", with_input(VALID, "id_list_features.values", shape=[1], data=[1]),
     400, "id_list_features.values"),
    # 400, not 413: TorchServe turns an error's 413 into 507 (its code for a worker out of memory)
    ("too_many_samples", v2_request(SAMPLES * 400), 400, "float_features"),
]  # fmt: skip


# --- kserve/: the manifest, the config and the tree make kserve lays out ------------------


@pytest.fixture(scope="module")
def manifest() -> Dict[str, Any]:
    with open(os.path.join(KSERVE, "dlrm-inferenceservice.yaml")) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def kserve_properties() -> Dict[str, str]:
    return read_properties(os.path.join(KSERVE, "config", "config.properties"))


@pytest.fixture(scope="module")
def snapshot(kserve_properties: Dict[str, str]) -> Dict[str, Any]:
    return json.loads(kserve_properties["model_snapshot"])


def gibibytes(quantity: str) -> float:
    """A Kubernetes memory quantity (16Gi, 17179869184, 18G) in GiB."""
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", quantity).groups()
    scale = {"": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "M": 1e6, "G": 1e9}[unit]
    return float(number) * scale / 2**30


def test_manifest_is_a_v2_pytorch_inference_service_sized_for_the_default_model(
    manifest: Dict[str, Any], snapshot: Dict[str, Any]
) -> None:
    assert (manifest["apiVersion"], manifest["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    predictor = manifest["spec"]["predictor"]
    model = predictor["model"]
    assert model["modelFormat"]["name"] == "pytorch"
    assert model["protocolVersion"] == "v2"
    assert re.fullmatch(r"(pvc|s3|gs)://\S+", model["storageUri"])
    assert predictor["minReplicas"] >= 1
    # 11.3 GiB of int8 tables (README, Memory) + the worker, the JVM and the wrapper
    requests_gi = gibibytes(model["resources"]["requests"]["memory"])
    assert 14 <= requests_gi <= gibibytes(model["resources"]["limits"]["memory"])
    # KServe's wrapper waits MODEL_LOAD_MAX_TRY x MODEL_LOAD_DELAY s for TorchServe's worker
    env = {e["name"]: e["value"] for e in model["env"]}
    startup_timeout = snapshot["models"]["dlrm"]["1.0"]["startupTimeout"]
    assert int(env["MODEL_LOAD_MAX_TRY"]) * int(env["MODEL_LOAD_DELAY"]) >= startup_timeout >= 600
    assert env["DLRM_TABLE_STORE"] == f"{MOUNT}/table_store"  # make kserve's table_store/, prebuilt
    assert model["readinessProbe"]["httpGet"]["path"] == "/v2/models/dlrm/ready"
    assert "livenessProbe" not in model  # it would kill a pod whose volume is slow to read


def test_config_properties_is_kserves_layout_under_the_storage_uri_mount(kserve_properties: Dict[str, str]) -> None:
    props = kserve_properties
    assert props["inference_address"] == props["management_address"] == "http://0.0.0.0:8085"
    assert props["metrics_address"] == "http://0.0.0.0:8082"
    assert (props["grpc_inference_port"], props["grpc_management_port"]) == ("7070", "7071")
    assert props["model_store"] == f"{MOUNT}/model-store"
    assert props["metrics_config"] == f"{MOUNT}/config/metrics.yaml"
    assert (props["metrics_mode"], props["enable_metrics_api"]) == ("prometheus", "true")
    assert props["service_envelope"] == "kservev2"
    assert props["enable_envvars_config"] == "true"  # KServe's TS_SERVICE_ENVELOPE
    assert props["disable_token_authorization"] == "true"  # KServe's wrapper sends no token
    with open(os.path.join(KSERVE, "config", "metrics.yaml"), "rb") as a, open(os.path.join(REPO, "metrics.yaml"), "rb") as b:
        assert a.read() == b.read(), "kserve/config/metrics.yaml must be a copy of metrics.yaml"


def test_model_snapshot_registers_dlrm_mar_with_one_worker_and_batch_size_1(snapshot: Dict[str, Any]) -> None:
    assert snapshot["modelCount"] == len(snapshot["models"]) == 1
    versions = snapshot["models"]["dlrm"]
    assert list(versions) == ["1.0"]
    model = versions["1.0"]
    assert model["marName"] == "dlrm.mar" and model["defaultVersion"] is True
    assert (model["minWorkers"], model["maxWorkers"]) == (1, 1)  # one worker holds the tables
    assert model["batchSize"] == 1  # the kservev2 envelope passes on one request per batch
    assert {"maxBatchDelay", "responseTimeout", "startupTimeout"} <= set(model)


@pytest.fixture(scope="module")
def kserve_tree(tmp_path_factory: pytest.TempPathFactory) -> str:
    """What the storageUri holds: kserve/config/ copied, model-store/dlrm.mar and
    table_store/ built by ``make kserve`` (of the small config)."""
    tree = tmp_path_factory.mktemp("mnt_models")
    shutil.copytree(os.path.join(KSERVE, "config"), tree / "config")
    config = tree / "small_config.json"
    config.write_text(json.dumps(CONFIG))
    subprocess.run(
        ["make", "--no-print-directory", "-s", "kserve",
         f"KSERVE_MODEL_CONFIG={config}", f"KSERVE_MODEL_STORE={tree / 'model-store'}",
         f"KSERVE_TABLE_STORE={tree / 'table_store'}"],
        cwd=REPO, check=True, timeout=300,
    )  # fmt: skip
    return str(tree)


def test_make_kserve_prebuilds_the_table_store_entry_the_worker_maps(kserve_tree: str, torchserve: TorchServe) -> None:
    (entry,) = [name for name in os.listdir(os.path.join(kserve_tree, "table_store")) if name.endswith(".safetensors")]
    log = torchserve.model_log(f"table store: mapped {os.path.join(kserve_tree, 'table_store', entry)}")
    assert f"table store: mapped {os.path.join(kserve_tree, 'table_store', entry)}" in log
    assert "table store: built" not in log


def test_make_kserve_builds_the_mar_config_properties_names(kserve_tree: str, snapshot: Dict[str, Any]) -> None:
    ((name, versions),) = snapshot["models"].items()
    ((version, model),) = versions.items()
    assert os.listdir(os.path.join(kserve_tree, "model-store")) == [model["marName"]]
    with zipfile.ZipFile(os.path.join(kserve_tree, "model-store", model["marName"])) as mar:
        packaged = json.loads(mar.read("MAR-INF/MANIFEST.json"))["model"]
    assert (packaged["modelName"], packaged["modelVersion"]) == (name, version)
    assert packaged["handler"] == "dlrm_handler.py"


# --- the handler under TorchServe's kservev2 envelope, in-process ---------------------------


@pytest.fixture(scope="module")
def handler(tmp_path_factory: pytest.TempPathFactory) -> TorchRecDLRMHandler:
    model_dir = tmp_path_factory.mktemp("model_dir")
    (model_dir / "model_config.json").write_text(json.dumps(CONFIG))
    handler = TorchRecDLRMHandler()
    handler.initialize(stand_in_context(str(model_dir), 0))
    return handler


def plain_answer(handler: TorchRecDLRMHandler, body: Dict[str, Any]) -> Dict[str, Any]:
    """The handler's answer to ``body`` in plain JSON, without an envelope."""
    context = stand_in_context(handler.context.system_properties["model_dir"], 1)
    (answer,) = handler.handle([{"body": json.dumps(body).encode()}], context)
    assert context.get_response_status(0)[0] == 200, answer
    return json.loads(answer)  # the body's JSON bytes


def enveloped(handler: TorchRecDLRMHandler, *bodies: Dict[str, Any]) -> List[Dict[str, Any]]:
    """TorchServe's kservev2 envelope around ``handler.handle``, on one batch of ``bodies``."""
    context = stand_in_context(handler.context.system_properties["model_dir"], len(bodies))
    context.request_ids = {i: f"request-{i}" for i in range(len(bodies))}
    return KServev2Envelope(handler.handle).handle([{"body": json.dumps(b).encode()} for b in bodies], context)


@pytest.mark.parametrize(
    "lengths_shape, one_sample, count",
    [("BxF", False, 3), ("flat", False, 3), ("BxF", True, 1)],
    ids=["lengths_BxF", "lengths_flat", "one_sample_dense_N"],
)
def test_v2_request_is_scored_exactly_as_the_plain_json_request(
    handler: TorchRecDLRMHandler, lengths_shape: str, one_sample: bool, count: int
) -> None:
    samples = SAMPLES[:count]
    (answer,) = enveloped(handler, v2_request(samples, lengths_shape, one_sample))
    plain = plain_answer(handler, make_request(samples, one_sample))
    assert answer["id"] == "dlrm-test"
    assert [o["name"] for o in answer["outputs"]] == ["score", "probability"]
    score, probability = answer["outputs"]
    assert (score["datatype"], list(score["shape"])) == ("FP32", [count])
    assert (probability["datatype"], list(probability["shape"])) == ("FP32", [count])
    expected = [plain["score"]] if one_sample else plain["score"]
    assert score["data"] == expected  # same batch, same code: bit-identical
    assert probability["data"] == ([plain["probability"]] if one_sample else plain["probability"])


@pytest.mark.parametrize("body, status, field", [c[1:] for c in BAD_V2_CASES], ids=[c[0] for c in BAD_V2_CASES])
def test_bad_v2_request_is_a_4xx_naming_the_field(
    handler: TorchRecDLRMHandler, body: Dict[str, Any], status: int, field: str
) -> None:
    with pytest.raises(PredictionException) as raised:
        enveloped(handler, body)
    assert raised.value.error_code == status
    assert raised.value.message.startswith(f"{field}:") and "expected" in raised.value.message


def test_two_requests_in_one_batch_under_the_envelope_are_refused_saying_why(handler: TorchRecDLRMHandler) -> None:
    """The envelope passes on only the first request of a batch; TorchServe would then fail
    the whole batch with "number of batch response mismatched"."""
    with pytest.raises(PredictionException, match="batchSize 1") as raised:
        enveloped(handler, VALID, VALID)
    assert raised.value.error_code == 500


# --- end to end: TorchServe from kserve/config/config.properties ---------------------------


@pytest.fixture(scope="module")
def torchserve(kserve_tree: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServe]:
    """kserve/config/config.properties with /mnt/models -> ``kserve_tree``; the model comes
    from its model_snapshot (no registration)."""
    properties = read_properties(os.path.join(kserve_tree, "config", "config.properties"))
    properties = {key: value.replace(MOUNT, kserve_tree) for key, value in properties.items()}
    workdir = str(tmp_path_factory.mktemp("kserve_server"))
    env = {"TS_SERVICE_ENVELOPE": "kservev2", "DLRM_TABLE_STORE": os.path.join(kserve_tree, "table_store")}  # the manifest's
    with served_models(workdir, mars={}, models={}, properties=properties, env=env,
                       model_store=properties["model_store"], preloaded=["dlrm"]) as server:  # fmt: skip
        yield server


def infer(server: TorchServe, body: Any) -> Any:
    """POST /v2/models/dlrm/infer (the open inference protocol's path)."""
    return post_json(f"{server.inference}/v2/models/dlrm/infer", body)


def test_kserve_config_serves_dlrm_from_its_snapshot_with_batch_size_1(torchserve: TorchServe) -> None:
    model = torchserve.describe("dlrm")
    assert (model["modelVersion"], model["batchSize"]) == ("1.0", 1)  # the .mar's YAML says 8
    assert model["startupTimeout"] >= 600


def test_v2_infer_answers_the_scores_of_the_plain_json_request(
    torchserve: TorchServe, handler: TorchRecDLRMHandler
) -> None:
    status, answer = infer(torchserve, VALID)
    assert status == 200, answer
    assert (answer["id"], answer["model_name"], answer["model_version"]) == ("dlrm-test", "dlrm", "1.0")
    assert [(o["name"], o["datatype"], o["shape"]) for o in answer["outputs"]] == [
        ("score", "FP32", [3]), ("probability", "FP32", [3])
    ]  # fmt: skip
    plain = plain_answer(handler, make_request(SAMPLES))
    assert answer["outputs"][0]["data"] == pytest.approx(plain["score"], rel=0, abs=SCORE_TOLERANCE)
    assert answer["outputs"][1]["data"] == pytest.approx(plain["probability"], rel=0, abs=SCORE_TOLERANCE)
    # KServe's wrapper forwards v2 bodies to /predictions/<model>: the same answer there
    assert post_json(f"{torchserve.inference}/predictions/dlrm", VALID) == (status, answer)


@pytest.mark.parametrize("case", ["ids_as_fp32", "id_beyond_its_table", "too_many_samples"])
def test_bad_v2_infer_is_a_4xx_with_the_handlers_message(torchserve: TorchServe, case: str) -> None:
    body, status, field = next(c[1:] for c in BAD_V2_CASES if c[0] == case)
    answer_status, answer = infer(torchserve, body)
    assert answer_status == status
    assert answer["code"] == status  # TorchServe's error body: {"code", "type", "message"}
    assert answer["message"].startswith(f"{field}:") and "expected" in answer["message"]


def test_envelope_level_malformation_is_refused_by_torchserve_before_the_handler(torchserve: TorchServe) -> None:
    """TorchServe's kservev2 envelope reshapes "data" to "shape" before the handler runs:
    when they disagree (or the body is not v2 JSON) TorchServe itself answers 503
    "Prediction failed". The worker survives."""
    mismatched = with_input(VALID, "id_list_features.values", shape=[99])
    assert infer(torchserve, mismatched)[0] == 503
    assert infer(torchserve, b"{not json")[0] == 503
    assert infer(torchserve, VALID)[0] == 200


def test_handler_metrics_are_on_the_kserve_metrics_port(torchserve: TorchServe) -> None:
    text = requests.get(f"{torchserve.metrics}/metrics", timeout=10).text
    for name in ("DLRMSamplesPerBatch", "DLRMPreprocessTime", "DLRMInferenceTime", "DLRMInvalidRequests"):
        assert re.search(rf'^{name}{{ModelName="dlrm",', text, re.MULTILINE), name
