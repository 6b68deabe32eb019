"""Train TorchRec's DLRM on Criteo-shaped data and save the checkpoint this project serves.

    .venv/bin/python examples/train_dlrm.py --out trained/            # synthetic data, 4-10 min on 2 cores
    .venv/bin/python examples/train_dlrm.py --out trained/ --train-tsv day_0 --eval-tsv day_23
    ./create_dlrm_mar.sh --config trained/model_config.json --checkpoint trained/checkpoint.pt

    # TorchRec's way: N processes, the tables sharded over them (gloo on CPU, NCCL on GPUs)
    .venv/bin/torchrun --standalone --nproc_per_node 2 examples/train_dlrm.py --out trained/
    ./create_dlrm_mar.sh --config trained/model_config.json --checkpoint trained/checkpoint.dcp

writes, in ``--out``:

    checkpoint.pt       the float ``DLRMTrain.state_dict()`` (keys ``model.<DLRM key>``), what
                        ``create_dlrm_mar.sh --checkpoint`` and ``DLRMFactory`` take
    checkpoint.dcp/     under torchrun instead: the same state dict as a
                        ``torch.distributed.checkpoint`` directory (``.metadata`` and one
                        ``__<rank>_0.distcp`` a rank: each rank writes the shards it holds)
    model_config.json   the factory config of that model (int8, ``id_overflow: hash``)
    training.json       the data, the settings and the figures of the run (read by
                        ``benchmarks/bench_accuracy.py`` to rebuild the same held-out set)
    request.json        4 held-out samples as a request body: ``curl --data @request.json``
    id_counts.safetensors  the training data's ids, counted per table: set the config's
                        ``id_counts`` to it for a table store entry with the hot rows first

The model is TorchRec's own: ``DLRM`` over an ``EmbeddingBagCollection`` (tables
``t_cat_0`` ... ``t_cat_25``, built by ``dlrm_factory.build_embedding_bag_configs`` from the
config, so checkpoint and served model name the same tensors), wrapped in ``DLRMTrain``
(``BCEWithLogitsLoss``). The optimizer is what TorchRec's DLRM examples use: row-wise Adagrad
for the tables and Adagrad for the dense layers (``examples/golden_training/train_dlrm.py``:
``RowWiseAdagrad`` fused into the sharded tables' backward, ``torch.optim.Adagrad`` through a
``KeyedOptimizerWrapper``). On one CPU process the tables are not sharded, so the same two
optimizers run unfused: ``RowWiseAdagrad`` and ``Adagrad`` in ``KeyedOptimizerWrapper``s, one
``CombinedOptimizer``. Row-wise state keeps the tables' optimizer memory at one float a row,
and on CPU it is also the fast choice: a 2048-sample step over 917k rows of D = 16 took 39 ms
against 267 ms for plain Adagrad on every parameter. (TorchRec's sharded, fused path through
``DistributedModelParallel`` on one gloo rank was slower still here: 0.94 s a 4096-sample step
against 0.49 s, on the same busy cores.) The learning rate is 0.05, not the example's 0.1: at
0.1 the loss jumped in the first hundred steps and the held-out AUC after 1M samples was 0.714
against 0.758 (an earlier version of the generator).

Under ``torchrun`` (``torch.distributed.is_torchelastic_launched()``) the model is TorchRec's
training setup for many processes (``examples/golden_training/train_dlrm.py``):
``DistributedModelParallel`` over the same ``DLRMTrain``, its tables sharded by TorchRec's
``EmbeddingShardingPlanner`` - row-wise (a slice of rows on every rank) for the tables of at
least ``--row-wise-min-rows`` rows, table-wise (each whole on one rank) for the others - with
``RowWiseAdagrad`` fused into the tables' backward and ``Adagrad`` on the dense layers, which
``DistributedDataParallel`` keeps in step. No rank ever holds a whole table set, and the
checkpoint is written the same way (``torch.distributed.checkpoint``). Each global batch of
``--batch-size`` samples is the one the single process would take, cut into one equal slice a
rank: the runs see the same samples. Dense gradients are averaged over the ranks; TorchRec sums
the tables' gradients instead (N times the single process's), which Adagrad's update does not
feel (it divides by the root of the summed squares). Held-out scores are computed on all
ranks (a slice each) and gathered.

Symbols: B batch, I = 13 dense features, C = 26 sparse features, D embedding dim, N ranks.
"""

