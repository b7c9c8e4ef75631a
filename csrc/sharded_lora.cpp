// sharded_lora: the differentiable entry point (MOS.md §3), device-generic.
//
// Forward (CompositeExplicitAutograd): v = sgmv_shrink(x), delta = sgmv_expand(0, v).
// Backward (Autograd key), with w = sgmv_shrink(d_delta, pool_b) = d_delta @ B_t:
//   dx      = sgmv_expand(0, w, pool_a, scale) [+ sgmv_expand(., dv, pool_a, 1)]
//   d pool_a = shard_grad(0, w, x, idx_a, scale) [+ shard_grad(., dv, x, idx_a, 1)]
//   d pool_b = shard_grad(0, v, d_delta, idx_b, scale)
// The pool gradients come from the fused accumulation, in the accumulation
// dtype, then cast to the pool dtype. Deterministic (fixed-order) accumulation
// when mos_ext.set_deterministic_grads(True) was in effect at forward time, or
// when deterministic grads or torch.use_deterministic_algorithms are on at
// backward time.
//
// One accumulator per pool per backward pass (pool_grad_tap): a pool shared by
// L layers would otherwise cost L pool-sized zero tensors, L casts and L-1
// pool-sized adds per step inside autograd's input buffer. A "tap" is an
// identity node put between the pool parameter and its consumers once per
// forward pass. A sharded_lora node whose pool input comes straight out of a
// tap accumulates its pool gradient (shard_grad) into the tap's fp32 buffer,
// created by the first such node, and returns no gradient for that input; the
// tap runs after all its consumers (autograd's dependency order), adds any
// ordinary gradients it received, casts once to the pool dtype and hands the
// buffer to the pool's AccumulateGrad as one ordinary gradient (so .grad,
// gradient hooks, DDP buckets and FSDP2 reduce-scatter see nothing unusual).
// A node whose saved pool is not the tap's output (activation checkpointing
// recomputes, a cast in between) returns its gradient as usual. Everything goes through the dispatcher,
// so the same code serves CPU, CUDA and tracing (torch.compile / AOTAutograd);
// the fake kernel is in mos_ext/ops.py. Written in C++ because the Python
// autograd registration cost ~240 us per layer, more than the kernels at small
// sizes.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "checks.h"
#include "sharded_lora.h"

namespace mos {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_shrink(const at::Tensor& x, const at::Tensor& pool, const at::Tensor& idx,
                       const at::Tensor& ip, const at::Tensor& tn) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mos::sgmv_shrink", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&)>();
  return op.call(x, pool, idx, ip, tn);
}

void call_expand(const at::Tensor& y, const at::Tensor& v, const at::Tensor& pool, const at::Tensor& idx,
                 const at::Tensor& scale, const at::Tensor& ip, const at::Tensor& tn) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mos::sgmv_expand", "")
                       .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  op.call(y, v, pool, idx, scale, ip, tn);
}

void call_shard_grad(const at::Tensor& g, const at::Tensor& u, const at::Tensor& x, const at::Tensor& idx,
                     const at::Tensor& scale, const at::Tensor& ip, const at::Tensor& tn, bool deterministic) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mos::shard_grad", "")
                       .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>();
  op.call(g, u, x, idx, scale, ip, tn, deterministic);
}

std::tuple<at::Tensor, at::Tensor> call_sharded_lora(const at::Tensor& x, const at::Tensor& pool_a,
                                                     const at::Tensor& pool_b, const at::Tensor& idx_a,
                                                     const at::Tensor& idx_b, const at::Tensor& scale,
                                                     const at::Tensor& ip, const at::Tensor& tn) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mos::sharded_lora", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(x, pool_a, pool_b, idx_a, idx_b, scale, ip, tn);
}

void check_tables_agree(const at::Tensor& idx_a, const at::Tensor& idx_b) {
  TORCH_CHECK_VALUE(idx_a.dim() == 3 && idx_b.dim() == 3 && idx_a.size(0) == idx_b.size(0) &&
                        idx_a.size(1) == idx_b.size(1),
                    "idx_a and idx_b must be [T, r, l_a] and [T, r, l_b] with the same T and r, got shapes ",
                    idx_a.sizes(), " and ", idx_b.sizes());
}

