"""Build the full default model (Criteo 1TB, 26 tables) on CPU in a fresh process and print
build seconds, peak RSS, the quantized table bytes and their ratio.

    .venv/bin/python benchmarks/bench_build.py [--quant-dtype int8] [--config model_config.json]

Peak RSS / table bytes close to 1 means no float copy of the tables ever existed (a float
build would need ~45.6 GB for tables alone, ~3.8x the int8 rows).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1024**3

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import torch
import dlrm_factory
import_s = time.perf_counter() - t0
import_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
config = dlrm_factory.resolve_model_config(sys.argv[1])
config["quant_dtype"] = sys.argv[2]
config["device"] = "cpu"
t1 = time.perf_counter()
model = dlrm_factory.DLRMFactory(config)
build_s = time.perf_counter() - t1
table_bytes = sum(
    w.numel() + (sb.numel() if sb is not None else 0)
    for _, _, w, sb in dlrm_factory._table_shards(model)
)
print(json.dumps({
    "import_s": import_s, "build_s": build_s, "import_rss": import_rss,
    "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "table_bytes": table_bytes, "rows": sum(config["num_embeddings_per_feature"]),
}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.path.join(REPO, "model_config.json"))
    parser.add_argument("--quant-dtype", default="int8", choices=["int8", "int4"])
    args = parser.parse_args()

    env = {**os.environ, "PYTHONPATH": REPO}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, args.config, args.quant_dtype],
        env=env, stdout=subprocess.PIPE, check=True, text=True,
    )
    r = json.loads(done.stdout.strip().splitlines()[-1])
    ratio = r["peak_rss"] / r["table_bytes"]
    print(f"\nDLRMFactory build, full default config ({r['rows']:,} rows), {args.quant_dtype}, CPU, {os.cpu_count()} cores")
    print("| metric | value |")
    print("| --- | --- |")
    print(f"| imports | {r['import_s']:.1f} s, {r['import_rss'] / GIB:.2f} GiB RSS |")
    print(f"| build (DLRMFactory) | {r['build_s']:.1f} s |")
    print(f"| peak RSS | {r['peak_rss'] / GIB:.2f} GiB ({r['peak_rss'] / 1e9:.2f} GB) |")
    print(f"| quantized table bytes | {r['table_bytes'] / GIB:.2f} GiB ({r['table_bytes'] / 1e9:.2f} GB, {r['table_bytes'] / r['rows']:.0f} B a row) |")
    print(f"| peak RSS / table bytes | {ratio:.3f} |")


if __name__ == "__main__":
    main()
