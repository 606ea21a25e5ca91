"""PSANeck for MMPose: one Polarized Self-Attention per feature level.

`Polarized Self-Attention <https://arxiv.org/abs/2107.00782>`_ keeps the shape of its input,
so the neck fits between any mmpose backbone and head: the head sees the same shapes as
without it.
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

from mmengine.model import BaseModule
from mmpose.registry import MODELS
from torch import Tensor, nn
from torch.nn.modules.module import register_module_module_registration_hook

from ..insertion import backbone_out_channels
from ..layers import PolarizedSelfAttention

#: The keys ``psa=dict(...)`` of a neck or head accepts (the block's arguments).
PSA_BLOCK_KEYS = ('mode', 'variant', 'fused')


def check_psa_cfg(psa: dict, owner: str) -> Dict:
    """Validate a neck's or head's ``psa`` dict; return a copy.

    Args:
        psa: ``dict(mode=..., variant=..., fused=...)``.
        owner: class name used in the error message.

    Returns:
        The dict, copied.
    """
    if not isinstance(psa, dict):
        raise ValueError(f'{owner}: psa must be a dict or None, got {psa!r}')
    unknown = sorted(set(psa) - set(PSA_BLOCK_KEYS))
    if unknown:
        raise ValueError(f'{owner}: unknown psa keys {unknown} (allowed: '
                         f'{list(PSA_BLOCK_KEYS)}), got psa={psa!r}')
    return dict(psa)


def _is_channels(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@MODELS.register_module()
class PSANeck(BaseModule):
    """A Polarized Self-Attention on each feature level; output shapes equal the inputs'.

    Level ``i`` of the backbone's output tuple goes through its own
    :class:`~mmpsa.layers.PolarizedSelfAttention` (parameters ``psa.{i}.*``). mmpose's
    top-down HRNet returns one level (``in_channels=[32]`` for W32); a ResNet with
    ``out_indices=(3,)`` one level of 2048 channels.

    Args:
        in_channels (int | Sequence[int]): Channels of each input level, in order.
        psa (dict): Arguments of every block: ``mode`` ('parallel' | 'sequential'),
            ``variant`` ('paper' | 'official'), ``fused``.
            Defaults to ``dict(mode='parallel', variant='paper')``.
        init_cfg (dict, optional): Initialisation config. Defaults to None (each block
            applies its own initialisation).
    """

    def __init__(self,
                 in_channels: Union[int, Sequence[int]],
                 psa: Optional[dict] = None,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg)
        levels = [in_channels] if isinstance(in_channels, int) else in_channels
        if (not isinstance(levels, (list, tuple)) or not levels
                or not all(_is_channels(c) for c in levels)):
            raise ValueError('PSANeck: in_channels must be a positive int or a non-empty '
                             f'sequence of positive ints, got {in_channels!r}')
        psa = check_psa_cfg(dict(mode='parallel', variant='paper') if psa is None else psa,
                            'PSANeck')
        self.in_channels: List[int] = list(levels)
        self.psa = nn.ModuleList(
            PolarizedSelfAttention(channels, **psa) for channels in self.in_channels)

    def init_weights(self) -> None:
        """Apply ``init_cfg`` (if any), then each block's own initialisation."""
        super().init_weights()
        for block in self.psa:
            block.init_weights()

    def check_inputs(self, channels: Sequence[int], source: str) -> None:
        """Raise ValueError naming ``in_channels`` unless ``channels`` match it.

        Args:
            channels: The channels of the levels this neck receives.
            source: Who produces them, for the message.
        """
        channels = list(channels)
        if len(channels) != len(self.in_channels):
            raise ValueError(
                f'PSANeck: in_channels lists {len(self.in_channels)} levels '
                f'({self.in_channels}) but {source} gives {len(channels)} feature maps '
                f'with channels {channels}')
        if channels != self.in_channels:
            raise ValueError(f'PSANeck: in_channels={self.in_channels} does not match the '
                             f'channels of {source}, got {channels}')

    def forward(self, inputs: Union[Tensor, Sequence[Tensor]]
                ) -> Union[Tensor, Tuple[Tensor, ...]]:
        """Apply level ``i``'s PSA to ``inputs[i]``.

        Args:
            inputs: The backbone's feature maps (a tuple), or one tensor.

        Returns:
            The same structure and shapes as ``inputs``.
        """
        single = isinstance(inputs, Tensor)
        feats = (inputs, ) if single else tuple(inputs)
        self.check_inputs([f.shape[1] for f in feats], 'the backbone')
        outs = tuple(block(x) for block, x in zip(self.psa, feats))
        return outs[0] if single else outs


def _check_on_assign(parent: nn.Module, name: str, module: nn.Module) -> None:
    """Module-registration hook: when a pose estimator assigns our neck or head beside its
    backbone, check their ``in_channels`` against it, so the config fails at build time.

    mmpose builds ``backbone``, ``neck``, ``head`` in that order as attributes of the
    estimator, without showing the later ones the backbone; this hook sees each assignment.
    It acts on mmpsa's PSANeck and PSAHeatmapHead only, and only for backbones whose output
    channels :func:`~mmpsa.insertion.backbone_out_channels` knows.
    """
    from .heads import PSAHeatmapHead
    if not isinstance(module, (PSANeck, PSAHeatmapHead)) or name not in ('neck', 'head'):
        return None
    backbone = getattr(parent, 'backbone', None)
    channels = backbone_out_channels(backbone) if isinstance(backbone, nn.Module) else None
    source = f'the backbone ({type(backbone).__name__})'
    neck = getattr(parent, 'neck', None)
    if name == 'head' and neck is not None:  # a neck sits between: trust only ours
        channels, source = (list(neck.in_channels), 'the PSANeck') \
            if isinstance(neck, PSANeck) else (None, '')
    if channels is None:
        return None
    if isinstance(module, PSANeck):
        module.check_inputs(channels, source)
    else:
        module.check_inputs(channels[-1], source)
    return None


register_module_module_registration_hook(_check_on_assign)
