"""Hierarchical multi-scale attention for OCRNet (`Tao et al. 2020
<https://arxiv.org/abs/2005.10821>`_): the network and evaluation behind PSA's Cityscapes
results (the released ``HRNet_Mscale``).

* :class:`MscaleOCRHead`: mmseg's ``OCRHead`` plus ``scale_attn``, a small head that predicts
  from the OCR mid features (the object context, before ``cls_seg``) one weight in [0, 1] per
  pixel: how much this scale's prediction counts.
* :class:`MscaleCascadeEncoderDecoder`: mmseg's cascade segmentor (``decode_head[0]`` the aux
  FCN head, ``decode_head[1]`` a :class:`MscaleOCRHead`) that runs the network on the input
  resized to each scale of ``test_cfg.scales`` and joins the predictions with
  :func:`hierarchical_combine`; it trains with the same combination over ``train_cfg.scales``
  (default 0.5 and 1.0: the released two-scale training).
* :func:`hierarchical_combine`: the combination formula, on its own.

Every resize is bilinear, ``align_corners`` as the heads (False in mmpsa's configs, as the
released code).
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import ConvModule
from mmengine.config import ConfigDict
from mmseg.models.decode_heads import OCRHead
from mmseg.models.segmentors import CascadeEncoderDecoder
from mmseg.registry import MODELS
from mmseg.utils import ConfigType, OptConfigType, OptMultiConfig, SampleList, add_prefix
from torch import Tensor

from .. import compat
from ..checkpoint import CheckpointMismatchError, key_diff

TRAIN_CFG_KEYS = ('scales', 'scale_loss_weight')
DEFAULT_TRAIN_SCALES = (0.5, 1.0)


def _resize(x: Tensor, size: Sequence[int], align_corners: bool) -> Tensor:
    """Bilinear resize to ``size`` (the released ``scale_as``/``Upsample``); a no-op at that
    size."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode='bilinear', align_corners=align_corners)


def hierarchical_combine(outputs: Sequence[Tuple[float, Tensor, Tensor]],
                         size: Optional[Sequence[int]] = None,
                         align_corners: bool = False) -> Tensor:
    """Join per-scale predictions with their attention, highest scale first.

    With ``pred`` the running result (the highest scale's logits to begin with), each next
    scale ``s`` with logits ``p`` and attention ``a`` gives::

        s >= 1:  pred = a * p + (1 - a) * down(pred)
        s <  1:  pred = up(a * p) + (1 - up(a)) * pred

    so the result has the size of the lowest scale >= 1 (the 1.0 scale in practice).

    Args:
        outputs: ``(scale, logits (B, K, H_s, W_s), attn (B, 1, H_s, W_s))`` per scale, each at
            that scale's input size, in any order; scales distinct.
        size: Resize the result to this (H, W) if given.
        align_corners: Of the bilinear resizes.

    Returns:
        The combined logits (B, K, H, W).
    """
    if not outputs:
        raise ValueError('hierarchical_combine needs at least one scale, got none')
    pred = None
    for scale, logits, attn in sorted(outputs, key=lambda item: item[0], reverse=True):
        if pred is None:
            pred = logits
        elif scale >= 1.0:
            pred = attn * logits + (1 - attn) * _resize(pred, logits.shape[2:], align_corners)
        else:
            size_hi = pred.shape[2:]
            pred = (
                _resize(attn * logits, size_hi, align_corners) +
                (1 - _resize(attn, size_hi, align_corners)) * pred)
    return pred if size is None else _resize(pred, size, align_corners)


def check_scales(scales, field: str) -> Tuple[float, ...]:
    """``scales`` as a tuple of floats, or a ValueError naming ``field``.

    Args:
        scales: A list of distinct positive numbers containing 1.0.
        field: The config field, for the message.
    """
    ok = (
        isinstance(scales, (list, tuple)) and len(scales) > 0
        and all(isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 for s in scales)
        and 1.0 in scales and len(set(scales)) == len(scales))
    if not ok:
        raise ValueError(f'{field} must be a list of distinct positive scales that contains '
                         f'1.0 (the target scale; [1.0] = single scale), got {scales!r}')
    return tuple(float(s) for s in scales)


