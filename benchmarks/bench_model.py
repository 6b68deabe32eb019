"""Model benchmark: samples/s and latency of this project's DLRM against float TorchRec and
plain PyTorch, and each one's fraction of the fp32 matrix-multiply bound.

Contenders (one process, same weights, same inputs, interleaved round-robin over repeats):

    ours            ``DLRMFactory(config)``: int8 tables, sharded (``ShardedQuantEmbeddingBagCollection``)
    ours+opt        the same model after ``optimize_for_inference`` (dlrm_lean_forward.py): a lean forward
    torchrec-float  TorchRec's ``DLRM`` with a float ``EmbeddingBagCollection``, unsharded
    plain           plain PyTorch: one ``nn.EmbeddingBag(mode="sum")`` per table, MLPs, the
                    same pairwise-dot interaction as TorchRec's ``InteractionArch``
    levers (opt-in, ``--contenders``, see LEVER_CONTENDERS): autograd on / no_grad instead of
    inference_mode, one thread, ``torch.compile`` of the dense layers, chunking off or 512,
    dense layers in bfloat16 (an option: its score error is printed next to its speed)

All contenders use the project's default architecture (B batch, F = 26 tables, D = 64,
13 dense features, dense MLP 512-256-64, over MLP 512-512-256-1), with every table capped at
``--max-rows`` rows (default 1,000,000: 6.9M rows, 1.77 GB of float tables instead of the
45.6 GB of the full Criteo 1TB sizes). The float tables hold the dequantized int8 rows of
``ours``, so every contender computes the same function and their scores are compared.

Inputs: dense features uniform on [0, 1), one id per feature (one-hot), ids uniform within
each table; a few distinct input sets per batch size are cycled, and a fresh
``KeyedJaggedTensor`` is made (outside the timer) for every call. Timed: ``model(dense, kjt)``
under ``torch.inference_mode()``.

FLOPs per sample of the dense part (each Linear 2*in*out, the interaction's bmm
2*(F+1)^2*D, elementwise ops not counted), for the default:
    dense MLP 2*(13*512 + 512*256 + 256*64)              =   308,224
    bmm       2*27*27*64                                  =    93,312
    over MLP  2*(415*512 + 512*512 + 512*256 + 256*1)     = 1,211,904
    total                                                 = 1,613,440  (1.61 MFLOP)
The bound is the fp32 ``torch.mm`` peak, measured in the same run right before every
(repeat, batch) block; fraction of the bound = samples/s * FLOPs/sample / peak, and like the
ratio to torchrec-float it is the median of per-repeat values (on a shared machine the load
drifts: pairing measurements taken seconds apart cancels most of it). Process settings that
apply to every contender: ``--threads``, ``--malloc`` (``tune_malloc``, on by default) and
the OMP_WAIT_POLICY environment variable, all printed in the header.

    .venv/bin/python benchmarks/bench_model.py            # default: about 3 minutes on 2 cores
    .venv/bin/python benchmarks/bench_model.py --threads 1
    .venv/bin/python benchmarks/bench_model.py --quick    # ~20 s: small tables, few repeats
    .venv/bin/python benchmarks/bench_model.py --contenders ours,ours+opt,ours-1t,ours+compile --profile
"""

import argparse
import contextlib
import ctypes
import gc
import logging
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as nnf
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from dlrm_factory import DLRMFactory, create_default_model_config  # noqa: E402
from dlrm_lean_forward import optimize_for_inference  # noqa: E402
from torchrec.models.dlrm import DLRM  # noqa: E402
from torchrec.modules.embedding_configs import EmbeddingBagConfig  # noqa: E402
from torchrec.modules.embedding_modules import EmbeddingBagCollection  # noqa: E402
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: E402

logger = logging.getLogger(__name__)

