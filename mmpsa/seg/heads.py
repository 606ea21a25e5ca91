"""MMSegmentation decode heads with `Polarized Self-Attention <https://arxiv.org/abs/2107.00782>`_.

Each head is a thin subclass of a stock head with one extra argument,
``psa=dict(mode='parallel' | 'sequential', variant='paper' | 'official')``; ``psa=None``
(the default) is the stock head: same parameters, same state_dict keys, same outputs.
The block is a child named ``psa`` (keys ``decode_head.psa.<param>``) and sits on

* ``PSASepASPPHead`` (DeepLabV3+): the fused ASPP features (``bottleneck``'s output),
  before they are upsampled and joined with the low-level ``c1`` features;
* ``PSAFCNHead`` (the HRNet head): the concatenated multi-level features, before ``convs``;
* ``PSAOCRHead``: the pixel features that enter the object-context block (``bottleneck``'s
  output, used by both the spatial gather and the object attention).

None of this placement is the released code's (which has PSA only in HRNet's BasicBlocks):
the PSA heads are this project's extension. Names avoid mmseg's own ``PSAHead`` (PSANet).

When a head's ``in_channels``/``in_index``/``c1_in_channels`` do not fit the maps its backbone
(or ``PSANeck``) returns, the head raises a ValueError naming the field: at its first forward
(from the maps it receives), or -- through mmpsa's tools and build helpers, which run
:func:`mmpsa.necks.check_feature_channels` -- as soon as the segmentor is built.
"""
from typing import List, Optional, Sequence

import torch.nn as nn
from mmseg.models.decode_heads import DepthwiseSeparableASPPHead, FCNHead, OCRHead
from mmseg.registry import MODELS
from torch import Tensor

from ..layers import PolarizedSelfAttention, check_psa_cfg
from ..necks import check_channel_list


def build_head_psa(owner: str, psa: Optional[dict],
                   channels: int) -> Optional[PolarizedSelfAttention]:
    """The block a head's ``psa`` dict asks for, or None for the stock head.

    Args:
        owner: The head's class name, for messages.
        psa: ``None`` or a dict with some of ``mode``, ``variant``, ``fused``.
        channels: Channels of the features the block acts on.
    """
    if psa is None:
        return None
    return PolarizedSelfAttention(channels, **check_psa_cfg(psa, owner))


def _level_channels(owner: str, kwargs: dict) -> List[int]:
    """Validate ``in_channels``/``in_index``/``input_transform`` as ValueErrors (the stock
    heads assert) and return the channels of each level the head reads."""
    in_channels = kwargs.get('in_channels')
    in_index = kwargs.get('in_index', -1)
    if kwargs.get('input_transform') is None:
        if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
            raise ValueError(f'{owner}: in_channels must be a positive int when input_transform '
                             f'is None, got {in_channels!r}')
        if not isinstance(in_index, int):
            raise ValueError(f'{owner}: in_index must be an int when input_transform is None, '
                             f'got {in_index!r}')
        return [in_channels]
    levels = check_channel_list(owner, 'in_channels', in_channels)
    if not isinstance(in_index, (list, tuple)) or len(in_index) != len(levels):
        raise ValueError(f'{owner}: in_index must list one level per in_channels entry '
                         f'({len(levels)}), got in_index={in_index!r}')
    return levels