@MODELS.register_module()
class MscaleOCRHead(OCRHead):
    """OCR head (`arXiv 1909.11065 <https://arxiv.org/abs/1909.11065>`_) with the
    scale-attention head of hierarchical multi-scale attention (`arXiv 2005.10821
    <https://arxiv.org/abs/2005.10821>`_).

    ``scale_attn`` is the released ``make_attn_head``: conv3x3 (``channels`` ->
    ``attn_channels``) + BN + ReLU, conv3x3 + BN + ReLU, conv1x1 (-> 1), sigmoid; the convs
    without bias. It reads the object-context features that ``cls_seg`` classifies. ``forward``
    is the stock OCR head's (logits only); :meth:`forward_with_attn` adds the attention.

    Args:
        attn_channels: Channels inside ``scale_attn``. Default: 256, as released.
        **kwargs: The arguments of ``OCRHead``.
    """

    def __init__(self, attn_channels: int = 256, **kwargs) -> None:
        if not isinstance(attn_channels, int) or isinstance(attn_channels, bool) \
                or attn_channels < 1:
            raise ValueError(f'MscaleOCRHead: attn_channels must be a positive int, '
                             f'got {attn_channels!r}')
        super().__init__(**kwargs)
        conv = dict(
            kernel_size=3,
            padding=1,
            conv_cfg=self.conv_cfg,
            norm_cfg=self.norm_cfg,
            act_cfg=self.act_cfg)
        self.scale_attn = nn.Sequential(
            ConvModule(self.channels, attn_channels, **conv),
            ConvModule(attn_channels, attn_channels, **conv),
            nn.Conv2d(attn_channels, 1, kernel_size=1, bias=False), nn.Sigmoid())

    def object_context(self, inputs: List[Tensor], prev_output: Tensor) -> Tensor:
        """The OCR mid features: the stock ``OCRHead.forward`` up to ``cls_seg``."""
        x = self._transform_inputs(inputs)
        feats = self.bottleneck(x)
        context = self.spatial_gather_module(feats, prev_output)
        return self.object_context_block(feats, context)

    def forward(self, inputs: List[Tensor], prev_output: Tensor) -> Tensor:
        """The stock OCR head: class logits at feature resolution."""
        return self.cls_seg(self.object_context(inputs, prev_output))

    def forward_with_attn(self, inputs: List[Tensor], prev_output: Tensor) -> Tuple[Tensor, Tensor]:
        """Class logits (B, K, h, w) and scale attention (B, 1, h, w) in [0, 1], at feature
        resolution.

        Args:
            inputs: The backbone's feature maps.
            prev_output: The aux head's logits (``decode_head[0]``).
        """
        object_context = self.object_context(inputs, prev_output)
        return self.cls_seg(object_context), self.scale_attn(object_context)