DEFAULT_BATCHES = [1, 64, 1024, 4096]
DEFAULT_MAX_ROWS = 1_000_000
DEFAULT_CONTENDERS = ["ours", "ours+opt", "torchrec-float", "plain"]
# Opt-in (--contenders): one lever each, to measure it against "ours" / "ours+opt".
LEVER_CONTENDERS = [
    "ours-grad",  # autograd on (no inference_mode / no_grad)
    "ours-no_grad",  # torch.no_grad instead of torch.inference_mode
    "ours-1t",  # one intra-op thread
    "ours+compile",  # TorchRec's compile_dense_path (torch.compile, default mode)
    "ours+opt-nochunk",  # lean forward, whole batch at once
    "ours+opt-c512",  # lean forward, 512-sample chunks
    "ours+opt-1t",
    "ours+opt+compile",  # lean forward, dense part compiled with freezing
    "ours+opt+bf16",  # lean forward, dense layers in bfloat16 (scores change: reported)
]
ALL_CONTENDERS = DEFAULT_CONTENDERS + LEVER_CONTENDERS
INPUT_SETS = 4  # distinct random batches per batch size, cycled
# Scores of an optimized contender must equal the factory model's within this (fp32 sums
# reordered); bf16 is an option whose error is reported, not held to it.
SCORE_ATOL = 1e-4
DEFAULT_OUT = os.path.join(REPO, "benchmarks", "results", "bench_model.png")


# ---------------------------------------------------------------------------------------
# Levers (optimize_for_inference, the lean forward, lives in dlrm_lean_forward.py).
# ---------------------------------------------------------------------------------------


def tune_malloc(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 30) -> bool:
    """Keep freed activation buffers in the heap instead of returning them to the OS.

    glibc serves allocations above ``M_MMAP_THRESHOLD`` (dynamic, at most 32 MiB) with a
    fresh mmap and trims the heap top above ``M_TRIM_THRESHOLD``; every large activation
    (27 MB at batch 4096) then page-faults in again on each call (~3 us a 4 KiB page in this
    VM: tens of ms per call). Raising both makes the process keep its peak working set.
    Process-wide, Linux/glibc only; returns whether it was applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, mmap_threshold)) and bool(mallopt(m_trim_threshold, trim_threshold))


# ---------------------------------------------------------------------------------------
# Models.
# ---------------------------------------------------------------------------------------


def bench_config(max_rows: int) -> Dict[str, Any]:
    """The default config (int8, table-wise, seed 0) on CPU, every table capped at max_rows."""
    cfg = create_default_model_config()
    cfg.update(
        num_embeddings_per_feature=[min(n, max_rows) for n in cfg["num_embeddings_per_feature"]],
        device="cpu",
        world_size=1,
    )
    cfg["id_list_features_keys"] = [f"cat_{i}" for i in range(len(cfg["num_embeddings_per_feature"]))]
    return cfg


def dense_flops_per_sample(cfg: Dict[str, Any]) -> Dict[str, int]:
    """FLOPs of one sample's dense part: 2*in*out per Linear, 2*(F+1)^2*D for the bmm."""
    num_f, dim = len(cfg["num_embeddings_per_feature"]), cfg["embedding_dim"]
    sizes = [cfg["dense_in_features"]] + cfg["dense_arch_layer_sizes"]
    dense = sum(2 * a * b for a, b in zip(sizes, sizes[1:]))
    over_in = dim + num_f * (num_f + 1) // 2
    sizes = [over_in] + cfg["over_arch_layer_sizes"]
    over = sum(2 * a * b for a, b in zip(sizes, sizes[1:]))
    bmm = 2 * (num_f + 1) ** 2 * dim
    return {"dense_mlp": dense, "interaction_bmm": bmm, "over_mlp": over, "total": dense + bmm + over}


def dequantized_tables(model: nn.Module, cfg: Dict[str, Any]) -> List[torch.Tensor]:
    """Float copies of the int8 tables (code * scale + bias, as fbgemm dequantizes)."""
    state = model.state_dict()
    prefix = "sparse_arch.embedding_bag_collection.embedding_bags.t_{}."
    tables = []
    for feature in cfg["id_list_features_keys"]:
        codes = state[prefix.format(feature) + "weight"]
        scale = state[prefix.format(feature) + "weight_qscale"].float()
        bias = state[prefix.format(feature) + "weight_qbias"].float()
        table = torch.empty(codes.shape, dtype=torch.float32)
        for start in range(0, codes.shape[0], 1 << 18):
            end = start + (1 << 18)
            torch.addcmul(bias[start:end], codes[start:end].float(), scale[start:end], out=table[start:end])
        tables.append(table)
    return tables


