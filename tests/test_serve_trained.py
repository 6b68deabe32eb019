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
    samples = criteo_data.SyntheticCriteo(config["num_embeddings_per_feature"], seed=SEED).sample(
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


def test_raw_criteo_values_are_hashed_into_the_tables_as_in_training(
    torchserve: TorchServe, config: Dict[str, Any], held_out: List[Sample]
) -> None:
    """``id_overflow: hash``: a client may send Criteo's categorical values (hex as
    integers); the server takes them modulo the table sizes, as the TSV reader does."""
    sizes = config["num_embeddings_per_feature"]
    dense, bags = held_out[0]
    raw = [[bag[0] + size * 0x9E3779B] for bag, size in zip(bags, sizes)]  # same id mod size
    status_raw, answer_raw = predict(torchserve, "trained", make_request([(dense, raw)], one_sample=True))
    status, answer = predict(torchserve, "trained", make_request([(dense, bags)], one_sample=True))
    assert status_raw == status == 200
    assert max(max(bag) for bag in raw) > 2**31  # beyond every table, beyond int32
    assert answer_raw["score"] == answer["score"]
