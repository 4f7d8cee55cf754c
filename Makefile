# Thin entry points; the logic lives in the defectscan package and its tests.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-large demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# PostgreSQL tests run when DEFECTSCAN_TEST_POSTGRES_URL is set: export DEFECTSCAN_TEST_POSTGRES_URL=$$(.ci/postgres)
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-large: $(STAMP)
	$(BIN)/python -m pytest --run-large -m large $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m defectscan.demo

bench: $(STAMP)
	for bench in benchmarks/bench_*.py; do $(BIN)/python $$bench || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache benchmarks/results var
