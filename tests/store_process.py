"""One process that builds a DLRM with a table store and scores a fixed batch: what a serving
worker does at start, for tests that need several processes (tests/test_table_store.py).

    python tests/store_process.py CONFIG_JSON [--go FILE] [--hold]

Prints ``ready`` once imported; with ``--go`` it then waits (at most 120 s) until FILE exists,
so that several processes can call ``DLRMFactory`` at the same moment. Then prints one JSON
line: {"pid", "built", "path", "scores"}. With ``--hold`` it stays alive (tables mapped)
until its stdin closes, so a test can read its /proc/<pid>/smaps.
"""

import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import conftest  # noqa: E402,F401  (the repo and scripts/ on the path, as in the tests)

from dlrm_factory import DLRMFactory, resolve_model_config  # noqa: E402
from serving import direct_scores, random_samples  # noqa: E402


def main() -> None:
    config_path = sys.argv[1]
    go = sys.argv[sys.argv.index("--go") + 1] if "--go" in sys.argv else None
    with open(config_path) as f:
        config = json.load(f)
    print("ready", flush=True)
    for _ in range(1200):
        if go is None or os.path.exists(go):
            break
        time.sleep(0.1)
    model = DLRMFactory(config)
    cfg = resolve_model_config(config)
    samples = random_samples(random.Random(7), 16, cfg["num_embeddings_per_feature"])
    scores = direct_scores(model, cfg["id_list_features_keys"], samples)
    print(json.dumps({"pid": os.getpid(), **model.table_store_entry, "scores": scores}), flush=True)
    if "--hold" in sys.argv:
        sys.stdin.read()


if __name__ == "__main__":
    main()
