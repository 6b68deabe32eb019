"""Build a quantized, sharded TorchRec DLRM ready to serve, on CPU or on GPUs.

``DLRMFactory(config)`` returns the model (an ``nn.Module``), never a factory instance:

    model(dense_features: Tensor[B, N], sparse_features: KeyedJaggedTensor) -> Tensor[B, 1]

with B the batch size, N = ``dense_in_features``, F the number of sparse features (one
embedding table each) and D = ``embedding_dim``. The model is in eval mode; its TorchRec
``ShardingPlan`` is at ``model.plan``.

Pipeline (one small function each, in this order):
    1. ``select_devices``               the CPU, or world_size GPUs (``choose_devices``)
    2. ``build_embedding_bag_configs``  one ``EmbeddingBagConfig`` per table, ``t_<feature>``
    3. ``build_dlrm``                   ``DLRM`` with its tables on the ``meta`` device, its
                                        dense layers drawn on the CPU from ``seed``, then moved
    4. ``quantize_tables``              TorchRec's ``quantize_embeddings`` to ``quant_dtype``
    5. ``plan_to_fit``                  ``EmbeddingShardingPlanner`` over a ``Topology``
                                        (``plan_sharding``), on GPUs against the memory this
                                        process may use: a config that cannot fit is refused
    6. ``shard_tables``                 ``ShardedQuantEmbeddingBagCollection`` allocates shards
    7. ``fill_tables``                  weights written into the shards: a checkpoint, or a
                                        seeded random init (TorchRec's uniform +-sqrt(1/rows))

With a ``table_store`` (a directory; SPEC §7), steps 6-7 go through it
(``tables_from_store``): the shards are a store entry's pages, memory-mapped - written once,
by the same step-7 code, then shared by every process that serves the config; see
``dlrm_table_store.py``. The serving forward for one device is ``dlrm_lean_forward.py``.

Why a metaclass: TorchServe's ``BaseHandler._load_pickled_model`` imports the model file and
calls its one class with no arguments, so a file holds exactly one class and that class must
*return* the model. ``DLRMFactory`` subclasses ``type`` and returns an ``nn.Module`` from
``__new__``; ``class Model(DLRMFactory): def __new__(cls): return super().__new__(cls, cfg)``
works as in upstream's tests.

Memory of the default (Criteo 1TB, 26 tables, 177,944,275 rows, D = 64): a row is 64 int8
codes + a float16 scale and bias = 68 B, so the tables take 177,944,275 x 68 B = 12.1 GB
(11.3 GiB) at int8 (int4: 36 B a row, 6.4 GB; fp16: 128 B, 22.8 GB). The float tables would
take 45.6 GB: no float copy of a whole table set is ever made. Random init draws bytes
chunk by chunk straight into the quantized rows; a checkpoint is quantized table by table,
in chunks of rows, from a memory-mapped file, or from a ``torch.distributed.checkpoint``
directory as TorchRec training writes it (``dlrm_checkpoint.py``: each chunk of rows read
from the ranks' files that hold it, never a whole table or shard).

With a table store, the tables are file pages of the OS page cache instead of this process's
memory: N processes serving one config hold one copy, a restart maps instead of rebuilding
(the full default: ~0.1 s and 0.25 GiB of private memory instead of ~35 s and 11.6 GiB), and
tables larger than RAM page in on use.

GPUs: a TorchServe worker serves on its own GPU (``serving_config``: TorchServe's ``gpu_id``
becomes ``device: "cuda:<gpu_id>"``, and world_size GPUs from there, wrapping around), and
plans against its share of each GPU (``gpu_memory_fraction``). TorchRec's inference sharding
places rank r on cuda:r; ``place_ranks_on_gpus`` maps the ranks to the worker's GPUs.

Global side effects, in one place each: CPU sharding needs TorchRec's device propagation
(``torchrec.distributed.global_settings.set_propogate_device(True)``); ``select_devices``
switches it on for the process when the CPU is used, and logs it; on GPUs it maps TorchRec's
ranks to this process's GPUs (``place_ranks_on_gpus``: one placement per process); and the
table store replaces fbgemm's weight allocation only while it shards
(``dlrm_table_store.tbe_weights_from``).
"""

import copy
import json
import logging
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import fbgemm_gpu
import numpy as np
import torch
import torchrec
import torchrec.distributed.dist_data as torchrec_dist_data
import torchrec.distributed.embedding_lookup as torchrec_embedding_lookup
from torch import nn
from torchrec.distributed import global_settings
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.types import PlannerError
from torchrec.distributed.fused_params import FUSED_PARAM_QUANT_STATE_DICT_SPLIT_SCALE_BIAS
from torchrec.distributed.quant_embeddingbag import (
    QuantEmbeddingBagCollectionSharder,
    ShardedQuantEmbeddingBagCollection,
)
from torchrec.distributed.types import ShardingPlan, ShardingType, rank_device
from torchrec.inference.modules import quantize_embeddings, shard_quant_model
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from tqdm import tqdm

import dlrm_checkpoint
import dlrm_row_order as row_order
import dlrm_table_store as table_store

logger = logging.getLogger(__name__)

# Rows of the 26 Criteo 1TB categorical features, as in upstream's example.
CRITEO_1TB_NUM_EMBEDDINGS: List[int] = [
    45833188, 36746, 17245, 7413, 20243, 3, 7114, 1441, 62, 29275261, 1572176, 345138, 10,
    2209, 11267, 128, 4, 974, 14, 48937457, 11316796, 40094537, 452104, 12606, 104, 35,
]  # fmt: skip

# quant_dtype -> (torch dtype for TorchRec's quantization, bits per stored value)
QUANT_DTYPES: Dict[str, Tuple[torch.dtype, int]] = {
    "int8": (torch.qint8, 8),
    "int4": (torch.quint4x2, 4),
    "fp16": (torch.half, 16),
    "fp32": (torch.float, 32),
}
SHARDING_TYPES: Dict[str, str] = {
    "table_wise": ShardingType.TABLE_WISE.value,
    "row_wise": ShardingType.ROW_WISE.value,
}
DEVICES = ("auto", "cuda", "cpu")  # and "cuda:<N>": the first of world_size GPUs
CUDA_INDEX = re.compile(r"cuda:(\d+)")
# embedding_dim must be a multiple of this for the quant dtype. fbgemm 1.8's IntNBit TBE
# asserts only that a row packs into whole bytes (int4: even D; its docstring's "multiple of
# 4" is stricter than its code, and its CUDA kernels store a row's last partial vector of
# outputs); TorchRec 1.8's sharded quant state views each row's 4-byte scale/bias as float16,
# which needs an even row length where rows are unpadded (the CPU; CUDA pads them to 16 B):
# int8 rows of D + 4 bytes, int4 rows of D/2 + 4. A config must serve on both devices.
EMBEDDING_DIM_MULTIPLE = {"int8": 2, "int4": 4, "fp16": 1, "fp32": 1}
ID_OVERFLOW_POLICIES = ("error", "hash")
# "dlrm": {"score", "probability"} (SPEC §4); "upstream": {"default": [logit, ...]}, the
# pytorch/serve example's answer, a list even for one sample.
RESPONSE_FORMATS = ("dlrm", "upstream")
TABLE_PREFIX = "t_"
# Random init and checkpoint quantization walk a table in chunks of this many rows; the
# random stream of each chunk is keyed by (seed, table, chunk), so the weights do not
# depend on how the rows are sharded or how many threads fill them.
FILL_CHUNK_ROWS = 1 << 18
FILL_THREADS = max(1, min(8, os.cpu_count() or 1))
PROGRESS_MIN_BYTES = 1 << 28  # show a progress bar when filling more than 256 MiB


