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

* The autograd Function with the hand-written backward is C++
  (``mmpsa/csrc/psa_fused.cpp``, built into ``mmpsa._ext`` by ``pip install``). For
  the paper variant and official PSA_p on small contiguous CPU inputs (every HRNet
  shape) it evaluates each sample in plain loops, one sample per thread, with the
  passes over X fused; elsewhere (other devices, large inputs, PSA_s) it calls ATen
  ops only, so it runs on any device and dtype. At the HRNet shapes a step in ATen
  ops is ~50 ops of a few microseconds each on tiny tensors; the Python version of
  the same ops was slower still (its per-op glue was a third of the step).
* :func:`_plain` is the same maths as plain differentiable ops. It runs under
  ``torch.jit`` tracing and ``torch.compile``/``torch.export`` (a custom Function would
  be opaque there; mmengine's FLOPs count would miss it), and, with a warning, when
  the extension is not built.
"""
import hashlib
import importlib
import os.path as osp
import warnings
from typing import List, Optional

import torch
import torch.nn.functional as F

from .precision import acc_dtype, no_autocast

Tensor = torch.Tensor


def _w2d(conv_weight: Tensor, dtype: torch.dtype) -> Tensor:
    """A 1x1 conv weight (O, I, 1, 1) as an (O, I) matrix."""
    return conv_weight.flatten(1).to(dtype)


def _vec(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


def _casts(xd: torch.dtype, acc: torch.dtype):
    """Casts to the input dtype and to the accumulation dtype (no-ops if same)."""
    if xd == acc:
        return (lambda t: t), (lambda t: t)
    return (lambda t: t.to(xd)), (lambda t: t.to(acc))


def _params(block) -> list:
    """The block's parameters in the order the compiled Function takes them.

    Paper: ``ch_wq``, ``ch_wv``, ``ch_wz``, ``ln``, ``sp_wq``, ``sp_wv`` (weight, bias
    each). Official: ``conv_q_right``, ``conv_v_right``, ``conv_up`` (PSA_s: its conv,
    LayerNorm, conv), ``conv_q_left``, ``conv_v_left``. This runs on every forward, so
    it reads ``_modules``/``_parameters`` directly (``Module.__getattr__`` for the 24
    lookups cost ~15 us, a tenth of a small block's forward).
    """
    mods = block._modules
    if block.variant == 'paper':
        parts = [mods[name] for name in _PAPER_MODULES]
    else:
        up = mods['conv_up']
        ups = ([up] if block.mode == 'parallel' else
               [up._modules[k] for k in ('0', '1', '3')])  # conv, LN, (ReLU), conv
        parts = [mods['conv_q_right'], mods['conv_v_right'], *ups,
                 mods['conv_q_left'], mods['conv_v_left']]
    return [t for m in parts for t in m._parameters.values() if t is not None]


_PAPER_MODULES = ('ch_wq', 'ch_wv', 'ch_wz', 'ln', 'sp_wq', 'sp_wv')


def _plain(block, x: Tensor) -> Tensor:
    """The fused math with plain differentiable ops (tracing, compile, export,
    and the fallback when ``mmpsa._ext`` is not built).

    Same evaluation order as the compiled Function's forward, with batched matmuls
    (which mmengine's FLOPs analysis counts correctly).
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


def _load_extension():
    """``mmpsa._ext``, or None (with a warning) when it is missing or stale."""
    try:
        _ext = importlib.import_module('mmpsa._ext')
    except ImportError as e:
        warnings.warn(
            'mmpsa._ext (the compiled fused PolarizedSelfAttention) is not built '
            f'({e}); the fused block runs as plain autograd ops, which is slower. '
            'Build it with `pip install --no-build-isolation -e .` (or `make setup`).')
        return None
    src = osp.join(osp.dirname(osp.dirname(__file__)), 'csrc', 'psa_fused.cpp')
    if osp.exists(src):  # a source checkout: refuse a binary built from other code
        with open(src, 'rb') as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
        if digest != _ext.SOURCE_HASH:
            warnings.warn(
                f'mmpsa._ext was built from another version of {src} (hash '
                f'{_ext.SOURCE_HASH}, source {digest}); the fused block runs as '
                'plain autograd ops until it is rebuilt with `pip install '
                '--no-build-isolation -e .` (or `make setup`).')
            return None
    return _ext


_EXT = _load_extension()


def fused_function(x: Tensor, variant: str, sequential: bool, eps: float,
                   params) -> List[Tensor]:
    """The compiled autograd Function: ``[out, a_ch, a_sp]``.

    Args:
        x (Tensor): Input ``(B, C, H, W)``.
        variant (str): ``'paper'`` or ``'official'``.
        sequential (bool): Sequential (True) or parallel mode.
        eps (float): The paper LayerNorm's eps, or official ``conv_up``'s (PSA_s).
        params (sequence[Tensor]): In the order of :func:`_params`.

    Returns:
        list[Tensor]: The output and the maps ``a_ch`` ``(B, C, 1, 1)`` and ``a_sp``
        ``(B, 1, H, W)`` (non-differentiable: observation only).
    """
    if _EXT is None:
        raise RuntimeError('mmpsa._ext is not built; see the warning above')
    return _EXT.fused_psa(x, variant == 'paper', sequential, eps, params)


def fused_forward(block, x: Tensor) -> Tensor:
    """Evaluate ``block`` (a PolarizedSelfAttention) on ``x`` the fused way."""
    if (_EXT is None or torch.jit.is_tracing()
            or torch.compiler.is_compiling() or x.numel() == 0):
        return _plain(block, x)
    sequential = block.mode == 'sequential'
    if block.variant == 'paper':
        eps = block.ln.eps
    else:
        eps = block.conv_up[1].eps if sequential else 0.0
    out, a_ch, a_sp = fused_function(x, block.variant, sequential, eps,
                                     _params(block))
    block.ch_attn(a_ch)
    block.sp_attn(a_sp)
    return out
