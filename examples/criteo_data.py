"""Criteo-shaped click data for training and evaluating the DLRM: the real TSV format, and a
synthetic, learnable generator whose true click probability is known (the oracle).

One copy for ``examples/train_dlrm.py`` (training) and ``benchmarks/bench_accuracy.py``
(held-out AUC of the float and quantized models). Symbols: N samples, I = 13 integer (dense)
features, C = 26 categorical (sparse) features, R_f the rows of feature f's table.

Both sources give the same ``CriteoSamples`` (what the model sees, after preprocessing):

    dense   Tensor[N, I] float32   log(x + 1) of each count, negatives clamped to 0
    ids     Tensor[N, C] int64     each categorical value hashed into its table: value mod R_f
    labels  Tensor[N]    float32   1.0 for a click, else 0.0
    oracle_logit  Tensor[N] or None   the generator's true logit (None for real data)

**Real data** (``read_criteo_tsv``, ``iter_criteo_tsv``): Criteo's Kaggle and 1TB day files,
one sample a line, 40 tab-separated columns: the label, 13 integer features, 26 categorical
features as 8-digit hex strings. A missing value (empty column) is 0, as in TorchRec's
``torchrec.datasets.criteo`` (``int(x or "0")``, ``int(x or "0", 16)``); TorchRec hashes the
categorical values into the tables with ``value % hashes`` (its ``--num_embeddings`` cap).
Dense features follow the DLRM reference's preprocessing, ``log(max(x, 0) + 1)``: a per-sample
transform a client can repeat when it sends requests (TorchRec's ``tsv_to_npys`` shifts by the
file's minimum instead, which no single request can know).

**Synthetic data** (``SyntheticCriteo``): per sample, for every categorical feature f an id
drawn from a Zipf law over R_f rows (P(rank k) ~ (k + 1)^-alpha, alpha = 1.05; ranks are
mapped to ids by a fixed random permutation), and 13 log-normal counts (some missing, read as
0). The true logit is

    z = b + sum_f e_f[id_f]                                   per-id effects
          + sum_j a_j * tanh((dense_j - m_j) / s_j)             dense effects
          + sum_{(f, g) in P} <u_f[id_f], v_g[id_g]>          4 pairwise interactions (rank 2)
          + dense_h * w_f[id_f]                                one dense x sparse interaction

and a sample clicks with probability sigmoid(z + eps), eps ~ N(0, noise^2) unseen label
noise; b is set so that the mean click rate is ``base_click_rate`` (3 %). Because
E[sigmoid(z + eps)] increases with z, ranking by z is the best ranking any model can make
from the features: the AUC of z is the ceiling (the oracle AUC).

Learnable in a few minutes, on purpose: an id's effect spread (e, u, v, w alike) shrinks with
its popularity rank k as (1 + k / 20)^-1/2, and the interacting features are those of 10 to
2,500 rows. At a 3 % click rate an id must be seen thousands of times before its effect can
be told from noise; the rare ids of a 100,000-row table are seen a handful of times in a few
million samples, so a full-strength signal there could be learned by no model in the budget
and the oracle would measure the data budget, not the model (or its quantization). Everything
is drawn from numpy PCG64 streams keyed by (seed, purpose, index): the same seed gives the same
truth and the same samples.
"""

import argparse
import json
import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torchrec.datasets.criteo import CAT_FEATURE_COUNT, INT_FEATURE_COUNT
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

logger = logging.getLogger(__name__)

CRITEO_COLUMNS = 1 + INT_FEATURE_COUNT + CAT_FEATURE_COUNT  # label, 13 integers, 26 hex
# The 26 table sizes of Criteo 1TB (upstream's example, dlrm_factory.CRITEO_1TB_NUM_EMBEDDINGS).
CRITEO_1TB_NUM_EMBEDDINGS: List[int] = [
    45833188, 36746, 17245, 7413, 20243, 3, 7114, 1441, 62, 29275261, 1572176, 345138, 10,
    2209, 11267, 128, 4, 974, 14, 48937457, 11316796, 40094537, 452104, 12606, 104, 35,
]  # fmt: skip
# Tables capped as TorchRec's DLRM example does (--num_embeddings 100,000): 26 tables,
# 917,130 rows; at D = 32, 117 MB of float weights.
DEFAULT_TABLE_CAP = 100_000
# numpy stream purposes: the truth, training samples, held-out samples, bias calibration,
# id counts (write_id_counts).
TRUTH, TRAIN, HELD_OUT, CALIBRATION, COUNTS = 0, 1, 2, 3, 4
ID_COUNTS_FILE = "id_counts.safetensors"  # next to the checkpoint: the order of an ordered entry


