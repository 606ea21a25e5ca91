"""Triton kernels for the fused PolarizedSelfAttention (every variant and mode).

The maths is :mod:`mmpsa.layers.psa_fused`'s: every attention map is a function of a
few reductions of X (the input as a (C, HW) matrix per sample), and the output is
``X * (a_ch + a_sp)`` (parallel) or ``X * a_ch * a_sp`` (sequential). Here the passes
over X are Triton kernels, and the small per-sample vectors (``O(B (C + HW))``) are the
torch ops of :mod:`~mmpsa.layers.psa_fused` (``channel_map``, ``spatial_query``, ...),
so both paths share one statement of the maths.

Each kernel program owns one sample and a run of pixels, and loads a tile of every
channel of ``BLOCK_N`` pixels at a time (``BLOCK_C`` = C rounded up to a power of two),
so a per-pixel reduction over the channels and a per-channel one over the pixels come
from the same load. The passes over X (and dOut), each one read:

* forward, :func:`_pool_kernel`: ``r = w_q^T X`` per pixel, and per channel ``GP(X)``
  and ``X p`` with ``p = softmax(r)`` by an online softmax (a running maximum and
  normaliser per program, merged in torch);
* forward, :func:`_spatial_kernel`: the spatial logits ``u^T X`` and then, for the paper
  variant, ``a_sp`` and the output in the same pass; official PSA_p's softmax over the
  pixels needs every logit first, so it writes the logits and a third pass writes the
  output (2 passes for the paper variant, 3 for PSA_p);
* backward, :func:`_grad_pool_kernel` on (dOut, X): ``dA_ch`` (over the pixels),
  ``dA_sp`` (over the channels) and, from it, ``X dlg`` (the logits' gradient), where
  PSA_p's softmax gradient splits into two pixel sums merged in torch;
* backward, :func:`_grad_input_kernel` on (dOut, X): ``dp = dxp^T X`` and ``dr`` per
  pixel (the softmax's normaliser term is ``dxp . X p``, known), ``X dr`` for ``w_q``'s
  gradient, and ``dX = dOut * M + w_q dr^T + dxp p^T + dg 1^T / HW + u dlg^T``.

Official PSA_s takes the first pass, the output pass and the dX pass (its spatial term a
C x HW tensor); its spatial map, a softmax over the pixels of each of the C/2 channels of
``W_v(a_ch * X)``, does not reduce to vectors and runs as two batched GEMMs
(:func:`~mmpsa.layers.psa_fused.sequential_spatial_map`), recomputed in backward.

Besides the input, forward keeps ``r``, ``a_sp`` (PSA_p: also the softmax) and the
per-sample vectors. Everything is accumulated in ``promote(dtype, float32)`` (fp64 stays
fp64); no ``tl.dot`` is used (the interpreter's bf16 ``tl.dot`` is wrong).

CUDA tensors run compiled kernels. ``TRITON_INTERPRET=1``, set before this module is
imported and left set (triton reads it when the kernels are decorated and when they run),
runs them on CPU tensors through triton's interpreter: that is how the tests check them on
CPU (:data:`INTERPRET`). A sample's offset is int64 (``b * stride`` may pass 2^31 for a view
into a large tensor), offsets within a sample int32: a sample of 2^31 elements or more is not
supported (an input or gradient with larger strides within a sample is copied contiguous), nor
more than :data:`MAX_CHANNELS` channels (a tile holds every channel of its pixels, and at most
:data:`MAX_TILE` elements). No kernel takes a float argument (it would be fp32 on a GPU, also
for fp64 inputs): ``1/HW`` and the like are divisions in the kernel, in ``ACC``.
"""
import contextlib
import fractions
import os
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from .. import compat
from .precision import no_autocast
from .psa_fused import PARAM_NAMES, PSAParams

Tensor = torch.Tensor

#: Whether the kernels were decorated for triton's interpreter (they then run CPU tensors).
INTERPRET = os.environ.get('TRITON_INTERPRET', '0') == '1'

#: The most elements of a ``(BLOCK_C, BLOCK_N)`` tile: compiled for sm_90, every kernel keeps
#: its tiles in registers without spilling up to this size (``tools/dev/triton_compile_check.py``).
MAX_TILE = 2048
#: The most channels a block may have here: a tile holds every channel of its pixels.
MAX_CHANNELS = MAX_TILE
_MAX_BLOCK_N = 128
_INT32 = 2**31  # offsets within a sample are int32, the sample's own offset int64
_TARGET_PROGRAMS = 1024  # split each sample's pixels into runs until about this many programs

# _spatial_kernel: where the spatial logits come from and what it does with them
_LOGITS = 0  # u^T X: write them and the runs' online softmaxes (official PSA_p, first pass)
_SIGMOID = 1  # a_sp = sigmoid(u^T X + bias), write a_sp and the output (paper variant)
_SOFTMAX = 2  # a_sp = sigmoid(softmax_HW(logits)), write a_sp and the output (PSA_p)
_DENSE = 3  # a_sp = sigmoid(given logits), write a_sp and the output (official PSA_s)
#: Tensors :func:`_forward` keeps for backward (besides the input and the parameters).
_SAVED = 5


@triton.jit
def _tile(ptr, b, sb, sc, sn, offs_c, offs_n, mask, ACC: tl.constexpr):
    """The ``(BLOCK_C, BLOCK_N)`` tile of a ``(B, C, HW)`` tensor of sample ``b``, as ``ACC``."""
    return tl.load(
        ptr + b * sb + offs_c[:, None] * sc + offs_n[None, :] * sn, mask=mask, other=0.0).to(ACC)


@triton.jit
def _channels(ptr, offs_c, mask_c, ACC: tl.constexpr):
    """A ``(BLOCK_C, )`` vector (masked channels 0), as ``ACC``."""
    return tl.load(ptr + offs_c, mask=mask_c, other=0.0).to(ACC)


@triton.jit
def _pixels(ptr, offs_n, mask_n, ACC: tl.constexpr):
    """A ``(BLOCK_N, )`` vector (masked pixels 0), as ``ACC``."""
    return tl.load(ptr + offs_n, mask=mask_n, other=0.0).to(ACC)


@triton.jit
def _as(v, ptr):
    """``v`` in the element type of ``ptr``, rounded to nearest even. fp32 to bf16 is rounded
    here in integers (a GPU's conversion rounds so too, but triton's interpreter truncates,
    which biases the GEMM operands of PSA_s); the rounded value converts exactly."""
    if ptr.dtype.element_ty == tl.bfloat16:
        if v.dtype == tl.float32:
            bits = v.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            v = tl.where(v == v, bits.to(tl.float32, bitcast=True), v)  # NaN as it is
    return v.to(ptr.dtype.element_ty)


@triton.jit
def _program(C, N, run, BLOCK_C: tl.constexpr):
    """This program's sample ``b`` (int64: ``b * stride`` may pass 2^31 for a view into a
    large tensor; offsets within a sample are int32), its channel offsets and mask, and its
    pixels ``[start, end)`` (programs ``(b, k)``: the ``k``-th run of ``run`` pixels)."""
    k = tl.program_id(1)
    offs_c = tl.arange(0, BLOCK_C)
    b = tl.program_id(0).to(tl.int64)
    return b, k, offs_c, offs_c < C, k * run, tl.minimum(N, (k + 1) * run)


