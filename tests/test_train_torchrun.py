"""The model as TorchRec trains it, served (README "Train at scale, then serve"): a 2-rank
``torchrun`` training of ``examples/train_dlrm.py`` (gloo, ``DistributedModelParallel``, the
big tables row-wise and the small ones table-wise) -> its ``checkpoint.dcp/`` directory ->
``create_dlrm_mar.sh --checkpoint checkpoint.dcp`` -> a real TorchServe, whose scores are
those of the same weights gathered into one file (DCP's own ``dcp_to_torch_save``) and
served as before.

Small: Criteo's tables capped at 1000 rows (17 tables at the cap: row-wise; 9 smaller ones:
table-wise), D = 16, 40 steps of 2048 samples. From one init (``--init-from``) 1 process and 2
ranks take the same first step here; that they then learn the same (AUC within 0.002 after 8M
samples) is ``benchmarks/bench_dcp.py train``'s figure, not a test.

Symbols: B samples, N = 13 dense features, F = 26 sparse features.
"""

import contextlib
import io
import json
import os
import subprocess
import sys
import zipfile
from typing import Any, Dict, Iterator, List

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from conftest import REPO
from serving import Sample, TorchServe, direct_scores, make_request, predict

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
sys.path.insert(0, os.path.join(REPO, "examples"))

import bench_accuracy  # noqa: E402
import criteo_data  # noqa: E402
import dlrm_checkpoint  # noqa: E402
import dlrm_table_store  # noqa: E402
import train_dlrm  # noqa: E402
from dlrm_factory import DLRMFactory  # noqa: E402
from test_checkpoint import int8_row_error_bound  # noqa: E402

TABLE_CAP = 1000
SEED = 6
STEPS, BATCH = 40, 2048
HELD_OUT = 256  # samples in one request
SCORE_TOLERANCE = 1e-7  # as tests/test_serving.py: batched matmuls may differ by a few ulps
TABLE = "model.sparse_arch.embedding_bag_collection.embedding_bags.t_cat_{}.weight"
SMALL_MODEL = ["--table-cap", str(TABLE_CAP), "--embedding-dim", "16", "--dense-arch", "32,16", "--over-arch", "32,16,1"]


def train_command(out: str, ranks: int, *flags: str) -> List[str]:
    """examples/train_dlrm.py of the small model, in one process (``ranks`` 0) or under torchrun."""
    launcher = [sys.executable] if ranks == 0 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", str(ranks)]  # fmt: skip
    return [*launcher, os.path.join(REPO, "examples", "train_dlrm.py"), "--out", out, *SMALL_MODEL, "--no-progress", *flags]


def run_checked(command: List[str]) -> None:
    """Run ``command``; if it fails, fail the test with the end of its output (each rank's)."""
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    if done.returncode != 0:
        lines = [line for line in done.stdout.splitlines() if "Warning" not in line and "warn(" not in line]
        pytest.fail(f"{' '.join(command)} exited {done.returncode}:\n" + "\n".join(lines[-60:]))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("train_torchrun"))


@pytest.fixture(scope="module")
def trained(workdir: str) -> Dict[str, Any]:
    """The README's command, small: ``torchrun --standalone --nproc_per_node 2 train_dlrm.py``."""
    out = os.path.join(workdir, "trained")
    run_checked(train_command(out, 2, "--row-wise-min-rows", str(TABLE_CAP), "--train-samples", str(STEPS * BATCH),
                              "--batch-size", str(BATCH), "--eval-samples", "20000", "--seed", str(SEED)))  # fmt: skip
    with open(os.path.join(out, "model_config.json")) as f:
        config = json.load(f)
    with open(os.path.join(out, "training.json")) as f:
        training = json.load(f)
    return {"out": out, "dcp": os.path.join(out, "checkpoint.dcp"), "config": config, "training": training}


@pytest.fixture(scope="module")
def gathered(workdir: str, trained: Dict[str, Any]) -> str:
    """The same weights in one file, gathered by DCP itself: what was served before."""
    path = os.path.join(workdir, "gathered.pt")
    dcp_to_torch_save(trained["dcp"], path)
    return path


@pytest.fixture(scope="module")
def float_model(trained: Dict[str, Any], gathered: str) -> torch.nn.Module:
    model = train_dlrm.build_train_model(trained["config"], seed=0)
    model.load_state_dict(torch.load(gathered, weights_only=True))
    return model.model.eval()


