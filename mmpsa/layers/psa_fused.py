"""Fused evaluation of :class:`~mmpsa.layers.psa.PolarizedSelfAttention`.

The 1x1 convs are linear maps over channels, so with X the input as a (C, HW) matrix
(per sample), p a distribution over pixels and s one over the C/2 channels:

* ``W_v(X) p = W_v (X p) + b_v``                 (p sums to 1)
* ``GP(W_q(X)) = W_q (X 1/HW) + b_q``
* ``s^T W_v(X) = (W_v^T s)^T X + s^T b_v``
* sequential mode: ``Y = diag(a_ch) X``, so ``GP(Y) = a_ch * GP(X)`` and
  ``u^T Y = (u * a_ch)^T X``: the channel weights fold into those vectors.

Every attention map is then a function of a few reductions of X: ``w_q^T X`` and
``X [p, 1/HW]`` and ``u^T X``; no C/2 x HW tensor is ever materialised. The output is
``X * (a_ch + a_sp)`` (parallel) or ``X * a_ch * a_sp`` (sequential).

The gradient w.r.t. X of each reduction is an outer product, so the hand-written
backward is ``dX = dOut * M + U V^T`` with ``U`` (C x 4), ``V`` (HW x 4): one
elementwise pass plus one batched matmul. It keeps only O(B (C + HW)) tensors besides
the input. The official sequential variant (PSA_s) applies a per-channel softmax over
pixels to ``W_v(Y)``, which does not fuse: it is computed with ``a_ch`` folded into
``W_v`` (``Y`` is never materialised) and recomputed in backward rather than kept.

Where it runs:

* The autograd Function with the hand-written backward is C++ (``mmpsa/csrc``, built
  into ``mmpsa._ext`` by ``pip install``). On small contiguous CPU inputs (every HRNet
  shape) it evaluates each sample in plain loops, one sample per thread, with the passes
  over X fused (``psa_cpu_kernel.cpp``; PSA_s's C/2 x HW GEMMs and softmax stay batched
  ATen ops); elsewhere (other devices, large inputs) it calls ATen ops
  only (``psa_aten.cpp``; PSA_s: ``psa_official_s.cpp``), so it runs on any device and
  dtype. At the HRNet shapes a step in ATen ops is ~50 ops of a few microseconds each
  on tiny tensors; the Python version of the same ops was slower still (its per-op
  glue was a third of the step).
* CUDA tensors run the Triton kernels of :mod:`mmpsa.layers.psa_triton` (every variant;
  the same vector maths as here between their passes over X).
* :func:`plain_psa` is the same maths as plain differentiable ops. It runs under
  ``torch.jit`` tracing and ``torch.compile``/``torch.export`` (a custom Function would
  be opaque there; mmengine's FLOPs count would miss it), and, with a warning, when
  the extension is not built.

Which of them runs is decided in one place, :mod:`mmpsa.layers.dispatch`; this module
holds only the maths, and the Triton module imports it (never the reverse).

Every evaluation takes the block's parameters in one named form, :class:`PSAParams`
(built by :meth:`PolarizedSelfAttention.fused_params`), and gives the observation points
``ch_attn``/``sp_attn`` maps in the input's dtype that are fresh tensors: a forward hook
may edit them in place without touching the output or backward.
"""
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from .precision import acc_dtype, no_autocast

Tensor = torch.Tensor


