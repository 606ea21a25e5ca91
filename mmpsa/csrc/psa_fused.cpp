// Fused evaluation of mmpsa's PolarizedSelfAttention block: a C++ autograd Function.
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
// about a third of it. Only ATen ops are called, so the same code runs on every device
// and dtype ATen supports. The Python side (psa_fused.py) keeps the same maths as
// plain differentiable ops for torch.jit tracing and torch.compile/export, and as the
// fallback when this extension is not built.
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/extension.h>

#include <string>
#include <tuple>
#include <vector>

namespace mmpsa {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Input dtype (xd) and accumulation dtype (acc = promote(xd, float32)) casts.
struct Casts {
  at::ScalarType xd, acc;
  explicit Casts(const Tensor& x)
      : xd(x.scalar_type()), acc(at::promote_types(x.scalar_type(), at::kFloat)) {}
  Tensor X(const Tensor& t) const { return t.scalar_type() == xd ? t : t.to(xd); }
  Tensor A(const Tensor& t) const { return t.scalar_type() == acc ? t : t.to(acc); }
};

// The block's parameters in accumulation dtype (they share one dtype).
std::vector<Tensor> to_acc(at::TensorList params, at::ScalarType acc) {
  std::vector<Tensor> out(params.begin(), params.end());
  if (!out.empty() && out[0].scalar_type() != acc) {
    for (auto& t : out) t = t.to(acc);
  }
  return out;
}

// Gradients of the parameters: undefined where not needed, shaped and typed as the
// parameters.
void append_param_grads(AutogradContext* ctx, at::TensorList params,
                        std::vector<Tensor> grads, variable_list& out) {
  TORCH_INTERNAL_ASSERT(grads.size() == params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    if (!ctx->needs_input_grad(i + 1)) {
      out.emplace_back();
      continue;
    }
    Tensor g = grads[i];
    if (g.sizes() != params[i].sizes()) g = g.view(params[i].sizes());
    if (g.scalar_type() != params[i].scalar_type()) g = g.to(params[i].scalar_type());
    out.push_back(std::move(g));
  }
}

// ---------------------------------------------------------------------------------
// Paper variant (both modes) and official PSA_p.
// Parameters: paper  (wq, bq, wv, bv, wz, bz, gamma, beta, wsq, bsq, wsv, bsv),
//             official (wq, wv, wz, wsq, wsv).
// Saved: x, p, xp, g, v, z, mu, rstd, s, u, t, a_ch, a_sp, params...
// ---------------------------------------------------------------------------------
constexpr int kSavedPP = 13;

variable_list forward_pp(AutogradContext* ctx, bool paper, bool seq, double eps,
                         const Tensor& x, at::TensorList params_in) {
  const int64_t b = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t n = h * w, c2 = c / 2;
  const Casts k(x);
  auto prm = to_acc(params_in, k.acc);
  Tensor wq, wv, bv, wz, bz, gamma, beta, wsq, bsq, wsv, bsv;
  if (paper) {
    wq = prm[0], wv = prm[2], bv = prm[3], wz = prm[4], bz = prm[5];
    gamma = prm[6], beta = prm[7], wsq = prm[8], bsq = prm[9], wsv = prm[10];
    bsv = prm[11];
  } else {
    wq = prm[0], wv = prm[1], wz = prm[2], wsq = prm[3], wsv = prm[4];
  }
  wv = wv.view({c2, c}), wz = wz.view({c, c2});
  wsq = wsq.view({c2, c}), wsv = wsv.view({c2, c});
  const Tensor x3 = x.reshape({b, c, n});

  // channel-only branch: p = softmax_HW(w_q^T X) (b_q cancels in the softmax)
  const Tensor qr = at::bmm(k.X(wq).view({1, 1, c}).expand({b, 1, c}), x3);
  const Tensor p = at::softmax(qr, -1, k.acc);  // (B, 1, HW)
  // [X p, GP(X)] in one pass over X: (B, C, 2)
  const Tensor pm = at::cat({k.X(p), at::full({1, 1, 1}, 1.0 / n, x.options()).expand({b, 1, n})}, 1);
  const Tensor xg = k.A(at::bmm(x3, pm.transpose(1, 2)));
  const Tensor xp = xg.select(2, 0), g = xg.select(2, 1);  // (B, C) each
  const Tensor v = paper ? at::addmm(bv, xp, wv.t()) : at::mm(xp, wv.t());  // (B, C/2)
  Tensor z = paper ? at::addmm(bz, v, wz.t()) : at::mm(v, wz.t());  // (B, C)
  Tensor a_ch, mu, rstd;
  if (paper) {
    auto ln = at::native_layer_norm(z, {c}, gamma, beta, eps);
    a_ch = std::get<0>(ln).sigmoid_(), mu = std::get<1>(ln), rstd = std::get<2>(ln);
  } else {
    a_ch = at::sigmoid(z);
  }

  // spatial-only branch: a_sp = sigmoid(u^T X + s^T b_v), u = W_v^T s
  const Tensor gs = seq ? g * a_ch : g;  // GP of the branch input
  const Tensor sq = paper ? at::addmm(bsq, gs, wsq.t()) : at::mm(gs, wsq.t());
  const Tensor s = paper ? at::softmax(sq, -1) : sq;  // (B, C/2)
  const Tensor u = at::mm(s, wsv);                     // (B, C)
  const Tensor ue = seq ? u * a_ch : u;  // sequential: u^T (a_ch X) = (u a_ch)^T X
  Tensor t, a_sp;
  if (paper) {
    const Tensor lg = at::baddbmm(k.X(at::mv(s, bsv)).view({b, 1, 1}), k.X(ue).unsqueeze(1), x3);
    a_sp = k.A(lg).sigmoid_();
  } else {
    t = at::softmax(at::bmm(k.X(ue).unsqueeze(1), x3), -1, k.acc);
    a_sp = at::sigmoid(t);  // (B, 1, HW)
  }

  const Tensor a_ch4 = a_ch.view({b, c, 1, 1}), a_sp4 = a_sp.view({b, 1, h, w});
  Tensor out = at::mul(x, k.X(a_ch4));
  if (seq) {
    out.mul_(k.X(a_sp4));
  } else {
    out.addcmul_(x, k.X(a_sp4));
  }
  variable_list saved = {x, p, xp, g, v, z, mu, rstd, s, u, t, a_ch, a_sp};
  saved.insert(saved.end(), params_in.begin(), params_in.end());
  ctx->save_for_backward(saved);
  return {out, a_ch4, a_sp4};
}

variable_list backward_pp(AutogradContext* ctx, const variable_list& sv, bool paper, bool seq,
                          const Tensor& grad_out) {
  const Tensor &x = sv[0], &p = sv[1], &xp = sv[2], &g = sv[3], &v = sv[4], &z = sv[5];
  const Tensor &mu = sv[6], &rstd = sv[7], &s = sv[8], &u = sv[9], &t = sv[10];
  const Tensor &a_ch = sv[11], &a_sp = sv[12];
  const at::TensorList params_in(sv.data() + kSavedPP, sv.size() - kSavedPP);
  const int64_t b = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t n = h * w, c2 = c / 2;
  const Casts k(x);
  auto prm = to_acc(params_in, k.acc);
  Tensor wq, wv, wz, gamma, beta, wsq, wsv, bsv;
  if (paper) {
    wq = prm[0], wv = prm[2], wz = prm[4], gamma = prm[6], beta = prm[7];
    wsq = prm[8], wsv = prm[10], bsv = prm[11];
  } else {
    wq = prm[0], wv = prm[1], wz = prm[2], wsq = prm[3], wsv = prm[4];
  }
  wv = wv.view({c2, c}), wz = wz.view({c, c2});
  wsq = wsq.view({c2, c}), wsv = wsv.view({c2, c});
  const Tensor x3 = x.reshape({b, c, n});
  const Tensor g3 = grad_out.reshape({b, c, n});
  const Tensor a_ch_x = k.X(a_ch).unsqueeze(-1), a_sp_x = k.X(a_sp);
  const Tensor gs = seq ? g * a_ch : g;
  const Tensor ue = seq ? u * a_ch : u;

  // d/d(a_ch), d/d(a_sp) of  X * (a_ch + a_sp)  or  X * a_ch * a_sp
  Tensor gx4 = at::empty({b, c, h, w}, x.options());
  Tensor gx = gx4.view({b, c, n});
  at::mul_out(gx, g3, x3);  // the one full-size temporary
  Tensor da_ch, da_sp;
  if (seq) {
    da_ch = k.A(at::bmm(gx, a_sp_x.transpose(1, 2)).view({b, c}));
    da_sp = k.A(at::bmm(a_ch_x.transpose(1, 2), gx));  // (B, 1, HW)
  } else {
    da_ch = at::sum(gx, {-1}, false, k.acc);  // (B, C)
    // the column sums as a batched matvec: faster than sum(1) on large X
    da_sp = k.A(at::bmm(at::ones({1, 1, c}, x.options()).expand({b, 1, c}), gx));
  }
  Tensor dlg = at::sigmoid_backward(da_sp, a_sp);
  if (!paper) dlg = at::_softmax_backward_data(dlg, t, -1, k.acc);  // (B, 1, HW)

  // From d(ue) to the spatial parameters' gradients and d(GP(X)) (and d(a_ch)).
  Tensor dg, dwsq, dwsv, dbsq, dbsv;
  auto spatial = [&](Tensor due) {
    if (seq) {
      da_ch = at::addcmul(da_ch, due, u);
      due = due * a_ch;
    }
    dwsv = at::mm(s.t(), due);  // (C/2, C)
    Tensor ds = at::mm(due, wsv.t());  // (B, C/2)
    if (paper) {
      const Tensor dc = dlg.sum(-1);  // (B, 1): d(s^T b_sv)
      ds = at::addcmul(ds, dc, bsv);
      dbsv = at::mm(dc.t(), s);
      ds = at::_softmax_backward_data(ds, s, -1, k.acc);
      dbsq = ds.sum(0);
    }
    dwsq = at::mm(ds.t(), gs);
    Tensor dgs = at::mm(ds, wsq);  // (B, C)
    if (seq) {
      da_ch = at::addcmul(da_ch, dgs, g);
      dgs = dgs * a_ch;
    }
    dg = dgs;
  };

  if (seq) {  // d(a_ch) needs the spatial branch first: d(ue) = X dlg
    spatial(k.A(at::bmm(x3, k.X(dlg).transpose(1, 2)).view({b, c})));
  }

  // channel branch, down to xp = X p
  Tensor dz = at::sigmoid_backward(da_ch, a_ch);
  Tensor dgamma, dbeta;
  if (paper) {
    auto lnb = at::native_layer_norm_backward(dz, z, {c}, mu, rstd, gamma, beta,
                                              {true, true, true});
    dz = std::get<0>(lnb), dgamma = std::get<1>(lnb), dbeta = std::get<2>(lnb);
  }
  const Tensor dwz = at::mm(dz.t(), v);  // (C, C/2)
  const Tensor dv = at::mm(dz, wz);      // (B, C/2)
  const Tensor dwv = at::mm(dv.t(), xp);  // (C/2, C)
  const Tensor dxp = at::mm(dv, wv);      // (B, C)
  // p = softmax(w_q^T X):  dp = X^T dxp
  const Tensor dp = at::bmm(k.X(dxp).unsqueeze(1), x3);  // (B, 1, HW)
  const Tensor dqr = at::_softmax_backward_data(k.A(dp), p, -1, k.acc);

  Tensor dwq;
  if (seq) {
    dwq = k.A(at::bmm(k.X(dqr), x3.transpose(1, 2))).sum(0);
  } else {  // one pass over X for both: [dlg, dqr] X^T
    const Tensor r2 = k.A(at::bmm(k.X(at::cat({dlg, dqr}, 1)), x3.transpose(1, 2)));
    dwq = r2.select(1, 1).sum(0);  // r2: (B, 2, C)
    spatial(r2.select(1, 0));
  }

  variable_list grads;
  if (ctx->needs_input_grad(0)) {
    // dX = dOut * M + [w_q, dg, dxp, ue] [dqr, 1 / HW, p, dlg]^T
    at::mul_out(gx, g3, a_ch_x);
    if (seq) {  // M = a_ch a_sp^T
      gx.mul_(a_sp_x);
    } else {  // M = a_ch + a_sp
      gx.addcmul_(g3, a_sp_x);
    }
    const Tensor uu = at::stack({wq.view({1, c}).expand({b, c}), dg, dxp, ue}, -1);  // (B, C, 4)
    const Tensor vv = at::cat({dqr, at::full({1, 1, 1}, 1.0 / n, p.options()).expand({b, 1, n}), p, dlg},
                              1);  // (B, 4, HW)
    gx.baddbmm_(k.X(uu), k.X(vv));
    grads.push_back(gx4);
  } else {
    grads.emplace_back();
  }
  std::vector<Tensor> pg;
  if (paper) {
    pg = {dwq, dqr.sum().view({1}), dwv, dv.sum(0), dwz, dz.sum(0), dgamma, dbeta,
          dwsq, dbsq, dwsv, dbsv};
  } else {
    pg = {dwq, dwv, dwz, dwsq, dwsv};
  }
  append_param_grads(ctx, params_in, std::move(pg), grads);
  return grads;
}

// ---------------------------------------------------------------------------------
// Official PSA_s. Its spatial branch applies a per-channel softmax over pixels to
// W_v(a_ch * X) = (W_v diag(a_ch)) X, a (C/2, HW) tensor that does not fuse: it is
// computed with a_ch folded into W_v (a_ch * X is never made) and recomputed in
// backward, so that only O(B (C + HW)) is kept.
// Parameters: (wq, wv, w1, b1, lnw, lnb, w2, b2, wsq, wsv).
// Saved: x, p, xp, g, v, z1, mu, rstd, r1, a_ch, avg, a_sp, params...
// ---------------------------------------------------------------------------------
constexpr int kSavedS = 12;

variable_list forward_s(AutogradContext* ctx, double eps, const Tensor& x,
                        at::TensorList params_in) {
  const int64_t b = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t n = h * w, c2 = c / 2;
  const Casts k(x);
  auto prm = to_acc(params_in, k.acc);
  const int64_t c8 = prm[2].size(0);
  const Tensor wq = prm[0], wv = prm[1].view({c2, c}), w1 = prm[2].view({c8, c2});
  const Tensor b1 = prm[3], lnw = prm[4].view({c8}), lnb = prm[5].view({c8});
  const Tensor w2 = prm[6].view({c, c8}), b2 = prm[7];
  const Tensor wsq = prm[8].view({c2, c}), wsv = prm[9].view({c2, c});
  const Tensor x3 = x.reshape({b, c, n});

  // channel branch (the released `spatial_pool`), as in PSA_p but for conv_up
  const Tensor p = at::softmax(at::bmm(k.X(wq).view({1, 1, c}).expand({b, 1, c}), x3), -1, k.acc);
  const Tensor pm = at::cat({k.X(p), at::full({1, 1, 1}, 1.0 / n, x.options()).expand({b, 1, n})}, 1);
  const Tensor xg = k.A(at::bmm(x3, pm.transpose(1, 2)));
  const Tensor xp = xg.select(2, 0), g = xg.select(2, 1);  // X p, GP(X)
  const Tensor v = at::mm(xp, wv.t());                       // (B, C/2)
  const Tensor z1 = at::addmm(b1, v, w1.t());                // (B, C/8)
  auto ln = at::native_layer_norm(z1, {c8}, lnw, lnb, eps);
  const Tensor r1 = std::get<0>(ln).relu_();
  const Tensor a_ch = at::addmm(b2, r1, w2.t()).sigmoid_();  // (B, C)

  // spatial branch (the released `channel_pool`) on Y = a_ch * X
  const Tensor avg = at::mm(g * a_ch, wsq.t());                 // W_q GP(Y): (B, C/2)
  const Tensor wva = wsv.unsqueeze(0) * a_ch.unsqueeze(1);      // W_v diag(a_ch)
  Tensor tt = at::softmax(at::bmm(k.X(wva), x3), -1, k.acc);    // (B, C/2, HW)
  const Tensor a_sp = at::bmm(avg.unsqueeze(1), tt).sigmoid_();  // (B, 1, HW)
  tt.reset();

  const Tensor a_ch4 = a_ch.view({b, c, 1, 1}), a_sp4 = a_sp.view({b, 1, h, w});
  Tensor out = at::mul(x, k.X(a_ch4));
  out.mul_(k.X(a_sp4));
  variable_list saved = {x, p, xp, g, v, z1, std::get<1>(ln), std::get<2>(ln), r1, a_ch, avg, a_sp};
  saved.insert(saved.end(), params_in.begin(), params_in.end());
  ctx->save_for_backward(saved);
  return {out, a_ch4, a_sp4};
}

variable_list backward_s(AutogradContext* ctx, const variable_list& sv, const Tensor& grad_out) {
  const Tensor &x = sv[0], &p = sv[1], &xp = sv[2], &g = sv[3], &v = sv[4], &z1 = sv[5];
  const Tensor &mu = sv[6], &rstd = sv[7], &r1 = sv[8], &a_ch = sv[9], &avg = sv[10];
  const Tensor &a_sp = sv[11];
  const at::TensorList params_in(sv.data() + kSavedS, sv.size() - kSavedS);
  const int64_t b = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t n = h * w, c2 = c / 2;
  const Casts k(x);
  auto prm = to_acc(params_in, k.acc);
  const int64_t c8 = prm[2].size(0);
  const Tensor wq = prm[0], wv = prm[1].view({c2, c}), w1 = prm[2].view({c8, c2});
  const Tensor lnw = prm[4].view({c8}), lnb = prm[5].view({c8});
  const Tensor w2 = prm[6].view({c, c8});
  const Tensor wsq = prm[8].view({c2, c}), wsv = prm[9].view({c2, c});
  const Tensor x3 = x.reshape({b, c, n});
  const Tensor g3 = grad_out.reshape({b, c, n});
  const Tensor a_ch_x = k.X(a_ch).unsqueeze(-1), a_sp_x = k.X(a_sp);
  const Tensor gs = g * a_ch;

  // out = X * a_ch * a_sp
  Tensor gx4 = at::empty({b, c, h, w}, x.options());
  Tensor gx = gx4.view({b, c, n});
  at::mul_out(gx, g3, x3);
  Tensor da_ch = k.A(at::bmm(gx, a_sp_x.transpose(1, 2)).view({b, c}));
  const Tensor dlg = at::sigmoid_backward(k.A(at::bmm(a_ch_x.transpose(1, 2), gx)), a_sp);

  // a_sp = sigmoid(avg^T T), T = softmax_HW((W_v diag(a_ch)) X) recomputed
  const Tensor wva = wsv.unsqueeze(0) * a_ch.unsqueeze(1);  // (B, C/2, C)
  Tensor tt = at::softmax(at::bmm(k.X(wva), x3), -1, k.acc);
  const Tensor tq = at::bmm(tt, dlg.transpose(1, 2));  // T dlg: (B, C/2, 1)
  const Tensor davg = tq.view({b, c2});
  // d(theta) = diag(avg) D with D = T * (dlg - T dlg); diag(avg) is applied to the
  // small (C/2, C) factors instead of D
  Tensor dd = at::mul(tt, dlg);
  dd.addcmul_(tt, tq, -1.0);
  tt.reset();
  const Tensor dwva = k.A(at::bmm(k.X(dd), x3.transpose(1, 2))).mul_(avg.unsqueeze(-1));
  const Tensor dwsv = (dwva * a_ch.unsqueeze(1)).sum(0);
  da_ch = da_ch + (dwva * wsv).sum(1);
  const Tensor dwsq = at::mm(davg.t(), gs);
  const Tensor dgs = at::mm(davg, wsq);  // d GP(Y)
  da_ch = at::addcmul(da_ch, dgs, g);
  const Tensor dg = dgs * a_ch;

  // channel branch: a_ch = sigmoid(W2 relu(LN(W1 (W_v X p) + b1)) + b2)
  const Tensor dz = at::sigmoid_backward(da_ch, a_ch);
  const Tensor dw2 = at::mm(dz.t(), r1);
  const Tensor dr1 = at::mm(dz, w2).masked_fill_(r1 <= 0, 0);
  auto lnb_grads = at::native_layer_norm_backward(dr1, z1, {c8}, mu, rstd, lnw, lnb,
                                                  {true, true, true});
  const Tensor dz1 = std::get<0>(lnb_grads);
  const Tensor dw1 = at::mm(dz1.t(), v);
  const Tensor dv = at::mm(dz1, w1);
  const Tensor dwv = at::mm(dv.t(), xp);
  const Tensor dxp = at::mm(dv, wv);
  const Tensor dqr =
      at::_softmax_backward_data(k.A(at::bmm(k.X(dxp).unsqueeze(1), x3)), p, -1, k.acc);
  const Tensor dwq = k.A(at::bmm(k.X(dqr), x3.transpose(1, 2))).sum(0);

  variable_list grads;
  if (ctx->needs_input_grad(0)) {
    // dX = dOut * a_ch a_sp^T + (diag(avg) W_v diag(a_ch))^T D
    //      + [w_q, dg, dxp] [dqr, 1 / HW, p]^T
    at::mul_out(gx, g3, a_ch_x);
    gx.mul_(a_sp_x);
    gx.baddbmm_(k.X(wva * avg.unsqueeze(-1)).transpose(1, 2), k.X(dd));
    const Tensor uu = at::stack({wq.view({1, c}).expand({b, c}), dg, dxp}, -1);  // (B, C, 3)
    const Tensor vv = at::cat({dqr, at::full({1, 1, 1}, 1.0 / n, p.options()).expand({b, 1, n}), p}, 1);
    gx.baddbmm_(k.X(uu), k.X(vv));
    grads.push_back(gx4);
  } else {
    grads.emplace_back();
  }
  append_param_grads(ctx, params_in,
                     {dwq, dwv, dw1, dz1.sum(0), std::get<1>(lnb_grads), std::get<2>(lnb_grads),
                      dw2, dz.sum(0), dwsq, dwsv},
                     grads);
  return grads;
}

// ---------------------------------------------------------------------------------
struct FusedPSA : public torch::autograd::Function<FusedPSA> {
  // Returns (out, a_ch (B, C, 1, 1), a_sp (B, 1, H, W)); the two maps are
  // non-differentiable outputs (observation only).
  static variable_list forward(AutogradContext* ctx, const Tensor& x, bool paper, bool seq,
                               double eps, at::TensorList params) {
    variable_list outs;
    {
      // softmax, LayerNorm and the small vectors run in >= fp32 whatever autocast says
      c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
      outs = (!paper && seq) ? forward_s(ctx, eps, x, params)
                             : forward_pp(ctx, paper, seq, eps, x, params);
    }
    ctx->saved_data["paper"] = paper;
    ctx->saved_data["seq"] = seq;
    ctx->mark_non_differentiable({outs[1], outs[2]});
    ctx->set_materialize_grads(false);
    return outs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const bool paper = ctx->saved_data["paper"].toBool();
    const bool seq = ctx->saved_data["seq"].toBool();
    // unpacking the ~25 saved tensors costs ~1 us each: once
    const variable_list sv = ctx->get_saved_variables();
    const size_t n_params = sv.size() - ((!paper && seq) ? kSavedS : kSavedPP);
    const Tensor& grad_out = grad_outputs[0];
    const bool create_graph = torch::autograd::GradMode::is_enabled();
    variable_list grads;
    if (!grad_out.defined()) {
      grads.resize(1 + n_params);
    } else {
      at::NoGradGuard no_grad;
      c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
      grads = (!paper && seq) ? backward_s(ctx, sv, grad_out)
                              : backward_pp(ctx, sv, paper, seq, grad_out);
    }
    if (create_graph) grads = once_differentiable(std::move(grads));
    // gradients for (x, paper, seq, eps, params...): none for the three non-tensors
    variable_list out = {grads[0], Tensor(), Tensor(), Tensor()};
    out.insert(out.end(), grads.begin() + 1, grads.end());
    return out;
  }

