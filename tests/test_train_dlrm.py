"""examples/train_dlrm.py and examples/criteo_data.py: the Criteo TSV reader on a tiny file, the
synthetic generator, the metrics, and a short training run whose checkpoint the factory serves.

Symbols: N samples, I = 13 dense features, C = 26 sparse features.
"""

import json
import math
import os
import sys
from typing import Any, Dict, List

import numpy as np
import pytest
import torch

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "examples"))

import criteo_data  # noqa: E402
import dlrm_row_order  # noqa: E402
import train_dlrm  # noqa: E402
from criteo_data import SyntheticCriteo  # noqa: E402
from dlrm_factory import DLRMFactory  # noqa: E402

# Tables of the short runs: Criteo's sizes capped at 1000 rows (11,000-odd rows in all).
SMALL_CAP = 1000
SMALL_SIZES = criteo_data.capped_table_sizes(SMALL_CAP)

# Three Criteo lines: all present; missing values everywhere (empty columns); a negative
# integer (Criteo 1TB's I2 has some) and a hex value beyond every table.
TSV_LINES = [
    ["1", "0", "5", "", "2", "1383", "", "", "", "", "", "", "", "7"]
    + ["68fd1e64", "80e26c9b", "fb936136", "7b4723c4", "25c83c98", "7e0ccccf", "de7995b8", "1f89b562",
       "a73ee510", "a8cd5504", "b2cb9c98", "37c9c164", "2824a5f6", "1adce6ef", "8ba8b39a", "891b62e7",
       "e5ba7672", "f54016b9", "21ddcdc9", "b1252a9d", "07b5194c", "", "3a171ecb", "c5c50484",
       "e8b83407", "9727dd16"],  # fmt: skip
    ["0"] + [""] * 13 + [""] * 26,
    ["0", "-3", "1"] + ["0"] * 11 + ["ffffffff"] * 26,
]


@pytest.fixture
def tiny_tsv(tmp_path: Any) -> str:
    path = tmp_path / "day_0"
    path.write_text("".join("\t".join(columns) + "\n" for columns in TSV_LINES))
    return str(path)


def test_tsv_reader_follows_criteo_conventions(tiny_tsv: str) -> None:
    """Labels as given; dense log(x + 1), missing and negative values as 0; hex mod table size."""
    samples = criteo_data.read_criteo_tsv([tiny_tsv], SMALL_SIZES)
    assert samples.dense.shape == (3, 13) and samples.ids.shape == (3, 26) and samples.labels.shape == (3,)
    assert samples.labels.tolist() == [1.0, 0.0, 0.0]
    expected_dense = [math.log(x + 1) for x in [0, 5, 0, 2, 1383, 0, 0, 0, 0, 0, 0, 0, 7]]
    torch.testing.assert_close(samples.dense[0], torch.tensor(expected_dense), rtol=0, atol=1e-6)
    assert samples.dense[1].tolist() == [0.0] * 13
    torch.testing.assert_close(samples.dense[2, :2], torch.tensor([0.0, math.log(2)]))  # -3 -> 0
    assert samples.ids[0, 0].item() == 0x68FD1E64 % SMALL_SIZES[0]
    assert samples.ids[0, 5].item() == 0x7E0CCCCF % 3  # Criteo's 3-row table
    assert samples.ids[0, 21].item() == 0  # missing
    assert samples.ids[1].tolist() == [0] * 26
    assert samples.ids[2].tolist() == [0xFFFFFFFF % size for size in SMALL_SIZES]


def test_tsv_reader_streams_a_file_in_chunks_equal_to_reading_it_whole(tiny_tsv: str) -> None:
    chunks = list(criteo_data.iter_criteo_tsv([tiny_tsv], SMALL_SIZES, chunk_rows=2))
    whole = criteo_data.read_criteo_tsv([tiny_tsv], SMALL_SIZES)
    assert [len(c) for c in chunks] == [2, 1]
    assert torch.equal(torch.cat([c.ids for c in chunks]), whole.ids)
    assert torch.equal(torch.cat([c.dense for c in chunks]), whole.dense)


