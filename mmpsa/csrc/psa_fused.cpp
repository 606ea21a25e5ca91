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
// about a third of it. Two evaluations sit behind the one Function (FusedPSA below):
// forward_pp/backward_pp and forward_s/backward_s call ATen ops only, so they run on
// every device and dtype ATen supports; for small or batched contiguous CPU input the
// paper variant and official PSA_p take a per-sample loop kernel instead (namespace
// cpu; see there for why). The Python side (psa_fused.py) keeps the same maths as
// plain differentiable ops for torch.jit tracing and torch.compile/export, and as the
// fallback when this extension is not built.
#include <ATen/OpMathType.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
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
// CPU fast path for the paper variant (both modes) and official PSA_p: the maths of
// forward_pp / backward_pp, evaluated per sample in plain loops (one sample per thread,
// at::parallel_for over the batch). Why a second evaluation: at the HRNet shapes
// forward_pp/backward_pp are ~50 ATen ops of a few microseconds each on tensors of a few
// hundred elements, which made the block only ~x4 faster than the literal form. Here
// the per-sample vector maths costs no dispatch, the passes over X are fused (4 in
// forward, 4-5 in backward), the saved vectors share one buffer, and the weight
// gradients are summed over the batch in loops. Only the softmax/sigmoid over pixels
// call ATen (its SIMD exp). Taken for contiguous CPU inputs that fill the threads or are
// small (use_cpu_kernel); forward_pp/backward_pp serve every other input, device and
// layout. The tests run both against the literal form.
// ---------------------------------------------------------------------------------
namespace cpu {

template <typename T>
inline T sigmoid(T v) {
  return T(1) / (T(1) + std::exp(-v));
}

// In-place softmax of v[0:len].
template <typename T>
void softmax_(T* v, int64_t len) {
  T m = v[0];
  for (int64_t i = 1; i < len; ++i) m = std::max(m, v[i]);
  T sum = 0;
  for (int64_t i = 0; i < len; ++i) {
    v[i] = std::exp(v[i] - m);
    sum += v[i];
  }
  const T inv = T(1) / sum;
  for (int64_t i = 0; i < len; ++i) v[i] *= inv;
}

// out = softmax(in) and out = sigmoid(out) over len contiguous values, through ATen's
// CPU kernels: their SIMD exp is several times faster than a std::exp loop (which cost
// two thirds of the forward at HW = 3072). Called inside at::parallel_for, they run on
// the calling thread.
template <typename T>
void softmax_out(const T* in, T* out, int64_t len) {
  const auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  Tensor to = at::from_blob(out, {len}, opt);
  at::_softmax_out(to, at::from_blob(const_cast<T*>(in), {len}, opt), 0, false);
}

template <typename T>
void sigmoid_(T* v, int64_t len) {
  at::from_blob(v, {len}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value))
      .sigmoid_();
}

// d <- y * (d - <d, y>): the softmax backward, in place, y the softmax output.
template <typename T>
void softmax_backward_(T* d, const T* y, int64_t len) {
  T dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t i = 0; i < len; ++i) dot += d[i] * y[i];
  for (int64_t i = 0; i < len; ++i) d[i] = y[i] * (d[i] - dot);
}

// y = W v (+ b): W (rows, cols) row-major.
template <typename T>
void matvec(const T* W, const T* v, const T* b, T* y, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* w = W + r * cols;
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < cols; ++i) acc += w[i] * v[i];
    y[r] = b ? acc + b[r] : acc;
  }
}

// y = W^T v: W (rows, cols) row-major, v (rows), y (cols).
template <typename T>
void matvec_t(const T* W, const T* v, T* y, int64_t rows, int64_t cols) {
  std::fill(y, y + cols, T(0));
  for (int64_t r = 0; r < rows; ++r) {
    const T* w = W + r * cols;
    const T vr = v[r];
#pragma omp simd
    for (int64_t i = 0; i < cols; ++i) y[i] += vr * w[i];
  }
}

