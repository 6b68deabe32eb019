"""The model benchmark's pieces: its FLOP count, and that every contender (the lean forward,
float TorchRec, plain PyTorch) scores exactly like the factory model. No timings asserted."""

import importlib.util
import os
from typing import Any, Dict, List

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm_factory import DLRMFactory, create_default_model_config
from dlrm_lean_forward import optimize_for_inference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("bench_model", os.path.join(REPO, "benchmarks", "bench_model.py"))
bench_model = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_model)

MAX_ROWS = 1000  # 26 tables of at most 1000 rows: builds in about a second
ATOL = 1e-5


@pytest.fixture(scope="module")
def cfg() -> Dict[str, Any]:
    return bench_model.bench_config(MAX_ROWS)


@pytest.fixture(scope="module")
def ours(cfg: Dict[str, Any]) -> torch.nn.Module:
    return DLRMFactory(cfg)


def multi_hot_kjt(cfg: Dict[str, Any], batch: int, seed: int) -> KeyedJaggedTensor:
    """F x B bags of 0..3 ids each (key-major), ids uniform within each table."""
    gen = torch.Generator().manual_seed(seed)
    keys: List[str] = cfg["id_list_features_keys"]
    lengths = torch.randint(0, 4, (len(keys) * batch,), generator=gen)
    values = torch.cat(
        [
            torch.randint(0, rows, (int(n),), generator=gen)
            for rows, n in zip(cfg["num_embeddings_per_feature"], lengths.view(len(keys), batch).sum(1))
        ]
    )
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths)


def test_flops_per_sample_of_the_default_is_1_61_mflop() -> None:
    flops = bench_model.dense_flops_per_sample(create_default_model_config())
    assert flops == {
        "dense_mlp": 2 * (13 * 512 + 512 * 256 + 256 * 64),
        "interaction_bmm": 2 * 27 * 27 * 64,
        "over_mlp": 2 * (415 * 512 + 512 * 512 + 512 * 256 + 256 * 1),
        "total": 1_613_440,
    }


def test_cap_applies_to_every_table(cfg: Dict[str, Any]) -> None:
    assert len(cfg["num_embeddings_per_feature"]) == 26
    assert max(cfg["num_embeddings_per_feature"]) == MAX_ROWS
    assert min(cfg["num_embeddings_per_feature"]) == 3  # small tables are kept as they are


@pytest.mark.parametrize("batch, chunk_rows", [(1, 1024), (7, 1024), (10, 4), (64, 16)])
def test_optimized_forward_scores_like_the_factory_model(
    cfg: Dict[str, Any], ours: torch.nn.Module, batch: int, chunk_rows: int
) -> None:
    fast = optimize_for_inference(DLRMFactory(cfg), chunk_rows=chunk_rows)
    assert fast.forward is not fast.reference_forward  # the lean path is in place
    dense = torch.rand(batch, cfg["dense_in_features"], generator=torch.Generator().manual_seed(batch))
    kjt = multi_hot_kjt(cfg, batch, seed=batch)  # multi-hot, empty bags included
    with torch.inference_mode():
        want = ours(dense, kjt)
        got = fast(dense, kjt)
    assert got.shape == (batch, 1)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_optimized_forward_reorders_keys(cfg: Dict[str, Any], ours: torch.nn.Module) -> None:
    fast = optimize_for_inference(DLRMFactory(cfg))
    kjt = multi_hot_kjt(cfg, 5, seed=1)
    reordered = kjt.permute(list(reversed(range(len(kjt.keys())))))
    dense = torch.rand(5, cfg["dense_in_features"])
    with torch.inference_mode():
        torch.testing.assert_close(fast(dense, reordered), ours(dense, kjt), atol=ATOL, rtol=0)


def test_float_contenders_hold_the_dequantized_tables(cfg: Dict[str, Any], ours: torch.nn.Module) -> None:
    tables = bench_model.dequantized_tables(ours, cfg)
    float_dlrm = bench_model.build_torchrec_float(cfg, ours, tables)
    plain = bench_model.PlainDLRM(cfg, tables).load_dense_from(ours).eval()
    dense = torch.rand(9, cfg["dense_in_features"])
    kjt = multi_hot_kjt(cfg, 9, seed=3)
    with torch.inference_mode():
        want = ours(dense, kjt)
        torch.testing.assert_close(float_dlrm(dense, kjt), want, atol=ATOL, rtol=0)
        torch.testing.assert_close(plain(dense, kjt), want, atol=ATOL, rtol=0)


def test_benchmark_runs_end_to_end(tmp_path: Any, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bench.png"
    argv = ["--max-rows", str(MAX_ROWS), "--batches", "1,8", "--repeats", "1", "--min-time", "0",
            "--malloc", "default", "--out", str(out)]  # fmt: skip
    assert bench_model.main(argv) == 0
    printed = capsys.readouterr().out
    assert "capped at 1,000 rows" in printed
    for name in bench_model.DEFAULT_CONTENDERS:
        assert f"| {name} | 8 |" in printed
    assert out.stat().st_size > 0