def _sharder(quant_dtype: str) -> QuantEmbeddingBagCollectionSharder:
    """TorchRec's quant EBC sharder. Row-wise shards need scale/bias split from the rows,
    which TorchRec 1.8 supports only for int8/int4 (it fails for fp16/fp32, as do its
    DEFAULT_SHARDERS), so fp16/fp32 get the plain sharder and table-wise sharding."""
    if quant_dtype in ("int8", "int4"):
        return QuantEmbeddingBagCollectionSharder(
            fused_params={FUSED_PARAM_QUANT_STATE_DICT_SPLIT_SCALE_BIAS: True}
        )
    return QuantEmbeddingBagCollectionSharder()


def create_default_model_config() -> Dict[str, Any]:
    """A new dict of the defaults (SPEC §2); mutating it never changes the next one.

    ``id_list_features_keys`` is left out so that changing the number of tables needs no
    other edit: the factory names them ``cat_0`` ... ``cat_{F-1}``.
    """
    return {
        "dense_in_features": 13,
        "dense_arch_layer_sizes": [512, 256, 64],
        "over_arch_layer_sizes": [512, 512, 256, 1],
        "embedding_dim": 64,
        "num_embeddings_per_feature": list(CRITEO_1TB_NUM_EMBEDDINGS),
        "quant_dtype": "int8",
        "sharding_type": "table_wise",
        "device": "auto",
        "world_size": None,
        "gpu_memory_fraction": None,
        "seed": 0,
        "checkpoint": None,
        "id_overflow": "error",
        "max_samples_per_request": 1024,
        "table_store": None,
        "response_format": "dlrm",
        "id_counts": None,
    }


# ---------------------------------------------------------------------------------------
# Validation: every rule of SPEC §2, before any memory is allocated.
# ---------------------------------------------------------------------------------------


def _fail(key: str, value: Any, expected: str) -> None:
    raise ValueError(f"model config: {key!r} is {value!r}; expected {expected}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_positive_int(config: Dict[str, Any], key: str) -> None:
    if not _is_int(config[key]) or config[key] <= 0:
        _fail(key, config[key], "an integer > 0")


def _check_positive_int_list(config: Dict[str, Any], key: str, min_len: int) -> None:
    value = config[key]
    if (
        not isinstance(value, list)
        or len(value) < min_len
        or not all(_is_int(v) and v > 0 for v in value)
    ):
        _fail(key, value, f"a list of at least {min_len} integers, each > 0")


def _check_choice(config: Dict[str, Any], key: str, choices: Any) -> None:
    if config[key] not in choices:
        _fail(key, config[key], "one of " + ", ".join(repr(c) for c in choices))


def _check_id_counts(cfg: Dict[str, Any]) -> None:
    """``id_counts``: null, or an id counts file of exactly this config's tables (its header:
    the ids themselves are checked when an entry is built from it)."""
    counts = cfg["id_counts"]
    if counts is None:
        return
    if not (isinstance(counts, str) and os.path.isfile(counts)):
        _fail("id_counts", counts, "null or the path of an existing id counts file (dlrm_row_order.py)")
    if cfg["sharding_type"] == "row_wise":
        _fail("id_counts", counts, "null with sharding_type 'row_wise' (an ordered entry keeps whole tables: use 'table_wise')")
    try:
        row_order.check_counts(counts, cfg["id_list_features_keys"], cfg["num_embeddings_per_feature"], full=False)
    except ValueError as e:
        raise ValueError(f"model config: 'id_counts': {e}") from None


def read_config_source(config: Union[Dict[str, Any], str, os.PathLike, None]) -> Dict[str, Any]:
    """The config as a new dict: defaults for None, a JSON file's contents for a path."""
    if config is None:
        return create_default_model_config()
    if isinstance(config, (str, os.PathLike)):
        try:
            with open(config) as f:
                loaded = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"model config file {str(config)!r} could not be read: {e}") from e
        if not isinstance(loaded, dict):
            raise ValueError(f"model config file {str(config)!r} must hold a JSON object")
        return loaded
    if isinstance(config, dict):
        return copy.deepcopy(config)
    raise ValueError(
        f"model config must be a dict, a path to a JSON file or None; got {type(config).__name__}"
    )


