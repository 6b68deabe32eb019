"""A lean forward for a ``DLRMFactory`` model on the CPU, world_size 1: the handler serves
CPU models with it; the scores are TorchRec's, bit for bit. CUDA models keep TorchRec's
forward (``optimize_for_inference`` refuses them: see its docstring).

    model = optimize_for_inference(DLRMFactory(config))   # model(dense, kjt) as before

Symbols as in ``dlrm_factory``: B samples, N dense features, F sparse features (tables),
D = ``embedding_dim``. Measured in README "Performance" (benchmarks/bench_model.py: ours+opt).
"""

import logging

import torch
import torch.nn.functional as nnf
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

logger = logging.getLogger(__name__)


def optimize_for_inference(model: nn.Module, chunk_rows: int = 1024, compile_dense: bool = False) -> nn.Module:
    """Give a CPU ``DLRMFactory`` model a lean forward for world_size 1; scores unchanged.

    TorchRec's path at world_size 1 still runs the sharded machinery for one rank: KJT
    flatten/one-to-all "input dist", per-rank lookup lists, a KeyedTensor "output dist",
    then ``SparseArch`` splits the pooled [B, F*D] tensor into F tensors and cats them back,
    ``InteractionArch`` cats again and gathers the upper triangle with 2-D advanced
    indexing, and every ReLU allocates. Here: the one TBE is called on the KJT's values and
    offsets (same kernel, same bounds check), the pooled rows are viewed as [B, F, D], one
    cat builds [B, F+1, D], the upper triangle is an ``index_select`` of a flat index, ReLUs
    run in place, and a batch above ``chunk_rows`` runs its dense part ``chunk_rows`` samples
    at a time (activations stay in cache). ``compile_dense``: the dense part through
    ``torch.compile`` with weight freezing (oneDNN linear+ReLU; compiles on first calls).
    The model's own parameters are used (a checkpoint loaded later is seen). A KJT with its
    keys in another order is permuted to the tables' order (TorchRec's sharded input dist
    fixes the order at its first call and misroutes ids after that). Anything unexpected
    (several TBEs, sharded rows) keeps TorchRec's forward; the original forward stays at
    ``model.reference_forward``.

    CPU only: a model with its dense layers or tables elsewhere is a ValueError. On CUDA this
    forward would index_select with a CPU index and hand the TBE the KJT's int64 ids where
    TorchRec's CUDA path feeds int32; it is neither adapted nor measured there (no GPU here).
    """
    ebc = model.sparse_arch.embedding_bag_collection
    tbes = list(getattr(ebc, "tbes_configs", dict)().items())
    devices = {str(p.device) for p in model.parameters()} | {str(tbe.current_device) for tbe, _ in tbes}
    if devices != {"cpu"}:
        raise ValueError(
            f"optimize_for_inference: the model is on {sorted(devices)}; the lean forward is for CPU models "
            "(world_size 1): serve a CUDA model with TorchRec's forward, as the handler does"
        )
    if len(tbes) != 1:
        logger.info("optimize_for_inference: %d TBEs (not 1); TorchRec's forward kept", len(tbes))
        return model
    tbe, grouped = tbes[0]
    features = list(model.sparse_arch.sparse_feature_names)
    whole_tables = all(
        t.local_metadata.shard_offsets[0] == 0 and t.local_metadata.shard_sizes[0] == t.num_embeddings
        for t in grouped.embedding_tables
    )
    if grouped.feature_names() != features or not whole_tables:
        logger.info("optimize_for_inference: tables sharded or reordered; TorchRec's forward kept")
        return model

    dense_layers = [p._linear for p in model.dense_arch.model._mlp]
    over_layers = [p._linear for p in model.over_arch.model[0]._mlp]
    last = model.over_arch.model[1]
    num_f, dim = len(features), dense_layers[-1].out_features
    rows, cols = torch.triu_indices(num_f + 1, num_f + 1, offset=1)
    upper = rows * (num_f + 1) + cols  # flat positions of the pairs i < j
    reference = model.forward

    def dense_part(dense: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """dense: b x N, pooled: b x (F*D) -> logits b x 1."""
        x = dense
        for layer in dense_layers:
            x = torch.relu_(nnf.linear(x, layer.weight, layer.bias))  # b x D
        b = x.shape[0]
        combined = torch.cat([x.unsqueeze(1), pooled.view(b, num_f, dim)], dim=1)
        gram = torch.bmm(combined, combined.transpose(1, 2)).view(b, -1)
        y = torch.cat([x, gram.index_select(1, upper)], dim=1)  # b x (D + (F+1 choose 2))
        for layer in over_layers:
            y = torch.relu_(nnf.linear(y, layer.weight, layer.bias))
        return nnf.linear(y, last.weight, last.bias)

    if compile_dense:
        import torch._inductor.config as inductor_config

        compiled = torch.compile(dense_part, dynamic=True)

        def dense_part(dense: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:  # noqa: F811
            with inductor_config.patch(freezing=True):  # compilations happen inside calls
                return compiled(dense, pooled)

    def forward(dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        keys = sparse_features.keys()
        if keys != features:
            if sorted(keys) != sorted(features):
                return reference(dense_features, sparse_features)  # TorchRec's error
            sparse_features = sparse_features.permute([keys.index(f) for f in features])
        values = sparse_features.values()
        pooled = tbe(indices=values, offsets=sparse_features.offsets().to(values.dtype))
        batch = dense_features.shape[0]
        if batch <= chunk_rows:
            return dense_part(dense_features, pooled)
        return torch.cat(
            [
                dense_part(dense_features[s : s + chunk_rows], pooled[s : s + chunk_rows])
                for s in range(0, batch, chunk_rows)
            ]
        )

    model.forward = forward
    model.reference_forward = reference
    return model