// out[n] = c0 + sum_c coef[c] X[c, n] (X (C, N) row-major, any element type).
template <typename S, typename T>
void combine_rows(const S* X, const T* coef, T c0, T* out, int64_t C, int64_t N) {
  std::fill(out, out + N, c0);
  for (int64_t c = 0; c < C; ++c) {
    const S* row = X + c * N;
    const T k = coef[c];
#pragma omp simd
    for (int64_t i = 0; i < N; ++i) out[i] += k * static_cast<T>(row[i]);
  }
}

// Parameters and shape of a block, parameters in the accumulation type (contiguous).
template <typename T>
struct Block {
  const T *wq, *wv, *bv, *wz, *bz, *gamma, *beta, *wsq, *bsq, *wsv, *bsv;
  int64_t c, c2, n;
  bool paper, seq;
  T eps;
};

template <typename T>
Block<T> make_block(const std::vector<Tensor>& prm, bool paper, bool seq, double eps,
                    int64_t c, int64_t n) {
  auto ptr = [](const Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; };
  Block<T> k{};
  if (paper) {
    k.wq = ptr(prm[0]), k.wv = ptr(prm[2]), k.bv = ptr(prm[3]), k.wz = ptr(prm[4]);
    k.bz = ptr(prm[5]), k.gamma = ptr(prm[6]), k.beta = ptr(prm[7]), k.wsq = ptr(prm[8]);
    k.bsq = ptr(prm[9]), k.wsv = ptr(prm[10]), k.bsv = ptr(prm[11]);
  } else {
    k.wq = ptr(prm[0]), k.wv = ptr(prm[1]), k.wz = ptr(prm[2]), k.wsq = ptr(prm[3]);
    k.wsv = ptr(prm[4]);
  }
  k.c = c, k.c2 = c / 2, k.n = n, k.paper = paper, k.seq = seq, k.eps = static_cast<T>(eps);
  return k;
}

// Forward of one sample. x (C, N); writes out (C, N) and the saved vectors.
template <typename S, typename T>
void forward_sample(const Block<T>& k, const S* x, S* out, T* p, T* xp, T* g, T* v, T* z,
                    T* mu, T* rstd, T* s, T* u, T* t, T* a_ch, T* a_sp, T* tmp_c,
                    T* tmp_n) {
  const int64_t C = k.c, C2 = k.c2, N = k.n;
  // channel-only branch: p = softmax(w_q^T X); X p and GP(X) in one pass
  combine_rows(x, k.wq, T(0), tmp_n, C, N);
  softmax_out(tmp_n, p, N);
  const T inv_n = T(1) / static_cast<T>(N);
  for (int64_t c = 0; c < C; ++c) {
    const S* row = x + c * N;
    T sp = 0, sg = 0;
#pragma omp simd reduction(+ : sp, sg)
    for (int64_t i = 0; i < N; ++i) {
      const T xv = static_cast<T>(row[i]);
      sp += xv * p[i];
      sg += xv;
    }
    xp[c] = sp, g[c] = sg * inv_n;
  }
  matvec(k.wv, xp, k.bv, v, C2, C);
  matvec(k.wz, v, k.bz, z, C, C2);
  if (k.paper) {  // LayerNorm over the C channel weights, then sigmoid
    T m = 0;
    for (int64_t c = 0; c < C; ++c) m += z[c];
    m /= static_cast<T>(C);
    T var = 0;
    for (int64_t c = 0; c < C; ++c) var += (z[c] - m) * (z[c] - m);
    const T r = T(1) / std::sqrt(var / static_cast<T>(C) + k.eps);
    *mu = m, *rstd = r;
    for (int64_t c = 0; c < C; ++c) a_ch[c] = sigmoid((z[c] - m) * r * k.gamma[c] + k.beta[c]);
  } else {
    for (int64_t c = 0; c < C; ++c) a_ch[c] = sigmoid(z[c]);
  }
  // spatial-only branch: a_sp = sigmoid(u^T X + s^T b_v), u = W_v^T s
  T* gs = tmp_c;
  for (int64_t c = 0; c < C; ++c) gs[c] = k.seq ? g[c] * a_ch[c] : g[c];
  matvec(k.wsq, gs, k.bsq, s, C2, C);
  if (k.paper) softmax_(s, C2);
  matvec_t(k.wsv, s, u, C2, C);
  T c0 = 0;
  if (k.paper) {
    for (int64_t j = 0; j < C2; ++j) c0 += s[j] * k.bsv[j];
  }
  T* ue = tmp_c;  // gs is no longer needed
  for (int64_t c = 0; c < C; ++c) ue[c] = k.seq ? u[c] * a_ch[c] : u[c];
  if (k.paper) {
    combine_rows(x, ue, c0, a_sp, C, N);
  } else {
    combine_rows(x, ue, T(0), tmp_n, C, N);
    softmax_out(tmp_n, t, N);
    std::copy(t, t + N, a_sp);
  }
  sigmoid_(a_sp, N);
  for (int64_t c = 0; c < C; ++c) {
    const S* row = x + c * N;
    S* o = out + c * N;
    const T ac = a_ch[c];
    if (k.seq) {
#pragma omp simd
      for (int64_t i = 0; i < N; ++i) o[i] = static_cast<S>(static_cast<T>(row[i]) * ac * a_sp[i]);
    } else {
#pragma omp simd
      for (int64_t i = 0; i < N; ++i) o[i] = static_cast<S>(static_cast<T>(row[i]) * (ac + a_sp[i]));
    }
  }
}

