#!/usr/bin/env bash
# Compile-check the CUDA side without a GPU (and without a CUDA build of torch):
#   * every csrc/cuda/*.cu with nvcc -c for sm_90a and sm_80 (the kernels are
#     torch-free, ~2 s each);
#   * csrc/cuda/register_cuda.cpp with g++ -fsyntax-only against torch's headers
#     and the CUDA include dir (the launcher is host C++).
#   * a SASS gate on the sm_90a objects (cuobjdump -sass): every fast-path
#     kernel (table SASS_RULES below) must show its required instructions
#     (LDG.E.128: 16-byte loads; HMMA for tensor-core kernels; LDGSTS.128 +
#     DEPBAR: 16-byte cp.async stages) and no local
#     memory (LDL/STL: spills or run-time-indexed arrays) and no CALL (the
#     64-bit integer divide and other slow-path routines are calls).
#     cuobjdump -sass needs nvdisasm (looked up in cuobjdump's own dir, then
#     the PATH). Each tool comes from $CUOBJDUMP / $NVDISASM, $CUDA_HOME/bin,
#     the PATH, or the pip package nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm
#     of nvcc's CUDA major version (installed on demand unless
#     MOS_SASS_INSTALL=0; into $MOS_SASS_PIP_TARGET with pip --target when
#     that is set, else into $PYTHON's environment); nvdisasm's dir is put
#     first on cuobjdump's PATH. Without either tool the gate fails with a
#     message naming it and saying how to get it.
# Prints one line per check; exits non-zero if any fails or warns (warnings are
# shown and counted as failures). Exits 0 with a notice when nvcc is absent.
#
# Environment: CUDA_HOME (default /usr/local/cuda-13.0 if present, else from
# the nvcc on PATH), NVCC, CXX (default g++), PYTHON (default python),
# MOS_CHECK_ARCHS (default "90a 80"), MOS_CHECK_JOBS (default: nproc),
# CUOBJDUMP, NVDISASM, MOS_SASS_INSTALL (default 1), MOS_SASS_PIP_TARGET,
# MOS_SASS_GATE (default 1; 0 skips it).
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

CUDA_VERSION="$("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')"
echo "check_cuda: $NVCC ($CUDA_VERSION), $CXX, jobs=$JOBS"

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

# ---- SASS gate -------------------------------------------------------------------
# kernel-name regex | required mnemonics (space-separated regexes) | forbidden
SASS_RULES='
sgmv_fast_kernel|LDG\.E\.128|LDL STL CALL
sgmv_prefill_kernel|HMMA\.16816\.F32\.BF16 LDGSTS\.E\.BYPASS\.128 LDGDEPBAR DEPBAR LDG\.E\.128|LDL STL CALL
shard_grad_tc_kernelI13__nv_bfloat16Lb0|HMMA\.16816\.F32\.BF16 LDG\.E\.128 REDG\.E\.ADD\.F32x4|LDL STL CALL
shard_grad_tc_kernelI13__nv_bfloat16Lb1|HMMA\.16816\.F32\.BF16 LDG\.E\.128 STG\.E\.128|LDL STL CALL
shard_grad_tc_kernelI6__halfLb0|HMMA\.16816\.F32\.BF16 LDG\.E\.128 REDG\.E\.ADD\.F32x4|LDL STL CALL
shard_grad_tc_kernelI6__halfLb1|HMMA\.16816\.F32\.BF16 LDG\.E\.128 STG\.E\.128|LDL STL CALL
shard_grad_det_reduce_kernel||LDL STL CALL
fast_items_kernel||LDL STL CALL
'

tool_var() { printf '%s' "$1" | tr a-z A-Z; }  # the environment variable naming a tool: cuobjdump -> CUOBJDUMP

find_tool() {  # name (cuobjdump | nvdisasm); prints its path or nothing
  local name="$1" var
  var="$(tool_var "$1")"
  if [ -n "${!var:-}" ] && [ -x "${!var}" ]; then echo "${!var}"; return 0; fi
  if [ -x "${CUDA_HOME:-/nonexistent}/bin/$name" ]; then echo "$CUDA_HOME/bin/$name"; return 0; fi
  if command -v "$name" >/dev/null 2>&1; then command -v "$name"; return 0; fi
  # pip's nvidia-cuda-<tool> wheels: nvidia/cu13/bin/<tool> (older: nvidia/cuda_<tool>/bin/<tool>),
  # in $MOS_SASS_PIP_TARGET or on $PYTHON's sys.path
  "$PYTHON" - "$name" "${MOS_SASS_PIP_TARGET:-}" <<'PY' 2>/dev/null
import glob, os, sys
name, target = sys.argv[1], sys.argv[2]
for d in ([target] if target else []) + sys.path:
    for c in sorted(glob.glob(os.path.join(d or '.', 'nvidia', '*', 'bin', name))):
        if os.access(c, os.X_OK):
            print(c)
            sys.exit(0)
sys.exit(1)
PY
}

