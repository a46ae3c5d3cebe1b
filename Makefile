# Two commands: `make run` (set-up + the whole pipeline on the demo data) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed
export DAGSTER_HOME := $(CURDIR)/.dagster
export MLFLOW_DISABLE_TELEMETRY := true
export PYTHONUNBUFFERED := 1
DEMO_DIR := data/raw/demo
AUX_DIR := data/raw/demo_aux
RUN_CONFIG ?= configs/demo.yaml
JOB ?= full_pipeline_job
# The dataset the run works on: its folder under data/raw and its Dagster partition.
DATASET ?= demo
PY_DIRS := seg_pipeline seg_pipeline_tests bench deploy

.PHONY: install run test lint format ui mlflow-ui demo-data bench gpu-wheels clean-demo screenshots

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The instance's SQLite schemas are created once here: runs started together on a brand-new
# instance would race to create the same tables ("table ... already exists").
$(DAGSTER_HOME)/dagster.yaml: dagster.yaml | $(STAMP)
	mkdir -p $(DAGSTER_HOME)
	ln -sf ../dagster.yaml $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/dagster instance migrate > /dev/null

demo-data: install
	$(PY) -m seg_pipeline.data.synthetic --out $(DEMO_DIR) --seed 0
	$(PY) -m seg_pipeline.data.synthetic --out $(AUX_DIR) --seed 1 --class-scheme aux --prefix oem --rows 6 --cols 6

run: install $(DAGSTER_HOME)/dagster.yaml demo-data
	$(BIN)/dagster job execute -m seg_pipeline.definitions -j $(JOB) $(if $(wildcard $(RUN_CONFIG)),-c $(RUN_CONFIG)) \
		--tags '{"dagster/partition": "$(DATASET)"}'
	$(PY) -m seg_pipeline.cli --data-root data summary --dataset $(DATASET)

# One pytest worker per core; a module's tests stay on one worker, which builds its fixtures once;
# modules with slow tests first (seg_pipeline_tests/conftest.py).
test: install
	$(BIN)/pytest -n auto --dist loadfile --no-loadscope-reorder

# Lint, format check, type check (mypy) and the layer contracts (import-linter): what .ci/run runs.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check $(PY_DIRS)
	$(BIN)/mypy
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff check --fix . && $(BIN)/ruff format $(PY_DIRS)

ui: install $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

# The MLflow UI over the local store, on loopback: the links on the Dagster asset pages point here
# (MlflowResource.mlflow_ui_url, default http://127.0.0.1:5000).
mlflow-ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/data/mlflow/mlflow.db \
		--default-artifact-root $(CURDIR)/data/mlflow/artifacts -h 127.0.0.1 -p 5000

# The README's Dagster screenshots, taken from the demo instance `make run` wrote (needs Chromium).
screenshots: install
	$(PY) docs/take_screenshots.py

bench: install
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done

# The packages a lent GPU machine lacks, as CPython 3.12 wheels in .whl/ for bench/gpu_checks.sh.
gpu-wheels: install
	rm -rf .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl -r bench/gpu_requirements.txt
	du -sh .whl

clean-demo:
	rm -rf data/raw/demo data/raw/demo_aux data/processed/* data/models/* data/predictions/* data/reports/* data/exports/* data/mlflow/* .dagster
