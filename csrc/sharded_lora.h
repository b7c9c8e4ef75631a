// sharded_lora's host-side extras (csrc/sharded_lora.cpp).
#pragma once

#include <ATen/core/Tensor.h>

namespace mos {

// Identity on `pool` for one forward pass whose sharded_lora and sgmv_shrink consumers then
// accumulate their pool gradients into one buffer per backward pass, handed to
// autograd once (see sharded_lora.cpp). Differentiable; not a dispatcher op
// (eager autograd only).
at::Tensor pool_grad_tap(const at::Tensor& pool);

}  // namespace mos