no_tool() {  # name
  local up; up="$(tool_var "$1")"
  echo "FAIL  SASS gate: no $1 (cuobjdump -sass needs both cuobjdump and nvdisasm). Looked at \$$up, $CUDA_HOME/bin, the PATH and nvidia/*/bin in ${MOS_SASS_PIP_TARGET:+$MOS_SASS_PIP_TARGET and }$PYTHON's sys.path. Install the CUDA toolkit's $1, set $up, or pip install nvidia-cuda-$1==${cuda_major:-13}.* (this script does that unless MOS_SASS_INSTALL=0); MOS_SASS_GATE=0 skips the gate."
  fail=1
}

if [ "${MOS_SASS_GATE:-1}" != 0 ] && [[ " $ARCHS " == *" 90a "* ]]; then
  CUOBJ="$(find_tool cuobjdump)"
  DISASM="$(find_tool nvdisasm)"
  cuda_major="${CUDA_VERSION%%.*}"
  missing=()  # tool names
  [ -z "$CUOBJ" ] && missing+=(cuobjdump)
  [ -z "$DISASM" ] && missing+=(nvdisasm)
  if [ ${#missing[@]} -gt 0 ] && [ "${MOS_SASS_INSTALL:-1}" != 0 ]; then
    pkgs=()
    for t in "${missing[@]}"; do pkgs+=("nvidia-cuda-$t==${cuda_major:-13}.*"); done
    pip_args=(-q)
    [ -n "${MOS_SASS_PIP_TARGET:-}" ] && pip_args+=(--target "$MOS_SASS_PIP_TARGET")
    echo "check_cuda: ${missing[*]} not found; pip install${MOS_SASS_PIP_TARGET:+ --target $MOS_SASS_PIP_TARGET} ${pkgs[*]}"
    if ! "$PYTHON" -m pip install "${pip_args[@]}" "${pkgs[@]}" >"$TMP/pip.log" 2>&1; then
      echo "check_cuda: pip install ${pkgs[*]} failed:"
      sed 's/^/      /' "$TMP/pip.log"
    fi
    [ -z "$CUOBJ" ] && CUOBJ="$(find_tool cuobjdump)"
    [ -z "$DISASM" ] && DISASM="$(find_tool nvdisasm)"
  fi
  [ -z "$CUOBJ" ] && no_tool cuobjdump
  [ -z "$DISASM" ] && no_tool nvdisasm
  if [ -n "$CUOBJ" ] && [ -n "$DISASM" ]; then
    echo "check_cuda: $CUOBJ -sass with $DISASM"
    for o in "$TMP"/*.sm_90a.o; do
      PATH="$(dirname "$DISASM"):$PATH" "$CUOBJ" -sass "$o" >"$o.sass" 2>"$o.sass.err" || { echo "FAIL  cuobjdump -sass $(basename "$o")"; sed 's/^/      /' "$o.sass.err"; fail=1; }
    done
    if ! "$PYTHON" - "$TMP" "$SASS_RULES" <<'PY'
import glob, os, re, sys
tmp, rules_txt = sys.argv[1], sys.argv[2]
rules = []
for line in rules_txt.strip().splitlines():
    name, req, forb = line.split('|')
    rules.append((re.compile(name), req.split(), forb.split()))
funcs = {}  # mangled name -> list of instruction mnemonics
for path in sorted(glob.glob(os.path.join(tmp, '*.sm_90a.o.sass'))):
    cur = None
    for ln in open(path):
        m = re.match(r'\s*Function : (\S+)', ln)
        if m:
            cur = m.group(1)
            funcs[cur] = []
            continue
        m = re.match(r'\s*/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)', ln)
        if m and cur:
            funcs[cur].append(m.group(2))
bad = 0
for rx, req, forb in rules:
    hits = [f for f in funcs if rx.search(f)]
    if not hits:
        print(f"FAIL  SASS gate: no kernel matches /{rx.pattern}/"); bad = 1; continue
    for f in hits:
        ins = funcs[f]
        miss = [r for r in req if not any(re.match(r, i) for i in ins)]
        found = sorted({i for i in ins for x in forb if re.match(x + r'(\.|$)', i)})
        n128 = sum(1 for i in ins if i.startswith('LDG.E.128'))
        if miss or found:
            print(f"FAIL  SASS {f[:90]}: missing {miss} forbidden {found}"); bad = 1
        else:
            nh = sum(1 for i in ins if i.startswith('HMMA'))
            na = sum(1 for i in ins if i.startswith('LDGSTS'))
            print(f"ok    SASS {f[:90]} ({len(ins)} instr, {n128} LDG.E.128, {na} LDGSTS, {nh} HMMA)")
sys.exit(bad)
PY
    then
      fail=1
    fi
  fi
fi

if [ "$fail" -ne 0 ]; then
  echo "check_cuda: FAILED"
  exit 1
fi
echo "check_cuda: all CUDA sources compile cleanly"
