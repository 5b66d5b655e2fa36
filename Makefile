# The two commands that matter: `make run` and `make test`. Everything else is a step of theirs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DATA   ?= .r3e-tee
PYTEST_ARGS ?=

.PHONY: run test lint typecheck bench install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

## run: start the service on embedded defaults (SQLite, simulation provider, development KEK)
run: install
	$(BIN)/r3e-tee-service --dev --data-dir $(DATA)

## test: lint, type-check and the whole suite (pytest exit 5, "no tests collected", is not a failure)
test: lint typecheck
	$(BIN)/pytest $(PYTEST_ARGS); rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

lint: install-dev
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: install-dev
	$(BIN)/mypy

## bench: performance against the anchors (dcap-qvl, raw ECDSA, bare ASGI); prints ratios
bench: install-dev
	$(BIN)/pytest bench -q -p no:cacheprovider --benchmark-disable-gc $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache
