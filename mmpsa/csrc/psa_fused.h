// Fused evaluation of mmpsa's PolarizedSelfAttention block: shared declarations.
//
// The maths is described in mmpsa/layers/psa_fused.py (module docstring). In short,
// with X the input as a (C, HW) matrix per sample, every attention map is a function of
// a few reductions of X (w_q^T X, X [p, 1/HW], u^T X), so no C/2 x HW tensor is made,
// and the hand-written backward is dX = dOut * M + U V^T: one elementwise pass plus one
// batched matmul, keeping only O(B (C + HW)) tensors besides the input. Official PSA_s
// (a per-channel softmax of W_v(a_ch * X) over pixels) folds a_ch into W_v and
// recomputes that softmax in backward.
//
// Why C++: at the HRNet shapes a step is ~100 small ATen ops, and the Python glue of
// a torch.autograd.Function (argument parsing per op, the Function's own overhead) was
// about a third of it. The files:
//   psa_fused.h         this: the parameter form (PSAParams) and the evaluations' API
//   psa_fused.cpp       the autograd Function (FusedPSA), the dispatch, the bindings
//   psa_aten.cpp        paper variant and official PSA_p in ATen ops (any device/dtype)
//   psa_cpu_kernel.cpp  the same maths per sample in plain loops (small CPU inputs), and
//                       official PSA_s's (its (C/2, HW) GEMMs and softmax in ATen)
//   psa_official_s.cpp  official PSA_s in ATen ops
// The Python side (psa_fused.py) keeps the same maths as plain differentiable ops for
// torch.jit tracing and torch.compile/export, and as the fallback when this extension
// is not built.
#pragma once

#include <torch/extension.h>

#include <array>
#include <vector>

namespace mmpsa {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The block's parameters, by name: mmpsa.layers.psa_fused.PSAParams (documented there),
// whose tensor fields are these, in this order; the Python side passes them as a list in
// this order and the names are exported as mmpsa._ext.PARAM_NAMES (checked at import).
// Absent ones (None) are undefined tensors.
#define MMPSA_PSA_PARAMS(F)                                                               \
  F(ch_wq) F(ch_bq) F(ch_wv) F(ch_bv) F(ch_wz) F(ch_bz) F(ch_ln_w) F(ch_ln_b) F(ch_wz2) \
      F(ch_bz2) F(sp_wq) F(sp_bq) F(sp_wv) F(sp_bv)

struct PSAParams {
#define MMPSA_FIELD(name) Tensor name;
  MMPSA_PSA_PARAMS(MMPSA_FIELD)
#undef MMPSA_FIELD
  double ln_eps = 0.0;  // the eps of ch_ln

  static const std::vector<const char*> kNames;
  static const std::vector<Tensor PSAParams::*> kFields;

  // From the list in field order (the only place that reads it by position).
  static PSAParams unpack(at::ArrayRef<Tensor> list, double ln_eps);
  // All fields in order, undefined where absent (what FusedPSA saves).
  std::vector<Tensor> list() const;
  // The defined fields in order (the autograd inputs of FusedPSA).
  std::vector<Tensor> present() const;
  // f applied to every defined field.
  template <typename F>
  PSAParams map(F f) const {
    PSAParams out = *this;
    for (auto field : kFields) {
      if ((out.*field).defined()) out.*field = f(out.*field);
    }
    return out;
  }
  // The parameters in `dtype` (each cast only if it differs).
  PSAParams to(at::ScalarType dtype) const {
    return map([dtype](const Tensor& t) { return t.scalar_type() == dtype ? t : t.to(dtype); });
  }
};

// Input dtype (xd) and accumulation dtype (acc = promote(xd, float32)) casts.
struct Casts {
  at::ScalarType xd, acc;
  explicit Casts(const Tensor& x)
      : xd(x.scalar_type()), acc(at::promote_types(x.scalar_type(), at::kFloat)) {}
  Tensor X(const Tensor& t) const { return t.scalar_type() == xd ? t : t.to(xd); }
  Tensor A(const Tensor& t) const { return t.scalar_type() == acc ? t : t.to(acc); }
};

// t W^T (+ b): a 1x1 conv on (B, I) vectors; W (O, I) (viewed so from (O, I, 1, 1)).
inline Tensor linear(const Tensor& t, const Tensor& w, const Tensor& b) {
  const Tensor w2 = w.view({w.size(0), -1});
  return b.defined() ? at::addmm(b, t, w2.t()) : at::mm(t, w2.t());
}

// What an evaluation's forward gives FusedPSA: the output, the maps (any float dtype;
// they may alias `saved`), and the tensors its backward needs (the parameters are saved
// by FusedPSA after them).
struct Forward {
  Tensor out, a_ch, a_sp;  // (B, C, H, W), (B, C, 1, 1), (B, 1, H, W)
  variable_list saved;
};

// What an evaluation's backward gives FusedPSA: dX (undefined unless asked for) and the
// gradients of the defined parameters, by name (any shape of the same numel, any dtype).
struct Backward {
  Tensor dx;
  PSAParams grads;
};

// The channel branch's pooling, shared by the ATen evaluations: p = softmax_HW(w_q^T X)
// (b_q cancels), and X p and GP(X) from one pass over X. x3 (B, C, HW).
struct ChannelPool {
  Tensor p;   // (B, 1, HW), acc
  Tensor xp;  // (B, C), acc: X p
  Tensor g;   // (B, C), acc: GP(X)
};
ChannelPool channel_pool(const Tensor& x3, const Tensor& wq, const Casts& k);

// psa_aten.cpp: paper variant (both modes) and official PSA_p, ATen ops only.
Forward forward_pp(bool paper, bool seq, const Tensor& x, const PSAParams& prm);
Backward backward_pp(bool paper, bool seq, const variable_list& saved, const PSAParams& prm,
                     const Tensor& grad_out, bool need_dx);

// psa_cpu_kernel.cpp: the same for contiguous CPU inputs, per sample in loops, and
// official PSA_s likewise (its (C/2, HW) GEMMs and softmax as batched ATen ops).
bool use_cpu_kernel(const Tensor& x);
Forward forward_pp_cpu(bool paper, bool seq, const Tensor& x, const PSAParams& prm);
Backward backward_pp_cpu(bool paper, bool seq, const variable_list& saved,
                         const PSAParams& prm, const Tensor& grad_out, bool need_dx);
Forward forward_s_cpu(const Tensor& x, const PSAParams& prm);
Backward backward_s_cpu(const variable_list& saved, const PSAParams& prm,
                        const Tensor& grad_out, bool need_dx);

// psa_official_s.cpp: official PSA_s, ATen ops only.
Forward forward_s(const Tensor& x, const PSAParams& prm);
Backward backward_s(const variable_list& saved, const PSAParams& prm, const Tensor& grad_out,
                    bool need_dx);

}  // namespace mmpsa
