"""Accuracy benchmark: what fp16, int8 and int4 tables cost a trained DLRM in AUC.

On held-out data, AUC and log loss of
    float           the trained TorchRec ``DLRM`` (float ``EmbeddingBagCollection``, unsharded)
    fp32 ... int4   ``DLRMFactory`` models built from its checkpoint, as TorchServe serves them
                    (at world_size 1 with the handler's ``optimize_for_inference``; at
                    world_size 2 sharded over two simulated CPU ranks: row-wise for int8/int4,
                    table-wise for fp16/fp32, TorchRec's forward)
    oracle          the synthetic generator's true logit: the ceiling of any model's AUC
and each model's AUC over the float model's (MLPerf's DLRM "high accuracy" bar for a
quantized model: >= 0.999). The held-out set is rebuilt from ``training.json`` with the
same generator (``examples/criteo_data.py``) and stream the trainer evaluated on, or read
from the trainer's ``--eval-tsv`` files, or from ``--eval-tsv`` here (a model trained
elsewhere: ``--model-dir`` then needs only checkpoint.pt and model_config.json); real data has
no oracle. The checkpoint may be a ``checkpoint.dcp/`` directory (``train_dlrm.py`` under
torchrun): the served models read it as the factory does, the float model whole.

    .venv/bin/python examples/train_dlrm.py --out trained/        # 4-10 min on the 2 shared cores
    .venv/bin/python benchmarks/bench_accuracy.py --model-dir trained/
    .venv/bin/python benchmarks/bench_accuracy.py --model-dir trained/ --train   # both

``--per-table int4`` also finds which tables a dtype hurts: the float model with one table
at a time replaced by its quantized-then-dequantized rows (the factory's own
``quantize_rows``), each table's AUC loss, and the row ranges of the worst tables.

Prints a markdown table; saves a plot (``--plot``); the last line is
``accuracy: oracle_auc=A float_auc=F fp16/float=R int8/float=R int4/float=R``.
"""

import argparse
import json
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples")
for _path in (REPO, EXAMPLES):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import criteo_data  # noqa: E402
import train_dlrm  # noqa: E402
from criteo_data import CriteoSamples  # noqa: E402
from dlrm_checkpoint import read_dcp  # noqa: E402
from dlrm_factory import DLRMFactory, quantize_rows  # noqa: E402
from dlrm_lean_forward import optimize_for_inference  # noqa: E402

logger = logging.getLogger(__name__)

DTYPES = ["fp32", "fp16", "int8", "int4"]
DEFAULT_SAMPLES = 1_000_000
DEFAULT_PLOT = os.path.join(REPO, "benchmarks", "plots", "bench_accuracy.png")
TABLE_KEY = "sparse_arch.embedding_bag_collection.embedding_bags.{}.weight"


@dataclass
class Result:
    """One model's figures on the held-out set."""

    name: str
    quant_dtype: str
    world_size: Optional[int]
    auc: float
    log_loss: float
    max_score_diff: float  # max |logit - float logit| over the held-out samples
    seconds: float


def held_out_samples(
    model_dir: str, config: Dict[str, Any], eval_tsv: Optional[List[str]], num_samples: Optional[int]
) -> CriteoSamples:
    """``eval_tsv``'s first samples if given; else the held-out set the trainer evaluated on
    (training.json): the synthetic HELD_OUT stream, or the trainer's --eval-tsv files."""
    sizes = config["num_embeddings_per_feature"]
    if eval_tsv:
        return criteo_data.read_criteo_tsv(eval_tsv, sizes, max_rows=num_samples or DEFAULT_SAMPLES)
    path = os.path.join(model_dir, "training.json")
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: not found; give the held-out data with --eval-tsv FILE ...")
    with open(path) as f:
        training = json.load(f)
    num_samples = num_samples or training["figures"].get("eval_samples") or DEFAULT_SAMPLES
    data = training["data"]
    if data["source"] == "synthetic":
        world = criteo_data.SyntheticCriteo(table_sizes=data["table_sizes"], seed=data["seed"])
        return world.sample(num_samples, criteo_data.HELD_OUT)
    if not data.get("eval"):
        raise SystemExit(f"{path}: trained on TSV without --eval-tsv, nothing held out; give --eval-tsv FILE ...")
    return criteo_data.read_criteo_tsv(data["eval"], sizes, max_rows=num_samples)


