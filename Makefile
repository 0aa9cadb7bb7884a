# Two entry points for a fresh machine: `make serve` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU wheel by default; on a CUDA machine use e.g. `make serve TORCH_SPEC=torch` (or the Docker image).
TORCH_SPEC ?= torch==2.13.0
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: install serve test lint bench clean

$(BIN)/jetmoe-serve: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[test,ray]"
	touch $@

install: $(BIN)/jetmoe-serve

serve: install
	$(BIN)/jetmoe-serve $(ARGS)

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check server model tests benchmarks scripts tools
	$(BIN)/mypy server model --ignore-missing-imports

bench: install
	$(BIN)/python -m benchmarks.bench_model

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