def capped_table_sizes(cap: int = DEFAULT_TABLE_CAP) -> List[int]:
    """Criteo 1TB's 26 table sizes, each at most ``cap`` rows (small tables kept as they are)."""
    return [min(rows, cap) for rows in CRITEO_1TB_NUM_EMBEDDINGS]


@dataclass
class CriteoSamples:
    """N preprocessed samples (see the module docstring for each field's meaning)."""

    dense: torch.Tensor  # N x I float32
    ids: torch.Tensor  # N x C int64
    labels: torch.Tensor  # N float32
    oracle_logit: Optional[torch.Tensor] = None  # N float32, synthetic data only

    def __len__(self) -> int:
        return self.labels.shape[0]

    def slice(self, start: int, end: int) -> "CriteoSamples":
        return CriteoSamples(
            dense=self.dense[start:end],
            ids=self.ids[start:end],
            labels=self.labels[start:end],
            oracle_logit=None if self.oracle_logit is None else self.oracle_logit[start:end],
        )


def to_batch(samples: CriteoSamples, keys: Sequence[str]) -> Batch:
    """TorchRec's ``Batch``: dense [N, I], a key-major one-hot KJT (feature f's N ids, then
    feature f + 1's ...), labels [N]."""
    n, c = samples.ids.shape
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=list(keys),
        values=samples.ids.t().reshape(-1),
        lengths=torch.ones(n * c, dtype=torch.int64),
    )
    return Batch(dense_features=samples.dense, sparse_features=kjt, labels=samples.labels)


def preprocess_dense(counts: np.ndarray) -> np.ndarray:
    """Integer features -> model inputs: log(max(x, 0) + 1), float32."""
    return np.log1p(np.maximum(counts, 0).astype(np.float64)).astype(np.float32)


def to_request(samples: CriteoSamples) -> Dict[str, Any]:
    """The served model's JSON request body for ``samples``: B lists of I dense numbers, and
    one id per feature, sample-major (sample 0's C ids, then sample 1's ...)."""
    return {
        "float_features": samples.dense.tolist(),
        "id_list_features.lengths": [1] * samples.ids.numel(),
        "id_list_features.values": samples.ids.reshape(-1).tolist(),
    }


def request_from_tsv_lines(lines: Sequence[str]) -> Dict[str, Any]:
    """A request body for raw Criteo TSV lines (their labels ignored): dense features
    preprocessed as in training, categorical values sent as they are (hex read as integers,
    missing as 0); a model served with ``id_overflow: hash`` takes them modulo its table sizes,
    as ``read_criteo_tsv`` did for training."""
    rows = [parse_criteo_line(line, f"line {i + 1}") for i, line in enumerate(lines)]
    return {
        "float_features": preprocess_dense(np.array([ints for _, ints, _ in rows], dtype=np.int64)).tolist(),
        "id_list_features.lengths": [1] * (CAT_FEATURE_COUNT * len(rows)),
        "id_list_features.values": [value for _, _, cats in rows for value in cats],
    }


# ---------------------------------------------------------------------------------------
# Real data: Criteo TSV.
# ---------------------------------------------------------------------------------------


def parse_criteo_line(line: str, where: str) -> Tuple[int, List[int], List[int]]:
    """One TSV line -> (label, 13 integers, 26 categorical values), missing values as 0.
    ``where`` ("file:line") names the line in a ``ValueError``."""
    columns = line.rstrip("\r\n").split("\t")
    if len(columns) != CRITEO_COLUMNS:
        raise ValueError(f"{where}: {len(columns)} tab-separated columns; expected {CRITEO_COLUMNS} "
                         f"(label, {INT_FEATURE_COUNT} integers, {CAT_FEATURE_COUNT} hex categories)")  # fmt: skip
    try:
        label = int(columns[0] or "0")
        integers = [int(x or "0") for x in columns[1 : 1 + INT_FEATURE_COUNT]]
        categories = [int(x or "0", 16) for x in columns[1 + INT_FEATURE_COUNT :]]
    except ValueError as e:
        raise ValueError(f"{where}: {e}; expected integers and hex strings") from e
    if label not in (0, 1):
        raise ValueError(f"{where}: label {label}; expected 0 or 1")
    return label, integers, categories