// Per-sample results of backward that the cross-sample reductions need.
template <typename T>
struct SampleGrads {
  T *dz, *dv, *due, *ds, *gs;  // rows of the weight-gradient products
  T *dwq, *dgamma, *dbeta;     // per-sample parts of w_q's and the LayerNorm's gradients
  T *dc, *dqr_sum;             // d(s^T b_sv) and sum of d(w_q^T X) (the b_q gradient)
};

// Backward of one sample: writes dx (C, N) (if dx) and the per-sample rows of sg.
template <typename S, typename T>
void backward_sample(const Block<T>& k, const S* x, const S* go, S* dx, const T* p,
                     const T* xp, const T* g, const T* z, T mu, T rstd, const T* s,
                     const T* u, const T* t, const T* a_ch, const T* a_sp,
                     const SampleGrads<T>& sg, T* da_ch, T* dlg, T* dqr, T* ue, T* dg,
                     T* dxp, T* due_in) {
  const int64_t C = k.c, C2 = k.c2, N = k.n;
  // d/d(a_ch), d/d(a_sp) of X * (a_ch + a_sp) or X * a_ch * a_sp, in one pass
  std::fill(dlg, dlg + N, T(0));  // holds d(a_sp) first
  for (int64_t c = 0; c < C; ++c) {
    const S* xr = x + c * N;
    const S* gr = go + c * N;
    const T ac = k.seq ? a_ch[c] : T(1);
    T acc = 0;
    if (k.seq) {
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < N; ++i) {
        const T gx = static_cast<T>(gr[i]) * static_cast<T>(xr[i]);
        acc += gx * a_sp[i];
        dlg[i] += gx * ac;
      }
    } else {
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < N; ++i) {
        const T gx = static_cast<T>(gr[i]) * static_cast<T>(xr[i]);
        acc += gx;
        dlg[i] += gx;
      }
    }
    da_ch[c] = acc;
  }
  for (int64_t i = 0; i < N; ++i) dlg[i] *= a_sp[i] * (T(1) - a_sp[i]);
  if (!k.paper) softmax_backward_(dlg, t, N);
  T dc = 0;
  if (k.paper) {
    for (int64_t i = 0; i < N; ++i) dc += dlg[i];
  }
  *sg.dc = dc;
  for (int64_t c = 0; c < C; ++c) ue[c] = k.seq ? u[c] * a_ch[c] : u[c];

  // from d(ue) to the spatial rows (due, ds, gs) and d(GP(X)) (and d(a_ch))
  auto spatial = [&]() {
    T* due = sg.due;
    for (int64_t c = 0; c < C; ++c) {
      if (k.seq) {
        da_ch[c] += due_in[c] * u[c];
        due[c] = due_in[c] * a_ch[c];
      } else {
        due[c] = due_in[c];
      }
    }
    T* ds = sg.ds;
    matvec(k.wsv, due, static_cast<const T*>(nullptr), ds, C2, C);
    if (k.paper) {
      for (int64_t j = 0; j < C2; ++j) ds[j] += dc * k.bsv[j];
      softmax_backward_(ds, s, C2);
    }
    matvec_t(k.wsq, ds, dg, C2, C);  // d(GP of the branch input)
    for (int64_t c = 0; c < C; ++c) {
      sg.gs[c] = k.seq ? g[c] * a_ch[c] : g[c];
      if (k.seq) {
        da_ch[c] += dg[c] * g[c];
        dg[c] *= a_ch[c];
      }
    }
  };

  if (k.seq) {  // d(a_ch) needs the spatial branch first: d(ue) = X dlg
    for (int64_t c = 0; c < C; ++c) {
      const S* xr = x + c * N;
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < N; ++i) acc += static_cast<T>(xr[i]) * dlg[i];
      due_in[c] = acc;
    }
    spatial();
  }

  // channel branch, down to xp = X p
  T* dz = sg.dz;
  for (int64_t c = 0; c < C; ++c) dz[c] = da_ch[c] * a_ch[c] * (T(1) - a_ch[c]);
  if (k.paper) {  // LayerNorm backward
    T m1 = 0, m2 = 0;
    for (int64_t c = 0; c < C; ++c) {
      const T xh = (z[c] - mu) * rstd;
      const T dxh = dz[c] * k.gamma[c];
      sg.dgamma[c] = dz[c] * xh;
      sg.dbeta[c] = dz[c];
      m1 += dxh;
      m2 += dxh * xh;
    }
    m1 /= static_cast<T>(C), m2 /= static_cast<T>(C);
    for (int64_t c = 0; c < C; ++c) {
      const T xh = (z[c] - mu) * rstd;
      dz[c] = rstd * (dz[c] * k.gamma[c] - m1 - xh * m2);
    }
  }
  matvec_t(k.wz, dz, sg.dv, C, C2);  // dv = Wz^T dz
  matvec_t(k.wv, sg.dv, dxp, C2, C);  // dxp = Wv^T dv
  combine_rows(x, dxp, T(0), dqr, C, N);  // dp = X^T dxp
  softmax_backward_(dqr, p, N);
  T qsum = 0;
  for (int64_t i = 0; i < N; ++i) qsum += dqr[i];
  *sg.dqr_sum = qsum;

  // w_q's gradient X dqr, and (parallel) d(ue) = X dlg, in one pass
  for (int64_t c = 0; c < C; ++c) {
    const S* xr = x + c * N;
    T aq = 0, al = 0;
    if (k.seq) {
#pragma omp simd reduction(+ : aq)
      for (int64_t i = 0; i < N; ++i) aq += static_cast<T>(xr[i]) * dqr[i];
    } else {
#pragma omp simd reduction(+ : aq, al)
      for (int64_t i = 0; i < N; ++i) {
        const T xv = static_cast<T>(xr[i]);
        aq += xv * dqr[i];
        al += xv * dlg[i];
      }
      due_in[c] = al;
    }
    sg.dwq[c] = aq;
  }
  if (!k.seq) spatial();

  if (dx) {
    // dX = dOut * M + w_q dqr^T + dg / HW + dxp p^T + ue dlg^T
    const T inv_n = T(1) / static_cast<T>(N);
    for (int64_t c = 0; c < C; ++c) {
      const S* gr = go + c * N;
      S* o = dx + c * N;
      const T ac = a_ch[c], wq = k.wq[c], dgc = dg[c] * inv_n, dxc = dxp[c], uc = ue[c];
      if (k.seq) {
#pragma omp simd
        for (int64_t i = 0; i < N; ++i)
          o[i] = static_cast<S>(static_cast<T>(gr[i]) * ac * a_sp[i] + wq * dqr[i] + dgc +
                                dxc * p[i] + uc * dlg[i]);
      } else {
#pragma omp simd
        for (int64_t i = 0; i < N; ++i)
          o[i] = static_cast<S>(static_cast<T>(gr[i]) * (ac + a_sp[i]) + wq * dqr[i] + dgc +
                                dxc * p[i] + uc * dlg[i]);
      }
    }
  }
}

}  // namespace cpu