class _PSAHeadMixin:
    """What the three PSA heads share: the block's forward hook and the channel check."""

    psa: Optional[PolarizedSelfAttention]
    level_channels: List[int]

    def _apply_psa(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        """Forward hook: replace ``module``'s output by the PSA of it.

        A bound method of the head, so ``copy.deepcopy`` (EMA) re-binds it to the copy.
        """
        return self.psa(output)

    def check_features(self, channels: Sequence[int], source: str) -> None:
        """Raise ValueError naming the field unless the head's inputs match ``channels``.

        Args:
            channels: Channels of each feature map the head receives.
            source: Who produces them, for the message.
        """
        owner = type(self).__name__
        indices = self.in_index if isinstance(self.in_index, (list, tuple)) else [self.in_index]
        n = len(channels)
        for idx in indices:
            if not -n <= idx < n:
                raise ValueError(f'{owner}: in_index={self.in_index!r} selects a level that '
                                 f'{source} does not return ({n} feature maps, channels '
                                 f'{list(channels)})')
        selected = [channels[idx] for idx in indices]
        if selected != self.level_channels:
            as_list = isinstance(self.in_index, (list, tuple))
            declared = self.level_channels if as_list else self.level_channels[0]
            expected = selected if as_list else selected[0]
            raise ValueError(f'{owner}: in_channels does not match {source}: in_index='
                             f'{self.in_index!r} selects maps with {expected!r} channels, '
                             f'got in_channels={declared!r}')

    def check_feature_channels(self, channels: Sequence[int], source: str) -> None:
        """The check :func:`mmpsa.necks.check_feature_channels` runs: :meth:`check_features`."""
        self.check_features(channels, source)

    def forward(self, inputs: List[Tensor], *args, **kwargs) -> Tensor:
        """The stock head's forward, after checking the maps it receives (the first forward
        names a mismatched field instead of failing inside a conv)."""
        self.check_features([x.shape[1] for x in inputs], 'the input feature maps')
        return super().forward(inputs, *args, **kwargs)


@MODELS.register_module()
class PSASepASPPHead(_PSAHeadMixin, DepthwiseSeparableASPPHead):
    """DeepLabV3+ head (`arXiv 1802.02611 <https://arxiv.org/abs/1802.02611>`_) with a PSA
    on the fused high-level (ASPP) features.

    Args:
        psa: ``dict(mode=..., variant=...)`` for the block, or None for the stock head.
        **kwargs: The arguments of ``DepthwiseSeparableASPPHead``.
    """

    def __init__(self, psa: Optional[dict] = None, **kwargs) -> None:
        levels = _level_channels(type(self).__name__, kwargs)
        c1_in_channels = kwargs.get('c1_in_channels')
        if not isinstance(c1_in_channels, int) or c1_in_channels < 0:
            raise ValueError(f'{type(self).__name__}: c1_in_channels must be an int >= 0 '
                             f'(0 = no low-level branch), got {c1_in_channels!r}')
        super().__init__(**kwargs)
        self.level_channels = levels
        self.c1_in_channels = c1_in_channels
        self.psa = build_head_psa(type(self).__name__, psa, self.channels)
        if self.psa is not None:
            # The stock forward is one piece; a hook on its ASPP fusion adds the PSA
            # without restating it.
            self.bottleneck.register_forward_hook(self._apply_psa)

    def check_features(self, channels: Sequence[int], source: str) -> None:
        """Also check ``c1_in_channels`` against the first map (the stock head's c1 input)."""
        super().check_features(channels, source)
        if self.c1_bottleneck is not None and channels[0] != self.c1_in_channels:
            raise ValueError(f'{type(self).__name__}: c1_in_channels does not match {source}: '
                             f'its first map has {channels[0]} channels, got c1_in_channels='
                             f'{self.c1_in_channels!r}')


@MODELS.register_module()
class PSAFCNHead(_PSAHeadMixin, FCNHead):
    """FCN head (`arXiv 1411.4038 <https://arxiv.org/abs/1411.4038>`_), as HRNetV2 uses it
    (``resize_concat`` of every level), with a PSA on the concatenated features.

    Args:
        psa: ``dict(mode=..., variant=...)`` for the block, or None for the stock head.
        **kwargs: The arguments of ``FCNHead``.
    """

    def __init__(self, psa: Optional[dict] = None, **kwargs) -> None:
        levels = _level_channels(type(self).__name__, kwargs)
        if psa is not None and kwargs.get('input_transform') == 'multiple_select':
            raise ValueError(f'{type(self).__name__}: psa needs one input tensor; use '
                             f"input_transform='resize_concat' or None, got 'multiple_select'")
        super().__init__(**kwargs)
        self.level_channels = levels
        self.psa = build_head_psa(type(self).__name__, psa, self.in_channels)

    def _transform_inputs(self, inputs: List[Tensor]) -> Tensor:
        """The stock selection (and concatenation) of levels, then the PSA."""
        x = super()._transform_inputs(inputs)
        return x if self.psa is None else self.psa(x)


@MODELS.register_module()
class PSAOCRHead(_PSAHeadMixin, OCRHead):
    """OCR head (`arXiv 1909.11065 <https://arxiv.org/abs/1909.11065>`_) with a PSA on the
    pixel features entering the object-context block.

    Args:
        psa: ``dict(mode=..., variant=...)`` for the block, or None for the stock head.
        **kwargs: The arguments of ``OCRHead``.
    """

    def __init__(self, psa: Optional[dict] = None, **kwargs) -> None:
        levels = _level_channels(type(self).__name__, kwargs)
        super().__init__(**kwargs)
        self.level_channels = levels
        self.psa = build_head_psa(type(self).__name__, psa, self.channels)
        if self.psa is not None:
            # ``bottleneck`` makes the pixel features that both the spatial gather and the
            # object attention read; the hook puts the PSA between them.
            self.bottleneck.register_forward_hook(self._apply_psa)
