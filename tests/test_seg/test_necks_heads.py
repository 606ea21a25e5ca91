"""The PSA decode heads (stock when off, the block where documented) and the channel checks of
PSANeck and the heads against the backbone (``check_feature_channels``, which mmpsa's build
paths run, and the first forward), in mmseg's scope; PSANeck itself: tests/test_necks.py."""
import copy
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmseg.models.decode_heads import DepthwiseSeparableASPPHead, FCNHead, OCRHead
from mmseg.registry import MODELS

from mmpsa.layers import PolarizedSelfAttention
from mmpsa.necks import check_feature_channels
from mmpsa.seg.heads import PSAFCNHead, PSAOCRHead, PSASepASPPHead
from mmpsa.seg.necks import PSANeck

TINY = Path(__file__).resolve().parents[2] / 'configs' / 'mmseg' / 'tiny'
BN = dict(type='BN', requires_grad=True)
LEVELS = [8, 16, 24, 32]  # channels of four feature levels
SIZES = [16, 8, 4, 2]

# head name -> (stock class, PSA class, kwargs, channels the PSA sees)
HEADS = {
    'sep_aspp': (DepthwiseSeparableASPPHead, PSASepASPPHead,
                 dict(
                     in_channels=32,
                     in_index=3,
                     channels=16,
                     dilations=(1, 2),
                     c1_in_channels=8,
                     c1_channels=4,
                     num_classes=5,
                     norm_cfg=BN), 16),
    'fcn': (FCNHead, PSAFCNHead,
            dict(
                in_channels=LEVELS,
                in_index=(0, 1, 2, 3),
                channels=40,
                input_transform='resize_concat',
                kernel_size=1,
                num_convs=1,
                concat_input=False,
                num_classes=5,
                norm_cfg=BN), sum(LEVELS)),
    'ocr': (OCRHead, PSAOCRHead,
            dict(
                in_channels=LEVELS,
                in_index=(0, 1, 2, 3),
                channels=16,
                ocr_channels=8,
                input_transform='resize_concat',
                num_classes=5,
                norm_cfg=BN), 16),
}


def _features(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, s, s, generator=g) for c, s in zip(LEVELS, SIZES)]


def _run(head, feats):
    if isinstance(head, OCRHead):
        prev = torch.randn(feats[0].shape[0], 5, 16, 16, generator=torch.Generator().manual_seed(1))
        return head(feats, prev)
    return head(feats)


def _build(cls, kwargs, **extra):
    torch.manual_seed(0)
    return cls(**copy.deepcopy(kwargs), **extra).eval()


@pytest.mark.parametrize('name', HEADS)
def test_head_without_psa_is_the_stock_head(name):
    stock_cls, psa_cls, kwargs, _ = HEADS[name]
    stock, ours = _build(stock_cls, kwargs), _build(psa_cls, kwargs)
    assert list(ours.state_dict()) == list(stock.state_dict())
    ours.load_state_dict(stock.state_dict())
    feats = _features()
    assert torch.equal(_run(ours, feats), _run(stock, feats))


@pytest.mark.parametrize('mode', ['parallel', 'sequential'])
@pytest.mark.parametrize('name', HEADS)
def test_head_applies_psa_where_documented(name, mode):
    stock_cls, psa_cls, kwargs, channels = HEADS[name]
    stock = _build(stock_cls, kwargs)
    ours = _build(psa_cls, kwargs, psa=dict(mode=mode, variant='paper'))
    assert isinstance(ours.psa, PolarizedSelfAttention) and ours.psa.mode == mode
    missing, unexpected = ours.load_state_dict(stock.state_dict(), strict=False)
    assert missing and all(k.startswith('psa.') for k in missing) and not unexpected

    seen = []
    ours.psa.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    feats = _features()
    out, ref = _run(ours, feats), _run(stock, feats)
    assert seen and all(s[1] == channels for s in seen)  # the documented features
    assert out.shape == ref.shape
    assert not torch.allclose(out, ref)  # the block changes the result


@pytest.mark.parametrize('name', ['sep_aspp', 'ocr'])
def test_head_psa_hook_follows_deepcopy(name):
    _, psa_cls, kwargs, _ = HEADS[name]
    head = _build(psa_cls, kwargs, psa=dict(mode='parallel', variant='paper'))
    feats = _features()
    before = _run(head, feats)
    clone = copy.deepcopy(head)  # what mmengine's EMA does
    assert torch.equal(_run(clone, feats), before)
    with torch.no_grad():
        for p in clone.psa.parameters():
            p.mul_(-3.0).add_(0.5)
    assert not torch.allclose(_run(clone, feats), before)  # the copy runs its own block
    assert torch.equal(_run(head, feats), before)  # the original is untouched


@pytest.mark.parametrize('name', HEADS)
def test_gradients_reach_the_head_psa(name):
    _, psa_cls, kwargs, _ = HEADS[name]
    head = _build(psa_cls, kwargs, psa=dict(mode='sequential', variant='official')).train()
    _run(head, _features()).square().mean().backward()
    grads = [p.grad for p in head.psa.parameters()]
    assert grads and all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize('name', HEADS)
