"""Triton kernels for the fused PolarizedSelfAttention (paper variant, official PSA_p).

The maths is :mod:`mmpsa.layers.psa_fused`'s: every attention map is a function of a
few reductions of X (the input as a (C, HW) matrix per sample), and the output is
``X * (a_ch + a_sp)`` (parallel) or ``X * a_ch * a_sp`` (sequential). Here the passes
over X are Triton kernels, and the small per-sample vectors (``O(B (C + HW))``) are the
torch ops of :mod:`~mmpsa.layers.psa_fused` (``_pixel_weights``, ``_channel_map``, ...),
so both paths share one statement of the maths. Three kernels, each over X in the
``(B, C, HW)`` view given by strides (contiguous, channels_last, an expanded gradient):

* :func:`_rowdot_kernel`: ``r[b, n] = sum_c v[b, c] x[b, c, n] (y[b, c, n])``;
* :func:`_colsum_kernel`: ``s[b, c] = sum_n x[b, c, n] (y[b, c, n]) p[b, n]`` (and the
  mean over n), split over pixel chunks whose partial sums torch adds;
* :func:`_scale_kernel`: the output ``X * M`` (``M`` the output's multiplier) and
  ``dX = dOut * M + U V^T`` (``U`` ``(B, C, 4)``, ``V`` ``(B, HW, 4)``: the reductions'
  outer products).

Forward: ``r = w_q^T X``, then ``X p`` and ``GP(X)``, then the spatial logits ``u^T X``,
then the output (4 passes). Backward: ``dA_ch`` and ``dA_sp`` from ``dOut * X``, then
``X dlg`` and ``dxp^T X``, then ``X dr`` and dX (6 passes, two of them reading dOut).
Everything is accumulated in ``promote(dtype, float32)`` (fp64 stays fp64); no
``tl.dot`` is used (the interpreter's bf16 ``tl.dot`` is wrong).

CUDA tensors run compiled kernels. ``TRITON_INTERPRET=1``, set before this module is
imported and left set (triton reads it when the kernels are decorated and when they run),
runs them on CPU tensors through triton's interpreter: that is how the tests check them on
CPU (:data:`INTERPRET`). Offsets are int32: a tensor of 2^31 elements or more is not
supported.
"""
import contextlib
import os
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .precision import acc_dtype, no_autocast
from .psa_fused import (PSAParams, _channel_map, _for_hooks, _pixel_weights, _spatial_map,
                        _spatial_query, _spatial_vector)

Tensor = torch.Tensor

#: Whether the kernels were decorated for triton's interpreter (they then run CPU tensors).
INTERPRET = os.environ.get('TRITON_INTERPRET', '0') == '1'

_BLOCK_C = 32
_BLOCK_N = 128
_TARGET_PROGRAMS = 512  # colsum: split HW into chunks until about this many programs


@triton.jit
def _tile(ptr, b, sb, sc, sn, offs_c, offs_n, mask, ACC: tl.constexpr):
    """The ``(BLOCK_C, BLOCK_N)`` tile of a ``(B, C, HW)`` tensor of sample ``b``, as ``ACC``."""
    return tl.load(
        ptr + b * sb + offs_c[:, None] * sc + offs_n[None, :] * sn, mask=mask, other=0.0).to(ACC)


@triton.jit
def _xy_tile(x_ptr, y_ptr, b, sxb, sxc, sxn, syb, syc, syn, offs_c, offs_n, mask,
             HAS_Y: tl.constexpr, ACC: tl.constexpr):
    """The tile of ``x``, times that of ``y`` with ``HAS_Y``."""
    t = _tile(x_ptr, b, sxb, sxc, sxn, offs_c, offs_n, mask, ACC)
    if HAS_Y:
        t = t * _tile(y_ptr, b, syb, syc, syn, offs_c, offs_n, mask, ACC)
    return t