def _samples_from_rows(
    labels: List[int], integers: List[List[int]], categories: List[List[int]], table_sizes: Sequence[int]
) -> CriteoSamples:
    """Parsed rows -> CriteoSamples: log(x + 1) of the integers, categories mod the table sizes.
    Python's ``%`` works on the full values (Criteo's are 32-bit; any size is fine)."""
    sizes = list(table_sizes)
    hashed = [[value % size for value, size in zip(row, sizes)] for row in categories]
    return CriteoSamples(
        dense=torch.from_numpy(preprocess_dense(np.array(integers, dtype=np.int64).reshape(-1, INT_FEATURE_COUNT))),
        ids=torch.tensor(hashed, dtype=torch.int64).reshape(-1, CAT_FEATURE_COUNT),
        labels=torch.tensor(labels, dtype=torch.float32),
    )


def iter_criteo_tsv(
    paths: Sequence[str], table_sizes: Sequence[int], chunk_rows: int = 65536
) -> Iterator[CriteoSamples]:
    """Criteo TSV files, in order, as chunks of at most ``chunk_rows`` samples (a day file
    is never held in memory whole)."""
    if len(table_sizes) != CAT_FEATURE_COUNT:
        raise ValueError(f"table_sizes: {len(table_sizes)} sizes; expected {CAT_FEATURE_COUNT}, one per category")
    labels: List[int] = []
    integers: List[List[int]] = []
    categories: List[List[int]] = []
    for path in paths:
        with open(path) as f:
            for number, line in enumerate(f, start=1):
                label, ints, cats = parse_criteo_line(line, f"{path}:{number}")
                labels.append(label)
                integers.append(ints)
                categories.append(cats)
                if len(labels) == chunk_rows:
                    yield _samples_from_rows(labels, integers, categories, table_sizes)
                    labels, integers, categories = [], [], []
    if labels:
        yield _samples_from_rows(labels, integers, categories, table_sizes)


def read_criteo_tsv(paths: Sequence[str], table_sizes: Sequence[int], max_rows: Optional[int] = None) -> CriteoSamples:
    """Criteo TSV files read whole (or their first ``max_rows`` samples)."""
    chunks = []
    total = 0
    for chunk in iter_criteo_tsv(paths, table_sizes):
        chunks.append(chunk)
        total += len(chunk)
        if max_rows is not None and total >= max_rows:
            break
    if not chunks:
        raise ValueError(f"{list(paths)}: no samples")
    samples = CriteoSamples(
        dense=torch.cat([c.dense for c in chunks]),
        ids=torch.cat([c.ids for c in chunks]),
        labels=torch.cat([c.labels for c in chunks]),
    )
    return samples if max_rows is None else samples.slice(0, max_rows)


# ---------------------------------------------------------------------------------------
# Synthetic data with a known ground truth.
# ---------------------------------------------------------------------------------------


def _rng(seed: int, purpose: int, index: int = 0) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64([seed, purpose, index]))