def build_torchrec_float(cfg: Dict[str, Any], ours: nn.Module, tables: List[torch.Tensor]) -> DLRM:
    """TorchRec's float DLRM, unsharded, holding ``tables`` and ours' dense weights."""
    eb_configs = [
        EmbeddingBagConfig(
            name=f"t_{feature}",
            embedding_dim=cfg["embedding_dim"],
            num_embeddings=table.shape[0],
            feature_names=[feature],
        )
        for feature, table in zip(cfg["id_list_features_keys"], tables)
    ]
    model = DLRM(
        embedding_bag_collection=EmbeddingBagCollection(tables=eb_configs, device=torch.device("meta")),
        dense_in_features=cfg["dense_in_features"],
        dense_arch_layer_sizes=cfg["dense_arch_layer_sizes"],
        over_arch_layer_sizes=cfg["over_arch_layer_sizes"],
        dense_device=torch.device("cpu"),
    )
    bags = model.sparse_arch.embedding_bag_collection.embedding_bags
    for feature, table in zip(cfg["id_list_features_keys"], tables):
        bags[f"t_{feature}"].weight = nn.Parameter(table, requires_grad=False)  # shared, no copy
    dense = {k: v for k, v in ours.state_dict().items() if not k.startswith("sparse_arch.")}
    missing, unexpected = model.load_state_dict(dense, strict=False)
    assert not unexpected and all(k.startswith("sparse_arch.") for k in missing), (missing, unexpected)
    return model.eval()