@pytest.fixture(scope="module")
def torchserve(workdir: str, trained: Dict[str, Any]) -> Iterator[TorchServe]:
    """The README's packaging command with the DCP directory, then a real TorchServe."""
    store = os.path.join(workdir, "model_store")
    subprocess.run(
        [os.path.join(REPO, "create_dlrm_mar.sh"), "--config", os.path.join(trained["out"], "model_config.json"),
         "--checkpoint", trained["dcp"], "--export-path", store, "--model-name", "sharded"],
        check=True, timeout=300,
    )  # fmt: skip
    with TorchServe.serving(workdir, store, models={"sharded": {}},
                            env={"DLRM_TABLE_STORE": os.path.join(workdir, "table_store")}) as server:  # fmt: skip
        yield server


@pytest.fixture(scope="module")
def held_out(trained: Dict[str, Any]) -> List[Sample]:
    samples = criteo_data.SyntheticCriteo(table_sizes=trained["config"]["num_embeddings_per_feature"], seed=SEED).sample(
        HELD_OUT, criteo_data.HELD_OUT
    )
    return [(dense, [[i] for i in ids]) for dense, ids in zip(samples.dense.tolist(), samples.ids.tolist())]


def test_plan_shards_the_big_tables_row_wise_and_the_small_ones_table_wise(trained: Dict[str, Any]) -> None:
    sizes = trained["config"]["num_embeddings_per_feature"]
    assert trained["training"]["world_size"] == 2
    assert trained["training"]["sharding"] == {
        f"t_cat_{i}": "row_wise" if rows >= TABLE_CAP else "table_wise" for i, rows in enumerate(sizes)
    }
    assert 0 < sizes.count(TABLE_CAP) < len(sizes)  # both kinds present


def test_each_rank_writes_its_own_shards_into_the_dcp_directory(trained: Dict[str, Any]) -> None:
    """A row-wise table is a chunk of rows in each rank's file; a table-wise one, one chunk."""
    assert sorted(os.listdir(trained["dcp"])) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    state = dlrm_checkpoint.read_dcp(trained["dcp"])
    row_wise, table_wise = state[TABLE.format(0)], state[TABLE.format(5)]  # 1000 and 3 rows
    assert [(c.first_row, c.rows) for c in row_wise.chunks] == [(0, 500), (500, 500)]
    assert {os.path.basename(c.path) for c in row_wise.chunks} == {"__0_0.distcp", "__1_0.distcp"}
    assert [(c.first_row, c.rows) for c in table_wise.chunks] == [(0, 3)]


def test_two_ranks_saw_the_samples_one_process_would(trained: Dict[str, Any]) -> None:
    """Each global batch of 2048 cut in two slices of 1024: 40 steps, 81,920 samples."""
    figures = trained["training"]["figures"]
    assert (figures["steps"], figures["samples"]) == (STEPS, STEPS * BATCH)
    assert figures["last_loss"] < figures["first_loss"] - 0.4
    assert figures["auc"] > 0.6


def test_dcp_served_by_torchserve_scores_as_the_gathered_single_file_served_as_before(
    torchserve: TorchServe, trained: Dict[str, Any], gathered: str, held_out: List[Sample]
) -> None:
    config = trained["config"]
    status, answer = predict(torchserve, "sharded", make_request(held_out))
    assert status == 200
    assert len(answer["score"]) == HELD_OUT
    from_file = DLRMFactory({**config, "checkpoint": gathered})  # int8, as packaged
    assert answer["score"] == pytest.approx(direct_scores(from_file, config["id_list_features_keys"], held_out),
                                            rel=0, abs=SCORE_TOLERANCE)  # fmt: skip
    log = torchserve.model_log("table store: built")
    assert "checkpoint.dcp" in log


def test_fp32_from_the_dcp_scores_exactly_as_the_gathered_float_model(
    trained: Dict[str, Any], float_model: torch.nn.Module, held_out: List[Sample]
) -> None:
    config, keys = trained["config"], trained["config"]["id_list_features_keys"]
    served = DLRMFactory({**config, "quant_dtype": "fp32", "checkpoint": trained["dcp"]})
    expected = direct_scores(float_model, keys, held_out)
    assert direct_scores(served, keys, held_out) == pytest.approx(expected, rel=0, abs=1e-6)


