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

.PHONY: install default-model serve serve-imagenet test test-precisions test-fast test-busy fuzz system-deps loadtest loadtest-overload loadtest-goodput loadtest-update loadtest-rollout bench bench-training report replicas oip-clients bench-oip bench-peers gpu-check clean

$(INSTALLED): pyproject.toml
	$(PYTHON_BIN) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(INSTALLED)

# Debian packages the tests drive for real: prometheus (the server and promtool), chromium
# (the UI tests) and haproxy (the replicas); installed only where missing.
system-deps:
	@missing=""; command -v promtool >/dev/null || missing="$$missing prometheus"; \
	  command -v chromium >/dev/null || missing="$$missing chromium"; \
	  command -v haproxy >/dev/null || missing="$$missing haproxy"; \
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

# torchvision's ImageNet AlexNet (downloaded once into torchvision's cache; offline, it says where to put
# the file): converted, registered as alexnet-imagenet, served. ATLAS=DIR: a channel atlas from your photos.
serve-imagenet: $(INSTALLED)
	@$(PY) -c "from model.store import has_model; raise SystemExit(0 if has_model('alexnet-imagenet:latest') else 1)" \
	  && echo "model store has alexnet-imagenet:latest" \
	  || $(PY) -m training imagenet $(if $(ATLAS),--atlas $(ATLAS))
	MODEL_TAG=alexnet-imagenet:latest $(VENV)/bin/bentoml serve . --host $(HOST) --port $(PORT)

test: $(INSTALLED) system-deps
	$(PY) -m pytest

# PRECISION=auto picks bf16 or fp32 per machine; the tests that compare numbers across endpoints,
# processes and layouts, in each precision either machine kind may pick (`make test` runs all in auto).
test-precisions: $(INSTALLED) system-deps
	for precision in fp32 bf16; do PRECISION=$$precision $(PY) -m pytest tests/test_service.py \
	  tests/test_explain.py tests/test_clients.py tests/test_layout.py || exit 1; done

# tests/unit: no server, no training run (well under a minute on 2 cores); the rest of tests/ starts real processes.
test-fast: $(INSTALLED)
	$(PY) -m pytest tests/unit

# The server and load tests beside one CPU hog per core, a memory-heavy and a compute-bound kind in turn
# (loadtests/hogs.py): tests of behaviour must pass on a busy machine.
test-busy: $(INSTALLED) system-deps
	$(PY) -m loadtests.hogs -- $(PY) -m pytest tests/test_service.py tests/test_reliability.py \
	  tests/test_loadtests.py tests/test_ops.py tests/test_ui.py tests/test_goodput.py

# The schemathesis run of `make test` with many more examples per operation (FUZZ_EXAMPLES).
fuzz: $(INSTALLED)
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-300} $(PY) -m pytest -s tests/test_reliability.py -k schemathesis

# Locust against a service this target starts (needs the default model); reports/ gets CSV + HTML.
loadtest: default-model
	$(PY) -m loadtests run --scenario smoke --duration $${DURATION:-60s}

# Both scenarios check their speed gates too (loadtests/slo.toml); make test checks behaviour only.
loadtest-overload: $(INSTALLED)
	$(PY) -m loadtests run --scenario overload --gates all

# Impolite clients (retrying at once, ignoring Retry-After): 32 x 8-image requests (five fresh servers),
# 128 single-image clients, /classify batches mixed with /explain occlusion, and a CPU hog in the middle;
# goodput >= 90% of the best polite load's, accepted p99 <= 1.5 x MAX_LATENCY_MS, only 200s and 503s
# (loadtests/goodput.py; about 10 minutes on 2 cores). reports/goodput.json.
loadtest-goodput: $(INSTALLED)
	$(PY) -m loadtests.goodput --scenarios storm --runs $${RUNS:-5}
	$(PY) -m loadtests.goodput --scenarios singles mix hog

# Model updates under Locust load (16 users): v1 -> v2 -> v1, a tampered v3 refused, ten moves in a row;
# no failure but 503 + Retry-After, and no more 503s around moves than the steady load gets; only v1/v2
# answer; memory within 10%; p99 during moves <= 2x steady (loadtests/update.py).
loadtest-update: $(INSTALLED)
	for preset in small alexnet; do for layout in single split; do \
	  $(PY) -m loadtests.update --preset $$preset --layout $$layout || exit 1; done; done

# Rollouts under Locust: a bad candidate rolled back by its shadow stage, a good one promoted through
# shadow and canary stages (loadtests/rollout.py has the gates); both layouts.
loadtest-rollout: $(INSTALLED)
	for layout in single split; do $(PY) -m loadtests.rollout --preset small --layout $$layout || exit 1; done

