"""``PSANeck``: one Polarized Self-Attention per feature level, for mmseg and mmpose alike.

`Polarized Self-Attention <https://arxiv.org/abs/2107.00782>`_ keeps the shape of its input,
so the neck fits between any backbone and head: it returns the backbone's levels with the
same channels and sizes, each refined by its own block. It imports neither mmseg nor mmpose
and registers once, in mmengine's root ``MODELS`` (as the block does), so
``type='PSANeck'`` builds in either scope.

Segmentors and pose estimators build the neck without showing it the backbone, so a level
count or a channel list that does not match would otherwise surface only as a shape error in
the first forward. A module-registration hook (a public torch API) compares the neck with
its sibling ``backbone`` the moment a model assigns it, i.e. while the model is being built.
"""
from typing import List, Optional, Sequence, Tuple, Union

from mmengine.model import BaseModule
from mmengine.registry import MODELS
from torch import Tensor, nn
from torch.nn.modules.module import register_module_module_registration_hook

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


def _check_neck_on_assign(parent: nn.Module, name: str, module: nn.Module) -> None:
    """Module-registration hook: check a PSANeck against the backbone it is assigned beside.

    Acts only for backbones whose output channels
    :func:`~mmpsa.insertion.backbone_out_channels` knows (mmseg's and mmpose's ResNet and
    HRNet, PSA or stock); others are checked at the first forward.
    """
    if name != 'neck' or not isinstance(module, PSANeck):
        return None
    backbone = getattr(parent, 'backbone', None)
    channels = backbone_out_channels(backbone) if isinstance(backbone, nn.Module) else None
    if channels is not None:
        module.check_inputs(channels, f'the backbone ({type(backbone).__name__})')
    return None


register_module_module_registration_hook(_check_neck_on_assign)
