"""``PSANeck``: one Polarized Self-Attention per feature level, for MMSegmentation.

`Polarized Self-Attention <https://arxiv.org/abs/2107.00782>`_ keeps the shape of its input,
so the neck fits between any mmseg backbone and head: it returns the backbone's levels with
the same channels and sizes, each refined by its own block.

mmseg's segmentors build the neck without showing it the backbone, so a level count or a
channel list that does not match the backbone would otherwise surface only as a shape error in
the first forward. A module-registration hook (a public torch API) compares the neck with its
sibling ``backbone`` the moment a segmentor assigns it, i.e. while the model is being built.
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch.nn as nn
from mmengine.model import BaseModule
from mmseg.registry import MODELS
from torch import Tensor
from torch.nn.modules.module import register_module_module_registration_hook

from ..insertion import backbone_out_channels
from ..layers import PolarizedSelfAttention


def check_channel_list(owner: str, field: str, value: object) -> List[int]:
    """Return ``value`` as a list of positive ints, or raise ValueError naming ``field``.

    Args:
        owner: The class name put in the message.
        field: The config field put in the message.
        value: What the config gave.
    """
    if value is None:
        raise ValueError(f'{owner}: {field} is required (one channel count per input level), '
                         f'got {value!r}')
    if (not isinstance(value, (list, tuple)) or not value
            or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in value)):
        raise ValueError(f'{owner}: {field} must be a non-empty list of positive ints, '
                         f'got {value!r}')
    return list(value)


#: The keys a neck's or head's ``psa=dict(...)`` accepts (the block's arguments).
PSA_KEYS = ('mode', 'variant', 'fused')


def build_psa(owner: str, psa: object, channels: int) -> PolarizedSelfAttention:
    """Build the block a neck's or head's ``psa`` dict asks for.

    Args:
        owner: The class name put in messages.
        psa: A dict with some of the keys in ``PSA_KEYS``.
        channels: Channels of the features the block acts on.
    """
    if not isinstance(psa, dict):
        raise ValueError(f"{owner}: psa must be a dict such as dict(mode='parallel', "
                         f"variant='paper'), got {psa!r}")
    unknown = sorted(set(psa) - set(PSA_KEYS))
    if unknown:
        raise ValueError(f'{owner}: unknown psa key(s) {unknown}; the keys are {list(PSA_KEYS)}, '
                         f'got psa={dict(psa)!r}')
    return PolarizedSelfAttention(channels, **psa)


@MODELS.register_module()
class PSANeck(BaseModule):
    """Applies a Polarized Self-Attention block to every feature level.

    Level ``i`` goes through its own block (parameters ``psa.{i}.*``); outputs have the
    shapes of the inputs, so the head after it needs no change.

    Args:
        in_channels: Channels of each input level, in the order the backbone returns them.
        psa: The blocks' arguments: ``mode`` (``'parallel'`` = PSA_p, ``'sequential'`` =
            PSA_s), ``variant`` (``'paper'`` or ``'official'``), ``fused``. Default:
            ``dict(mode='parallel', variant='paper')``.
        init_cfg: mmengine initialisation config; each block re-applies its own
            initialisation after it.
    """

    def __init__(self,
                 in_channels: Optional[Union[int, Sequence[int]]] = None,
                 psa: Optional[dict] = None,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        if isinstance(in_channels, int) and not isinstance(in_channels, bool):
            in_channels = [in_channels]
        self.in_channels = check_channel_list(type(self).__name__, 'in_channels', in_channels)
        if psa is None:
            psa = dict(mode='parallel', variant='paper')
        self.psa = nn.ModuleList(
            [build_psa(type(self).__name__, psa, c) for c in self.in_channels])

    def check_inputs(self, channels: Sequence[int], source: str = 'the backbone') -> None:
        """Raise ValueError naming ``in_channels`` unless ``channels`` are what it expects.

        Args:
            channels: The channels of the levels this neck will receive.
            source: Who produces them, for the message.
        """
        channels = list(channels)
        if len(channels) != len(self.in_channels):
            raise ValueError(
                f'PSANeck: in_channels has {len(self.in_channels)} levels but {source} returns '
                f'{len(channels)} feature maps (channels {channels}); set neck.in_channels to '
                f'{channels}, got in_channels={self.in_channels!r}')
        if channels != self.in_channels:
            raise ValueError(
                f'PSANeck: in_channels does not match {source}, whose feature maps have '
                f'channels {channels}; got in_channels={self.in_channels!r}')

    def forward(self, inputs: Sequence[Tensor]) -> Tuple[Tensor, ...]:
        """Apply each level's block; returns a tuple of tensors shaped like ``inputs``."""
        self.check_inputs([x.shape[1] for x in inputs], 'the input')
        return tuple(psa(x) for psa, x in zip(self.psa, inputs))


def _check_neck_on_assign(parent: nn.Module, name: str, module: nn.Module) -> None:
    """Module-registration hook: check a PSANeck against the backbone it is assigned beside."""
    if name != 'neck' or not isinstance(module, PSANeck):
        return None
    backbone = getattr(parent, 'backbone', None)
    channels = backbone_out_channels(backbone) if isinstance(backbone, nn.Module) else None
    if channels is not None:
        module.check_inputs(channels, f'the backbone ({type(backbone).__name__})')
    return None


register_module_module_registration_hook(_check_neck_on_assign)
