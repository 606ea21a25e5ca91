// CPU fast path for the paper variant (both modes) and official PSA_p: the maths of
// forward_pp / backward_pp (psa_aten.cpp), evaluated per sample in plain loops (one sample
// per thread, at::parallel_for over the batch). Why a second evaluation: at the HRNet
// shapes forward_pp/backward_pp are ~50 ATen ops of a few microseconds each on tensors of
// a few hundred elements, which made the block only ~x4 faster than the literal form.
// Here the per-sample vector maths costs no dispatch, the passes over X are fused (4 in
// forward, 4-5 in backward), the saved vectors share one buffer, and the weight
// gradients are summed over the batch in loops. Only the softmax/sigmoid over pixels
// call ATen (its SIMD exp). Taken for contiguous CPU inputs that fill the threads or are
// small (use_cpu_kernel); forward_pp/backward_pp serve every other input, device and
// layout. The tests run both against the literal form. Official PSA_s has its own
// evaluation at the end of this file (forward_s_cpu/backward_s_cpu), taken by the same rule.
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "psa_fused.h"

namespace mmpsa {
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

// X p and GP(X) in one pass over X (C, N): xp[c] = sum_i X[c,i] p[i], g[c] = mean_i X[c,i].
template <typename S, typename T>
void pool_rows(const S* x, const T* p, T* xp, T* g, int64_t C, int64_t N) {
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
}

// LayerNorm statistics of z (len): the mean and 1 / sqrt(var + eps).
template <typename T>
void layer_norm_stats(const T* z, int64_t len, T eps, T* mu, T* rstd) {
  T m = 0;
  for (int64_t i = 0; i < len; ++i) m += z[i];
  m /= static_cast<T>(len);
  T var = 0;
  for (int64_t i = 0; i < len; ++i) var += (z[i] - m) * (z[i] - m);
  *mu = m, *rstd = T(1) / std::sqrt(var / static_cast<T>(len) + eps);
}

// Parameters and shape of a block, parameters in the accumulation type (contiguous);
// absent ones are null. LayerNorm (gamma, beta) when ln.
template <typename T>
struct Block {
  const T *wq, *wv, *bv, *wz, *bz, *gamma, *beta, *wsq, *bsq, *wsv, *bsv;
  int64_t c, c2, n;
  bool paper, seq, ln;
  T eps;
};

// prm: in T, contiguous (PSAParams::to, then contiguous).
template <typename T>
Block<T> make_block(const PSAParams& prm, bool paper, bool seq, int64_t c, int64_t n) {
  auto ptr = [](const Tensor& t) { return t.defined() ? t.const_data_ptr<T>() : nullptr; };
  Block<T> k{};
  k.wq = ptr(prm.ch_wq), k.wv = ptr(prm.ch_wv), k.bv = ptr(prm.ch_bv);
  k.wz = ptr(prm.ch_wz), k.bz = ptr(prm.ch_bz);
  k.gamma = ptr(prm.ch_ln_w), k.beta = ptr(prm.ch_ln_b);
  k.wsq = ptr(prm.sp_wq), k.bsq = ptr(prm.sp_bq), k.wsv = ptr(prm.sp_wv), k.bsv = ptr(prm.sp_bv);
  k.c = c, k.c2 = c / 2, k.n = n, k.paper = paper, k.seq = seq, k.ln = prm.ch_ln_w.defined();
  k.eps = static_cast<T>(prm.ln_eps);
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
  pool_rows(x, p, xp, g, C, N);
  matvec(k.wv, xp, k.bv, v, C2, C);
  matvec(k.wz, v, k.bz, z, C, C2);
  if (k.ln) {  // LayerNorm over the C channel weights, then sigmoid
    layer_norm_stats(z, C, k.eps, mu, rstd);
    const T m = *mu, r = *rstd;
    for (int64_t c = 0; c < C; ++c) {
      a_ch[c] = sigmoid((z[c] - m) * r * k.gamma[c] + (k.beta ? k.beta[c] : T(0)));
    }
  } else {
    for (int64_t c = 0; c < C; ++c) a_ch[c] = sigmoid(z[c]);
  }
  // spatial-only branch: a_sp = sigmoid(u^T X + s^T b_v), u = W_v^T s
  T* gs = tmp_c;
  for (int64_t c = 0; c < C; ++c) gs[c] = k.seq ? g[c] * a_ch[c] : g[c];
  matvec(k.wsq, gs, k.bsq, s, C2, C);
  if (k.paper) softmax_(s, C2);
  matvec_t(k.wsv, s, u, C2, C);
  T c0 = 0;  // s^T b_v (official: would cancel in the softmax)
  if (k.bsv) {
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
  T dc = 0;  // d(s^T b_sv)
  if (k.bsv) {
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
    if (k.bsv) {
      for (int64_t j = 0; j < C2; ++j) ds[j] += dc * k.bsv[j];
    }
    if (k.paper) softmax_backward_(ds, s, C2);
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
  if (k.ln) {  // LayerNorm backward
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

// Saved: x, the Layout buffer.
Forward forward_pp_cpu(bool paper, bool seq, const Tensor& x, const PSAParams& prm_in) {
  TORCH_CHECK(!prm_in.ch_wz2.defined(), "the CPU kernel computes paper/PSA_p only");
  const int64_t b = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t n = h * w, c2 = c / 2;
  const Casts k(x);
  const PSAParams prm = prm_in.to(k.acc).map([](const Tensor& t) { return t.contiguous(); });
  const Layout lay(b, c, n);
  const Tensor buf = at::empty({lay.total}, x.options().dtype(k.acc));
  Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "psa_forward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto blk = cpu::make_block<T>(prm, paper, seq, c, n);
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
  return {out, buf.narrow(0, lay.a_ch, b * c).view({b, c, 1, 1}),
          buf.narrow(0, lay.a_sp, b * n).view({b, 1, h, w}), {x, buf}};
}

Backward backward_pp_cpu(bool paper, bool seq, const variable_list& sv, const PSAParams& prm_in,
                         const Tensor& grad_out, bool need_dx) {
  const Tensor &x = sv[0], &buf = sv[1];
  const int64_t b = x.size(0), c = x.size(1), n = x.size(2) * x.size(3), c2 = c / 2;
  const Casts k(x);
  const PSAParams prm = prm_in.to(k.acc).map([](const Tensor& t) { return t.contiguous(); });
  const Tensor go = grad_out.contiguous();
  const auto opt = x.options().dtype(k.acc);
  const Layout lay(b, c, n);
  // per-sample rows (field-major): dz, dv, due, ds, gs, dwq, dgamma, dbeta, dc, dqr_sum
  const int64_t rdz = 0, rdv = rdz + b * c, rdue = rdv + b * c2, rds = rdue + b * c;
  const int64_t rgs = rds + b * c2, rdwq = rgs + b * c, rdgam = rdwq + b * c;
  const int64_t rdbet = rdgam + b * c, rdc = rdbet + b * c, rdq = rdc + b;
  const Tensor rows = at::empty({rdq + b}, opt);
  Backward r;
  if (need_dx) r.dx = at::empty_like(x);
  // parameter gradients, in the parameters' shapes (accumulation dtype)
  PSAParams& gr = r.grads;
  gr = prm.map([&](const Tensor& q) { return at::empty(q.sizes(), opt); });
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "psa_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto blk = cpu::make_block<T>(prm, paper, seq, c, n);
    const scalar_t* xd = x.const_data_ptr<scalar_t>();
    const scalar_t* gd = go.const_data_ptr<scalar_t>();
    scalar_t* dxd = need_dx ? r.dx.data_ptr<scalar_t>() : nullptr;
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
    // the cross-sample sums, for the parameters the block has
    auto sum = [&](const Tensor& grad, const T* rows_, const T* wt, int64_t len) {
      if (grad.defined()) sum_rows<T>(rows_, wt, grad.data_ptr<T>(), b, len);
    };
    auto outer = [&](const Tensor& grad, const T* L, const T* R, int64_t m, int64_t len) {
      if (grad.defined()) outer_sum<T>(L, R, grad.data_ptr<T>(), b, m, len);
    };
    sum(gr.ch_wq, rd + rdwq, nullptr, c);
    sum(gr.ch_bq, rd + rdq, nullptr, 1);
    outer(gr.ch_wv, rd + rdv, bd + lay.xp, c2, c);
    sum(gr.ch_bv, rd + rdv, nullptr, c2);
    outer(gr.ch_wz, rd + rdz, bd + lay.v, c, c2);
    sum(gr.ch_bz, rd + rdz, nullptr, c);
    sum(gr.ch_ln_w, rd + rdgam, nullptr, c);
    sum(gr.ch_ln_b, rd + rdbet, nullptr, c);
    outer(gr.sp_wq, rd + rds, rd + rgs, c2, c);
    sum(gr.sp_bq, rd + rds, nullptr, c2);
    outer(gr.sp_wv, bd + lay.s, rd + rdue, c2, c);
    sum(gr.sp_bv, bd + lay.s, rd + rdc, c2);
  });
  return r;
}


// ---------------------------------------------------------------------- official PSA_s
// The maths of forward_s / backward_s (psa_official_s.cpp) for contiguous CPU inputs: the
// per-sample vector maths and the passes over X and over the (C/2, HW) tensor in loops
// (one sample per thread), and only the (C/2, HW) part's GEMMs with W_v diag(a_ch) (one
// in forward, three in backward) and its softmax over pixels (one each) as batched ATen
// ops (MKL's GEMM and ATen's SIMD softmax; ~6 ATen calls a step instead of ~70).
namespace cpu {

// Official PSA_s's parameters in the accumulation type (contiguous) and its shape; absent
// ones null. conv_up = (w1, b1) -> LayerNorm(gamma, beta) over C/8 -> ReLU -> (w2, b2).
template <typename T>
struct BlockS {
  const T *wq, *wv, *bv, *w1, *b1, *gamma, *beta, *w2, *b2, *wsq, *bsq, *wsv;
  int64_t c, c2, c8, n;
  T eps;
};

template <typename T>
BlockS<T> make_block_s(const PSAParams& prm, int64_t c, int64_t n) {
  auto ptr = [](const Tensor& t) { return t.defined() ? t.const_data_ptr<T>() : nullptr; };
  BlockS<T> k{};
  k.wq = ptr(prm.ch_wq), k.wv = ptr(prm.ch_wv), k.bv = ptr(prm.ch_bv);
  k.w1 = ptr(prm.ch_wz), k.b1 = ptr(prm.ch_bz), k.gamma = ptr(prm.ch_ln_w);
  k.beta = ptr(prm.ch_ln_b), k.w2 = ptr(prm.ch_wz2), k.b2 = ptr(prm.ch_bz2);
  k.wsq = ptr(prm.sp_wq), k.bsq = ptr(prm.sp_bq), k.wsv = ptr(prm.sp_wv);
  k.c = c, k.c2 = c / 2, k.c8 = prm.ch_wz.size(0), k.n = n;
  k.eps = static_cast<T>(prm.ln_eps);
  return k;
}

// wva = W_v diag(a_ch): (C/2, C).
template <typename T>
void fold_a_ch(const BlockS<T>& k, const T* a_ch, T* wva) {
  for (int64_t j = 0; j < k.c2; ++j) {
    const T* w = k.wsv + j * k.c;
    T* o = wva + j * k.c;
#pragma omp simd
    for (int64_t c = 0; c < k.c; ++c) o[c] = w[c] * a_ch[c];
  }
}

// Forward of one sample up to the spatial softmax: the channel branch (a_ch), the
// spatial query avg = W_q GP(a_ch X) + b_q and wva. x (C, N).
template <typename S, typename T>
void forward_s_vectors(const BlockS<T>& k, const S* x, T* p, T* xp, T* g, T* v, T* z1,
                       T* mu, T* rstd, T* r1, T* a_ch, T* avg, T* wva, T* tmp_c) {
  const int64_t C = k.c, C2 = k.c2, C8 = k.c8, N = k.n;
  // p = softmax(w_q^T X); X p and GP(X) in one pass
  combine_rows(x, k.wq, T(0), p, C, N);
  softmax_(p, N);
  pool_rows(x, p, xp, g, C, N);
  // a_ch = sigmoid(W2 relu(LN(W1 (W_v X p + b_v) + b1)) + b2)
  matvec(k.wv, xp, k.bv, v, C2, C);
  matvec(k.w1, v, k.b1, z1, C8, C2);
  layer_norm_stats(z1, C8, k.eps, mu, rstd);
  const T m = *mu, rs = *rstd;
  for (int64_t i = 0; i < C8; ++i) {
    const T ln = (z1[i] - m) * rs * k.gamma[i] + (k.beta ? k.beta[i] : T(0));
    r1[i] = ln > T(0) ? ln : T(0);
  }
  matvec(k.w2, r1, k.b2, a_ch, C, C8);
  for (int64_t c = 0; c < C; ++c) a_ch[c] = sigmoid(a_ch[c]);
  // spatial branch on a_ch X
  for (int64_t c = 0; c < C; ++c) tmp_c[c] = g[c] * a_ch[c];
  matvec(k.wsq, tmp_c, k.bsq, avg, C2, C);
  fold_a_ch(k, a_ch, wva);
}

// The rest of one sample's forward from T = softmax_HW(wva X) (C/2, N):
// a_sp = sigmoid(avg^T T), out = X * a_ch * a_sp.
template <typename S, typename T>
void forward_s_output(const BlockS<T>& k, const S* x, const T* tt, const T* a_ch,
                      const T* avg, T* a_sp, S* out) {
  const int64_t C = k.c, C2 = k.c2, N = k.n;
  std::fill(a_sp, a_sp + N, T(0));
  for (int64_t j = 0; j < C2; ++j) {
    const T* t = tt + j * N;
    const T aj = avg[j];
#pragma omp simd
    for (int64_t i = 0; i < N; ++i) a_sp[i] += aj * t[i];
  }
  for (int64_t i = 0; i < N; ++i) a_sp[i] = sigmoid(a_sp[i]);
  for (int64_t c = 0; c < C; ++c) {
    const S* row = x + c * N;
    S* o = out + c * N;
    const T ac = a_ch[c];
#pragma omp simd
    for (int64_t i = 0; i < N; ++i) o[i] = static_cast<S>(static_cast<T>(row[i]) * ac * a_sp[i]);
  }
}

// Backward, first pass of one sample: d(a_ch) from the output, dlg = d(avg^T T) and wva
// (recomputed).
template <typename S, typename T>
void backward_s_first(const BlockS<T>& k, const S* x, const S* go, const T* a_ch,
                      const T* a_sp, T* da_ch, T* dlg, T* wva) {
  const int64_t C = k.c, N = k.n;
  std::fill(dlg, dlg + N, T(0));  // d(a_sp) first
  for (int64_t c = 0; c < C; ++c) {
    const S* xr = x + c * N;
    const S* gr = go + c * N;
    const T ac = a_ch[c];
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < N; ++i) {
      const T gx = static_cast<T>(gr[i]) * static_cast<T>(xr[i]);
      acc += gx * a_sp[i];
      dlg[i] += gx * ac;
    }
    da_ch[c] = acc;
  }
  for (int64_t i = 0; i < N; ++i) dlg[i] *= a_sp[i] * (T(1) - a_sp[i]);
  fold_a_ch(k, a_ch, wva);
}

// From T (C/2, N) to d(theta) = diag(avg) (T * (dlg - T dlg)), in place; davg = T dlg.
template <typename T>
void backward_s_softmax(const BlockS<T>& k, T* tt, const T* dlg, const T* avg, T* davg) {
  const int64_t C2 = k.c2, N = k.n;
  for (int64_t j = 0; j < C2; ++j) {
    T* t = tt + j * N;
    T tq = 0;
#pragma omp simd reduction(+ : tq)
    for (int64_t i = 0; i < N; ++i) tq += t[i] * dlg[i];
    davg[j] = tq;
    const T aj = avg[j];
#pragma omp simd
    for (int64_t i = 0; i < N; ++i) t[i] = aj * t[i] * (dlg[i] - tq);
  }
}

// Per-sample rows of official PSA_s's backward that the cross-sample sums read.
template <typename T>
struct SampleGradsS {
  T *da_ch, *dlg, *davg, *gs, *dz, *dz1, *dgamma, *dbeta, *dv, *dwq, *dqr_sum;
};

// Backward of one sample after dwva = d(theta) X^T (C/2, C): the rows of sg, and dx (C, N)
// (if dx) but for its (W_v diag(a_ch))^T d(theta) term.
template <typename S, typename T>
void backward_s_rest(const BlockS<T>& k, const S* x, const S* go, S* dx, const T* p,
                     const T* xp, const T* g, const T* z1, T mu, T rstd, const T* r1,
                     const T* a_ch, const T* a_sp, const T* dwva, const SampleGradsS<T>& sg,
                     T* dg, T* dxp, T* dr1, T* dqr) {
  const int64_t C = k.c, C2 = k.c2, C8 = k.c8, N = k.n;
  T* da_ch = sg.da_ch;
  // d(a_ch) through wva = W_v diag(a_ch)
  for (int64_t j = 0; j < C2; ++j) {
    const T* d = dwva + j * C;
    const T* w = k.wsv + j * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) da_ch[c] += d[c] * w[c];
  }
  // avg = W_q (g * a_ch) + b_q
  matvec_t(k.wsq, sg.davg, dg, C2, C);  // d(GP(a_ch X))
  for (int64_t c = 0; c < C; ++c) {
    sg.gs[c] = g[c] * a_ch[c];
    da_ch[c] += dg[c] * g[c];
    dg[c] *= a_ch[c];
  }
  // channel branch: a_ch = sigmoid(W2 relu(LN(W1 v + b1)) + b2), v = W_v X p + b_v
  T* dz = sg.dz;
  for (int64_t c = 0; c < C; ++c) dz[c] = da_ch[c] * a_ch[c] * (T(1) - a_ch[c]);
  matvec_t(k.w2, dz, dr1, C, C8);
  for (int64_t i = 0; i < C8; ++i) {
    if (r1[i] <= T(0)) dr1[i] = T(0);
  }
  T m1 = 0, m2 = 0;  // LayerNorm backward
  for (int64_t i = 0; i < C8; ++i) {
    const T xh = (z1[i] - mu) * rstd;
    const T dxh = dr1[i] * k.gamma[i];
    sg.dgamma[i] = dr1[i] * xh;
    sg.dbeta[i] = dr1[i];
    m1 += dxh;
    m2 += dxh * xh;
  }
  m1 /= static_cast<T>(C8), m2 /= static_cast<T>(C8);
  T* dz1 = sg.dz1;
  for (int64_t i = 0; i < C8; ++i) {
    const T xh = (z1[i] - mu) * rstd;
    dz1[i] = rstd * (dr1[i] * k.gamma[i] - m1 - xh * m2);
  }
  matvec_t(k.w1, dz1, sg.dv, C8, C2);  // dv = W1^T dz1
  matvec_t(k.wv, sg.dv, dxp, C2, C);   // dxp = W_v^T dv
  combine_rows(x, dxp, T(0), dqr, C, N);  // dp = X^T dxp
  softmax_backward_(dqr, p, N);
  T qsum = 0;
  for (int64_t i = 0; i < N; ++i) qsum += dqr[i];
  *sg.dqr_sum = qsum;
  for (int64_t c = 0; c < C; ++c) {  // w_q's gradient X dqr
    const S* xr = x + c * N;
    T aq = 0;
#pragma omp simd reduction(+ : aq)
    for (int64_t i = 0; i < N; ++i) aq += static_cast<T>(xr[i]) * dqr[i];
    sg.dwq[c] = aq;
  }
  if (dx) {
    // dX = dOut * a_ch a_sp^T + w_q dqr^T + dg / HW + dxp p^T (+ wva^T d(theta), later)
    const T inv_n = T(1) / static_cast<T>(N);
    for (int64_t c = 0; c < C; ++c) {
      const S* gr = go + c * N;
      S* o = dx + c * N;
      const T ac = a_ch[c], wq = k.wq[c], dgc = dg[c] * inv_n, dxc = dxp[c];
#pragma omp simd
      for (int64_t i = 0; i < N; ++i)
        o[i] = static_cast<S>(static_cast<T>(gr[i]) * ac * a_sp[i] + wq * dqr[i] + dgc +
                              dxc * p[i]);
    }
  }
}

}  // namespace cpu

// The saved vectors of forward_s_cpu, one buffer, field-major (each field (B, len)).
struct LayoutS {
  int64_t p, xp, g, v, z1, mu, rstd, r1, a_ch, avg, a_sp, total;
  LayoutS(int64_t b, int64_t c, int64_t c8, int64_t n) {
    int64_t o = 0;
    auto field = [&](int64_t len) { const int64_t at = o; o += b * len; return at; };
    p = field(n), xp = field(c), g = field(c), v = field(c / 2), z1 = field(c8);
    mu = field(1), rstd = field(1), r1 = field(c8), a_ch = field(c), avg = field(c / 2);
    a_sp = field(n), total = o;
  }
};

// out[j, i] = sum_b M[b, j, i] w[b, i] (sp_wv's gradient), rows split over threads.
template <typename T>
void scaled_sum(const T* M, const T* w, T* out, int64_t b, int64_t rows, int64_t cols) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / cols), [&](int64_t r0, int64_t r1) {
    for (int64_t j = r0; j < r1; ++j) {
      T* o = out + j * cols;
      std::fill(o, o + cols, T(0));
      for (int64_t k = 0; k < b; ++k) {
        const T* m = M + (k * rows + j) * cols;
        const T* wk = w + k * cols;
#pragma omp simd
        for (int64_t i = 0; i < cols; ++i) o[i] += m[i] * wk[i];
      }
    }
  });
}

