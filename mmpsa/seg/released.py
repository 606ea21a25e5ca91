"""The released PSA Cityscapes checkpoints (DeLightCMU/PSA, ``ocrnet.HRNet_Mscale``) as mmseg
checkpoints of :class:`~mmpsa.seg.mscale_ocr.MscaleCascadeEncoderDecoder`.

A released checkpoint holds ``state_dict`` (keys ``module.backbone.*``, ``module.ocr.*``,
``module.scale_attn.*``) beside ``epoch``, ``arch``, ``optimizer``, ``mean_iu`` and
``command``. :func:`map_released_state_dict` renames every key (the rules are
:data:`KEY_RULES`, read off the released ``hrnetv2.py``, ``ocrnet.py``, ``ocr_utils.py`` and
``utils.make_attn_head``):

* backbone: mmseg's HRNet has the released HRNetV2's names; ``deattn`` becomes ``psa``;
* ``ocr.aux_head`` -> ``decode_head.0`` (mmseg's FCNHead), ``ocr.*`` -> ``decode_head.1``
  (mmseg's OCRHead), ``scale_attn`` -> ``decode_head.1.scale_attn``.

The released aux-head 1x1 conv and OCR 3x3 conv have a bias, where mmseg's ConvModule before
a BN has none. Each is folded into the BN that follows: BN(conv(x) + b) with running mean m
equals BN'(conv(x)) with running mean m - b (exact in eval; in training BN subtracts the
batch mean, which absorbs b). So the converted model is the stock mmseg architecture.

:func:`convert_released_checkpoint` reads with ``weights_only=True`` (mmpsa's allow-list),
loads the result strictly into the model of the matching config and only then writes the
mmseg checkpoint (write, then rename).
"""
import os.path as osp
import re
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from mmengine.config import Config
from mmseg.datasets import CityscapesDataset

from ..checkpoint import build_model_cfg, read_checkpoint, save_checkpoint_atomically
from ..utils.paths import configs_root

#: The released README's download pages (share pages, not files), by variant.
RELEASED_WEIGHTS = {
    'psa_p': 'https://cmu.box.com/s/if90kw6r66q2y6c5xparflhnbwi6c2yi',
    'psa_s': 'https://cmu.box.com/s/uyzzfmkx8p2ipcznpzdtf14ng63s65sq',
}
#: The config of each variant, under the configs root.
CONFIGS = {
    'psa_p': 'mmseg/psa_mscale_ocrnet/psa-p_mscale-ocrnet_hr48_official_cityscapes-1024x2048.py',
    'psa_s': 'mmseg/psa_mscale_ocrnet/psa-s_mscale-ocrnet_hr48_official_cityscapes-1024x2048.py',
}
VARIANT_NAMES = {'psa_p': 'PSA_p (parallel)', 'psa_s': 'PSA_s (sequential)'}

_OCB = r'ocr\.ocr_distri_head\.object_context_block\.'
_OCB_MM = 'decode_head.1.object_context_block.'


def _conv_bn(released: str, mmseg: str) -> List[Tuple[str, str]]:
    """Rules for a released ``Sequential(conv, BNReLU)`` (``.0`` conv, ``.1.0`` BN) as an mmcv
    ConvModule (``.conv``, ``.bn``)."""
    return [(released + r'\.0\.weight', mmseg + '.conv.weight'),
            (released + r'\.1\.0\.(\w+)', mmseg + r'.bn.\1')]