import argparse
import itertools
import json
import logging
import math
import os
import shutil
import sys
import time
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.datasets.criteo import DEFAULT_CAT_NAMES
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingPlan, ShardingType
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad
from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for path in (HERE, REPO):
    if path not in sys.path:
        sys.path.insert(0, path)

import criteo_data  # noqa: E402
from criteo_data import CriteoSamples, SyntheticCriteo, to_batch  # noqa: E402
from dlrm_checkpoint import AllowListFileSystemReader, read_dcp  # noqa: E402
from dlrm_factory import build_embedding_bag_configs, create_default_model_config, resolve_model_config  # noqa: E402

logger = logging.getLogger(__name__)

EVAL_BATCH = 16384
REQUEST_SAMPLES = 4  # held-out samples in request.json
CHECKPOINT_FILE = "checkpoint.pt"  # one process: torch.save
CHECKPOINT_DIR = "checkpoint.dcp"  # under torchrun: torch.distributed.checkpoint
ADAGRAD_EPS = 1e-10  # torchrec's RowWiseAdagrad default, given to the fused kernel too (fbgemm's is 1e-8)


# ---------------------------------------------------------------------------------------
# Model, optimizer, metrics.
# ---------------------------------------------------------------------------------------


def model_config(
    table_sizes: Sequence[int],
    embedding_dim: int,
    dense_arch_layer_sizes: Sequence[int],
    over_arch_layer_sizes: Sequence[int],
) -> Dict[str, Any]:
    """The factory config of the trained model, validated by the factory itself.

    Served at int8 (the factory's default); ``id_overflow: hash`` takes any id modulo its
    table size, the hashing the training data went through, so a client may send the raw
    Criteo values (hex as integers)."""
    config = create_default_model_config()
    config.update(
        dense_arch_layer_sizes=list(dense_arch_layer_sizes),
        over_arch_layer_sizes=list(over_arch_layer_sizes),
        embedding_dim=embedding_dim,
        num_embeddings_per_feature=list(table_sizes),
        id_list_features_keys=list(DEFAULT_CAT_NAMES),
        id_overflow="hash",
    )
    resolve_model_config(config)  # raises ValueError naming the key if anything is off
    return config


def build_train_model(config: Dict[str, Any], seed: int) -> DLRMTrain:
    """TorchRec's ``DLRMTrain(DLRM(EmbeddingBagCollection))`` for ``config``, on CPU, with
    TorchRec's default init drawn from ``seed``."""
    cfg = resolve_model_config(config)
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left as it was
        torch.manual_seed(seed)
        dlrm = DLRM(
            embedding_bag_collection=EmbeddingBagCollection(
                tables=build_embedding_bag_configs(cfg), device=torch.device("cpu")
            ),
            dense_in_features=cfg["dense_in_features"],
            dense_arch_layer_sizes=cfg["dense_arch_layer_sizes"],
            over_arch_layer_sizes=cfg["over_arch_layer_sizes"],
        )
    return DLRMTrain(dlrm_module=dlrm)