std::tuple<at::Tensor, at::Tensor> sharded_lora_composite(const at::Tensor& x, const at::Tensor& pool_a,
                                                          const at::Tensor& pool_b, const at::Tensor& idx_a,
                                                          const at::Tensor& idx_b, const at::Tensor& scale,
                                                          const at::Tensor& ip, const at::Tensor& tn) {
  check_tables_agree(idx_a, idx_b);
  at::Tensor v = call_shrink(x, pool_a, idx_a, ip, tn);
  at::Tensor y = at::zeros({x.size(0), idx_b.size(2) * pool_b.size(1)}, x.options());
  call_expand(y, v, pool_b, idx_b, scale, ip, tn);
  return {y, v};
}

at::Tensor unit_stride(const at::Tensor& t) {
  return (t.dim() < 2 || t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

// Identity on a pool; see the header comment. saved_data["acc"] is the fp32
// (fp64) accumulator, undefined until a consumer's backward creates it.
class PoolGradTap : public torch::autograd::Function<PoolGradTap> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& pool) {
    ctx->saved_data["acc"] = at::IValue();
    ctx->saved_data["dtype"] = static_cast<int64_t>(pool.scalar_type());
    ctx->set_materialize_grads(false);
    return pool.view_as(pool);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::IValue& slot = ctx->saved_data["acc"];
    at::Tensor acc = slot.isTensor() ? slot.toTensor() : at::Tensor();
    slot = at::IValue();  // hand it over: autograd may steal it as .grad
    const at::Tensor& g = grads[0];
    if (!acc.defined()) return {g};
    if (g.defined()) acc.add_(g);
    const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt());
    if (acc.scalar_type() != dtype) acc = acc.to(dtype);
    return {acc};
  }
};

using TapNode = torch::autograd::CppNode<PoolGradTap>;

// The tap node `pool` comes out of, when it is the node recorded at forward
// time (an int64 address in saved_data[key]; 0: none).
TapNode* tap_of(const at::Tensor& pool, AutogradContext* ctx, const char* key) {
  auto it = ctx->saved_data.find(key);
  if (it == ctx->saved_data.end() || it->second.toInt() == 0) return nullptr;
  auto fn = pool.grad_fn();
  if (!fn || reinterpret_cast<intptr_t>(fn.get()) != it->second.toInt()) return nullptr;
  return dynamic_cast<TapNode*>(fn.get());
}

int64_t tap_address(const at::Tensor& pool) {
  auto fn = pool.grad_fn();
  return dynamic_cast<TapNode*>(fn.get()) != nullptr ? reinterpret_cast<intptr_t>(fn.get()) : 0;
}

// The accumulator of `tap` in dtype acc (created zeroed on first use), or an
// undefined tensor when its existing accumulator has another dtype.
at::Tensor tap_accumulator(TapNode* tap, const at::Tensor& pool, at::ScalarType acc) {
  at::IValue& slot = tap->ctx_.saved_data["acc"];
  at::Tensor a = slot.isTensor() ? slot.toTensor() : at::Tensor();
  if (!a.defined()) {
    a = at::zeros(pool.sizes(), pool.options().dtype(acc));
    slot = a;
  }
  return a.scalar_type() == acc ? a : at::Tensor();
}

