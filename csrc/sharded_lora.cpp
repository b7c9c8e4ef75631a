// sharded_lora and sgmv_shrink's autograd: the differentiable entry points
// (MOS.md §3), device-generic, on one set of backward helpers.
//
// sharded_lora forward (CompositeExplicitAutograd): v = sgmv_shrink(x),
// delta = sgmv_expand(0, v).
// sharded_lora backward (Autograd key), with w = sgmv_shrink(d_delta, pool_b) = d_delta @ B_t:
//   dx      = sgmv_expand(0, w, pool_a, scale) [+ sgmv_expand(., dv, pool_a, 1)]
//   d pool_a = shard_grad(0, w, x, idx_a, scale) [+ shard_grad(., dv, x, idx_a, 1)]
//   d pool_b = shard_grad(0, v, d_delta, idx_b, scale)
// sgmv_shrink backward (Autograd key; its kernels are CPU/CUDA):
//   dx      = sgmv_expand(0, dv, pool_a, 1)
//   d pool_a = shard_grad(0, dv, x, idx_a, 1)
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
// forward pass. A sharded_lora or sgmv_shrink node whose pool input comes
// straight out of a tap accumulates its pool gradient (shard_grad) into the
// tap's fp32 buffer, created by the first such node, and returns no gradient
// for that input; the
// tap runs after all its consumers (autograd's dependency order), adds any
// ordinary gradients it received, casts once to the pool dtype and hands the
// buffer to the pool's AccumulateGrad as one ordinary gradient (so .grad,
// gradient hooks, DDP buckets and FSDP2 reduce-scatter see nothing unusual).
// A node whose saved pool is not the tap's output (activation checkpointing
// recomputes, a cast in between) returns its gradient as usual. Everything goes through the dispatcher,
// so the same code serves CPU, CUDA and tracing (torch.compile / AOTAutograd);
// the fake kernels are in mos_ext/ops.py. Written in C++ because the Python
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
                       const at::Tensor& ip, const at::Tensor& tn, const OptMap& map = std::nullopt) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mos::sgmv_shrink", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, const OptMap&)>();
  return op.call(x, pool, idx, ip, tn, map);
}

void call_expand(const at::Tensor& y, const at::Tensor& v, const at::Tensor& pool, const at::Tensor& idx,
                 const at::Tensor& scale, const at::Tensor& ip, const at::Tensor& tn) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mos::sgmv_expand", "")
                       .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptMap&)>();
  op.call(y, v, pool, idx, scale, ip, tn, std::nullopt);
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

// What a backward needs to know from its forward about pool gradients: the
// deterministic flag then, and the taps the pools came out of (one key a pool).
void record_pool_grad_context(AutogradContext* ctx, std::initializer_list<std::pair<const char*, at::Tensor>> pools) {
  ctx->saved_data["det"] = deterministic_grads_flag();
  for (const auto& [key, pool] : pools) ctx->saved_data[key] = tap_address(pool);
}

bool deterministic_backward(AutogradContext* ctx) {
  return ctx->saved_data["det"].toBool() || deterministic_grads_enabled();
}

// A scale of ones for the tenants of idx (a gradient that carries no scale).
at::Tensor ones_scale(const at::Tensor& idx) { return at::ones({idx.size(0)}, idx.options().dtype(at::kFloat)); }

// dx += sgmv_expand(u, pool, idx, scale): the input gradient through one side,
// dx created zeroed like x on first use.
void add_input_grad(at::Tensor& dx, const at::Tensor& x, const at::Tensor& u, const at::Tensor& pool,
                    const at::Tensor& idx, const at::Tensor& scale, const at::Tensor& ip, const at::Tensor& tn) {
  if (!dx.defined()) dx = at::zeros(x.sizes(), x.options());
  call_expand(dx, u, pool, idx, scale, ip, tn);
}

// The gradient of one pool input, summed by shard_grad: into the accumulator
// of the tap the pool comes out of (recorded under `key` at forward time; the
// node then returns no gradient for it), else into a buffer of its own in the
// accumulation dtype, created zeroed on first use and cast by result().
class PoolGrad {
 public:
  PoolGrad(AutogradContext* ctx, const char* key, const at::Tensor& pool, at::ScalarType acc, bool det, bool needed)
      : pool_(pool), acc_(acc), det_(det) {
    if (needed)
      if (TapNode* tap = tap_of(pool, ctx, key)) tap_acc_ = tap_accumulator(tap, pool, acc);
  }

  // += scale[t] * sum over t's tokens of u[n, j] * x[n, i-th shard]
  void add(const at::Tensor& u, const at::Tensor& x, const at::Tensor& idx, const at::Tensor& scale,
           const at::Tensor& ip, const at::Tensor& tn) {
    if (tap_acc_.defined()) {
      call_shard_grad(tap_acc_, u, x, idx, scale, ip, tn, det_);
      return;
    }
    if (!grad_.defined()) grad_ = at::zeros(pool_.sizes(), pool_.options().dtype(acc_));
    call_shard_grad(grad_, u, x, idx, scale, ip, tn, det_);
  }

  // What the node returns for the pool: undefined when nothing was added or it went into a tap.
  at::Tensor result() const { return grad_.defined() ? grad_.to(pool_.scalar_type()) : grad_; }

 private:
  at::Tensor pool_;
  at::ScalarType acc_;
  bool det_;
  at::Tensor tap_acc_, grad_;
};