@triton.jit
def _rowdot_kernel(x_ptr, y_ptr, v_ptr, out_ptr, C, N, sxb, sxc, sxn, syb, syc, syn, svb,
                   HAS_Y: tl.constexpr, HAS_V: tl.constexpr, ACC: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """``out[b, n] = sum_c v[b, c] x[b, c, n] y[b, c, n]`` (``v``, ``y`` optional)."""
    b = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_N, ), dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        mask = mask_c[:, None] & mask_n[None, :]
        t = _xy_tile(x_ptr, y_ptr, b, sxb, sxc, sxn, syb, syc, syn, offs_c, offs_n, mask, HAS_Y,
                     ACC)
        if HAS_V:
            v = tl.load(v_ptr + b * svb + offs_c, mask=mask_c, other=0.0).to(ACC)
            t = t * v[:, None]
        acc += tl.sum(t, axis=0)
    tl.store(out_ptr + b * N + offs_n, acc, mask=mask_n)


@triton.jit
def _colsum_kernel(x_ptr, y_ptr, p_ptr, out_ptr, mean_ptr, B, C, N, chunk, sxb, sxc, sxn, syb, syc,
                   syn, inv_n, HAS_Y: tl.constexpr, HAS_P: tl.constexpr, HAS_MEAN: tl.constexpr,
                   ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """Partial sums over the pixels ``[k chunk, (k + 1) chunk)`` (``k`` = program 2):
    ``out[k, b, c] = sum_n x[b, c, n] y[b, c, n] p[b, n]`` (``y``, ``p`` optional) and
    ``mean[k, b, c] = sum_n x y / N``."""
    b = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    k = tl.program_id(2)
    mask_c = offs_c < C
    acc = tl.zeros((BLOCK_C, ), dtype=ACC)
    acc_mean = tl.zeros((BLOCK_C, ), dtype=ACC)
    n_end = tl.minimum(N, (k + 1) * chunk)
    for n0 in range(k * chunk, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_end
        mask = mask_c[:, None] & mask_n[None, :]
        t = _xy_tile(x_ptr, y_ptr, b, sxb, sxc, sxn, syb, syc, syn, offs_c, offs_n, mask, HAS_Y,
                     ACC)
        if HAS_MEAN:
            acc_mean += tl.sum(t, axis=1)
        if HAS_P:
            p = tl.load(p_ptr + b * N + offs_n, mask=mask_n, other=0.0).to(ACC)
            t = t * p[None, :]
        acc += tl.sum(t, axis=1)
    out = (k * B + b) * C + offs_c
    tl.store(out_ptr + out, acc, mask=mask_c)
    if HAS_MEAN:
        tl.store(mean_ptr + out, acc_mean * inv_n, mask=mask_c)


@triton.jit
def _scale_kernel(g_ptr, a_ch_ptr, a_sp_ptr, u_ptr, v_ptr, dx_ptr, C, N, sgb, sgc, sgn, sdb, sdc,
                  sdn, SEQ: tl.constexpr, K: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """``dx = g * M + sum_k u[b, c, k] v[b, n, k]``, ``M = a_ch + a_sp`` (or ``a_ch * a_sp``,
    ``SEQ``): the output (``g = x``, ``K = 0``) and the input gradient (``g = dOut``)."""
    b = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_c = offs_c < C
    mask_n = offs_n < N
    mask = mask_c[:, None] & mask_n[None, :]
    g = _tile(g_ptr, b, sgb, sgc, sgn, offs_c, offs_n, mask, ACC)
    a_ch = tl.load(a_ch_ptr + b * C + offs_c, mask=mask_c, other=0.0)
    a_sp = tl.load(a_sp_ptr + b * N + offs_n, mask=mask_n, other=0.0)
    if SEQ:
        dx = g * (a_ch[:, None] * a_sp[None, :])
    else:
        dx = g * (a_ch[:, None] + a_sp[None, :])
    for k in tl.static_range(K):
        u = tl.load(u_ptr + (b * C + offs_c) * K + k, mask=mask_c, other=0.0)
        v = tl.load(v_ptr + (b * N + offs_n) * K + k, mask=mask_n, other=0.0)
        dx += u[:, None] * v[None, :]
    tl.store(
        dx_ptr + b * sdb + offs_c[:, None] * sdc + offs_n[None, :] * sdn,
        dx.to(dx_ptr.dtype.element_ty),
        mask=mask)


_TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}


def _bcn(t: Tensor) -> Tuple[Tensor, Tuple[int, int, int]]:
    """``t`` ``(B, C, H, W)`` and its strides as a ``(B, C, HW)`` tensor (contiguous,
    channels_last and expanded tensors as they are; others made contiguous)."""
    b, c, h, w = t.shape
    sb, sc, sh, sw = t.stride()
    if w == 1:
        return t, (sb, sc, sh)
    if h == 1 or sh == w * sw:
        return t, (sb, sc, sw)
    return _bcn(t.contiguous())


def _new_like(x: Tensor) -> Tensor:
    """An empty tensor like ``x`` (its layout where :func:`_bcn` takes it, else contiguous)."""
    out = torch.empty_like(x)
    return out if _bcn(out)[0] is out else torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _grid_c(c: int) -> int:
    return triton.cdiv(c, _BLOCK_C)


def _grid_n(n: int) -> int:
    return triton.cdiv(n, _BLOCK_N)


def rowdot(x: Tensor, v: Optional[Tensor] = None, y: Optional[Tensor] = None) -> Tensor:
    """``sum_c v[b, c] x[b, c, n] y[b, c, n]`` as ``(B, HW)`` in the accumulation dtype.

    Args:
        x (Tensor): ``(B, C, H, W)``.
        v (Tensor, optional): ``(B, C)`` or ``(C, )`` (shared by the samples).
        y (Tensor, optional): Like ``x``.
    """
    b, c, h, w = x.shape
    n, acc = h * w, acc_dtype(x.dtype)
    x, sx = _bcn(x)
    y, sy = _bcn(y) if y is not None else (x, sx)
    vv = x if v is None else v.to(acc).contiguous()
    svb = 0 if v is None or v.dim() == 1 else vv.stride(0)
    out = torch.empty(b, n, dtype=acc, device=x.device)
    _rowdot_kernel[(b, _grid_n(n))](
        x,
        y,
        vv,
        out,
        c,
        n,
        *sx,
        *sy,
        svb,
        HAS_Y=y is not x,
        HAS_V=v is not None,
        ACC=_TL_ACC[acc],
        BLOCK_C=_BLOCK_C,
        BLOCK_N=_BLOCK_N)
    return out


def colsum(x: Tensor,
           p: Optional[Tensor] = None,
           y: Optional[Tensor] = None,
           mean: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    """``sum_n x[b, c, n] y[b, c, n] p[b, n]`` as ``(B, C)`` in the accumulation dtype, and
    the mean of ``x y`` over the pixels with ``mean`` (else None).

    Args:
        x (Tensor): ``(B, C, H, W)``.
        p (Tensor, optional): ``(B, HW)`` pixel weights.
        y (Tensor, optional): Like ``x``.
        mean (bool): Also return the mean.
    """
    b, c, h, w = x.shape
    n, acc = h * w, acc_dtype(x.dtype)
    x, sx = _bcn(x)
    y, sy = _bcn(y) if y is not None else (x, sx)
    pp = x if p is None else p.to(acc).contiguous()
    # split the pixels into chunks (a multiple of _BLOCK_N) so that there are enough programs
    chunks = max(1, min(_grid_n(n), _TARGET_PROGRAMS // (b * _grid_c(c))))
    chunk = triton.cdiv(_grid_n(n), chunks) * _BLOCK_N
    chunks = triton.cdiv(n, chunk)
    out = torch.empty(chunks, b, c, dtype=acc, device=x.device)
    out_mean = torch.empty_like(out) if mean else out
    _colsum_kernel[(b, _grid_c(c), chunks)](
        x,
        y,
        pp,
        out,
        out_mean,
        b,
        c,
        n,
        chunk,
        *sx,
        *sy,
        1.0 / n,
        HAS_Y=y is not x,
        HAS_P=p is not None,
        HAS_MEAN=mean,
        ACC=_TL_ACC[acc],
        BLOCK_C=_BLOCK_C,
        BLOCK_N=_BLOCK_N)
    return out.sum(0), (out_mean.sum(0) if mean else None)


def _grid3(b: int, c: int, n: int) -> Tuple[int, int, int]:
    return b, _grid_c(c), _grid_n(n)


def gate(x: Tensor, a_ch: Tensor, a_sp: Tensor, seq: bool) -> Tensor:
    """The output ``x * (a_ch + a_sp)`` or ``x * a_ch * a_sp`` (``a_ch`` ``(B, C)``,
    ``a_sp`` ``(B, HW)``, both in the accumulation dtype), laid out like ``x``."""
    return grad_x(x, x, a_ch, a_sp, None, None, seq)


def grad_x(g: Tensor, x: Tensor, a_ch: Tensor, a_sp: Tensor, u: Optional[Tensor],
           v: Optional[Tensor], seq: bool) -> Tensor:
    """``dX = g * M + U V^T`` (:func:`_scale_kernel`; no ``U V^T`` when ``u`` is None), laid
    out like ``x``."""
    b, c, h, w = g.shape
    g, sg = _bcn(g)
    dx = _new_like(x)
    _, sd = _bcn(dx)
    k = 0 if u is None else u.shape[-1]
    u, v = (g, g) if u is None else (u.contiguous(), v.contiguous())
    _scale_kernel[_grid3(b, c, h * w)](
        g,
        a_ch,
        a_sp,
        u,
        v,
        dx,
        c,
        h * w,
        *sg,
        *sd,
        SEQ=seq,
        K=k,
        ACC=_TL_ACC[a_ch.dtype],
        BLOCK_C=_BLOCK_C,
        BLOCK_N=_BLOCK_N)
    return dx


def _leaves(tensors: Tuple[Optional[Tensor], ...], needs: Tuple[bool, ...]) -> list:
    """Detached copies of ``tensors`` for a local autograd graph (grad where needed)."""
    return [None if t is None else t.detach().requires_grad_(n) for t, n in zip(tensors, needs)]


def _grads(outputs: List[Tensor], inputs: List[Optional[Tensor]],
           grad_outputs: List[Tensor]) -> List[Optional[Tensor]]:
    """``autograd.grad`` over the inputs that need a gradient (None for the others)."""
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o is not None and o.requires_grad]
    got = iter(
        torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True
                            ) if wanted and pairs else [None] * len(wanted))
    return [next(got) if t is not None and t.requires_grad else None for t in inputs]


class _TritonPSA(torch.autograd.Function):
    """The fused block over the Triton kernels; inputs ``(x, paper, seq, eps, *tensors)``
    (``tensors``: :attr:`PSAParams.tensors`), outputs ``(out, a_ch, a_sp)``."""

    @staticmethod
    def forward(ctx, x: Tensor, paper: bool, seq: bool, eps: float, *tensors: Optional[Tensor]):
        b, c, h, w = x.shape
        prm = PSAParams(*tensors, eps)
        with no_autocast(x):
            r = rowdot(x, prm.ch_wq.flatten())  # w_q^T X: (B, HW)
            p = _pixel_weights(r, prm)
            xp, g = colsum(x, p, mean=True)  # X p, GP(X): (B, C)
            a_ch = _channel_map(xp, prm)
            u, bias = _spatial_vector(_spatial_query(g, a_ch, prm, seq), a_ch, prm, paper, seq)
            lg = rowdot(x, u)  # u^T X
            a_sp = _spatial_map(lg, bias, paper)  # (B, HW)
            out = gate(x, a_ch, a_sp, seq)
        ctx.save_for_backward(x, r, p, xp, g, lg, a_ch, a_sp, u, *tensors)
        ctx.flags = (paper, seq, eps)
        a_ch4, a_sp4 = _for_hooks(a_ch.view(b, c, 1, 1),
                                  x.dtype), _for_hooks(a_sp.view(b, 1, h, w), x.dtype)
        ctx.mark_non_differentiable(a_ch4, a_sp4)
        return out, a_ch4, a_sp4

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: Tensor, _da_ch: Tensor, _da_sp: Tensor):
        x, r, p, xp, g, lg, a_ch, a_sp, u, *tensors = ctx.saved_tensors
        paper, seq, eps = ctx.flags
        needs = ctx.needs_input_grad
        b, c, h, w = x.shape
        with no_autocast(x):
            # dOut * X reduced both ways (the output's multipliers)
            da_ch = colsum(dout, a_sp if seq else None, y=x)[0]
            da_sp = rowdot(dout, a_ch if seq else None, y=x)
            with torch.enable_grad():
                prm = PSAParams(*_leaves(tensors, needs[4:]), eps)
                lg_, xp_, g_, r_ = _leaves((lg, xp, g, r), (True, ) * 4)
                # the vector maths again, as a local graph
                a_ch_ = _channel_map(xp_, prm)
                u_, bias_ = _spatial_vector(
                    _spatial_query(g_, a_ch_, prm, seq), a_ch_, prm, paper, seq)
                bias_leaf = None if bias_ is None else bias_.detach().requires_grad_()
                a_sp_ = _spatial_map(lg_, bias_leaf, paper)
                dlg, dbias = _grads([a_sp_], [lg_, bias_leaf], [da_sp])
                du = colsum(x, dlg)[0]  # X dlg
                dxp, dg, *dprm = _grads([a_ch_, u_, bias_], [xp_, g_, *prm.tensors],
                                        [da_ch, du, dbias])
                dp = rowdot(x, dxp)  # dxp^T X
                dr, dbq = _grads([_pixel_weights(r_, prm)], [r_, prm.ch_bq], [dp])
        dx = None
        if needs[0]:
            ones = torch.full_like(p, 1.0 / (h * w))
            wq = prm.ch_wq.detach().flatten().to(a_ch.dtype).expand(b, c)
            dx = grad_x(dout, x, a_ch, a_sp, torch.stack([wq, dxp, dg, u], -1),
                        torch.stack([dr, p, ones, dlg], -1), seq)
        if needs[4]:  # w_q: r = w_q^T X
            dprm[0] = colsum(x, dr)[0].sum(0).view_as(tensors[0]).to(tensors[0].dtype)
        dprm[1] = dbq
        return (dx, None, None, None, *dprm)


def fused_psa(x: Tensor, paper: bool, sequential: bool,
              params: PSAParams) -> Tuple[Tensor, Tensor, Tensor]:
    """The block's fused evaluation through the Triton kernels: ``(out, a_ch, a_sp)``.

    Args:
        x (Tensor): Input ``(B, C, H, W)``: CUDA, or CPU under :data:`INTERPRET`.
        paper (bool): Paper variant (True) or official PSA_p (False).
        sequential (bool): Sequential mode (paper variant only).
        params (PSAParams): The block's parameters.

    Returns:
        tuple: The output and the maps, as :func:`psa_fused.fused_function` gives them.
    """
    if not paper and sequential:
        raise ValueError('the Triton kernels do not cover the official sequential variant '
                         '(PSA_s), got paper=False, sequential=True')
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f'x must be a floating-point tensor, got dtype {x.dtype}')
    if x.numel() >= 2**31:
        raise ValueError(f'the Triton kernels index with int32: x must have fewer than 2^31 '
                         f'elements, got shape {tuple(x.shape)}')
    # kernels launch on the current device (autograd runs backward on the input's device)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        return tuple(_TritonPSA.apply(x, paper, sequential, params.ln_eps, *params.tensors))
