#!/usr/bin/env bash
# Compile-check the CUDA side without a GPU (and without a CUDA build of torch):
#   * every csrc/cuda/*.cu with nvcc -c for sm_90a and sm_80 (the kernels are
#     torch-free, ~2 s each);
#   * csrc/cuda/register_cuda.cpp with g++ -fsyntax-only against torch's headers
#     and the CUDA include dir (the launcher is host C++).
# Prints one line per check; exits non-zero if any fails or warns (warnings are
# shown and counted as failures). Exits 0 with a notice when nvcc is absent.
#
# Environment: CUDA_HOME (default /usr/local/cuda-13.0 if present, else from
# the nvcc on PATH), NVCC, CXX (default g++), PYTHON (default python),
# MOS_CHECK_ARCHS (default "90a 80"), MOS_CHECK_JOBS (default: nproc).
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1

if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda-13.0/bin/nvcc ]; then
    CUDA_HOME=/usr/local/cuda-13.0
  elif command -v nvcc >/dev/null 2>&1; then
    # The nvcc on PATH may be a wrapper script; ask it where its toolkit is.
    CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
  fi
fi
NVCC="${NVCC:-${CUDA_HOME:+$CUDA_HOME/bin/nvcc}}"
if [ -z "$NVCC" ] || [ ! -x "$NVCC" ]; then
  echo "check_cuda: nvcc not found (set CUDA_HOME or NVCC), skipping the CUDA compile checks"
  exit 0
fi
CXX="${CXX:-g++}"
PYTHON="${PYTHON:-python}"
ARCHS="${MOS_CHECK_ARCHS:-90a 80}"
JOBS="${MOS_CHECK_JOBS:-$(nproc 2>/dev/null || echo 2)}"

TMP="$(mktemp -d "${TMPDIR:-/tmp}/mos_check_cuda.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

# The nvcc flags of the real build: torch's COMMON_NVCC_FLAGS (no implicit
# half / bfloat16 conversions or operators), -fPIC, then setup.py's flags; the
# gencode list is per check.
NVCC_FLAGS=(-c -std=c++17 -O3 --expt-relaxed-constexpr -lineinfo
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__ -Xcompiler -fPIC -Xcompiler -Wall)

fail=0
report() {  # name, status, seconds, log
  local name="$1" st="$2" secs="$3" log="$4"
  if [ "$st" = ok ] && [ -s "$log" ]; then st="WARN"; fi
  printf '%-5s %-48s %5ss\n' "$st" "$name" "$secs"
  if [ "$st" != ok ]; then
    sed 's/^/      /' "$log"
    fail=1
  fi
}

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

shopt -s nullglob
cu_files=(csrc/cuda/*.cu)
if [ ${#cu_files[@]} -eq 0 ]; then
  echo "check_cuda: no csrc/cuda/*.cu files"
  fail=1
fi

echo "check_cuda: $NVCC ($("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')), $CXX, jobs=$JOBS"

# Each check runs in the background (at most $JOBS at a time) and leaves
# $TMP/<name>.log, .rc and .secs; results are reported in a fixed order.
names=()
run_check() {  # name, command...
  local name="$1"; shift
  names+=("$name")
  local key; key="$(printf '%s' "$name" | tr -c 'A-Za-z0-9_.' '_')"
  (
    t0="$(now)"
    "$@" >"$TMP/$key.log" 2>&1
    echo $? >"$TMP/$key.rc"
    elapsed "$t0" >"$TMP/$key.secs"
  ) &
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 0.05; done
}

for f in "${cu_files[@]}"; do
  base="$(basename "$f" .cu)"
  for a in $ARCHS; do
    run_check "$f [sm_$a]" "$NVCC" "${NVCC_FLAGS[@]}" -gencode "arch=compute_$a,code=sm_$a" "$f" \
      -o "$TMP/$base.sm_$a.o"
  done
done

# The launcher: host C++ against torch (the CPU wheel's headers suffice) and
# the CUDA runtime headers. Third-party headers are -isystem (their own
# warnings are not ours).
launcher=csrc/cuda/register_cuda.cpp
if [ -f "$launcher" ]; then
  if incs="$("$PYTHON" -c 'import torch.utils.cpp_extension as c; print("\n".join(c.include_paths()))')"; then
    inc_flags=()
    while IFS= read -r d; do [ -n "$d" ] && inc_flags+=(-isystem "$d"); done <<<"$incs"
    run_check "$launcher [$CXX -fsyntax-only]" "$CXX" -std=c++17 -fsyntax-only -Wall -Wextra \
      -DMOS_WITH_CUDA -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE "${inc_flags[@]}" -isystem "$CUDA_HOME/include" "$launcher"
  else
    echo "FAIL  $launcher: cannot get torch's include paths from $PYTHON"
    fail=1
  fi
fi
wait

for name in "${names[@]}"; do
  key="$(printf '%s' "$name" | tr -c 'A-Za-z0-9_.' '_')"
  rc="$(cat "$TMP/$key.rc" 2>/dev/null || echo 1)"
  secs="$(cat "$TMP/$key.secs" 2>/dev/null || echo '?')"
  if [ "$rc" = 0 ]; then st=ok; else st=FAIL; fi
  report "$name" "$st" "$secs" "$TMP/$key.log"
done

if [ "$fail" -ne 0 ]; then
  echo "check_cuda: FAILED"
  exit 1
fi
echo "check_cuda: all CUDA sources compile cleanly"
