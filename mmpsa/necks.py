"""``PSANeck``: one Polarized Self-Attention per feature level, for mmseg and mmpose alike.

`Polarized Self-Attention <https://arxiv.org/abs/2107.00782>`_ keeps the shape of its input,
so the neck fits between any backbone and head: it returns the backbone's levels with the
same channels and sizes, each refined by its own block. It imports neither mmseg nor mmpose
and registers once, in mmengine's root ``MODELS`` (as the block does), so
``type='PSANeck'`` builds in either scope.

Segmentors and pose estimators build the neck without showing it the backbone, so the neck
checks what it receives at every forward (a ValueError naming ``in_channels``, not a shape
error deep in a conv). :func:`check_feature_channels` checks a whole built model -- every PSA
neck and head against the backbone or neck before it -- without running it; mmpsa's own build
paths (the train/test tools' runner, :func:`mmpsa.checkpoint.build_model`) call it, so a
config mistake fails when the model is built. This module installs no global hook: a plain
``MODELS.build`` is not checked until the first forward.
"""
from typing import List, Optional, Sequence, Tuple, Union

from mmengine.model import BaseModule
from mmengine.registry import MODELS
from torch import Tensor, nn

from .insertion import backbone_out_channels
from .layers import PolarizedSelfAttention, check_psa_cfg


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
        raise ValueError(f'{owner}: {field} must be a positive int or a non-empty list of '
                         f'positive ints, got {value!r}')
    return list(value)


@MODELS.register_module()
class PSANeck(BaseModule):
    """Applies a Polarized Self-Attention block to every feature level.

    Level ``i`` goes through its own block (parameters ``psa.{i}.*``); outputs have the
    shapes of the inputs, so the head after it needs no change. mmpose's top-down HRNet
    returns one level (``in_channels=[32]`` for W32), mmseg's HRNetV2 four.

    Args:
        in_channels (int | Sequence[int]): Channels of each input level, in the order the
            backbone returns them.
        psa (dict, optional): The blocks' arguments: ``mode`` (``'parallel'`` = PSA_p,
            ``'sequential'`` = PSA_s), ``variant`` (``'paper'`` or ``'official'``),
            ``fused``; unset keys take the block's defaults.
        init_cfg (dict, optional): mmengine initialisation config; each block re-applies
            its own initialisation after it.
    """

    def __init__(self,
                 in_channels: Optional[Union[int, Sequence[int]]] = None,
                 psa: Optional[dict] = None,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        owner = type(self).__name__
        if isinstance(in_channels, int) and not isinstance(in_channels, bool):
            in_channels = [in_channels]
        self.in_channels = check_channel_list(owner, 'in_channels', in_channels)
        psa = check_psa_cfg({} if psa is None else psa, owner)
        self.psa = nn.ModuleList(
            PolarizedSelfAttention(channels, **psa) for channels in self.in_channels)

    def init_weights(self) -> None:
        """Apply ``init_cfg`` (if any), then each block's own initialisation."""
        super().init_weights()
        for block in self.psa:
            block.init_weights()

    def check_inputs(self, channels: Sequence[int], source: str) -> None:
        """Raise ValueError naming ``in_channels`` unless ``channels`` are what it expects.

        Args:
            channels: The channels of the levels this neck receives.
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

    def check_feature_channels(self, channels: Sequence[int], source: str) -> None:
        """The check :func:`check_feature_channels` runs: :meth:`check_inputs`."""
        self.check_inputs(channels, source)

    def forward(self, inputs: Union[Tensor, Sequence[Tensor]]) -> Union[Tensor, Tuple[Tensor, ...]]:
        """Apply level ``i``'s block to ``inputs[i]``.

        Args:
            inputs: The backbone's feature maps (a tuple), or one tensor.

        Returns:
            The same structure and shapes as ``inputs``.
        """
        single = isinstance(inputs, Tensor)
        feats = (inputs, ) if single else tuple(inputs)
        self.check_inputs([f.shape[1] for f in feats], 'the input')
        outs = tuple(block(x) for block, x in zip(self.psa, feats))
        return outs[0] if single else outs


#: The children of a segmentor or pose estimator that receive feature maps, in build order.
FEATURE_CONSUMERS = ('neck', 'decode_head', 'auxiliary_head', 'head')


def feature_channels(parent: nn.Module, child: str) -> Optional[Tuple[List[int], str]]:
    """The channels of the feature maps ``parent`` feeds its ``child``, and who makes them.

    The one answer to "which channels feed me" for the PSA neck and heads: a neck receives the
    backbone's maps; a head receives a ``PSANeck``'s (which keeps the backbone's channels) or,
    without a neck, the backbone's. Backbone channels are known for mmseg's and mmpose's
    ResNet and HRNet, PSA or stock (:func:`~mmpsa.insertion.backbone_out_channels`).

    Args:
        parent: A segmentor or pose estimator (``backbone``, ``neck``, heads as attributes).
        child: ``'neck'`` or the attribute of a head (``'decode_head'``, ``'head'``, ...).

    Returns:
        ``(channels, source)``, or None where they are unknown (another neck, an unknown
        backbone): then the child's own check at the first forward tells.
    """
    neck = None if child == 'neck' else getattr(parent, 'neck', None)
    if isinstance(neck, PSANeck):
        return list(neck.in_channels), 'the neck (PSANeck)'
    backbone = getattr(parent, 'backbone', None)
    if neck is None and isinstance(backbone, nn.Module):
        channels = backbone_out_channels(backbone)
        if channels is not None:
            return channels, f'the backbone ({type(backbone).__name__})'
    return None


def check_feature_channels(model: nn.Module) -> None:
    """Check each PSA neck and head of a built model against the maps that feed it.

    Every child in :data:`FEATURE_CONSUMERS` (a head list, as OCRNet's cascade has, item by
    item) that has a ``check_feature_channels(channels, source)`` method is given
    :func:`feature_channels`; it raises ValueError naming its own field. Stock modules and
    unknown sources are left to the first forward.

    Args:
        model: The built model (unwrapped from DDP).
    """
    for name in FEATURE_CONSUMERS:
        child = getattr(model, name, None)
        inputs = feature_channels(model, name) if isinstance(child, nn.Module) else None
        if inputs is None:
            continue
        for module in (child if isinstance(child, nn.ModuleList) else [child]):
            check = getattr(module, 'check_feature_channels', None)
            if callable(check):
                check(*inputs)