def test_tsv_line_with_a_missing_column_is_a_value_error_naming_file_and_line(tmp_path: Any) -> None:
    path = tmp_path / "bad"
    path.write_text("\t".join(TSV_LINES[1]) + "\n" + "\t".join(TSV_LINES[1][:-1]) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:2: 39 tab-separated columns; expected 40"):
        criteo_data.read_criteo_tsv([str(path)], SMALL_SIZES)


def test_tsv_value_that_is_not_hex_is_a_value_error_naming_the_line(tmp_path: Any) -> None:
    path = tmp_path / "bad"
    path.write_text("\t".join(TSV_LINES[2][:-1] + ["not-hex"]) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:1: invalid literal"):
        criteo_data.read_criteo_tsv([str(path)], SMALL_SIZES)


def test_request_from_tsv_lines_sends_preprocessed_dense_and_raw_categorical_values(
    tiny_tsv: str, capsys: pytest.CaptureFixture
) -> None:
    """What a client of a served model sends for Criteo lines (the server hashes the ids)."""
    criteo_data.main([tiny_tsv, "--lines", "2"])
    body = json.loads(capsys.readouterr().out)
    samples = criteo_data.read_criteo_tsv([tiny_tsv], SMALL_SIZES, max_rows=2)
    assert body["float_features"] == samples.dense.tolist()
    assert body["id_list_features.lengths"] == [1] * 52
    assert body["id_list_features.values"][:2] == [0x68FD1E64, 0x80E26C9B]  # sample 0's first ids, raw
    assert [v % size for v, size in zip(body["id_list_features.values"], SMALL_SIZES * 2)] == samples.ids.flatten().tolist()


@pytest.fixture(scope="module")
def world() -> SyntheticCriteo:
    return SyntheticCriteo(table_sizes=SMALL_SIZES, seed=3)


def test_synthetic_samples_are_deterministic_per_seed_and_stream(world: SyntheticCriteo) -> None:
    a = world.sample(1000, criteo_data.TRAIN, 5)
    b = SyntheticCriteo(table_sizes=SMALL_SIZES, seed=3).sample(1000, criteo_data.TRAIN, 5)
    other = world.sample(1000, criteo_data.TRAIN, 6)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.dense, b.dense) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.ids, other.ids)


def test_synthetic_data_has_criteo_shapes_the_base_click_rate_and_zipf_ids(world: SyntheticCriteo) -> None:
    samples = world.sample(100_000, criteo_data.HELD_OUT)
    assert samples.dense.shape == (100_000, 13) and samples.ids.shape == (100_000, 26)
    assert (samples.ids >= 0).all() and (samples.ids < torch.tensor(SMALL_SIZES)).all()
    assert samples.labels.mean().item() == pytest.approx(0.03, abs=0.003)  # binomial sd 0.0005
    # Zipf(1.05) over 1000 ids: the most frequent id takes 1 / sum_k (k+1)^-1.05 of the samples.
    top_share = torch.bincount(samples.ids[:, 0]).max().item() / 100_000
    assert top_share == pytest.approx(1 / sum((k + 1) ** -1.05 for k in range(1000)), rel=0.05)
    assert (samples.dense[:, 0] == 0).float().mean().item() > 0  # missing counts read as 0


def test_oracle_logit_ranks_clicks_better_than_any_single_feature(world: SyntheticCriteo) -> None:
    samples = world.sample(100_000, criteo_data.HELD_OUT)
    oracle = train_dlrm.auc(samples.oracle_logit, samples.labels)
    best_dense = max(max(train_dlrm.auc(samples.dense[:, j], samples.labels),
                         train_dlrm.auc(-samples.dense[:, j], samples.labels)) for j in range(13))  # fmt: skip
    assert 0.75 < oracle < 0.95
    assert oracle > best_dense + 0.05


AUC_CASES = [
    ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.75),  # one of four pairs mis-ordered
    ([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1], 0.5),  # all tied: one half each
    ([0.2, 0.7, 0.7, 0.9], [0, 0, 1, 1], 0.875),  # one tied pair counts 0.5
    ([3.0, 2.0, 1.0], [0, 1, 1], 0.0),
]


@pytest.mark.parametrize("scores, labels, expected", AUC_CASES)
def test_auc_is_the_share_of_click_non_click_pairs_ordered_right_ties_half(
    scores: List[float], labels: List[int], expected: float
) -> None:
    assert train_dlrm.auc(torch.tensor(scores), torch.tensor(labels)) == pytest.approx(expected, abs=1e-12)


def test_log_loss_is_the_mean_binary_cross_entropy() -> None:
    logits, labels = torch.tensor([0.0, 2.0, -1.0]), torch.tensor([1.0, 0.0, 0.0])
    expected = (math.log(2) + math.log(1 + math.exp(2)) + math.log(1 + math.exp(-1))) / 3
    assert train_dlrm.log_loss(logits, labels) == pytest.approx(expected, rel=1e-12)