def test_head_bad_arguments_name_the_field(name):
    _, psa_cls, kwargs, _ = HEADS[name]
    with pytest.raises(ValueError, match=r"unknown psa key.*'stages'"):
        psa_cls(**kwargs, psa=dict(mode='parallel', stages=(True, )))
    missing = {k: v for k, v in kwargs.items() if k != 'in_channels'}
    with pytest.raises(ValueError, match='in_channels'):
        psa_cls(**missing)
    if isinstance(kwargs['in_channels'], list):
        with pytest.raises(ValueError, match='in_index'):
            psa_cls(**dict(kwargs, in_index=(0, 1)))


# ---- checks at model build time, against the backbone the segmentor builds beside them


def _tiny_model(config_name):
    return Config.fromfile(str(TINY / config_name)).model


HR = 'fcn_hr-tiny_1xb4-100iter_tiny-cityscapes-64x128.py'  # levels [8, 16, 32, 64]
DL = 'deeplabv3plus_r18-tiny-d8_1xb4-100iter_tiny-cityscapes-64x128.py'  # [16, 32, 64, 128]


def test_psa_neck_matching_the_backbone_builds_and_runs():
    model = _tiny_model(HR)
    model.neck = dict(type='PSANeck', in_channels=[8, 16, 32, 64])
    seg = MODELS.build(model).eval()
    out = seg(torch.randn(1, 3, 64, 128), mode='tensor')
    assert out.shape == (1, 19, 16, 32)


@pytest.mark.parametrize('in_channels, match', [
    ([8, 16, 32], 'in_channels has 3 levels but the backbone \\(HRNet\\) returns 4'),
    ([8, 16, 32, 64, 128], 'in_channels has 5 levels'),
    ([8, 16, 32, 48], r'in_channels does not match the backbone.*\[8, 16, 32, 64\]'),
])
def test_psa_neck_not_matching_the_backbone_fails_at_build(in_channels, match):
    model = _tiny_model(HR)
    model.neck = dict(type='PSANeck', in_channels=in_channels)
    with pytest.raises(ValueError, match=match):
        check_feature_channels(MODELS.build(model))


@pytest.mark.parametrize('change, match', [
    (dict(in_channels=64), r'PSASepASPPHead: in_channels does not match.*128 channels'),
    (dict(in_index=5), 'in_index=5 selects a level'),
    (dict(c1_in_channels=8), 'c1_in_channels does not match.*16 channels'),
])
def test_psa_head_not_matching_the_backbone_fails_at_build(change, match):
    """As mmpsa's build paths check it, and at the first forward of a plain build."""
    model = _tiny_model(DL)
    model.decode_head.update(type='PSASepASPPHead', psa=dict(mode='parallel'), **change)
    with pytest.raises(ValueError, match=match):
        check_feature_channels(MODELS.build(model))
    seg = MODELS.build(model).eval()
    with pytest.raises(ValueError, match=match):
        seg(torch.randn(1, 3, 64, 128), mode='tensor')


def test_psa_head_after_a_psa_neck_is_checked_against_the_neck():
    model = _tiny_model(HR)
    model.neck = dict(type='PSANeck', in_channels=[8, 16, 32, 64])
    model.decode_head.update(
        type='PSAFCNHead', psa=dict(mode='parallel'), in_channels=[8, 16, 32, 72])
    with pytest.raises(ValueError, match=r'in_channels does not match the neck.*\[8, 16, 32, 64\]'):
        check_feature_channels(MODELS.build(model))
    model.decode_head.in_channels = [8, 16, 32, 64]
    seg = MODELS.build(model).eval()
    assert isinstance(seg.neck, PSANeck) and isinstance(seg.decode_head.psa, PolarizedSelfAttention)
    assert seg(torch.randn(1, 3, 64, 128), mode='tensor').shape == (1, 19, 16, 32)


def test_unknown_psa_key_in_a_config_fails_at_build_naming_it():
    model = Config.fromfile(str(TINY / f'psa-p_{HR}')).model
    model.backbone.psa = dict(mode='parallel', variant='official', stage=(False, True, True, True))
    with pytest.raises(ValueError, match='stage'):
        MODELS.build(model)
    model = _tiny_model(DL)
    model.decode_head.update(type='PSASepASPPHead', psa=dict(mode='parallel', kind='x'))
    with pytest.raises(ValueError, match=r"unknown psa key.*'kind'"):
        MODELS.build(model)


def test_psa_ocr_cascade_head_not_matching_the_backbone_fails_at_build():
    """OCRNet's CascadeEncoderDecoder appends its heads to a list: each is checked."""
    model = _tiny_model(HR)
    head = dict(
        in_index=(0, 1, 2, 3),
        input_transform='resize_concat',
        num_classes=19,
        norm_cfg=BN,
        align_corners=False)
    model.update(type='CascadeEncoderDecoder', num_stages=2)
    model.decode_head = [
        dict(
            type='FCNHead',
            in_channels=[8, 16, 32, 64],
            channels=120,
            kernel_size=1,
            num_convs=1,
            concat_input=False,
            **head),
        dict(
            type='PSAOCRHead',
            in_channels=[8, 16, 32, 72],
            channels=16,
            ocr_channels=8,
            psa=dict(mode='parallel'),
            **head),
    ]
    with pytest.raises(ValueError, match=r'PSAOCRHead: in_channels does not match the backbone'):
        check_feature_channels(MODELS.build(model))
    model.decode_head[1].in_channels = [8, 16, 32, 64]
    seg = MODELS.build(model).eval()
    assert seg(torch.randn(1, 3, 64, 128), mode='tensor').shape == (1, 19, 16, 32)