def make_optimizer(model: DLRMTrain, lr: float) -> CombinedOptimizer:
    """Row-wise Adagrad on the embedding tables, Adagrad on the dense layers."""
    tables = {n: p for n, p in model.named_parameters() if ".embedding_bags." in n}
    dense = {n: p for n, p in model.named_parameters() if ".embedding_bags." not in n}
    return CombinedOptimizer(
        optims=[
            ("tables", KeyedOptimizerWrapper(params=tables, optim_factory=lambda ps: RowWiseAdagrad(ps, lr=lr))),
            ("dense", KeyedOptimizerWrapper(params=dense, optim_factory=lambda ps: torch.optim.Adagrad(ps, lr=lr))),
        ]
    )


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve: P(a random click scores above a random non-click), ties
    counting one half (Mann-Whitney U from average ranks)."""
    scores, labels = scores.flatten().double(), labels.flatten().bool()
    positives = int(labels.sum())
    negatives = labels.numel() - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    order = torch.argsort(scores)
    _, inverse, counts = torch.unique_consecutive(scores[order], return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()  # 1-based rank of each tie group's last member
    average_rank = (ends - (counts.double() - 1) / 2)[inverse]  # of the sorted samples
    rank_sum = average_rank[labels[order]].sum().item()
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def log_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean binary cross-entropy of sigmoid(logits) against the labels (natural log)."""
    return torch.nn.functional.binary_cross_entropy_with_logits(logits.flatten().double(), labels.flatten().double()).item()


def predict(model: torch.nn.Module, samples: CriteoSamples, keys: Sequence[str], batch: int = EVAL_BATCH) -> torch.Tensor:
    """Logits [N] of a ``DLRM`` (float or a ``DLRMFactory`` model) for ``samples``."""
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(samples), batch):
            b = to_batch(samples.slice(start, start + batch), keys)
            outputs.append(model(b.dense_features, b.sparse_features).flatten())
    return torch.cat(outputs)


# ---------------------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------------------


def synthetic_batches(data: SyntheticCriteo, batch_size: int, num_batches: int, chunk_batches: int = 32) -> Iterator[CriteoSamples]:
    """``num_batches`` fresh training batches (drawn in chunks: numpy is faster on many rows)."""
    for chunk in range(math.ceil(num_batches / chunk_batches)):
        count = min(chunk_batches, num_batches - chunk * chunk_batches)
        samples = data.sample(count * batch_size, criteo_data.TRAIN, chunk)
        for i in range(count):
            yield samples.slice(i * batch_size, (i + 1) * batch_size)


def tsv_batches(paths: Sequence[str], table_sizes: Sequence[int], batch_size: int) -> Iterator[CriteoSamples]:
    """Consecutive batches of the TSV files (a last, shorter batch included)."""
    for chunk in criteo_data.iter_criteo_tsv(paths, table_sizes, chunk_rows=batch_size * 32):
        for start in range(0, len(chunk), batch_size):
            yield chunk.slice(start, start + batch_size)


