# make demo   set up (.venv, torch, the extension) and run the main job: sinusoid MAML
# make test   the same set-up, then the whole test suite
#
# Variables:
#   TORCH=torch==2.14.1   the torch to install into .venv (this machine's disk has the CUDA 13.0 build)
#   USE_ACTIVE_ENV=1      use the active Python environment (with its own torch) instead of .venv
#   FORCE_CUDA=1          fail unless the CUDA kernels compile (CI); MAML_EXT_CPU_ONLY=1 skips them
SHELL := /bin/bash
TORCH ?= torch==2.14.1
VENV ?= .venv
MAX_JOBS ?= 2
export MAX_JOBS

ifeq ($(USE_ACTIVE_ENV),1)
PYTHON := python3
ENV_STAMP := .active-env-stamp
else
PYTHON := $(VENV)/bin/python
ENV_STAMP := $(VENV)/.deps-stamp
endif

CUDA_HOME ?= $(shell python3 build_tools/cuda_home.py)
export CUDA_HOME
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h') setup.py build_tools/cuda_home.py
BUILD_STAMP := build/.extension-stamp

.PHONY: demo test build env bench cmake clean

demo: build
	$(PYTHON) -m maml_ext train sinusoid

test: build
	$(PYTHON) -m pytest -q python_tests

bench: build
	$(PYTHON) -m pytest -q bench --benchmark-only

env: $(ENV_STAMP)

$(VENV)/.deps-stamp: requirements-dev.txt
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q "$(TORCH)" -r requirements-dev.txt
	touch $@

.active-env-stamp: requirements-dev.txt
	python3 -c "import torch" || { echo "USE_ACTIVE_ENV=1 needs torch in the active environment"; exit 1; }
	python3 -m pip install -q -r requirements-dev.txt
	touch $@

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

# The same sources as a plain shared library for libtorch users (CPU; WITH_CUDA=ON for CUDA).
cmake: $(ENV_STAMP)
	TORCH_CUDA_ARCH_LIST="$${TORCH_CUDA_ARCH_LIST:-9.0}" cmake -S . -B cmake-build -DCMAKE_BUILD_TYPE=Release -DWITH_CUDA=OFF \
	  $(if $(CUDA_HOME),-DCUDA_TOOLKIT_ROOT_DIR=$(CUDA_HOME) -DCUDAToolkit_ROOT=$(CUDA_HOME)) \
	  -DCMAKE_PREFIX_PATH="$$($(PYTHON) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"
	cmake --build cmake-build -j $(MAX_JOBS)
	$(PYTHON) -c "import torch; torch.ops.load_library('cmake-build/libmaml_ext.so'); \
	  loss = torch.ops.maml_ext.softmax_cross_entropy(torch.zeros(3, 4), torch.tensor([0, 1, 2]), None)[0]; \
	  assert torch.allclose(loss, torch.full((3,), 1.3862943611)), loss; print('cmake library loads and runs')"

clean:
	rm -rf build cmake-build maml_ext/*.so