def mlp(sizes: Sequence[int], last_relu: bool) -> nn.Sequential:
    layers: List[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if last_relu or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class PlainDLRM(nn.Module):
    """DLRM in plain PyTorch: F ``nn.EmbeddingBag(mode="sum")``, dense MLP, pairwise dots of
    the F+1 vectors of size D (upper triangle), over MLP. Reads the KJT's values and lengths
    (key-major, F*B lengths) as plain tensors."""

    def __init__(self, cfg: Dict[str, Any], tables: List[torch.Tensor]) -> None:
        super().__init__()
        self.bags = nn.ModuleList(
            [nn.EmbeddingBag.from_pretrained(table, freeze=True, mode="sum") for table in tables]
        )
        self.dense_mlp = mlp([cfg["dense_in_features"]] + cfg["dense_arch_layer_sizes"], last_relu=True)
        num_f, dim = len(tables), cfg["embedding_dim"]
        self.over_mlp = mlp([dim + num_f * (num_f + 1) // 2] + cfg["over_arch_layer_sizes"], last_relu=False)
        rows, cols = torch.triu_indices(num_f + 1, num_f + 1, offset=1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """dense_features: B x 13; sparse_features: F features x B samples -> logits B x 1."""
        batch = dense_features.shape[0]
        values, lengths = sparse_features.values(), sparse_features.lengths()
        offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=offsets[1:])
        starts = offsets[::batch].tolist()  # F + 1 feature boundaries
        pooled = [
            bag(values[starts[f] : starts[f + 1]], offsets[f * batch : (f + 1) * batch] - starts[f])
            for f, bag in enumerate(self.bags)
        ]
        x = self.dense_mlp(dense_features)
        combined = torch.stack([x] + pooled, dim=1)  # B x (F+1) x D
        gram = torch.bmm(combined, combined.transpose(1, 2))
        return self.over_mlp(torch.cat([x, gram[:, self.rows, self.cols]], dim=1))

    def load_dense_from(self, ours: nn.Module) -> "PlainDLRM":
        src = [p._linear for p in ours.dense_arch.model._mlp]
        src += [p._linear for p in ours.over_arch.model[0]._mlp] + [ours.over_arch.model[1]]
        dst = [m for m in list(self.dense_mlp) + list(self.over_mlp) if isinstance(m, nn.Linear)]
        with torch.no_grad():
            for s, d in zip(src, dst, strict=True):
                d.weight.copy_(s.weight)
                d.bias.copy_(s.bias)
        return self


def with_bf16_dense(model: nn.Module) -> Callable[..., torch.Tensor]:
    """The model with its dense layers in bfloat16 (CPU autocast); tables stay int8."""

    def run(dense: torch.Tensor, kjt: KeyedJaggedTensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(dense, kjt).float()

    return run


def compile_dense(model: nn.Module) -> nn.Module:
    """``torch.compile`` of dense_arch, inter_arch and over_arch (TorchRec's
    ``compile_dense_path`` with the CPU-friendly default mode); the sparse arch stays eager."""
    model.compile_dense_path(compile_mode="default")
    return model


# ---------------------------------------------------------------------------------------
# Inputs and timing.
# ---------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One input set: dense B x 13 and the KJT's key-major values/lengths (F x B, one-hot)."""

    dense: torch.Tensor
    values: torch.Tensor
    lengths: torch.Tensor
    keys: List[str]

    def kjt(self) -> KeyedJaggedTensor:
        return KeyedJaggedTensor(keys=self.keys, values=self.values, lengths=self.lengths)


def make_batches(cfg: Dict[str, Any], batch: int, count: int, seed: int) -> List[Batch]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        dense = torch.rand(batch, cfg["dense_in_features"], generator=gen)
        ids = [torch.randint(0, rows, (batch,), generator=gen) for rows in cfg["num_embeddings_per_feature"]]
        out.append(
            Batch(
                dense=dense,
                values=torch.cat(ids),
                lengths=torch.ones(batch * len(ids), dtype=torch.int32),
                keys=list(cfg["id_list_features_keys"]),
            )
        )
    return out


@dataclass
class Contender:
    name: str
    run: Callable[[torch.Tensor, KeyedJaggedTensor], torch.Tensor]
    threads: Optional[int] = None  # None: the run's --threads
    setup_s: float = 0.0
    warmup_s: float = 0.0  # first calls at every batch size (lazy init, compilation)
    # per batch size: per-repeat samples/s, and every call's latency (s)
    rates: Dict[int, List[float]] = field(default_factory=dict)
    latencies: Dict[int, List[float]] = field(default_factory=dict)


def time_calls(contender: Contender, batches: List[Batch], min_time: float, min_calls: int) -> List[float]:
    """Latency of each call, cycling the input sets, until min_time and min_calls are met."""
    latencies: List[float] = []
    spent, i = 0.0, 0
    with torch.inference_mode():
        while spent < min_time or len(latencies) < min_calls:
            b = batches[i % len(batches)]
            kjt = b.kjt()
            start = time.perf_counter()
            contender.run(b.dense, kjt)
            elapsed = time.perf_counter() - start
            latencies.append(elapsed)
            spent += elapsed
            i += 1
    return latencies


def measure_peak(size: Tuple[int, int, int], min_time: float) -> float:
    """fp32 torch.mm GFLOP/s on (M x K) @ (K x N), output preallocated (the best of
    the MLP-shaped case: no allocation, no activation)."""
    m, k, n = size
    a, b, out = torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)
    torch.mm(a, b, out=out)
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_time or calls < 3:
        torch.mm(a, b, out=out)
        calls += 1
    return 2 * m * k * n * calls / (time.perf_counter() - start) / 1e9


def warm_up(contenders: List[Contender], inputs: Dict[int, List[Batch]], threads: int) -> None:
    """Three untimed calls per (contender, batch): lazy initialization and compilation."""
    for c in contenders:
        start = time.perf_counter()
        for batch in inputs:
            set_threads(c.threads or threads)
            time_calls(c, inputs[batch], min_time=0.0, min_calls=3)
        c.warmup_s = time.perf_counter() - start
    set_threads(threads)


def set_threads(n: int) -> None:
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def run_rounds(
    contenders: List[Contender],
    inputs: Dict[int, List[Batch]],
    repeats: int,
    min_time: float,
    threads: int,
    peak_size: Tuple[int, int, int],
) -> Dict[int, List[float]]:
    """Round-robin: every repeat times every (batch, contender) once, the contenders' order
    rotating each repeat, right after a fresh fp32 peak measurement. Returns that peak
    (GFLOP/s) per batch size and repeat, so that each throughput is paired with the peak
    measured seconds before it (the load on a shared machine drifts)."""
    peaks: Dict[int, List[float]] = {batch: [] for batch in inputs}
    gc.collect()
    gc.disable()
    try:
        for r in range(repeats):
            for batch in inputs:
                set_threads(threads)
                peaks[batch].append(measure_peak(peak_size, min(min_time, 0.2)))
                order = contenders[r % len(contenders) :] + contenders[: r % len(contenders)]
                for c in order:
                    set_threads(c.threads or threads)
                    lat = time_calls(c, inputs[batch], min_time=min_time, min_calls=3)
                    c.rates.setdefault(batch, []).append(batch * len(lat) / sum(lat))
                    c.latencies.setdefault(batch, []).extend(lat)
            print(
                f"  repeat {r + 1}/{repeats} done (peak {statistics.median(p[-1] for p in peaks.values()):.0f} "
                f"GFLOP/s, load average {os.getloadavg()[0]:.2f})",
                flush=True,
            )
    finally:
        gc.enable()
        set_threads(threads)
    return peaks


def percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


# ---------------------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------------------


def score_diffs(contenders: List[Contender], inputs: Dict[int, List[Batch]], reference: str) -> Dict[str, float]:
    """Max |score - reference score| over the first input set of every batch size."""
    ref = next(c for c in contenders if c.name == reference)
    diffs = {}
    with torch.inference_mode():
        for c in contenders:
            worst = 0.0
            for batch, sets in inputs.items():
                set_threads(c.threads or torch.get_num_threads())
                got = c.run(sets[0].dense, sets[0].kjt())
                want = ref.run(sets[0].dense, sets[0].kjt())
                if got.shape != (batch, 1):
                    raise AssertionError(f"{c.name}: scores of shape {tuple(got.shape)}, expected ({batch}, 1)")
                worst = max(worst, (got.float() - want.float()).abs().max().item())
            diffs[c.name] = worst
    return diffs


def profile_contenders(contenders: List[Contender], inputs: Dict[int, List[Batch]], threads: int, rows: int) -> None:
    """Where the time goes: torch.profiler's busiest ops per (contender, batch), plus the
    minor page faults per call (each a kernel trap; large fresh tensors fault in per call)."""
    import resource

    from torch.profiler import ProfilerActivity, profile

    for batch, sets in inputs.items():
        for c in contenders:
            set_threads(c.threads or threads)
            calls = max(3, 2048 // batch)
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                for i in range(calls):
                    c.run(sets[i % len(sets)].dense, sets[i % len(sets)].kjt())
                wall = (time.perf_counter() - start) / calls
            faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / calls
            print(f"\n### profile: {c.name}, batch {batch}: {wall * 1e3:.3f} ms/call (profiled), "
                  f"{faults:.0f} minor page faults/call")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    set_threads(threads)


def machine_line() -> str:
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} CPUs, torch {torch.__version__}"


def markdown_table(
    contenders: List[Contender],
    batches: List[int],
    flops: int,
    peaks: Dict[int, List[float]],
    diffs: Dict[str, float],
    reference: str,
) -> str:
    """One row per (batch, contender). samples/s: median over repeats; the ratio to the
    reference and the fraction of the bound: medians of the per-repeat ratios (each repeat's
    throughputs and peak were measured within seconds of each other)."""
    ref = next(c for c in contenders if c.name == reference)
    head = (
        f"| model | batch | samples/s | p50 ms | p99 ms | calls | x {reference} | "
        "fraction of bound | max abs score diff vs ours |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    rows = []
    for batch in batches:
        for c in contenders:
            rates, lat = c.rates[batch], c.latencies[batch]
            ratio = statistics.median(a / b for a, b in zip(rates, ref.rates[batch]))
            bound = statistics.median(a * flops / (p * 1e9) for a, p in zip(rates, peaks[batch]))
            rows.append(
                f"| {c.name} | {batch} | {statistics.median(rates):,.0f} | {percentile(lat, 50) * 1e3:.3f} | "
                f"{percentile(lat, 99) * 1e3:.3f} | {len(lat)} | {ratio:.2f} | {bound:.2f} | "
                f"{diffs.get(c.name, float('nan')):.1e} |"
            )
    return head + "\n" + "\n".join(rows)


def plot(contenders: List[Contender], batches: List[int], flops: int, peak: float, title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in contenders:
        ax.plot(batches, [statistics.median(c.rates[b]) for b in batches], marker="o", label=c.name)
    ax.axhline(peak * 1e9 / flops, color="grey", linestyle="--", label=f"fp32 bound ({peak:.0f} GFLOP/s)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("batch size (samples per call)")
    ax.set_ylabel("samples/s (median of repeats)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="comma-separated batch sizes (default 1,64,1024,4096)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 9; medians are reported)")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds per (contender, batch) in each round (default 0.3; 3 calls at least)")
    p.add_argument("--max-rows", type=int, default=None,
                   help=f"rows per table at most (default {DEFAULT_MAX_ROWS:,}: float tables 1.77 GB)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's, the cores)")
    p.add_argument("--interop-threads", type=int, default=None, help="torch.set_num_interop_threads")
    p.add_argument("--contenders", type=lambda s: s.split(","), default=None,
                   help=f"comma-separated, of {','.join(ALL_CONTENDERS)} (default {','.join(DEFAULT_CONTENDERS)})")
    p.add_argument("--malloc", choices=["tuned", "default"], default="tuned",
                   help="tuned: tune_malloc() first, as the handler would (default); default: glibc's")
    p.add_argument("--profile", type=int, nargs="?", const=12, default=0, metavar="ROWS",
                   help="after timing, print torch.profiler's top ROWS ops (default 12) per contender and batch")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 100k-row tables, batches 1,64,1024, 2 repeats of 0.1 s")
    p.add_argument("--out", default=DEFAULT_OUT, help="the PNG plot (default benchmarks/results/bench_model.png)")
    args = p.parse_args(argv)
    quick = args.quick
    args.batches = args.batches or ([1, 64, 1024] if quick else DEFAULT_BATCHES)
    args.repeats = args.repeats or (2 if quick else 9)
    args.min_time = args.min_time if args.min_time is not None else (0.1 if quick else 0.3)
    args.max_rows = args.max_rows or (100_000 if quick else DEFAULT_MAX_ROWS)
    args.contenders = args.contenders or DEFAULT_CONTENDERS
    unknown = sorted(set(args.contenders) - set(ALL_CONTENDERS))
    if unknown:
        p.error(f"unknown contender(s) {unknown}; expected some of {ALL_CONTENDERS}")
    if "ours" not in args.contenders:
        args.contenders = ["ours"] + args.contenders  # the reference of every comparison
    return args


def in_grad_mode(run: Callable[..., torch.Tensor], mode: str) -> Callable[..., torch.Tensor]:
    """``run`` outside inference mode: under ``torch.no_grad`` ("no_grad") or with autograd
    recording ("grad")."""

    def wrapped(dense: torch.Tensor, kjt: KeyedJaggedTensor) -> torch.Tensor:
        with torch.inference_mode(False), (torch.no_grad() if mode == "no_grad" else contextlib.nullcontext()):
            return run(dense, kjt).detach()

    return wrapped


def build_contenders(names: List[str], cfg: Dict[str, Any]) -> List[Contender]:
    """Each named contender, built once and timed for it; the int8 variants that change the
    model are built anew (same config and seed: bit-identical weights)."""
    start = time.perf_counter()
    ours = DLRMFactory(cfg)
    ours_s = time.perf_counter() - start
    float_tables: List[torch.Tensor] = []

    def tables() -> List[torch.Tensor]:
        if not float_tables:
            float_tables.extend(dequantized_tables(ours, cfg))
        return float_tables

    makers: Dict[str, Tuple[Callable[[], Callable[..., torch.Tensor]], Optional[int]]] = {
        "ours": (lambda: ours, None),
        "ours+opt": (lambda: optimize_for_inference(DLRMFactory(cfg)), None),
        "torchrec-float": (lambda: build_torchrec_float(cfg, ours, tables()), None),
        "plain": (lambda: PlainDLRM(cfg, tables()).load_dense_from(ours).eval(), None),
        "ours-grad": (lambda: in_grad_mode(ours, "grad"), None),
        "ours-no_grad": (lambda: in_grad_mode(ours, "no_grad"), None),
        "ours-1t": (lambda: ours, 1),
        "ours+compile": (lambda: compile_dense(DLRMFactory(cfg)), None),
        "ours+opt-nochunk": (lambda: optimize_for_inference(DLRMFactory(cfg), chunk_rows=1 << 40), None),
        "ours+opt-c512": (lambda: optimize_for_inference(DLRMFactory(cfg), chunk_rows=512), None),
        "ours+opt-1t": (lambda: optimize_for_inference(DLRMFactory(cfg)), 1),
        "ours+opt+compile": (lambda: optimize_for_inference(DLRMFactory(cfg), compile_dense=True), None),
        "ours+opt+bf16": (lambda: with_bf16_dense(optimize_for_inference(DLRMFactory(cfg))), None),
    }
    built = []
    for name in names:
        make, threads = makers[name]
        start = time.perf_counter()
        run = make()
        setup_s = time.perf_counter() - start + (ours_s if name == "ours" else 0.0)
        built.append(Contender(name=name, run=run, threads=threads, setup_s=setup_s))
    return built


def busy_cpu_seconds() -> Tuple[float, float]:
    """(CPU seconds all processes have used since boot, CPU seconds this process has used)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # less idle, iowait
    except (OSError, ValueError, IndexError):
        busy = float("nan")
    t = os.times()
    return busy, t.user + t.system


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    malloc_note = "glibc malloc defaults"
    if args.malloc == "tuned":
        malloc_note = "malloc tuned (tune_malloc)" if tune_malloc() else "malloc tuning unavailable"
    if args.interop_threads:
        torch.set_num_interop_threads(args.interop_threads)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    cfg = bench_config(args.max_rows)
    flops = dense_flops_per_sample(cfg)
    rows = sum(cfg["num_embeddings_per_feature"])
    print(
        f"machine: {machine_line()}; {threads} intra-op / {torch.get_num_interop_threads()} inter-op threads; "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}; {malloc_note}"
    )
    print(
        f"tables: {len(cfg['num_embeddings_per_feature'])}, each capped at {args.max_rows:,} rows: {rows:,} rows, "
        f"{rows * cfg['embedding_dim'] * 4 / 1e9:.2f} GB as float, {rows * 68 / 1e9:.2f} GB as int8"
    )
    print("dense FLOPs/sample: " + ", ".join(f"{k} {v:,}" for k, v in flops.items()))
    start = time.perf_counter()
    contenders = build_contenders(args.contenders, cfg)
    print("built (s): " + ", ".join(f"{c.name} {c.setup_s:.1f}" for c in contenders)
          + f"; total {time.perf_counter() - start:.0f}", flush=True)

    inputs = {b: make_batches(cfg, b, INPUT_SETS, seed=b) for b in args.batches}
    warm_up(contenders, inputs, threads)
    print("warm-up, 3 calls per batch size, incl. compilation (s): "
          + ", ".join(f"{c.name} {c.warmup_s:.1f}" for c in contenders), flush=True)
    diffs = score_diffs(contenders, inputs, reference="ours")
    print("max abs score diff vs ours: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    for name, diff in diffs.items():
        if not name.endswith("bf16") and diff > SCORE_ATOL:
            raise SystemExit(f"{name}: scores differ from the factory model's by {diff:.2e} > {SCORE_ATOL}")

    peak_size = (4096, 512, 512)
    start, (busy0, self0) = time.perf_counter(), busy_cpu_seconds()
    peaks = run_rounds(contenders, inputs, args.repeats, args.min_time, threads, peak_size)
    wall, (busy1, self1) = time.perf_counter() - start, busy_cpu_seconds()
    others = (busy1 - busy0 - (self1 - self0)) / (wall * (os.cpu_count() or 1))
    all_peaks = [p for per_batch in peaks.values() for p in per_batch]
    peak = statistics.median(all_peaks)
    title = (
        f"DLRM (26 tables capped at {args.max_rows:,} rows, one-hot), {threads} thread{'s' * (threads != 1)}; "
        f"fp32 mm peak {peak:.0f} GFLOP/s"
    )
    print(f"timed in {wall:.0f} s; other processes used {max(0.0, others):.0%} of the CPUs meanwhile")
    print()
    print(
        f"{title}. Median samples/s of {args.repeats} interleaved repeats of >= {args.min_time} s; "
        f"latency percentiles over all calls; dense part {flops['total'] / 1e6:.2f} MFLOP/sample; "
        f"peak: fp32 torch.mm {peak_size[0]}x{peak_size[1]} @ {peak_size[1]}x{peak_size[2]}, measured before every "
        f"(repeat, batch) block ({min(all_peaks):.0f}-{max(all_peaks):.0f} GFLOP/s); ratios and fractions of the "
        f"bound are medians of per-repeat values; {malloc_note}."
    )
    print()
    reference = "torchrec-float" if any(c.name == "torchrec-float" for c in contenders) else "ours"
    print(markdown_table(contenders, args.batches, flops["total"], peaks, diffs, reference))
    plot(contenders, args.batches, flops["total"], peak, title, args.out)
    print(f"\nplot: {args.out}")
    if args.profile:
        profile_contenders(contenders, inputs, threads, rows=args.profile)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("torchrec", "dlrm_factory", "torch.fx"):  # planner and build chatter
        logging.getLogger(noisy).setLevel(logging.ERROR)
    sys.exit(main())