# Forward passes against torchvision's AlexNet (the limit), decode costs, the service's throughput and
# CPU per image, the null-model frontend (about 8 minutes on 2 cores); reports/bench.{json,png}.
bench: $(INSTALLED)
	$(PY) -m loadtests.bench

# How much one instance takes within the latency budget: a concurrency x images-per-request sweep
# (loadtests/report.py); writes reports/capacity/capacity.{csv,md} and two plots (about 3 minutes).
report: $(INSTALLED)
	$(PY) -m loadtests.report

# The trainer on real photos: the cifar preset's recipe against its 0.80 target (and, with REFERENCE=1, a
# plain recipe in the same 240 s), on a CIFAR-10 subset in ImageFolder layout (about 4 or 8 minutes).
CIFAR_DATA ?= ../shared/datasets/cifar10-jpg
bench-training: $(INSTALLED)
	$(PY) -m loadtests.training_bench --data $(CIFAR_DATA) --time-budget 240 $(if $(REFERENCE),--reference)

# Three replicas of the default model behind haproxy, scraped by Prometheus: throughput with 1, 2 and 3,
# a rolling replacement and a SIGKILL under Locust load, the dashboard's sums (about 4 minutes on 2
# cores); reports/replicas/.
replicas: default-model system-deps
	$(PY) -m loadtests.replicas --replicas $${REPLICAS:-3}

# KServe's Python client for the Open Inference Protocol tests, in an environment of its own: kserve pins
# psutil<6, which the project's psutil==7 excludes. (tritonclient[http] is a dev dependency.)
PEERS := $(VENV)/peers
$(PEERS)/kserve/.installed:
	$(PYTHON_BIN) -m venv $(PEERS)/kserve
	$(PEERS)/kserve/bin/pip install --quiet kserve==0.21.0
	touch $@

oip-clients: $(PEERS)/kserve/.installed

# Server CPU per image and images/s: multipart JPEG, OIP BYTES and OIP UINT8 (binary), 1/8/32 clients,
# 1 and 8 images per request, small and torchvision presets and the null model (about 5 minutes on
# 2 cores); reports/oip_bench.json. BENCH_ARGS narrows it, e.g. BENCH_ARGS="--models null".
bench-oip: $(INSTALLED)
	$(PY) -m loadtests.oip_bench $(BENCH_ARGS)

# Triton Inference Server itself as the peer, from PyPI's nvidia-pytriton in an environment of its own: it
# needs Python 3.12 with libpython3.12.so (its Python backend stub fails with 3.11) and numpy<2. Two peers
# (loadtests/triton_peer.py): the null model, and the torchvision preset's network (the very checkpoint the
# service serves beside it) exported to ONNX by the project's environment -- with the `onnx` package from
# a directory of its own, not a project dependency -- and run in fp32 by onnxruntime (the peer's
# environment only) inside pytriton's callable, with Triton's dynamic batcher. This service's rows: the
# torchvision preset with PRECISION=fp32 (the peer's dtype) and auto (bf16 where the CPU computes it).
# Where anything cannot be built or started, that peer is skipped with the reason. About 5 minutes on 2 cores.
PYTHON312 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12 \
                                    /usr/local/bin/python3.12))
$(PEERS)/triton/.installed:
	@test -n "$(PYTHON312)" || { echo "no Python 3.12 here: pytriton's Triton needs it"; exit 1; }
	$(PYTHON312) -m venv $(PEERS)/triton
	$(PEERS)/triton/bin/pip install --quiet nvidia-pytriton==0.7.0 'numpy<2'
	touch $@

$(PEERS)/triton/.onnxruntime: $(PEERS)/triton/.installed
	$(PEERS)/triton/bin/pip install --quiet onnxruntime==1.31.1 'numpy<2'
	touch $@

$(PEERS)/onnx-export/.installed: $(INSTALLED)
	$(PY) -m pip install --quiet --upgrade --no-deps --target $(PEERS)/onnx-export onnx==1.23.2 protobuf==7.36.2
	touch $@

bench-peers: $(INSTALLED)
	-$(MAKE) --no-print-directory $(PEERS)/triton/.onnxruntime $(PEERS)/onnx-export/.installed
	-PYTHONPATH=$(PEERS)/onnx-export $(PY) -m loadtests.triton_peer export
	$(PY) -m loadtests.oip_bench --models null torchvision --paths oip_uint8 --precisions fp32 auto \
	  --api-workers 0 1 --max-latency-ms 30000 --seconds 6 --peer triton $(BENCH_ARGS)

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
