"""benchmarks/bench_serve.py without a server: the request it sends is valid for the model
it serves (every answer must be a 200), the do-nothing handler answers each request of a
batch, and the table's ratios are the rows' req/s and p99 over the no-op's."""

import argparse
import json
import os
import sys
from typing import Any, Dict, List

import pytest

from conftest import REPO
from dlrm_factory import resolve_model_config
from dlrm_request import parse_plain_request, parse_request

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


def test_full_config_request_is_sample_data_json_itself() -> None:
    config = bench_serve.served_config(argparse.Namespace(full_config=True, max_rows=0))
    with open(os.path.join(REPO, "sample_data.json")) as f:
        assert json.loads(bench_serve.request_body(config)) == json.load(f)


def test_noop_handler_answers_every_request_of_a_batch_with_a_constant() -> None:
    assert noop_handler.handle(None, None) is None  # TorchServe's load-time call
    answers = noop_handler.handle([{"body": b"{}"}] * 3, None)
    assert answers == [noop_handler.ANSWER] * 3 and json.loads(answers[0])["score"] == 0.0


def run(model: str, connections: int, round_: int, rps: float, p99: float, workers: int = 1) -> Dict[str, Any]:
    return {"model": model, "workers": workers, "connections": connections, "round": round_, "rps": rps,
            "p50_ms": 1.0, "p99_ms": p99, "batch": float("nan"), "other_cores": 0.0}  # fmt: skip


def test_table_shows_each_cells_best_round_and_ratios_to_the_noop_row() -> None:
    runs: List[Dict[str, Any]] = [
        run("noop", 32, 0, 1000.0, 10.0), run("dlrm", 32, 0, 700.0, 12.0),
        run("noop", 32, 1, 1200.0, 8.0), run("dlrm", 32, 1, 600.0, 30.0),
    ]  # fmt: skip
    noop, dlrm = bench_serve.best_rounds(runs, [1], [32], ["noop", "dlrm"])
    assert (noop["round"], dlrm["round"]) == (1, 0)
    assert dlrm["ratio"] == pytest.approx(700 / 1200) and dlrm["p99_ratio"] == pytest.approx(12 / 8)
    table = bench_serve.markdown([noop, dlrm])
    assert "| dlrm | 1 | 32 | 700 | 1.00 | 12.00 | 0.58x, 1.50x | - | 0.00 |" in table


def test_each_worker_count_is_compared_with_the_noop_at_the_same_worker_count() -> None:
    runs = [run("noop", 32, 0, 1000.0, 10.0, workers=1), run("dlrm", 32, 0, 500.0, 20.0, workers=1),
            run("noop", 32, 0, 900.0, 12.0, workers=2), run("dlrm", 32, 0, 720.0, 15.0, workers=2)]  # fmt: skip
    rows = bench_serve.best_rounds(runs, [1, 2], [32], ["noop", "dlrm"])
    assert [(r["model"], r["workers"]) for r in rows] == [("noop", 1), ("dlrm", 1), ("noop", 2), ("dlrm", 2)]
    assert rows[1]["ratio"] == pytest.approx(0.5) and rows[3]["ratio"] == pytest.approx(0.8)
