#!/usr/bin/env bash
# The GPU window, in one command (issue 11): on a machine with a GPU, CUDA torch and nvcc
# (e.g. one H200, torch 2.11+cu130, nvcc 13.0, Python 3.12, no internet), in <= 9 minutes:
#   1. versions, clocks, commit;
#   2. build in place with MOS_EXT_CUDA=1 (setup.py fails loudly without a CUDA toolchain)
#      and assert that the CUDA kernels of every op are really registered;
#   3. pytest tests/test_cuda.py (+ the host-side GPU tests);
#   3b. tests/test_multi_train.py's 16-tenant joint training on CUDA (== each tenant alone);
#   4. compute-sanitizer memcheck and racecheck on tools/gpu_paths.py (every kernel path once);
#   5. benchmarks/bench_cuda.py (ceilings, every case and baseline, targets);
#   6. benchmarks/bench_multi_train.py --device cuda --quick (joint vs one-by-one tenants).
# Nothing is installed: it uses the torch, pytest, ninja found on the machine. Every step has
# a time budget taken from a 9-minute total; a step that fails or times out is reported and the
# script moves on. Exit status: 0 when every step passed.
#
# Output: at most 8 files in $OUT (default ./gpu_check_out): summary.txt, env.txt, build.log,
# tests.log, sanitizer.log, bench.txt, bench.json, multi_train.json.
#
# Environment: OUT, PYTHON (default python), CUDA_HOME, MOS_EXT_CUDA_ARCHS (default 90a),
# GPU_CHECK_TOTAL_S (default 540), MAX_JOBS (default nproc).
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
OUT="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
TOTAL="${GPU_CHECK_TOTAL_S:-540}"
START=$(date +%s)
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export MOS_EXT_CUDA_ARCHS="${MOS_EXT_CUDA_ARCHS:-90a}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${CUDA_HOME:-}" ]; then
  for c in /usr/local/cuda-13.0 /usr/local/cuda; do [ -x "$c/bin/nvcc" ] && { export CUDA_HOME=$c; break; }; done
fi
[ -n "${CUDA_HOME:-}" ] && export PATH="$CUDA_HOME/bin:$PATH"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
status=0

left() { echo $(( TOTAL - ($(date +%s) - START) )); }
# step NAME BUDGET_S LOG CMD...: runs CMD with min(BUDGET, time left - reserve), appends to LOG
step() {
  local name="$1" budget="$2" log="$3"; shift 3
  local l; l=$(left)
  local b=$(( budget < l - 5 ? budget : l - 5 ))
  if [ "$b" -lt 10 ]; then
    printf '%-10s SKIPPED (no time left)\n' "$name" | tee -a "$SUMMARY"; status=1; return 1
  fi
  local t0; t0=$(date +%s)
  echo "==== $name (budget ${b}s): $*" >> "$log"
  timeout --signal=INT --kill-after=10 "$b" "$@" >> "$log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then
    printf '%-10s ok      %4ss\n' "$name" "$dt" | tee -a "$SUMMARY"
  else
    [ $rc -eq 124 ] && rc="timeout"
    printf '%-10s FAILED  %4ss (rc=%s, see %s)\n' "$name" "$dt" "$rc" "$(basename "$log")" | tee -a "$SUMMARY"
    status=1
  fi
  [ "$rc" = 0 ]
}

# 1. versions, clocks, commit --------------------------------------------------------------
{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | wc -l) changed files"
  echo "host: $(hostname) cpus: $(nproc)"
  "$PY" - <<'EOF'
import platform, torch
print("python:", platform.python_version(), "torch:", torch.__version__, "cuda:", torch.version.cuda,
      "cudnn:", torch.backends.cudnn.version())
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"gpu{i}: {p.name} cc {p.major}.{p.minor} {p.total_memory / 2**30:.1f} GiB {p.multi_processor_count} SMs "
              f"L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
else:
    print("gpu: none visible to torch")
EOF
  echo "nvcc: $( (nvcc --version || "$CUDA_HOME/bin/nvcc" --version) 2>/dev/null | tail -2 | tr '\n' ' ')"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.draw,power.limit,temperature.gpu,persistence_mode,mig.mode.current --format=csv 2>&1
  nvidia-smi -q -d CLOCK 2>/dev/null | sed -n '1,60p'
} > "$OUT/env.txt" 2>&1
head -8 "$OUT/env.txt" | tee -a "$SUMMARY"

