# stratarec — `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STRATAREC_DATA_DIR ?= ../shared/data
export STRATAREC_DATA_DIR

.PHONY: help setup run test test-unit test-fast lint compile serve monitor bench-quality bench-serve bench-fuzz clean

help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(BIN)/stratarec: pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools
	# torch is pinned exactly (CPU wheel); constraints.txt pins everything else.
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	@touch $@

setup: $(BIN)/stratarec ## Create the virtualenv and install the project with all extras

run: setup ## Run the whole pipeline on MovieLens 100K through kfp.local
	$(BIN)/stratarec run --config configs/ml100k.yaml

test: setup ## Run the whole test suite (what CI runs)
	$(BIN)/python -m pytest

test-unit: setup ## Unit tests only
	$(BIN)/python -m pytest -m unit

lint: setup ## Ruff
	$(BIN)/ruff check .

compile: setup ## Compile the pipelines to KFP YAML in build/
	$(BIN)/stratarec compile --out build

serve: setup ## Serve the production Bento on localhost:3000
	$(BIN)/stratarec serve --config configs/ml100k.yaml

monitor: setup ## Drift check on the latest data (add ARGS=--retrain to retrain on drift)
	$(BIN)/stratarec monitor --config configs/ml100k.yaml $(ARGS)

bench-quality: setup ## Recommendation-quality benchmark (ARGS="--dataset ml-1m-sasrec --budget-minutes 120")
	$(BIN)/python bench/quality.py $(ARGS)

bench-serve: setup ## Serving load benchmark of the production Bento on Redis features (ARGS="--duration 30 --rate 150")
	$(BIN)/python bench/serve.py $(ARGS)

bench-fuzz: setup ## Schemathesis fuzz of the service at full size (ARGS="--examples 1000")
	$(BIN)/python bench/fuzz.py $(ARGS)

clean: ## Remove run outputs and the local workspace
	rm -rf runs .stratarec build local_outputs