@triton.jit
def _pixel_block(n0, end, BLOCK_N: tl.constexpr):
    """The pixel offsets from ``n0`` and their mask (below ``end``)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    return offs_n, offs_n < end


@triton.jit
def _pool_kernel(x_ptr, wq_ptr, r_ptr, m_ptr, den_ptr, xe_ptr, xs_ptr, B, C, N, run, sxb, sxc, sxn,
                 ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """Over the pixels ``[k run, (k + 1) run)`` of sample ``b`` (programs ``(b, k)``):
    ``r[b, n] = w_q^T x[b, :, n]``; the running maximum ``m[k, b]`` of ``r``, ``den[k, b] =
    sum_n exp(r - m)``, ``xe[k, b, c] = sum_n x exp(r - m)`` and ``xs[k, b, c] = sum_n x``."""
    b, k, offs_c, mask_c, start, n_end = _program(C, N, run, BLOCK_C)
    wq = _channels(wq_ptr, offs_c, mask_c, ACC)
    m = tl.full([], float('-inf'), ACC)
    den = tl.zeros([], ACC)
    xe = tl.zeros((BLOCK_C, ), ACC)
    xs = tl.zeros((BLOCK_C, ), ACC)
    for n0 in range(start, n_end, BLOCK_N):
        offs_n, mask_n = _pixel_block(n0, n_end, BLOCK_N)
        x = _tile(x_ptr, b, sxb, sxc, sxn, offs_c, offs_n, mask_c[:, None] & mask_n[None, :], ACC)
        r = tl.sum(x * wq[:, None], axis=0)
        tl.store(r_ptr + b * N + offs_n, r, mask=mask_n)
        xs += tl.sum(x, axis=1)
        m_new = tl.maximum(m, tl.max(tl.where(mask_n, r, float('-inf')), axis=0))
        alpha = tl.exp(m - m_new)
        e = tl.where(mask_n, tl.exp(r - m_new), 0.0)
        den = den * alpha + tl.sum(e, axis=0)
        xe = xe * alpha + tl.sum(x * e[None, :], axis=1)
        m = m_new
    tl.store(m_ptr + k * B + b, m)
    tl.store(den_ptr + k * B + b, den)
    out = (k * B + b) * C + offs_c
    tl.store(xe_ptr + out, xe, mask=mask_c)
    tl.store(xs_ptr + out, xs, mask=mask_c)


@triton.jit
def _recip(x):
    """``1 / x`` for ``x`` positive and normal (or +inf, NaN). In fp64 without a division: an
    IEEE fp64 division (and square root) compiles to an inline fast path and a call to a
    slow-path subroutine, and what is live across a call site is spilled. ``x = m 2^e`` with
    ``m`` in [1, 2): fp32's reciprocal of ``m`` and two Newton steps (relative error below
    2^-60, then rounding), times ``2^-e`` (exact)."""
    if x.dtype == tl.float64:
        bits = x.to(tl.int64, bitcast=True)
        e = (bits >> 52) & 0x7FF
        m = ((bits & 0xFFFFFFFFFFFFF) | (1023 << 52)).to(tl.float64, bitcast=True)
        r = (1.0 / m.to(tl.float32)).to(tl.float64)
        r = r * (2.0 - m * r)
        r = r * (2.0 - m * r)
        r = r * ((2046 - tl.minimum(e, 2045)) << 52).to(tl.float64, bitcast=True)
        return tl.where(e == 0x7FF, tl.where(x == x, 0.0, x), tl.where(e >= 2046, 0.0, r))
    return 1.0 / x


@triton.jit
def _rsqrt(x):
    """``1 / sqrt(x)`` for ``x`` positive and normal; in fp64 without a square root or a
    division (:func:`_recip`): ``x = m 4^j`` with ``m`` in [1, 4), fp32's ``rsqrt(m)`` and two
    Newton steps, times ``2^-j``."""
    if x.dtype == tl.float64:
        bits = x.to(tl.int64, bitcast=True)
        k = ((bits >> 52) & 0x7FF) - 1023
        m = ((bits & 0xFFFFFFFFFFFFF) | ((1023 + (k & 1)) << 52)).to(tl.float64, bitcast=True)
        r = tl.math.rsqrt(m.to(tl.float32)).to(tl.float64)
        r = r * (1.5 - 0.5 * m * r * r)
        r = r * (1.5 - 0.5 * m * r * r)
        return r * ((1023 - (k >> 1)) << 52).to(tl.float64, bitcast=True)
    return 1.0 / tl.sqrt(x)


@triton.jit
def _layout(C, H, Z):
    """Where each per-sample vector lies in a row of the forward's vectors (``(B, V)``,
    :func:`_widths`): ``X p``, ``GP(X)``, ``a_ch``, ``u``, ``u0 = W_sv^T s`` (C each); ``sq``,
    ``s = softmax(sq)``, ``v`` (C/2 each); ``z`` before and after the LayerNorm (Z each); then
    the softmax's maximum and normaliser over the pixels and the spatial bias."""
    return (0, C, 2 * C, 3 * C, 4 * C, 5 * C, 5 * C + H, 5 * C + 2 * H, 5 * C + 3 * H,
            5 * C + 3 * H + Z, 5 * C + 3 * H + 2 * Z)


@triton.jit
def _grad_layout(C, H, Z):
    """Where each per-sample vector lies in a row of backward's vectors (``(B, W)``): the
    gradients of ``sq``, ``s``, ``a_ch``'s logits, ``z``, ``v``, ``X p``, ``GP(X)``; then ``c0
    = d(X p) . X p`` and ``S``, the sum over the pixels of the spatial logits' gradient."""
    return (0, H, 2 * H, 2 * H + C, 2 * H + C + Z, 3 * H + C + Z, 3 * H + 2 * C + Z,
            3 * H + 3 * C + Z)