// Whether forward_pp_cpu/backward_pp_cpu take an input: contiguous on the CPU, and a
// batch that fills the threads (one sample per thread) or at most 2^18 elements per
// sample (every HRNet-W32/W48 shape at 256x192). Measured here (2 threads, fwd+bwd):
// batch 2, the kernel takes 0.5-0.85x the time of forward_pp/backward_pp at every
// shape tried, from C=256@8x6 to C=512@64x128; batch 1 at C=512@64x128, 1.3x (one
// thread against ATen's two).
bool use_cpu_kernel(const Tensor& x) {
  const int64_t b = x.size(0);
  return x.is_cpu() && x.is_contiguous() && b > 0 &&
         (b >= at::get_num_threads() || x.numel() / b <= (1 << 18));
}

// One buffer for the per-sample vectors that forward_pp saves as separate tensors:
// field-major, each field (B, len) contiguous. One allocation and one saved tensor
// instead of twelve (each costs ~1-2 us at these sizes).
struct Layout {
  int64_t p, xp, g, v, z, mu, rstd, s, u, t, a_ch, a_sp, total;
  Layout(int64_t b, int64_t c, int64_t n) {
    int64_t o = 0;
    auto field = [&](int64_t len) { const int64_t at = o; o += b * len; return at; };
    p = field(n), xp = field(c), g = field(c), v = field(c / 2), z = field(c);
    mu = field(1), rstd = field(1), s = field(c / 2), u = field(c), t = field(n);
    a_ch = field(c), a_sp = field(n), total = o;
  }
};

