# Set-up is part of every target: a fresh machine needs only python3 (3.10+) and make.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench

setup: $(VENV)/.installed

# torch first, pinned to the CPU wheel (an unpinned torch pulls a multi-GB CUDA build);
# MovieLens-100K comes inside the recbole wheel and is never committed (licence).
# TorchRec (the sharded embedding backend) on CPU: fbgemm-gpu-cpu 1.8.0 is the build that loads
# against torch 2.13.0, and torchrec goes in with --no-deps (its own deps pull the CUDA fbgemm-gpu).
$(VENV)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q "ray[default,train,data,tune]==2.60.0" -e ".[test,s3]"
	$(BIN)/pip install -q torch==2.13.0 fbgemm-gpu-cpu==1.8.0 tensordict==0.15.3 torchmetrics==1.0.3 \
		pyre-extensions tqdm
	$(BIN)/pip install -q --no-deps torchrec==1.8.0
	$(BIN)/pip install -q --no-deps recbole==1.2.1
	touch $@

demo: setup
	$(BIN)/raytrain-ctr demo

lint: setup
	$(BIN)/ruff check raytrain_ctr tests benchmarks examples jobs

test: lint
	$(BIN)/python -m pytest -q --durations=25

bench: setup
	$(BIN)/python benchmarks/generator.py
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/embedding.py
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/memory.py
	$(BIN)/python benchmarks/stages.py
