"""DLRMFactory (SPEC §3): what it returns, the seed's examples, and the properties a served
model must have. Small configs (tests/conftest.py), fixed seeds; shape first, then values.

Symbols: B batch, N dense features, F sparse features (tables), D embedding dim.
"""

import json
import logging
import math
import os
import subprocess
import sys
from typing import Any, Dict, List, Optional

import pytest
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import dlrm_factory
from conftest import REPO, SMALL_TABLE_SIZES, small_model_config
from dlrm_factory import DLRMFactory, create_default_model_config

FEATURES = ["cat_0", "cat_1", "cat_2"]


def make_kjt(ids_per_sample: List[List[List[int]]], keys: Optional[List[str]] = None) -> KeyedJaggedTensor:
    """ids_per_sample[b][f] = the ids of feature f in sample b -> a key-major KJT."""
    keys = keys or FEATURES
    lengths, values = [], []
    for f in range(len(keys)):
        for sample in ids_per_sample:
            lengths.append(len(sample[f]))
            values.extend(sample[f])
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys,
        values=torch.tensor(values, dtype=torch.int64),
        lengths=torch.tensor(lengths, dtype=torch.int32),
    )


def dense_batch(batch_size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch_size, 13, generator=torch.Generator().manual_seed(seed))


TWO_SAMPLES = [[[1], [2], [3]], [[999], [1999], [4999]]]


def score(model: nn.Module, ids: List[List[List[int]]] = TWO_SAMPLES, seed: int = 0) -> torch.Tensor:
    with torch.inference_mode():
        return model(dense_batch(len(ids), seed), make_kjt(ids))


# --- what DLRMFactory returns -----------------------------------------------------------


def test_factory_returns_an_eval_mode_module_not_a_factory_instance(small_config: Dict[str, Any]) -> None:
    model = DLRMFactory(small_config)
    assert isinstance(model, nn.Module)
    assert not isinstance(model, DLRMFactory)
    assert not model.training


def test_model_maps_dense_and_kjt_to_one_logit_per_sample(small_config: Dict[str, Any]) -> None:
    logits = score(DLRMFactory(small_config))
    assert logits.shape == (2, 1)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_sharding_plan_is_reachable_and_places_every_table(small_config: Dict[str, Any]) -> None:
    model = DLRMFactory(small_config)
    tables = model.plan.plan["sparse_arch.embedding_bag_collection"]
    assert sorted(tables) == ["t_cat_0", "t_cat_1", "t_cat_2"]
    assert all(p.sharding_type == "table_wise" and p.compute_kernel == "quant" for p in tables.values())
    assert "t_cat_2" in str(model.plan)  # printable in a notebook


def test_config_may_be_a_json_file_path(tmp_path: Any, small_config: Dict[str, Any]) -> None:
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(small_config))
    assert torch.equal(score(DLRMFactory(str(path))), score(DLRMFactory(small_config)))


# --- the seed's usage examples ----------------------------------------------------------