// out[i, j] = sum_b L[b, i] R[b, j] (the weight gradients), rows split over threads.
template <typename T>
void outer_sum(const T* L, const T* R, T* out, int64_t b, int64_t rows, int64_t cols) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / cols), [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      T* o = out + i * cols;
      std::fill(o, o + cols, T(0));
      for (int64_t k = 0; k < b; ++k) {
        const T l = L[k * rows + i];
        const T* r = R + k * cols;
#pragma omp simd
        for (int64_t j = 0; j < cols; ++j) o[j] += l * r[j];
      }
    }
  });
}

// out[j] = sum_b M[b, j] (* w[b] if w).
template <typename T>
void sum_rows(const T* M, const T* w, T* out, int64_t b, int64_t len) {
  std::fill(out, out + len, T(0));
  for (int64_t k = 0; k < b; ++k) {
    const T wk = w ? w[k] : T(1);
    for (int64_t j = 0; j < len; ++j) out[j] += wk * M[k * len + j];
  }
}

constexpr int kSavedCpu = 2;  // x, the Layout buffer; then the parameters

variable_list forward_pp_cpu(AutogradContext* ctx, bool paper, bool seq, double eps,
                             const Tensor& x, at::TensorList params_in) {
  const int64_t b = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t n = h * w, c2 = c / 2;
  const Casts k(x);
  auto prm = to_acc(params_in, k.acc);
  for (auto& t : prm) t = t.contiguous();
  const Layout lay(b, c, n);
  const Tensor buf = at::empty({lay.total}, x.options().dtype(k.acc));
  Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "psa_forward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto blk = cpu::make_block<T>(prm, paper, seq, eps, c, n);
    const scalar_t* xd = x.const_data_ptr<scalar_t>();
    scalar_t* od = out.data_ptr<scalar_t>();
    T* bd = buf.data_ptr<T>();
    at::parallel_for(0, b, 1, [&](int64_t b0, int64_t b1) {
      std::vector<T> tmp(c + n);
      for (int64_t i = b0; i < b1; ++i) {
        cpu::forward_sample<scalar_t, T>(
            blk, xd + i * c * n, od + i * c * n, bd + lay.p + i * n, bd + lay.xp + i * c,
            bd + lay.g + i * c, bd + lay.v + i * c2, bd + lay.z + i * c, bd + lay.mu + i,
            bd + lay.rstd + i, bd + lay.s + i * c2, bd + lay.u + i * c, bd + lay.t + i * n,
            bd + lay.a_ch + i * c, bd + lay.a_sp + i * n, tmp.data(), tmp.data() + c);
      }
    });
  });
  variable_list saved = {x, buf};
  saved.insert(saved.end(), params_in.begin(), params_in.end());
  ctx->save_for_backward(saved);
  return {out, buf.narrow(0, lay.a_ch, b * c).view({b, c, 1, 1}),
          buf.narrow(0, lay.a_sp, b * n).view({b, 1, h, w})};
}

