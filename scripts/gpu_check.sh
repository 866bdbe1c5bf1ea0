#!/usr/bin/env bash
# One command for the GPU machine: build, GPU tests, sanitizers, CUDA bench; logs + summary under OUTDIR.
# Usage: scripts/gpu_check.sh OUTDIR      (python3 on PATH, no venv, no network; total <= GPU_CHECK_BUDGET_S,
# default 420 s: with a machine's start, twice that fits the 15 minutes of device time a task gets)
# Afterwards, on the development machine: python scripts/record_gpu_run.py OUTDIR "<device name>" writes the
# benchmarks/results JSON and prints a docs/gpu-log.md draft.
# Writes at most 10 files directly in OUTDIR: build.log tests.log junit.xml sanitizer.log bench.log
# bench_cuda.json (+ bench_cuda.png) bench_portable.json bench_portable_cpu4.json summary.json
set -u
OUT="${1:?usage: scripts/gpu_check.sh OUTDIR}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build, for scripts run by path too
PY="${PYTHON:-python3}"
export MOE_COMM_CUDA_ARCHS="${MOE_COMM_CUDA_ARCHS:-90}"
# The CPU-fiber build of the kernels (moe_comm._C_simt) is for machines without a GPU: skip its build time here.
export MOE_COMM_SKIP_SIMT="${MOE_COMM_SKIP_SIMT:-1}"
declare -A RC
START=$(date +%s)

BUDGET_S="${GPU_CHECK_BUDGET_S:-420}"

step() {  # step NAME LIMIT_S LOGFILE CMD...
  local name="$1" limit="$2" log="$3"; shift 3
  local t0=$(date +%s)
  local left=$(( BUDGET_S - (t0 - START) - 10 ))
  if (( left < 5 )); then
    echo "=== $name skipped: the ${BUDGET_S}s budget is spent ===" | tee -a "$log"; RC[$name]=124; return
  fi
  (( limit > left )) && limit=$left
  echo "=== $name ($(date -u +%H:%M:%S)) ===" | tee -a "$log"
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  RC[$name]=$?
  echo "=== $name rc=${RC[$name]} in $(( $(date +%s) - t0 ))s ===" | tee -a "$log"
}

step nvidia_smi 20 "$OUT/build.log" nvidia-smi
step build 240 "$OUT/build.log" "$PY" setup.py build_ext --inplace
step import 60 "$OUT/build.log" "$PY" -c "import moe_comm._C as C; print(C.compiled_architectures(), C.device_status()); from moe_comm.backends.registry import available_backends; print(available_backends())"
step pytest_kernels 150 "$OUT/tests.log" "$PY" -m pytest -q --junitxml="$OUT/junit.xml" tests/gpu/test_torch_backend_on_gpu.py tests/gpu/test_kernels.py tests/gpu/test_cuda_emulator.py tests/test_cuda_build.py
step pytest_conformance 200 "$OUT/tests.log" "$PY" -m pytest -q -x tests/gpu/test_cuda_conformance.py
step pytest_graphs 60 "$OUT/tests.log" "$PY" -m pytest -q tests/gpu/test_cuda_graphs.py
if command -v compute-sanitizer >/dev/null; then
  step memcheck 60 "$OUT/sanitizer.log" compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 3 "$PY" scripts/sanitizer_case.py
  step racecheck 60 "$OUT/sanitizer.log" compute-sanitizer --tool racecheck --report-api-errors no --error-exitcode 3 "$PY" scripts/sanitizer_case.py
else
  echo "compute-sanitizer not found" >>"$OUT/sanitizer.log"; RC[memcheck]=127; RC[racecheck]=127
fi
step bench 150 "$OUT/bench.log" "$PY" -m moe_comm.bench --suite cuda --json "$OUT/bench_cuda.json" --warmup 2 --iters 5
# The portable backend at the same shape for comparison, with what is left of the budget: 8 ranks on one GPU
# cannot share NCCL, so these are gloo ranks on the host's cores (the records name the transport).
step bench_portable 120 "$OUT/bench.log" "$PY" -m moe_comm.bench --nprocs 8 --hidden 7168 --fp8 --warmup 1 --iters 3 --json "$OUT/bench_portable.json"
# Issue 2's CPU target (4 gloo ranks, hidden 1024 bf16, each op <= 1.3x its raw all-to-all) on a host with
# cores to spare: the development VMs have 2 cores for 4 ranks, so there every op is CPU-bound.
step bench_portable_cpu4 60 "$OUT/bench.log" "$PY" -m moe_comm.bench --nprocs 4 --hidden 1024 --no-fp8 --warmup 3 --iters 20 --json "$OUT/bench_portable_cpu4.json"

"$PY" - "$OUT" "$(( $(date +%s) - START ))" <<PYEOF
import json, sys
out, secs = sys.argv[1], int(sys.argv[2])
rc = {$(for k in "${!RC[@]}"; do printf '"%s": %s, ' "$k" "${RC[$k]}"; done)}
json.dump({"steps_rc": rc, "all_ok": all(v == 0 for v in rc.values()), "total_s": secs}, open(f"{out}/summary.json", "w"), indent=2)
print(json.dumps(rc))
PYEOF