def train(
    model: torch.nn.Module,
    optimizer: CombinedOptimizer,
    batches: Iterator[CriteoSamples],
    keys: Sequence[str],
    total: Optional[int] = None,
    progress: bool = True,
    device: torch.device = torch.device("cpu"),
) -> Tuple[List[float], int]:
    """One pass over ``batches``: (the loss of every step, samples seen)."""
    model.train()
    losses = []
    seen = 0
    with tqdm(batches, total=total, desc="training", unit="batch", disable=not progress, mininterval=2.0) as bar:
        for step, samples in enumerate(bar):
            loss, _ = model(to_batch(samples, keys).to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            seen += len(samples)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    model.eval()
    return losses, seen


# ---------------------------------------------------------------------------------------
# Under torchrun: TorchRec's DistributedModelParallel.
# ---------------------------------------------------------------------------------------


class Ranks(NamedTuple):
    """This process's place under torchrun: its rank of ``world_size``, and its device."""

    rank: int
    world_size: int
    device: torch.device


def init_ranks() -> Optional[Ranks]:
    """Under torchrun, join its process group - NCCL with ``cuda:LOCAL_RANK`` when GPUs are
    visible, else gloo on the CPU - and say where this process stands; None in one plain
    process (the single-process path, unchanged)."""
    if not dist.is_torchelastic_launched():
        return None
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group(backend="gloo")
    return Ranks(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)


class RowWiseShardingSharder(EmbeddingBagCollectionSharder):
    """TorchRec's training sharder of an ``EmbeddingBagCollection``, allowed row-wise sharding
    on the CPU too. TorchRec 1.8 offers row-wise (and table-row-wise) for CUDA only; its
    row-wise lookup and gradient exchange are all-to-all and reduce-scatter collectives,
    which gloo runs on CPU ranks (the fused CPU kernels train each rank's rows). On GPUs this
    is TorchRec's own list."""

    def sharding_types(self, compute_device_type: str) -> List[str]:
        types = super().sharding_types(compute_device_type)
        if compute_device_type == "cpu" and ShardingType.ROW_WISE.value not in types:
            types.append(ShardingType.ROW_WISE.value)
        return types


def table_constraints(eb_configs: Sequence[EmbeddingBagConfig], row_wise_min_rows: int) -> Dict[str, ParameterConstraints]:
    """Row-wise for the tables of at least ``row_wise_min_rows`` rows, table-wise for the
    others; where each goes, the planner decides."""
    return {
        table.name: ParameterConstraints(
            sharding_types=[(ShardingType.ROW_WISE if table.num_embeddings >= row_wise_min_rows else ShardingType.TABLE_WISE).value]
        )
        for table in eb_configs
    }


def build_sharded_train_model(
    config: Dict[str, Any], seed: int, lr: float, ranks: Ranks, row_wise_min_rows: int
) -> Tuple[DistributedModelParallel, CombinedOptimizer, ShardingPlan]:
    """``DistributedModelParallel(DLRMTrain(DLRM(EmbeddingBagCollection on meta)))``: the
    planner's shards of the tables allocated and initialized (TorchRec's default init) on
    each rank from a stream of ``seed`` and the rank, the dense layers from ``seed`` (the
    same on every rank); row-wise Adagrad
    fused into the tables' backward, Adagrad on the dense layers. (model, optimizer, plan)."""
    cfg = resolve_model_config(config)
    eb_configs = build_embedding_bag_configs(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DLRMTrain(
            dlrm_module=DLRM(
                embedding_bag_collection=EmbeddingBagCollection(tables=eb_configs, device=torch.device("meta")),
                dense_in_features=cfg["dense_in_features"],
                dense_arch_layer_sizes=cfg["dense_arch_layer_sizes"],
                over_arch_layer_sizes=cfg["over_arch_layer_sizes"],
                dense_device=ranks.device,
            )
        )
    _apply_optimizer_in_backward(
        optimizer_class=RowWiseAdagrad, params=model.model.sparse_arch.parameters(), optimizer_kwargs={"lr": lr, "eps": ADAGRAD_EPS}
    )
    sharders = [RowWiseShardingSharder()]
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=ranks.world_size, compute_device=ranks.device.type),
        constraints=table_constraints(eb_configs, row_wise_min_rows),
    )
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    # The shards are allocated and initialized here: from a stream of --seed and the rank.
    with torch.random.fork_rng(devices=[ranks.device] if ranks.device.type == "cuda" else []):
        torch.manual_seed(seed * 1_000_003 + 1 + ranks.rank)
        sharded = DistributedModelParallel(module=model, device=ranks.device, plan=plan, sharders=sharders)
    dense = KeyedOptimizerWrapper(
        params=dict(in_backward_optimizer_filter(sharded.named_parameters())),
        optim_factory=lambda ps: torch.optim.Adagrad(ps, lr=lr),
    )
    return sharded, CombinedOptimizer(optims=[("tables", sharded.fused_optimizer), ("dense", dense)]), plan


