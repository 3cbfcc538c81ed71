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

.PHONY: install default-model serve test test-fast test-busy fuzz system-deps loadtest loadtest-overload bench gpu-check clean

$(INSTALLED): pyproject.toml
	$(PYTHON_BIN) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(INSTALLED)

# Debian packages the tests drive for real: prometheus (the server and promtool) and
# chromium (the UI tests); installed only where missing.
system-deps:
	@missing=""; command -v promtool >/dev/null || missing="$$missing prometheus"; \
	  command -v chromium >/dev/null || missing="$$missing chromium"; \
	  if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	    else echo "missing Debian packages:$$missing (the tests that need them are skipped)"; fi; fi

# Train the small default model on the generated shapes dataset, build its channel atlas from the
# same data, and register both -- unless the BentoML model store already has a model.
default-model: $(INSTALLED)
	@$(PY) -c "from model.store import has_model; raise SystemExit(0 if has_model() else 1)" \
	  && echo "model store has cnn-classifier:latest" \
	  || { $(PY) -m training --data shapes --preset small --out $(MODEL_OUT) \
	       && $(PY) -m training atlas $(MODEL_OUT) --data shapes \
	       && $(PY) -m training register $(MODEL_OUT); }

serve: default-model
	$(VENV)/bin/bentoml serve . --host $(HOST) --port $(PORT)

test: $(INSTALLED) system-deps
	$(PY) -m pytest

test-fast: $(INSTALLED)
	$(PY) -m pytest -m "not slow"

# The server and load tests beside one CPU hog per core: tests of behaviour must pass on a busy machine.
test-busy: $(INSTALLED) system-deps
	$(PY) -m loadtests.hogs -- $(PY) -m pytest tests/test_service.py tests/test_reliability.py \
	  tests/test_loadtests.py tests/test_ops.py tests/test_ui.py

# The schemathesis run of `make test` with many more examples per operation (FUZZ_EXAMPLES).
fuzz: $(INSTALLED)
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-300} $(PY) -m pytest -s tests/test_reliability.py -k schemathesis

# Locust against a service this target starts (needs the default model); reports/ gets CSV + HTML.
loadtest: default-model
	$(PY) -m loadtests run --scenario smoke --duration $${DURATION:-60s}

# Both scenarios check their speed gates too (loadtests/slo.toml); make test checks behaviour only.
loadtest-overload: $(INSTALLED)
	$(PY) -m loadtests run --scenario overload --gates all

# Forward passes against torchvision's AlexNet (the limit), decode costs, the service's throughput and
# CPU per image, the null-model frontend (about 8 minutes on 2 cores); reports/bench.{json,png}.
bench: $(INSTALLED)
	$(PY) -m loadtests.bench

# On a CUDA machine: the GPU tests, then the benchmark, then a short report (reports/gpu-check.txt).
gpu-check: $(INSTALLED)
	@$(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: no CUDA device here')"
	@mkdir -p reports
	set -o pipefail; $(PY) -m pytest -m gpu -v -rs 2>&1 | tee reports/gpu-tests.txt
	set -o pipefail; $(PY) -m loadtests.bench 2>&1 | tee reports/gpu-bench.txt
	@{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
	   grep -E "passed|failed|skipped" reports/gpu-tests.txt | tail -1; \
	   sed -n '/^preset /,$$p' reports/gpu-bench.txt; } | tee reports/gpu-check.txt

clean:
	rm -rf $(VENV) runs reports .pytest_cache