class ShardedLoraFn : public torch::autograd::Function<ShardedLoraFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& pool_a,
                               const at::Tensor& pool_b, const at::Tensor& idx_a, const at::Tensor& idx_b,
                               const at::Tensor& scale, const at::Tensor& ip, const at::Tensor& tn) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, v] = call_sharded_lora(x, pool_a, pool_b, idx_a, idx_b, scale, ip, tn);
    ctx->save_for_backward({x, pool_a, pool_b, idx_a, idx_b, scale, ip, tn, v});
    record_pool_grad_context(ctx, {{"tap_a", pool_a}, {"tap_b", pool_b}});
    ctx->set_materialize_grads(false);
    return {y, v};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &pool_a = saved[1], &pool_b = saved[2], &idx_a = saved[3],
                     &idx_b = saved[4], &scale = saved[5], &ip = saved[6], &tn = saved[7], &v = saved[8];
    const bool need_x = ctx->needs_input_grad(0), need_pa = ctx->needs_input_grad(1),
               need_pb = ctx->needs_input_grad(2);
    const at::ScalarType acc = acc_dtype(x.scalar_type());
    const bool det = deterministic_backward(ctx);
    // pool_a and pool_b may be the same tap (one pool for both sides)
    PoolGrad dpa(ctx, "tap_a", pool_a, acc, det, need_pa);
    PoolGrad dpb(ctx, "tap_b", pool_b, acc, det, need_pb);
    at::Tensor dx;
    const at::Tensor& dy_in = grads[0];
    if (dy_in.defined()) {
      const at::Tensor dy = unit_stride(dy_in);
      if (need_x || need_pa) {
        const at::Tensor w = call_shrink(dy, pool_b, idx_b, ip, tn);  // dy @ B_t
        if (need_x) add_input_grad(dx, x, w, pool_a, idx_a, scale, ip, tn);
        if (need_pa) dpa.add(w, x, idx_a, scale, ip, tn);
      }
      if (need_pb) dpb.add(v, dy, idx_b, scale, ip, tn);
    }
    if (grads[1].defined() && (need_x || need_pa)) {  // v used downstream: v = x @ A_t^T, no scale
      const at::Tensor dv = unit_stride(grads[1].to(v.scalar_type()));
      const at::Tensor ones = ones_scale(idx_a);
      if (need_x) add_input_grad(dx, x, dv, pool_a, idx_a, ones, ip, tn);
      if (need_pa) dpa.add(dv, x, idx_a, ones, ip, tn);
    }
    return {dx, dpa.result(), dpb.result(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// sgmv_shrink's autograd: v = x @ A_t^T per segment (no scale).
class ShrinkFn : public torch::autograd::Function<ShrinkFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& pool_a,
                            const at::Tensor& idx_a, const at::Tensor& ip, const at::Tensor& tn) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor v = call_shrink(x, pool_a, idx_a, ip, tn);
    ctx->save_for_backward({x, pool_a, idx_a, ip, tn});
    record_pool_grad_context(ctx, {{"tap_a", pool_a}});
    return v;  // grads materialized: an undefined dv gives zero gradients, as ever
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &pool_a = saved[1], &idx_a = saved[2], &ip = saved[3], &tn = saved[4];
    const bool need_x = ctx->needs_input_grad(0), need_pa = ctx->needs_input_grad(1);
    PoolGrad dpa(ctx, "tap_a", pool_a, acc_dtype(x.scalar_type()), deterministic_backward(ctx), need_pa);
    const at::Tensor dv = unit_stride(grads[0]);
    const at::Tensor ones = ones_scale(idx_a);
    at::Tensor dx;
    if (need_x) add_input_grad(dx, x, dv, pool_a, idx_a, ones, ip, tn);
    if (need_pa) dpa.add(dv, x, idx_a, ones, ip, tn);
    return {dx, dpa.result(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> sharded_lora_autograd(const at::Tensor& x, const at::Tensor& pool_a,
                                                         const at::Tensor& pool_b, const at::Tensor& idx_a,
                                                         const at::Tensor& idx_b, const at::Tensor& scale,
                                                         const at::Tensor& ip, const at::Tensor& tn) {
  auto out = ShardedLoraFn::apply(x, pool_a, pool_b, idx_a, idx_b, scale, ip, tn);
  return {out[0], out[1]};
}

at::Tensor sgmv_shrink_autograd(const at::Tensor& x, const at::Tensor& pool_a, const at::Tensor& idx_a,
                                const at::Tensor& ip, const at::Tensor& tn, const OptMap& map_a) {
  if (map_a.has_value() && map_a->defined()) {
    // Shared tables are a serving layout: pool gradients go through shard_grad, which
    // takes per-tenant tables only (training builds those), so refuse rather than drop them.
    TORCH_CHECK_VALUE(!(at::GradMode::is_enabled() && (x.requires_grad() || pool_a.requires_grad())),
                      "sgmv_shrink with map_a (shared tables) is not differentiable; call it under "
                      "torch.no_grad(), or give each tenant its own table (idx_a [T, r, l], no map) to train");
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_shrink(x, pool_a, idx_a, ip, tn, map_a);
  }
  return ShrinkFn::apply(x, pool_a, idx_a, ip, tn);
}

}  // namespace

at::Tensor pool_grad_tap(const at::Tensor& pool) { return PoolGradTap::apply(pool); }

TORCH_LIBRARY_IMPL(mos, CompositeExplicitAutograd, m) { m.impl("sharded_lora", &sharded_lora_composite); }

TORCH_LIBRARY_IMPL(mos, Autograd, m) {
  m.impl("sharded_lora", &sharded_lora_autograd);
  m.impl("sgmv_shrink", &sgmv_shrink_autograd);
}

}  // namespace mos