def load_initial_weights(model: torch.nn.Module, path: str, ranks: Optional[Ranks]) -> None:
    """``--init-from``: start from the weights at ``path`` (to resume, or to compare runs from
    one init) instead of the seeded init. One process: a ``DLRMTrain.state_dict()`` file or a
    DCP directory of one. Under torchrun: a DCP directory, loaded with ``dcp.load``: each rank
    reads the rows of its own shards, whatever sharding (or none) wrote it; its ``.metadata``
    through ``dlrm_checkpoint``'s allow-list."""
    if ranks is None:
        if os.path.isdir(path):
            state = {name: tensor[:] for name, tensor in read_dcp(path).items()}
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        return
    if not os.path.isdir(path):
        raise SystemExit(f"--init-from {path}: under torchrun, a torch.distributed.checkpoint directory is expected")
    state = model.state_dict()
    dcp.load(state, storage_reader=AllowListFileSystemReader(path))
    model.load_state_dict(state)


def sharding_types(plan: ShardingPlan) -> Dict[str, str]:
    """{table: its sharding type} of a plan, e.g. {"t_cat_0": "row_wise", ...}."""
    return {name: sharding.sharding_type for module_plan in plan.plan.values() for name, sharding in module_plan.items()}


def rank_batches(batches: Iterator[CriteoSamples], ranks: Ranks) -> Iterator[CriteoSamples]:
    """This rank's equal slice of each global batch (a last batch is cut to a multiple of
    the ranks: a step needs every rank)."""
    for samples in batches:
        each = len(samples) // ranks.world_size
        if each:
            yield samples.slice(ranks.rank * each, (ranks.rank + 1) * each)


def predict_sharded(model: DistributedModelParallel, samples: CriteoSamples, keys: Sequence[str], ranks: Ranks,
                    batch: int = EVAL_BATCH) -> torch.Tensor:  # fmt: skip
    """Logits [N] of the sharded ``DLRMTrain`` for ``samples``, on every rank: each scores an
    equal slice (the last padded with the first samples), then the slices are gathered."""
    n = len(samples)
    each = math.ceil(n / ranks.world_size)
    index = (torch.arange(each) + ranks.rank * each) % n
    mine = CriteoSamples(dense=samples.dense[index], ids=samples.ids[index], labels=samples.labels[index])
    outputs = []
    model.eval()
    with torch.no_grad():
        for start in range(0, each, batch):
            _, (_, logits, _) = model(to_batch(mine.slice(start, start + batch), keys).to(ranks.device))
            outputs.append(logits.flatten())
    local = torch.cat(outputs)
    gathered = [torch.empty_like(local) for _ in range(ranks.world_size)]
    dist.all_gather(gathered, local)
    return torch.cat(gathered)[:n].cpu()


def mean_over_ranks(losses: List[float], seen: int, ranks: Ranks) -> Tuple[List[float], int]:
    """Each step's loss averaged over the ranks (= the global batch's mean loss: the slices
    are equal), and the samples all ranks saw."""
    total = torch.tensor(losses + [float(seen)], dtype=torch.float64, device=ranks.device)
    dist.all_reduce(total)
    return (total[:-1] / ranks.world_size).tolist(), int(total[-1].item())


# ---------------------------------------------------------------------------------------
# Saving.
# ---------------------------------------------------------------------------------------


def save_checkpoint(model: torch.nn.Module, out: str, ranks: Optional[Ranks]) -> str:
    """The trained weights in ``out``; their path. One process: ``checkpoint.pt``, the float
    ``DLRMTrain.state_dict()`` (``torch.save``). Under torchrun: ``checkpoint.dcp/``, the
    ``DistributedModelParallel``'s state dict (the same keys; its tables ``ShardedTensor``s)
    saved with ``torch.distributed.checkpoint``: each rank writes the shards it holds, no
    rank gathers a table. Collective: every rank calls it."""
    if ranks is None:
        checkpoint = os.path.join(out, CHECKPOINT_FILE)
        torch.save(model.state_dict(), checkpoint)
        return checkpoint
    checkpoint = os.path.join(out, CHECKPOINT_DIR)
    if ranks.rank == 0 and os.path.isdir(checkpoint):
        shutil.rmtree(checkpoint)  # a former run's files (another rank count) must not stay in it
    dist.barrier()
    dcp.save(model.state_dict(), checkpoint_id=checkpoint)
    return checkpoint


