"""benchmarks/bench_accuracy.py on a small trained model: the held-out set is the trainer's,
world_size 1 and 2 agree, the last line has the issue's format, and the per-table diagnostic
reads the rows exactly as the served model does. No timings asserted."""

import contextlib
import importlib.util
import io
import json
import math
import os
import re
import sys
from typing import Any, Dict

import pytest
import torch

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "examples"))

import criteo_data  # noqa: E402
import train_dlrm  # noqa: E402
from dlrm_factory import DLRMFactory  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_accuracy", os.path.join(REPO, "benchmarks", "bench_accuracy.py"))
bench_accuracy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_accuracy)

LAST_LINE = re.compile(
    r"accuracy: oracle_auc=0\.\d{4} float_auc=0\.\d{4} fp16/float=\d\.\d{6} int8/float=\d\.\d{6} int4/float=\d\.\d{6}"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """40 steps of 1024 samples, Criteo's tables capped at 1000 rows, D = 16 (~1 s)."""
    out = str(tmp_path_factory.mktemp("trained"))
    train_dlrm.main([
        "--out", out, "--table-cap", "1000", "--train-samples", str(40 * 1024), "--batch-size", "1024",
        "--eval-samples", "20000", "--embedding-dim", "16", "--dense-arch", "32,16", "--over-arch", "32,16,1",
        "--seed", "4", "--no-progress",
    ])  # fmt: skip
    return out


@pytest.fixture(scope="module")
def report(model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    plot = str(tmp_path_factory.mktemp("plots") / "accuracy.png")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = bench_accuracy.main(["--model-dir", model_dir, "--plot", plot])
    return {"result": result, "lines": printed.getvalue().splitlines(), "plot": plot}


def test_last_line_is_the_issue_format(report: Dict[str, Any]) -> None:
    assert LAST_LINE.fullmatch(report["lines"][-1]), report["lines"][-1]
    assert os.path.getsize(report["plot"]) > 0


def test_float_auc_is_the_trainers_on_the_same_held_out_samples(report: Dict[str, Any], model_dir: str) -> None:
    with open(os.path.join(model_dir, "training.json")) as f:
        figures = json.load(f)["figures"]
    floats = report["result"]["results"][0]
    assert floats.name == "float TorchRec DLRM"
    assert floats.auc == pytest.approx(figures["auc"], abs=1e-12)
    assert report["result"]["oracle"].auc == pytest.approx(figures["oracle_auc"], abs=1e-12)


def test_world_size_1_and_2_give_identical_logits_for_every_dtype(report: Dict[str, Any]) -> None:
    assert report["result"]["same_across_world_sizes"] == {"fp32": True, "fp16": True, "int8": True, "int4": True}


def test_fp32_tables_serve_the_float_models_auc(report: Dict[str, Any]) -> None:
    results = report["result"]["results"]
    fp32 = next(r for r in results if r.quant_dtype == "fp32" and r.world_size == 1)
    assert fp32.auc == pytest.approx(results[0].auc, abs=1e-6)
    assert fp32.max_score_diff < 1e-5


def test_model_trained_elsewhere_is_benchmarked_on_held_out_tsv_files(model_dir: str, tmp_path: Any) -> None:
    """A plain ``DLRM.state_dict()`` and its config, no training.json: --eval-tsv gives the
    held-out data; real data has no oracle."""
    with open(os.path.join(model_dir, "model_config.json")) as f:
        config = json.load(f)
    own = tmp_path / "own"
    own.mkdir()
    (own / "model_config.json").write_text(json.dumps(config))
    trained = torch.load(os.path.join(model_dir, "checkpoint.pt"), weights_only=True)
    torch.save({key[len("model.") :]: value for key, value in trained.items()}, own / "checkpoint.pt")
    # 400 held-out samples written back as Criteo lines (counts exp(x) - 1, ids in hex).
    held_out = criteo_data.SyntheticCriteo(table_sizes=config["num_embeddings_per_feature"], seed=4).sample(400, criteo_data.HELD_OUT)
    lines = [
        "\t".join([str(int(label))] + [str(round(math.expm1(x))) for x in dense] + [format(i, "x") for i in ids])
        for label, dense, ids in zip(held_out.labels.tolist(), held_out.dense.tolist(), held_out.ids.tolist())
    ]
    (tmp_path / "day_23").write_text("\n".join(lines) + "\n")

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = bench_accuracy.main([
            "--model-dir", str(own), "--eval-tsv", str(tmp_path / "day_23"), "--dtypes", "int8",
            "--world-sizes", "1", "--plot", str(tmp_path / "plot.png"),
        ])  # fmt: skip
    float_model = bench_accuracy.float_model(config, os.path.join(model_dir, "checkpoint.pt"))
    expected = train_dlrm.predict(float_model, held_out, config["id_list_features_keys"])
    assert result["results"][0].auc == pytest.approx(train_dlrm.auc(expected, held_out.labels), abs=1e-9)
    assert result["oracle"] is None
    assert printed.getvalue().splitlines()[-1].startswith("accuracy: oracle_auc=nan float_auc=")


@pytest.mark.parametrize("quant_dtype", ["fp16", "int8", "int4"])
def test_dequantized_rows_score_as_the_served_model(model_dir: str, quant_dtype: str) -> None:
    """The per-table diagnostic's stand-in (float model, rows quantized then dequantized) is
    the served model: swapping every table gives the factory model's logits."""
    with open(os.path.join(model_dir, "model_config.json")) as f:
        config = json.load(f)
    checkpoint = os.path.join(model_dir, "checkpoint.pt")
    model = bench_accuracy.float_model(config, checkpoint)
    with torch.no_grad():
        for bag in model.sparse_arch.embedding_bag_collection.embedding_bags.values():
            bag.weight.copy_(bench_accuracy.dequantized(bag.weight, quant_dtype))
    samples = criteo_data.SyntheticCriteo(table_sizes=config["num_embeddings_per_feature"], seed=4).sample(2048, criteo_data.HELD_OUT)
    keys = config["id_list_features_keys"]
    served = DLRMFactory({**config, "quant_dtype": quant_dtype, "device": "cpu", "checkpoint": checkpoint})
    expected = train_dlrm.predict(served, samples, keys)
    got = train_dlrm.predict(model, samples, keys)
    assert got.shape == expected.shape == (2048,)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert not torch.equal(got, train_dlrm.predict(bench_accuracy.float_model(config, checkpoint), samples, keys))
