"""create_dlrm_mar.sh (SPEC §5): validates the config first, packages the handler (and the
request contract it imports), the factory, the config as model_config.json, the checkpoint if
any as checkpoint.pt and the per-model YAML - and no weights, so the default .mar stays
under 1 MiB."""

import hashlib
import json
import os
import subprocess
import zipfile
from typing import Any, Dict, List

import pytest
import torch

from conftest import REPO, small_model_config
from dlrm_factory import DLRMFactory
from dlrm_handler import TorchRecDLRMHandler
from test_checkpoint import float_dlrm
from test_handler import direct_scores, one_sample, stand_in_context, two_samples
from test_row_order import write_counts

SCRIPT = os.path.join(REPO, "create_dlrm_mar.sh")


def create_mar(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def default_mar(tmp_path_factory: pytest.TempPathFactory) -> str:
    """dlrm.mar of the repo's model_config.json (the full Criteo 1TB config), as `make demo`
    builds it."""
    store = tmp_path_factory.mktemp("model_store")
    result = create_mar("--config", os.path.join(REPO, "model_config.json"), "--export-path", str(store))
    assert result.returncode == 0, result.stderr
    return str(store / "dlrm.mar")


def test_default_mar_is_under_1_mib(default_mar: str) -> None:
    assert os.path.getsize(default_mar) < 2**20


def test_mar_holds_handler_factory_config_and_yaml_and_nothing_else(default_mar: str) -> None:
    with zipfile.ZipFile(default_mar) as mar:
        assert sorted(mar.namelist()) == [
            "MAR-INF/MANIFEST.json",
            "dlrm_checkpoint.py",
            "dlrm_factory.py",
            "dlrm_handler.py",
            "dlrm_lean_forward.py",
            "dlrm_request.py",
            "dlrm_row_order.py",
            "dlrm_table_store.py",
            "model-config.yaml",
            "model_config.json",
        ]
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
        packaged = json.loads(mar.read("model_config.json"))
        yaml_text = mar.read("model-config.yaml").decode()
    assert manifest["model"] == {
        "modelName": "dlrm",
        "handler": "dlrm_handler.py",
        "modelFile": "dlrm_factory.py",
        "modelVersion": "1.0",
        "configFile": "model-config.yaml",
    }
    with open(os.path.join(REPO, "model_config.json")) as f:
        assert packaged == json.load(f)
    with open(os.path.join(REPO, "model-config.yaml")) as f:
        assert yaml_text == f.read()  # the shipped batching, timeouts and workers
    assert "startupTimeout: 600" in yaml_text


def test_a_relative_table_store_is_refused_before_packaging(tmp_path: Any) -> None:
    config = tmp_path / "relative.json"
    config.write_text(json.dumps(small_model_config(table_store="store")))
    result = create_mar("--config", str(config), "--export-path", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "'table_store' is 'store'; expected an absolute path when served" in result.stderr
    assert not (tmp_path / "out").exists()


def test_invalid_config_fails_before_packaging_with_the_factorys_message(tmp_path: Any) -> None:
    config = tmp_path / "typo.json"
    config.write_text(json.dumps({"embeding_dim": 16}))
    result = create_mar("--config", str(config), "--export-path", str(tmp_path / "store"))
    assert result.returncode == 1
    assert "unknown key(s) ['embeding_dim']" in result.stderr
    assert not (tmp_path / "store").exists()


def test_unknown_argument_exits_2_with_the_usage_line() -> None:
    result = create_mar("--model", "x")
    assert result.returncode == 2
    assert "usage:" in result.stderr and "--checkpoint FILE" in result.stderr


def test_checkpoint_is_packaged_and_served_by_the_handler(tmp_path: Any) -> None:
    checkpoint = tmp_path / "trained.pt"
    torch.save(float_dlrm(small_model_config()).state_dict(), checkpoint)
    config = tmp_path / "small.json"
    config.write_text(json.dumps(small_model_config()))
    result = create_mar("--config", str(config), "--checkpoint", str(checkpoint), "--export-path", str(tmp_path))
    assert result.returncode == 0, result.stderr

    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(tmp_path / "dlrm.mar") as mar:
        assert "checkpoint.pt" in mar.namelist()
        mar.extractall(unpacked)
    assert json.loads((unpacked / "model_config.json").read_text())["checkpoint"] == "checkpoint.pt"
    # its identity for the table store key, so that a worker need not hash it
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert (unpacked / "checkpoint.pt.sha256").read_text() == f"{digest}  checkpoint.pt\n"

    handler = TorchRecDLRMHandler()
    handler.initialize(stand_in_context(str(unpacked), 0))
    assert handler.config["checkpoint"] == str(unpacked / "checkpoint.pt")
    requests: List[Dict[str, Any]] = [one_sample(), two_samples()]
    context = stand_in_context(str(unpacked), 2)
    answers = [json.loads(a) for a in handler.handle([{"body": r} for r in requests], context)]  # JSON bodies
    direct = DLRMFactory(small_model_config(checkpoint=str(checkpoint)))
    assert answers[0]["score"] == pytest.approx(direct_scores(direct, requests[0])[0], rel=0, abs=1e-7)
    assert answers[1]["score"] == pytest.approx(direct_scores(direct, requests[1]), rel=0, abs=1e-7)


def test_a_checkpoint_and_id_counts_each_get_their_own_sha256_file(tmp_path: Any) -> None:
    """Both packaged: checkpoint.pt.sha256 holds the checkpoint's digest and
    id_counts.safetensors.sha256 the counts' (the table store key trusts both)."""
    checkpoint = tmp_path / "trained.pt"
    torch.save(float_dlrm(small_model_config()).state_dict(), checkpoint)
    config = small_model_config()
    counts = tmp_path / "counts.safetensors"
    config["id_counts"] = write_counts(str(counts), config)
    (tmp_path / "small.json").write_text(json.dumps(config))
    result = create_mar("--config", str(tmp_path / "small.json"), "--checkpoint", str(checkpoint), "--export-path", str(tmp_path))
    assert result.returncode == 0, result.stderr

    with zipfile.ZipFile(tmp_path / "dlrm.mar") as mar:
        checkpoint_sidecar = mar.read("checkpoint.pt.sha256").decode()
        counts_sidecar = mar.read("id_counts.safetensors.sha256").decode()
    assert checkpoint_sidecar == f"{hashlib.sha256(checkpoint.read_bytes()).hexdigest()}  checkpoint.pt\n"
    assert counts_sidecar == f"{hashlib.sha256(counts.read_bytes()).hexdigest()}  id_counts.safetensors\n"
