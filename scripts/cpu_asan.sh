#!/usr/bin/env bash
# The portable backend's CPU kernels (moe_comm._cpu, csrc/cpu/) under AddressSanitizer and UndefinedBehaviorSanitizer:
# builds a sanitizer copy of the extension under OUT (default build/cpu-asan) and runs tests/test_cpu_kernels.py
# with it (MOE_COMM_CPU_MODULE), the 3-rank dispatch/combine comparisons included, so a read or write past a
# tensor stops the test with the kernel's file:line. About half a minute on 2 cores; not part of `make test`.
#   usage: scripts/cpu_asan.sh [OUT] [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-build/cpu-asan}
shift || true
PY=${PY:-.venv/bin/python}
CXX=${CXX:-g++}
mkdir -p "$OUT"
module="$OUT/_cpu$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
"$CXX" -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined -std=c++17 -fPIC \
  -shared -ffp-contract=off -I"$("$PY" -c 'import pybind11; print(pybind11.get_include())')" \
  -I"$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" csrc/cpu/*.cpp -o "$module" -lpthread
# libstdc++ after libasan: ASan's __cxa_throw interceptor needs the real one loaded (pybind11 errors are C++ throws).
export LD_PRELOAD="$("$CXX" -print-file-name=libasan.so) $("$CXX" -print-file-name=libubsan.so) $("$CXX" -print-file-name=libstdc++.so.6)"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0} MOE_COMM_CPU_MODULE="$module"
"$PY" -c 'from moe_comm import cpu_kernels; ok, why = cpu_kernels.available(); assert ok, why; print("testing", cpu_kernels._module.__file__)'
"$PY" -m pytest -q -p no:cacheprovider tests/test_cpu_kernels.py "$@"
