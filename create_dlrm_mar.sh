#!/usr/bin/env bash
# Package the DLRM for TorchServe: DIR/NAME.mar holds dlrm_handler.py, dlrm_request.py (the
# request contract the handler imports), dlrm_factory.py, dlrm_table_store.py,
# dlrm_lean_forward.py (the CPU forward the handler serves with), dlrm_checkpoint.py (the DCP
# reader), the config (as model_config.json), the checkpoint if any (a file as checkpoint.pt,
# a torch.distributed.checkpoint directory as checkpoint.dcp/, with its sha256 as
# checkpoint.pt.sha256 or checkpoint.dcp.sha256: the table store's key, so workers need not
# read 45 GB to compute it), the config's id counts if any (as id_counts.safetensors, with
# its sha256: the order of an ordered entry, dlrm_row_order.py) and model-config.yaml. No weights without a checkpoint: the worker builds the tables at its
# first start into its table store, or maps them from there.
#
# --table-store DIR builds the config's table store entry into DIR now, on this machine
# (what the first worker would do): a server whose store is DIR (the config's table_store,
# or $DLRM_TABLE_STORE) then maps it at once, even from a read-only volume. Build it with the
# devices the server will have (the entry's key holds the sharding plan).
#
# --version V (or MODEL_VERSION) stamps the archive's model version (default 1.0): a server
# holds several versions of one model name, and scripts/update_model.py puts a new one in
# service. V is numbers and dots (1.0, 2, 2024.6.1): it sits in TorchServe's URLs
# (/predictions/NAME/V, /models/NAME/V/set-default) and a newer model gets a greater number.
#
# Defaults can be overridden from the environment: CONFIG, CHECKPOINT, EXPORT_PATH,
# MODEL_NAME, MODEL_YAML (TorchServe's per-model YAML), TABLE_STORE, PYTHON, ARCHIVER.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONFIG="${CONFIG:-model_config.json}"
CHECKPOINT="${CHECKPOINT:-}"
EXPORT_PATH="${EXPORT_PATH:-model_store}"
MODEL_NAME="${MODEL_NAME:-dlrm}"
MODEL_VERSION="${MODEL_VERSION:-1.0}"
MODEL_YAML="${MODEL_YAML:-$HERE/model-config.yaml}"
TABLE_STORE="${TABLE_STORE:-}"
if [[ -x "$HERE/.venv/bin/python" ]]; then PYTHON="${PYTHON:-$HERE/.venv/bin/python}"; fi
PYTHON="${PYTHON:-python3}"
if [[ -x "$HERE/.venv/bin/torch-model-archiver" ]]; then
  ARCHIVER="${ARCHIVER:-$HERE/.venv/bin/torch-model-archiver}"
fi
ARCHIVER="${ARCHIVER:-torch-model-archiver}"

usage="usage: $0 [--config FILE] [--checkpoint FILE|DCP_DIR] [--export-path DIR] [--model-name NAME] [--version V] [--table-store DIR]"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) CONFIG="${2:?$usage}"; shift 2 ;;
    --checkpoint) CHECKPOINT="${2:?$usage}"; shift 2 ;;
    --export-path) EXPORT_PATH="${2:?$usage}"; shift 2 ;;
    --model-name) MODEL_NAME="${2:?$usage}"; shift 2 ;;
    --version) MODEL_VERSION="${2:?$usage}"; shift 2 ;;
    --table-store) TABLE_STORE="${2:?$usage}"; shift 2 ;;
    -h | --help) echo "$usage"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; echo "$usage" >&2; exit 2 ;;
  esac
done
if [[ ! "$MODEL_NAME" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]]; then
  echo "--model-name '$MODEL_NAME': use letters, digits, '_', '.' and '-'" >&2; exit 2
fi
if [[ ! "$MODEL_VERSION" =~ ^[0-9]+(\.[0-9]+)*$ ]]; then
  echo "--version '$MODEL_VERSION': use numbers separated by dots (1.0, 2, 2024.6.1), a newer model a greater one" >&2; exit 2
fi

# The archiver stages files in \$TMPDIR/<model name> and deletes that folder first, so give it
# a private TMPDIR: two builds at once must not clobber each other.
STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/files" "$STAGE/tmp"

