"""Polarized Self-Attention (PSA) block.

Liu et al., "Polarized Self-Attention: Towards High-quality Pixel-wise Regression",
https://arxiv.org/abs/2107.00782.

One class, :class:`PolarizedSelfAttention`, with two variants:

* ``variant='paper'``: the paper's equations (Eq. 1-5), with the parameter names of the
  widely used standalone implementation (External-Attention-pytorch), so its
  state_dicts load unchanged.
* ``variant='official'``: what the released code (DeLightCMU/PSA,
  ``semantic-segmentation/network/PSA.py``) computes; ``mode='parallel'`` is its
  ``PSA_p``, ``mode='sequential'`` its ``PSA_s``, with its parameter names and init.

Each has a literal form (the equations evaluated as written: three 1x1 convs at full
resolution; the test oracle) and a fused form (``fused=True``, the default) that uses
the linearity of the 1x1 convs to touch the input only a few times; see
:mod:`mmpsa.layers.psa_fused`. Both have the same parameters and state_dict.
"""
import importlib.util
import inspect
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import dispatch, psa_fused
from .precision import acc_dtype, no_autocast

#: Whether mmengine is installed: the block is then an mmengine ``BaseModule`` registered in
#: its root ``MODELS`` (so ``type='PolarizedSelfAttention'`` builds in mmseg's and mmpose's
#: scopes), otherwise a plain ``nn.Module`` (the layer needs torch alone, as timm's do).
WITH_MMENGINE = importlib.util.find_spec('mmengine') is not None
if WITH_MMENGINE:
    from mmengine.model import BaseModule as _Base
    from mmengine.registry import MODELS
else:
    _Base = nn.Module

    class _NoRegistry:
        """Stands in for mmengine's ``MODELS`` when mmengine is not installed."""

        @staticmethod
        def register_module():
            return lambda cls: cls

    MODELS = _NoRegistry()

_MODES = ('parallel', 'sequential')
_NO_PARAMS = {'weight': None, 'bias': None}  # an absent submodule in fused_params
_VARIANTS = ('paper', 'official')


