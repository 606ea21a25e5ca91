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
import os
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from .. import compat
from .precision import no_autocast
from .psa_fused import (PARAM_NAMES, PSAParams, channel_map, maps_for_hooks, sequential_spatial_map,
                        spatial_query, spatial_vector)

Tensor = torch.Tensor

#: Whether the kernels were decorated for triton's interpreter (they then run CPU tensors).
INTERPRET = os.environ.get('TRITON_INTERPRET', '0') == '1'

#: The most elements of a ``(BLOCK_C, BLOCK_N)`` tile: compiled for sm_90, every kernel keeps
#: its tiles in registers without spilling up to this size (``tools/triton_compile_check.py``).
MAX_TILE = 2048
#: The most channels a block may have here: a tile holds every channel of its pixels.
MAX_CHANNELS = MAX_TILE
_MAX_BLOCK_N = 128
_INT32 = 2**31  # offsets within a sample are int32, the sample's own offset int64
_TARGET_PROGRAMS = 1024  # split each sample's pixels into runs until about this many programs

# _spatial_kernel: what it does with the logits u^T X
_LOGITS = 0  # write them (official PSA_p, before its softmax over the pixels)
_SIGMOID = 1  # a_sp = sigmoid(logits + bias), write a_sp and the output (paper variant)
_GIVEN = 2  # read a_sp, write the output (official PSA_p, after the softmax)


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
def _spatial_kernel(x_ptr, u_ptr, bias_ptr, a_ch_ptr, a_sp_ptr, out_ptr, C, N, run, sxb, sxc, sxn,
                    sob, soc, son, SPATIAL: tl.constexpr, HAS_BIAS: tl.constexpr, SEQ: tl.constexpr,
                    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """The spatial map and the output over a run of pixels. ``SPATIAL``: ``_LOGITS``
    writes ``u^T x`` to ``a_sp``; ``_SIGMOID`` writes ``a_sp = sigmoid(u^T x + bias[b])``
    and the output; ``_GIVEN`` reads ``a_sp`` and writes the output ``x * (a_ch + a_sp)``
    (``x * a_ch * a_sp`` with ``SEQ``)."""
    b, k, offs_c, mask_c, start, n_end = _program(C, N, run, BLOCK_C)
    if SPATIAL != 2:
        u = _channels(u_ptr + b * C, offs_c, mask_c, ACC)
    if SPATIAL != 0:
        a_ch = _channels(a_ch_ptr + b * C, offs_c, mask_c, ACC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + b).to(ACC)
    for n0 in range(start, n_end, BLOCK_N):
        offs_n, mask_n = _pixel_block(n0, n_end, BLOCK_N)
        mask = mask_c[:, None] & mask_n[None, :]
        x = _tile(x_ptr, b, sxb, sxc, sxn, offs_c, offs_n, mask, ACC)
        if SPATIAL == 2:
            a_sp = _pixels(a_sp_ptr + b * N, offs_n, mask_n, ACC)
        else:
            lg = tl.sum(x * u[:, None], axis=0)
            if SPATIAL == 0:
                tl.store(a_sp_ptr + b * N + offs_n, lg, mask=mask_n)
            else:
                if HAS_BIAS:
                    lg += bias
                a_sp = 1.0 / (1.0 + tl.exp(-lg))
                tl.store(a_sp_ptr + b * N + offs_n, a_sp, mask=mask_n)
        if SPATIAL != 0:
            if SEQ:
                out = x * (a_ch[:, None] * a_sp[None, :])
            else:
                out = x * (a_ch[:, None] + a_sp[None, :])
            tl.store(
                out_ptr + b * sob + offs_c[:, None] * soc + offs_n[None, :] * son,
                out.to(out_ptr.dtype.element_ty),
                mask=mask)


@triton.jit
def _grad_pool_kernel(g_ptr, x_ptr, a_ch_ptr, a_sp_ptr, k1_ptr, sm_ptr, dsp_ptr, dach_ptr, p1_ptr,
                      p2_ptr, B, C, N, run, sgb, sgc, sgn, sxb, sxc, sxn, SEQ: tl.constexpr,
                      HAS_SM: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """Backward's first pass over (dOut ``g``, ``x``) on a run of pixels: the output's
    multipliers' gradients ``dach[k, b, c] = sum_n g x (a_sp)`` and ``dA_sp[n] = sum_c g x
    (a_ch)``; ``dsp = dA_sp * k1`` (written) and ``p1[k, b, c] = sum_n x dsp``, and with
    ``HAS_SM`` ``p2[k, b, c] = sum_n x sm``."""
    b, k, offs_c, mask_c, start, n_end = _program(C, N, run, BLOCK_C)
    if SEQ:
        a_ch = _channels(a_ch_ptr + b * C, offs_c, mask_c, ACC)
    dach = tl.zeros((BLOCK_C, ), ACC)
    p1 = tl.zeros((BLOCK_C, ), ACC)
    p2 = tl.zeros((BLOCK_C, ), ACC)
    for n0 in range(start, n_end, BLOCK_N):
        offs_n, mask_n = _pixel_block(n0, n_end, BLOCK_N)
        mask = mask_c[:, None] & mask_n[None, :]
        x = _tile(x_ptr, b, sxb, sxc, sxn, offs_c, offs_n, mask, ACC)
        gx = _tile(g_ptr, b, sgb, sgc, sgn, offs_c, offs_n, mask, ACC) * x
        if SEQ:
            a_sp = _pixels(a_sp_ptr + b * N, offs_n, mask_n, ACC)
            dach += tl.sum(gx * a_sp[None, :], axis=1)
            da_sp = tl.sum(gx * a_ch[:, None], axis=0)
        else:
            dach += tl.sum(gx, axis=1)
            da_sp = tl.sum(gx, axis=0)
        dsp = da_sp * _pixels(k1_ptr + b * N, offs_n, mask_n, ACC)
        tl.store(dsp_ptr + b * N + offs_n, dsp, mask=mask_n)
        p1 += tl.sum(x * dsp[None, :], axis=1)
        if HAS_SM:
            p2 += tl.sum(x * _pixels(sm_ptr + b * N, offs_n, mask_n, ACC)[None, :], axis=1)
    out = (k * B + b) * C + offs_c
    tl.store(dach_ptr + out, dach, mask=mask_c)
    tl.store(p1_ptr + out, p1, mask=mask_c)
    if HAS_SM:
        tl.store(p2_ptr + out, p2, mask=mask_c)


@triton.jit
def _grad_input_kernel(g_ptr, x_ptr, dx_ptr, a_ch_ptr, a_sp_ptr, wq_ptr, dxp_ptr, p_ptr, c0_ptr,
                       dg_ptr, u_ptr, dlg_ptr, e_ptr, dwq_ptr, drs_ptr, B, C, N, run, sgb, sgc, sgn,
                       sxb, sxc, sxn, sdb, sdc, sdn, seb, sec, sen, SEQ: tl.constexpr,
                       WANT_DX: tl.constexpr, WANT_DWQ: tl.constexpr, DENSE: tl.constexpr,
                       ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """Backward's second pass over (dOut ``g``, ``x``) on a run of pixels: ``dr = p (dxp^T
    x - c0[b])`` (``c0 = dxp . X p``); with ``WANT_DWQ`` ``dwq[k, b, c] = sum_n x dr`` and
    ``drs[k, b] = sum_n dr``; with ``WANT_DX`` ``dx = g M + w_q dr^T + dxp p^T + dg 1^T / N +
    S`` (``M = a_ch + a_sp``, or ``a_ch a_sp`` with ``SEQ``) where the spatial branch's term
    ``S`` is ``u dlg^T``, or with ``DENSE`` the tensor ``e`` (official PSA_s)."""
    b, k, offs_c, mask_c, start, n_end = _program(C, N, run, BLOCK_C)
    dxp = _channels(dxp_ptr + b * C, offs_c, mask_c, ACC)
    c0 = tl.load(c0_ptr + b).to(ACC)
    if WANT_DX:
        a_ch = _channels(a_ch_ptr + b * C, offs_c, mask_c, ACC)
        wq = _channels(wq_ptr, offs_c, mask_c, ACC)
        dg = _channels(dg_ptr + b * C, offs_c, mask_c, ACC) / N  # in ACC (fp64 stays fp64)
        if not DENSE:
            u = _channels(u_ptr + b * C, offs_c, mask_c, ACC)
    dwq = tl.zeros((BLOCK_C, ), ACC)
    drs = tl.zeros([], ACC)
    for n0 in range(start, n_end, BLOCK_N):
        offs_n, mask_n = _pixel_block(n0, n_end, BLOCK_N)
        mask = mask_c[:, None] & mask_n[None, :]
        x = _tile(x_ptr, b, sxb, sxc, sxn, offs_c, offs_n, mask, ACC)
        p = _pixels(p_ptr + b * N, offs_n, mask_n, ACC)
        dr = p * (tl.sum(x * dxp[:, None], axis=0) - c0)  # masked pixels: p = 0
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
                dx += u[:, None] * _pixels(dlg_ptr + b * N, offs_n, mask_n, ACC)[None, :]
            tl.store(
                dx_ptr + b * sdb + offs_c[:, None] * sdc + offs_n[None, :] * sdn,
                dx.to(dx_ptr.dtype.element_ty),
                mask=mask)
    if WANT_DWQ:
        tl.store(dwq_ptr + (k * B + b) * C + offs_c, dwq, mask=mask_c)
        tl.store(drs_ptr + k * B + b, drs)


_TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}
#: The accumulation dtype of an input dtype (``precision.acc_dtype``'s, without a host call).
_ACC = {
    torch.float16: torch.float32,
    torch.bfloat16: torch.float32,
    torch.float32: torch.float32,
    torch.float64: torch.float64
}


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


class _Launch:
    """The launch geometry for ``x`` ``(B, C, H, W)``: tile sizes, the pixel runs and the
    grid ``(B, runs)``, and the accumulation dtype."""

    def __init__(self, x: Tensor) -> None:
        self.b, self.c, h, w = x.shape
        self.n, self.device = h * w, x.device
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

    def vectors(self, *shape: int) -> Tensor:
        """An empty accumulation-dtype tensor ``shape`` on ``x``'s device."""
        return torch.empty(shape, dtype=self.acc, device=self.device)


def _vector_backward(xp: Tensor, g: Tensor, prm: PSAParams, paper: bool, seq: bool, dach: Tensor,
                     du: Optional[Tensor], dbias: Optional[Tensor], dense: Optional[tuple]):
    """The backward of the per-sample vector maths (:func:`psa_fused.channel_map`,
    :func:`~psa_fused.spatial_query`, :func:`~psa_fused.spatial_vector`; official PSA_s:
    :func:`~psa_fused.sequential_spatial_map`), written out (the derivatives of
    ``mmpsa/csrc/psa_cpu_kernel.cpp``); the intermediates are recomputed from ``X p`` and
    ``GP(X)``.

    Args:
        dach, du, dbias: The gradients of ``a_ch`` (through the output), of ``u`` and of the
            spatial bias (paper variant, official PSA_p; None for PSA_s).
        dense: PSA_s: ``(X (B, C, HW), dA_sp, whether X needs its gradient)``.

    Returns:
        tuple: ``(d(X p), d GP(X), PSA_s's X gradient or None, {parameter name: gradient}``
        in the accumulation dtype, shaped as the maths uses them).
    """
    acc = xp.dtype
    mat = lambda t: t.detach().flatten(1).to(acc)  # noqa: E731  (O, I) weights
    vec = lambda t: None if t is None else t.detach().flatten().to(acc)  # noqa: E731
    grads = {}

    def linear(t, name, bias):  # forward of a 1x1 conv on vectors
        w = mat(getattr(prm, name))
        return F.linear(t, w, vec(getattr(prm, bias))), w

    def linear_back(dy, t, w, name, bias):  # its backward: the input's gradient
        grads[name] = dy.t() @ t
        if getattr(prm, bias) is not None:
            grads[bias] = dy.sum(0)
        return dy @ w

    # the channel branch again: v = W_v xp + b_v, z = W_z v + b_z [, LN] [, W_z2 relu(.)]
    v, wv = linear(xp, 'ch_wv', 'ch_bv')
    z, wz = linear(v, 'ch_wz', 'ch_bz')
    if prm.ch_ln_w is not None:
        ln_w = vec(prm.ch_ln_w)
        z0 = z
        z, mu, rstd = torch.native_layer_norm(z0, (z0.shape[1], ), ln_w, vec(prm.ch_ln_b),
                                              prm.ln_eps)
        zn = (z0 - mu) * rstd
    zf = z
    if prm.ch_wz2 is not None:
        h = torch.relu(z)
        zf, wz2 = linear(h, 'ch_wz2', 'ch_bz2')
    a_ch = torch.sigmoid(zf)
    q = g * a_ch if seq else g
    sq, wsq = linear(q, 'sp_wq', 'sp_bq')
    wsv = mat(prm.sp_wv)
    dx3 = None
    if dense is not None:  # a_sp = sigmoid(sq^T softmax_HW((W_sv diag(a_ch)) X))
        x3, dsp, want_dx3 = dense
        cast = (lambda t: t) if x3.dtype == acc else (lambda t: t.to(x3.dtype))  # noqa: E731
        wva = wsv.unsqueeze(0) * a_ch.unsqueeze(1)  # (B, C/2, C)
        theta = torch.softmax(torch.bmm(cast(wva), x3).to(acc), -1)  # (B, C/2, HW)
        a_sp = torch.sigmoid(torch.bmm(sq.unsqueeze(1), theta)).squeeze(1)
        dl = dsp * a_sp * (1 - a_sp)  # the sigmoid's input
        dsq = torch.bmm(theta, dl.unsqueeze(-1)).squeeze(-1)  # (B, C/2)
        d_t = cast(theta * sq.unsqueeze(-1) * (dl.unsqueeze(1) - dsq.unsqueeze(-1)))  # softmax
        dwva = torch.bmm(d_t, x3.transpose(1, 2)).to(acc)  # (B, C/2, C)
        grads['sp_wv'] = (dwva * a_ch.unsqueeze(1)).sum(0)
        dach = dach + (dwva * wsv.unsqueeze(0)).sum(1)
        if want_dx3:
            dx3 = torch.bmm(cast(wva).transpose(1, 2), d_t)  # (B, C, HW)
    elif paper:  # u = W_sv^T s (times a_ch, sequential), s = softmax(sq), bias = s^T b_sv
        s = torch.softmax(sq, -1)
        du0 = du
        if seq:
            du0 = du * a_ch
            dach = dach + du * (s @ wsv)
        ds = du0 @ wsv.t()
        grads['sp_wv'] = s.t() @ du0
        if prm.sp_bv is not None:
            ds = ds + dbias * vec(prm.sp_bv)
            grads['sp_bv'] = (dbias * s).sum(0)
        dsq = s * (ds - (s * ds).sum(-1, keepdim=True))
    else:  # official PSA_p: u = W_sv^T sq
        dsq = du @ wsv.t()
        grads['sp_wv'] = sq.t() @ du
    dq = linear_back(dsq, q, wsq, 'sp_wq', 'sp_bq')
    dg = dq
    if seq:
        dg = dq * a_ch
        dach = dach + dq * g
    dz = dach * a_ch * (1 - a_ch)  # the sigmoid's input
    if prm.ch_wz2 is not None:
        dz = linear_back(dz, h, wz2, 'ch_wz2', 'ch_bz2') * (z > 0)
    if prm.ch_ln_w is not None:
        grads['ch_ln_w'] = (dz * zn).sum(0)
        if prm.ch_ln_b is not None:
            grads['ch_ln_b'] = dz.sum(0)
        dzn = dz * ln_w
        dz = rstd * (dzn - dzn.mean(-1, keepdim=True) - zn * (dzn * zn).mean(-1, keepdim=True))
    dv = linear_back(dz, v, wz, 'ch_wz', 'ch_bz')
    dxp = linear_back(dv, xp, wv, 'ch_wv', 'ch_bv')
    return dxp, dg, dx3, grads


def _pool(x: Tensor, sx: Tuple[int, int, int], wq: Tensor,
          geo: _Launch) -> Tuple[Tensor, Tensor, Tensor]:
    """``r = w_q^T X`` ``(B, HW)``, ``X softmax(r)`` and ``GP(X)`` ``(B, C)`` in one pass."""
    r = geo.vectors(geo.b, geo.n)
    m, den = geo.vectors(geo.runs, geo.b), geo.vectors(geo.runs, geo.b)
    xe, xs = geo.vectors(geo.runs, geo.b, geo.c), geo.vectors(geo.runs, geo.b, geo.c)
    _launch(_pool_kernel, geo.grid)(x, wq, r, m, den, xe, xs, geo.b, geo.c, geo.n, geo.run, *sx,
                                    **geo.meta)
    scale = torch.exp(m - m.amax(0))  # the runs' online softmaxes merged
    xp = (xe * scale.unsqueeze(-1)).sum(0) / (den * scale).sum(0).unsqueeze(-1)
    return r, xp, xs.sum(0) / geo.n


def _spatial(x: Tensor, sx: Tuple[int, int, int], geo: _Launch, spatial: int, u: Optional[Tensor],
             bias: Optional[Tensor], a_ch: Optional[Tensor], a_sp: Optional[Tensor],
             seq: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """One :func:`_spatial_kernel` pass: ``(a_sp or the logits, the output or None)``."""
    a_sp = geo.vectors(geo.b, geo.n) if a_sp is None else a_sp
    out = None if spatial == _LOGITS else _new_like(x)
    so = (0, 0, 0) if out is None else _bcn(out)[1]
    _launch(_spatial_kernel, geo.grid)(
        x,
        x if u is None else u,
        x if bias is None else bias,
        x if a_ch is None else a_ch,
        a_sp,
        x if out is None else out,
        geo.c,
        geo.n,
        geo.run,
        *sx,
        *so,
        SPATIAL=spatial,
        HAS_BIAS=bias is not None,
        SEQ=seq,
        **geo.meta)
    return a_sp, out


def _pixels_view(xv: Tensor, sx: Tuple[int, int, int]) -> Tensor:
    """``xv`` ``(B, C, H, W)`` as the ``(B, C, HW)`` tensor its strides ``sx`` describe."""
    b, c, h, w = xv.shape
    return xv.as_strided((b, c, h * w), sx, xv.storage_offset())


def _forward(x: Tensor, paper: bool, seq: bool, eps: float,
             tensors: List[Optional[Tensor]]) -> List[Tensor]:
    """The forward: ``[out, a_ch, a_sp]`` (the maps for the hooks) and what backward keeps,
    ``[r, X p, GP(X), a_ch, a_sp, softmax (PSA_p), u]`` (the last two empty where unused)."""
    b, c, h, w = x.shape
    prm = PSAParams(*tensors, eps)
    geo = _Launch(x)
    xv, sx = _bcn(x)
    sm = u = None
    with no_autocast(x):
        wq = prm.ch_wq.detach().flatten().to(geo.acc).contiguous()
        r, xp, g = _pool(xv, sx, wq, geo)
        a_ch = channel_map(xp, prm)
        sq = spatial_query(g, a_ch, prm, seq)
        if not paper and seq:  # official PSA_s
            a_sp = sequential_spatial_map(_pixels_view(xv, sx), a_ch, sq, prm)
            _, out = _spatial(xv, sx, geo, _GIVEN, None, None, a_ch, a_sp, seq)
        else:
            u, bias = spatial_vector(sq, a_ch, prm, paper, seq)
            u = u.contiguous()
            if paper:
                a_sp, out = _spatial(xv, sx, geo, _SIGMOID, u, bias, a_ch, None, seq)
            else:  # official PSA_p: sigmoid(softmax over the pixels of the logits)
                lg, _ = _spatial(xv, sx, geo, _LOGITS, u, None, None, None, seq)
                sm = torch.softmax(lg, -1)
                a_sp, out = _spatial(xv, sx, geo, _GIVEN, None, None, a_ch, torch.sigmoid(sm), seq)
    a_ch4 = maps_for_hooks(a_ch.view(b, c, 1, 1), x.dtype)
    a_sp4 = maps_for_hooks(a_sp.view(b, 1, h, w), x.dtype)
    absent = [t if t is not None else x.new_empty(0, dtype=geo.acc) for t in (sm, u)]
    return [out, a_ch4, a_sp4, r, xp, g, a_ch, a_sp, *absent]


def _backward(dout: Tensor, x: Tensor, saved: List[Tensor], paper: bool, seq: bool, eps: float,
              tensors: List[Optional[Tensor]], needs: List[bool]) -> List[Optional[Tensor]]:
    """The backward: ``[dX, *parameter gradients]`` (None where ``needs``, for ``x`` and
    then each of ``tensors``, says no) from what :func:`_forward` kept (``saved``)."""
    r, xp, g, a_ch, a_sp, sm, u = (t if t.numel() or i < 5 else None for i, t in enumerate(saved))
    dense = not paper and seq
    geo = _Launch(x)
    xv, sx = _bcn(x)
    gv, sg = _bcn(dout)
    with no_autocast(x):
        # pass 1: dA_ch, dA_sp and the logits' gradient reduced over the pixels
        if dense:  # dsp = dA_sp
            k1 = torch.ones_like(a_sp)
        else:
            k1 = a_sp * (1 - a_sp) if paper else sm * a_sp * (1 - a_sp)
        dsp = geo.vectors(geo.b, geo.n)
        dach, p1, p2 = (geo.vectors(geo.runs, geo.b, geo.c) for _ in range(3))
        _launch(_grad_pool_kernel, geo.grid)(
            gv,
            xv,
            a_ch,
            a_sp,
            k1,
            xv if sm is None else sm,
            dsp,
            dach,
            p1,
            p2,
            geo.b,
            geo.c,
            geo.n,
            geo.run,
            *sg,
            *sx,
            SEQ=seq,
            HAS_SM=sm is not None,
            **geo.meta)
        dlg = dx3 = du = dbias = None
        prm = PSAParams(*tensors, eps)
        if dense:
            pass  # the spatial GEMMs' backward, in _vector_backward
        elif paper:  # a_sp = sigmoid(lg + bias)
            dlg, du, dbias = dsp, p1.sum(0), dsp.sum(-1, keepdim=True)
        else:  # a_sp = sigmoid(sm), sm = softmax(lg)
            s = dsp.sum(-1, keepdim=True)
            dlg, du, dbias = dsp - s * sm, p1.sum(0) - s * p2.sum(0), None
        x3 = (_pixels_view(xv, sx), dsp, needs[0]) if dense else None
        dxp, dg, dx3, grads = _vector_backward(xp, g, prm, paper, seq, dach.sum(0), du, dbias, x3)
        dprm = [
            None
            if t is None or not need or n not in grads else grads[n].reshape(t.shape).to(t.dtype)
            for n, t, need in zip(PARAM_NAMES, tensors, needs[1:])
        ]
        # pass 2: w_q's gradient and dX
        want_dx, want_dwq = needs[0], needs[1] or needs[2]
        dx = _new_like(x) if want_dx else None
        if want_dx or want_dwq:
            p = torch.softmax(r, -1)
            dwq, drs = geo.vectors(geo.runs, geo.b, geo.c), geo.vectors(geo.runs, geo.b)
            wq = tensors[0].detach().flatten().to(geo.acc).contiguous()
            _launch(_grad_input_kernel, geo.grid)(
                gv,
                xv,
                xv if dx is None else dx,
                a_ch,
                a_sp,
                wq,
                dxp.contiguous(),
                p, (dxp * xp).sum(-1),
                dg.contiguous(),
                xv if u is None else u,
                xv if dlg is None else dlg.contiguous(),
                xv if dx3 is None else dx3,
                dwq,
                drs,
                geo.b,
                geo.c,
                geo.n,
                geo.run,
                *sg,
                *sx,
                *((0, 0, 0) if dx is None else _bcn(dx)[1]),
                *((0, 0, 0) if dx3 is None else dx3.stride()),
                SEQ=seq,
                WANT_DX=want_dx,
                WANT_DWQ=want_dwq,
                DENSE=dense,
                **geo.meta)
            if needs[1]:  # w_q: r = w_q^T X
                dprm[0] = dwq.sum((0, 1)).view_as(tensors[0]).to(tensors[0].dtype)
            if needs[2]:  # b_q: cancels in the softmax (its gradient is 0 up to rounding)
                dprm[1] = drs.sum().view_as(tensors[1]).to(tensors[1].dtype)
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
        saved, tensors = rest[:7], rest[7:]
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
    return [x.new_empty(0) if t is None else t for t in grads]  # an op returns no None


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
    saved, params = rest[:7], rest[7:]
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