// softmax_HW(wva X) (B, C/2, HW) in the accumulation dtype: the batched GEMM and softmax.
static Tensor spatial_softmax(const Tensor& wva, const Tensor& x3, const Casts& k) {
  return at::softmax(at::bmm(k.X(wva), x3), -1, k.acc);
}

// Saved: x, the LayoutS buffer.
Forward forward_s_cpu(const Tensor& x, const PSAParams& prm_in) {
  const int64_t b = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t n = h * w, c2 = c / 2;
  const Casts k(x);
  const PSAParams prm = prm_in.to(k.acc).map([](const Tensor& t) { return t.contiguous(); });
  const int64_t c8 = prm.ch_wz.size(0);
  const LayoutS lay(b, c, c8, n);
  const auto opt = x.options().dtype(k.acc);
  const Tensor buf = at::empty({lay.total}, opt);
  const Tensor wva = at::empty({b, c2, c}, opt);
  const Tensor x3 = x.view({b, c, n});
  Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "psa_s_forward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto blk = cpu::make_block_s<T>(prm, c, n);
    const scalar_t* xd = x.const_data_ptr<scalar_t>();
    T* bd = buf.data_ptr<T>();
    T* wd = wva.data_ptr<T>();
    at::parallel_for(0, b, 1, [&](int64_t b0, int64_t b1) {
      std::vector<T> tmp(c);
      for (int64_t i = b0; i < b1; ++i) {
        cpu::forward_s_vectors<scalar_t, T>(
            blk, xd + i * c * n, bd + lay.p + i * n, bd + lay.xp + i * c, bd + lay.g + i * c,
            bd + lay.v + i * c2, bd + lay.z1 + i * c8, bd + lay.mu + i, bd + lay.rstd + i,
            bd + lay.r1 + i * c8, bd + lay.a_ch + i * c, bd + lay.avg + i * c2,
            wd + i * c2 * c, tmp.data());
      }
    });
    const Tensor tt = spatial_softmax(wva, x3, k);  // (B, C/2, HW)
    const T* td = tt.const_data_ptr<T>();
    scalar_t* od = out.data_ptr<scalar_t>();
    at::parallel_for(0, b, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t i = b0; i < b1; ++i) {
        cpu::forward_s_output<scalar_t, T>(blk, xd + i * c * n, td + i * c2 * n,
                                           bd + lay.a_ch + i * c, bd + lay.avg + i * c2,
                                           bd + lay.a_sp + i * n, od + i * c * n);
      }
    });
  });
  return {out, buf.narrow(0, lay.a_ch, b * c).view({b, c, 1, 1}),
          buf.narrow(0, lay.a_sp, b * n).view({b, 1, h, w}), {x, buf}};
}

