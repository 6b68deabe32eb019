"""benchmarks/bench_serve.py without a server: the requests it sends are valid for the model
it serves in both formats (every answer must be a 200) and the same samples; the do-nothing
handler answers each request of a batch; a thread count becomes the handler's YAML setting;
the table's ratios are a row's samples/s over the in-process row and req/s over the no-op's."""

import argparse
import json
import os
import sys
from typing import Any, Dict, List

import pytest
import torch
import yaml

from conftest import REPO
from dlrm_factory import resolve_model_config
from dlrm_request import parse_batch, parse_plain_request, parse_request

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import bench_serve  # noqa: E402
import noop_handler  # noqa: E402


@pytest.mark.parametrize("max_rows", [1000, 100_000])
def test_request_body_is_valid_for_the_capped_tables_and_takes_the_fast_path(max_rows: int) -> None:
    config = bench_serve.served_config(argparse.Namespace(full_config=False, max_rows=max_rows))
    assert max(config["num_embeddings_per_feature"]) == max_rows and len(config["num_embeddings_per_feature"]) == 26
    cfg = resolve_model_config(config)
    body = bench_serve.request_body(config)
    dense, lengths, values, one_sample = parse_request(body, cfg)  # raises on an invalid id
    assert (dense.shape, lengths.shape, values.shape, one_sample) == ((1, 13), (1, 26), (26,), True)
    assert parse_plain_request(json.loads(body), cfg) is not None


@pytest.mark.parametrize("samples", [1, 64])
def test_json_and_binary_bodies_hold_the_same_valid_samples(samples: int) -> None:
    config = bench_serve.served_config(argparse.Namespace(full_config=False, max_rows=1000))
    cfg = resolve_model_config(config)
    bodies = bench_serve.request_bodies(config, samples)
    expected = parse_request(bodies["json"][0], cfg)
    assert expected[0].shape == (samples, 13) and bodies["json"][1] is None
    plan, dense, lengths, values = parse_batch([(bodies["binary"][0], str(bodies["binary"][1]))], cfg)
    assert plan[0][0] == samples
    assert torch.equal(dense, expected[0]) and torch.equal(lengths, expected[1]) and torch.equal(values, expected[2])


def test_full_config_request_is_sample_data_json_itself() -> None:
    config = bench_serve.served_config(argparse.Namespace(full_config=True, max_rows=0))
    with open(os.path.join(REPO, "sample_data.json")) as f:
        assert json.loads(bench_serve.request_body(config)) == json.load(f)


def test_noop_handler_answers_every_request_of_a_batch_with_a_constant() -> None:
    assert noop_handler.handle(None, None) is None  # TorchServe's load-time call
    answers = noop_handler.handle([{"body": b"{}"}] * 3, None)
    assert answers == [noop_handler.ANSWER] * 3 and json.loads(answers[0])["score"] == 0.0


def test_a_thread_count_becomes_the_handlers_torch_num_threads(tmp_path: Any) -> None:
    path = bench_serve.yaml_with_threads(os.path.join(REPO, "model-config.yaml"), 2, str(tmp_path / "t2.yaml"))
    with open(path) as f:
        settings = yaml.safe_load(f)
    assert settings["handler"] == {"torch_num_threads": 2} and settings["batchSize"] == 32
    assert bench_serve.yaml_threads(path) == 2
    args = bench_serve.parse_args(["--threads", "1", "2", "--baseline", "/elsewhere"])
    assert bench_serve.dlrm_models(args) == ["base", "dlrm_t1", "dlrm_t2"]


def run(model: str, connections: int, round_: int, rps: float, samples: int = 256, fmt: str = "json",
        workers: int = 2, threads: int = 1) -> Dict[str, Any]:  # fmt: skip
    return {"model": model, "format": fmt, "samples": samples, "workers": workers, "threads": threads,
            "connections": connections, "round": round_, "rps": rps, "samples_per_s": rps * samples,
            "p50_ms": 10.0 if model != "in-process" else 4.0, "p99_ms": 20.0, "batch": float("nan"),
            "other_cores": 0.0}  # fmt: skip


def test_table_shows_each_cells_best_round_and_ratios_to_in_process_and_noop() -> None:
    runs: List[Dict[str, Any]] = [
        run("in-process", 16, 0, 400.0, fmt="-"), run("in-process", 1, 0, 250.0, fmt="-", workers=1),
        run("noop", 16, 0, 1000.0, threads=0), run("dlrm", 16, 0, 300.0), run("dlrm", 1, 0, 100.0),
        run("noop", 16, 1, 900.0, threads=0), run("dlrm", 16, 1, 320.0), run("noop", 1, 1, 280.0, threads=0),
    ]  # fmt: skip
    table = bench_serve.best_rounds(runs)
    dlrm = next(r for r in table if r["model"] == "dlrm" and r["connections"] == 16)
    assert dlrm["round"] == 1 and dlrm["vs_in_process"] == pytest.approx(320 / 400)
    assert dlrm["vs_noop"] == pytest.approx(320 / 1000)  # the no-op's best round
    lone = next(r for r in table if r["model"] == "dlrm" and r["connections"] == 1)
    assert lone["vs_in_process"] == pytest.approx(100 / 250) and lone["p50_over_in_process_ms"] == pytest.approx(6.0)
    text = bench_serve.markdown(table)
    assert "| dlrm | json | 256 | 2 x 1 | 16 | 320 | 81,920 | 10.00 | 20.00 | +6.00 ms | 0.80x | 0.32x | - | 0.00 |" in text