variable_list backward_pp_cpu(AutogradContext* ctx, const variable_list& sv, bool paper,
                              bool seq, const Tensor& grad_out) {
  const Tensor &x = sv[0], &buf = sv[1];
  const at::TensorList params_in(sv.data() + kSavedCpu, sv.size() - kSavedCpu);
  const int64_t b = x.size(0), c = x.size(1), n = x.size(2) * x.size(3), c2 = c / 2;
  const Casts k(x);
  auto prm = to_acc(params_in, k.acc);
  for (auto& q : prm) q = q.contiguous();
  const Tensor go = grad_out.contiguous();
  const auto opt = x.options().dtype(k.acc);
  const Layout lay(b, c, n);
  // per-sample rows (field-major): dz, dv, due, ds, gs, dwq, dgamma, dbeta, dc, dqr_sum
  const int64_t rdz = 0, rdv = rdz + b * c, rdue = rdv + b * c2, rds = rdue + b * c;
  const int64_t rgs = rds + b * c2, rdwq = rgs + b * c, rdgam = rdwq + b * c;
  const int64_t rdbet = rdgam + b * c, rdc = rdbet + b * c, rdq = rdc + b;
  const Tensor rows = at::empty({rdq + b}, opt);
  Tensor dx = ctx->needs_input_grad(0) ? at::empty_like(x) : Tensor();
  // parameter gradients, in the parameters' shapes (accumulation dtype)
  std::vector<Tensor> pg;
  for (const auto& q : params_in) pg.push_back(at::empty(q.sizes(), opt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "psa_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto blk = cpu::make_block<T>(prm, paper, seq, 0.0, c, n);
    const scalar_t* xd = x.const_data_ptr<scalar_t>();
    const scalar_t* gd = go.const_data_ptr<scalar_t>();
    scalar_t* dxd = dx.defined() ? dx.data_ptr<scalar_t>() : nullptr;
    const T* bd = buf.const_data_ptr<T>();
    T* rd = rows.data_ptr<T>();
    at::parallel_for(0, b, 1, [&](int64_t b0, int64_t b1) {
      std::vector<T> scratch(5 * c + 2 * n);
      T *da_ch = scratch.data(), *ue = da_ch + c, *dg = ue + c, *dxp = dg + c;
      T *due_in = dxp + c, *dlg = due_in + c, *dqr = dlg + n;
      for (int64_t i = b0; i < b1; ++i) {
        const cpu::SampleGrads<T> sg{rd + rdz + i * c,   rd + rdv + i * c2,  rd + rdue + i * c,
                                     rd + rds + i * c2,  rd + rgs + i * c,   rd + rdwq + i * c,
                                     rd + rdgam + i * c, rd + rdbet + i * c, rd + rdc + i,
                                     rd + rdq + i};
        cpu::backward_sample<scalar_t, T>(
            blk, xd + i * c * n, gd + i * c * n, dxd ? dxd + i * c * n : nullptr,
            bd + lay.p + i * n, bd + lay.xp + i * c, bd + lay.g + i * c, bd + lay.z + i * c,
            bd[lay.mu + i], bd[lay.rstd + i], bd + lay.s + i * c2, bd + lay.u + i * c,
            bd + lay.t + i * n, bd + lay.a_ch + i * c, bd + lay.a_sp + i * n, sg, da_ch, dlg,
            dqr, ue, dg, dxp, due_in);
      }
    });
    // the cross-sample sums
    auto out = [&](int idx) { return pg[idx].data_ptr<T>(); };
    if (paper) {  // wq, bq, wv, bv, wz, bz, gamma, beta, wsq, bsq, wsv, bsv
      sum_rows<T>(rd + rdwq, nullptr, out(0), b, c);
      sum_rows<T>(rd + rdq, nullptr, out(1), b, 1);
      outer_sum<T>(rd + rdv, bd + lay.xp, out(2), b, c2, c);
      sum_rows<T>(rd + rdv, nullptr, out(3), b, c2);
      outer_sum<T>(rd + rdz, bd + lay.v, out(4), b, c, c2);
      sum_rows<T>(rd + rdz, nullptr, out(5), b, c);
      sum_rows<T>(rd + rdgam, nullptr, out(6), b, c);
      sum_rows<T>(rd + rdbet, nullptr, out(7), b, c);
      outer_sum<T>(rd + rds, rd + rgs, out(8), b, c2, c);
      sum_rows<T>(rd + rds, nullptr, out(9), b, c2);
      outer_sum<T>(bd + lay.s, rd + rdue, out(10), b, c2, c);
      sum_rows<T>(bd + lay.s, rd + rdc, out(11), b, c2);
    } else {  // wq, wv, wz, wsq, wsv
      sum_rows<T>(rd + rdwq, nullptr, out(0), b, c);
      outer_sum<T>(rd + rdv, bd + lay.xp, out(1), b, c2, c);
      outer_sum<T>(rd + rdz, bd + lay.v, out(2), b, c, c2);
      outer_sum<T>(rd + rds, rd + rgs, out(3), b, c2, c);
      outer_sum<T>(bd + lay.s, rd + rdue, out(4), b, c2, c);
    }
  });
  variable_list grads = {dx};
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
                               double eps, bool cpu_kernel, at::TensorList params) {
    const bool fast = cpu_kernel && (paper || !seq) && use_cpu_kernel(x);
    variable_list outs;
    {
      // softmax, LayerNorm and the small vectors run in >= fp32 whatever autocast says
      c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
      if (!paper && seq) {
        outs = forward_s(ctx, eps, x, params);
      } else if (fast) {
        outs = forward_pp_cpu(ctx, paper, seq, eps, x, params);
      } else {
        outs = forward_pp(ctx, paper, seq, eps, x, params);
      }
    }
    ctx->saved_data["paper"] = paper;
    ctx->saved_data["seq"] = seq;
    ctx->saved_data["cpu"] = fast;
    ctx->mark_non_differentiable({outs[1], outs[2]});
    ctx->set_materialize_grads(false);
    return outs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const bool paper = ctx->saved_data["paper"].toBool();
    const bool seq = ctx->saved_data["seq"].toBool();
    // unpacking the ~25 saved tensors costs ~1 us each: once
    const variable_list sv = ctx->get_saved_variables();
    const bool fast = ctx->saved_data["cpu"].toBool();
    const size_t n_params = sv.size() - ((!paper && seq) ? kSavedS : fast ? kSavedCpu : kSavedPP);
    const Tensor& grad_out = grad_outputs[0];
    const bool create_graph = torch::autograd::GradMode::is_enabled();
    variable_list grads;
    if (!grad_out.defined()) {
      grads.resize(1 + n_params);
    } else {
      at::NoGradGuard no_grad;
      c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
      if (!paper && seq) {
        grads = backward_s(ctx, sv, grad_out);
      } else if (fast) {
        grads = backward_pp_cpu(ctx, sv, paper, seq, grad_out);
      } else {
        grads = backward_pp(ctx, sv, paper, seq, grad_out);
      }
    }
    if (create_graph) grads = once_differentiable(std::move(grads));
    // gradients for (x, paper, seq, eps, cpu_kernel, params...): none for the non-tensors
    variable_list out = {grads[0], Tensor(), Tensor(), Tensor(), Tensor()};
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
                              std::vector<Tensor> params, bool cpu_kernel) {
  return FusedPSA::apply(x, paper, sequential, eps, cpu_kernel, at::TensorList(params));
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
        "in the order of mmpsa.layers.psa_fused._params), cpu_kernel (bool: allow the "
        "per-sample CPU kernel; False forces the ATen-op path, for tests).",
        py::arg("x"), py::arg("paper"), py::arg("sequential"), py::arg("eps"),
        py::arg("params"), py::arg("cpu_kernel") = true);
}