def model_checkpoint(model_dir: str) -> str:
    """The checkpoint of a model directory: ``checkpoint.pt``, or ``checkpoint.dcp/`` (what
    ``train_dlrm.py`` writes under torchrun: a torch.distributed.checkpoint directory)."""
    for name in (train_dlrm.CHECKPOINT_FILE, train_dlrm.CHECKPOINT_DIR):
        if os.path.exists(os.path.join(model_dir, name)):
            return os.path.join(model_dir, name)
    raise SystemExit(f"{model_dir}: holds neither {train_dlrm.CHECKPOINT_FILE} nor {train_dlrm.CHECKPOINT_DIR}/")


def float_model(config: Dict[str, Any], checkpoint: str) -> torch.nn.Module:
    """The trained float TorchRec ``DLRM``, unquantized and unsharded (a DCP checkpoint's
    tensors read whole: this model holds every table anyway)."""
    model = train_dlrm.build_train_model(config, seed=0)
    if os.path.isdir(checkpoint):
        state = {name: tensor[:] for name, tensor in read_dcp(checkpoint).items()}
    else:
        state = torch.load(checkpoint, weights_only=True)
    if state and all(key.startswith("model.") for key in state):  # DLRMTrain's, as train_dlrm saves
        model.load_state_dict(state)
    else:  # a plain DLRM's
        model.model.load_state_dict(state)
    return model.model.eval()


def served_model(config: Dict[str, Any], checkpoint: str, quant_dtype: str, world_size: int) -> torch.nn.Module:
    """``DLRMFactory`` from the checkpoint at ``quant_dtype`` on ``world_size`` CPU ranks."""
    sharding = "row_wise" if world_size > 1 and quant_dtype in ("int8", "int4") else "table_wise"
    cfg = {**config, "quant_dtype": quant_dtype, "world_size": world_size, "sharding_type": sharding,
           "device": "cpu", "checkpoint": checkpoint}  # fmt: skip
    model = DLRMFactory(cfg)
    return optimize_for_inference(model) if world_size == 1 else model


def evaluate(name: str, quant_dtype: str, world_size: Optional[int], logits: torch.Tensor,
             samples: CriteoSamples, reference: Optional[torch.Tensor], seconds: float) -> Result:  # fmt: skip
    return Result(
        name=name,
        quant_dtype=quant_dtype,
        world_size=world_size,
        auc=train_dlrm.auc(logits, samples.labels),
        log_loss=train_dlrm.log_loss(logits, samples.labels),
        max_score_diff=float("nan") if reference is None else (logits - reference).abs().max().item(),
        seconds=seconds,
    )


