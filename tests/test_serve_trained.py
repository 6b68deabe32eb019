"""A trained model, served (README "Serve your trained model"): ``examples/train_dlrm.py`` ->
``create_dlrm_mar.sh --config model_config.json --checkpoint checkpoint.pt`` -> a real TorchServe
-> held-out samples scored over HTTP, each answer compared with the same checkpoint built
in-process by ``DLRMFactory`` (int8, as packaged).

The run is small (Criteo's tables capped at 1000 rows, D = 16, 60 steps): the path is
what is tested here; what the full run learns is ``benchmarks/bench_accuracy.py``'s.

Symbols: B samples, N = 13 dense features, F = 26 sparse features.
"""

import json
import os
import subprocess
import sys
from typing import Any, Dict, Iterator, List

import pytest
import torch

from conftest import REPO
from serving import Sample, TorchServe, direct_scores, make_request, predict

sys.path.insert(0, os.path.join(REPO, "examples"))

import criteo_data  # noqa: E402
import train_dlrm  # noqa: E402
from dlrm_factory import DLRMFactory  # noqa: E402

TABLE_CAP = 1000
SEED = 5
HELD_OUT = 256  # samples in one request (max_samples_per_request is 1024)
SCORE_TOLERANCE = 1e-7  # as tests/test_serving.py: batched matmuls may differ by a few ulps


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("serve_trained"))


@pytest.fixture(scope="module")
def trained(workdir: str) -> Dict[str, str]:
    """The README's training command, small: checkpoint.pt and model_config.json."""
    out = os.path.join(workdir, "trained")
    subprocess.run(
        [sys.executable, os.path.join(REPO, "examples", "train_dlrm.py"), "--out", out,
         "--table-cap", str(TABLE_CAP), "--train-samples", str(60 * 2048), "--batch-size", "2048",
         "--eval-samples", "20000", "--embedding-dim", "16", "--dense-arch", "32,16", "--over-arch", "32,16,1",
         "--seed", str(SEED), "--no-progress"],
        check=True, timeout=300,
    )  # fmt: skip
    return {"checkpoint": os.path.join(out, "checkpoint.pt"), "config": os.path.join(out, "model_config.json")}


@pytest.fixture(scope="module")
def config(trained: Dict[str, str]) -> Dict[str, Any]:
    with open(trained["config"]) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def mar_file(workdir: str, trained: Dict[str, str]) -> str:
    """The README's packaging command."""
    store = os.path.join(workdir, "model_store")
    subprocess.run(
        [os.path.join(REPO, "create_dlrm_mar.sh"), "--config", trained["config"], "--checkpoint", trained["checkpoint"],
         "--export-path", store, "--model-name", "trained"],
        check=True, timeout=300,
    )  # fmt: skip
    return os.path.join(store, "trained.mar")


@pytest.fixture(scope="module")
def torchserve(workdir: str, mar_file: str) -> Iterator[TorchServe]:
    server = TorchServe(workdir, os.path.dirname(mar_file))
    try:
        server.wait_for_ping()
        server.register("trained", "trained.mar")
        server.wait_for_model("trained")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def direct_model(config: Dict[str, Any], trained: Dict[str, str]) -> torch.nn.Module:
    """What the .mar's worker builds: the packaged config (int8) from the same checkpoint."""
    return DLRMFactory({**config, "checkpoint": trained["checkpoint"]})


@pytest.fixture(scope="module")
def held_out(config: Dict[str, Any]) -> List[Sample]:
    """Held-out samples of the world the model was trained on, as (dense, bags of one id)."""
    samples = criteo_data.SyntheticCriteo(table_sizes=config["num_embeddings_per_feature"], seed=SEED).sample(
        HELD_OUT, criteo_data.HELD_OUT
    )
    return [(dense, [[i] for i in ids]) for dense, ids in zip(samples.dense.tolist(), samples.ids.tolist())]


