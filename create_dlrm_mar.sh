#!/usr/bin/env bash
# Package the DLRM for TorchServe: DIR/NAME.mar holds dlrm_handler.py, dlrm_request.py (the
# request contract the handler imports), dlrm_factory.py, the config (as model_config.json),
# the checkpoint if any (as checkpoint.pt) and model-config.yaml. No weights without a
# checkpoint: the worker builds the model at startup.
#
# Defaults can be overridden from the environment: CONFIG, CHECKPOINT, EXPORT_PATH,
# MODEL_NAME, MODEL_YAML (TorchServe's per-model YAML), PYTHON, ARCHIVER.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONFIG="${CONFIG:-model_config.json}"
CHECKPOINT="${CHECKPOINT:-}"
EXPORT_PATH="${EXPORT_PATH:-model_store}"
MODEL_NAME="${MODEL_NAME:-dlrm}"
MODEL_YAML="${MODEL_YAML:-$HERE/model-config.yaml}"
if [[ -x "$HERE/.venv/bin/python" ]]; then PYTHON="${PYTHON:-$HERE/.venv/bin/python}"; fi
PYTHON="${PYTHON:-python3}"
if [[ -x "$HERE/.venv/bin/torch-model-archiver" ]]; then
  ARCHIVER="${ARCHIVER:-$HERE/.venv/bin/torch-model-archiver}"
fi
ARCHIVER="${ARCHIVER:-torch-model-archiver}"

usage="usage: $0 [--config FILE] [--checkpoint FILE] [--export-path DIR] [--model-name NAME]"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) CONFIG="${2:?$usage}"; shift 2 ;;
    --checkpoint) CHECKPOINT="${2:?$usage}"; shift 2 ;;
    --export-path) EXPORT_PATH="${2:?$usage}"; shift 2 ;;
    --model-name) MODEL_NAME="${2:?$usage}"; shift 2 ;;
    -h | --help) echo "$usage"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; echo "$usage" >&2; exit 2 ;;
  esac
done
if [[ ! "$MODEL_NAME" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]]; then
  echo "--model-name '$MODEL_NAME': use letters, digits, '_', '.' and '-'" >&2; exit 2
fi

# The archiver stages files in \$TMPDIR/<model name> and deletes that folder first, so give it
# a private TMPDIR: two builds at once must not clobber each other.
STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/files" "$STAGE/tmp"

# Validate the config (never builds the model) and stage it as model_config.json, its
# checkpoint pointing at the packaged checkpoint.pt. A checkpoint named only in the config
# is packaged too. Prints the checkpoint to package, or nothing.
CHECKPOINT="$("$PYTHON" -c '
import json, os, sys
sys.path.insert(0, sys.argv[1])
from dlrm_factory import read_config_source, resolve_model_config
config_path, checkpoint, staged = sys.argv[2:5]
try:
    config = read_config_source(config_path)
except ValueError as e:
    sys.exit(str(e))
if checkpoint:
    config["checkpoint"] = checkpoint
try:
    resolve_model_config(config)
except ValueError as e:  # names the key, the value and the fix
    sys.exit(f"{config_path}: {e}")
checkpoint = config.get("checkpoint") or ""
config["checkpoint"] = "checkpoint.pt" if checkpoint else None
with open(staged, "w") as f:
    json.dump(config, f, indent=2)
print(os.path.abspath(checkpoint) if checkpoint else "")
' "$HERE" "$CONFIG" "$CHECKPOINT" "$STAGE/files/model_config.json")"
cp "$HERE/dlrm_request.py" "$STAGE/files/"  # TorchServe puts the .mar's files on the worker's path
if [[ -n "$CHECKPOINT" ]]; then
  ln -s "$CHECKPOINT" "$STAGE/files/checkpoint.pt"  # the archiver copies what it points to
fi

mkdir -p "$EXPORT_PATH"
TMPDIR="$STAGE/tmp" "$ARCHIVER" \
  --model-name "$MODEL_NAME" \
  --version 1.0 \
  --model-file "$HERE/dlrm_factory.py" \
  --handler "$HERE/dlrm_handler.py" \
  --extra-files "$STAGE/files" \
  --config-file "$MODEL_YAML" \
  --export-path "$EXPORT_PATH" \
  --force

MAR="$EXPORT_PATH/$MODEL_NAME.mar"
echo "wrote $MAR ($(du -h "$MAR" | cut -f1); config $CONFIG${CHECKPOINT:+, checkpoint $CHECKPOINT})"