def test_training_on_tsv_files_takes_every_line_and_evaluates_on_the_eval_file(tiny_tsv: str, tmp_path: Any) -> None:
    training = train_dlrm.main([
        "--out", str(tmp_path / "out"), "--train-tsv", tiny_tsv, tiny_tsv, "--eval-tsv", tiny_tsv,
        "--batch-size", "4", "--table-cap", "100", "--embedding-dim", "4", "--dense-arch", "4",
        "--over-arch", "4,1", "--no-progress",
    ])  # fmt: skip
    assert training["data"] == {"source": "tsv", "train": [tiny_tsv, tiny_tsv], "eval": [tiny_tsv]}
    assert training["figures"]["steps"] == 2 and training["figures"]["samples"] == 6  # batches of 4 and 2
    assert training["figures"]["eval_samples"] == 3
    assert os.path.isfile(tmp_path / "out" / "checkpoint.pt")
    _, counts, samples = dlrm_row_order.read_counts(str(tmp_path / "out" / "id_counts.safetensors"))
    expected = criteo_data.read_criteo_tsv([tiny_tsv], criteo_data.capped_table_sizes(100)).ids
    assert samples == 6  # every line trained on, each file's ids counted: each id twice
    assert counts["cat_0"][0].tolist() == sorted(set(expected[:, 0].tolist()))
    assert counts["cat_0"][1].sum() == 6 and set(counts["cat_0"][1].tolist()) <= {2, 4, 6}


# --- a short training run ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    """80 steps of 2048 synthetic samples on Criteo's tables capped at 1000 rows (~5 s)."""
    out = str(tmp_path_factory.mktemp("trained"))
    training = train_dlrm.main([
        "--out", out, "--table-cap", str(SMALL_CAP), "--train-samples", str(80 * 2048), "--batch-size", "2048",
        "--eval-samples", "50000", "--embedding-dim", "16", "--dense-arch", "32,16", "--over-arch", "32,16,1",
        "--seed", "3", "--no-progress",
    ])  # fmt: skip
    return {"out": out, "training": training}


def test_short_training_run_lowers_the_loss_below_the_best_constant(short_run: Dict[str, Any]) -> None:
    """From ~log 2 at init to below the entropy of a 3 % click rate: the features are used."""
    figures = short_run["training"]["figures"]
    constant = -(0.03 * math.log(0.03) + 0.97 * math.log(0.97))  # 0.1347: predicting the rate
    assert figures["steps"] == 80
    assert figures["first_loss"] == pytest.approx(math.log(2), abs=0.1)
    assert figures["last_loss"] < figures["first_loss"] - 0.4
    assert figures["log_loss"] < constant
    assert figures["auc"] > 0.65


def test_training_writes_the_id_counts_its_config_orders_an_entry_by(short_run: Dict[str, Any], tmp_path: Any) -> None:
    out = short_run["out"]
    with open(os.path.join(out, "model_config.json")) as f:
        config = json.load(f)

    tables, counts, samples = dlrm_row_order.read_counts(os.path.join(out, "id_counts.safetensors"))

    assert tables == list(zip(config["id_list_features_keys"], SMALL_SIZES)) and samples == 80 * 2048
    assert all(seen.sum() == samples for _, seen in counts.values())  # one id a table a sample
    seen = counts["cat_0"][1]
    assert seen.max() > 10 * np.median(seen)  # Zipf: a few ids carry most lookups
    model = DLRMFactory({**config, "device": "cpu", "table_store": str(tmp_path),
                         "id_counts": os.path.join(out, "id_counts.safetensors")})  # fmt: skip
    assert "-ordered-" in model.table_store_entry["path"]


def test_training_writes_a_checkpoint_and_config_that_the_factory_serves_exactly(short_run: Dict[str, Any]) -> None:
    """fp32 tables: the served model scores as the trained float DLRM."""
    out = short_run["out"]
    with open(os.path.join(out, "model_config.json")) as f:
        config = json.load(f)
    trained = train_dlrm.build_train_model(config, seed=0)
    trained.load_state_dict(torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True))
    assert config["id_overflow"] == "hash" and config["num_embeddings_per_feature"] == SMALL_SIZES
    served = DLRMFactory({**config, "quant_dtype": "fp32", "device": "cpu", "checkpoint": os.path.join(out, "checkpoint.pt")})
    samples = SyntheticCriteo(table_sizes=SMALL_SIZES, seed=3).sample(512, criteo_data.HELD_OUT)
    keys = config["id_list_features_keys"]
    expected = train_dlrm.predict(trained.model.eval(), samples, keys)
    got = train_dlrm.predict(served, samples, keys)
    assert got.shape == (512,)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