def test_trained_checkpoint_served_by_torchserve_answers_as_the_in_process_int8_model(
    torchserve: TorchServe, direct_model: torch.nn.Module, config: Dict[str, Any], held_out: List[Sample]
) -> None:
    status, answer = predict(torchserve, "trained", make_request(held_out))
    assert status == 200
    assert len(answer["score"]) == HELD_OUT
    expected = direct_scores(direct_model, config["id_list_features_keys"], held_out)
    assert answer["score"] == pytest.approx(expected, rel=0, abs=SCORE_TOLERANCE)


def test_served_scores_are_the_trained_float_models_within_int8_error(
    torchserve: TorchServe, config: Dict[str, Any], trained: Dict[str, str], held_out: List[Sample]
) -> None:
    """The trained weights reached the server: its logits are the float model's up to int8
    rounding (~5e-3 at most here), far closer than a model with other weights would be."""
    float_model = train_dlrm.build_train_model(config, seed=0)
    float_model.load_state_dict(torch.load(trained["checkpoint"], weights_only=True))
    expected = torch.tensor(direct_scores(float_model.model.eval(), config["id_list_features_keys"], held_out))
    status, answer = predict(torchserve, "trained", make_request(held_out))
    assert status == 200
    error = (torch.tensor(answer["score"]) - expected).abs()
    assert error.max().item() < 0.02
    assert expected.std().item() > 0.2  # the logits spread far wider than that error


def test_request_json_written_by_the_trainer_is_answered_with_its_samples_scores(
    torchserve: TorchServe, direct_model: torch.nn.Module, config: Dict[str, Any], trained: Dict[str, str]
) -> None:
    """The README's curl: ``--data @trained/request.json``."""
    with open(os.path.join(os.path.dirname(trained["checkpoint"]), "request.json")) as f:
        body = json.load(f)
    ids = body["id_list_features.values"]
    samples = [(dense, [[i] for i in ids[26 * b : 26 * (b + 1)]]) for b, dense in enumerate(body["float_features"])]
    status, answer = predict(torchserve, "trained", body)
    assert status == 200
    assert len(answer["score"]) == len(answer["probability"]) == 4
    expected = direct_scores(direct_model, config["id_list_features_keys"], samples)
    assert answer["score"] == pytest.approx(expected, rel=0, abs=SCORE_TOLERANCE)


# A raw Criteo line: hex values up to 0xffffffff, beyond every table; missing values; a negative count.
CRITEO_LINE = "\t".join(
    ["0", "1", "-1", "", "2", "1383", "", "", "", "", "", "", "", "7"]
    + ["68fd1e64", "80e26c9b", "fb936136", "7b4723c4", "25c83c98", "7e0ccccf", "de7995b8", "1f89b562",
       "a73ee510", "a8cd5504", "b2cb9c98", "37c9c164", "2824a5f6", "1adce6ef", "8ba8b39a", "891b62e7",
       "e5ba7672", "f54016b9", "21ddcdc9", "b1252a9d", "07b5194c", "", "3a171ecb", "ffffffff",
       "e8b83407", "9727dd16"]
)  # fmt: skip


def test_raw_criteo_line_is_scored_as_the_training_reader_and_model_score_it(
    torchserve: TorchServe, direct_model: torch.nn.Module, config: Dict[str, Any], tmp_path: Any
) -> None:
    """``id_overflow: hash``: a client sends Criteo's categorical values as they are (hex read
    as integers); the server takes them modulo the table sizes, as the TSV reader did."""
    body = criteo_data.request_from_tsv_lines([CRITEO_LINE])
    assert max(body["id_list_features.values"]) == 0xFFFFFFFF
    tsv = tmp_path / "line.tsv"
    tsv.write_text(CRITEO_LINE + "\n")
    read = criteo_data.read_criteo_tsv([str(tsv)], config["num_embeddings_per_feature"])
    status, answer = predict(torchserve, "trained", body)
    assert status == 200
    expected = direct_scores(direct_model, config["id_list_features_keys"], [(read.dense[0].tolist(), [[i] for i in read.ids[0].tolist()])])
    assert answer["score"] == pytest.approx(expected, rel=0, abs=SCORE_TOLERANCE)