def test_seed_example_1_default_config_builds_the_full_criteo_model_on_cpu() -> None:
    """Example 1, literally, in a fresh process: the full default (26 Criteo 1TB tables,
    ~11.3 GiB of int8 rows) builds and scores upstream's sample. Takes ~1 minute."""
    code = (
        "import json, torch\n"
        "from dlrm_factory import DLRMFactory, create_default_model_config\n"
        "from torchrec.sparse.jagged_tensor import KeyedJaggedTensor\n"
        "config = create_default_model_config()\n"
        "model = DLRMFactory(config)\n"
        "s = json.load(open('sample_data.json'))\n"
        "keys = [f'cat_{i}' for i in range(26)]\n"
        "kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys,"
        " values=torch.tensor(s['id_list_features.values']),"
        " lengths=torch.tensor(s['id_list_features.lengths']))\n"
        "rows = sum(config['num_embeddings_per_feature'])\n"
        "with torch.inference_mode():\n"
        "    out = model(torch.tensor([s['float_features']]), kjt)\n"
        "print(json.dumps({'shape': list(out.shape), 'score': out.item(), 'rows': rows}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["shape"] == [1, 1]
    assert math.isfinite(answer["score"])
    assert answer["rows"] == 177_944_275


def test_seed_example_2_custom_config_as_written(caplog: Any) -> None:
    """Example 2 exactly as the seed writes it: 128-wide embeddings, three tables. The last
    dense layer (64) is set to 128 with one warning naming both numbers."""
    config = create_default_model_config()
    config["embedding_dim"] = 128
    config["num_embeddings_per_feature"] = [1000, 2000, 5000]

    with caplog.at_level(logging.WARNING, logger="dlrm_factory"):
        model = DLRMFactory(config)

    warnings = [r.getMessage() for r in caplog.records if r.name == "dlrm_factory" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "64" in warnings[0] and "128" in warnings[0]
    assert model.dense_arch.model._mlp[-1]._linear.out_features == 128
    assert score(model).shape == (2, 1)


def test_seed_example_3_pipeline_steps_compose_to_the_factory(small_config: Dict[str, Any]) -> None:
    """The seven named steps, called by hand in order, give the factory's model."""
    cfg = dlrm_factory.resolve_model_config(small_config)
    compute_device, world_size, dense_device = dlrm_factory.select_devices(cfg)
    eb_configs = dlrm_factory.build_embedding_bag_configs(cfg)
    model = dlrm_factory.build_dlrm(cfg, eb_configs, dense_device)
    model = dlrm_factory.quantize_tables(model, cfg["quant_dtype"])
    plan = dlrm_factory.plan_sharding(model, eb_configs, cfg["sharding_type"], cfg["quant_dtype"], compute_device, world_size)
    model = dlrm_factory.shard_tables(model, plan, cfg["quant_dtype"], compute_device, world_size)
    dlrm_factory.fill_tables(model, cfg, eb_configs)

    assert [c.name for c in eb_configs] == ["t_cat_0", "t_cat_1", "t_cat_2"]
    assert [c.num_embeddings for c in eb_configs] == SMALL_TABLE_SIZES
    assert (compute_device, world_size) == ("cpu", 1)
    assert torch.equal(score(model.eval()), score(DLRMFactory(small_config)))


def test_upstream_style_subclass_builds_with_no_arguments() -> None:
    """TorchServe's loader calls the model file's one class with no arguments."""
    config = small_model_config()

    class Model(DLRMFactory):
        def __new__(cls):
            return super().__new__(cls, config)

    model = Model()
    assert isinstance(model, nn.Module)
    assert torch.equal(score(model), score(DLRMFactory(config)))


# --- the config ---------------------------------------------------------------------


def test_default_config_is_a_fresh_dict_each_call() -> None:
    first = create_default_model_config()
    first["embedding_dim"] = 7
    first["num_embeddings_per_feature"].append(1)
    second = create_default_model_config()
    assert second["embedding_dim"] == 64
    assert len(second["num_embeddings_per_feature"]) == 26
    assert "id_list_features_keys" not in second


def test_model_config_json_holds_the_defaults() -> None:
    with open(os.path.join(REPO, "model_config.json")) as f:
        assert json.load(f) == create_default_model_config()


def test_resolved_config_names_features_cat_0_to_cat_n() -> None:
    cfg = dlrm_factory.resolve_model_config(small_model_config())
    assert cfg["id_list_features_keys"] == FEATURES


INVALID_CONFIGS = [
    # (override, the key the message must name, more of the message)
    ({"embeding_dim": 64}, "embeding_dim", "unknown key"),
    ({"dense_in_features": "13"}, "dense_in_features", "integer > 0"),
    ({"dense_in_features": True}, "dense_in_features", "integer > 0"),
    ({"embedding_dim": 0}, "embedding_dim", "integer > 0"),
    ({"num_embeddings_per_feature": [1000, -5, 10]}, "num_embeddings_per_feature", "each > 0"),
    ({"num_embeddings_per_feature": []}, "num_embeddings_per_feature", "at least 1"),
    ({"num_embeddings_per_feature": [1000, 2.5]}, "num_embeddings_per_feature", "integers"),
    ({"id_list_features_keys": ["a", "b"]}, "id_list_features_keys", "one key per table: 3"),
    ({"id_list_features_keys": ["a", "a", "b"]}, "id_list_features_keys", "unique"),
    ({"over_arch_layer_sizes": [32, 2]}, "over_arch_layer_sizes", "last layer of size 1"),
    ({"over_arch_layer_sizes": [1]}, "over_arch_layer_sizes", "at least 2"),
    ({"quant_dtype": "int3"}, "quant_dtype", "'int8', 'int4', 'fp16', 'fp32'"),
    ({"quant_dtype": "int4", "embedding_dim": 15}, "embedding_dim", "multiple of 4 for int4"),
    ({"quant_dtype": "int4", "embedding_dim": 6}, "embedding_dim", "multiple of 4 for int4"),
    ({"quant_dtype": "int8", "embedding_dim": 5}, "embedding_dim", "multiple of 2 for int8"),
    ({"device": "cuda:x"}, "device", "or 'cuda:<N>'"),
    ({"gpu_memory_fraction": 0}, "gpu_memory_fraction", "number in \\(0, 1\\]"),
    ({"gpu_memory_fraction": 1.5}, "gpu_memory_fraction", "number in \\(0, 1\\]"),
    ({"sharding_type": "data_parallel"}, "sharding_type", "'table_wise', 'row_wise'"),
    ({"sharding_type": "row_wise", "quant_dtype": "fp16"}, "sharding_type", "table_wise' for fp16"),
    ({"device": "tpu"}, "device", "'auto', 'cuda', 'cpu'"),
    ({"world_size": 0}, "world_size", "integer >= 1"),
    ({"seed": -1}, "seed", "integer >= 0"),
    ({"checkpoint": "/nonexistent/ckpt.pt"}, "checkpoint", "existing state_dict file"),
    ({"id_overflow": "wrap"}, "id_overflow", "'error', 'hash'"),
    ({"max_samples_per_request": 0}, "max_samples_per_request", "integer > 0"),
    ({"table_store": ""}, "table_store", "path of a directory"),
    ({"table_store": 3}, "table_store", "null \\(no store\\)"),
    ({"response_format": "v1"}, "response_format", "'dlrm', 'upstream'"),
]


@pytest.mark.parametrize(
    "override, key, expected", INVALID_CONFIGS, ids=[f"{k}:{list(o.values())[0]!r}" for o, k, _ in INVALID_CONFIGS]
)
def test_invalid_config_raises_value_error_naming_the_key(override: Dict[str, Any], key: str, expected: str) -> None:
    config = small_model_config(**override)
    with pytest.raises(ValueError, match=rf"'{key}'.*{expected}|{expected}.*'{key}'") as excinfo:
        DLRMFactory(config)
    assert key in str(excinfo.value)


def test_cuda_requested_without_a_gpu_is_a_value_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    with pytest.raises(ValueError, match=r"'device' is 'cuda'.*no CUDA device"):
        DLRMFactory(small_model_config(device="cuda"))


def test_invalid_config_is_rejected_before_any_table_memory_is_allocated() -> None:
    """A typo in a huge config fails at once: nothing of its 12 GB was allocated."""
    config = create_default_model_config()
    config["quant_dtype"] = "int7"
    with pytest.raises(ValueError, match="quant_dtype"):
        DLRMFactory(config)


# --- the tables hold real weights -----------------------------------------------------


@pytest.mark.parametrize("quant_dtype", ["int8", "int4", "fp16", "fp32"])
def test_changing_one_sparse_id_changes_the_score(quant_dtype: str) -> None:
    model = DLRMFactory(small_model_config(quant_dtype=quant_dtype))
    base = score(model, [[[1], [2], [3]]])
    for feature in range(3):
        ids = [[[1], [2], [3]]]
        ids[0][feature] = [10]
        assert score(model, ids).item() != base.item(), f"feature {feature} had no effect"


def test_random_init_is_uniform_within_torchrec_bounds(small_config: Dict[str, Any]) -> None:
    """Every pooled embedding of one id lies in +-sqrt(1/rows), spread like a uniform draw."""
    model = DLRMFactory(small_config)
    ids = torch.arange(1000)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=FEATURES, values=torch.cat([ids, ids, ids]), lengths=torch.ones(3000, dtype=torch.int32)
    )
    with torch.inference_mode():
        embeddings = model.sparse_arch(kjt)  # [B, F, D]
    assert embeddings.shape == (1000, 3, 16)
    for f, rows in enumerate(SMALL_TABLE_SIZES):
        bound = math.sqrt(1 / rows)
        values = embeddings[:, f, :]
        assert values.abs().max().item() <= bound * (1 + 1e-3)
        assert values.mean().item() == pytest.approx(0.0, abs=0.05 * bound)
        assert values.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)