# Validate the config (never builds the model) and stage it as model_config.json, its
# checkpoint pointing at the packaged checkpoint.pt or checkpoint.dcp (with its sha256 beside
# it). A DCP directory's metadata is checked against the config here (read through the
# allow-list, no tensor read): a bad one fails now, not at the worker's start. A checkpoint
# named only in the config is packaged too. Prints the checkpoint to package, or nothing.
CHECKPOINT="$("$PYTHON" -c '
import json, os, sys
sys.path.insert(0, sys.argv[1])
from dlrm_factory import build_embedding_bag_configs, read_checkpoint_of, read_config_source, resolve_model_config
from dlrm_table_store import check_served_path, directory_sha256, file_sha256
config_path, checkpoint, staged = sys.argv[2:5]
try:
    config = read_config_source(config_path)
except ValueError as e:
    sys.exit(str(e))
if checkpoint:
    config["checkpoint"] = checkpoint
try:
    resolved = resolve_model_config(config)
    check_served_path(config.get("table_store"))
    if resolved["checkpoint"] and os.path.isdir(resolved["checkpoint"]):
        read_checkpoint_of(resolved, build_embedding_bag_configs(resolved))
except ValueError as e:  # names the key (or tensor), the value and the fix
    sys.exit(f"{config_path}: {e}")
checkpoint = config.get("checkpoint") or ""
is_dir = os.path.isdir(checkpoint)
packaged = ("checkpoint.dcp" if is_dir else "checkpoint.pt") if checkpoint else None
config["checkpoint"] = packaged
counts = config.get("id_counts") or ""
config["id_counts"] = "id_counts.safetensors" if counts else None
if counts:  # an ordered entry: the counts packaged, their sha256 beside them (the key)
    staged_counts = os.path.join(os.path.dirname(staged), "id_counts.safetensors")
    os.symlink(os.path.abspath(counts), staged_counts)
    with open(f"{staged_counts}.sha256", "w") as f:
        f.write(f"{file_sha256(counts)}  id_counts.safetensors\n")
with open(staged, "w") as f:
    json.dump(config, f, indent=2)
if checkpoint:  # its identity in the table store key, so workers need not hash it
    digest = (directory_sha256 if is_dir else file_sha256)(checkpoint)
    with open(os.path.join(os.path.dirname(staged), f"{packaged}.sha256"), "w") as f:
        f.write(f"{digest}  {packaged}\n")
print(os.path.abspath(checkpoint) if checkpoint else "")
' "$HERE" "$CONFIG" "$CHECKPOINT" "$STAGE/files/model_config.json")"
# TorchServe puts the .mar's files on the worker's path.
cp "$HERE/dlrm_request.py" "$HERE/dlrm_table_store.py" "$HERE/dlrm_lean_forward.py" "$HERE/dlrm_checkpoint.py" "$HERE/dlrm_row_order.py" "$STAGE/files/"
if [[ -d "$CHECKPOINT" ]]; then
  ln -s "$CHECKPOINT" "$STAGE/files/checkpoint.dcp"  # the archiver copies the directory it points to
elif [[ -n "$CHECKPOINT" ]]; then
  ln -s "$CHECKPOINT" "$STAGE/files/checkpoint.pt"  # the archiver copies what it points to
fi

if [[ -n "$TABLE_STORE" ]]; then
  # The entry the first worker would build at its start: the packaged config, its checkpoint
  # (and digest) as packaged, into TABLE_STORE. The entry only: on a GPU host nothing is put
  # on the GPUs (dlrm_factory.build_store_entry).
  "$PYTHON" -c '
import json, os, sys
sys.path.insert(0, sys.argv[1])
from dlrm_factory import build_store_entry
staged, store = sys.argv[2:4]
with open(os.path.join(staged, "model_config.json")) as f:
    config = json.load(f)
if config.get("checkpoint"):
    config["checkpoint"] = os.path.join(staged, config["checkpoint"])
if config.get("id_counts"):
    config["id_counts"] = os.path.join(staged, config["id_counts"])
entry = build_store_entry({**config, "table_store": store})
print("table store:", entry["path"], "(built)" if entry["built"] else "(already there)")
' "$HERE" "$STAGE/files" "$TABLE_STORE"
fi

mkdir -p "$EXPORT_PATH"
TMPDIR="$STAGE/tmp" "$ARCHIVER" \
  --model-name "$MODEL_NAME" \
  --version "$MODEL_VERSION" \
  --model-file "$HERE/dlrm_factory.py" \
  --handler "$HERE/dlrm_handler.py" \
  --extra-files "$STAGE/files" \
  --config-file "$MODEL_YAML" \
  --export-path "$EXPORT_PATH" \
  --force

MAR="$EXPORT_PATH/$MODEL_NAME.mar"
echo "wrote $MAR ($(du -h "$MAR" | cut -f1); config $CONFIG${CHECKPOINT:+, checkpoint $CHECKPOINT})"