@triton.jit
def _vector(ptr, n, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """The ``(BLOCK, )`` vector of ``n`` entries at ``ptr`` (the rest 0), as ``ACC``."""
    offs = tl.arange(0, BLOCK)
    return tl.load(ptr + offs, mask=offs < n, other=0.0).to(ACC)


@triton.jit
def _put(ptr, v, n, BLOCK: tl.constexpr):
    """Store the first ``n`` entries of the ``(BLOCK, )`` vector ``v`` at ``ptr``."""
    offs = tl.arange(0, BLOCK)
    tl.store(ptr + offs, _as(v, ptr), mask=offs < n)


@triton.jit
def _linear(w_ptr, x, b_ptr, y_ptr, R, K, HAS_B: tl.constexpr, ACC: tl.constexpr,
            BLOCK_K: tl.constexpr, ROWS: tl.constexpr, BLOCK_R: tl.constexpr):
    """``y = W x + b`` for ``W`` ``(R, K)`` (contiguous) and ``x`` a ``(BLOCK_K, )`` vector:
    ``ROWS`` rows of ``W`` at a time, each block of ``y`` stored at ``y_ptr`` (a caller reads
    ``y`` back after a :func:`tl.debug_barrier`)."""
    offs_k = tl.arange(0, BLOCK_K)
    for r0 in range(0, BLOCK_R, ROWS):
        offs_r = r0 + tl.arange(0, ROWS)
        mask_r = offs_r < R
        w = tl.load(
            w_ptr + offs_r[:, None] * K + offs_k[None, :],
            mask=mask_r[:, None] & (offs_k < K)[None, :],
            other=0.0).to(ACC)
        y = tl.sum(w * x[None, :], axis=1)
        if HAS_B:
            y += tl.load(b_ptr + offs_r, mask=mask_r, other=0.0).to(ACC)
        tl.store(y_ptr + offs_r, y, mask=mask_r)


@triton.jit
def _linear_grad(w_ptr, dy_ptr, x, gw_ptr, gb_ptr, R, K, WANT_GW: tl.constexpr, HAS_B: tl.constexpr,
                 ACC: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr,
                 BLOCK_R: tl.constexpr):
    """The backward of ``y = W x + b`` (``W`` ``(R, K)``) for ``dy`` at ``dy_ptr``: with
    ``WANT_GW`` ``dW = dy x^T`` stored at ``gw_ptr`` and ``db = dy`` at ``gb_ptr`` (this
    sample's share); returns ``dx = W^T dy`` ``(BLOCK_K, )``."""
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    dx = tl.zeros((BLOCK_K, ), ACC)
    for r0 in range(0, BLOCK_R, ROWS):
        offs_r = r0 + tl.arange(0, ROWS)
        mask_r = offs_r < R
        mask = mask_r[:, None] & mask_k[None, :]
        dy = tl.load(dy_ptr + offs_r, mask=mask_r, other=0.0).to(ACC)
        if WANT_GW:
            tl.store(
                gw_ptr + offs_r[:, None] * K + offs_k[None, :], dy[:, None] * x[None, :], mask=mask)
            if HAS_B:
                tl.store(gb_ptr + offs_r, dy, mask=mask_r)
        w = tl.load(w_ptr + offs_r[:, None] * K + offs_k[None, :], mask=mask, other=0.0).to(ACC)
        dx += tl.sum(w * dy[:, None], axis=0)
    return dx


@triton.jit(do_not_specialize=['eps_num', 'eps_den'])
def _vector_kernel(m_ptr, den_ptr, xe_ptr, xs_ptr, wv_ptr, bv_ptr, wz_ptr, bz_ptr, lnw_ptr, lnb_ptr,
                   wz2_ptr, bz2_ptr, wsq_ptr, bsq_ptr, wsv_ptr, bsv_ptr, vec_ptr, ach_ptr, wva_ptr,
                   eps_num, eps_den, R, B, C, H, Z, N, V, PAPER: tl.constexpr, SEQ: tl.constexpr,
                   DENSE: tl.constexpr, HAS_BV: tl.constexpr, HAS_BZ: tl.constexpr,
                   HAS_LN: tl.constexpr, HAS_LNB: tl.constexpr, HAS_Z2: tl.constexpr,
                   HAS_BZ2: tl.constexpr, HAS_BSQ: tl.constexpr, HAS_BSV: tl.constexpr,
                   ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_Z: tl.constexpr, ROWS_C: tl.constexpr, ROWS_H: tl.constexpr,
                   ROWS_Z: tl.constexpr):
    """The forward's per-sample vector maths (programs ``(b, )``), between the passes over X:
    the runs' online softmaxes merged into ``X p`` and ``GP(X)``; the channel branch ``a_ch =
    sigmoid(W_z (W_v X p + b_v) + b_z [LayerNorm] [W_z2 relu(.) + b_z2])``; the spatial query
    ``sq = W_sq GP + b_sq`` (``GP(a_ch * X)`` sequential) and the spatial vector ``u`` (paper:
    ``W_sv^T softmax(sq)`` (times ``a_ch``, sequential) and the bias ``softmax(sq)^T b_sv``;
    PSA_p ``W_sv^T sq``; with ``DENSE`` (PSA_s) ``W_sv diag(a_ch)`` written to ``wva``).
    Everything lands in this sample's row of ``vec`` (:func:`_layout`), ``a_ch`` also in the
    input's dtype at ``ach`` (the hooks' map). The matrix-vector products read the weights in
    blocks of rows; a vector written by one block of rows is read back after a barrier."""
    b = tl.program_id(0).to(tl.int64)
    row = vec_ptr + b * V
    o_xp, o_g, o_ach, o_u, o_u0, o_sq, o_s, o_v, o_z, o_zo, o_m = _layout(C, H, Z)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    # the runs' online softmaxes merged, in the order of the runs
    m = tl.full([], float('-inf'), ACC)
    for k in range(0, R):
        m = tl.maximum(m, tl.load(m_ptr + k * B + b))
    den = tl.zeros([], ACC)
    xe = tl.zeros((BLOCK_C, ), ACC)
    xs = tl.zeros((BLOCK_C, ), ACC)
    for k in range(0, R):
        scale = tl.exp(tl.load(m_ptr + k * B + b) - m)
        den += tl.load(den_ptr + k * B + b) * scale
        xe += _vector(xe_ptr + (k * B + b) * C, C, BLOCK_C, ACC) * scale
        xs += _vector(xs_ptr + (k * B + b) * C, C, BLOCK_C, ACC)
    xp = xe * _recip(den)
    g = xs * _recip(N.to(ACC))  # in ACC (fp64 stays fp64)
    _put(row + o_xp, xp, C, BLOCK_C)
    _put(row + o_g, g, C, BLOCK_C)
    tl.store(row + o_m, m)
    tl.store(row + o_m + 1, den)
    # the channel branch
    _linear(wv_ptr, xp, bv_ptr, row + o_v, H, C, HAS_BV, ACC, BLOCK_C, ROWS_C, BLOCK_H)
    tl.debug_barrier()
    v = _vector(row + o_v, H, BLOCK_H, ACC)
    _linear(wz_ptr, v, bz_ptr, row + o_z, Z, H, HAS_BZ, ACC, BLOCK_H, ROWS_H, BLOCK_Z)
    tl.debug_barrier()
    z = _vector(row + o_z, Z, BLOCK_Z, ACC)
    if HAS_LN:
        mask_z = tl.arange(0, BLOCK_Z) < Z
        inv_z = _recip(Z.to(ACC))
        d = tl.where(mask_z, z - tl.sum(z, axis=0) * inv_z, 0.0)
        eps = eps_num.to(ACC) * _recip(eps_den.to(ACC))
        z = d * _rsqrt(tl.sum(d * d, axis=0) * inv_z + eps) * _vector(lnw_ptr, Z, BLOCK_Z, ACC)
        if HAS_LNB:
            z += _vector(lnb_ptr, Z, BLOCK_Z, ACC)
    _put(row + o_zo, z, Z, BLOCK_Z)
    if HAS_Z2:
        _linear(wz2_ptr, tl.maximum(z, 0.0), bz2_ptr, row + o_ach, C, Z, HAS_BZ2, ACC, BLOCK_Z,
                ROWS_Z, BLOCK_C)
        tl.debug_barrier()
        zf = _vector(row + o_ach, C, BLOCK_C, ACC)
    else:
        zf = z  # Z = C
    a_ch = _recip(1.0 + tl.exp(-zf))
    tl.debug_barrier()
    _put(row + o_ach, a_ch, C, BLOCK_C)
    _put(ach_ptr + b * C, a_ch, C, BLOCK_C)
    # the spatial query and vector (g, and a_ch after this, read back: vectors kept live from
    # the top, across the loops over the weights, spilled)
    g = _vector(row + o_g, C, BLOCK_C, ACC)
    if SEQ:
        q = g * a_ch
    else:
        q = g
    _linear(wsq_ptr, q, bsq_ptr, row + o_sq, H, C, HAS_BSQ, ACC, BLOCK_C, ROWS_C, BLOCK_H)
    tl.debug_barrier()
    a_ch = _vector(row + o_ach, C, BLOCK_C, ACC)
    if DENSE:  # W_sv diag(a_ch), in the input's dtype, for PSA_s's GEMMs
        for r0 in range(0, BLOCK_H, ROWS_C):
            offs_r = r0 + tl.arange(0, ROWS_C)
            mask = (offs_r < H)[:, None] & mask_c[None, :]
            tile = offs_r[:, None] * C + offs_c[None, :]
            w = tl.load(wsv_ptr + tile, mask=mask, other=0.0).to(ACC)
            tl.store(wva_ptr + b * H * C + tile, _as(w * a_ch[None, :], wva_ptr), mask=mask)
    else:
        if PAPER:
            sq = _vector(row + o_sq, H, BLOCK_H, ACC)
            mask_h = tl.arange(0, BLOCK_H) < H
            e = tl.where(mask_h, tl.exp(sq - tl.max(tl.where(mask_h, sq, float('-inf')), axis=0)),
                         0.0)
            s = e * _recip(tl.sum(e, axis=0))
            _put(row + o_s, s, H, BLOCK_H)
            if HAS_BSV:
                tl.store(row + o_m + 2, tl.sum(s * _vector(bsv_ptr, H, BLOCK_H, ACC), axis=0))
            tl.debug_barrier()
            u = _linear_grad(wsv_ptr, row + o_s, xp, wsv_ptr, wsv_ptr, H, C, False, False, ACC,
                             BLOCK_C, ROWS_C, BLOCK_H)  # W_sv^T s
            _put(row + o_u0, u, C, BLOCK_C)
            if SEQ:
                u = u * a_ch
        else:
            u = _linear_grad(wsv_ptr, row + o_sq, xp, wsv_ptr, wsv_ptr, H, C, False, False, ACC,
                             BLOCK_C, ROWS_C, BLOCK_H)  # W_sv^T sq
        _put(row + o_u, u, C, BLOCK_C)


@triton.jit
def _spatial_kernel(x_ptr, vec_ptr, lg_ptr, a_sp_ptr, asp_ptr, out_ptr, lm_ptr, lden_ptr, B, C, H,
                    Z, N, V, R, run, sxb, sxc, sxn, sob, soc, son, SPATIAL: tl.constexpr,
                    HAS_BIAS: tl.constexpr, SEQ: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """The spatial map and the output over a run of pixels. ``SPATIAL``: ``_LOGITS`` writes
    ``u^T x`` to ``lg`` and this run's online softmax (maximum ``lm[k, b]``, normaliser
    ``lden[k, b]``); ``_SIGMOID``: ``a_sp = sigmoid(u^T x + bias)``; ``_SOFTMAX``: ``sm =
    softmax(lg)`` over the pixels (the runs' softmaxes merged here; ``sm`` overwrites ``lg``),
    ``a_sp = sigmoid(sm)``; ``_DENSE``: ``a_sp = sigmoid(lg)``. Except for ``_LOGITS`` it
    writes ``a_sp`` (in ``ACC`` and, for the hooks, in the input's dtype at ``asp``) and the
    output ``x * (a_ch + a_sp)`` (``x * a_ch * a_sp`` with ``SEQ``)."""
    b, k, offs_c, mask_c, start, n_end = _program(C, N, run, BLOCK_C)
    o_xp, o_g, o_ach, o_u, o_u0, o_sq, o_s, o_v, o_z, o_zo, o_m = _layout(C, H, Z)
    row = vec_ptr + b * V
    if SPATIAL <= 1:
        u = _channels(row + o_u, offs_c, mask_c, ACC)
    if SPATIAL != 0:
        a_ch = _channels(row + o_ach, offs_c, mask_c, ACC)
    if HAS_BIAS:
        bias = tl.load(row + o_m + 2)
    if SPATIAL == 0:
        m = tl.full([], float('-inf'), ACC)
        den = tl.zeros([], ACC)
    if SPATIAL == 2:  # the runs' online softmaxes merged, in the order of the runs
        m = tl.full([], float('-inf'), ACC)
        for j in range(0, R):
            m = tl.maximum(m, tl.load(lm_ptr + j * B + b))
        den = tl.zeros([], ACC)
        for j in range(0, R):
            den += tl.load(lden_ptr + j * B + b) * tl.exp(tl.load(lm_ptr + j * B + b) - m)
    for n0 in range(start, n_end, BLOCK_N):
        offs_n, mask_n = _pixel_block(n0, n_end, BLOCK_N)
        mask = mask_c[:, None] & mask_n[None, :]
        x = _tile(x_ptr, b, sxb, sxc, sxn, offs_c, offs_n, mask, ACC)
        if SPATIAL <= 1:
            lg = tl.sum(x * u[:, None], axis=0)
        else:
            lg = _pixels(lg_ptr + b * N, offs_n, mask_n, ACC)
        if SPATIAL == 0:
            tl.store(lg_ptr + b * N + offs_n, lg, mask=mask_n)
            m_new = tl.maximum(m, tl.max(tl.where(mask_n, lg, float('-inf')), axis=0))
            den = den * tl.exp(m - m_new) + tl.sum(
                tl.where(mask_n, tl.exp(lg - m_new), 0.0), axis=0)
            m = m_new
        else:
            if HAS_BIAS:
                lg += bias
            if SPATIAL == 2:
                lg = tl.exp(lg - m) / den
                tl.store(lg_ptr + b * N + offs_n, lg, mask=mask_n)
            a_sp = 1.0 / (1.0 + tl.exp(-lg))
            tl.store(a_sp_ptr + b * N + offs_n, a_sp, mask=mask_n)
            tl.store(asp_ptr + b * N + offs_n, _as(a_sp, asp_ptr), mask=mask_n)
            if SEQ:
                out = x * (a_ch[:, None] * a_sp[None, :])
            else:
                out = x * (a_ch[:, None] + a_sp[None, :])
            tl.store(
                out_ptr + b * sob + offs_c[:, None] * soc + offs_n[None, :] * son,
                _as(out, out_ptr),
                mask=mask)
    if SPATIAL == 0:
        tl.store(lm_ptr + k * B + b, m)
        tl.store(lden_ptr + k * B + b, den)


@triton.jit
def _grad_pool_kernel(g_ptr, x_ptr, vec_ptr, a_sp_ptr, sm_ptr, dsp_ptr, dach_ptr, p1_ptr, p2_ptr,
                      dsps_ptr, B, C, H, Z, N, V, run, sgb, sgc, sgn, sxb, sxc, sxn,
                      SEQ: tl.constexpr, HAS_SM: tl.constexpr, DENSE: tl.constexpr,
                      ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """Backward's first pass over (dOut ``g``, ``x``) on a run of pixels: the output's
    multipliers' gradients ``dach[k, b, c] = sum_n g x (a_sp)`` and ``dA_sp[n] = sum_c g x
    (a_ch)``; ``dsp = dA_sp a_sp (1 - a_sp)`` (times ``sm`` with ``HAS_SM``), written; unless
    ``DENSE``, ``p1[k, b, c] = sum_n x dsp`` and ``dsps[k, b] = sum_n dsp``, and with
    ``HAS_SM`` ``p2[k, b, c] = sum_n x sm``."""
    b, k, offs_c, mask_c, start, n_end = _program(C, N, run, BLOCK_C)
    o_xp, o_g, o_ach, o_u, o_u0, o_sq, o_s, o_v, o_z, o_zo, o_m = _layout(C, H, Z)
    if SEQ:
        a_ch = _channels(vec_ptr + b * V + o_ach, offs_c, mask_c, ACC)
    dach = tl.zeros((BLOCK_C, ), ACC)
    p1 = tl.zeros((BLOCK_C, ), ACC)
    p2 = tl.zeros((BLOCK_C, ), ACC)
    dsps = tl.zeros([], ACC)
    for n0 in range(start, n_end, BLOCK_N):
        offs_n, mask_n = _pixel_block(n0, n_end, BLOCK_N)
        mask = mask_c[:, None] & mask_n[None, :]
        x = _tile(x_ptr, b, sxb, sxc, sxn, offs_c, offs_n, mask, ACC)
        gx = _tile(g_ptr, b, sgb, sgc, sgn, offs_c, offs_n, mask, ACC) * x
        a_sp = _pixels(a_sp_ptr + b * N, offs_n, mask_n, ACC)
        if SEQ:
            dach += tl.sum(gx * a_sp[None, :], axis=1)
            da_sp = tl.sum(gx * a_ch[:, None], axis=0)
        else:
            dach += tl.sum(gx, axis=1)
            da_sp = tl.sum(gx, axis=0)
        dsp = da_sp * a_sp * (1 - a_sp)
        if HAS_SM:
            sm = _pixels(sm_ptr + b * N, offs_n, mask_n, ACC)
            dsp = dsp * sm
            p2 += tl.sum(x * sm[None, :], axis=1)
        tl.store(dsp_ptr + b * N + offs_n, dsp, mask=mask_n)
        if not DENSE:
            p1 += tl.sum(x * dsp[None, :], axis=1)
            dsps += tl.sum(dsp, axis=0)
    out = (k * B + b) * C + offs_c
    tl.store(dach_ptr + out, dach, mask=mask_c)
    if not DENSE:
        tl.store(p1_ptr + out, p1, mask=mask_c)
        tl.store(dsps_ptr + k * B + b, dsps)
    if HAS_SM:
        tl.store(p2_ptr + out, p2, mask=mask_c)


@triton.jit
def _dense_grad_kernel(lg_ptr, vec_ptr, dl_ptr, dt_ptr, gvec_ptr, H, N, C, Z, V, W,
                       ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """Official PSA_s's spatial map ``a_sp = sigmoid(sq^T theta)``, ``theta`` the softmax over
    the pixels of the logits ``lg = W_sv diag(a_ch) X`` ``(B, C/2, HW)``, backward (programs
    ``(b, rows)``) from ``dl`` (the sigmoid's input's gradient): ``d sq = theta dl`` (to this
    sample's row of backward's vectors) and the logits' gradient ``dt = theta sq (dl - d sq)``
    (in the input's dtype: the GEMMs' operand). Three passes over this block of rows of
    ``lg``: the softmax's maximum and normaliser, ``d sq``, ``dt``."""
    b = tl.program_id(0).to(tl.int64)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < H
    o_xp, o_g, o_ach, o_u, o_u0, o_sq, o_s, o_v, o_z, o_zo, o_m = _layout(C, H, Z)
    o_dsq, o_ds, o_dzf, o_dz, o_dv, o_dxp, o_dg, o_c0 = _grad_layout(C, H, Z)
    sq = tl.load(vec_ptr + b * V + o_sq + offs_r, mask=mask_r, other=0.0)
    base = b * H * N + offs_r[:, None] * N
    m = tl.full((BLOCK_R, ), float('-inf'), ACC)
    den = tl.zeros((BLOCK_R, ), ACC)
    for n0 in range(0, N, BLOCK_N):
        offs_n, mask_n = _pixel_block(n0, N, BLOCK_N)
        lg = tl.load(
            lg_ptr + base + offs_n[None, :], mask=mask_r[:, None] & mask_n[None, :],
            other=0.0).to(ACC)
        lg = tl.where(mask_n[None, :], lg, float('-inf'))
        m_new = tl.maximum(m, tl.max(lg, axis=1))
        den = den * tl.exp(m - m_new) + tl.sum(tl.exp(lg - m_new[:, None]), axis=1)
        m = m_new
    dsq = tl.zeros((BLOCK_R, ), ACC)
    for n0 in range(0, N, BLOCK_N):
        offs_n, mask_n = _pixel_block(n0, N, BLOCK_N)
        mask = mask_r[:, None] & mask_n[None, :]
        lg = tl.load(lg_ptr + base + offs_n[None, :], mask=mask, other=0.0).to(ACC)
        theta = tl.where(mask, tl.exp(lg - m[:, None]) / den[:, None], 0.0)
        dsq += tl.sum(theta * _pixels(dl_ptr + b * N, offs_n, mask_n, ACC)[None, :], axis=1)
    tl.store(gvec_ptr + b * W + o_dsq + offs_r, dsq, mask=mask_r)
    for n0 in range(0, N, BLOCK_N):
        offs_n, mask_n = _pixel_block(n0, N, BLOCK_N)
        mask = mask_r[:, None] & mask_n[None, :]
        lg = tl.load(lg_ptr + base + offs_n[None, :], mask=mask, other=0.0).to(ACC)
        theta = tl.where(mask, tl.exp(lg - m[:, None]) / den[:, None], 0.0)
        dl = _pixels(dl_ptr + b * N, offs_n, mask_n, ACC)
        dt = theta * sq[:, None] * (dl[None, :] - dsq[:, None])
        tl.store(dt_ptr + base + offs_n[None, :], _as(dt, dt_ptr), mask=mask)


@triton.jit(do_not_specialize=['eps_num', 'eps_den'])
def _vector_grad_kernel(dach_ptr, p1_ptr, p2_ptr, dsps_ptr, dwva_ptr, wv_ptr, wz_ptr, lnw_ptr,
                        wz2_ptr, wsq_ptr, wsv_ptr, bsv_ptr, vec_ptr, gvec_ptr, gp_ptr, eps_num,
                        eps_den, R, B, C, H, Z, V, W, PB, o_wv, o_bv, o_wz, o_bz, o_lnw, o_lnb,
                        o_wz2, o_bz2, o_wsq, o_bsq, o_wsv, o_bsv, PAPER: tl.constexpr,
                        SEQ: tl.constexpr, DENSE: tl.constexpr, HAS_SM: tl.constexpr,
                        HAS_BV: tl.constexpr, HAS_BZ: tl.constexpr, HAS_LN: tl.constexpr,
                        HAS_LNB: tl.constexpr, HAS_Z2: tl.constexpr, HAS_BZ2: tl.constexpr,
                        HAS_BSQ: tl.constexpr, HAS_BSV: tl.constexpr, ACC: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_Z: tl.constexpr,
                        ROWS_C: tl.constexpr, ROWS_H: tl.constexpr, ROWS_Z: tl.constexpr):
    """Backward of :func:`_vector_kernel` (programs ``(b, )``), written out (the derivatives
    of ``mmpsa/csrc/psa_cpu_kernel.cpp``) from the forward's vectors and the first backward
    pass's partial sums (summed here in the order of the runs): ``d(X p)``, ``d GP(X)``, ``c0
    = d(X p) . X p`` and ``S`` to this sample's row of ``gvec`` (:func:`_grad_layout`), and
    this sample's share of every 1x1 conv's weight and bias gradient to its row of ``gp``
    (``(B, PB)``, each parameter at its offset ``o_*``; summed over the batch in a fixed order
    by :func:`_batch_sum_kernel`). PSA_s (``DENSE``): ``d(W_sv diag(a_ch))`` is ``dwva``."""
    b = tl.program_id(0).to(tl.int64)
    row = vec_ptr + b * V
    grow = gvec_ptr + b * W
    gp = gp_ptr + b * PB
    o_xp, o_g, o_ach, o_u, o_u0, o_sq, o_s, o_v, o_z, o_zo, o_m = _layout(C, H, Z)
    o_dsq, o_ds, o_dzf, o_dz, o_dv, o_dxp, o_dg, o_c0 = _grad_layout(C, H, Z)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    dach = tl.zeros((BLOCK_C, ), ACC)
    p1 = tl.zeros((BLOCK_C, ), ACC)
    p2 = tl.zeros((BLOCK_C, ), ACC)
    s_sum = tl.zeros([], ACC)
    for k in range(0, R):
        out = (k * B + b) * C
        dach += _vector(dach_ptr + out, C, BLOCK_C, ACC)
        if not DENSE:
            p1 += _vector(p1_ptr + out, C, BLOCK_C, ACC)
            s_sum += tl.load(dsps_ptr + k * B + b)
        if HAS_SM:
            p2 += _vector(p2_ptr + out, C, BLOCK_C, ACC)
    a_ch = _vector(row + o_ach, C, BLOCK_C, ACC)
    # the spatial branch: d sq
    if DENSE:  # wva = W_sv diag(a_ch); d sq is the dense kernel's
        for r0 in range(0, BLOCK_H, ROWS_C):
            offs_r = r0 + tl.arange(0, ROWS_C)
            mask = (offs_r < H)[:, None] & mask_c[None, :]
            tile = offs_r[:, None] * C + offs_c[None, :]
            dwva = tl.load(dwva_ptr + b * H * C + tile, mask=mask, other=0.0).to(ACC)
            tl.store(gp + o_wsv + tile, dwva * a_ch[None, :], mask=mask)
            dach += tl.sum(dwva * tl.load(wsv_ptr + tile, mask=mask, other=0.0).to(ACC), axis=0)
    elif PAPER:  # u0 = W_sv^T s, u = u0 (* a_ch), bias = s^T b_sv, s = softmax(sq)
        du = p1
        if SEQ:
            dach += du * _vector(row + o_u0, C, BLOCK_C, ACC)
            du = du * a_ch
        # d W_sv = s du^T, d s = W_sv du (+ d bias b_sv)
        for r0 in range(0, BLOCK_H, ROWS_C):
            offs_r = r0 + tl.arange(0, ROWS_C)
            mask_r = offs_r < H
            mask = mask_r[:, None] & mask_c[None, :]
            tile = offs_r[:, None] * C + offs_c[None, :]
            s = tl.load(row + o_s + offs_r, mask=mask_r, other=0.0)
            tl.store(gp + o_wsv + tile, s[:, None] * du[None, :], mask=mask)
            w = tl.load(wsv_ptr + tile, mask=mask, other=0.0).to(ACC)
            tl.store(grow + o_ds + offs_r, tl.sum(w * du[None, :], axis=1), mask=mask_r)
        tl.debug_barrier()
        s = _vector(row + o_s, H, BLOCK_H, ACC)
        ds = _vector(grow + o_ds, H, BLOCK_H, ACC)
        if HAS_BSV:
            ds += s_sum * _vector(bsv_ptr, H, BLOCK_H, ACC)
            _put(gp + o_bsv, s_sum * s, H, BLOCK_H)
        _put(grow + o_dsq, s * (ds - tl.sum(s * ds, axis=0)), H, BLOCK_H)
    else:  # official PSA_p: u = W_sv^T sq; the logits' gradient dsp - S sm
        du = p1 - s_sum * p2
        for r0 in range(0, BLOCK_H, ROWS_C):
            offs_r = r0 + tl.arange(0, ROWS_C)
            mask_r = offs_r < H
            mask = mask_r[:, None] & mask_c[None, :]
            tile = offs_r[:, None] * C + offs_c[None, :]
            sq = tl.load(row + o_sq + offs_r, mask=mask_r, other=0.0)
            tl.store(gp + o_wsv + tile, sq[:, None] * du[None, :], mask=mask)
            w = tl.load(wsv_ptr + tile, mask=mask, other=0.0).to(ACC)
            tl.store(grow + o_dsq + offs_r, tl.sum(w * du[None, :], axis=1), mask=mask_r)
    # the vectors are read back where they are needed and, for vectors of 1 KiB or more, dach
    # parked in the (still unused) dzf slot: vectors kept live across the loops over the
    # weights spilled
    if BLOCK_C * ACC.primitive_bitwidth >= 8192:
        _put(grow + o_dzf, dach, C, BLOCK_C)
    tl.debug_barrier()
    # sq = W_sq q + b_sq, q = GP (times a_ch, sequential)
    if SEQ:
        q = _vector(row + o_g, C, BLOCK_C, ACC) * _vector(row + o_ach, C, BLOCK_C, ACC)
    else:
        q = _vector(row + o_g, C, BLOCK_C, ACC)
    dq = _linear_grad(wsq_ptr, grow + o_dsq, q, gp + o_wsq, gp + o_bsq, H, C, True, HAS_BSQ, ACC,
                      BLOCK_C, ROWS_C, BLOCK_H)
    a_ch = _vector(row + o_ach, C, BLOCK_C, ACC)
    if BLOCK_C * ACC.primitive_bitwidth >= 8192:
        dach = _vector(grow + o_dzf, C, BLOCK_C, ACC)
    if SEQ:
        dach += dq * _vector(row + o_g, C, BLOCK_C, ACC)
        dq = dq * a_ch
    _put(grow + o_dg, dq, C, BLOCK_C)
    # the channel branch
    dz = dach * a_ch * (1 - a_ch)  # the sigmoid's input
    zo = _vector(row + o_zo, Z, BLOCK_Z, ACC)
    if HAS_Z2:
        _put(grow + o_dzf, dz, C, BLOCK_C)
        tl.debug_barrier()
        dz = _linear_grad(wz2_ptr, grow + o_dzf, tl.maximum(zo, 0.0), gp + o_wz2, gp + o_bz2, C, Z,
                          True, HAS_BZ2, ACC, BLOCK_Z, ROWS_Z, BLOCK_C)
        dz = tl.where(zo > 0, dz, 0.0)
    if HAS_LN:
        mask_z = tl.arange(0, BLOCK_Z) < Z
        z = _vector(row + o_z, Z, BLOCK_Z, ACC)
        inv_z = _recip(Z.to(ACC))
        d = tl.where(mask_z, z - tl.sum(z, axis=0) * inv_z, 0.0)
        eps = eps_num.to(ACC) * _recip(eps_den.to(ACC))
        rstd = _rsqrt(tl.sum(d * d, axis=0) * inv_z + eps)
        zn = d * rstd
        _put(gp + o_lnw, dz * zn, Z, BLOCK_Z)
        if HAS_LNB:
            _put(gp + o_lnb, dz, Z, BLOCK_Z)
        dzn = dz * _vector(lnw_ptr, Z, BLOCK_Z, ACC)
        dz = rstd * (dzn - tl.sum(dzn, axis=0) * inv_z - zn * (tl.sum(dzn * zn, axis=0) * inv_z))
    _put(grow + o_dz, dz, Z, BLOCK_Z)
    tl.debug_barrier()
    v = _vector(row + o_v, H, BLOCK_H, ACC)
    dv = _linear_grad(wz_ptr, grow + o_dz, v, gp + o_wz, gp + o_bz, Z, H, True, HAS_BZ, ACC,
                      BLOCK_H, ROWS_H, BLOCK_Z)
    _put(grow + o_dv, dv, H, BLOCK_H)
    tl.debug_barrier()
    xp = _vector(row + o_xp, C, BLOCK_C, ACC)
    dxp = _linear_grad(wv_ptr, grow + o_dv, xp, gp + o_wv, gp + o_bv, H, C, True, HAS_BV, ACC,
                       BLOCK_C, ROWS_C, BLOCK_H)
    _put(grow + o_dxp, dxp, C, BLOCK_C)
    # the scalars last: a scalar store's predicate (one thread) kept live from the top spilled
    tl.store(grow + o_c0, tl.sum(dxp * xp, axis=0))
    tl.store(grow + o_c0 + 1, s_sum)


@triton.jit
def _grad_input_kernel(g_ptr, x_ptr, dx_ptr, vec_ptr, gvec_ptr, a_sp_ptr, r_ptr, wq_ptr, dsp_ptr,
                       sm_ptr, e_ptr, dwq_ptr, B, C, H, Z, N, V, W, run, sgb, sgc, sgn, sxb, sxc,
                       sxn, sdb, sdc, sdn, seb, sec, sen, SEQ: tl.constexpr, WANT_DX: tl.constexpr,
                       WANT_DWQ: tl.constexpr, DENSE: tl.constexpr, HAS_SM: tl.constexpr,
                       ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """Backward's second pass over (dOut ``g``, ``x``) on a run of pixels: ``p = softmax(r)``
    (the forward's maximum and normaliser), ``dr = p (dxp^T x - c0)``; with ``WANT_DWQ``
    ``dwq[k, b, c] = sum_n x dr`` and ``dwq[k, b, C] = sum_n dr``; with ``WANT_DX`` ``dx = g M
    + w_q dr^T + dxp p^T + dg 1^T / N + S`` (``M = a_ch + a_sp``, or ``a_ch a_sp`` with
    ``SEQ``) where the spatial branch's term ``S`` is ``u dlg^T`` (``dlg = dsp``, with
    ``HAS_SM`` ``dsp - sum(dsp) sm``), or with ``DENSE`` the tensor ``e`` (official PSA_s)."""
    b, k, offs_c, mask_c, start, n_end = _program(C, N, run, BLOCK_C)
    o_xp, o_g, o_ach, o_u, o_u0, o_sq, o_s, o_v, o_z, o_zo, o_m = _layout(C, H, Z)
    o_dsq, o_ds, o_dzf, o_dz, o_dv, o_dxp, o_dg, o_c0 = _grad_layout(C, H, Z)
    row = vec_ptr + b * V
    grow = gvec_ptr + b * W
    dxp = _channels(grow + o_dxp, offs_c, mask_c, ACC)
    c0 = tl.load(grow + o_c0)
    m = tl.load(row + o_m)
    den = tl.load(row + o_m + 1)
    if WANT_DX:
        a_ch = _channels(row + o_ach, offs_c, mask_c, ACC)
        wq = _channels(wq_ptr, offs_c, mask_c, ACC)
        dg = _channels(grow + o_dg, offs_c, mask_c, ACC) / N  # in ACC (fp64 stays fp64)
        if not DENSE:
            u = _channels(row + o_u, offs_c, mask_c, ACC)
        if HAS_SM:
            s_sum = tl.load(grow + o_c0 + 1)
    dwq = tl.zeros((BLOCK_C, ), ACC)
    drs = tl.zeros([], ACC)
    for n0 in range(start, n_end, BLOCK_N):
        offs_n, mask_n = _pixel_block(n0, n_end, BLOCK_N)
        mask = mask_c[:, None] & mask_n[None, :]
        x = _tile(x_ptr, b, sxb, sxc, sxn, offs_c, offs_n, mask, ACC)
        p = tl.where(mask_n, tl.exp(_pixels(r_ptr + b * N, offs_n, mask_n, ACC) - m) / den, 0.0)
        dr = p * (tl.sum(x * dxp[:, None], axis=0) - c0)
        if WANT_DWQ:
            dwq += tl.sum(x * dr[None, :], axis=1)
            drs += tl.sum(dr, axis=0)
        if WANT_DX:
            g = _tile(g_ptr, b, sgb, sgc, sgn, offs_c, offs_n, mask, ACC)
            a_sp = _pixels(a_sp_ptr + b * N, offs_n, mask_n, ACC)
            if SEQ:
                dx = g * (a_ch[:, None] * a_sp[None, :])
            else:
                dx = g * (a_ch[:, None] + a_sp[None, :])
            dx += wq[:, None] * dr[None, :] + dxp[:, None] * p[None, :] + dg[:, None]
            if DENSE:
                dx += _tile(e_ptr, b, seb, sec, sen, offs_c, offs_n, mask, ACC)
            else:
                dlg = _pixels(dsp_ptr + b * N, offs_n, mask_n, ACC)
                if HAS_SM:
                    dlg -= s_sum * _pixels(sm_ptr + b * N, offs_n, mask_n, ACC)
                dx += u[:, None] * dlg[None, :]
            tl.store(
                dx_ptr + b * sdb + offs_c[:, None] * sdc + offs_n[None, :] * sdn,
                _as(dx, dx_ptr),
                mask=mask)
    if WANT_DWQ:
        out = dwq_ptr + (k * B + b) * (C + 1)
        tl.store(out + offs_c, dwq, mask=mask_c)
        tl.store(out + C, drs)


@triton.jit
def _batch_sum_kernel(a_ptr, RA, PA, b_ptr, RB, PB, out_ptr, ACC: tl.constexpr,
                      BLOCK: tl.constexpr):
    """The parameters' gradients: ``out[j] = sum_i a[i, j]`` for ``j < PA`` and ``sum_i b[i, j -
    PA]`` after, each sum over the rows in their order (no atomics: the same bits every run)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    total = tl.zeros((BLOCK, ), ACC)
    if tl.program_id(0) * BLOCK < PA:
        mask = offs < PA
        ptr = a_ptr + offs
        for _ in range(0, RA):
            total += tl.load(ptr, mask=mask, other=0.0).to(ACC)
            ptr += PA
    if tl.program_id(0) * BLOCK + BLOCK > PA:
        mask = (offs >= PA) & (offs < PA + PB)
        ptr = b_ptr + (offs - PA)
        for _ in range(0, RB):
            total += tl.load(ptr, mask=mask, other=0.0).to(ACC)
            ptr += PB
    tl.store(out_ptr + offs, _as(total, out_ptr), mask=offs < PA + PB)


_TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}
#: The accumulation dtype of an input dtype (``precision.acc_dtype``'s, without a host call).
_ACC = {
    torch.float16: torch.float32,
    torch.bfloat16: torch.float32,
    torch.float32: torch.float32,
    torch.float64: torch.float64
}
#: The parameters whose gradients :func:`_vector_grad_kernel` writes (its ``o_*`` arguments).
_VECTOR_PARAMS = PARAM_NAMES[2:]


def _launch(kernel, grid):
    """``kernel[grid]``, through ``torch.library.wrap_triton`` where torch has it (inside the
    custom op :func:`torch.compile` then sees the launch); on the fake tensors of a trace under
    the interpreter (whose kernels run only real tensors) a launch that does nothing."""
    if isinstance(kernel, JITFunction):
        kernel = compat.wrap_triton(kernel)
    elif INTERPRET:
        return lambda *args, **kwargs: None if _is_fake(args[0]) else kernel[grid](*args, **kwargs)
    return kernel[grid]


def _is_fake(t: Tensor) -> bool:
    """Whether ``t`` has no data (a fake tensor of a trace, or a ``meta`` tensor)."""
    from torch._subclasses.fake_tensor import is_fake
    return t.device.type == 'meta' or is_fake(t)


def _bcn(t: Tensor) -> Tuple[Tensor, Tuple[int, int, int]]:
    """``t`` ``(B, C, H, W)`` and its strides as a ``(B, C, HW)`` tensor (contiguous,
    channels_last and expanded tensors as they are; others made contiguous)."""
    b, c, h, w = t.shape
    sb, sc, sh, sw = t.stride()
    if w == 1:
        strides = (sb, sc, sh)
    elif h == 1 or sh == w * sw:
        strides = (sb, sc, sw)
    else:
        return _bcn(t.contiguous())
    # the kernels index within a sample with int32 (unsupported() keeps C*HW below 2^31)
    if (c - 1) * strides[1] + (h * w - 1) * strides[2] >= _INT32 and not t.is_contiguous():
        return _bcn(t.contiguous())
    return t, strides


def _new_like(x: Tensor) -> Tensor:
    """An empty tensor like ``x`` (its layout where :func:`_bcn` takes it, else contiguous)."""
    out = torch.empty_like(x)
    return out if _bcn(out)[0] is out else torch.empty(x.shape, dtype=x.dtype, device=x.device)


def num_warps(tile: int) -> int:
    """The warps of a program whose tiles have ``tile`` elements: 8 elements per thread, 1 to
    8 warps (a 2,048-element tile: 8 warps)."""
    return max(1, min(8, tile // 256))


def _rows(block_k: int, block_c: int) -> int:
    """Rows of a ``(rows, block_k)`` weight tile: at most :data:`MAX_TILE` elements, and no
    more rows than any of the block's matrices has (at most C)."""
    return max(1, min(MAX_TILE // block_k, block_c))


def _eps_ratio(eps: float) -> Tuple[int, int]:
    """``eps`` as integers ``(num, den)``: the kernel divides them in ``ACC`` (a float argument
    would be fp32 on a GPU, also for fp64). The shortest decimal of ``eps`` is exact in
    integers below 2^53, and their correctly rounded quotient is ``eps`` again."""
    ratio = fractions.Fraction(repr(float(eps)))
    if max(ratio.numerator, ratio.denominator) >= 2**53:
        ratio = fractions.Fraction(float(eps)).limit_denominator(2**53 - 1)
    return ratio.numerator, ratio.denominator


class _Launch:
    """The launch geometry for ``x`` ``(B, C, H, W)``: tile sizes, the pixel runs and the
    grid ``(B, runs)``, the accumulation dtype, and the per-sample vectors' sizes (``h`` = C/2
    the rows of ``W_v``, ``W_sq``, ``W_sv``; ``z`` those of ``W_z``) and tiles."""

    def __init__(self, x: Tensor, prm: Optional[PSAParams] = None) -> None:
        self.b, self.c, h, w = x.shape
        self.n, self.device = h * w, x.device
        self.h, self.z = (self.c // 2, self.c) if prm is None else (prm.sp_wv.shape[0],
                                                                    prm.ch_wz.shape[0])
        self.acc = _ACC[x.dtype]
        self.block_c = triton.next_power_of_2(self.c)
        self.block_n = max(
            1, min(_MAX_BLOCK_N, MAX_TILE // self.block_c, triton.next_power_of_2(self.n)))
        tiles = triton.cdiv(self.n, self.block_n)
        runs = max(1, min(tiles, _TARGET_PROGRAMS // self.b))
        self.run = triton.cdiv(tiles, runs) * self.block_n
        self.runs = triton.cdiv(self.n, self.run)
        self.grid = (self.b, self.runs)
        self.meta = dict(
            ACC=_TL_ACC[self.acc],
            BLOCK_C=self.block_c,
            BLOCK_N=self.block_n,
            num_warps=num_warps(self.block_c * self.block_n))
        block_h, block_z = triton.next_power_of_2(self.h), triton.next_power_of_2(self.z)
        self.vector_meta = dict(
            ACC=_TL_ACC[self.acc],
            BLOCK_C=self.block_c,
            BLOCK_H=block_h,
            BLOCK_Z=block_z,
            ROWS_C=_rows(self.block_c, self.block_c),
            ROWS_H=_rows(block_h, self.block_c),
            ROWS_Z=_rows(block_z, self.block_c),
            num_warps=num_warps(min(MAX_TILE, self.block_c * _rows(self.block_c, self.block_c))))
        c, hh, z = self.c, self.h, self.z
        self.width = 5 * c + 3 * hh + 2 * z + 3  # _layout's row, then m, den, bias
        self.grad_width = 3 * hh + 3 * c + z + 2  # _grad_layout's row, then c0, S

    def vectors(self, *shape: int) -> Tensor:
        """An empty accumulation-dtype tensor ``shape`` on ``x``'s device."""
        return torch.empty(shape, dtype=self.acc, device=self.device)


def _mat(t: Optional[Tensor], fallback: Tensor) -> Tensor:
    """A parameter as a kernel reads it (contiguous, outside autograd), or ``fallback``."""
    if t is None:
        return fallback
    t = t.detach()
    return t if t.is_contiguous() else t.contiguous()


def _param_offsets(prm: PSAParams) -> Tuple[List[int], int]:
    """The offsets of :data:`_VECTOR_PARAMS`' gradients in a row of the per-sample gradients
    (0 for absent ones) and the row's width."""
    offsets, width = [], 0
    for name in _VECTOR_PARAMS:
        t = getattr(prm, name)
        offsets.append(width)
        width += 0 if t is None else t.numel()
    return offsets, width


def _flags(prm: PSAParams) -> dict:
    """Which optional parameters the block has (the vector kernels' ``HAS_*``)."""
    return dict(
        HAS_BV=prm.ch_bv is not None,
        HAS_BZ=prm.ch_bz is not None,
        HAS_LN=prm.ch_ln_w is not None,
        HAS_LNB=prm.ch_ln_b is not None,
        HAS_Z2=prm.ch_wz2 is not None,
        HAS_BZ2=prm.ch_bz2 is not None,
        HAS_BSQ=prm.sp_bq is not None)


def _pixels_view(xv: Tensor, sx: Tuple[int, int, int]) -> Tensor:
    """``xv`` ``(B, C, H, W)`` as the ``(B, C, HW)`` tensor its strides ``sx`` describe."""
    b, c, h, w = xv.shape
    return xv.as_strided((b, c, h * w), sx, xv.storage_offset())


def _forward(x: Tensor, paper: bool, seq: bool, eps: float,
             tensors: List[Optional[Tensor]]) -> List[Tensor]:
    """The forward: ``[out, a_ch, a_sp]`` (the maps for the hooks) and what backward keeps,
    ``[r, the per-sample vectors (B, V), a_sp, softmax (PSA_p), W_sv diag(a_ch) (PSA_s)]``
    (the last two empty where unused)."""
    b, c, h, w = x.shape
    prm = PSAParams(*tensors, eps)
    geo = _Launch(x, prm)
    xv, sx = _bcn(x)
    dense = not paper and seq
    sm = wva = None
    with no_autocast(x):
        # pass 1 over X: r = w_q^T X, and per run X exp(r - m), its normaliser, X 1
        r = geo.vectors(geo.b, geo.n)
        m, den = geo.vectors(geo.runs, geo.b), geo.vectors(geo.runs, geo.b)
        xe, xs = geo.vectors(geo.runs, geo.b, geo.c), geo.vectors(geo.runs, geo.b, geo.c)
        _launch(_pool_kernel, geo.grid)(xv, _mat(prm.ch_wq, x), r, m, den, xe, xs, geo.b, geo.c,
                                        geo.n, geo.run, *sx, **geo.meta)
        # the per-sample vector maths
        vecs = geo.vectors(geo.b, geo.width)
        a_ch4 = torch.empty((b, c, 1, 1), dtype=x.dtype, device=x.device)
        if dense:
            wva = torch.empty((b, geo.h, c), dtype=x.dtype, device=x.device)
        _launch(_vector_kernel, (geo.b, ))(
            m,
            den,
            xe,
            xs,
            *(_mat(getattr(prm, n), m) for n in _VECTOR_PARAMS),
            vecs,
            a_ch4,
            m if wva is None else wva,
            *_eps_ratio(eps),
            geo.runs,
            geo.b,
            geo.c,
            geo.h,
            geo.z,
            geo.n,
            geo.width,
            PAPER=paper,
            SEQ=seq,
            DENSE=dense,
            HAS_BSV=paper and prm.sp_bv is not None,
            **_flags(prm),
            **geo.vector_meta)
        # the spatial map and the output
        a_sp = geo.vectors(geo.b, geo.n)
        a_sp4 = torch.empty((b, 1, h, w), dtype=x.dtype, device=x.device)
        out = _new_like(x)
        lg = lm = lden = None
        if dense:  # softmax_HW((W_sv diag(a_ch)) X), weighted by sq
            o_sq = 5 * c
            theta = torch.bmm(wva, _pixels_view(xv, sx))
            theta = torch.softmax(theta if theta.dtype == geo.acc else theta.to(geo.acc), -1)
            lg = torch.bmm(vecs[:, o_sq:o_sq + geo.h].unsqueeze(1), theta)  # (B, 1, HW)
            spatial = _DENSE
        elif paper:
            spatial = _SIGMOID
        else:  # official PSA_p: sigmoid(softmax over the pixels of the logits)
            lg = geo.vectors(geo.b, geo.n)
            lm, lden = geo.vectors(geo.runs, geo.b), geo.vectors(geo.runs, geo.b)
            _spatial(xv, sx, geo, _LOGITS, vecs, lg, a_sp, a_sp4, out, lm, lden, False, seq)
            spatial, sm = _SOFTMAX, lg
        _spatial(xv, sx, geo, spatial, vecs, lg, a_sp, a_sp4, out, lm, lden, paper
                 and prm.sp_bv is not None, seq)
    absent = [t if t is not None else x.new_empty(0, dtype=geo.acc) for t in (sm, wva)]
    return [out, a_ch4, a_sp4, r, vecs, a_sp, *absent]


def _spatial(xv: Tensor, sx: Tuple[int, int, int], geo: _Launch, spatial: int, vecs: Tensor,
             lg: Optional[Tensor], a_sp: Tensor, a_sp4: Tensor, out: Tensor, lm: Optional[Tensor],
             lden: Optional[Tensor], bias: bool, seq: bool) -> None:
    """One :func:`_spatial_kernel` pass."""
    _launch(_spatial_kernel, geo.grid)(
        xv,
        vecs,
        a_sp if lg is None else lg,
        a_sp,
        a_sp4,
        out,
        a_sp if lm is None else lm,
        a_sp if lden is None else lden,
        geo.b,
        geo.c,
        geo.h,
        geo.z,
        geo.n,
        geo.width,
        geo.runs,
        geo.run,
        *sx,
        *_bcn(out)[1],
        SPATIAL=spatial,
        HAS_BIAS=bias,
        SEQ=seq,
        **geo.meta)


def _backward(dout: Tensor, x: Tensor, saved: List[Tensor], paper: bool, seq: bool, eps: float,
              tensors: List[Optional[Tensor]], needs: List[bool]) -> List[Optional[Tensor]]:
    """The backward: ``[dX, *parameter gradients]`` (None where ``needs``, for ``x`` and
    then each of ``tensors``, says no) from what :func:`_forward` kept (``saved``)."""
    r, vecs, a_sp, sm, wva = (t if t.numel() or i < 3 else None for i, t in enumerate(saved))
    dense = not paper and seq
    prm = PSAParams(*tensors, eps)
    geo = _Launch(x, prm)
    xv, sx = _bcn(x)
    gv, sg = _bcn(dout)
    want_dx, want_dwq = needs[0], needs[1] or needs[2]
    with no_autocast(x):
        # pass 1 over (dOut, X): dA_ch, dA_sp and the logits' gradient reduced over the pixels
        dsp = geo.vectors(geo.b, geo.n)
        dach, p1, p2 = (geo.vectors(geo.runs, geo.b, geo.c) for _ in range(3))
        dsps = geo.vectors(geo.runs, geo.b)
        _launch(_grad_pool_kernel, geo.grid)(
            gv,
            xv,
            vecs,
            a_sp,
            a_sp if sm is None else sm,
            dsp,
            dach,
            p1,
            p2,
            dsps,
            geo.b,
            geo.c,
            geo.h,
            geo.z,
            geo.n,
            geo.width,
            geo.run,
            *sg,
            *sx,
            SEQ=seq,
            HAS_SM=sm is not None,
            DENSE=dense,
            **geo.meta)
        gvec = geo.vectors(geo.b, geo.grad_width)
        dwva = dx3 = None
        if dense:  # the spatial GEMMs' backward; the softmax's in a kernel
            x3 = _pixels_view(xv, sx)
            lg = torch.bmm(wva, x3)  # (B, C/2, HW), recomputed
            dt = torch.empty_like(lg)
            rows = max(1, min(MAX_TILE // geo.block_n, triton.next_power_of_2(geo.h)))
            _launch(_dense_grad_kernel, (geo.b, triton.cdiv(geo.h, rows)))(
                lg,
                vecs,
                dsp,
                dt,
                gvec,
                geo.h,
                geo.n,
                geo.c,
                geo.z,
                geo.width,
                geo.grad_width,
                ACC=geo.meta['ACC'],
                BLOCK_R=rows,
                BLOCK_N=geo.block_n,
                num_warps=num_warps(rows * geo.block_n))
            dwva = torch.bmm(dt, x3.transpose(1, 2))  # (B, C/2, C)
            if want_dx:
                dx3 = torch.bmm(wva.transpose(1, 2), dt)  # (B, C, HW)
        # the per-sample vector maths' backward, and the 1x1 convs' gradients per sample
        offsets, width = _param_offsets(prm)
        gp = geo.vectors(geo.b, width)
        _launch(_vector_grad_kernel, (geo.b, ))(
            dach,
            p1,
            p2,
            dsps,
            dach if dwva is None else dwva,
            *(_mat(getattr(prm, n), dach)
              for n in ('ch_wv', 'ch_wz', 'ch_ln_w', 'ch_wz2', 'sp_wq', 'sp_wv', 'sp_bv')),
            vecs,
            gvec,
            gp,
            *_eps_ratio(eps),
            geo.runs,
            geo.b,
            geo.c,
            geo.h,
            geo.z,
            geo.width,
            geo.grad_width,
            width,
            *offsets,
            PAPER=paper,
            SEQ=seq,
            DENSE=dense,
            HAS_SM=sm is not None,
            HAS_BSV=paper and prm.sp_bv is not None,
            **_flags(prm),
            **geo.vector_meta)
        # pass 2 over (dOut, X): w_q's gradient and dX
        dx = _new_like(x) if want_dx else None
        dwq = geo.vectors(geo.runs * geo.b, geo.c + 1)
        if want_dx or want_dwq:
            _launch(_grad_input_kernel, geo.grid)(
                gv,
                xv,
                xv if dx is None else dx,
                vecs,
                gvec,
                a_sp,
                r,
                _mat(prm.ch_wq, x),
                dsp,
                dsp if sm is None else sm,
                xv if dx3 is None else dx3,
                dwq,
                geo.b,
                geo.c,
                geo.h,
                geo.z,
                geo.n,
                geo.width,
                geo.grad_width,
                geo.run,
                *sg,
                *sx,
                *((0, 0, 0) if dx is None else _bcn(dx)[1]),
                *((0, 0, 0) if dx3 is None else dx3.stride()),
                SEQ=seq,
                WANT_DX=want_dx,
                WANT_DWQ=want_dwq,
                DENSE=dense,
                HAS_SM=sm is not None,
                **geo.meta)
        dprm = [None] * len(tensors)
        if any(needs[1:]):  # the parameters' gradients summed over the batch, in a fixed order
            dtypes = {t.dtype for t in tensors if t is not None}
            dtype = dtypes.pop() if len(dtypes) == 1 else geo.acc
            flat = torch.empty(geo.c + 1 + width, dtype=dtype, device=x.device)
            block = 1024
            _launch(_batch_sum_kernel, (triton.cdiv(flat.numel(), block), ))(
                dwq,
                geo.runs * geo.b if want_dwq else 0,
                geo.c + 1,
                gp,
                geo.b,
                width,
                flat,
                ACC=geo.meta['ACC'],
                BLOCK=block,
                num_warps=8)  # 4 masked entries a thread (8 in fp64 ran out of predicates)
            starts = [0, geo.c] + [geo.c + 1 + o for o in offsets]
            for i, (t, need, start) in enumerate(zip(tensors, needs[1:], starts)):
                if t is not None and need:
                    grad = flat[start:start + t.numel()].view(t.shape)
                    dprm[i] = grad if grad.dtype == t.dtype else grad.to(t.dtype)
    return [dx, *dprm]


class _TritonPSA(torch.autograd.Function):
    """The fused block over the Triton kernels; inputs ``(x, paper, seq, eps, *tensors)``
    (``tensors``: :attr:`PSAParams.tensors`), outputs ``(out, a_ch, a_sp)``.

    Official PSA_s (``dense``): its spatial map, a softmax over the pixels of each of the
    C/2 channels of ``W_v(a_ch * X)``, is two batched GEMMs
    (:func:`psa_fused.sequential_spatial_map`, cuBLAS on CUDA), recomputed in backward;
    its other passes are the kernels'."""

    @staticmethod
    def forward(ctx, x: Tensor, paper: bool, seq: bool, eps: float, *tensors: Optional[Tensor]):
        out, a_ch4, a_sp4, *saved = _forward(x, paper, seq, eps, list(tensors))
        ctx.save_for_backward(x, *saved, *tensors)
        ctx.flags = (paper, seq, eps)
        ctx.mark_non_differentiable(a_ch4, a_sp4)
        ctx.set_materialize_grads(False)  # the maps' gradients are not used: no zeros
        return out, a_ch4, a_sp4

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: Tensor, _da_ch: Tensor, _da_sp: Tensor):
        x, *rest = ctx.saved_tensors
        saved, tensors = rest[:_SAVED], rest[_SAVED:]
        needs = ctx.needs_input_grad
        dx, *dprm = _backward(dout, x, saved, *ctx.flags, tensors, [needs[0], *needs[4:]])
        return (dx, None, None, None, *dprm)


def unsupported(x: Tensor, paper: bool, sequential: bool) -> Optional[str]:
    """Why the Triton kernels cannot evaluate ``x`` (None when they can, device aside)."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return f'x must be a floating-point tensor, got dtype {x.dtype}'
    if x.shape[1:].numel() >= _INT32:
        return (f'the Triton kernels index within a sample with int32: a sample must have '
                f'fewer than 2^31 elements, got shape {tuple(x.shape)}')
    if x.shape[1] > MAX_CHANNELS:
        return (f'the Triton kernels take at most {MAX_CHANNELS} channels (a tile holds every '
                f'channel), got {x.shape[1]}')
    return None


def _device(x: Tensor):
    """Kernels launch on the current device: make it ``x``'s."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _expand(given: List[Tensor], present: List[bool]) -> List[Optional[Tensor]]:
    """:attr:`PSAParams.tensors` from the present ones and the mask (an op's list of tensors
    holds no None: autograd would not see the tensors of such a list)."""
    it = iter(given)
    return [next(it) if p else None for p in present]


def _op_forward(x: Tensor, paper: bool, seq: bool, eps: float, params: List[Tensor],
                present: List[bool]) -> List[Tensor]:
    with _device(x):
        return _forward(x, paper, seq, eps, _expand(params, present))


def _op_backward(dout: Tensor, x: Tensor, saved: List[Tensor], paper: bool, seq: bool, eps: float,
                 params: List[Tensor], present: List[bool], needs: List[bool]) -> List[Tensor]:
    with _device(x):
        grads = _backward(dout, x, saved, paper, seq, eps, _expand(params, present), needs)
    # an op returns no None, and no output that aliases another (the parameters' gradients
    # are views of one buffer: cloned here, which the autograd Function does not need)
    return [
        x.new_empty(0) if t is None else t if i == 0 else t.clone() for i, t in enumerate(grads)
    ]


def _op_setup_context(ctx, inputs, output) -> None:
    x, paper, seq, eps, params, present = inputs
    ctx.save_for_backward(x, *output[3:], *params)
    ctx.flags, ctx.present = (paper, seq, eps), present
    ctx.needs = [
        x.requires_grad, *(p is not None and p.requires_grad for p in _expand(params, present))
    ]
    ctx.mark_non_differentiable(output[1], output[2])


def _op_autograd(ctx, grads):
    x, *rest = ctx.saved_tensors
    saved, params = rest[:_SAVED], rest[_SAVED:]
    got = _OPS[1](grads[0], x, saved, *ctx.flags, params, ctx.present, ctx.needs)
    dx, *dparams = [t if need else None for t, need in zip(got, ctx.needs)]
    return dx, None, None, None, [d for d, p in zip(dparams, ctx.present) if p], None


def _define_ops() -> Optional[tuple]:
    """The custom ops ``mmpsa::psa_triton`` (forward, with autograd) and
    ``mmpsa::psa_triton_backward`` (torch >= 2.6; None before)."""
    if not compat.has_triton_op():
        return None
    forward = compat.triton_op('mmpsa::psa_triton', _op_forward)
    backward = compat.triton_op('mmpsa::psa_triton_backward', _op_backward)
    forward.register_autograd(_op_autograd, setup_context=_op_setup_context)
    return forward, backward


#: ``(forward, backward)`` custom ops (torch.compile traces them and sees the Triton kernels),
#: or None on a torch without ``torch.library.triton_op``.
_OPS = _define_ops()


def fused_psa(x: Tensor,
              paper: bool,
              sequential: bool,
              params: PSAParams,
              traceable: Optional[bool] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """The block's fused evaluation through the Triton kernels: ``(out, a_ch, a_sp)``.

    Args:
        x (Tensor): Input ``(B, C, H, W)``: CUDA, or CPU under :data:`INTERPRET`.
        paper (bool): Paper variant (True) or the official one (False).
        sequential (bool): Sequential mode.
        params (PSAParams): The block's parameters.
        traceable (bool, optional): Go through the custom op ``mmpsa::psa_triton``, which
            ``torch.compile`` traces into (torch >= 2.6), rather than the autograd Function
            (less Python per call). Default: under ``torch.compile``.

    Returns:
        tuple: The output and the maps, as :func:`mmpsa.layers.dispatch.fused_function` gives them.
    """
    reason = unsupported(x, paper, sequential)
    if reason is not None:
        raise ValueError(f'{reason} (paper={paper}, sequential={sequential})')
    if traceable is None:
        traceable = compat.is_compiling()
    if traceable and _OPS is not None:
        present = [t is not None for t in params.tensors]
        given = [t for t in params.tensors if t is not None]
        return tuple(_OPS[0](x, paper, sequential, params.ln_eps, given, present)[:3])
    # kernels launch on the current device (autograd runs backward on the input's device)
    with _device(x):
        return tuple(_TritonPSA.apply(x, paper, sequential, params.ln_eps, *params.tensors))