def test_int8_from_the_dcp_is_within_the_row_wise_quantization_bound(
    trained: Dict[str, Any], float_model: torch.nn.Module, held_out: List[Sample]
) -> None:
    """Each pooled embedding within its rows' int8 bound (tests/test_checkpoint.py derives it),
    served on 2 simulated ranks, row-wise."""
    config, keys = trained["config"], trained["config"]["id_list_features_keys"]
    served = DLRMFactory({**config, "checkpoint": trained["dcp"], "world_size": 2, "sharding_type": "row_wise"})
    ids = torch.tensor([[bag[0] for bag in bags] for _, bags in held_out])  # [B, F], one id a bag
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=ids.t().reshape(-1), lengths=torch.ones(ids.numel(), dtype=torch.int64))
    with torch.inference_mode():
        got, expected = served.sparse_arch(kjt), float_model.sparse_arch(kjt)  # [B, F, D]
    tables = float_model.sparse_arch.embedding_bag_collection.embedding_bags
    bound = torch.stack([int8_row_error_bound(tables[f"t_{key}"].weight[ids[:, f]]) for f, key in enumerate(keys)], dim=1)
    assert got.shape == expected.shape == (HELD_OUT, len(keys), 16)
    assert ((got - expected).abs() <= bound.unsqueeze(-1) + 1e-7).all()
    assert (got - expected).abs().max() > 0


def test_bench_accuracy_reads_a_dcp_model_dir_and_agrees_with_the_distributed_evaluation(
    trained: Dict[str, Any], tmp_path: Any
) -> None:
    """``--model-dir`` holding checkpoint.dcp/: the float model built from it scores the held-out
    set as the 2 ranks did (sharded, gathered) to float rounding."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = bench_accuracy.main(["--model-dir", trained["out"], "--dtypes", "int8", "--world-sizes", "1",
                                      "--plot", str(tmp_path / "plot.png")])  # fmt: skip
    assert result["results"][0].auc == pytest.approx(trained["training"]["figures"]["auc"], abs=1e-4)
    assert result["results"][1].max_score_diff < 0.05  # int8 of the same weights


def test_mar_holds_the_dcp_directory_and_its_digest(workdir: str, torchserve: TorchServe, trained: Dict[str, Any]) -> None:
    with zipfile.ZipFile(os.path.join(workdir, "model_store", "sharded.mar")) as mar:
        names = set(mar.namelist())
        sidecar = mar.read("checkpoint.dcp.sha256").decode()
    assert {"checkpoint.dcp/.metadata", "checkpoint.dcp/__0_0.distcp", "checkpoint.dcp/__1_0.distcp"} <= names
    assert sidecar.split()[0] == dlrm_table_store.directory_sha256(trained["dcp"])


def test_one_process_and_two_ranks_from_one_init_take_the_same_first_step(tmp_path: Any) -> None:
    """``--init-from`` a DCP checkpoint of the single process's seeded init: both runs start
    from exactly those weights (lr 0 keeps them: the saved checkpoints equal the init) and
    score the same first batch of 2048 samples with the same loss - the 2 ranks' mean of
    their two halves' losses is the single process's loss over the whole batch."""
    args = train_dlrm.parse_args(["--out", str(tmp_path), *SMALL_MODEL])
    config = train_dlrm.model_config(criteo_data.capped_table_sizes(TABLE_CAP), 16, args.dense_arch, args.over_arch)
    init = train_dlrm.build_train_model(config, seed=9).state_dict()
    dcp.save(init, checkpoint_id=str(tmp_path / "init.dcp"), no_dist=True)
    flags = ["--init-from", str(tmp_path / "init.dcp"), "--lr", "0", "--train-samples", "2048", "--batch-size", "2048",
             "--eval-samples", "2000", "--row-wise-min-rows", str(TABLE_CAP)]  # fmt: skip
    run_checked(train_command(str(tmp_path / "one"), 0, *flags))
    run_checked(train_command(str(tmp_path / "two"), 2, *flags))

    one = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    two = {name: tensor[:] for name, tensor in dlrm_checkpoint.read_dcp(str(tmp_path / "two" / "checkpoint.dcp")).items()}
    assert sorted(one) == sorted(two) == sorted(init)
    assert all(torch.equal(one[k], init[k]) and torch.equal(two[k], init[k]) for k in init)
    one_figures, two_figures = (json.loads((tmp_path / run / "training.json").read_text())["figures"] for run in ("one", "two"))
    assert one_figures["samples"] == two_figures["samples"] == 2048
    assert two_figures["first_loss"] == pytest.approx(one_figures["first_loss"], rel=1e-6)
    assert two_figures["auc"] == pytest.approx(one_figures["auc"], abs=1e-6)  # the same weights, scored sharded
