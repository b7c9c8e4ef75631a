// CPU kernels compiled for the baseline instruction set of the build target.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels.h"

#define MOS_VEC_BYTES 16
#define MOS_RB 2
#define MOS_ISA_NAME "base"

namespace mos {
namespace cpu {
namespace isa_base {
#include "kernels_impl.h"
}  // namespace isa_base

const KernelTable& kernels_base() { return isa_base::make_table(); }

}  // namespace cpu
}  // namespace mos
