#!/usr/bin/env bash
# The kernels' CUDA source on CPU fibers (moe_comm._C_simt) under AddressSanitizer: builds an ASan copy of the
# extension under OUT (default build/simt-asan) and runs every simt test of the kernel model and the emulator
# with it, so an out-of-bounds access by a kernel to a host tensor (inputs, outputs, scratch) stops the rank with
# the kernel's file:line. The model's "device memory" (mmapped files: the symmetric buffers) gets a poisoned
# guard after each allocation (tests/cuda_model/kernels.py DeviceMemory), so running past a buffer's end stops too.
# Not part of `make test` (about 6 minutes on 2 cores); run it after changing csrc/kernels.
#   usage: scripts/simt_asan.sh [OUT] [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-build/simt-asan}
shift || true
PY=${PY:-.venv/bin/python}
MOE_COMM_SIMT_SANITIZE=address "$PY" setup.py -q build_ext --build-lib "$OUT/lib" --build-temp "$OUT/tmp" >"$OUT.log" 2>&1 \
  || { tail -30 "$OUT.log"; exit 1; }
module=$(ls "$OUT"/lib/moe_comm/_C_simt*.so)
# libstdc++ after libasan: ASan's __cxa_throw interceptor needs the real one loaded (pybind11 errors are C++ throws).
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so.6)"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0} MOE_COMM_SIMT_MODULE="$module"
"$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_model.py tests/test_cuda_model_emulator.py tests/test_routing_plan.py -k simt "$@"
