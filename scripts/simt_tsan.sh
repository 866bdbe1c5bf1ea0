#!/usr/bin/env bash
# The kernels' CUDA source on CPU fibers (moe_comm._C_simt) under ThreadSanitizer: builds a TSan copy of the
# extension under OUT (default build/simt-tsan), in which every CUDA thread is a TSan fiber ordered only by what
# orders it on a GPU (launch start and end, __syncthreads, __syncwarp, atomics; csrc/simt/simt.cpp), and runs the
# simt tests of the kernel model and the emulator with it. A data race between two threads of a block (a missing
# barrier, a write-after-read hazard on shared memory) or between two blocks of a launch (plain accesses to the
# same global memory) stops the rank; the reports are printed from OUT/reports (docs/kernels.md).
# Not part of `make test` (14.5 minutes on 2 cores); run it after changing csrc/kernels.
#   usage: scripts/simt_tsan.sh [OUT] [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-build/simt-tsan}
shift || true
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
MOE_COMM_SIMT_SANITIZE=thread "$PY" setup.py -q build_ext --build-lib "$OUT/lib" --build-temp "$OUT/tmp" >"$OUT.log" 2>&1 \
  || { tail -30 "$OUT.log"; exit 1; }
module=$(ls "$OUT"/lib/moe_comm/_C_simt*.so)
rm -rf "$OUT/reports" && mkdir -p "$OUT/reports"
export LD_PRELOAD="$(gcc -print-file-name=libtsan.so)"
# One intra-op thread: torch's OpenMP pool hands work over in ways TSan does not see (false reports in copies).
export OMP_NUM_THREADS=1
export TSAN_OPTIONS=${TSAN_OPTIONS:-halt_on_error=1 report_signal_unsafe=0 suppressions=$PWD/scripts/simt_tsan.supp log_path=$PWD/$OUT/reports/tsan}
export MOE_COMM_SIMT_MODULE="$module"
status=0
"$PY" -m pytest -q -p no:cacheprovider tests/test_simt_tsan.py tests/test_cuda_model.py tests/test_cuda_model_emulator.py tests/test_routing_plan.py -k simt "$@" || status=$?
if compgen -G "$OUT/reports/tsan*" >/dev/null; then
  echo "=== ThreadSanitizer reports ($OUT/reports) ==="
  cat "$OUT"/reports/tsan* | head -200
  exit 1
fi
exit $status