def test_same_seed_gives_bit_identical_scores_across_builds(small_config: Dict[str, Any]) -> None:
    assert torch.equal(score(DLRMFactory(small_config)), score(DLRMFactory(small_config)))


def test_different_seed_gives_different_scores() -> None:
    a = score(DLRMFactory(small_model_config(seed=0)))
    b = score(DLRMFactory(small_model_config(seed=1)))
    assert not torch.equal(a, b)


def test_same_seed_gives_bit_identical_scores_in_separate_processes(small_config: Dict[str, Any]) -> None:
    code = (
        "import json, sys, torch\n"
        "from test_factory import score\n"
        "from dlrm_factory import DLRMFactory\n"
        "model = DLRMFactory(json.loads(sys.argv[1]))\n"
        "print(score(model).flatten().numpy().tobytes().hex())\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")])}
    answers = [
        subprocess.run(
            [sys.executable, "-c", code, json.dumps(small_config)],
            env=env, capture_output=True, text=True, timeout=300, check=True,
        ).stdout.strip()
        for _ in range(2)
    ]
    assert len(answers[0]) == 2 * 4 * 2  # two float32 scores, hex
    assert answers[0] == answers[1]
    assert answers[0] == score(DLRMFactory(small_config)).flatten().numpy().tobytes().hex()