class PSAParams(NamedTuple):
    """A block's parameters in the form every fused evaluation takes.

    With ``X`` the input as a (C, HW) matrix per sample, the evaluations compute

    * channel branch: ``p = softmax_HW(W_q X + b_q)``, ``z = W_z (W_v (X p) + b_v) + b_z``,
      then ``z = LN(z)`` if ``ch_ln_w`` is given, then ``z = W_z2 relu(z) + b_z2`` if
      ``ch_wz2`` is given; ``a_ch = sigmoid(z)``;
    * spatial branch (on ``X`` or, sequential, on ``a_ch * X``), from
      ``s = W_sq GP(X) + b_sq`` and ``W_sv``, ``b_sv``; the variant decides the softmaxes.

    So the paper variant has ``ch_w*``/``ch_b*``, ``ch_ln_*`` (its ``ln``) and ``sp_*``;
    official PSA_p has the weights only (no biases, no LayerNorm, no ``ch_wz2``); PSA_s
    has ``conv_up`` as ``ch_wz``/``ch_bz``, ``ch_ln_*``, ``ch_wz2``/``ch_bz2``. Absent
    entries are None. The tensors are the parameters themselves, in their own shapes
    (conv weights ``(O, I, 1, 1)``). The compiled Function takes the tensor fields as a
    list in this order (:attr:`tensors`); the C++ side lists the same names in the same
    order once (``MMPSA_PSA_PARAMS`` in ``mmpsa/csrc/psa_fused.h``, exported as
    ``mmpsa._ext.PARAM_NAMES`` and checked against :data:`PARAM_NAMES` at import).
    """
    ch_wq: Tensor  # (1, C, 1, 1)
    ch_bq: Optional[Tensor]  # (1, ); cancels in the softmax, has a gradient
    ch_wv: Tensor  # (C/2, C, 1, 1)
    ch_bv: Optional[Tensor]
    ch_wz: Tensor  # (C, C/2, 1, 1); PSA_s (C/8, C/2, 1, 1)
    ch_bz: Optional[Tensor]
    ch_ln_w: Optional[Tensor]  # (C, ); PSA_s (C/8, 1, 1)
    ch_ln_b: Optional[Tensor]
    ch_wz2: Optional[Tensor]  # PSA_s (C, C/8, 1, 1)
    ch_bz2: Optional[Tensor]
    sp_wq: Tensor  # (C/2, C, 1, 1)
    sp_bq: Optional[Tensor]
    sp_wv: Tensor  # (C/2, C, 1, 1)
    sp_bv: Optional[Tensor]
    ln_eps: float = 0.0  # the eps of ``ch_ln``

    @property
    def tensors(self) -> Tuple[Optional[Tensor], ...]:
        """The tensor fields in order (what the compiled Function takes)."""
        return self[:-1]


#: The names of :attr:`PSAParams.tensors`, in order.
PARAM_NAMES = PSAParams._fields[:-1]


def _linear(t: Tensor, weight: Tensor, bias: Optional[Tensor], acc: torch.dtype) -> Tensor:
    """A 1x1 conv on (B, I) vectors, in the accumulation dtype."""
    return F.linear(t, weight.flatten(1).to(acc), None if bias is None else bias.to(acc))


def _casts(xd: torch.dtype, acc: torch.dtype):
    """Casts to the input dtype and to the accumulation dtype (no-ops if same)."""
    if xd == acc:
        return (lambda t: t), (lambda t: t)
    return (lambda t: t.to(xd)), (lambda t: t.to(acc))


def maps_for_hooks(a: Tensor, dtype: torch.dtype) -> Tensor:
    """A map as hooks see it: a fresh tensor in the input's dtype, outside the graph."""
    return a.detach().to(dtype, copy=True)


def pixel_weights(r: Tensor, prm: PSAParams) -> Tensor:
    """``p = softmax_HW(w_q^T X + b_q)`` from ``r = w_q^T X`` ``(B, HW)``."""
    if prm.ch_bq is not None:  # cancels in the softmax; kept for autograd
        r = r + prm.ch_bq.to(r.dtype)
    return torch.softmax(r, -1)


def channel_map(xp: Tensor, prm: PSAParams) -> Tensor:
    """``a_ch`` ``(B, C)`` from ``X p`` ``(B, C)``, in ``xp``'s dtype."""
    acc = xp.dtype
    v = _linear(xp, prm.ch_wv, prm.ch_bv, acc)  # (B, C/2)
    z = _linear(v, prm.ch_wz, prm.ch_bz, acc)
    if prm.ch_ln_w is not None:
        z = F.layer_norm(z, (z.shape[1], ),
                         prm.ch_ln_w.to(acc).flatten(),
                         None if prm.ch_ln_b is None else prm.ch_ln_b.to(acc).flatten(), prm.ln_eps)
    if prm.ch_wz2 is not None:
        z = _linear(torch.relu(z), prm.ch_wz2, prm.ch_bz2, acc)
    return torch.sigmoid(z)


def spatial_query(g: Tensor, a_ch: Tensor, prm: PSAParams, seq: bool) -> Tensor:
    """``W_sq GP + b_sq`` ``(B, C/2)`` from ``g = GP(X)``; sequential: GP of ``a_ch * X``."""
    return _linear(g * a_ch if seq else g, prm.sp_wq, prm.sp_bq, g.dtype)