#: ``(released key regex, mmseg key template)``, tried in order; ``re.fullmatch`` on keys
#: without ``module.``.
KEY_RULES: List[Tuple[str, str]] = [
    (r'backbone\.(.+)\.deattn\.(.+)', r'backbone.\1.psa.\2'),
    (r'backbone\.((?:conv[12]|bn[12])\.\w+)', r'backbone.\1'),
    (r'backbone\.((?:layer1|transition[1-3]|stage[2-4])\..+)', r'backbone.\1'),
    # OCR_block.aux_head: conv1x1 (bias, folded) + BNReLU + conv1x1 -> FCNHead
    (r'ocr\.aux_head\.0\.weight', 'decode_head.0.convs.0.conv.weight'),
    (r'ocr\.aux_head\.1\.0\.(\w+)', r'decode_head.0.convs.0.bn.\1'),
    (r'ocr\.aux_head\.2\.(weight|bias)', r'decode_head.0.conv_seg.\1'),
    # OCR_block.conv3x3_ocr (bias, folded) -> OCRHead.bottleneck
    (r'ocr\.conv3x3_ocr\.0\.weight', 'decode_head.1.bottleneck.conv.weight'),
    (r'ocr\.conv3x3_ocr\.1\.0\.(\w+)', r'decode_head.1.bottleneck.bn.\1'),
    # ObjectAttentionBlock: f_pixel/f_object (2 x conv+BNReLU) -> query/key_project,
    # f_down/f_up -> value/out_project, conv_bn_dropout -> the block's bottleneck
    (_OCB + r'f_pixel\.0\.weight', _OCB_MM + 'query_project.0.conv.weight'),
    (_OCB + r'f_pixel\.1\.0\.(\w+)', _OCB_MM + r'query_project.0.bn.\1'),
    (_OCB + r'f_pixel\.2\.weight', _OCB_MM + 'query_project.1.conv.weight'),
    (_OCB + r'f_pixel\.3\.0\.(\w+)', _OCB_MM + r'query_project.1.bn.\1'),
    (_OCB + r'f_object\.0\.weight', _OCB_MM + 'key_project.0.conv.weight'),
    (_OCB + r'f_object\.1\.0\.(\w+)', _OCB_MM + r'key_project.0.bn.\1'),
    (_OCB + r'f_object\.2\.weight', _OCB_MM + 'key_project.1.conv.weight'),
    (_OCB + r'f_object\.3\.0\.(\w+)', _OCB_MM + r'key_project.1.bn.\1'),
    *_conv_bn(_OCB + 'f_down', _OCB_MM + 'value_project'),
    *_conv_bn(_OCB + 'f_up', _OCB_MM + 'out_project'),
    *_conv_bn(r'ocr\.ocr_distri_head\.conv_bn_dropout', _OCB_MM + 'bottleneck'),
    (r'ocr\.cls_head\.(weight|bias)', r'decode_head.1.conv_seg.\1'),
    # make_attn_head: conv0/bn0, conv1/bn1 (3x3, no bias), conv2 (1x1, no bias)
    (r'scale_attn\.conv([01])\.weight', r'decode_head.1.scale_attn.\1.conv.weight'),
    (r'scale_attn\.bn([01])\.(\w+)', r'decode_head.1.scale_attn.\1.bn.\2'),
    (r'scale_attn\.conv2\.weight', 'decode_head.1.scale_attn.2.weight'),
]
_COMPILED = [(re.compile(pattern), template) for pattern, template in KEY_RULES]
#: Released conv biases folded into the running mean of the mmseg BN after the conv.
FOLDED_BIASES = {
    'ocr.aux_head.0.bias': 'decode_head.0.convs.0.bn',
    'ocr.conv3x3_ocr.0.bias': 'decode_head.1.bottleneck.bn',
}


class ConversionError(ValueError):
    """A checkpoint that cannot be converted, or does not fit the config; nothing written."""


def psa_variant(keys: Iterable[str]) -> Optional[str]:
    """Which official PSA the keys of a released (``deattn``) or mmseg (``psa``) state dict
    hold.

    Args:
        keys: State-dict keys.

    Returns:
        ``'psa_p'`` (``...conv_up.weight``), ``'psa_s'`` (``...conv_up.0.weight``),
        ``'mixed'`` (both), ``'other'`` (PSA blocks of another form, e.g. the paper variant)
        or None (no PSA block).
    """
    keys = list(keys)
    block = re.compile(r'(?:^|\.)(?:deattn|psa)\.')
    parallel = any(re.search(r'(?:^|\.)(?:deattn|psa)\.conv_up\.weight$', k) for k in keys)
    sequential = any(re.search(r'(?:^|\.)(?:deattn|psa)\.conv_up\.0\.weight$', k) for k in keys)
    if parallel and sequential:
        return 'mixed'
    if parallel or sequential:
        return 'psa_p' if parallel else 'psa_s'
    return 'other' if any(block.search(k) for k in keys) else None


def _strip_module(key: str) -> str:
    return key[len('module.'):] if key.startswith('module.') else key


def map_released_state_dict(
        state_dict: Dict[str, torch.Tensor]) -> Tuple['OrderedDict[str, torch.Tensor]', dict]:
    """Rename a released ``HRNet_Mscale`` state dict to mmseg's keys, folding the two conv
    biases into their BNs.

    Args:
        state_dict: The released ``state_dict`` (keys with or without ``module.``).

    Returns:
        The mmseg state dict and an info dict: ``variant`` (see :func:`psa_variant`),
        ``scale_attn`` (whether the released ``scale_attn`` is there), ``folded_biases``
        (the released keys folded), ``num_keys``.

    Raises:
        ConversionError: Naming the keys no rule maps, a non-tensor value, or a folded bias
            without its BN.
    """
    mapped: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
    biases, unmapped, not_tensors = {}, [], []
    for raw_key, value in state_dict.items():
        key = _strip_module(raw_key)
        if not isinstance(value, torch.Tensor):
            not_tensors.append(raw_key)
            continue
        if key in FOLDED_BIASES:
            biases[key] = value
            continue
        for pattern, template in _COMPILED:
            match = pattern.fullmatch(key)
            if match:
                mapped[match.expand(template)] = value
                break
        else:
            unmapped.append(raw_key)
    if not_tensors:
        raise ConversionError(f'not a state dict: {len(not_tensors)} values are not tensors '
                              f'({_listing(not_tensors)})')
    if unmapped:
        raise ConversionError(f'{len(unmapped)} keys of the released state dict match no rule '
                              f'(not a released HRNet_Mscale checkpoint?): {_listing(unmapped)}')
    for released_key, bias in biases.items():
        mean_key = FOLDED_BIASES[released_key] + '.running_mean'
        if mean_key not in mapped or mapped[mean_key].shape != bias.shape:
            raise ConversionError(f'{released_key} {tuple(bias.shape)} cannot be folded: its BN '
                                  f'running_mean ({mean_key}) is missing or of another shape')
        mapped[mean_key] = mapped[mean_key] - bias  # BN(conv + b; mean) = BN(conv; mean - b)
    info = dict(
        variant=psa_variant(mapped),
        num_keys=len(mapped),
        scale_attn=any(k.startswith('decode_head.1.scale_attn.') for k in mapped),
        folded_biases=sorted(biases))
    return mapped, info


