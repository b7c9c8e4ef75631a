// CPU kernels compiled for AVX2 (selected at run time when the CPU has it).
// Every outside header comes before the target pragma so that inline functions
// shared with other translation units keep the baseline instruction set.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)

#define MOS_VEC_BYTES 32
#define MOS_RB 2
#define MOS_HAVE_F16C 1
#define MOS_ISA_NAME "avx2"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace mos {
namespace cpu {
namespace isa_avx2 {
#include "kernels_impl.h"
}  // namespace isa_avx2

const KernelTable& kernels_avx2() { return isa_avx2::make_table(); }

}  // namespace cpu
}  // namespace mos

#pragma GCC pop_options

#endif
