# Two commands do all the set-up on a fresh machine with Python 3.11 and make:
#   make serve   -- venv, install, train the default model if the store has none, serve on 127.0.0.1:3000
#   make test    -- venv, install, the whole test suite
SHELL := /bin/bash
PYTHON_BIN ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 3000
MODEL_OUT ?= runs/default

.PHONY: install default-model serve test test-fast system-deps clean

$(INSTALLED): pyproject.toml
	$(PYTHON_BIN) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(INSTALLED)

# Debian packages the tests drive for real (promtool); installed only where missing.
system-deps:
	@command -v promtool >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; \
	  else echo "promtool missing: install Debian's 'prometheus' package"; fi; }

# Train the small default model on the generated shapes dataset, unless the
# BentoML model store already has one.
default-model: $(INSTALLED)
	@$(PY) -c "from model.store import has_model; raise SystemExit(0 if has_model() else 1)" \
	  && echo "model store has cnn-classifier:latest" \
	  || $(PY) -m training --data shapes --preset small --out $(MODEL_OUT) --register

serve: default-model
	$(VENV)/bin/bentoml serve . --host $(HOST) --port $(PORT)

test: $(INSTALLED) system-deps
	$(PY) -m pytest

test-fast: $(INSTALLED)
	$(PY) -m pytest -m "not slow"

clean:
	rm -rf $(VENV) runs reports .pytest_cache