class SyntheticCriteo:
    """A Criteo-shaped click model with a known truth (the module docstring has the formula).

    ``SyntheticCriteo(table_sizes, seed)`` draws the truth; ``sample(n, purpose, index)`` draws
    n samples from the stream (seed, purpose, index), e.g. ``(n, TRAIN, step)`` or
    ``(n, HELD_OUT)``: any two distinct streams are independent samples of the same world."""

    RANK_SCALE = 20.0  # effect spread of rank k: (1 + k / RANK_SCALE) ** -0.5
    INTERACTION_RANK = 2

    def __init__(
        self,
        table_sizes: Sequence[int],
        seed: int = 0,
        zipf_alpha: float = 1.05,
        base_click_rate: float = 0.03,
        id_effect_scale: float = 0.45,
        dense_effect_scale: float = 0.3,
        num_pairs: int = 4,
        pair_scale: float = 0.5,
        dense_sparse_scale: float = 0.15,
        noise: float = 0.5,
    ) -> None:
        if len(table_sizes) != CAT_FEATURE_COUNT:
            raise ValueError(f"table_sizes: {len(table_sizes)} sizes; expected {CAT_FEATURE_COUNT}")
        self.table_sizes = [int(s) for s in table_sizes]
        self.seed = seed
        self.zipf_alpha = zipf_alpha
        self.base_click_rate = base_click_rate
        self.noise = noise
        rng = _rng(seed, TRUTH)
        self._cdf: List[np.ndarray] = []
        self._id_of_rank: List[np.ndarray] = []
        self._spread_of_id: List[np.ndarray] = []
        self._effect: List[np.ndarray] = []  # per feature, indexed by id
        for rows in self.table_sizes:
            ranks = np.arange(rows, dtype=np.float64)
            weights = (ranks + 1.0) ** -zipf_alpha
            cdf = np.cumsum(weights)
            self._cdf.append(cdf / cdf[-1])
            id_of_rank = rng.permutation(rows)  # the id of popularity rank k is id_of_rank[k]
            rank_of_id = np.empty(rows, dtype=np.int64)
            rank_of_id[id_of_rank] = np.arange(rows)
            self._id_of_rank.append(id_of_rank)
            self._spread_of_id.append(self._spread(rank_of_id))
            spread = self._spread_of_id[-1]
            feature_scale = id_effect_scale * rng.uniform(0.2, 1.0)
            self._effect.append((feature_scale * spread * rng.standard_normal(rows)).astype(np.float32))

        # Dense: log-normal counts, some missing; a_j * tanh((x - m_j) / s_j) on the logs.
        self._log_mean = rng.uniform(0.5, 4.0, INT_FEATURE_COUNT)
        self._log_std = rng.uniform(0.5, 1.5, INT_FEATURE_COUNT)
        self._missing = rng.uniform(0.0, 0.4, INT_FEATURE_COUNT)
        self._dense_amp = dense_effect_scale * rng.standard_normal(INT_FEATURE_COUNT)

        # Pairwise: <u_f[id_f], v_g[id_g]> over distinct features of 10 to 2,500 rows (pairs
        # of ids seen together often enough to be learned).
        candidates = [f for f, rows in enumerate(self.table_sizes) if 10 <= rows <= 2_500]
        chosen = rng.choice(candidates, size=2 * num_pairs, replace=False)
        self.pairs: List[Tuple[int, int]] = [(int(chosen[2 * i]), int(chosen[2 * i + 1])) for i in range(num_pairs)]
        self._pair_vectors: List[Tuple[np.ndarray, np.ndarray]] = []
        for f, g in self.pairs:
            u = rng.standard_normal((self.table_sizes[f], self.INTERACTION_RANK)) * self._spread_of_id[f][:, None]
            v = rng.standard_normal((self.table_sizes[g], self.INTERACTION_RANK)) * self._spread_of_id[g][:, None]
            scale = pair_scale / math.sqrt(self.INTERACTION_RANK)
            self._pair_vectors.append(((scale * u).astype(np.float32), v.astype(np.float32)))
        # Dense x sparse: dense_h * w_f[id_f].
        self.dense_sparse_pair = (int(rng.integers(INT_FEATURE_COUNT)), int(rng.choice(candidates)))
        h, f = self.dense_sparse_pair
        self._slope = (dense_sparse_scale * self._spread_of_id[f] * rng.standard_normal(self.table_sizes[f])).astype(np.float32)

        self.bias = 0.0
        self.bias = self._calibrate_bias()
        logger.info("synthetic Criteo: seed %d, bias %.3f, pairs %s", seed, self.bias, self.pairs)

    def _spread(self, ranks: np.ndarray) -> np.ndarray:
        return (1.0 + ranks / self.RANK_SCALE) ** -0.5

    def _features(self, num_samples: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
        """(dense N x I float32 after log(x + 1), ids N x C int64)."""
        counts = np.floor(np.exp(rng.normal(self._log_mean, self._log_std, (num_samples, INT_FEATURE_COUNT)))) - 1
        counts[rng.random((num_samples, INT_FEATURE_COUNT)) < self._missing] = 0  # missing: read as 0
        ids = np.empty((num_samples, CAT_FEATURE_COUNT), dtype=np.int64)
        for f, cdf in enumerate(self._cdf):
            ranks = np.minimum(np.searchsorted(cdf, rng.random(num_samples), side="right"), len(cdf) - 1)
            ids[:, f] = self._id_of_rank[f][ranks]
        return preprocess_dense(counts), ids

    def logit(self, dense: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """The true logit z of each sample (without the unseen noise), float64."""
        z = np.full(dense.shape[0], self.bias)
        for f, effect in enumerate(self._effect):
            z += effect[ids[:, f]]
        z += (self._dense_amp * np.tanh((dense - self._log_mean) / self._log_std)).sum(axis=1)
        for (f, g), (u, v) in zip(self.pairs, self._pair_vectors):
            z += np.einsum("nr,nr->n", u[ids[:, f]], v[ids[:, g]])
        h, f = self.dense_sparse_pair
        z += dense[:, h] * self._slope[ids[:, f]]
        return z

    def _calibrate_bias(self, num_samples: int = 200_000) -> float:
        """b such that the mean click probability E[sigmoid(z + eps)] is base_click_rate."""
        rng = _rng(self.seed, CALIBRATION)
        dense, ids = self._features(num_samples, rng)
        z = self.logit(dense, ids) + self.noise * rng.standard_normal(num_samples)
        lo, hi = -20.0, 10.0
        for _ in range(60):
            mid = (lo + hi) / 2
            rate = (1.0 / (1.0 + np.exp(-(z + mid)))).mean()
            lo, hi = (mid, hi) if rate < self.base_click_rate else (lo, mid)
        return (lo + hi) / 2

    def sample(self, num_samples: int, purpose: int = TRAIN, index: int = 0) -> CriteoSamples:
        """``num_samples`` samples of the stream (seed, purpose, index), with their oracle logits."""
        rng = _rng(self.seed, purpose, index)
        dense, ids = self._features(num_samples, rng)
        z = self.logit(dense, ids)
        clicks = rng.random(num_samples) < 1.0 / (1.0 + np.exp(-(z + self.noise * rng.standard_normal(num_samples))))
        return CriteoSamples(
            dense=torch.from_numpy(dense),
            ids=torch.from_numpy(ids),
            labels=torch.from_numpy(clicks.astype(np.float32)),
            oracle_logit=torch.from_numpy(z.astype(np.float32)),
        )


# ---------------------------------------------------------------------------------------
# Id counts of the training data: the order of a frequency-ordered table store entry.
# ---------------------------------------------------------------------------------------


def write_id_counts(path: str, data: Dict[str, Any], table_sizes: Sequence[int], keys: Sequence[str], samples: int,
                    chunk_rows: int = 1 << 20) -> str:  # fmt: skip
    """Write the per-table id counts of ``samples`` training samples to ``path`` (an id
    counts file, ``dlrm_row_order``): the first lines of the TSV files trained on, or, for
    synthetic data (``data["source"]``), that many fresh samples of the same world (its own
    stream: the training batches are not kept). A config whose ``id_counts`` names the file
    gets a table store entry with its hot rows first. Returns ``path``."""
    from dlrm_row_order import IdCounter

    counter = IdCounter(keys, table_sizes)
    if data["source"] == "tsv":
        for chunk in iter_criteo_tsv(data["train"], table_sizes, chunk_rows=chunk_rows):
            counter.add_sample_major(chunk.ids[: samples - counter.samples])
            if counter.samples >= samples:
                break
    else:
        world = SyntheticCriteo(table_sizes=data["table_sizes"], seed=data["seed"])
        for index, start in enumerate(range(0, samples, chunk_rows)):
            _, ids = world._features(min(chunk_rows, samples - start), _rng(data["seed"], COUNTS, index))
            counter.add_sample_major(torch.from_numpy(ids))
    counter.write(path)
    return path


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Print the request body of a Criteo TSV file's first lines (README, "Serve your trained model")."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("tsv", help="a Criteo TSV file (label, 13 integers, 26 hex values a line)")
    p.add_argument("--lines", type=int, default=1, help="how many of its first lines (samples)")
    args = p.parse_args(argv)
    with open(args.tsv) as f:
        lines = [line for _, line in zip(range(args.lines), f)]
    print(json.dumps(request_from_tsv_lines(lines)))


if __name__ == "__main__":
    main()