def resolve_model_config(
    config: Union[Dict[str, Any], str, os.PathLike, None] = None,
) -> Dict[str, Any]:
    """Validate ``config`` and return a new, complete dict (defaults filled in,
    ``id_list_features_keys`` named). Raises ``ValueError`` naming the key, the value and
    what was expected. Allocates nothing."""
    given = read_config_source(config)
    defaults = create_default_model_config()
    known = set(defaults) | {"id_list_features_keys"}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(
            f"model config: unknown key(s) {unknown}; expected only {sorted(known)} "
            "(a typo?)"
        )
    cfg = {**defaults, **given}

    _check_positive_int(cfg, "dense_in_features")
    _check_positive_int(cfg, "embedding_dim")
    _check_positive_int_list(cfg, "dense_arch_layer_sizes", min_len=1)
    _check_positive_int_list(cfg, "over_arch_layer_sizes", min_len=2)
    if cfg["over_arch_layer_sizes"][-1] != 1:
        _fail("over_arch_layer_sizes", cfg["over_arch_layer_sizes"], "a last layer of size 1")
    _check_positive_int_list(cfg, "num_embeddings_per_feature", min_len=1)
    num_tables = len(cfg["num_embeddings_per_feature"])

    keys = cfg.get("id_list_features_keys")
    if keys is None:
        cfg["id_list_features_keys"] = [f"cat_{i}" for i in range(num_tables)]
    elif (
        not isinstance(keys, list)
        or not all(isinstance(k, str) and k for k in keys)
        or len(set(keys)) != len(keys)
    ):
        _fail("id_list_features_keys", keys, "a list of unique, non-empty strings")
    elif len(keys) != num_tables:
        _fail(
            "id_list_features_keys",
            keys,
            f"one key per table: {num_tables} (the length of num_embeddings_per_feature), "
            f"not {len(keys)}; or leave it out to get cat_0..cat_{num_tables - 1}",
        )

    _check_choice(cfg, "quant_dtype", QUANT_DTYPES)
    multiple = EMBEDDING_DIM_MULTIPLE[cfg["quant_dtype"]]
    if cfg["embedding_dim"] % multiple != 0:
        _fail("embedding_dim", cfg["embedding_dim"], f"a multiple of {multiple} for {cfg['quant_dtype']}: "
              "fbgemm packs a row into whole bytes and TorchRec reads its float16 scale/bias in place, "
              "so a row (D values and 4 bytes of scale/bias) must be an even number of bytes")
    _check_choice(cfg, "sharding_type", SHARDING_TYPES)
    if cfg["sharding_type"] == "row_wise" and cfg["quant_dtype"] not in ("int8", "int4"):
        _fail("sharding_type", "row_wise", f"'table_wise' for {cfg['quant_dtype']} (TorchRec 1.8 row-wise-shards only int8/int4)")
    device = cfg["device"]
    if not (device in DEVICES or (isinstance(device, str) and CUDA_INDEX.fullmatch(device))):
        _fail("device", device, "one of " + ", ".join(repr(c) for c in DEVICES) + " or 'cuda:<N>' (the first GPU)")
    if cfg["device"].startswith("cuda") and not torch.cuda.is_available():
        _fail("device", cfg["device"], "'cpu' or 'auto': no CUDA device is visible")
    world_size = cfg["world_size"]
    if world_size is not None and (not _is_int(world_size) or world_size < 1):
        _fail("world_size", world_size,
              "null (every visible GPU, one for a TorchServe worker; 1 on CPU) or an integer >= 1")  # fmt: skip
    fraction = cfg["gpu_memory_fraction"]
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1):
        _fail("gpu_memory_fraction", fraction,
              "null (all of each GPU) or a number in (0, 1]: the share of each GPU's memory the tables may plan on")  # fmt: skip
    if not _is_int(cfg["seed"]) or cfg["seed"] < 0:
        _fail("seed", cfg["seed"], "an integer >= 0")
    checkpoint = cfg["checkpoint"]
    if checkpoint is not None and not (
        isinstance(checkpoint, str) and (os.path.isfile(checkpoint) or dlrm_checkpoint.is_dcp_directory(checkpoint))
    ):
        _fail("checkpoint", checkpoint, "null, the path of an existing state_dict file, or a "
              "torch.distributed.checkpoint directory (one holding a .metadata file)")  # fmt: skip
    _check_choice(cfg, "id_overflow", ID_OVERFLOW_POLICIES)
    _check_positive_int(cfg, "max_samples_per_request")
    store = cfg["table_store"]
    if store is not None and not (isinstance(store, str) and store):
        _fail("table_store", store, "null (no store) or the path of a directory for table store entries")
    _check_choice(cfg, "response_format", RESPONSE_FORMATS)
    _check_id_counts(cfg)

    dense_out = cfg["dense_arch_layer_sizes"][-1]
    if dense_out != cfg["embedding_dim"]:
        logger.warning(
            "dense_arch_layer_sizes ends in %s but embedding_dim is %s: the DLRM's last "
            "dense layer must output embedding_dim, so it is set to %s",
            dense_out,
            cfg["embedding_dim"],
            cfg["embedding_dim"],
        )
        cfg["dense_arch_layer_sizes"] = cfg["dense_arch_layer_sizes"][:-1] + [cfg["embedding_dim"]]
    return cfg


# ---------------------------------------------------------------------------------------
# The pipeline.
# ---------------------------------------------------------------------------------------


def visible_gpus() -> int:
    """CUDA devices this process sees (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def choose_devices(
    device: str, world_size: Optional[int], cuda_count: int, gpu_id: Optional[int] = None, served: bool = False
) -> Tuple[str, int, List[int]]:
    """Step 1's decision, a pure function: (compute device, world size, GPU of each rank).

    ``device`` and ``world_size`` are the config's; ``cuda_count`` the GPUs this process sees;
    ``gpu_id`` TorchServe's ``context.system_properties["gpu_id"]`` and ``served`` whether a
    TorchServe worker asks (its gpu_id None means TorchServe gave it no GPU: number_of_gpu=0,
    or no GPU found). The ranks' GPUs start at N of ``cuda:N``, else at ``gpu_id``, else at 0,
    and wrap around; world_size None means every visible GPU, one for a served worker (one
    worker per GPU), 1 on the CPU. Raises ValueError naming the key for what cannot be met.

        choose_devices("auto", None, 4)                            -> ("cuda", 4, [0, 1, 2, 3])
        choose_devices("auto", None, 4, gpu_id=3, served=True)     -> ("cuda", 1, [3])
        choose_devices("auto", 2, 4, gpu_id=3, served=True)        -> ("cuda", 2, [3, 0])
        choose_devices("auto", None, 4, gpu_id=None, served=True)  -> ("cpu", 1, [])
    """
    if device == "cpu" or (device == "auto" and (cuda_count == 0 or (served and gpu_id is None))):
        return "cpu", world_size or 1, []
    if cuda_count == 0:
        _fail("device", device, "'cpu' or 'auto': no CUDA device is visible")
    pinned = CUDA_INDEX.fullmatch(device)
    if pinned is None and served and gpu_id is None:
        _fail("device", device, "'auto' or 'cpu' for this worker: TorchServe gave it no GPU (gpu_id None: "
              "number_of_gpu=0 in config.properties, or TorchServe found no GPU)")  # fmt: skip
    first = int(pinned.group(1)) if pinned else (gpu_id or 0)
    if first >= cuda_count:
        what = f"'device' is {device!r}" if pinned else f"TorchServe's gpu_id is {gpu_id}"
        raise ValueError(f"model config: {what}; expected a GPU below {cuda_count}, the number of visible GPUs")
    count = world_size or (1 if served else cuda_count)
    if count > cuda_count:
        _fail("world_size", world_size, f"at most {cuda_count}, the number of visible GPUs")
    return "cuda", count, [(first + rank) % cuda_count for rank in range(count)]


def workers_per_gpu(workers: int, world_size: int, cuda_count: int) -> int:
    """The most workers of one model holding shards on one GPU, when TorchServe hands the
    ``workers`` their gpu_ids round robin over ``cuda_count`` GPUs and each spans
    ``world_size`` GPUs from its own: e.g. 4 workers on 4 GPUs, world_size 2 -> 2."""
    return world_size * (workers // cuda_count) + min(world_size, workers % cuda_count)


def serving_config(
    config: Dict[str, Any], gpu_id: Optional[int], cuda_count: int, workers: Optional[int] = None
) -> Dict[str, Any]:
    """The resolved ``config`` a TorchServe worker builds, its devices made explicit: the CPU
    (also for ``device: "auto"`` when TorchServe gave it no GPU), or ``device: "cuda:<first>"``
    and ``world_size`` from ``choose_devices``, with ``gpu_memory_fraction`` divided among the
    workers sharing a GPU (``workers``: the model's maxWorkers; None: one per GPU, TorchServe's
    default), so that each plans against what it may use, not the whole GPU."""
    compute, world_size, gpus = choose_devices(config["device"], config["world_size"], cuda_count, gpu_id, served=True)
    if compute == "cpu":
        return {**config, "device": "cpu", "world_size": world_size}
    sharers = workers_per_gpu(workers or cuda_count, world_size, cuda_count)
    fraction = (config["gpu_memory_fraction"] or 1.0) / sharers
    return {**config, "device": f"cuda:{gpus[0]}", "world_size": world_size, "gpu_memory_fraction": fraction}


# TorchRec rank -> the GPU it runs on in this process (``place_ranks_on_gpus``).
_RANK_GPUS: Dict[int, int] = {}


def _rank_device(device_type: str, rank: int) -> torch.device:
    """TorchRec's ``rank_device`` with CUDA ranks on this process's GPUs."""
    if device_type == "cuda":
        return torch.device("cuda", _RANK_GPUS.get(rank, rank))
    return rank_device(device_type, rank)


def place_ranks_on_gpus(gpus: List[int]) -> None:
    """Run TorchRec rank r on ``cuda:gpus[r]`` in this process.

    TorchRec 1.8's inference sharding puts rank r on cuda:r (``torchrec.distributed.types.
    rank_device``: the lookups' TBEs at sharding, ``KJTOneToAll``'s copies at every forward).
    A worker serving on its gpu_id needs its ranks elsewhere, so those two callers get
    ``_rank_device`` instead, for the rest of the process. One placement per process (a
    worker serves one model): a later model whose ranks would land elsewhere is refused."""
    clash = {rank: (_RANK_GPUS[rank], gpu) for rank, gpu in enumerate(gpus) if _RANK_GPUS.get(rank, gpu) != gpu}
    if clash:
        raise ValueError(
            f"TorchRec ranks already run on other GPUs in this process (rank: (there, asked)) {clash}: "
            "one GPU placement per process; build this model in another process"
        )
    _RANK_GPUS.update(enumerate(gpus))
    torchrec_dist_data.rank_device = torchrec_embedding_lookup.rank_device = _rank_device


# True while ``build_store_entry`` builds a GPU model's entry: TorchRec shards onto ``meta``.
_TABLES_ON_META = False


@contextmanager
def tables_on_meta() -> Iterator[None]:
    """Inside: a CUDA model's tables are sharded onto ``meta`` (no GPU memory), as TorchRec's
    own ``shard_quant_model(sharding_device="meta")`` does; for building a store entry only."""
    global _TABLES_ON_META
    _TABLES_ON_META = True
    try:
        yield
    finally:
        _TABLES_ON_META = False


def select_devices(cfg: Dict[str, Any]) -> Tuple[str, int, torch.device]:
    """Step 1: (compute device type, world size, device of the dense layers); see
    ``choose_devices``. On GPUs TorchRec's ranks are placed on them (``place_ranks_on_gpus``)."""
    compute, world_size, gpus = choose_devices(cfg["device"], cfg["world_size"], visible_gpus())
    if compute == "cuda":
        place_ranks_on_gpus(gpus)
        torch.cuda.set_device(gpus[0])
        logger.info("CUDA: %d rank(s) on %s", world_size, ", ".join(f"cuda:{g}" for g in gpus))
        return "cuda", world_size, torch.device("cuda", gpus[0])
    # TorchRec builds CUDA tables unless told to keep the device it is given.
    global_settings.set_propogate_device(True)
    logger.info("CPU sharding: switched on TorchRec's device propagation for this process")
    return "cpu", world_size, torch.device("cpu")


def build_embedding_bag_configs(cfg: Dict[str, Any]) -> List[EmbeddingBagConfig]:
    """Step 2: one table per sparse feature, named ``t_<feature>``."""
    return [
        EmbeddingBagConfig(
            name=f"{TABLE_PREFIX}{feature}",
            embedding_dim=cfg["embedding_dim"],
            num_embeddings=num_embeddings,
            feature_names=[feature],
        )
        for feature, num_embeddings in zip(
            cfg["id_list_features_keys"], cfg["num_embeddings_per_feature"]
        )
    ]


def build_dlrm(
    cfg: Dict[str, Any], eb_configs: List[EmbeddingBagConfig], dense_device: torch.device
) -> DLRM:
    """Step 3: the float DLRM; its tables live on ``meta`` (no memory), its dense layers are
    drawn on the CPU from ``seed``, then moved to ``dense_device``: the same weights on every
    device. Only the CPU generator is seeded (``torch.manual_seed`` would also seed every CUDA
    generator), and its state is restored: the caller's RNG states are left as they were."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(cfg["seed"])
        model = DLRM(
            embedding_bag_collection=EmbeddingBagCollection(
                tables=eb_configs, device=torch.device("meta")
            ),
            dense_in_features=cfg["dense_in_features"],
            dense_arch_layer_sizes=cfg["dense_arch_layer_sizes"],
            over_arch_layer_sizes=cfg["over_arch_layer_sizes"],
            dense_device=torch.device("cpu"),
        )
    for name, child in model.named_children():
        if name != "sparse_arch":  # the tables stay on meta until sharded
            child.to(dense_device)
    return model


def quantize_tables(model: DLRM, quant_dtype: str) -> DLRM:
    """Step 4: TorchRec's quantization of the embedding bag collection (still on meta)."""
    return quantize_embeddings(model, dtype=QUANT_DTYPES[quant_dtype][0], inplace=True)


def plan_sharding(
    model: nn.Module,
    eb_configs: List[EmbeddingBagConfig],
    sharding_type: str,
    quant_dtype: str,
    compute_device: str,
    world_size: int,
    hbm_cap: Optional[int] = None,
) -> ShardingPlan:
    """Step 5: where each table goes, tables constrained to ``sharding_type`` and the
    quant kernel; on CUDA each rank gets ``hbm_cap`` bytes (None: TorchRec's 32 GB default)."""
    constraints = {
        table.name: ParameterConstraints(
            sharding_types=[SHARDING_TYPES[sharding_type]],
            compute_kernels=[EmbeddingComputeKernel.QUANT.value],
        )
        for table in eb_configs
    }
    topology = Topology(
        world_size=world_size,
        compute_device=compute_device,
        local_world_size=world_size,
        hbm_cap=hbm_cap,
    )
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    return planner.plan(module=model, sharders=[_sharder(quant_dtype)])


# The share of each device TorchRec's planner keeps for what is not tables (its
# HeuristicalStorageReservation's default percentage).
PLANNER_RESERVE = 0.15


def gpu_memory_of(cfg: Dict[str, Any], compute_device: str) -> Dict[int, Tuple[int, int]]:
    """{GPU of each rank: (bytes its tables may plan on, bytes free now)}; {} on the CPU.

    The bytes to plan on are the GPU's total memory x ``gpu_memory_fraction`` (what this
    process may use: ``serving_config`` divides it among the workers sharing a GPU), the same
    at every start, so the plan and the store entry's key do not depend on what else runs;
    the free bytes are checked apart (``plan_to_fit``; not for an entry built on ``meta``)."""
    if compute_device != "cuda":
        return {}
    _, _, gpus = choose_devices(cfg["device"], cfg["world_size"], visible_gpus())
    fraction = cfg["gpu_memory_fraction"] or 1.0
    return {g: (int(torch.cuda.get_device_properties(g).total_memory * fraction),
                1 << 62 if _TABLES_ON_META else torch.cuda.mem_get_info(g)[0])
            for g in gpus}  # fmt: skip