@pytest.mark.parametrize(
    "quant_dtype, sharding_type",
    [("int8", "table_wise"), ("int8", "row_wise"), ("int4", "row_wise"), ("fp16", "table_wise"), ("fp32", "table_wise")],
)
def test_world_size_2_on_cpu_scores_the_same_as_world_size_1(quant_dtype: str, sharding_type: str) -> None:
    ids = [[[1, 7], [2], [3, 4999]], [[999], [], [4000]], [[0], [1999], [2500]]]
    one = DLRMFactory(small_model_config(quant_dtype=quant_dtype, world_size=1))
    two = DLRMFactory(small_model_config(quant_dtype=quant_dtype, world_size=2, sharding_type=sharding_type))
    ranks = {r for p in two.plan.plan["sparse_arch.embedding_bag_collection"].values() for r in p.ranks}
    assert ranks == {0, 1}  # really spread over two simulated devices
    assert torch.equal(score(one, ids), score(two, ids))


def test_random_weights_do_not_depend_on_chunking_or_shard_boundaries(monkeypatch: Any) -> None:
    """Chunks of 300 rows: row-wise shard edges fall inside chunks, and weights stay equal."""
    ids = [[[1, 299, 300], [2], [3, 4999]], [[999], [1001], [2600]]]
    monkeypatch.setattr(dlrm_factory, "FILL_CHUNK_ROWS", 300)
    one = DLRMFactory(small_model_config(world_size=1))
    two = DLRMFactory(small_model_config(world_size=2, sharding_type="row_wise"))
    assert torch.equal(score(one, ids), score(two, ids))


def test_factory_called_inside_inference_mode_builds_the_same_model(small_config: Dict[str, Any]) -> None:
    """A notebook or server that wraps everything in torch.inference_mode() still builds."""
    with torch.inference_mode():
        model = DLRMFactory(small_config)
    assert torch.equal(score(model), score(DLRMFactory(small_config)))
