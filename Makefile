# lmcore: `make pipeline` runs the whole lifecycle, `make test` the test suite.
# Both create .venv and install the project against constraints.txt on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SHARED := $(abspath ../shared)
PARAMS ?= params.yaml

# Offline mirror and local tokenizer ranks: used when ../shared is beside the checkout.
ifneq ($(wildcard $(SHARED)/data),)
export LMCORE_MIRROR ?= $(SHARED)/data
endif
ifneq ($(wildcard $(SHARED)/tokenizers/gpt2.tiktoken),)
export LMCORE_TIKTOKEN_FILE ?= $(SHARED)/tokenizers/gpt2.tiktoken
endif
export MLFLOW_DISABLE_TELEMETRY ?= true
export DO_NOT_TRACK ?= 1
export DVC_NO_ANALYTICS ?= 1

.PHONY: setup pipeline repro dvc-yaml test test-all ui mlflow-server serve push pull lock clean
setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -c constraints.txt -e '.[dev]'
	touch $@

pipeline: setup  ## the lifecycle flow on $(PARAMS): the stages that changed since dvc.lock (all of them for another profile)
	$(BIN)/lmcore pipeline --params $(PARAMS)

repro: setup  ## the same stages through DVC (dvc.yaml first brought up to date with params.yaml's local source paths)
	$(BIN)/lmcore dvc-yaml
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/dvc repro

dvc-yaml: setup  ## write dvc.yaml from the stage declarations in lmcore/pipeline.py (code deps computed)
	$(BIN)/lmcore dvc-yaml

# One pytest-xdist worker per core; tests sharing a module or lifecycle fixture run on one worker, longest groups first
# (tests/conftest.py). PYTEST_ARGS adds options, e.g. PYTEST_ARGS='--durations=25'; XDIST= runs in one process.
XDIST ?= -n auto --dist loadgroup --no-loadscope-reorder
PYTEST_ARGS ?=

test: setup  ## the default test suite: everything but the slow end-to-end tests (budget: 4 minutes on 2 cores)
	$(BIN)/python -m pytest $(XDIST) -m 'not slow' $(PYTEST_ARGS)

test-all: setup  ## every test, the slow ones on real servers included (CI runs this; budget: 15 minutes on 2 cores)
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

ui: setup  ## MLflow UI on http://127.0.0.1:5000
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

MLFLOW_PORT ?= 5000
mlflow-server: setup  ## mlflow server on http://127.0.0.1:$(MLFLOW_PORT) over the project's store; export MLFLOW_TRACKING_URI=http://127.0.0.1:$(MLFLOW_PORT)
	$(BIN)/mlflow server --host 127.0.0.1 --port $(MLFLOW_PORT) --workers 2 \
	  --backend-store-uri sqlite:///$(abspath mlflow.db) --artifacts-destination $(abspath mlartifacts)

PREFECT_PORT ?= 4200
serve: setup  ## a Prefect server on 127.0.0.1:$(PREFECT_PORT) and the scheduled lifecycle deployment (Ctrl-C stops both)
	$(BIN)/python -m flows.deploy --start-server --port $(PREFECT_PORT) --params $(PARAMS)

push: setup  ## data and weights to the DVC remote
	$(BIN)/dvc push

pull: setup  ## data and weights from the DVC remote
	$(BIN)/dvc pull

lock:  ## re-resolve constraints.txt in a scratch venv
	rm -rf /tmp/lmcore-lock && $(PYTHON) -m venv /tmp/lmcore-lock
	/tmp/lmcore-lock/bin/pip install -c constraints.txt -e '.[dev]'
	/tmp/lmcore-lock/bin/pip freeze --exclude-editable | grep -v -E '^(pip|setuptools|wheel)==' > constraints.new && echo 'review constraints.new'

clean:  ## remove pipeline outputs and stage logs (not the venv, not mlflow.db)
	rm -rf data/raw data/clean data/tokens models reports logs
