# The project's two commands: `make demo` (the demo hub) and `make test` (the whole suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Every dependency of the tests, pinned with hashes (Linux, CPython 3.11); `make lock`
# rewrites it from pyproject.toml's ranges.
LOCK := requirements/test.lock

.PHONY: test lint demo venv lock clean

$(STAMP): $(LOCK) pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

venv: $(STAMP)

lock: venv
	$(BIN)/uv pip compile pyproject.toml --extra test --extra dev --upgrade --generate-hashes \
		--python-version 3.11 --python-platform x86_64-unknown-linux-gnu --system-certs --quiet -o $(LOCK)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest --durations=20 $(PYTEST_ARGS)

demo: venv
	$(BIN)/python -m condaspawner_bench demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .mypy_cache .ruff_cache *.egg-info