@MODELS.register_module()
class MscaleCascadeEncoderDecoder(CascadeEncoderDecoder):
    """Cascade encoder-decoder with hierarchical multi-scale inference and training (`arXiv
    2005.10821 <https://arxiv.org/abs/2005.10821>`_), as the released ``MscaleOCR``.

    At each scale ``s`` the normalized batch is resized by ``s`` and run through the backbone
    and both heads; aux logits, class logits and attention are resized to that scale's input
    size (:meth:`scale_outputs`). :func:`hierarchical_combine` then joins the scales: at test
    over ``test_cfg.scales`` (class logits; no flip), in training over ``train_cfg.scales``
    (class logits for ``decode_head[1]``'s loss, aux logits with the same attention for
    ``decode_head[0]``'s loss, as the released ``two_scale_forward``). ``mode='slide'`` runs the
    multi-scale inference on each window. ``forward(mode='tensor')`` is the stock single-scale
    forward.

    Args:
        num_stages: Must be 2: ``decode_head[0]`` the aux head, ``decode_head[1]`` a
            :class:`MscaleOCRHead` (any head with ``forward_with_attn``).
        train_cfg: ``dict(scales=[0.5, 1.0], scale_loss_weight=0.0)``; ``scale_loss_weight``
            > 0 adds, per scale, ``decode_head[1]``'s loss on that scale's own logits times
            the weight (the released per-scale supervision, 0.05 in its recipe).
        test_cfg: ``dict(mode='whole' | 'slide', scales=[1.0], ...)``; ``scales`` must contain
            1.0, e.g. ``[0.5, 1.0, 2.0]`` as released; ``[1.0]`` is single-scale.
        strict_load: If True, loading a state dict whose keys or shapes differ from the
            model's raises :class:`CheckpointMismatchError` naming them (mmengine's Runner
            loads non-strict, and would otherwise test, e.g., a PSA_p checkpoint with random
            PSA_s blocks). For configs of converted checkpoints.
        **kwargs: The other arguments of ``CascadeEncoderDecoder``.
    """

    def __init__(self,
                 num_stages: int,
                 backbone: ConfigType,
                 decode_head: ConfigType,
                 neck: OptConfigType = None,
                 auxiliary_head: OptConfigType = None,
                 train_cfg: OptConfigType = None,
                 test_cfg: OptConfigType = None,
                 data_preprocessor: OptConfigType = None,
                 pretrained: Optional[str] = None,
                 init_cfg: OptMultiConfig = None,
                 strict_load: bool = False) -> None:
        name = type(self).__name__
        if num_stages != 2 or not isinstance(decode_head, (list, tuple)) \
                or len(decode_head) != 2:
            raise ValueError(f'{name}: num_stages must be 2 with decode_head a list of 2 heads '
                             f'(aux head, MscaleOCRHead), got num_stages={num_stages!r}')
        if auxiliary_head is not None:
            raise ValueError(f'{name}: auxiliary_head is not supported (decode_head[0] is the '
                             f'auxiliary head), got {auxiliary_head!r}')
        test_cfg = ConfigDict(dict(mode='whole', scales=[1.0]) if test_cfg is None else test_cfg)
        mode = test_cfg.get('mode', 'whole')
        if mode not in ('whole', 'slide'):
            raise ValueError(f"{name}: test_cfg.mode must be 'whole' or 'slide', got {mode!r}")
        check_scales(test_cfg.get('scales', [1.0]), 'test_cfg.scales')
        train_cfg = {} if train_cfg is None else train_cfg
        unknown = sorted(set(train_cfg) - set(TRAIN_CFG_KEYS))
        if unknown:
            raise ValueError(f'{name}: unknown train_cfg keys {unknown} (known: '
                             f'{list(TRAIN_CFG_KEYS)})')
        self.train_scales = check_scales(
            train_cfg.get('scales', list(DEFAULT_TRAIN_SCALES)), 'train_cfg.scales')
        self.scale_loss_weight = train_cfg.get('scale_loss_weight', 0.0)
        if not isinstance(self.scale_loss_weight, (int, float)) \
                or isinstance(self.scale_loss_weight, bool) or self.scale_loss_weight < 0:
            raise ValueError(f'{name}: train_cfg.scale_loss_weight must be a number >= 0, '
                             f'got {self.scale_loss_weight!r}')
        super().__init__(
            num_stages=num_stages,
            backbone=backbone,
            decode_head=decode_head,
            neck=neck,
            train_cfg=train_cfg,
            test_cfg=test_cfg,
            data_preprocessor=data_preprocessor,
            pretrained=pretrained,
            init_cfg=init_cfg)
        if not callable(getattr(self.decode_head[1], 'forward_with_attn', None)):
            raise ValueError(f'{name}: decode_head[1] must give a scale attention '
                             f'(MscaleOCRHead), got {type(self.decode_head[1]).__name__}')
        self.strict_load = strict_load
        if strict_load:
            compat.register_load_state_dict_pre_hook(self, self._check_state_dict)

    @property
    def test_scales(self) -> Tuple[float, ...]:
        """``test_cfg.scales``, read at each inference as mmseg reads ``test_cfg.mode``: a
        changed ``model.test_cfg`` (mmseg's apis, a notebook) is what runs."""
        return check_scales(self.test_cfg.get('scales', [1.0]), 'test_cfg.scales')

    def scale_outputs(self,
                      inputs: Tensor,
                      scale: float,
                      with_aux: bool = True) -> Dict[str, Tensor]:
        """The network on ``inputs`` resized by ``scale`` (the released ``_fwd``).

        Args:
            inputs: The normalized batch (B, 3, H, W).
            scale: Resize factor; the resized input is ``floor(H * scale)`` x
                ``floor(W * scale)``, as the released ``ResizeX``.
            with_aux: Also return the aux logits.

        Returns:
            ``{'cls': (B, K, h, w), 'aux': (B, K, h, w), 'attn': (B, 1, h, w)}`` at the resized
            input's size (h, w).
        """
        if scale != 1.0:
            inputs = F.interpolate(
                inputs,
                scale_factor=scale,
                mode='bilinear',
                align_corners=self.align_corners,
                recompute_scale_factor=True)
        size = inputs.shape[2:]
        x = self.extract_feat(inputs)
        aux = self.decode_head[0].forward(x)
        cls, attn = self.decode_head[1].forward_with_attn(x, aux)
        out = dict(cls=cls, attn=attn, aux=aux) if with_aux else dict(cls=cls, attn=attn)
        return {key: _resize(value, size, self.align_corners) for key, value in out.items()}

    def encode_decode(self, inputs: Tensor, batch_img_metas: List[dict]) -> Tensor:
        """Class logits at the input size, joined over ``test_cfg.scales``."""
        outputs = []
        for scale in sorted(self.test_scales, reverse=True):
            out = self.scale_outputs(inputs, scale, with_aux=False)
            outputs.append((scale, out['cls'], out['attn']))
        return hierarchical_combine(
            outputs, size=inputs.shape[2:], align_corners=self.align_corners)

    def inference(self, inputs: Tensor, batch_img_metas: List[dict]) -> Tensor:
        """Multi-scale logits (B, K, H, W) at the input size (mmseg's API); ``mode='slide'``
        runs :meth:`encode_decode` on each window."""
        if self.test_cfg.get('mode', 'whole') == 'slide':
            return self.slide_inference(inputs, batch_img_metas)
        return self.encode_decode(inputs, batch_img_metas)

    def loss(self, inputs: Tensor, data_samples: SampleList) -> dict:
        """Losses of the predictions joined over ``train_cfg.scales``.

        Args:
            inputs: The normalized batch.
            data_samples: With ``gt_sem_seg``.
        """
        outputs = {scale: self.scale_outputs(inputs, scale) for scale in self.train_scales}
        joint = {
            key:
            hierarchical_combine([(scale, out[key], out['attn']) for scale, out in outputs.items()],
                                 size=inputs.shape[2:],
                                 align_corners=self.align_corners)
            for key in ('aux', 'cls')
        }
        losses = add_prefix(self.decode_head[0].loss_by_feat(joint['aux'], data_samples),
                            'decode_0')
        losses.update(
            add_prefix(self.decode_head[1].loss_by_feat(joint['cls'], data_samples), 'decode_1'))
        if self.scale_loss_weight > 0:
            for scale, out in outputs.items():
                scale_losses = self.decode_head[1].loss_by_feat(out['cls'], data_samples)
                losses.update({
                    f'scale_{scale:g}x.{key}': value * self.scale_loss_weight
                    for key, value in scale_losses.items() if 'loss' in key
                })
        return losses

    def _check_state_dict(self, module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
        """Load pre-hook (``strict_load``): refuse a state dict that does not fit."""
        own = self.state_dict(keep_vars=True)
        given = {
            key[len(prefix):]: value
            for key, value in state_dict.items() if key.startswith(prefix)
        }
        diff = key_diff(given, own)
        if not diff:
            return
        from .released import psa_variant  # the key patterns of the two PSA variants
        found, wanted = psa_variant(given), psa_variant(own)
        lines = [
            f'the checkpoint does not fit the {type(self).__name__} of this config '
            f'(strict_load=True):'
        ]
        if found != wanted:
            lines.append(f'  its PSA blocks are {found or "absent"}, this config builds '
                         f'{wanted or "none"}: use the config of the checkpoint\'s variant')
        lines += diff.lines(limit=8)
        raise CheckpointMismatchError('\n'.join(lines))
