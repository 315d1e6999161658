# make demo     set up (.venv, torch, the extension) and run the main job: sinusoid MAML
# make test     the same set-up, then the whole test suite
# make report   the paper's experiments measured, written to docs/RESULTS.md (about two hours here;
#               runs whose settings are unchanged are read back from runs/report-cache)
# make lint     ruff (lint and format check) over the Python, clang-format (check) over csrc/
# make format   apply ruff's safe fixes and format, and clang-format
# make cmake    the C++ library for libtorch users (with CUDA where the toolkit is found)
#
# Variables:
#   TORCH=torch==2.14.1   the torch to install into .venv (this machine's disk has the CUDA 13.0 build)
#   USE_ACTIVE_ENV=1      use the active Python environment (with its own torch) instead of .venv
#   OMNIGLOT_DIR=../shared/data/omniglot   the Omniglot archives (make report)
#   FORCE_CUDA=1          fail unless the CUDA kernels compile (CI); MAML_EXT_CPU_ONLY=1 skips them
SHELL := /bin/bash
TORCH ?= torch==2.14.1
VENV ?= .venv
MAX_JOBS ?= 2
export MAX_JOBS

ifeq ($(USE_ACTIVE_ENV),1)
PYTHON := python3
CLANG_FORMAT := clang-format
ENV_STAMP := .active-env-stamp
else
PYTHON := $(VENV)/bin/python
CLANG_FORMAT := $(VENV)/bin/clang-format
ENV_STAMP := $(VENV)/.deps-stamp
endif
# The extras of pyproject.toml a development environment gets (test pulls in experiments and rl).
DEV_EXTRAS := test lint

CUDA_HOME ?= $(shell python3 build_tools/cuda_home.py)
export CUDA_HOME
CXX_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h')
SOURCES := $(CXX_SOURCES) setup.py build_tools/cuda_home.py
BUILD_STAMP := build/.extension-stamp

OMNIGLOT_DIR ?= ../shared/data/omniglot

.PHONY: demo test build env lint format bench cmake clean report

demo: build
	$(PYTHON) -m maml_ext train sinusoid

test: build
	$(PYTHON) -m pytest -q python_tests

report: build
	$(PYTHON) -m maml_ext report --data-dir $(OMNIGLOT_DIR)

bench: build
	$(PYTHON) -m pytest -q bench --benchmark-only

env: $(ENV_STAMP)

# Everything but torch comes from pyproject.toml (build requirements, dependencies, DEV_EXTRAS).
$(VENV)/.deps-stamp: pyproject.toml build_tools/requirements.py
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python build_tools/requirements.py $(DEV_EXTRAS) > $(VENV)/requirements-dev.txt
	$(VENV)/bin/python -m pip install -q "$(TORCH)" -r $(VENV)/requirements-dev.txt
	touch $@

.active-env-stamp: pyproject.toml build_tools/requirements.py
	python3 -c "import torch" || { echo "USE_ACTIVE_ENV=1 needs torch in the active environment"; exit 1; }
	mkdir -p build
	python3 build_tools/requirements.py $(DEV_EXTRAS) > build/requirements-dev.txt
	python3 -m pip install -q -r build/requirements-dev.txt
	touch $@

# Every check runs, so one report lists all that is off; `make format` fixes what it can.
lint: $(ENV_STAMP)
	@status=0; \
	echo "ruff check"; $(PYTHON) -m ruff check . || status=1; \
	echo "ruff format --check"; $(PYTHON) -m ruff format --check . || status=1; \
	echo "clang-format --dry-run -Werror (csrc/)"; \
	$(CLANG_FORMAT) --dry-run -Werror $(CXX_SOURCES) || status=1; \
	exit $$status

# Safe fixes only (ruff's own term: behaviour unchanged), e.g. import order, `list[int]`.
format: $(ENV_STAMP)
	$(PYTHON) -m ruff check --fix --exit-zero .
	$(PYTHON) -m ruff format .
	$(CLANG_FORMAT) -i $(CXX_SOURCES)

# The extension is an ordinary pip install (editable, so the tests import the source tree);
# ninja keeps the objects under build/, so a rebuild compiles only what changed.
build: $(BUILD_STAMP)

$(BUILD_STAMP): $(ENV_STAMP) $(SOURCES)
	@mkdir -p build
	@echo "building maml_ext._C (log: build/pip-install.log)"
	@$(PYTHON) -m pip install -v --no-build-isolation --no-deps -e . > build/pip-install.log 2>&1 \
	  || { tail -n 60 build/pip-install.log; echo "maml_ext: build failed"; exit 1; }
	@grep -oE "maml_ext: (compiling CUDA|CPU-only).*" build/pip-install.log | sort -u || true
	@grep -oE "nvcc .* -c [^ ]+\.cu" build/pip-install.log | grep -oE "[^ /]+\.cu$$" | sed 's/^/  nvcc compiled /' || true
	$(PYTHON) -c "import maml_ext, json; print(json.dumps(maml_ext.extension_info()))"
	@touch $@

# The same sources as a plain shared library for libtorch users. CUDA as setup.py decides: where a
# toolkit is found (CUDA_HOME) and torch is a CUDA build, unless MAML_EXT_CPU_ONLY=1; FORCE_CUDA=1
# makes a CPU-only build an error. nvcc is named by its path in the toolkit (the one on the PATH
# may be a wrapper outside it, where CMake would look for the toolkit in the wrong place).
cmake: $(ENV_STAMP)
	@with_cuda=OFF; \
	if [ -n "$(CUDA_HOME)" ] && [ "$(MAML_EXT_CPU_ONLY)" != 1 ] \
	  && $(PYTHON) -c "import sys, torch; sys.exit(torch.version.cuda is None)"; then with_cuda=ON; fi; \
	if [ "$(FORCE_CUDA)" = 1 ] && [ $$with_cuda = OFF ]; then \
	  echo "maml_ext: FORCE_CUDA=1 but the CMake build would be CPU-only (MAML_EXT_CPU_ONLY=1, no CUDA toolkit, or a CPU-only torch)"; exit 1; fi; \
	mkdir -p cmake-build; set -x; \
	TORCH_CUDA_ARCH_LIST="$${TORCH_CUDA_ARCH_LIST:-9.0}" cmake -S . -B cmake-build -DCMAKE_BUILD_TYPE=Release \
	  -DWITH_CUDA=$$with_cuda \
	  $(if $(CUDA_HOME),-DCMAKE_CUDA_COMPILER=$(CUDA_HOME)/bin/nvcc -DCUDAToolkit_ROOT=$(CUDA_HOME) -DCUDA_TOOLKIT_ROOT_DIR=$(CUDA_HOME)) \
	  -DCMAKE_PREFIX_PATH="$$($(PYTHON) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" \
	  > cmake-build/configure.log 2>&1 || { cat cmake-build/configure.log; exit 1; }
	@grep "^-- maml_ext:" cmake-build/configure.log
	cmake --build cmake-build -j $(MAX_JOBS)
	$(PYTHON) build_tools/check_cmake_library.py cmake-build/libmaml_ext.so

clean:
	rm -rf build cmake-build maml_ext/*.so
