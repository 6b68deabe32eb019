"""Serving a trained model (SPEC §3): a float TorchRec ``DLRM.state_dict()`` is quantized table
by table into the shards. fp32 serves it exactly; int8 within the error bound derived below.

Symbols: B batch, F tables, D embedding dim.
"""

import math
import pickle
from typing import Any, Dict

import pytest
import torch
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_modules import EmbeddingBagCollection

import dlrm_factory
from conftest import small_model_config
from dlrm_factory import DLRMFactory
from test_factory import dense_batch, make_kjt

# Multi-hot bags (lengths 0..3) over every table, first and last rows included.
IDS = [
    [[1, 7], [2], [3, 4999]],
    [[999], [], [4000]],
    [[0, 500, 501], [1999], [2500]],
    [[123], [1234, 5, 6], []],
]


def float_dlrm(config: Dict[str, Any], seed: int = 7) -> DLRM:
    """A trained model stands in: a float TorchRec DLRM with TorchRec's own random init."""
    cfg = dlrm_factory.resolve_model_config(config)
    torch.manual_seed(seed)
    return DLRM(
        embedding_bag_collection=EmbeddingBagCollection(
            tables=dlrm_factory.build_embedding_bag_configs(cfg), device=torch.device("cpu")
        ),
        dense_in_features=cfg["dense_in_features"],
        dense_arch_layer_sizes=cfg["dense_arch_layer_sizes"],
        over_arch_layer_sizes=cfg["over_arch_layer_sizes"],
    ).eval()


@pytest.fixture
def trained(tmp_path: Any) -> Dict[str, Any]:
    model = float_dlrm(small_model_config())
    path = tmp_path / "dlrm.pt"
    torch.save(model.state_dict(), path)
    return {"model": model, "path": str(path)}


def served(path: str, **overrides: Any) -> torch.nn.Module:
    return DLRMFactory(small_model_config(checkpoint=path, **overrides))