def save(
    model: torch.nn.Module,
    config: Dict[str, Any],
    out: str,
    training: Dict[str, Any],
    example: Optional[CriteoSamples],
    ranks: Optional[Ranks] = None,
) -> Tuple[str, str]:
    """Everything a run writes in ``out``: the checkpoint (``save_checkpoint``: checkpoint.pt,
    or checkpoint.dcp/ under torchrun), then, from one process, model_config.json,
    training.json and, given ``example`` samples, request.json (their request body);
    (checkpoint path, config path). Every rank calls it."""
    os.makedirs(out, exist_ok=True)
    checkpoint = save_checkpoint(model, out, ranks)
    config_path = os.path.join(out, "model_config.json")
    if ranks is not None and ranks.rank != 0:
        return checkpoint, config_path
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out, "training.json"), "w") as f:
        json.dump(training, f, indent=2)
    if example is not None:
        with open(os.path.join(out, "request.json"), "w") as f:
            json.dump(criteo_data.to_request(example), f)
    return checkpoint, config_path


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True,
                   help="folder to write checkpoint.pt, model_config.json, training.json, request.json to")
    p.add_argument("--train-tsv", nargs="+", default=None, metavar="FILE",
                   help="Criteo TSV files to train on, in order, at most --train-samples of them; unset: synthetic data")
    p.add_argument("--eval-tsv", nargs="+", default=None, metavar="FILE", help="Criteo TSV files to evaluate on")
    p.add_argument("--train-samples", type=int, default=8_000_000,
                   help="samples to train on (synthetic: fresh ones every step)")
    p.add_argument("--eval-samples", type=int, default=1_000_000, help="held-out samples to evaluate on")
    p.add_argument("--table-cap", type=int, default=criteo_data.DEFAULT_TABLE_CAP,
                   help="rows of each table at most (Criteo 1TB sizes capped, as TorchRec's --num_embeddings)")
    p.add_argument("--embedding-dim", type=int, default=32, help="D, the width of every table")
    p.add_argument("--dense-arch", type=lambda s: [int(x) for x in s.split(",")], default=[128, 32],
                   help="dense MLP sizes (the last is set to --embedding-dim)")
    p.add_argument("--over-arch", type=lambda s: [int(x) for x in s.split(",")], default=[256, 128, 1],
                   help="over MLP sizes (the last is 1)")
    p.add_argument("--batch-size", type=int, default=4096, help="samples per step")
    p.add_argument("--lr", type=float, default=0.05, help="learning rate of both Adagrads")
    p.add_argument("--seed", type=int, default=0, help="model init; also the synthetic world's seed")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads; unset: torch's (one a core)")
    p.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                   help="start from these weights (checkpoint.pt or a DCP directory; under torchrun a DCP directory) "
                        "instead of the seeded init")
    p.add_argument("--row-wise-min-rows", type=int, default=50_000,
                   help="under torchrun: tables of at least this many rows are sharded row-wise, the others table-wise")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    ranks = init_ranks()  # None: one process, no torchrun
    try:
        return run(args, ranks)
    finally:
        if ranks is not None:
            dist.destroy_process_group()


