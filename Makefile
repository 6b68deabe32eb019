# make demo  - set up if needed, build dlrm.mar, start TorchServe, score sample_data.json
# make test  - set up if needed, run the whole test suite
# make setup - create .venv/ and install the pinned CPU stack (and the test tools)
# make gpu-check - on a GPU host (CUDA builds installed: README, GPUs), check the GPU path once
# make kserve - build kserve/model-store/dlrm.mar and kserve/table_store/ (its tables): with
#               kserve/config/, the tree KServe mounts at /mnt/models (README, "KServe")
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PIP_FLAGS ?=

.PHONY: setup test check-java demo stop kserve gpu-check

setup: $(STAMP)

$(STAMP): requirements.txt requirements-torchrec.txt requirements-dev.txt
	@$(MAKE) --no-print-directory check-java
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install $(PIP_FLAGS) --no-deps -r requirements-torchrec.txt
	$(PY) -c "import torch, fbgemm_gpu, torchrec, ts; print('installed: torch', torch.__version__, '| torchrec', torchrec.__version__)"
	touch $(STAMP)

check-java:
	@java -version 2>&1 | grep -qE 'version "(1[7-9]|2[0-9])' || { \
	  echo "TorchServe 0.12 needs Java 17 (found: $$(java -version 2>&1 | head -1 || echo none))."; \
	  echo "Install it: Debian/Ubuntu: sudo apt-get install -y openjdk-17-jdk-headless;"; \
	  echo "macOS: brew install openjdk@17; conda: conda install -c conda-forge openjdk=17"; \
	  exit 1; }

test: $(STAMP)
	$(PY) -m pytest tests

gpu-check: $(STAMP)
	$(PY) scripts/gpu_check.py

# Package model_config.json (the full Criteo 1TB model: ~12 GB of int8 tables, built into the
# table store at the first start, ~40 s; mapped at every later one, ~6 s), serve it on
# 127.0.0.1:8080 and score sample_data.json.
demo: $(STAMP)
	$(PY) scripts/demo.py start

# Stop the TorchServe that `make demo` started (only that one, by its pid in .demo/).
stop:
	$(PY) scripts/demo.py stop

# The tree of kserve/dlrm-inferenceservice.yaml's volume: model-store/dlrm.mar next to config/
# (config.properties names /mnt/models/model-store/dlrm.mar) and table_store/ with the model's
# table store entry built now (the manifest's DLRM_TABLE_STORE=/mnt/models/table_store: the
# volume is mounted read-only, the workers map it). Another config or folder:
# make kserve KSERVE_MODEL_CONFIG=my_config.json KSERVE_MODEL_STORE=/path/to/model-store KSERVE_TABLE_STORE=/path/to/table_store
KSERVE_MODEL_CONFIG ?= model_config.json
KSERVE_MODEL_STORE ?= kserve/model-store
KSERVE_TABLE_STORE ?= kserve/table_store
kserve: | $(STAMP)
	./create_dlrm_mar.sh --config $(KSERVE_MODEL_CONFIG) --export-path $(KSERVE_MODEL_STORE) --model-name dlrm --table-store $(KSERVE_TABLE_STORE)