def _softmax(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax computed in (at least) fp32, returned in ``t``'s dtype."""
    if t.dtype in (torch.float16, torch.bfloat16):
        with no_autocast(t):
            return F.softmax(t.float(), dim).to(t.dtype)
    return F.softmax(t, dim)


def _layer_norm(ln: nn.LayerNorm, t: torch.Tensor) -> torch.Tensor:
    """``ln(t)`` computed in (at least) fp32 (returns fp32 for half inputs)."""
    acc = acc_dtype(t.dtype)
    with no_autocast(t):
        return F.layer_norm(
            t.to(acc), ln.normalized_shape, ln.weight.to(acc), ln.bias.to(acc), ln.eps)


@MODELS.register_module()
class PolarizedSelfAttention(_Base):
    """Polarized Self-Attention block (https://arxiv.org/abs/2107.00782).

    Output shape = input shape ``(B, C, H, W)``. The channel attention ``a_ch``
    ``(B, C, 1, 1)`` and the spatial attention ``a_sp`` ``(B, 1, H, W)`` pass through
    the parameter-free identity children ``ch_attn`` and ``sp_attn`` on every path, so
    forward hooks on them read the maps. They are observation points: the fused
    path computes its output from its own maps, not from what those modules return.

    ``fused=True`` runs a fused custom autograd Function (same parameters and
    results; see :mod:`mmpsa.layers.psa_fused`); under ``torch.jit`` tracing and
    ``torch.compile``/``torch.export`` it runs the same fused math as plain ops. Which
    path runs is decided by :mod:`mmpsa.layers.dispatch` and recorded in ``last_path``.

    Initialisation (:meth:`init_weights`, also applied at construction):

    * ``'paper'``: PyTorch's default ``Conv2d`` init (kaiming-uniform with
      ``a=sqrt(5)``, bias uniform in +-1/sqrt(fan_in)) and ``LayerNorm`` weight 1,
      bias 0 -- what External-Attention-pytorch's module gets on construction.
    * ``'official'``: as the released classes: kaiming-normal (``fan_in``, ReLU gain)
      on the four query/value convs, PyTorch's defaults on ``conv_up``. Built in the
      released construction order, so under the same seed the weights equal the
      released classes'.

    Args:
        in_channels (int): Number of channels C (positive, even; >= 8 for the
            official sequential variant, whose bottleneck has C // 8 channels).
        mode (str): ``'parallel'`` (``Z_ch + Z_sp``) or ``'sequential'``
            (``Z_sp(Z_ch(X))``). Default: ``'parallel'``.
        variant (str): ``'paper'`` or ``'official'``. Default: ``'paper'``.
        fused (bool): Use the fused evaluation (same result, much faster). ``False``
            selects the literal form. Default: ``True``.
        init_cfg (dict | list[dict], optional): mmengine init config, applied after
            the block's own init; needs mmengine (the block is an mmengine ``BaseModule``
            when mmengine is installed, a plain ``nn.Module`` otherwise). Default: ``None``.

    Attributes:
        last_path (str | None): The path the last forward took: ``'literal'``, or the fused
            one that :mod:`mmpsa.layers.dispatch` chose (``'plain'``, ``'aten'``, ``'cpu'``,
            ``'triton'``); None before the first forward.
    """

    _abbr_ = 'psa'

    def __init__(self,
                 in_channels: int,
                 mode: str = 'parallel',
                 variant: str = 'paper',
                 fused: bool = True,
                 init_cfg: Optional[Union[dict, list]] = None) -> None:
        if WITH_MMENGINE:
            super().__init__(init_cfg=init_cfg)
        elif init_cfg is not None:
            raise ValueError('init_cfg needs mmengine (pip install mmengine), which is not '
                             f'installed; got init_cfg={init_cfg!r}')
        else:
            super().__init__()
            self.init_cfg = None
        if mode not in _MODES:
            raise ValueError(f'mode must be one of {_MODES}, got {mode!r}')
        if variant not in _VARIANTS:
            raise ValueError(f'variant must be one of {_VARIANTS}, got {variant!r}')
        if (not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels <= 0
                or in_channels % 2):
            raise ValueError('in_channels must be a positive even int, '
                             f'got {in_channels!r}')
        if variant == 'official' and mode == 'sequential' and in_channels < 8:
            raise ValueError('in_channels must be >= 8 for the official '
                             'sequential variant (its bottleneck has '
                             f'in_channels // 8 channels), got {in_channels!r}')
        if not isinstance(fused, bool):
            raise ValueError(f'fused must be a bool, got {fused!r}')
        self.in_channels = in_channels
        self.mode = mode
        self.variant = variant
        self.fused = fused
        self.last_path: Optional[str] = None

        c, c2 = in_channels, in_channels // 2
        if variant == 'paper':
            # construction order and names of External-Attention-pytorch
            self.ch_wv = nn.Conv2d(c, c2, 1)
            self.ch_wq = nn.Conv2d(c, 1, 1)
            self.ch_wz = nn.Conv2d(c2, c, 1)
            self.ln = nn.LayerNorm(c)
            self.sp_wv = nn.Conv2d(c, c2, 1)
            self.sp_wq = nn.Conv2d(c, c2, 1)
        else:
            # construction order and names of the released PSA_p / PSA_s
            self.conv_q_right = nn.Conv2d(c, 1, 1, bias=False)
            self.conv_v_right = nn.Conv2d(c, c2, 1, bias=False)
            if mode == 'parallel':
                self.conv_up = nn.Conv2d(c2, c, 1, bias=False)
            else:
                c8 = c2 // 4
                self.conv_up = nn.Sequential(
                    nn.Conv2d(c2, c8, 1), nn.LayerNorm([c8, 1, 1]), nn.ReLU(inplace=True),
                    nn.Conv2d(c8, c, 1))
            self.conv_q_left = nn.Conv2d(c, c2, 1, bias=False)
            self.conv_v_left = nn.Conv2d(c, c2, 1, bias=False)
        self.ch_attn = nn.Identity()
        self.sp_attn = nn.Identity()
        self._fused_parts = self._fused_param_modules()
        if variant == 'official':
            self._init_official_qv()

    # ------------------------------------------------------------------ init
    def _init_official_qv(self) -> None:
        for conv in (self.conv_q_right, self.conv_v_right, self.conv_q_left, self.conv_v_left):
            nn.init.kaiming_normal_(conv.weight, mode='fan_in', nonlinearity='relu')

    def init_weights(self) -> None:
        """(Re)apply the block's own initialisation, then ``init_cfg`` if given.

        Unlike :meth:`BaseModule.init_weights` this may be called any number of times;
        each call initialises again (``is_init`` stays ``False``, so a parent's
        ``init_weights`` re-applies it too).
        """
        for m in self.modules():
            if m is not self and isinstance(m, (nn.Conv2d, nn.LayerNorm)):
                m.reset_parameters()
        if self.variant == 'official':
            self._init_official_qv()
        if not WITH_MMENGINE:
            return
        if self.init_cfg:
            self._is_init = False
            super().init_weights()
        self._is_init = False

    # ----------------------------------------------------------- fused form
    def _fused_param_modules(self) -> tuple:
        """The submodules behind :meth:`fused_params`: ``(q, v, z, ln, z2, sq, sv)``.

        Listed once at construction (a deepcopy copies the tuple along with the modules
        it names, a loaded state_dict fills the same parameters).
        """
        if self.variant == 'paper':
            return (self.ch_wq, self.ch_wv, self.ch_wz, self.ln, None, self.sp_wq, self.sp_wv)
        if self.mode == 'parallel':
            up = (self.conv_up, None, None)
        else:
            conv1, ln, _, conv2 = self.conv_up  # conv, LN, ReLU, conv
            up = (conv1, ln, conv2)
        return (self.conv_q_right, self.conv_v_right, *up, self.conv_q_left, self.conv_v_left)

    def fused_params(self) -> psa_fused.PSAParams:
        """The block's parameters in the named form every fused evaluation takes.

        See :class:`~mmpsa.layers.psa_fused.PSAParams`. This runs on every fused
        forward, so it reads the parameter dicts of the submodules listed at
        construction (``Module.__getattr__`` for the ~20 lookups cost ~15 us, a tenth
        of a small block's forward); the parameters themselves are read afresh.
        """
        parts = self._fused_parts
        q, v, z, ln, z2, sq, sv = [_NO_PARAMS if m is None else m._parameters for m in parts]
        eps = 0.0 if parts[3] is None else parts[3].eps
        return psa_fused.PSAParams(q['weight'], q['bias'], v['weight'], v['bias'], z['weight'],
                                   z['bias'], ln['weight'], ln['bias'], z2['weight'], z2['bias'],
                                   sq['weight'], sq['bias'], sv['weight'], sv['bias'], eps)

    def extra_repr(self) -> str:
        return (f'in_channels={self.in_channels}, mode={self.mode!r}, '
                f'variant={self.variant!r}, fused={self.fused}')

    # --------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block.

        Args:
            x (Tensor): Input of shape ``(B, C, H, W)``.

        Returns:
            Tensor: Output of the same shape (never a view of ``x``).
        """
        if x.dim() != 4:
            raise ValueError('x must be a 4-D (B, C, H, W) tensor, got shape '
                             f'{tuple(x.shape)!r}')
        # (under tracing the comparison would be a traced value; the weights fix C)
        if not torch.jit.is_tracing() and x.shape[1] != self.in_channels:
            raise ValueError(f'x must have in_channels={self.in_channels} '
                             f'channels, got shape {tuple(x.shape)!r}')
        if self.fused:
            return dispatch.fused_forward(self, x)
        self.last_path = 'literal'
        return self.forward_literal(x)

    def forward_literal(self, x: torch.Tensor) -> torch.Tensor:
        """The literal form: the equations (or the released ops) as written."""
        if self.variant == 'paper':
            channel, spatial = self._paper_channel, self._paper_spatial
        else:
            channel, spatial = self._official_channel, self._official_spatial
        a_ch = self.ch_attn(channel(x))  # (B, C, 1, 1)
        z_ch = x * a_ch
        if self.mode == 'parallel':
            a_sp = self.sp_attn(spatial(x))  # (B, 1, H, W)
            return z_ch + x * a_sp
        a_sp = self.sp_attn(spatial(z_ch))
        return z_ch * a_sp

    # paper: A_ch = sigmoid(LN(W_z(W_v(X) softmax(W_q(X))))),
    #        A_sp = sigmoid(softmax(GP(W_q(X)))^T W_v(X))
    def _paper_channel(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        v = self.ch_wv(x).flatten(2)  # (B, C/2, HW)
        q = _softmax(self.ch_wq(x).flatten(2), -1)  # (B, 1, HW)
        z = self.ch_wz(torch.matmul(v, q.transpose(1, 2)).unsqueeze(-1))
        a_ch = torch.sigmoid(_layer_norm(self.ln, z.flatten(1)))  # (B, C)
        return a_ch.to(x.dtype).view(b, c, 1, 1)

    def _paper_spatial(self, y: torch.Tensor) -> torch.Tensor:
        b, c, h, w = y.shape
        v = self.sp_wv(y).flatten(2)  # (B, C/2, HW)
        q = F.adaptive_avg_pool2d(self.sp_wq(y), 1).flatten(1)  # GP: (B, C/2)
        q = _softmax(q, -1).unsqueeze(1)  # (B, 1, C/2)
        a_sp = torch.sigmoid(torch.matmul(q, v))  # (B, 1, HW)
        return a_sp.to(y.dtype).view(b, 1, h, w)

    # official: PSA_p / PSA_s of DeLightCMU/PSA (their `spatial_pool` computes the
    # channel attention, their `channel_pool` the spatial one)
    def _official_channel(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        v = self.conv_v_right(x).flatten(2)  # (B, C/2, HW)
        q = _softmax(self.conv_q_right(x).flatten(2), -1)  # (B, 1, HW)
        ctx = torch.matmul(v, q.transpose(1, 2)).unsqueeze(-1)  # (B, C/2, 1, 1)
        if self.mode == 'parallel':
            z = self.conv_up(ctx)
        else:
            conv1, ln, relu, conv2 = self.conv_up
            t = _layer_norm(ln, conv1(ctx)).to(ctx.dtype)
            z = conv2(relu(t))  # (B, C, 1, 1)
        return torch.sigmoid(z).to(x.dtype)

    def _official_spatial(self, y: torch.Tensor) -> torch.Tensor:
        b, c, h, w = y.shape
        g = F.adaptive_avg_pool2d(self.conv_q_left(y), 1)  # (B, C/2, 1, 1)
        g = g.flatten(1).unsqueeze(1)  # (B, 1, C/2)
        theta = self.conv_v_left(y).flatten(2)  # (B, C/2, HW)
        if self.mode == 'sequential':
            theta = _softmax(theta, -1)
        ctx = torch.matmul(g, theta)  # (B, 1, HW)
        if self.mode == 'parallel':
            ctx = _softmax(ctx, -1)
        return torch.sigmoid(ctx).to(y.dtype).view(b, 1, h, w)


def _block_defaults() -> Dict[str, Any]:
    """The block's configurable arguments and their defaults, read from its signature."""
    params = inspect.signature(PolarizedSelfAttention.__init__).parameters
    return {
        name: p.default
        for name, p in params.items() if name not in ('self', 'in_channels', 'init_cfg')
    }


#: What a ``psa=dict(...)`` of a backbone, neck or head sets for each block, with the
#: defaults (the block's own: ``mode='parallel', variant='paper', fused=True``).
PSA_DEFAULTS: Dict[str, Any] = _block_defaults()


def check_psa_cfg(psa: Any, owner: str, extra_keys: Sequence[str] = ()) -> Dict[str, Any]:
    """Check a ``psa=dict(...)`` config and fill in the block's defaults.

    The one place that knows which keys a PSA config holds: the block's arguments
    (:data:`PSA_DEFAULTS`) plus what the caller adds (a backbone's ``stages``). The values
    are checked by the block when it is built (and ``extra_keys`` by the caller).

    Args:
        psa: The config, a dict with some of the keys.
        owner: Who reads it (a class name), put in the messages.
        extra_keys: Keys the caller accepts beyond the block's arguments; they are
            returned only when given.

    Returns:
        dict: A copy with every block argument set.
    """
    if not isinstance(psa, Mapping):
        raise ValueError(f'{owner}: psa must be a dict or None, got {psa!r} (e.g. '
                         f"psa=dict(mode='parallel', variant='paper'))")
    allowed = (*PSA_DEFAULTS, *extra_keys)
    unknown = [key for key in psa if key not in allowed]
    if unknown:
        raise ValueError(f'{owner}: unknown psa key {unknown[0]!r} (allowed: '
                         f'{", ".join(allowed)}), got psa={dict(psa)!r}')
    return {**PSA_DEFAULTS, **psa}
