# reglab: `make run` trains the default study, `make test` runs the suite, `make ui` opens MLflow on 127.0.0.1.
# Every target but clean creates .venv and installs the package (with the dev extra) first if needed.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
UI_PORT ?= 5000
export NO_ALBUMENTATIONS_UPDATE := 1
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: install run test test-fast test-cluster ui bench lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# The MNIST-1D deep-double-descent study (conf/exp/double_descent_mnist1d.yaml) on 14 of its widths x 5 seeds, as
# 2 population jobs at once (one per core): figures and tables in results/double_descent_mnist1d/, runs in MLflow
# (experiment double_descent). Rerunning skips finished members and resumes interrupted ones. DD_WIDTHS= (empty)
# runs the preset's whole grid.
DD_WIDTHS ?= 4,8,12,16,24,32,40,48,56,64,96,128,192,256
run: install
	$(PY) scripts/train.py +exp=double_descent_mnist1d $(if $(DD_WIDTHS),model.width=$(DD_WIDTHS))
	@echo "Figures: results/double_descent_mnist1d/   Runs: make ui  (then http://127.0.0.1:$(UI_PORT))"

# The suite in TEST_JOBS pytest-xdist workers, a test file each at a time, one torch thread per worker: on 2 cores
# its CPU-bound tests run side by side (4 min 28 s and 5 min 54 s here against 7 min 27 s in one process; see
# docs/benchmarks.md). TEST_JOBS=0: one process.
TEST_JOBS ?= 2
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(TEST_JOBS) --dist loadfile

test-fast: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(TEST_JOBS) --dist loadfile -m "not slow and not e2e and not cluster"

# Multi-process and cluster-scale tests (marker `cluster`: tests/test_cluster_faults.py's preemption, full disk,
# tracking-server outage and many writers; test_concurrency.py; test_ddp.py; 4-10 min on 2 cores): outside
# `make test`'s 5-minute budget, run by .ci/run after it.
test-cluster: install
	$(PY) -m pytest -m cluster

ui: install
	mkdir -p mlruns/artifacts
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow ui \
	  --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db \
	  --default-artifact-root $(CURDIR)/mlruns/artifacts \
	  --host 127.0.0.1 --port $(UI_PORT) --workers 1

bench: install
	$(PY) scripts/bench.py

lint: install
	$(VENV)/bin/hadolint Dockerfile

# Hydra's job folders and caches. Not outputs/checkpoints/ (what interrupted runs resume from; make run's study
# uploads no checkpoint to MLflow), nor mlruns/ or results/: remove those by hand.
clean:
	rm -rf multirun .pytest_cache
	if [ -d outputs ]; then find outputs -mindepth 1 -maxdepth 1 ! -name checkpoints -exec rm -rf {} +; fi
	@echo "kept: outputs/checkpoints/ (resumable runs), mlruns/ (the MLflow store), results/ (study reports)"
