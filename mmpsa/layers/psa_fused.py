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
pixels to ``W_v(Y)``, which does not fuse: :func:`_forward_s` computes it with ``a_ch``
folded into ``W_v`` (``Y`` is never materialised) and :func:`_backward_s` recomputes it
rather than keeping it. Under ``torch.jit`` tracing and
``torch.compile``/``torch.export`` the same math runs as plain differentiable ops
(:func:`_plain`): a custom ``autograd.Function`` would be opaque there (mmengine's
FLOPs count would miss it).
"""
import contextlib
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

Tensor = torch.Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype small tensors (softmax, LayerNorm, ...) are computed in: >= fp32."""
    return torch.promote_types(dtype, torch.float32)


def no_autocast(t: Tensor):
    """A context that disables autocast on ``t``'s device if it is enabled there."""
    dev = t.device.type
    if torch.is_autocast_enabled(dev):
        return torch.autocast(dev, enabled=False)
    return contextlib.nullcontext()


def _w2d(conv_weight: Tensor, dtype: torch.dtype) -> Tensor:
    """A 1x1 conv weight (O, I, 1, 1) as an (O, I) matrix."""
    return conv_weight.flatten(1).to(dtype)


def _vec(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


class _FusedPSA(torch.autograd.Function):
    """Fused PSA: paper variant (both modes) and official ``PSA_p`` through
    :func:`_forward`/:func:`_backward`, official ``PSA_s`` through
    :func:`_forward_s`/:func:`_backward_s`.

    Inputs: ``x``, ``kind`` (``'paper'`` or ``'official'``), ``sequential`` (bool),
    ``eps`` (the paper LayerNorm's, or official ``conv_up``'s) and the parameters in
    the order of :func:`_params`. Returns ``(out, a_ch (B, C, 1, 1), a_sp (B, 1, H, W))``; the
    two maps are non-differentiable outputs (observation only).
    """

    @staticmethod
    def forward(ctx, x: Tensor, kind: str, sequential: bool, eps: float,
                *params: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        with no_autocast(x):
            if kind == 'official' and sequential:
                out, a_ch, a_sp, saved = _forward_s(eps, x, params)
            else:
                out, a_ch, a_sp, saved = _forward(kind, sequential, eps, x, params)
        ctx.kind, ctx.sequential = kind, sequential
        ctx.meta = [(t.shape, t.dtype) for t in params]
        ctx.save_for_backward(x, *saved)
        ctx.mark_non_differentiable(a_ch, a_sp)
        ctx.set_materialize_grads(False)
        return out, a_ch, a_sp

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_a_ch, _grad_a_sp):
        if grad_out is None:
            return (None, ) * (4 + len(ctx.meta))
        x, *saved = ctx.saved_tensors
        with no_autocast(x):
            if ctx.kind == 'official' and ctx.sequential:
                grads = _backward_s(ctx.needs_input_grad, ctx.meta, grad_out, x, saved)
            else:
                grads = _backward(ctx.kind, ctx.sequential, ctx.needs_input_grad,
                                  ctx.meta, grad_out, x, saved)
        return (grads[0], None, None, None, *grads[1:])


_sigmoid_bwd = torch.ops.aten.sigmoid_backward.default
_layer_norm_bwd = torch.ops.aten.native_layer_norm_backward.default
_softmax_bwd = torch._softmax_backward_data


def _ident(t: Tensor) -> Tensor:
    return t


def _casts(xd: torch.dtype, acc: torch.dtype):
    """Casts to the input dtype and to the accumulation dtype (no-ops if same)."""
    if xd == acc:
        return _ident, _ident
    return (lambda t: t.to(xd)), (lambda t: t.to(acc))


def _forward(kind: str, seq: bool, eps: float, x: Tensor, params):
    """Forward of :class:`_FusedPSA`: output, maps, what backward needs."""
    b, c, h, w = x.shape
    n, c2 = h * w, c // 2
    xd, acc = x.dtype, acc_dtype(x.dtype)
    X, A = _casts(xd, acc)
    paper = kind == 'paper'
    if params[0].dtype != acc:  # the block's parameters share one dtype
        params = [t.to(acc) for t in params]
    if paper:
        wq, _, wv, bv, wz, bz, gamma, beta, wsq, bsq, wsv, bsv = params
    else:
        wq, wv, wz, wsq, wsv = params
        bv = bz = bsq = bsv = gamma = beta = None
    wv, wz = wv.view(c2, c), wz.view(c, c2)
    wsq, wsv = wsq.view(c2, c), wsv.view(c2, c)
    wq = X(wq).view(1, 1, c).expand(b, 1, c)
    x3 = x.reshape(b, c, n)

    # channel-only branch: p = softmax_HW(w_q^T X) (b_q cancels in the softmax)
    qr = torch.bmm(wq, x3)  # (B, 1, HW)
    p = torch.softmax(qr, -1, dtype=acc)
    xp = A(torch.bmm(x3, X(p).transpose(1, 2)).view(b, c))  # X p: (B, C)
    g = x3.mean(-1, dtype=acc)  # GP(X): (B, C)
    v = F.linear(xp, wv, bv)  # W_v(X) p = W_v (X p) + b_v: (B, C/2)
    z = F.linear(v, wz, bz)  # (B, C)
    if paper:
        y, mu, rstd = torch.native_layer_norm(z, (c, ), gamma, beta, eps)
        a_ch = y.sigmoid_()
    else:
        mu = rstd = None
        a_ch = torch.sigmoid(z)

    # spatial-only branch: a_sp = sigmoid(u^T X + s^T b_v), u = W_v^T s
    gs = g * a_ch if seq else g  # GP of the branch input
    sq = F.linear(gs, wsq, bsq)  # W_q GP(.) + b_q: (B, C/2)
    s = torch.softmax(sq, -1) if paper else sq
    u = torch.mm(s, wsv)  # (B, C)
    ue = u * a_ch if seq else u  # sequential: u^T (a_ch X) = (u a_ch)^T X
    if paper:
        lg = torch.baddbmm(
            X(torch.mv(s, bsv)).view(b, 1, 1), X(ue).unsqueeze(1), x3)
        t = None
        a_sp = A(lg).sigmoid_() if xd != acc else torch.sigmoid(lg)
    else:
        lg = torch.bmm(X(ue).unsqueeze(1), x3)
        t = torch.softmax(lg, -1, dtype=acc)
        a_sp = torch.sigmoid(t)  # (B, 1, HW)

    a_ch4, a_sp4 = a_ch.view(b, c, 1, 1), a_sp.view(b, 1, h, w)
    out = torch.mul(x, X(a_ch4))
    if seq:
        out.mul_(X(a_sp4))
    else:
        out.addcmul_(x, X(a_sp4))
    saved = (p, xp, g, v, z, mu, rstd, s, u, t, a_ch, a_sp, wq, wv, wz, wsq,
             wsv, gamma, beta, bsv)
    return out, a_ch4, a_sp4, saved


def _backward(kind, seq, needs, meta, grad_out, x, saved):
    """Backward of :class:`_FusedPSA`; see the module docstring."""
    b, c, h, w = x.shape
    n = h * w
    xd, acc = x.dtype, acc_dtype(x.dtype)
    X, A = _casts(xd, acc)
    paper = kind == 'paper'
    (p, xp, g, v, z, mu, rstd, s, u, t, a_ch, a_sp, wq, wv, wz, wsq, wsv,
     gamma, beta, bsv) = saved
    x3 = x.reshape(b, c, n)
    g3 = grad_out.reshape(b, c, n)
    a_ch_x, a_sp_x = X(a_ch).unsqueeze(-1), X(a_sp)
    gs = g * a_ch if seq else g
    ue = u * a_ch if seq else u

    # d/d(a_ch), d/d(a_sp) of  X * (a_ch + a_sp)  or  X * a_ch * a_sp
    gx4 = torch.empty((b, c, h, w), dtype=xd, device=x.device)
    gx = torch.mul(g3, x3, out=gx4.view(b, c, n))  # the one full-size temp
    if seq:
        da_ch = A(torch.bmm(gx, a_sp_x.transpose(1, 2)).view(b, c))
        da_sp = A(torch.bmm(a_ch_x.transpose(1, 2), gx))  # (B, 1, HW)
    else:
        da_ch = gx.sum(-1, dtype=acc)  # (B, C)
        # the column sums as a batched matvec: faster than sum(1) on large X
        ones = gx.new_ones(1, 1, c).expand(b, 1, c)
        da_sp = A(torch.bmm(ones, gx))  # (B, 1, HW)
    dlg = _sigmoid_bwd(da_sp, a_sp)
    if not paper:
        dlg = _softmax_bwd(dlg, t, -1, acc)  # (B, 1, HW)

    def spatial(due: Tensor):
        """From d(ue) to the spatial params' grads and d(GP(X)) (and d(a_ch))."""
        nonlocal da_ch
        if seq:
            da_ch = torch.addcmul(da_ch, due, u)
            due = due * a_ch
        dwsv = torch.mm(s.t(), due)  # (C/2, C)
        ds = F.linear(due, wsv)  # (B, C/2)
        if paper:
            dc = dlg.sum(-1)  # (B, 1): d(s^T b_sv)
            ds = torch.addcmul(ds, dc, bsv)
            dbsv = torch.mm(dc.t(), s)
            ds = _softmax_bwd(ds, s, -1, acc)
            extra = (ds.sum(0), dbsv)
        else:
            extra = ()
        dwsq = torch.mm(ds.t(), gs)
        dgs = torch.mm(ds, wsq)  # (B, C)
        if seq:
            da_ch = torch.addcmul(da_ch, dgs, g)
            dgs = dgs * a_ch
        return dgs, dwsq, dwsv, extra

    if seq:  # d(a_ch) needs the spatial branch first: d(ue) = X dlg
        due = A(torch.bmm(x3, X(dlg).transpose(1, 2)).view(b, c))
        dg, dwsq, dwsv, sp_extra = spatial(due)

    # channel branch, down to xp = X p
    dz = _sigmoid_bwd(da_ch, a_ch)
    if paper:
        dz, dgamma, dbeta = _layer_norm_bwd(dz, z, (c, ), mu, rstd, gamma,
                                            beta, [True, True, True])
    dwz = torch.mm(dz.t(), v)  # (C, C/2)
    dv = torch.mm(dz, wz)  # (B, C/2)
    dwv = torch.mm(dv.t(), xp)  # (C/2, C)
    dxp = torch.mm(dv, wv)  # (B, C)
    # p = softmax(w_q^T X):  dp = X^T dxp
    dp = torch.bmm(X(dxp).unsqueeze(1), x3)  # (B, 1, HW)
    dqr = _softmax_bwd(A(dp), p, -1, acc)

    if seq:
        dwq = A(torch.bmm(X(dqr), x3.transpose(1, 2))).sum(0)
    else:  # one pass over X for both: [dlg, dqr] X^T
        r2 = A(torch.bmm(X(torch.cat([dlg, dqr], 1)), x3.transpose(1, 2)))
        dwq = r2[:, 1].sum(0)  # r2: (B, 2, C)
        dg, dwsq, dwsv, sp_extra = spatial(r2[:, 0])

    dx = None
    if needs[0]:
        # dX = dOut * M + [w_q, dg, dxp, ue] [dqr, 1 / HW, p, dlg]^T
        torch.mul(g3, a_ch_x, out=gx)
        if seq:  # M = a_ch a_sp^T
            gx.mul_(a_sp_x)
        else:  # M = a_ch + a_sp
            gx.addcmul_(g3, a_sp_x)
        uu = torch.stack([A(wq).view(b, c), dg, dxp, ue], -1)  # (B, C, 4)
        vv = torch.cat([dqr, p.new_full((1, 1, 1), 1.0 / n).expand(b, 1, n),
                        p, dlg], 1)  # (B, 4, HW)
        gx.baddbmm_(X(uu), X(vv))
        dx = gx4

    if paper:
        pg = (dwq, dqr.sum().view(1), dwv, dv.sum(0), dwz, dz.sum(0), dgamma,
              dbeta, dwsq, sp_extra[0], dwsv, sp_extra[1])
    else:
        pg = (dwq, dwv, dwz, dwsq, dwsv)
    grads = [dx]
    for gr, (shape, dtype), need in zip(pg, meta, needs[4:]):
        if not need:
            gr = None
        elif gr.shape != shape:
            gr = gr.view(shape)
        if gr is not None and gr.dtype != dtype:
            gr = gr.to(dtype)
        grads.append(gr)
    return grads


# Official ``PSA_s`` (sequential). Its spatial branch applies a per-channel softmax over
# pixels to ``W_v(a_ch * X) = (W_v diag(a_ch)) X``, a (C/2, HW) tensor that does not fuse:
# it is computed with ``a_ch`` folded into ``W_v`` (``a_ch * X`` is never materialised) and
# recomputed in backward, so that only O(B (C + HW)) is kept. The channel branch and the
# output are fused as for the other variants.


def _forward_s(eps: float, x: Tensor, params):
    """Forward of :class:`_FusedPSA` for official ``PSA_s``."""
    b, c, h, w = x.shape
    n, c2 = h * w, c // 2
    xd, acc = x.dtype, acc_dtype(x.dtype)
    X, A = _casts(xd, acc)
    if params[0].dtype != acc:  # the block's parameters share one dtype
        params = [t.to(acc) for t in params]
    wq, wv, w1, b1, lnw, lnb, w2, b2, wsq, wsv = params
    c8 = w1.shape[0]
    wv, w1, w2 = wv.view(c2, c), w1.view(c8, c2), w2.view(c, c8)
    lnw, lnb = lnw.view(c8), lnb.view(c8)
    wsq, wsv = wsq.view(c2, c), wsv.view(c2, c)
    wq = X(wq).view(1, 1, c).expand(b, 1, c)
    x3 = x.reshape(b, c, n)

    # channel branch (the released `spatial_pool`), as in PSA_p but for conv_up
    p = torch.softmax(torch.bmm(wq, x3), -1, dtype=acc)  # (B, 1, HW)
    xp = A(torch.bmm(x3, X(p).transpose(1, 2)).view(b, c))  # X p
    g = x3.mean(-1, dtype=acc)  # GP(X)
    v = F.linear(xp, wv)  # (B, C/2)
    z1 = F.linear(v, w1, b1)  # (B, C/8)
    y1, mu, rstd = torch.native_layer_norm(z1, (c8, ), lnw, lnb, eps)
    r1 = y1.relu_()
    a_ch = torch.sigmoid(F.linear(r1, w2, b2))  # (B, C)

    # spatial branch (the released `channel_pool`) on Y = a_ch * X
    gs = g * a_ch  # GP(Y)
    avg = F.linear(gs, wsq)  # (B, C/2)
    wva = wsv.unsqueeze(0) * a_ch.unsqueeze(1)  # W_v diag(a_ch): (B, C/2, C)
    tt = torch.softmax(torch.bmm(X(wva), x3), -1, dtype=acc)  # (B, C/2, HW)
    a_sp = torch.bmm(avg.unsqueeze(1), tt).sigmoid_()  # (B, 1, HW)
    del tt

    a_ch4, a_sp4 = a_ch.view(b, c, 1, 1), a_sp.view(b, 1, h, w)
    out = torch.mul(x, X(a_ch4))
    out.mul_(X(a_sp4))
    saved = (p, xp, g, v, z1, mu, rstd, r1, a_ch, avg, a_sp, wq, wv, w1, w2,
             lnw, lnb, wsq, wsv)
    return out, a_ch4, a_sp4, saved


def _backward_s(needs, meta, grad_out, x, saved):
    """Backward of :class:`_FusedPSA` for official ``PSA_s``."""
    b, c, h, w = x.shape
    n, c2 = h * w, c // 2
    xd, acc = x.dtype, acc_dtype(x.dtype)
    X, A = _casts(xd, acc)
    (p, xp, g, v, z1, mu, rstd, r1, a_ch, avg, a_sp, wq, wv, w1, w2, lnw, lnb,
     wsq, wsv) = saved
    x3 = x.reshape(b, c, n)
    g3 = grad_out.reshape(b, c, n)
    a_ch_x, a_sp_x = X(a_ch).unsqueeze(-1), X(a_sp)
    gs = g * a_ch

    # out = X * a_ch * a_sp
    gx4 = torch.empty((b, c, h, w), dtype=xd, device=x.device)
    gx = torch.mul(g3, x3, out=gx4.view(b, c, n))
    da_ch = A(torch.bmm(gx, a_sp_x.transpose(1, 2)).view(b, c))
    dlg = _sigmoid_bwd(A(torch.bmm(a_ch_x.transpose(1, 2), gx)), a_sp)

    # a_sp = sigmoid(avg^T T), T = softmax_HW((W_v diag(a_ch)) X) recomputed
    wva = wsv.unsqueeze(0) * a_ch.unsqueeze(1)  # (B, C/2, C)
    tt = torch.softmax(torch.bmm(X(wva), x3), -1, dtype=acc)
    tq = torch.bmm(tt, dlg.transpose(1, 2))  # T dlg: (B, C/2, 1)
    davg = tq.view(b, c2)
    # d(theta) = diag(avg) D with D = T * (dlg - T dlg); diag(avg) is applied
    # to the small (C/2, C) factors instead of D
    dd = torch.mul(tt, dlg)
    dd.addcmul_(tt, tq, value=-1.0)
    del tt
    dwva = A(torch.bmm(X(dd), x3.transpose(1, 2))).mul_(avg.unsqueeze(-1))
    dwsv = (dwva * a_ch.unsqueeze(1)).sum(0)
    da_ch = da_ch + (dwva * wsv).sum(1)
    dwsq = torch.mm(davg.t(), gs)
    dgs = torch.mm(davg, wsq)  # d GP(Y)
    da_ch = torch.addcmul(da_ch, dgs, g)
    dg = dgs * a_ch

    # channel branch: a_ch = sigmoid(W2 relu(LN(W1 (W_v X p) + b1)) + b2)
    dz = _sigmoid_bwd(da_ch, a_ch)
    dw2 = torch.mm(dz.t(), r1)
    dr1 = torch.mm(dz, w2).masked_fill_(r1 <= 0, 0)
    dz1, dlnw, dlnb = _layer_norm_bwd(dr1, z1, (z1.shape[1], ), mu, rstd, lnw,
                                      lnb, [True, True, True])
    dw1 = torch.mm(dz1.t(), v)
    dv = torch.mm(dz1, w1)
    dwv = torch.mm(dv.t(), xp)
    dxp = torch.mm(dv, wv)
    dqr = _softmax_bwd(A(torch.bmm(X(dxp).unsqueeze(1), x3)), p, -1, acc)
    dwq = A(torch.bmm(X(dqr), x3.transpose(1, 2))).sum(0)

    dx = None
    if needs[0]:
        # dX = dOut * a_ch a_sp^T + (diag(avg) W_v diag(a_ch))^T D
        #      + [w_q, dg, dxp] [dqr, 1 / HW, p]^T
        torch.mul(g3, a_ch_x, out=gx)
        gx.mul_(a_sp_x)
        gx.baddbmm_(X(wva * avg.unsqueeze(-1)).transpose(1, 2), X(dd))
        uu = torch.stack([A(wq).view(b, c), dg, dxp], -1)  # (B, C, 3)
        vv = torch.cat(
            [dqr, p.new_full((1, 1, 1), 1.0 / n).expand(b, 1, n), p], 1)
        gx.baddbmm_(X(uu), X(vv))
        dx = gx4

    pg = (dwq, dwv, dw1, dz1.sum(0), dlnw, dlnb, dw2, dz.sum(0), dwsq, dwsv)
    grads = [dx]
    for gr, (shape, dtype), need in zip(pg, meta, needs[4:]):
        if not need:
            gr = None
        elif gr.shape != shape:
            gr = gr.view(shape)
        if gr is not None and gr.dtype != dtype:
            gr = gr.to(dtype)
        grads.append(gr)
    return grads


def _params(block) -> Tuple[Tensor, ...]:
    if block.variant == 'paper':
        return (block.ch_wq.weight, block.ch_wq.bias, block.ch_wv.weight,
                block.ch_wv.bias, block.ch_wz.weight, block.ch_wz.bias,
                block.ln.weight, block.ln.bias, block.sp_wq.weight,
                block.sp_wq.bias, block.sp_wv.weight, block.sp_wv.bias)
    if block.mode == 'parallel':
        return (block.conv_q_right.weight, block.conv_v_right.weight,
                block.conv_up.weight, block.conv_q_left.weight,
                block.conv_v_left.weight)
    conv1, ln, _, conv2 = block.conv_up
    return (block.conv_q_right.weight, block.conv_v_right.weight,
            conv1.weight, conv1.bias, ln.weight, ln.bias, conv2.weight,
            conv2.bias, block.conv_q_left.weight, block.conv_v_left.weight)


def _plain(block, x: Tensor) -> Tensor:
    """The fused math with plain differentiable ops (tracing, compile, export).

    Same evaluation order as the Functions' forward, with batched matmuls (which
    mmengine's FLOPs analysis counts correctly).
    """
    b, c, h, w = x.shape
    n, c2 = h * w, c // 2
    xd, acc = x.dtype, acc_dtype(x.dtype)
    X, A = _casts(xd, acc)
    seq = block.mode == 'sequential'
    paper = block.variant == 'paper'
    x3 = x.reshape(b, c, n)
    if paper:
        mq, mv, msq, msv = block.ch_wq, block.ch_wv, block.sp_wq, block.sp_wv
    else:
        mq, mv, msq, msv = (block.conv_q_right, block.conv_v_right,
                            block.conv_q_left, block.conv_v_left)
    with no_autocast(x):
        wq = X(mq.weight).view(1, 1, c).expand(b, 1, c)
        qr = A(torch.bmm(wq, x3))  # (B, 1, HW)
        if mq.bias is not None:  # cancels in the softmax; kept for autograd
            qr = qr + A(mq.bias)
        p = torch.softmax(qr, -1)
        xp = A(torch.bmm(x3, X(p).transpose(1, 2)).view(b, c))  # X p
        g = x3.mean(-1, dtype=acc)  # GP(X)
        v = F.linear(xp, _w2d(mv.weight, acc), _vec(mv.bias, acc))  # (B, C/2)
        if paper:
            z = F.linear(v, _w2d(block.ch_wz.weight, acc),
                         A(block.ch_wz.bias))
            z = F.layer_norm(z, (c, ), A(block.ln.weight), A(block.ln.bias),
                             block.ln.eps)
        elif not seq:
            z = F.linear(v, _w2d(block.conv_up.weight, acc))
        else:
            conv1, ln, _, conv2 = block.conv_up
            z = F.linear(v, _w2d(conv1.weight, acc), A(conv1.bias))
            z = F.layer_norm(z, (z.shape[1], ), A(ln.weight).flatten(),
                             A(ln.bias).flatten(), ln.eps)
            z = F.linear(torch.relu(z), _w2d(conv2.weight, acc), A(conv2.bias))
        a_ch = torch.sigmoid(z)  # (B, C)
        gs = g * a_ch if seq else g  # GP of the branch input
        sq = F.linear(gs, _w2d(msq.weight, acc), _vec(msq.bias, acc))
        if paper:
            s = torch.softmax(sq, -1)
            u = torch.mm(s, _w2d(msv.weight, acc))  # (B, C)
            ue = u * a_ch if seq else u
            lg = A(torch.bmm(X(ue).unsqueeze(1), x3))  # (B, 1, HW)
            lg = lg + torch.mm(s, A(msv.bias).view(c2, 1)).view(b, 1, 1)
        elif not seq:
            u = torch.mm(sq, _w2d(msv.weight, acc))
            lg = torch.softmax(A(torch.bmm(X(u).unsqueeze(1), x3)), -1)
        else:
            # PSA_s: W_v(a_ch * X) = (W_v diag(a_ch)) X, softmax over HW per
            # channel (does not fuse); a_ch * X is never materialised
            wva = _w2d(msv.weight, acc).unsqueeze(0) * a_ch.unsqueeze(1)
            theta = torch.softmax(A(torch.bmm(X(wva), x3)), -1)
            lg = torch.bmm(sq.unsqueeze(1), theta)  # (B, 1, HW)
        a_sp = torch.sigmoid(lg)
    a_ch = block.ch_attn(X(a_ch).view(b, c, 1, 1))
    a_sp = block.sp_attn(X(a_sp).view(b, 1, h, w))
    if seq:
        return x * a_ch * a_sp
    return x * a_ch + x * a_sp


def fused_forward(block, x: Tensor) -> Tensor:
    """Evaluate ``block`` (a PolarizedSelfAttention) on ``x`` the fused way."""
    if (torch.jit.is_tracing() or torch.compiler.is_compiling()
            or x.numel() == 0):
        return _plain(block, x)
    sequential = block.mode == 'sequential'
    if block.variant == 'paper':
        eps = block.ln.eps
    else:
        eps = block.conv_up[1].eps if sequential else 0.0
    out, a_ch, a_sp = _FusedPSA.apply(x, block.variant, sequential, eps, *_params(block))
    block.ch_attn(a_ch)
    block.sp_attn(a_sp)
    return out