Backward backward_s_cpu(const variable_list& sv, const PSAParams& prm_in, const Tensor& grad_out,
                        bool need_dx) {
  const Tensor &x = sv[0], &buf = sv[1];
  const int64_t b = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t n = h * w, c2 = c / 2;
  const Casts k(x);
  const PSAParams prm = prm_in.to(k.acc).map([](const Tensor& t) { return t.contiguous(); });
  const int64_t c8 = prm.ch_wz.size(0);
  const Tensor go = grad_out.contiguous();
  const auto opt = x.options().dtype(k.acc);
  const LayoutS lay(b, c, c8, n);
  const Tensor x3 = x.view({b, c, n});
  // per-sample rows (field-major): da_ch, dlg, davg, gs, dz, dz1, dgamma, dbeta, dv, dwq,
  // dqr_sum
  const int64_t rda = 0, rdlg = rda + b * c, rdavg = rdlg + b * n, rgs = rdavg + b * c2;
  const int64_t rdz = rgs + b * c, rdz1 = rdz + b * c, rdgam = rdz1 + b * c8;
  const int64_t rdbet = rdgam + b * c8, rdv = rdbet + b * c8, rdwq = rdv + b * c2;
  const int64_t rdq = rdwq + b * c;
  const Tensor rows = at::empty({rdq + b}, opt);
  const Tensor wva = at::empty({b, c2, c}, opt);
  Backward r;
  if (need_dx) r.dx = at::empty_like(x);
  // parameter gradients, in the parameters' shapes (accumulation dtype); sp_bv (if any)
  // cancels in the softmax and gets none, as in backward_s
  PSAParams& gr = r.grads;
  gr = prm.map([&](const Tensor& q) { return at::empty(q.sizes(), opt); });
  gr.sp_bv = Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "psa_s_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto blk = cpu::make_block_s<T>(prm, c, n);
    const scalar_t* xd = x.const_data_ptr<scalar_t>();
    const scalar_t* gd = go.const_data_ptr<scalar_t>();
    const T* bd = buf.const_data_ptr<T>();
    T* rd = rows.data_ptr<T>();
    T* wd = wva.data_ptr<T>();
    at::parallel_for(0, b, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t i = b0; i < b1; ++i) {
        cpu::backward_s_first<scalar_t, T>(blk, xd + i * c * n, gd + i * c * n,
                                           bd + lay.a_ch + i * c, bd + lay.a_sp + i * n,
                                           rd + rda + i * c, rd + rdlg + i * n, wd + i * c2 * c);
      }
    });
    // T recomputed, then d(theta) in its place
    Tensor dth = spatial_softmax(wva, x3, k);
    T* td = dth.data_ptr<T>();
    at::parallel_for(0, b, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t i = b0; i < b1; ++i) {
        cpu::backward_s_softmax<T>(blk, td + i * c2 * n, rd + rdlg + i * n,
                                   bd + lay.avg + i * c2, rd + rdavg + i * c2);
      }
    });
    const Tensor dth_x = k.X(dth);
    const Tensor dwva = k.A(at::bmm(dth_x, x3.transpose(1, 2)));  // (B, C/2, C)
    const T* dwd = dwva.const_data_ptr<T>();
    scalar_t* dxd = need_dx ? r.dx.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, b, 1, [&](int64_t b0, int64_t b1) {
      std::vector<T> scratch(2 * c + c8 + n);
      T *dg = scratch.data(), *dxp = dg + c, *dr1 = dxp + c, *dqr = dr1 + c8;
      for (int64_t i = b0; i < b1; ++i) {
        const cpu::SampleGradsS<T> sg{
            rd + rda + i * c,    rd + rdlg + i * n,   rd + rdavg + i * c2, rd + rgs + i * c,
            rd + rdz + i * c,    rd + rdz1 + i * c8,  rd + rdgam + i * c8, rd + rdbet + i * c8,
            rd + rdv + i * c2,   rd + rdwq + i * c,   rd + rdq + i};
        cpu::backward_s_rest<scalar_t, T>(
            blk, xd + i * c * n, gd + i * c * n, dxd ? dxd + i * c * n : nullptr,
            bd + lay.p + i * n, bd + lay.xp + i * c, bd + lay.g + i * c, bd + lay.z1 + i * c8,
            bd[lay.mu + i], bd[lay.rstd + i], bd + lay.r1 + i * c8, bd + lay.a_ch + i * c,
            bd + lay.a_sp + i * n, dwd + i * c2 * c, sg, dg, dxp, dr1, dqr);
      }
    });
    if (need_dx) {  // + (W_v diag(a_ch))^T d(theta)
      r.dx.view({b, c, n}).baddbmm_(k.X(wva).transpose(1, 2), dth_x);
    }
    // the cross-sample sums
    auto sum = [&](const Tensor& grad, const T* rows_, int64_t len) {
      if (grad.defined()) sum_rows<T>(rows_, nullptr, grad.data_ptr<T>(), b, len);
    };
    auto outer = [&](const Tensor& grad, const T* L, const T* R, int64_t m, int64_t len) {
      if (grad.defined()) outer_sum<T>(L, R, grad.data_ptr<T>(), b, m, len);
    };
    sum(gr.ch_wq, rd + rdwq, c);
    sum(gr.ch_bq, rd + rdq, 1);
    outer(gr.ch_wv, rd + rdv, bd + lay.xp, c2, c);
    sum(gr.ch_bv, rd + rdv, c2);
    outer(gr.ch_wz, rd + rdz1, bd + lay.v, c8, c2);
    sum(gr.ch_bz, rd + rdz1, c8);
    sum(gr.ch_ln_w, rd + rdgam, c8);
    sum(gr.ch_ln_b, rd + rdbet, c8);
    outer(gr.ch_wz2, rd + rdz, bd + lay.r1, c, c8);
    sum(gr.ch_bz2, rd + rdz, c);
    outer(gr.sp_wq, rd + rdavg, rd + rgs, c2, c);
    sum(gr.sp_bq, rd + rdavg, c2);
    scaled_sum<T>(dwd, bd + lay.a_ch, gr.sp_wv.data_ptr<T>(), b, c2, c);  // sp_wv
  });
  return r;
}

}  // namespace mmpsa
