// The paper variant (both modes) and official PSA_p in ATen ops only: runs on every
// device and dtype ATen supports (psa_cpu_kernel.cpp takes small CPU inputs instead).
// Also the channel pooling that official PSA_s shares (psa_official_s.cpp).
#include <cmath>
#include <tuple>

#include "psa_fused.h"

namespace mmpsa {

ChannelPool channel_pool(const Tensor& x3, const Tensor& wq, const Casts& k) {
  const int64_t b = x3.size(0), c = x3.size(1), n = x3.size(2);
  const Tensor qr = at::bmm(k.X(wq).view({1, 1, c}).expand({b, 1, c}), x3);
  const Tensor p = at::softmax(qr, -1, k.acc);  // (B, 1, HW)
  // [X p, GP(X)] in one pass over X: (B, C, 2). GP's column holds 2^-e, the power of two
  // nearest 1/HW from above: exact in every float dtype (1/HW rounded to a half dtype
  // would scale every mean by the same error) and keeps the sum in range; the rest of
  // 1/HW is applied in the accumulation dtype.
  int e = 0;
  while (e < 24 && (int64_t{1} << e) < n) ++e;  // 2^-24: fp16's smallest power of two
  const Tensor col = at::full({1, 1, 1}, std::ldexp(1.0, -e), x3.options()).expand({b, 1, n});
  const Tensor xg = k.A(at::bmm(x3, at::cat({k.X(p), col}, 1).transpose(1, 2)));
  const double rest = std::ldexp(1.0, e) / static_cast<double>(n);
  const Tensor g = xg.select(2, 1);
  return {p, xg.select(2, 0), rest == 1.0 ? g : g.mul(rest)};
}

// Saved: x, p, xp, g, v, z, mu, rstd, s, u, t, a_ch, a_sp.
Forward forward_pp(bool paper, bool seq, const Tensor& x, const PSAParams& prm_in) {
  const int64_t b = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t n = h * w, c2 = c / 2;
  const Casts k(x);
  const PSAParams prm = prm_in.to(k.acc);
  const Tensor x3 = x.reshape({b, c, n});

  // channel-only branch: a_ch = sigmoid(LN(W_z (W_v (X p) + b_v) + b_z))
  const ChannelPool cp = channel_pool(x3, prm.ch_wq, k);
  const Tensor &p = cp.p, &xp = cp.xp, &g = cp.g;
  const Tensor v = linear(xp, prm.ch_wv, prm.ch_bv);  // (B, C/2)
  const Tensor z = linear(v, prm.ch_wz, prm.ch_bz);   // (B, C)
  Tensor a_ch, mu, rstd;
  if (prm.ch_ln_w.defined()) {
    auto ln = at::native_layer_norm(z, {c}, prm.ch_ln_w, prm.ch_ln_b, prm.ln_eps);
    a_ch = std::get<0>(ln).sigmoid_(), mu = std::get<1>(ln), rstd = std::get<2>(ln);
  } else {
    a_ch = at::sigmoid(z);
  }

  // spatial-only branch: a_sp = sigmoid(u^T X + s^T b_v), u = W_v^T s
  const Tensor gs = seq ? g * a_ch : g;  // GP of the branch input
  const Tensor sq = linear(gs, prm.sp_wq, prm.sp_bq);
  const Tensor s = paper ? at::softmax(sq, -1) : sq;     // (B, C/2)
  const Tensor u = at::mm(s, prm.sp_wv.view({c2, c}));  // (B, C)
  const Tensor ue = seq ? u * a_ch : u;  // sequential: u^T (a_ch X) = (u a_ch)^T X
  Tensor t, a_sp;
  if (paper) {
    const Tensor uX = k.X(ue).unsqueeze(1);
    const Tensor lg = prm.sp_bv.defined()
                          ? at::baddbmm(k.X(at::mv(s, prm.sp_bv)).view({b, 1, 1}), uX, x3)
                          : at::bmm(uX, x3);
    a_sp = k.A(lg).sigmoid_();
  } else {  // (s^T b_v would cancel in the softmax)
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
  return {out, a_ch4, a_sp4, {x, p, xp, g, v, z, mu, rstd, s, u, t, a_ch, a_sp}};
}

Backward backward_pp(bool paper, bool seq, const variable_list& sv, const PSAParams& prm_in,
                     const Tensor& grad_out, bool need_dx) {
  const Tensor &x = sv[0], &p = sv[1], &xp = sv[2], &g = sv[3], &v = sv[4], &z = sv[5];
  const Tensor &mu = sv[6], &rstd = sv[7], &s = sv[8], &u = sv[9], &t = sv[10];
  const Tensor &a_ch = sv[11], &a_sp = sv[12];
  const int64_t b = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t n = h * w, c2 = c / 2;
  const Casts k(x);
  const PSAParams prm = prm_in.to(k.acc);
  const Tensor wq = prm.ch_wq, wv = prm.ch_wv.view({c2, c}), wz = prm.ch_wz.view({c, c2});
  const Tensor wsq = prm.sp_wq.view({c2, c}), wsv = prm.sp_wv.view({c2, c});
  const Tensor x3 = x.reshape({b, c, n});
  const Tensor g3 = grad_out.reshape({b, c, n});
  const Tensor a_ch_x = k.X(a_ch).unsqueeze(-1), a_sp_x = k.X(a_sp);
  const Tensor gs = seq ? g * a_ch : g;
  const Tensor ue = seq ? u * a_ch : u;
  Backward r;
  PSAParams& gr = r.grads;

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
  Tensor dg;
  auto spatial = [&](Tensor due) {
    if (seq) {
      da_ch = at::addcmul(da_ch, due, u);
      due = due * a_ch;
    }
    gr.sp_wv = at::mm(s.t(), due);     // (C/2, C)
    Tensor ds = at::mm(due, wsv.t());  // (B, C/2)
    if (prm.sp_bv.defined()) {
      const Tensor dc = dlg.sum(-1);  // (B, 1): d(s^T b_sv)
      ds = at::addcmul(ds, dc, prm.sp_bv);
      gr.sp_bv = at::mm(dc.t(), s);
    }
    if (paper) ds = at::_softmax_backward_data(ds, s, -1, k.acc);
    if (prm.sp_bq.defined()) gr.sp_bq = ds.sum(0);
    gr.sp_wq = at::mm(ds.t(), gs);
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
  if (prm.ch_ln_w.defined()) {
    auto lnb = at::native_layer_norm_backward(dz, z, {c}, mu, rstd, prm.ch_ln_w, prm.ch_ln_b,
                                              {true, true, prm.ch_ln_b.defined()});
    dz = std::get<0>(lnb), gr.ch_ln_w = std::get<1>(lnb), gr.ch_ln_b = std::get<2>(lnb);
  }
  gr.ch_wz = at::mm(dz.t(), v);  // (C, C/2)
  if (prm.ch_bz.defined()) gr.ch_bz = dz.sum(0);
  const Tensor dv = at::mm(dz, wz);  // (B, C/2)
  gr.ch_wv = at::mm(dv.t(), xp);     // (C/2, C)
  if (prm.ch_bv.defined()) gr.ch_bv = dv.sum(0);
  const Tensor dxp = at::mm(dv, wv);  // (B, C)
  // p = softmax(w_q^T X):  dp = X^T dxp
  const Tensor dp = at::bmm(k.X(dxp).unsqueeze(1), x3);  // (B, 1, HW)
  const Tensor dqr = at::_softmax_backward_data(k.A(dp), p, -1, k.acc);
  if (prm.ch_bq.defined()) gr.ch_bq = dqr.sum();

  if (seq) {
    gr.ch_wq = k.A(at::bmm(k.X(dqr), x3.transpose(1, 2))).sum(0);
  } else {  // one pass over X for both: [dlg, dqr] X^T
    const Tensor r2 = k.A(at::bmm(k.X(at::cat({dlg, dqr}, 1)), x3.transpose(1, 2)));
    gr.ch_wq = r2.select(1, 1).sum(0);  // r2: (B, 2, C)
    spatial(r2.select(1, 0));
  }

  if (need_dx) {
    // dX = dOut * M + [w_q, dg / HW, dxp, ue] [dqr, 1, p, dlg]^T
    at::mul_out(gx, g3, a_ch_x);
    if (seq) {  // M = a_ch a_sp^T
      gx.mul_(a_sp_x);
    } else {  // M = a_ch + a_sp
      gx.addcmul_(g3, a_sp_x);
    }
    const Tensor uu =
        at::stack({wq.view({1, c}).expand({b, c}), dg * (1.0 / n), dxp, ue}, -1);  // (B, C, 4)
    const Tensor vv =
        at::cat({dqr, at::ones({1, 1, 1}, p.options()).expand({b, 1, n}), p, dlg}, 1);
    gx.baddbmm_(k.X(uu), k.X(vv));  // (B, 4, HW)
    r.dx = gx4;
  }
  return r;
}

}  // namespace mmpsa