def run(args: argparse.Namespace, ranks: Optional[Ranks]) -> Dict[str, Any]:
    """Train, evaluate and save, in one process (``ranks`` None) or as one rank of torchrun's."""
    if args.threads:
        torch.set_num_threads(args.threads)
    table_sizes = criteo_data.capped_table_sizes(args.table_cap)
    config = model_config(table_sizes, args.embedding_dim, args.dense_arch, args.over_arch)
    keys = config["id_list_features_keys"]
    device, progress = torch.device("cpu"), not args.no_progress
    sharding: Dict[str, str] = {}
    if ranks is None:
        model: torch.nn.Module = build_train_model(config, args.seed)
        optimizer = make_optimizer(model, args.lr)
    else:
        if args.batch_size % ranks.world_size:
            raise SystemExit(f"--batch-size {args.batch_size}: expected a multiple of the {ranks.world_size} ranks")
        model, optimizer, plan = build_sharded_train_model(config, args.seed, args.lr, ranks, args.row_wise_min_rows)
        device, progress, sharding = ranks.device, progress and ranks.rank == 0, sharding_types(plan)
    if args.init_from:
        load_initial_weights(model, args.init_from, ranks)

    num_batches = max(1, args.train_samples // args.batch_size)
    started = time.perf_counter()
    if args.train_tsv:
        data: Dict[str, Any] = {"source": "tsv", "train": args.train_tsv, "eval": args.eval_tsv}
        batches = itertools.islice(tsv_batches(args.train_tsv, table_sizes, args.batch_size), num_batches)
        total = None
    else:
        world = SyntheticCriteo(table_sizes=table_sizes, seed=args.seed)
        data = {"source": "synthetic", "seed": args.seed, "table_sizes": table_sizes}
        batches = synthetic_batches(world, args.batch_size, num_batches)
        total = num_batches
    if ranks is not None:
        batches = rank_batches(batches, ranks)
    loop_started = time.perf_counter()
    losses, seen = train(model, optimizer, batches, keys, total, progress=progress, device=device)
    loop_seconds = time.perf_counter() - loop_started
    if ranks is not None:
        losses, seen = mean_over_ranks(losses, seen, ranks)
    held_out = None
    if not args.train_tsv:
        held_out = world.sample(args.eval_samples, criteo_data.HELD_OUT)
    elif args.eval_tsv:
        held_out = criteo_data.read_criteo_tsv(args.eval_tsv, table_sizes, max_rows=args.eval_samples)
    seconds = time.perf_counter() - started

    # first_loss: the first step's; last_loss: the mean of the last 50 steps'; samples_per_second:
    # of the training steps (drawing or reading the batches included; not the held-out set).
    figures: Dict[str, Any] = {"train_seconds": round(seconds, 1), "steps": len(losses), "samples": seen,
                               "samples_per_second": round(seen / loop_seconds, 1),
                               "first_loss": losses[0], "last_loss": sum(losses[-50:]) / len(losses[-50:])}  # fmt: skip
    if held_out is not None:
        logits = predict(model.model, held_out, keys) if ranks is None else predict_sharded(model, held_out, keys, ranks)
        figures.update(eval_samples=len(held_out), auc=auc(logits, held_out.labels),
                       log_loss=log_loss(logits, held_out.labels))  # fmt: skip
        if held_out.oracle_logit is not None:
            figures.update(oracle_auc=auc(held_out.oracle_logit, held_out.labels),
                           oracle_log_loss=log_loss(held_out.oracle_logit, held_out.labels))  # fmt: skip
            figures["gap_closed"] = (figures["auc"] - 0.5) / (figures["oracle_auc"] - 0.5)
    training = {"data": data, "args": {k: v for k, v in vars(args).items()}, "figures": figures}
    if ranks is not None:
        training.update(world_size=ranks.world_size, sharding=sharding)
    example = None if held_out is None else held_out.slice(0, REQUEST_SAMPLES)
    checkpoint, config_path = save(model, config, args.out, training, example, ranks)
    if ranks is None or ranks.rank == 0:
        criteo_data.write_id_counts(os.path.join(args.out, criteo_data.ID_COUNTS_FILE), data, table_sizes, keys, seen)
        for key, value in figures.items():
            print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
        print(f"wrote {checkpoint} and {config_path}; package them for TorchServe with:\n"
              f"  ./create_dlrm_mar.sh --config {config_path} --checkpoint {checkpoint}")  # fmt: skip
    if ranks is not None:
        # Every rank leaves together, then destroys the process group (a collective call): a
        # rank that tore its gloo context down while rank 0 still wrote the id counts was
        # once aborted on exit ("terminate called without an active exception").
        dist.barrier()
    return training


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