# 2. build with the CUDA kernels, and prove they are registered ---------------------------
BUILD="$OUT/build.log"
if step build 300 "$BUILD" env MOS_EXT_CUDA=1 "$PY" setup.py build_ext --inplace; then
  step registered 60 "$BUILD" "$PY" - <<'EOF'
import torch, mos_ext
assert torch.cuda.is_available(), "torch sees no GPU"
assert mos_ext.cuda_built(), "mos_ext was built without its CUDA kernels"
missing = [op for op in ("gather_shards", "sgmv_shrink", "sgmv_expand", "sgmv", "shard_grad")
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"mos::{op}", "CUDA")]
assert not missing, f"no CUDA kernel registered for {missing}"
x = torch.randn(4, 16, device="cuda", dtype=torch.bfloat16)
v = mos_ext.sgmv_shrink(x, torch.randn(8, 8, device="cuda"), torch.zeros(1, 2, 2, dtype=torch.int32, device="cuda"),
                        torch.tensor([0, 4], dtype=torch.int32, device="cuda"), torch.zeros(1, dtype=torch.int32, device="cuda"))
torch.cuda.synchronize()
print("CUDA ops registered and running from", mos_ext.__file__)
EOF
else
  echo "build failed: the remaining steps need the CUDA build" | tee -a "$SUMMARY"
  tail -30 "$BUILD" >> "$SUMMARY"
  exit 1
fi

# 3. the CUDA tests ------------------------------------------------------------------------
TESTS=(tests/test_cuda.py tests/test_nonfinite.py tests/test_pool_grad_tap.py tests/test_cuda_host.py)
step tests 170 "$OUT/tests.log" "$PY" -m pytest -q -rfEs -p no:cacheprovider "${TESTS[@]}"
tail -4 "$OUT/tests.log" >> "$SUMMARY"

# 3b. many tenants trained in one batch on the GPU: 16 tenants, each equal to training it alone
step multitrain 90 "$OUT/tests.log" "$PY" -m pytest -q -rfEs -p no:cacheprovider tests/test_multi_train.py \
  -k "sixteen and cuda"
tail -2 "$OUT/tests.log" >> "$SUMMARY"

# 4. compute-sanitizer memcheck + racecheck ------------------------------------------------
SAN="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"
if [ -x "$SAN" ]; then
  # options this compute-sanitizer accepts (tried on a process without CUDA work)
  opt() { "$SAN" "$@" true >/dev/null 2>&1; }
  FILTER=(); opt --tool memcheck --kernel-name kns=mos && FILTER=(--kernel-name kns=mos)  # only our kernels
  API=(); opt --tool memcheck --report-api-errors no && API=(--report-api-errors no)
  HAZ=(); opt --tool racecheck --racecheck-report hazard && HAZ=(--racecheck-report hazard)
  echo "compute-sanitizer $("$SAN" --version 2>&1 | tail -1); filter: ${FILTER[*]:-none}" >> "$OUT/sanitizer.log"
  step memcheck 90 "$OUT/sanitizer.log" "$SAN" --tool memcheck --error-exitcode 9 "${API[@]}" \
    "${FILTER[@]}" "$PY" tools/gpu_paths.py
  step racecheck 90 "$OUT/sanitizer.log" "$SAN" --tool racecheck --error-exitcode 9 "${HAZ[@]}" \
    "${FILTER[@]}" "$PY" tools/gpu_paths.py
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|gpu_paths" "$OUT/sanitizer.log" | tail -6 >> "$SUMMARY"
else
  echo "sanitizer  SKIPPED: compute-sanitizer not found" | tee -a "$SUMMARY"; status=1
fi

# 5. benchmarks ----------------------------------------------------------------------------
B=$(( $(left) - 15 ))
step bench 240 "$OUT/bench.txt" "$PY" benchmarks/bench_cuda.py --json "$OUT/bench.json" --budget-s $(( B > 30 ? B - 20 : 10 ))
grep -E "^(target|ceiling)" "$OUT/bench.txt" >> "$SUMMARY"

# 6. joint multi-tenant training throughput (issue 22's benchmark, quick grid) --------------
step multibench 100 "$OUT/bench.txt" "$PY" benchmarks/bench_multi_train.py --device cuda --quick \
  --out "$OUT/multi_train.json"
tail -12 "$OUT/bench.txt" >> "$SUMMARY"

echo "total $(( $(date +%s) - START ))s, status $status" | tee -a "$SUMMARY"
ls "$OUT" >> "$SUMMARY"
exit $status