def markdown_table(results: List[Result], float_auc: float, float_log_loss: float, oracle: Optional[Result]) -> str:
    rows = [
        "| model | tables | world_size | AUC | AUC / float | log loss | log loss - float | max abs logit diff vs float |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        ws = "-" if r.world_size is None else str(r.world_size)
        diff = "-" if math.isnan(r.max_score_diff) else f"{r.max_score_diff:.2e}"
        rows.append(f"| {r.name} | {r.quant_dtype} | {ws} | {r.auc:.6f} | {r.auc / float_auc:.6f} | "
                    f"{r.log_loss:.6f} | {r.log_loss - float_log_loss:+.6f} | {diff} |")  # fmt: skip
    if oracle is not None:
        rows.append(f"| oracle (true logit) | - | - | {oracle.auc:.6f} | {oracle.auc / float_auc:.6f} | "
                    f"{oracle.log_loss:.6f} | {oracle.log_loss - float_log_loss:+.6f} | - |")  # fmt: skip
    return "\n".join(rows)


def plot(results: List[Result], oracle_auc: float, float_auc: float, title: str, path: str) -> None:
    """Left: AUC of each model against the oracle's; right: AUC / float with MLPerf's 0.999."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    served = [r for r in results if r.world_size == 1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    names = ["float"] + [r.quant_dtype for r in served]
    aucs = [float_auc] + [r.auc for r in served]
    left.bar(names, aucs, color=["#555555"] + ["#1f77b4"] * len(served))
    left.axhline(0.5, color="grey", linewidth=0.8)
    if not math.isnan(oracle_auc):
        left.axhline(oracle_auc, color="green", linestyle="--", label=f"oracle {oracle_auc:.4f}")
        left.legend(fontsize=8, loc="lower right")
    left.set_ylim(0.5, max(aucs + [0 if math.isnan(oracle_auc) else oracle_auc]) + 0.03)
    left.set_ylabel("held-out AUC")
    for x, a in enumerate(aucs):
        left.text(x, a + 0.004, f"{a:.4f}", ha="center", fontsize=8)

    ratios = [r.auc / float_auc for r in served]
    right.bar([r.quant_dtype for r in served], ratios, color="#1f77b4")
    right.axhline(0.999, color="red", linestyle="--", label="MLPerf bar 0.999")
    right.axhline(0.995, color="orange", linestyle=":", label="int4 goal 0.995")
    low = min(ratios + [0.995])
    right.set_ylim(low - (1 - low) * 0.5 - 1e-4, 1 + (1 - low) * 0.25 + 1e-4)
    right.set_ylabel("AUC / float AUC")
    right.legend(fontsize=8, loc="lower left")
    for x, ratio in enumerate(ratios):
        right.text(x, ratio, f"{ratio:.6f}", ha="center", va="bottom", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# Which tables a dtype hurts.
# ---------------------------------------------------------------------------------------


def dequantized(rows: torch.Tensor, quant_dtype: str) -> torch.Tensor:
    """``rows`` as the served model reads them: the factory's quantization, then fbgemm's
    dequantization (int8/int4), or the fp16 round trip."""
    stored, scale_bias = quantize_rows(rows, quant_dtype)
    if scale_bias is None:
        return stored.view(torch.float16 if quant_dtype == "fp16" else torch.float32).float()
    fused = torch.cat([stored, scale_bias], dim=1).contiguous()
    bits = {"int8": 8, "int4": 4}[quant_dtype]
    return torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(fused, bits)


def per_table_losses(model: torch.nn.Module, samples: CriteoSamples, keys: Sequence[str], quant_dtype: str,
                     float_auc: float) -> List[Dict[str, Any]]:  # fmt: skip
    """For each table alone at ``quant_dtype`` (the others float): AUC loss and row stats."""
    tables = model.sparse_arch.embedding_bag_collection.embedding_bags
    out = []
    for f, key in enumerate(tqdm_iter(keys, "per-table")):
        weight = tables[f"t_{key}"].weight
        original = weight.detach().clone()
        with torch.no_grad():
            weight.copy_(dequantized(original, quant_dtype))
        logits = train_dlrm.predict(model, samples, keys)
        with torch.no_grad():
            weight.copy_(original)
        used = torch.bincount(samples.ids[:, f], minlength=original.shape[0])
        ranges = original.max(dim=1).values - original.min(dim=1).values
        weighted_range = (ranges * used).sum().item() / used.sum().item()
        error = (dequantized(original, quant_dtype) - original).abs()
        out.append({
            "table": f"t_{key}", "rows": original.shape[0],
            "auc_loss": float_auc - train_dlrm.auc(logits, samples.labels),
            "range_per_lookup": weighted_range, "max_range": ranges.max().item(),
            "max_abs_error": error.max().item(),
        })  # fmt: skip
    return out


def tqdm_iter(items: Sequence[Any], desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(items, desc=desc, mininterval=2.0)


# ---------------------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-dir", required=True,
                   help="checkpoint.pt (or a checkpoint.dcp/ directory) and model_config.json "
                        "(and training.json: train_dlrm.py's --out)")
    p.add_argument("--eval-tsv", nargs="+", default=None, metavar="FILE",
                   help="held-out Criteo TSV files (default: the trainer's held-out set, from training.json)")
    p.add_argument("--train", action="store_true", help="run examples/train_dlrm.py --out MODEL_DIR (defaults) first")
    p.add_argument("--samples", type=int, default=None,
                   help="held-out samples (default: as many as the trainer evaluated on, or 1,000,000)")
    p.add_argument("--dtypes", type=lambda s: s.split(","), default=DTYPES, help="served dtypes to compare")
    p.add_argument("--world-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    p.add_argument("--per-table", default=None, choices=["fp16", "int8", "int4"],
                   help="also: each table alone at this dtype, its AUC loss and row ranges")
    p.add_argument("--plot", default=DEFAULT_PLOT, help="the PNG plot")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.train:
        train_dlrm.main(["--out", args.model_dir])
    checkpoint = model_checkpoint(args.model_dir)
    with open(os.path.join(args.model_dir, "model_config.json")) as f:
        config = json.load(f)
    keys = config["id_list_features_keys"]
    samples = held_out_samples(args.model_dir, config, args.eval_tsv, args.samples)
    print(f"held-out: {len(samples):,} samples, click rate {samples.labels.mean().item():.4f}; "
          f"model: D={config['embedding_dim']}, {len(keys)} tables, {sum(config['num_embeddings_per_feature']):,} rows; "
          f"torch threads {torch.get_num_threads()}", flush=True)  # fmt: skip

    start = time.perf_counter()
    reference_model = float_model(config, checkpoint)
    reference = train_dlrm.predict(reference_model, samples, keys)
    floats = evaluate("float TorchRec DLRM", "fp32 (float)", None, reference, samples, None, time.perf_counter() - start)
    oracle = None
    if samples.oracle_logit is not None:
        oracle = evaluate("oracle", "-", None, samples.oracle_logit, samples, None, 0.0)

    results: List[Result] = [floats]
    scores: Dict[tuple, torch.Tensor] = {}
    for quant_dtype in args.dtypes:
        for world_size in args.world_sizes:
            start = time.perf_counter()
            model = served_model(config, checkpoint, quant_dtype, world_size)
            logits = train_dlrm.predict(model, samples, keys)
            scores[(quant_dtype, world_size)] = logits
            results.append(evaluate("DLRMFactory (served)", quant_dtype, world_size, logits, samples, reference,
                                    time.perf_counter() - start))  # fmt: skip
            print(f"  {quant_dtype} world_size {world_size}: AUC {results[-1].auc:.5f} "
                  f"({results[-1].seconds:.0f} s)", flush=True)  # fmt: skip
            del model

    same = {}
    for quant_dtype in args.dtypes:
        runs = [scores[(quant_dtype, ws)] for ws in args.world_sizes]
        same[quant_dtype] = all(torch.equal(runs[0], r) for r in runs[1:])
    print()
    print(markdown_table(results, floats.auc, floats.log_loss, oracle))
    print()
    if len(args.world_sizes) > 1:
        print("world_size " + " and ".join(map(str, args.world_sizes)) + " give identical logits: "
              + ", ".join(f"{d} {'yes' if ok else 'NO'}" for d, ok in same.items()))  # fmt: skip
    if oracle is not None:
        print(f"float model closes {(floats.auc - 0.5) / (oracle.auc - 0.5):.1%} of the oracle's AUC gap above 0.5")

    if args.per_table:
        losses = per_table_losses(reference_model, samples, keys, args.per_table, floats.auc)
        losses.sort(key=lambda r: -r["auc_loss"])
        print(f"\nEach table alone at {args.per_table} (others float): AUC loss, worst first")
        print("| table | rows | AUC loss | row range, mean over lookups | max row range | max abs error |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for r in losses[:10]:
            print(f"| {r['table']} | {r['rows']:,} | {r['auc_loss']:+.6f} | {r['range_per_lookup']:.4f} | "
                  f"{r['max_range']:.4f} | {r['max_abs_error']:.4f} |")  # fmt: skip

    by_dtype = {r.quant_dtype: r for r in results if r.world_size == 1}
    title = (f"Trained DLRM (D={config['embedding_dim']}, {len(keys)} tables), {len(samples):,} held-out samples; "
             f"float AUC {floats.auc:.4f}")  # fmt: skip
    plot(results, float("nan") if oracle is None else oracle.auc, floats.auc, title, args.plot)
    print(f"\nplot: {args.plot}")
    ratios = {d: by_dtype[d].auc / floats.auc if d in by_dtype else float("nan") for d in ("fp16", "int8", "int4")}
    oracle_auc = float("nan") if oracle is None else oracle.auc
    print(f"accuracy: oracle_auc={oracle_auc:.4f} float_auc={floats.auc:.4f} "
          f"fp16/float={ratios['fp16']:.6f} int8/float={ratios['int8']:.6f} int4/float={ratios['int4']:.6f}")
    return {"results": results, "oracle": oracle, "ratios": ratios, "same_across_world_sizes": same}


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("torchrec", "dlrm_factory", "torch.fx"):  # planner and build chatter
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="HeuristicalStorageReservation", category=FutureWarning)
    main()
