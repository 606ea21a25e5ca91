// Official PSA_s in ATen ops only. Its spatial branch applies a per-channel softmax over
// pixels to W_v(a_ch * X) = (W_v diag(a_ch)) X, a (C/2, HW) tensor that does not fuse: it
// is computed with a_ch folded into W_v (a_ch * X is never made) and recomputed in
// backward, so that only O(B (C + HW)) is kept.
#include <tuple>

#include "psa_fused.h"

namespace mmpsa {

// Saved: x, p, xp, g, v, z1, mu, rstd, r1, a_ch, avg, a_sp.
Forward forward_s(const Tensor& x, const PSAParams& prm_in) {
  const int64_t b = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t n = h * w, c2 = c / 2;
  const Casts k(x);
  const PSAParams prm = prm_in.to(k.acc);
  const int64_t c8 = prm.ch_wz.size(0);
  const Tensor wsq = prm.sp_wq.view({c2, c}), wsv = prm.sp_wv.view({c2, c});
  const Tensor x3 = x.reshape({b, c, n});

  // channel branch (the released `spatial_pool`), as in PSA_p but for conv_up
  const ChannelPool cp = channel_pool(x3, prm.ch_wq, k);
  const Tensor &p = cp.p, &xp = cp.xp, &g = cp.g;  // X p, GP(X)
  const Tensor v = linear(xp, prm.ch_wv, prm.ch_bv);  // (B, C/2)
  const Tensor z1 = linear(v, prm.ch_wz, prm.ch_bz);  // (B, C/8)
  auto ln = at::native_layer_norm(z1, {c8}, prm.ch_ln_w.view({c8}),
                                  prm.ch_ln_b.defined() ? prm.ch_ln_b.view({c8}) : Tensor(),
                                  prm.ln_eps);
  const Tensor r1 = std::get<0>(ln).relu_();
  const Tensor a_ch = linear(r1, prm.ch_wz2, prm.ch_bz2).sigmoid_();  // (B, C)

  // spatial branch (the released `channel_pool`) on Y = a_ch * X
  const Tensor avg = linear(g * a_ch, wsq, prm.sp_bq);         // W_q GP(Y): (B, C/2)
  const Tensor wva = wsv.unsqueeze(0) * a_ch.unsqueeze(1);      // W_v diag(a_ch)
  Tensor tt = at::softmax(at::bmm(k.X(wva), x3), -1, k.acc);    // (B, C/2, HW)
  const Tensor a_sp = at::bmm(avg.unsqueeze(1), tt).sigmoid_();  // (B, 1, HW)
  tt.reset();

  const Tensor a_ch4 = a_ch.view({b, c, 1, 1}), a_sp4 = a_sp.view({b, 1, h, w});
  Tensor out = at::mul(x, k.X(a_ch4));
  out.mul_(k.X(a_sp4));
  return {out, a_ch4, a_sp4,
          {x, p, xp, g, v, z1, std::get<1>(ln), std::get<2>(ln), r1, a_ch, avg, a_sp}};
}

Backward backward_s(const variable_list& sv, const PSAParams& prm_in, const Tensor& grad_out,
                    bool need_dx) {
  const Tensor &x = sv[0], &p = sv[1], &xp = sv[2], &g = sv[3], &v = sv[4], &z1 = sv[5];
  const Tensor &mu = sv[6], &rstd = sv[7], &r1 = sv[8], &a_ch = sv[9], &avg = sv[10];
  const Tensor &a_sp = sv[11];
  const int64_t b = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t n = h * w, c2 = c / 2;
  const Casts k(x);
  const PSAParams prm = prm_in.to(k.acc);
  const int64_t c8 = prm.ch_wz.size(0);
  const Tensor wq = prm.ch_wq, wv = prm.ch_wv.view({c2, c}), w1 = prm.ch_wz.view({c8, c2});
  const Tensor lnw = prm.ch_ln_w.view({c8});
  const Tensor lnb = prm.ch_ln_b.defined() ? prm.ch_ln_b.view({c8}) : Tensor();
  const Tensor w2 = prm.ch_wz2.view({c, c8});
  const Tensor wsq = prm.sp_wq.view({c2, c}), wsv = prm.sp_wv.view({c2, c});
  const Tensor x3 = x.reshape({b, c, n});
  const Tensor g3 = grad_out.reshape({b, c, n});
  const Tensor a_ch_x = k.X(a_ch).unsqueeze(-1), a_sp_x = k.X(a_sp);
  const Tensor gs = g * a_ch;
  Backward r;
  PSAParams& gr = r.grads;

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
  gr.sp_wv = (dwva * a_ch.unsqueeze(1)).sum(0);
  da_ch = da_ch + (dwva * wsv).sum(1);
  gr.sp_wq = at::mm(davg.t(), gs);
  if (prm.sp_bq.defined()) gr.sp_bq = davg.sum(0);
  const Tensor dgs = at::mm(davg, wsq);  // d GP(Y)
  da_ch = at::addcmul(da_ch, dgs, g);
  const Tensor dg = dgs * a_ch;

  // channel branch: a_ch = sigmoid(W2 relu(LN(W1 (W_v X p) + b1)) + b2)
  const Tensor dz = at::sigmoid_backward(da_ch, a_ch);
  gr.ch_wz2 = at::mm(dz.t(), r1);
  if (prm.ch_bz2.defined()) gr.ch_bz2 = dz.sum(0);
  const Tensor dr1 = at::mm(dz, w2).masked_fill_(r1 <= 0, 0);
  auto lnb_grads = at::native_layer_norm_backward(dr1, z1, {c8}, mu, rstd, lnw, lnb,
                                                  {true, true, lnb.defined()});
  const Tensor dz1 = std::get<0>(lnb_grads);
  gr.ch_ln_w = std::get<1>(lnb_grads), gr.ch_ln_b = std::get<2>(lnb_grads);
  gr.ch_wz = at::mm(dz1.t(), v);
  if (prm.ch_bz.defined()) gr.ch_bz = dz1.sum(0);
  const Tensor dv = at::mm(dz1, w1);
  gr.ch_wv = at::mm(dv.t(), xp);
  if (prm.ch_bv.defined()) gr.ch_bv = dv.sum(0);
  const Tensor dxp = at::mm(dv, wv);
  const Tensor dqr =
      at::_softmax_backward_data(k.A(at::bmm(k.X(dxp).unsqueeze(1), x3)), p, -1, k.acc);
  gr.ch_wq = k.A(at::bmm(k.X(dqr), x3.transpose(1, 2))).sum(0);
  if (prm.ch_bq.defined()) gr.ch_bq = dqr.sum();

  if (need_dx) {
    // dX = dOut * a_ch a_sp^T + (diag(avg) W_v diag(a_ch))^T D
    //      + [w_q, dg / HW, dxp] [dqr, 1, p]^T
    at::mul_out(gx, g3, a_ch_x);
    gx.mul_(a_sp_x);
    gx.baddbmm_(k.X(wva * avg.unsqueeze(-1)).transpose(1, 2), k.X(dd));
    const Tensor uu = at::stack({wq.view({1, c}).expand({b, c}), dg * (1.0 / n), dxp}, -1);
    const Tensor vv = at::cat({dqr, at::ones({1, 1, 1}, p.options()).expand({b, 1, n}), p}, 1);
    gx.baddbmm_(k.X(uu), k.X(vv));  // (B, C, 3) x (B, 3, HW)
    r.dx = gx4;
  }
  return r;
}

}  // namespace mmpsa
