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

# The PostgreSQL tests use DEFECTSCAN_TEST_POSTGRES_URL, else a throwaway cluster that tests/conftest.py
# starts with .ci/postgres when PostgreSQL's server binaries are installed (else it says how to get them).
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-large: $(STAMP)
	$(BIN)/python -m pytest --run-large -m large $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m defectscan.demo

bench: $(STAMP)
	for bench in benchmarks/bench_accuracy.py benchmarks/bench_ingest.py benchmarks/bench_model.py benchmarks/bench_queries.py benchmarks/bench_report.py; do \
		$(BIN)/python $$bench || exit 1; done
	for mode in throughput scaling million; do $(BIN)/python benchmarks/bench_pipeline.py $$mode || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache benchmarks/results var