def spatial_vector(sq: Tensor, a_ch: Tensor, prm: PSAParams, paper: bool,
                   seq: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """``(u, b)`` with the spatial logits ``u^T X + b`` (paper variant, official PSA_p).

    Paper: ``u = W_sv^T softmax(sq)`` (times ``a_ch`` if sequential), ``b = softmax(sq)^T
    b_sv`` ``(B, 1)`` or None; PSA_p: ``u = W_sv^T sq``, ``b`` None (``b_sv`` would cancel in
    its softmax over HW).
    """
    wsv = prm.sp_wv.flatten(1).to(sq.dtype)
    if not paper:
        return torch.mm(sq, wsv), None
    s = torch.softmax(sq, -1)
    u = torch.mm(s, wsv)  # (B, C)
    bias = None if prm.sp_bv is None else torch.mm(s, prm.sp_bv.to(sq.dtype).view(-1, 1))
    return (u * a_ch if seq else u), bias


def spatial_map(lg: Tensor, bias: Optional[Tensor], paper: bool) -> Tensor:
    """``a_sp`` ``(B, HW)`` from the logits ``u^T X`` (paper variant, official PSA_p)."""
    if paper:
        return torch.sigmoid(lg if bias is None else lg + bias)
    return torch.sigmoid(torch.softmax(lg, -1))


def sequential_spatial_map(x3: Tensor, a_ch: Tensor, sq: Tensor, prm: PSAParams) -> Tensor:
    """Official PSA_s's ``a_sp`` ``(B, HW)`` from ``X`` ``(B, C, HW)``: the softmax over the
    pixels of each channel of ``W_v(a_ch * X) = (W_v diag(a_ch)) X`` (which does not fuse),
    weighted by ``sq`` ``(B, C/2)``; ``a_ch * X`` is never materialised."""
    X, A = _casts(x3.dtype, a_ch.dtype)
    wva = prm.sp_wv.flatten(1).to(a_ch.dtype).unsqueeze(0) * a_ch.unsqueeze(1)
    theta = torch.softmax(A(torch.bmm(X(wva), x3)), -1)
    return torch.sigmoid(torch.bmm(sq.unsqueeze(1), theta)).view(x3.shape[0], -1)


def plain_psa(x: Tensor, paper: bool, seq: bool, prm: PSAParams) -> Tuple[Tensor, Tensor, Tensor]:
    """The fused math with plain differentiable ops (tracing, compile, export,
    and the fallback when ``mmpsa._ext`` is not built): ``(out, a_ch, a_sp)``.

    Same evaluation order as the compiled Function's forward, with batched matmuls
    (which mmengine's FLOPs analysis counts correctly). The maps are as
    :func:`mmpsa.layers.dispatch.fused_function` returns them.
    """
    b, c, h, w = x.shape
    n = h * w
    xd, acc = x.dtype, acc_dtype(x.dtype)
    X, A = _casts(xd, acc)
    x3 = x.reshape(b, c, n)
    with no_autocast(x):
        wq = X(prm.ch_wq).view(1, 1, c).expand(b, 1, c)
        p = pixel_weights(A(torch.bmm(wq, x3)).view(b, n), prm)  # (B, HW)
        xp = A(torch.bmm(x3, X(p).unsqueeze(-1)).view(b, c))  # X p
        g = x3.mean(-1, dtype=acc)  # GP(X)
        a_ch = channel_map(xp, prm)  # (B, C)
        sq = spatial_query(g, a_ch, prm, seq)  # (B, C/2)
        if paper or not seq:
            u, bias = spatial_vector(sq, a_ch, prm, paper, seq)
            a_sp = spatial_map(A(torch.bmm(X(u).unsqueeze(1), x3)).view(b, n), bias, paper)
        else:
            a_sp = sequential_spatial_map(x3, a_ch, sq, prm)
    a_ch4, a_sp4 = X(a_ch).view(b, c, 1, 1), X(a_sp).view(b, 1, h, w)
    out = x * a_ch4 * a_sp4 if seq else x * a_ch4 + x * a_sp4
    return out, maps_for_hooks(a_ch4, xd), maps_for_hooks(a_sp4, xd)
