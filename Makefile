# The project's two commands: `make demo` (the demo hub) and `make test` (the whole suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

venv: $(STAMP)

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: venv
	@echo "The demo hub is not there yet: it lands with the spawner issue."
	@echo "Meanwhile try: $(BIN)/condaspawner profiles  and  $(BIN)/condaspawner validate profiles/envs/*.yml"

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