def _listing(keys: List[str], limit: int = 10) -> str:
    """The first ``limit`` keys, comma separated, and how many there are in all."""
    shown = ', '.join(keys[:limit])
    return shown + (f', ... ({len(keys)} in all)' if len(keys) > limit else '')


def released_state_dict(checkpoint) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """The state dict inside a released checkpoint (``{'state_dict': ..., 'optimizer': ...}``
    or a bare state dict), and the other top-level keys it ignores."""
    if not isinstance(checkpoint, dict):
        raise ConversionError(f'expected a dict (a checkpoint or a state dict), got '
                              f'{type(checkpoint).__name__}')
    inner = checkpoint.get('state_dict')
    if isinstance(inner, dict):
        return inner, sorted(k for k in checkpoint if k != 'state_dict')
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint, []
    raise ConversionError(f'no state_dict in the checkpoint (top-level keys: '
                          f'{_listing(sorted(map(str, checkpoint)))})')


def default_config(variant: str) -> str:
    """The mmpsa config of a variant (``'psa_p'`` or ``'psa_s'``)."""
    return str(configs_root() / CONFIGS[variant])


def build_model_of(config: str) -> torch.nn.Module:
    """The model of an mmseg config, on the meta device (keys and shapes, no memory)."""
    cfg = Config.fromfile(config)
    cfg.setdefault('default_scope', 'mmseg')
    cfg.model.pretrained = None
    return build_model_cfg(cfg, device='meta')


def convert_released_checkpoint(src: str, dst: str, config: Optional[str] = None) -> dict:
    """Convert a released PSA Cityscapes checkpoint to an mmseg checkpoint.

    Args:
        src: The released ``.pth``.
        dst: Where the mmseg checkpoint goes (written only if everything fits).
        config: The mmseg config to check against; default: mmpsa's official config of the
            variant found.

    Returns:
        Info: ``variant``, ``scale_attn``, ``config``, ``folded_biases``, ``ignored`` (the
        checkpoint's other top-level keys), ``num_keys``, ``dst``.

    Raises:
        CheckpointReadError: SRC missing, truncated, corrupt, or holding objects that
            ``weights_only`` loading refuses.
        ConversionError: Not a released PSA checkpoint, or not fitting the config (the keys
            are named).
    """
    state_dict, ignored = released_state_dict(read_checkpoint(src))
    found = psa_variant(_strip_module(k) for k in state_dict)
    if found not in VARIANT_NAMES:
        raise ConversionError(
            f'{src}: no official PSA_p/PSA_s blocks (backbone ...deattn.conv_up...) found '
            f'({found or "no deattn keys"}): not a released PSA checkpoint')
    mapped, info = map_released_state_dict(state_dict)
    if not info['scale_attn']:
        raise ConversionError(f'{src}: no scale_attn keys: not a HRNet_Mscale (MscaleOCR) '
                              'checkpoint, which the mmpsa configs describe')
    config = str(config) if config is not None else default_config(found)
    model = build_model_of(config)
    wanted = psa_variant(model.state_dict())
    if wanted != found:
        raise ConversionError(f'{src} holds {VARIANT_NAMES[found]} blocks, but {config} builds '
                              f'{VARIANT_NAMES.get(wanted, wanted or "no PSA")} blocks: use '
                              f'--config {default_config(found)}')
    try:  # on the meta device: ``assign`` hands over the tensors, checking keys and shapes
        model.load_state_dict(mapped, strict=True, assign=True)
    except (RuntimeError, ValueError) as err:
        raise ConversionError(f'{src} does not fit the model of {config}:\n{err}') from err
    checkpoint = dict(
        meta=dict(
            dataset_meta=dict(
                classes=CityscapesDataset.METAINFO['classes'],
                palette=CityscapesDataset.METAINFO['palette']),
            converted_from=dict(
                file=osp.basename(src),
                psa=found,
                weights=RELEASED_WEIGHTS[found],
                folded_biases=info['folded_biases'])),
        state_dict=mapped)
    save_checkpoint_atomically(checkpoint, dst)
    info.update(config=config, ignored=ignored, dst=str(dst))
    return info