def plan_to_fit(
    model: nn.Module,
    eb_configs: List[EmbeddingBagConfig],
    cfg: Dict[str, Any],
    compute_device: str,
    world_size: int,
    gpu_memory: Dict[int, Tuple[int, int]],
) -> ShardingPlan:
    """Step 5 within the memory this process may use: ``plan_sharding`` with each rank capped
    at the least plan bytes of ``gpu_memory`` (``gpu_memory_of``; {}: no cap, the CPU). A
    config that cannot fit - the planner finds no plan, or a rank's tables exceed its GPU's
    free bytes - is a ValueError naming each rank's table bytes (``table_bytes_per_device``)
    against that memory, before anything is allocated."""
    args = (model, eb_configs, cfg["sharding_type"], cfg["quant_dtype"], compute_device, world_size)
    if not gpu_memory:
        return plan_sharding(*args)
    gpus = list(gpu_memory)
    cap = min(plan_bytes for plan_bytes, _ in gpu_memory.values())
    try:
        plan: Optional[ShardingPlan] = plan_sharding(*args, hbm_cap=cap)
    except PlannerError:
        plan = None
    per_device = table_bytes_per_device(plan or plan_sharding(*args, hbm_cap=1 << 60), cfg, compute_device)
    needed = {int(name.split()[1]): size for name, size in per_device.items()}  # "rank 0 (cuda:0)": bytes
    short = [rank for rank, size in needed.items() if size > gpu_memory[gpus[rank]][1]]
    if plan is not None and not short:
        return plan
    ranks = "; ".join(
        f"rank {rank} on cuda:{gpus[rank]}: {_bytes(needed.get(rank, 0))} of tables, "
        f"{_bytes(gpu_memory[gpus[rank]][0])} to plan on, {_bytes(gpu_memory[gpus[rank]][1])} free"
        for rank in range(world_size)
    )
    why = ("TorchRec's planner found no plan: each rank keeps "
           f"{PLANNER_RESERVE:.0%} of its bytes to plan on for the rest" if plan is None else "not enough free memory")  # fmt: skip
    raise ValueError(
        f"model config: the tables do not fit the GPU memory this process may use ({why}): {ranks}. "
        f"Expected fewer table bytes (quant_dtype is {cfg['quant_dtype']!r}), more GPUs (world_size is "
        f"{world_size}), a larger gpu_memory_fraction (the share of each GPU: "
        f"{cfg['gpu_memory_fraction'] or 1.0:.3g}), or fewer workers per GPU"
    )


def _bytes(size: int) -> str:
    return f"{size:,} B ({size / 1e9:.2f} GB)"


def shard_tables(
    model: nn.Module, plan: ShardingPlan, quant_dtype: str, compute_device: str, world_size: int
) -> nn.Module:
    """Step 6: replace the EBC by a ``ShardedQuantEmbeddingBagCollection``; this allocates
    the quantized shards (filled with zeros) on their devices."""
    if compute_device == "cuda":  # the first rank's GPU (place_ranks_on_gpus), or meta for an entry only
        sharding_device = "meta" if _TABLES_ON_META else f"cuda:{_RANK_GPUS.get(0, 0)}"
    else:
        sharding_device = "cpu"
    sharded, _ = shard_quant_model(
        model,
        world_size=world_size,
        compute_device=compute_device,
        sharding_device=sharding_device,
        sharders=[_sharder(quant_dtype)],
        sharding_plan=plan,
    )
    return sharded


# ---------------------------------------------------------------------------------------
# Step 7: fill the shards.
# ---------------------------------------------------------------------------------------


def _sharded_tbes(model: nn.Module) -> Dict[Any, Any]:
    """{TBE: its TorchRec grouped config} of every sharded quant EBC in ``model``."""
    tbes: Dict[Any, Any] = {}
    for module in model.modules():
        if isinstance(module, ShardedQuantEmbeddingBagCollection):
            tbes.update(module.tbes_configs())
    return tbes


# A table shard to write: (table name, its first row in the table, rows [R, stored bytes],
# scale/bias rows [R, 4] or None).
Shard = Tuple[str, int, torch.Tensor, Optional[torch.Tensor]]


def _table_shards(model: nn.Module) -> Iterator[Shard]:
    """Every shard as (table name, first row, quantized rows, scale/bias rows or None).

    The tensors are views into the TBE buffers that serve lookups: writing them fills the
    model."""
    for tbe, grouped_config in _sharded_tbes(model).items():
        for (weights, scale_bias), spec, table in zip(
            tbe.split_embedding_weights(split_scale_shifts=True),
            tbe.embedding_specs,
            grouped_config.embedding_tables,
        ):
            assert spec[0] == table.name, (spec[0], table.name)
            row_offset, col_offset = table.local_metadata.shard_offsets
            if col_offset != 0:
                raise NotImplementedError("column-wise shards are not supported")
            yield table.name, row_offset, weights, scale_bias


