# The project's two commands: `make demo` (the demo hub) and `make test` (the whole suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Every dependency of the tests, pinned with hashes (Linux, CPython 3.11); `make lock`
# rewrites it from pyproject.toml's ranges.
LOCK := requirements/test.lock

.PHONY: test lint demo venv lock clean

# uv installs the lock in about a third of pip's time (parallel downloads, no bytecode
# compilation up front). uv itself comes from the lock, pinned with its hashes, via pip.
# --no-deps: the lock is the whole set, less rfc3987-syntax (see `lock`).
$(STAMP): $(LOCK) pyproject.toml
	$(PYTHON) -m venv $(VENV)
	awk '/^uv==/ {p = 1} p {print} p && !/\\$$/ {exit}' $(LOCK) > $(VENV)/uv-requirement.txt
	$(BIN)/python -m pip install --quiet --require-hashes -r $(VENV)/uv-requirement.txt
	$(BIN)/uv pip install --quiet --python $(BIN)/python --system-certs --require-hashes --no-deps -r $(LOCK)
	$(BIN)/uv pip install --quiet --python $(BIN)/python --system-certs --no-deps --no-build-isolation -e .
	touch $@

venv: $(STAMP)

# rfc3987-syntax is left out: jsonschema's optional "iri" format checker, which compiles about
# 40 grammars whenever jupyter_events is imported (about 1 CPU-second of every hub's start,
# and the suite starts about 20 hubs); nothing the hub validates uses those formats. The
# base images leave it out of the single-user server for the same reason.
lock: venv
	$(BIN)/uv pip compile pyproject.toml --extra test --extra dev --upgrade --generate-hashes \
		--python-version 3.11 --python-platform x86_64-unknown-linux-gnu --system-certs --quiet \
		--no-emit-package rfc3987-syntax -o $(LOCK)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

# Three processes (pytest-xdist) on two cores: most tests wait on a docker build, a server's
# boot or the hub, so a third process keeps both cores busy. Each test module (and every
# test of a hub) stays in one process; PYTEST_WORKERS=0 runs the suite in one process.
PYTEST_WORKERS ?= 3
# --durations=20: the slowest tests; the bench's set-up phases are summed up at the end too.
test: lint
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadgroup --no-loadscope-reorder \
		--durations=20 $(PYTEST_ARGS)

demo: venv
	$(BIN)/python -m condaspawner_bench demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .mypy_cache .ruff_cache *.egg-info