def scores(model: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(dense_batch(len(IDS)), make_kjt(IDS))


def test_fp32_checkpoint_is_served_exactly(trained: Dict[str, Any]) -> None:
    """Same weights, same arithmetic up to float32 summation order in the pooled lookups."""
    expected = scores(trained["model"])
    got = scores(served(trained["path"], quant_dtype="fp32"))
    assert got.shape == (len(IDS), 1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("world_size, sharding_type", [(2, "table_wise"), (2, "row_wise")])
def test_checkpoint_served_on_two_simulated_devices_equals_one(
    trained: Dict[str, Any], world_size: int, sharding_type: str, monkeypatch: Any
) -> None:
    monkeypatch.setattr(dlrm_factory, "FILL_CHUNK_ROWS", 300)  # several chunks per shard
    one = scores(served(trained["path"]))
    two = scores(served(trained["path"], world_size=world_size, sharding_type=sharding_type))
    assert torch.equal(one, two)


def int8_row_error_bound(rows: torch.Tensor) -> torch.Tensor:
    """The largest |x - dequant(quant(x))| of each row under fbgemm's row-wise int8
    (``FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf``, what TorchRec's quantization calls).

    A row x is stored as codes q in [0, 255] with bias b = fp16(min x) and scale
    s = fp16((max x - b) / 255); it reads back as q*s + b with q = clamp(round((x - b) / s)).
      - rounding to the nearest code: s/2;
      - the fp16 bias: |min x - b| <= 2^-11 |min x| (relative rounding of fp16);
      - the fp16 scale, multiplied by up to 255 codes: 255 |s - s_exact| <= 255 * 2^-11 * s.
    So |error| <= s/2 + 2^-11 (|min x| + 255 s), plus 2^-24 for fp16 subnormals."""
    lo, hi = rows.min(dim=1).values, rows.max(dim=1).values
    scale = (hi - lo) / 255
    return scale / 2 + 2**-11 * (lo.abs() + 255 * scale) + 2**-24


def test_int8_pooled_embeddings_are_within_the_row_wise_quantization_bound(trained: Dict[str, Any]) -> None:
    """Each pooled bag's error is at most the sum of its rows' bounds."""
    model = served(trained["path"])
    kjt = make_kjt(IDS)
    with torch.inference_mode():
        got = model.sparse_arch(kjt)  # [B, F, D]
        expected = trained["model"].sparse_arch(kjt)
    tables = trained["model"].sparse_arch.embedding_bag_collection.embedding_bags
    bound = torch.zeros(len(IDS), 3, 1)
    for b, sample in enumerate(IDS):
        for f, ids in enumerate(sample):
            if ids:
                bound[b, f, 0] = int8_row_error_bound(tables[f"t_cat_{f}"].weight[ids]).sum()
    error = (got - expected).abs()
    assert got.shape == expected.shape == (len(IDS), 3, 16)
    assert (error <= bound + 1e-7).all(), (error - bound).max()
    assert error.max() > 0  # really quantized: the bound is not vacuous


def test_int8_checkpoint_scores_within_the_propagated_quantization_bound(trained: Dict[str, Any]) -> None:
    """Score error <= sum over embedding entries of |d score / d e| * (entry's bound).

    First order in the embedding error e: the over arch is piecewise linear and the
    interaction bilinear in e, so the second-order term is O(bound^2) (~1e-8 here); the
    factor 2 covers it and ReLU kinks crossed between the float and int8 points."""
    float_model = trained["model"]
    kjt, dense = make_kjt(IDS), dense_batch(len(IDS))
    tables = float_model.sparse_arch.embedding_bag_collection.embedding_bags
    entry_bound = torch.zeros(len(IDS), 3, 16)
    for b, sample in enumerate(IDS):
        for f, ids in enumerate(sample):
            if ids:
                entry_bound[b, f, :] = int8_row_error_bound(tables[f"t_cat_{f}"].weight[ids]).sum()

    embedded = float_model.sparse_arch(kjt).detach().requires_grad_(True)
    logits = float_model.over_arch(
        float_model.inter_arch(dense_features=float_model.dense_arch(dense), sparse_features=embedded)
    )
    (gradient,) = torch.autograd.grad(logits.sum(), embedded)  # rows independent: per-sample grads
    score_bound = 2 * (gradient.abs() * entry_bound).sum(dim=(1, 2))

    error = (scores(served(trained["path"])) - logits.detach()).abs().flatten()
    assert (error <= score_bound).all(), (error, score_bound)
    assert error.max() > 0


def test_checkpoint_of_torchrec_dlrm_train_with_model_prefix_is_accepted(trained: Dict[str, Any], tmp_path: Any) -> None:
    path = tmp_path / "train.pt"
    torch.save({f"model.{k}": v for k, v in trained["model"].state_dict().items()}, path)
    assert torch.equal(scores(served(str(path))), scores(served(trained["path"])))


CHECKPOINT_DEFECTS = [
    ("missing", lambda s: s.pop("over_arch.model.0._mlp.0._linear.weight"), r"missing \['over_arch.model.0._mlp.0._linear.weight'\]"),
    ("extra", lambda s: s.__setitem__("head.bias", torch.zeros(1)), r"extra \['head.bias'\]"),
    (
        "mis-shaped",
        lambda s: s.__setitem__(
            "sparse_arch.embedding_bag_collection.embedding_bags.t_cat_1.weight", torch.zeros(2001, 16)
        ),
        r"t_cat_1.weight \(2001, 16\) \(expected \(2000, 16\)\)",
    ),
]


@pytest.mark.parametrize("defect, damage, message", CHECKPOINT_DEFECTS, ids=[d[0] for d in CHECKPOINT_DEFECTS])
def test_checkpoint_not_matching_the_config_is_a_value_error_naming_the_tensor(
    trained: Dict[str, Any], tmp_path: Any, defect: str, damage: Any, message: str
) -> None:
    state = trained["model"].state_dict()
    damage(state)
    path = tmp_path / f"{defect}.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=message):
        served(str(path))


class Payload:
    """Stands for anything an attacker could pickle into a checkpoint."""

    def __reduce__(self) -> Any:
        return (print, ("this must never run",))


def test_checkpoint_carrying_a_pickled_object_is_refused(trained: Dict[str, Any], tmp_path: Any) -> None:
    state = trained["model"].state_dict()
    state["payload"] = Payload()
    path = tmp_path / "evil.pt"
    torch.save(state, path, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(ValueError, match=r"weights_only=True"):
        served(str(path))


def test_checkpoint_that_is_not_a_torch_file_is_a_value_error(tmp_path: Any) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"could not be loaded as a plain state_dict"):
        served(str(path))