  // As Python's @once_differentiable: the gradients are computed without a graph; when
  // one was asked for (create_graph=True), they get a grad_fn that raises if used.
  static variable_list once_differentiable(variable_list grads) {
    variable_list fake;
    fake.reserve(grads.size());
    for (const auto& g : grads) fake.push_back(g.defined() ? g.detach().requires_grad_(true) : g);
    torch::autograd::DelayedError err(
        "mmpsa's fused PolarizedSelfAttention is differentiable once; build the block "
        "with fused=False for higher-order gradients",
        static_cast<int64_t>(fake.size()));
    return err.apply(std::move(fake));
  }
};

std::vector<Tensor> fused_psa(const Tensor& x, bool paper, bool sequential, double eps,
                              std::vector<Tensor> params) {
  return FusedPSA::apply(x, paper, sequential, eps, at::TensorList(params));
}

}  // namespace mmpsa

#ifndef MMPSA_SOURCE_HASH
#define MMPSA_SOURCE_HASH "unknown"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // sha256[:16] of this file when it was built (setup.py); mmpsa warns on a mismatch
  m.attr("SOURCE_HASH") = MMPSA_SOURCE_HASH;
  m.def("fused_psa", &mmpsa::fused_psa,
        "Fused PolarizedSelfAttention: (out, a_ch, a_sp) with a hand-written backward. "
        "Args: x, paper (bool), sequential (bool), eps (float), params (list of tensors "
        "in the order of mmpsa.layers.psa_fused._params).",
        py::arg("x"), py::arg("paper"), py::arg("sequential"), py::arg("eps"),
        py::arg("params"));
}
