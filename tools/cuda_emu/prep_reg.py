import re, sys
s = open(sys.argv[1]).read()
s = re.sub(r'#include <c10/cuda/[^>]*>\n', '', s)
s = s.replace('#include <torch/library.h>', '#include <torch/extension.h>')
s = re.sub(r'const c10::cuda::CUDAGuard guard\([^;]*\);', '', s)
s = s.replace('c10::cuda::getCurrentCUDAStream().stream()', 'nullptr')
s = s.replace('#include "../checks.h"', '#include "' + sys.argv[3] + '/csrc/checks.h"\n#define C10_CUDA_CHECK(e) do { cudaError_t e_ = (e); TORCH_CHECK(e_ == cudaSuccess, "CUDA error ", cudaGetErrorName(e_)); } while (0)')
m = re.search(r'TORCH_LIBRARY_IMPL\(mos, CUDA, m\) \{(.*?)\n\}', s, re.S)
body = m.group(1)
s = s[:m.start()] + s[m.end():]
defs = re.findall(r'm\.impl\("(\w+)", &(\w+)\);', body)


def py_args(fn):
    # keyword names of fn's parameters, optional ones (std::optional / OptMap) defaulting to None
    m = re.search(r'\b' + fn + r'\(([^)]*)\)\s*\{', s)
    out = []
    for p in m.group(1).split(','):
        p = p.strip()
        name = re.search(r'(\w+)$', p).group(1)
        opt = 'OptMap' in p or 'optional' in p
        out.append('py::arg("%s")%s' % (name, ' = py::none()' if opt else ''))
    return ', '.join(out)

s += '\nstd::string emu_selftest(const std::string& which);\n'
s += '\nPYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {\n' + ''.join('  m.def("%s", &mos::gpu::%s, %s);\n' % (d + (py_args(d[1]),)) for d in defs) + '  m.def("set_index_checks", &mos::set_index_checks);\n  m.def("last_sgmv_path", []() { return std::string(mos::gpu::last_sgmv_path()); });\n  m.def("selftest", &emu_selftest);\n}\n'
import os
if not os.path.exists(sys.argv[2]) or open(sys.argv[2]).read() != s:
    open(sys.argv[2], 'w').write(s)