def _chunks(row_start: int, row_end: int) -> Iterator[Tuple[int, int, int]]:
    """(chunk index, first row, end row) of the fixed chunks covering [row_start, row_end)."""
    for chunk in range(row_start // FILL_CHUNK_ROWS, math.ceil(row_end / FILL_CHUNK_ROWS)):
        yield chunk, max(row_start, chunk * FILL_CHUNK_ROWS), min(row_end, (chunk + 1) * FILL_CHUNK_ROWS)


def _random_rows(
    seed: int, table_index: int, chunk: int, rows: int, row_bytes: int, quant_dtype: str, bound: float
) -> np.ndarray:
    """The stored bytes of ``rows`` full rows of one chunk, uniform on [-bound, bound]."""
    rng = np.random.Generator(np.random.PCG64([seed, table_index, chunk]))
    if quant_dtype in ("int8", "int4"):
        # Uniform codes; with scale = 2*bound/(levels-1) and bias = -bound they dequantize to
        # a uniform grid on [-bound, bound] - the quantized image of TorchRec's init.
        return rng.integers(0, 256, size=(rows, row_bytes), dtype=np.uint8)
    values = rng.random(size=(rows, row_bytes * 8 // QUANT_DTYPES[quant_dtype][1]), dtype=np.float32)
    values = values * np.float32(2 * bound) - np.float32(bound)
    return values.astype(np.float16 if quant_dtype == "fp16" else np.float32).view(np.uint8)


def _quantized_scale_bias(quant_dtype: str, bound: float) -> torch.Tensor:
    """The float16 (scale, bias) pair of every randomly initialized row, as 4 bytes."""
    levels = (1 << QUANT_DTYPES[quant_dtype][1]) - 1
    return torch.tensor([2 * bound / levels, -bound], dtype=torch.float16).view(torch.uint8)


def _progress(total_bytes: int, desc: str) -> tqdm:
    return tqdm(
        total=total_bytes,
        desc=desc,
        unit="B",
        unit_scale=True,
        mininterval=2.0,
        disable=total_bytes < PROGRESS_MIN_BYTES,
    )


def fill_random(shards: List[Shard], cfg: Dict[str, Any]) -> None:
    """Seeded init written straight into the quantized ``shards`` (no float table ever exists).

    TorchRec initializes a table of R rows uniform on +-sqrt(1/R); each row here is drawn on
    that interval: int8/int4 as uniform codes with one (scale, bias) per row, fp16/fp32 as
    uniform floats. Chunks are drawn on a thread pool (numpy releases the GIL)."""
    table_index = {
        f"{TABLE_PREFIX}{f}": i for i, f in enumerate(cfg["id_list_features_keys"])
    }
    quant_dtype = cfg["quant_dtype"]
    jobs = []
    for name, row_offset, weights, scale_bias in shards:
        i = table_index[name]
        bound = math.sqrt(1.0 / cfg["num_embeddings_per_feature"][i])
        if scale_bias is not None:
            scale_bias.copy_(_quantized_scale_bias(quant_dtype, bound).to(scale_bias.device).expand_as(scale_bias))
        for chunk, start, end in _chunks(row_offset, row_offset + weights.shape[0]):
            first = chunk * FILL_CHUNK_ROWS
            jobs.append((i, chunk, first, start, end, row_offset, weights, bound))

    # Pool threads don't inherit the caller's inference mode; shards made under it are
    # inference tensors, writable only inside it.
    inference_mode = torch.is_inference_mode_enabled()

    def fill(job: Tuple[Any, ...]) -> int:
        i, chunk, first, start, end, row_offset, weights, bound = job
        # Draw the whole chunk, so a row's bytes don't depend on where its shard starts.
        rows = _random_rows(cfg["seed"], i, chunk, end - first, weights.shape[1], quant_dtype, bound)
        with torch.inference_mode(inference_mode):
            weights[start - row_offset : end - row_offset].copy_(torch.from_numpy(rows[start - first :]))
        return (end - start) * weights.shape[1]

    total = sum((job[4] - job[3]) * job[6].shape[1] for job in jobs)
    with _progress(total, "filling tables") as bar, ThreadPoolExecutor(FILL_THREADS) as pool:
        for done in pool.map(fill, jobs):
            bar.update(done)


def _expected_state(cfg: Dict[str, Any], eb_configs: List[EmbeddingBagConfig]) -> Dict[str, torch.Size]:
    """Names and shapes of a float TorchRec ``DLRM.state_dict()`` of this config (on meta)."""
    meta = DLRM(
        embedding_bag_collection=EmbeddingBagCollection(tables=eb_configs, device=torch.device("meta")),
        dense_in_features=cfg["dense_in_features"],
        dense_arch_layer_sizes=cfg["dense_arch_layer_sizes"],
        over_arch_layer_sizes=cfg["over_arch_layer_sizes"],
        dense_device=torch.device("meta"),
    )
    return {name: t.shape for name, t in meta.state_dict().items()}


def read_checkpoint(path: str, expected: Dict[str, torch.Size]) -> Dict[str, torch.Tensor]:
    """The checkpoint's tensors, memory-mapped (tables are read chunk by chunk later); for a
    DCP directory, ``dlrm_checkpoint.DCPTensor``s, which read rows when sliced.

    Only ``torch.load(weights_only=True)``: a pickled object is refused, never run (a DCP
    ``.metadata`` goes through ``dlrm_checkpoint``'s allow-list)."""
    if os.path.isdir(path):
        state = dlrm_checkpoint.read_dcp(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... for bad files
            raise ValueError(
                f"checkpoint {path!r} could not be loaded as a plain state_dict of tensors "
                f"(torch.load weights_only=True): {e}"
            ) from e
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path!r} holds a {type(state).__name__}, not a state_dict")
    if state and all(k.startswith("model.") for k in state):  # TorchRec's DLRMTrain wrapper
        state = {k[len("model.") :]: v for k, v in state.items()}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k} {tuple(state[k].shape) if hasattr(state[k], 'shape') else type(state[k]).__name__} (expected {tuple(expected[k])})"
        for k in set(expected) & set(state)
        if not isinstance(state[k], (torch.Tensor, dlrm_checkpoint.DCPTensor)) or state[k].shape != expected[k]
    )
    if missing or extra or misshaped:
        raise ValueError(
            f"checkpoint {path!r} does not match the model config: missing {missing}, "
            f"extra {extra}, mis-shaped {misshaped}"
        )
    return state


def quantize_rows(rows: torch.Tensor, quant_dtype: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Float rows -> (stored bytes, scale/bias bytes or None), as TorchRec's
    ``quantize_state_dict`` does it (fbgemm's row-wise quantization with float16 scale/bias)."""
    rows = rows.float()
    if quant_dtype == "fp32":
        return rows.contiguous().view(torch.uint8), None
    if quant_dtype == "fp16":
        return rows.half().contiguous().view(torch.uint8), None
    fused = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(
        rows.contiguous(), QUANT_DTYPES[quant_dtype][1]
    )
    return fused[:, :-4], fused[:, -4:]


CHECKPOINT_TABLE_KEY = "sparse_arch.embedding_bag_collection.embedding_bags.{}.weight"


def copy_dense_weights(model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """The checkpoint's dense layers (everything but the tables) into ``model``."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in state:
                param.copy_(state[name][:])  # [:]: a DCP tensor's rows, read


def quantize_checkpoint_tables(shards: List[Shard], state: Dict[str, torch.Tensor], quant_dtype: str) -> None:
    """The checkpoint's float tables quantized chunk by chunk into ``shards``."""
    total = sum(w.shape[0] * w.shape[1] for _, _, w, _ in shards)
    with torch.no_grad(), _progress(total, "quantizing checkpoint tables") as bar:
        for name, row_offset, weights, scale_bias in shards:
            table = state[CHECKPOINT_TABLE_KEY.format(name)]
            for _, start, end in _chunks(row_offset, row_offset + weights.shape[0]):
                q, sb = quantize_rows(table[start:end], quant_dtype)
                local = slice(start - row_offset, end - row_offset)
                weights[local].copy_(q)
                if scale_bias is not None:
                    scale_bias[local].copy_(sb)
                bar.update(q.numel())


def write_tables(shards: List[Shard], cfg: Dict[str, Any], state: Optional[Dict[str, torch.Tensor]]) -> None:
    """The rows of every shard: quantized from the checkpoint's ``state``, or random."""
    if state is not None:
        quantize_checkpoint_tables(shards, state, cfg["quant_dtype"])
    else:
        fill_random(shards, cfg)


def read_checkpoint_of(cfg: Dict[str, Any], eb_configs: List[EmbeddingBagConfig]) -> Optional[Dict[str, torch.Tensor]]:
    """The config's checkpoint, checked against its model and memory-mapped, or None."""
    return read_checkpoint(cfg["checkpoint"], _expected_state(cfg, eb_configs)) if cfg["checkpoint"] else None


def fill_tables(model: nn.Module, cfg: Dict[str, Any], eb_configs: List[EmbeddingBagConfig]) -> None:
    """Step 7: TorchRec leaves the quantized shards at zero; write real weights (and the
    checkpoint's dense layers, if there is one)."""
    state = read_checkpoint_of(cfg, eb_configs)
    if state is not None:
        copy_dense_weights(model, state)
    write_tables(list(_table_shards(model)), cfg, state)


# ---------------------------------------------------------------------------------------
# Steps 6-7 through a table store: the shards are a file's pages, built once.
# ---------------------------------------------------------------------------------------


def store_key(cfg: Dict[str, Any], plan: ShardingPlan, compute_device: str) -> Dict[str, Any]:
    """Everything that decides the bytes of a config's tables: a store entry's key.

    Not in it: the dense layers (built from the seed or the checkpoint at every start) and
    the serving-only keys (id_overflow, max_samples_per_request, response_format,
    table_store, device beyond what the plan says)."""
    if cfg["checkpoint"]:
        digest = table_store.directory_sha256 if os.path.isdir(cfg["checkpoint"]) else table_store.file_sha256
        init: Dict[str, Any] = {"checkpoint_sha256": digest(cfg["checkpoint"])}
    else:
        init = {"seed": cfg["seed"], "fill_chunk_rows": FILL_CHUNK_ROWS, "numpy": _release(np.__version__)}
    shards = {
        name: [sharding.sharding_type, sharding.compute_kernel, sharding.ranks,
               [[s.shard_offsets, s.shard_sizes, str(s.placement)] for s in sharding.sharding_spec.shards]]
        for module_plan in plan.plan.values()
        for name, sharding in module_plan.items()  # type: ignore[union-attr]
    }  # fmt: skip
    key = {
        "tables": [[TABLE_PREFIX + f, rows] for f, rows in zip(cfg["id_list_features_keys"], cfg["num_embeddings_per_feature"])],
        "embedding_dim": cfg["embedding_dim"],
        "quant_dtype": cfg["quant_dtype"],
        "init": init,
        "plan": shards,
        "compute_device": compute_device,
        # What lays out and fills the bytes: TorchRec (plan, grouping into TBEs), fbgemm (row
        # layout, quantization), numpy (random init, above). Local build tags (+cpu, +cu128)
        # are dropped: CPU and CUDA builds of one version lay out the host copy alike.
        "versions": {"torchrec": _release(torchrec.__version__), "fbgemm_gpu": _release(fbgemm_gpu.__version__)},
    }
    if cfg["id_counts"]:  # an ordered entry: its rows laid out by these counts (same scores)
        key["row_order"] = {"rule": row_order.ORDER_RULE, "counts_sha256": table_store.file_sha256(cfg["id_counts"])}
    return key


def _release(version: str) -> str:
    """'2.13.0+cpu' -> '2.13.0'."""
    return version.split("+")[0]


def tables_from_store(
    model: nn.Module,
    plan: ShardingPlan,
    cfg: Dict[str, Any],
    eb_configs: List[EmbeddingBagConfig],
    compute_device: str,
    world_size: int,
) -> nn.Module:
    """Steps 6-7 with ``cfg["table_store"]``: the shards are the store entry's tables.

    The entry is opened if it is there and sound; otherwise it is built first - once, by
    one process, with the same ``write_tables`` as without a store, into a file instead of
    ``torch.zeros`` - and published. On the CPU the TBEs take the entry's mapped pages as
    their weights (nothing allocated, nothing copied: N processes share one copy through the
    page cache); on CUDA the entry is the host-side source copied to the shards' devices.
    ``model.table_store_entry`` says which file serves and whether this call built it."""
    state = read_checkpoint_of(cfg, eb_configs)
    key = store_key(cfg, plan, compute_device)

    def layouts() -> List[Dict[str, Any]]:
        """The TBEs' host layouts, from a sharding whose tables are on meta (no memory)."""
        with table_store.tbe_weights_from("meta") as created:
            probe = shard_tables(copy.deepcopy(model), plan, cfg["quant_dtype"], compute_device, world_size)
        grouped = _sharded_tbes(probe)
        found = [
            table_store.tbe_layout(tbe, [t.local_metadata.shard_offsets[0] for t in grouped[tbe].embedding_tables])
            for tbe in created
        ]
        return ordered_layouts(found) if cfg["id_counts"] else found

    def fill(buffers: List[torch.Tensor], layouts: List[Dict[str, Any]]) -> None:
        if cfg["id_counts"]:
            return write_ordered_tables(buffers, layouts, cfg, state)
        write_tables([s for b, layout in zip(buffers, layouts) for s in table_store.table_shards(b, layout)], cfg, state)

    label = f"{cfg['quant_dtype']}-{len(eb_configs)}t-{compute_device}{world_size}{'-ordered' if cfg['id_counts'] else ''}"
    entry = table_store.open_or_build(cfg["table_store"], label, key, layouts, fill,
                                      access="random" if compute_device == "cpu" else "sequential")  # fmt: skip
    on_cpu = compute_device == "cpu"
    with table_store.tbe_weights_from(entry.tensors if on_cpu else "own") as created:
        model = shard_tables(model, plan, cfg["quant_dtype"], compute_device, world_size)
    if on_cpu:  # the TBEs address the pages with fbgemm's own offsets: check they agree
        for tbe, layout in zip(created, entry.layouts):
            if [t["offset"] for t in layout["tables"]] != list(tbe.weights_physical_offsets):
                raise table_store.StoreError(f"table store: {entry.path}: table offsets differ from this TorchRec's TBEs")
    else:
        table_store.copy_into_tbes(entry, created)
    table_store.apply_row_order(entry, created)
    if on_cpu:  # a batch's missing pages read from several threads at once, before its lookup
        model.page_prefetchers = table_store.prefetch_before_lookups(created, entry)
        if cfg["id_counts"] and table_store.PIN_BYTES:  # the hottest rows locked in memory
            model.pinned_rows = pin_hottest_rows(entry, cfg)
    if state is not None:
        copy_dense_weights(model, state)
    model.table_store_entry = {"path": entry.path, "built": entry.built}
    if not entry.built:
        logger.info("table store: mapped %s", entry.path)
    return model


# An ordered build writes a table this many bytes of rows at a time (in id order), then moves
# them to their rows.
ORDER_STAGE_BYTES = 128 << 20


def ordered_layouts(layouts: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The layouts of an ordered entry: every table of a TBE gets its map's place in the TBE's
    map (``map_offset``), the TBE the map's length (``map_rows``). Whole tables only."""
    ordered = []
    for layout in layouts:
        tables, start = [], 0
        for table in layout["tables"]:
            if table["row_offset"] != 0:
                raise ValueError(f"id_counts: table {table['name']} is sharded by rows; an ordered entry needs whole tables")
            tables.append({**table, "map_offset": start})
            start += table["rows"]
        ordered.append({**layout, "tables": tables, "map_rows": start})
    return ordered


def write_ordered_tables(buffers: List[torch.Tensor], layouts: List[Dict[str, Any]], cfg: Dict[str, Any],
                         state: Optional[Dict[str, torch.Tensor]]) -> None:  # fmt: skip
    """Fill an ordered entry: ``buffers`` are the TBEs' host buffers, then their maps (bytes).
    Each table's map is ``row_order`` of ``cfg["id_counts"]``; its rows are written by
    ``write_tables`` as without an order (the same bytes for every id), ORDER_STAGE_BYTES
    at a time in id order, then copied to the rows the map gives them."""
    counts = row_order.check_counts(cfg["id_counts"], cfg["id_list_features_keys"], cfg["num_embeddings_per_feature"])
    maps = buffers[len(layouts) :]
    total = sum(t["rows"] * t["row_bytes"] for layout in layouts for t in layout["tables"])
    with _progress(total, "filling ordered tables") as bar:
        for buffer, mapping, layout in zip(buffers, maps, layouts):
            for table in layout["tables"]:
                rows, width, sb = table["rows"], table["row_bytes"], table["scale_bias_bytes"]
                order = torch.from_numpy(row_order.row_order(rows, counts[table["name"][len(TABLE_PREFIX) :]]))
                mapping.view(torch.int32)[table["map_offset"] : table["map_offset"] + rows] = order
                target = buffer[table["offset"] : table["offset"] + rows * width].view(rows, width)
                step = max(1, ORDER_STAGE_BYTES // width // FILL_CHUNK_ROWS) * FILL_CHUNK_ROWS  # whole fill chunks
                for start in range(0, rows, step):
                    stage = torch.empty(min(step, rows - start), width, dtype=torch.uint8)
                    write_tables([(table["name"], start, stage[:, sb:], stage[:, :sb] if sb else None)], cfg, state)
                    target.index_copy_(0, order[start : start + stage.shape[0]].to(torch.int64), stage)
                    bar.update(stage.numel())


def pin_hottest_rows(entry: table_store.Entry, cfg: Dict[str, Any]) -> Any:
    """``table_store.PIN_BYTES`` of an ordered entry locked in memory
    (``table_store.pin_leading_rows``): its maps, then its hottest rows, chosen by the
    config's id counts over all tables: the head of the Zipf law kept whatever else the page
    cache must hold."""
    tables = [(t["name"][len(TABLE_PREFIX) :], t["row_bytes"]) for layout in entry.layouts for t in layout["tables"]]
    rows = row_order.hottest_rows(cfg["id_counts"], tables, table_store.PIN_BYTES - table_store.map_bytes(entry))
    return table_store.pin_leading_rows(entry, {TABLE_PREFIX + feature: n for feature, n in rows.items()})


def row_bytes(cfg: Dict[str, Any], compute_device: str) -> int:
    """Bytes of one stored row: the values, a float16 scale and bias for int8/int4, rounded
    up to fbgemm's row alignment (16 B on CUDA, 1 B on CPU)."""
    bits = QUANT_DTYPES[cfg["quant_dtype"]][1]
    size = cfg["embedding_dim"] * bits // 8 + (4 if bits <= 8 else 0)
    alignment = 16 if compute_device == "cuda" else 1
    return -(-size // alignment) * alignment


def table_bytes_per_device(plan: ShardingPlan, cfg: Dict[str, Any], compute_device: str) -> Dict[str, int]:
    """Table bytes each device of ``plan`` holds, e.g. {"rank 0 (cuda:0)": 4.1e9, ...}."""
    per_device: Dict[str, int] = {}
    for module_plan in plan.plan.values():
        for name, sharding in module_plan.items():  # type: ignore[union-attr]
            for shard in sharding.sharding_spec.shards:
                device = f"rank {shard.placement.rank()} ({shard.placement.device()})"
                per_device[device] = per_device.get(device, 0) + shard.shard_sizes[0] * row_bytes(cfg, compute_device)
    return dict(sorted(per_device.items()))


def plan_only(
    config: Union[Dict[str, Any], str, os.PathLike, None] = None,
) -> Tuple[ShardingPlan, Dict[str, Any], str]:
    """Steps 1-5 without allocating a table: (plan, resolved config, compute device).
    Shows where the tables of a big config would go before building it."""
    cfg = resolve_model_config(config)
    compute_device, world_size, _ = select_devices(cfg)
    eb_configs = build_embedding_bag_configs(cfg)
    model = quantize_tables(build_dlrm(cfg, eb_configs, torch.device("meta")), cfg["quant_dtype"])
    plan = plan_to_fit(model, eb_configs, cfg, compute_device, world_size, gpu_memory_of(cfg, compute_device))
    return plan, cfg, compute_device


def build_store_entry(config: Union[Dict[str, Any], str, os.PathLike, None]) -> Dict[str, Any]:
    """The table store entry the first TorchServe worker of ``config`` would use, built (or
    found) in its ``table_store`` without putting any table on a GPU: what
    ``create_dlrm_mar.sh --table-store`` runs. The config is taken as that worker takes it
    (``serving_config`` with gpu_id 0 where GPUs are visible), so the entry has the key the
    workers look for; on GPUs TorchRec shards onto ``meta`` (``tables_on_meta``) and nothing
    is copied. Returns ``{"path", "built"}`` (``model.table_store_entry``)."""
    cfg = resolve_model_config(config)
    if not cfg["table_store"]:
        _fail("table_store", cfg["table_store"], "the directory to build the entry into")
    gpus = visible_gpus()
    with tables_on_meta():
        return DLRMFactory(serving_config(cfg, 0 if gpus else None, gpus)).table_store_entry


class DLRMFactory(type):
    """``DLRMFactory(config)`` -> a quantized, sharded, filled ``DLRM`` in eval mode.

    ``config``: a dict (see ``create_default_model_config``), a path to a JSON file, or
    None for the defaults. The result maps (Tensor[B, N], KJT of F features) to logits
    Tensor[B, 1] and carries its ``ShardingPlan`` at ``.plan``.
    """

    def __new__(cls, model_config: Union[Dict[str, Any], str, os.PathLike, None] = None) -> nn.Module:
        cfg = resolve_model_config(model_config)  # validation first: nothing allocated yet
        compute_device, world_size, dense_device = select_devices(cfg)
        eb_configs = build_embedding_bag_configs(cfg)
        model = build_dlrm(cfg, eb_configs, dense_device)
        model = quantize_tables(model, cfg["quant_dtype"])
        plan = plan_to_fit(model, eb_configs, cfg, compute_device, world_size, gpu_memory_of(cfg, compute_device))
        if cfg["table_store"]:  # steps 6-7: map the store's entry (built once if missing)
            model = tables_from_store(model, plan, cfg, eb_configs, compute_device, world_size)
        else:
            model = shard_tables(model, plan, cfg["quant_dtype"], compute_device, world_size)
            fill_tables(model, cfg, eb_configs)
        model.plan = plan
        model.config = cfg
        logger.info(
            "DLRM built: %d tables, %s, %s x %d", len(eb_configs), cfg["quant_dtype"], compute_device, world_size
        )
        return model.eval()
