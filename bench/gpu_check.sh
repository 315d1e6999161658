#!/usr/bin/env bash
# The GPU check, one command, for a machine with an NVIDIA GPU (CI never has one):
#   bash bench/gpu_check.sh
# 1. builds maml_ext._C from this working tree with the machine's own python3 and torch (no
#    package downloads; objects under build/temp-gpu), CUDA kernels for TORCH_CUDA_ARCH_LIST
#    (default 9.0, the H200);
# 2. runs the CUDA tests (fused vs reference on the GPU, float64 and float32, fresh random
#    inputs) and the CPU fused tests as a sanity check of the build;
# 3. prints the benchmark table (bench/table.py --device cuda): every implementation, median ms
#    per meta-step, the fused speed-up over the fastest other one, and peak memory.
# Everything is logged to $OUT/gpu_check.log (or build/gpu_check/ where OUT is unset); the short
# table comes last. Each stage has its own time limit so the whole run stays under 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-build/gpu_check}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
PYTHON="${PYTHON:-python3}"
status=0

stage() { echo; echo "=== $* ($(date +%H:%M:%S))"; }

stage "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || status=1
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" || exit 1

stage "build (FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0})"
export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
export MAML_EXT_BUILD_TEMP="$PWD/build/temp-gpu"
timeout 300 "$PYTHON" setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
  || { tail -n 40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; }
grep -E "^maml_ext:" "$OUT/build.log"
"$PYTHON" -c "import maml_ext, json; info = maml_ext.extension_info(); print(json.dumps(info)); assert info['cuda_kernels_compiled'] and info['cuda_available']" || exit 1

stage "CUDA tests"
timeout 180 "$PYTHON" -m pytest -q -p no:cacheprovider python_tests/test_fused.py -k "cuda" -rs \
  --junitxml="$OUT/cuda_tests.xml" || status=1

stage "CPU fused tests (the same build)"
timeout 120 "$PYTHON" -m pytest -q -p no:cacheprovider python_tests/test_fused.py -k "not cuda" -x || status=1

stage "benchmark table (CUDA)"
timeout 240 "$PYTHON" bench/table.py --device cuda --repeats 10 --json "$OUT/table.json" \
  | tee "$OUT/table.md" || status=1

stage "done: status $status"
exit $status