class ShardedLoraFn : public torch::autograd::Function<ShardedLoraFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& pool_a,
                               const at::Tensor& pool_b, const at::Tensor& idx_a, const at::Tensor& idx_b,
                               const at::Tensor& scale, const at::Tensor& ip, const at::Tensor& tn) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, v] = call_sharded_lora(x, pool_a, pool_b, idx_a, idx_b, scale, ip, tn);
    ctx->save_for_backward({x, pool_a, pool_b, idx_a, idx_b, scale, ip, tn, v});
    ctx->saved_data["det"] = deterministic_grads_flag();
    ctx->saved_data["tap_a"] = tap_address(pool_a);
    ctx->saved_data["tap_b"] = tap_address(pool_b);
    ctx->set_materialize_grads(false);
    return {y, v};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &pool_a = saved[1], &pool_b = saved[2], &idx_a = saved[3],
                     &idx_b = saved[4], &scale = saved[5], &ip = saved[6], &tn = saved[7], &v = saved[8];
    const bool need_x = ctx->needs_input_grad(0), need_pa = ctx->needs_input_grad(1),
               need_pb = ctx->needs_input_grad(2);
    at::Tensor dx, dpa, dpb;
    const at::ScalarType acc = acc_dtype(x.scalar_type());
    const bool det = ctx->saved_data["det"].toBool() || deterministic_grads_enabled();
    // Accumulators of the taps the pools come out of (undefined: no tap).
    at::Tensor acc_a, acc_b;
    if (need_pa)
      if (TapNode* tap = tap_of(pool_a, ctx, "tap_a")) acc_a = tap_accumulator(tap, pool_a, acc);
    if (need_pb)
      if (TapNode* tap = tap_of(pool_b, ctx, "tap_b")) acc_b = tap_accumulator(tap, pool_b, acc);
    // pool_a and pool_b may be the same tap (one pool for both sides)
    auto input_grad = [&](const at::Tensor& u, const at::Tensor& sc) {
      if (!dx.defined()) dx = at::zeros(x.sizes(), x.options());
      call_expand(dx, u, pool_a, idx_a, sc, ip, tn);
    };
    auto pool_a_grad = [&](const at::Tensor& u, const at::Tensor& sc) {
      if (acc_a.defined()) {
        call_shard_grad(acc_a, u, x, idx_a, sc, ip, tn, det);
        return;
      }
      if (!dpa.defined()) dpa = at::zeros(pool_a.sizes(), pool_a.options().dtype(acc));
      call_shard_grad(dpa, u, x, idx_a, sc, ip, tn, det);
    };
    const at::Tensor& dy_in = grads[0];
    if (dy_in.defined()) {
      const at::Tensor dy = unit_stride(dy_in);
      if (need_x || need_pa) {
        const at::Tensor w = call_shrink(dy, pool_b, idx_b, ip, tn);  // dy @ B_t
        if (need_x) input_grad(w, scale);
        if (need_pa) pool_a_grad(w, scale);
      }
      if (need_pb) {
        if (acc_b.defined()) {
          call_shard_grad(acc_b, v, dy, idx_b, scale, ip, tn, det);
        } else {
          dpb = at::zeros(pool_b.sizes(), pool_b.options().dtype(acc));
          call_shard_grad(dpb, v, dy, idx_b, scale, ip, tn, det);
        }
      }
    }
    if (grads[1].defined() && (need_x || need_pa)) {  // v used downstream: v = x @ A_t^T, no scale
      const at::Tensor dv = unit_stride(grads[1].to(v.scalar_type()));
      const at::Tensor ones = at::ones({idx_a.size(0)}, scale.options());
      if (need_x) input_grad(dv, ones);
      if (need_pa) pool_a_grad(dv, ones);
    }
    if (dpa.defined()) dpa = dpa.to(pool_a.scalar_type());
    if (dpb.defined()) dpb = dpb.to(pool_b.scalar_type());
    return {dx, dpa, dpb, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> sharded_lora_autograd(const at::Tensor& x, const at::Tensor& pool_a,
                                                         const at::Tensor& pool_b, const at::Tensor& idx_a,
                                                         const at::Tensor& idx_b, const at::Tensor& scale,
                                                         const at::Tensor& ip, const at::Tensor& tn) {
  auto out = ShardedLoraFn::apply(x, pool_a, pool_b, idx_a, idx_b, scale, ip, tn);
  return {out[0], out[1]};
}

}  // namespace

at::Tensor pool_grad_tap(const at::Tensor& pool) { return PoolGradTap::apply(pool); }

TORCH_LIBRARY_IMPL(mos, CompositeExplicitAutograd, m) { m.impl("sharded_lora", &sharded_lora_composite); }

TORCH_LIBRARY_IMPL(mos, Autograd, m) { m.impl("sharded_lora", &sharded_lora_autograd); }

}  // namespace mos
