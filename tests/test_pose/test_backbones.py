"""mmpose PSA backbones: PSAResNet, PSAResNetV1d, PSAHRNet (and init across libraries)."""
import copy

import pytest
import torch
from mmpose.models.backbones import HRNet, ResNet, ResNetV1d
from mmpose.registry import MODELS

from mmpsa.layers import PolarizedSelfAttention
from mmpsa.pose.backbones import PSAHRNet, PSAResNet, PSAResNetV1d

#: mmpose's HRNet-W48 (the top-down 256x192 pose backbone).
HRNET_W48_EXTRA = dict(
    stage1=dict(
        num_modules=1, num_branches=1, block='BOTTLENECK', num_blocks=(4, ), num_channels=(64, )),
    stage2=dict(
        num_modules=1, num_branches=2, block='BASIC', num_blocks=(4, 4), num_channels=(48, 96)),
    stage3=dict(
        num_modules=4,
        num_branches=3,
        block='BASIC',
        num_blocks=(4, 4, 4),
        num_channels=(48, 96, 192)),
    stage4=dict(
        num_modules=3,
        num_branches=4,
        block='BASIC',
        num_blocks=(4, 4, 4, 4),
        num_channels=(48, 96, 192, 384)))

#: A narrow HRNet: 2 Bottlenecks in stage 1, one BasicBlock per branch after (2+2+3+4).
NARROW = dict(
    stage1=dict(
        num_modules=1, num_branches=1, block='BOTTLENECK', num_blocks=(2, ), num_channels=(8, )),
    stage2=dict(
        num_modules=1, num_branches=2, block='BASIC', num_blocks=(1, 1), num_channels=(8, 16)),
    stage3=dict(
        num_modules=1,
        num_branches=3,
        block='BASIC',
        num_blocks=(1, 1, 1),
        num_channels=(8, 16, 32)),
    stage4=dict(
        num_modules=1,
        num_branches=4,
        block='BASIC',
        num_blocks=(1, 1, 1, 1),
        num_channels=(8, 16, 32, 64)))

#: A narrow ResNet-18 (widths 16..128).
R18 = dict(depth=18, stem_channels=16, base_channels=16)

#: (PSA class, stock class, small kwargs)
CASES = [
    (PSAResNet, ResNet, R18),
    (PSAResNetV1d, ResNetV1d, dict(depth=50, base_channels=16, stem_channels=16)),
    (PSAHRNet, HRNet, dict(extra=NARROW)),
]
IDS = [c[0].__name__ for c in CASES]


def _psas(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, PolarizedSelfAttention)}


def _x(h=64, w=64):  # mmpose's HRNet needs sides divisible by 32
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1))


def _params(model):
    return sum(p.numel() for p in model.parameters())


def test_hrnet_w48_paper_counts_and_params(psa_block_params, psa_input_channels):
    stock = HRNet(extra=HRNET_W48_EXTRA)
    model = PSAHRNet(extra=HRNET_W48_EXTRA, psa=dict(mode='parallel', variant='paper'))
    psas = _psas(model)
    assert len([n for n in psas if n.startswith('layer1.')]) == 4
    assert len([n for n in psas if n.startswith('stage')]) == 104
    assert 'stage2.0.branches.0.0.psa.ch_wv.weight' in model.state_dict()
    # the PSA inputs, from the architecture: stage 1's Bottlenecks (conv3 takes
    # num_channels), then each BasicBlock of each module and branch of stages 2-4
    stage1 = HRNET_W48_EXTRA['stage1']
    channels = list(stage1['num_channels']) * stage1['num_blocks'][0]
    for stage in ('stage2', 'stage3', 'stage4'):
        spec = HRNET_W48_EXTRA[stage]
        for blocks, c in zip(spec['num_blocks'], spec['num_channels']):
            channels += [c] * (blocks * spec['num_modules'])
    assert sorted(channels) == sorted(psa_input_channels(stock))
    assert sum(psa_block_params(c, 'parallel', 'paper') for c in channels) == 6_455_148
    assert _params(model) - _params(stock) == 6_455_148


@pytest.mark.parametrize('mode, variant', [('parallel', 'paper'), ('sequential', 'paper'),
                                           ('parallel', 'official'), ('sequential', 'official')])
@pytest.mark.parametrize('psa_cls, stock_cls, kwargs', CASES, ids=IDS)
def test_params_increase_is_exactly_the_blocks(psa_cls, stock_cls, kwargs, mode, variant,
                                               psa_block_params, psa_input_channels):
    stock = stock_cls(**kwargs)
    model = psa_cls(psa=dict(mode=mode, variant=variant), **kwargs)
    expected = sum(psa_block_params(c, mode, variant) for c in psa_input_channels(stock))
    assert _params(model) - _params(stock) == expected


@pytest.mark.parametrize('depth, count', [(50, 16), (18, 8)])
def test_resnet_counts_and_keys(depth, count):
    model = PSAResNet(depth=depth, psa=dict())
    psas = _psas(model)
    assert len(psas) == count
    assert 'layer1.0.psa.ch_wv.weight' in model.state_dict()
    assert psas['layer1.0.psa'].in_channels == 64
    assert psas['layer4.1.psa'].in_channels == 512


@pytest.mark.parametrize('psa_cls, stock_cls, kwargs', CASES, ids=IDS)
def test_psa_none_is_stock(psa_cls, stock_cls, kwargs):
    torch.manual_seed(0)
    stock = stock_cls(**kwargs)
    stock.init_weights()
    torch.manual_seed(0)
    model = psa_cls(**kwargs)
    model.init_weights()
    a, b = stock.state_dict(), model.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    stock.eval(), model.eval()
    with torch.no_grad():
        for u, v in zip(stock(_x()), model(_x())):
            assert torch.equal(u, v)


@pytest.mark.parametrize('psa_cls, stock_cls, kwargs', CASES, ids=IDS)
def test_stock_state_dict_loads(psa_cls, stock_cls, kwargs):
    stock = stock_cls(**kwargs)
    model = psa_cls(psa=dict(), **kwargs)
    result = model.load_state_dict(stock.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all('.psa.' in k for k in result.missing_keys)
    assert len(result.missing_keys) == len([k for k in model.state_dict() if '.psa.' in k])
    ours = model.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in stock.state_dict().items())


def test_init_psa_after_normal_init_and_same_under_mmseg():
    from mmseg.models.backbones import HRNet as SegHRNet

    import mmpsa.seg.backbones as seg
    pose_model = PSAHRNet(extra=NARROW, psa=dict())
    seg_model = seg.PSAHRNet(extra=NARROW, psa=dict())
    torch.manual_seed(3)
    pose_model.init_weights()  # init_cfg: Normal(std=0.001) on every Conv2d
    torch.manual_seed(3)
    seg_model.init_weights()  # init_cfg: Kaiming on every Conv2d
    assert pose_model.stage2[0].branches[0][0].conv1.weight.std() < 0.002
    pose_psas, seg_psas = _psas(pose_model), _psas(seg_model)
    assert list(pose_psas) == list(seg_psas) and len(pose_psas) == 11
    for name, psa in pose_psas.items():
        # PyTorch's conv default, not Normal(0.001): std ~ 1/sqrt(3 fan_in) >= 0.07
        assert psa.ch_wv.weight.std() > 0.03, name
        theirs = seg_psas[name].state_dict()
        for key, value in psa.state_dict().items():
            assert torch.equal(value, theirs[key]), f'{name}.{key}'
    assert isinstance(seg_model, SegHRNet)


def test_pretrained_checkpoint_keeps_psa_weights(tmp_path):
    stock = HRNet(extra=NARROW)
    stock.init_weights()
    ckpt = tmp_path / 'stock.pth'
    torch.save(stock.state_dict(), ckpt)
    model = PSAHRNet(
        extra=NARROW, psa=dict(), init_cfg=dict(type='Pretrained', checkpoint=str(ckpt)))
    model.init_weights()
    ours = model.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in stock.state_dict().items())
    for p in _psas(model).values():
        torch.nn.init.constant_(p.sp_wq.weight, -0.5)
    ckpt_psa = tmp_path / 'psa.pth'
    torch.save(model.state_dict(), ckpt_psa)
    again = PSAHRNet(
        extra=NARROW,
        psa=dict(),
        init_cfg=[
            dict(type='Normal', std=0.001, layer=['Conv2d']),
            dict(type='Pretrained', checkpoint=str(ckpt_psa))
        ])
    again.init_weights()
    assert all((p.sp_wq.weight == -0.5).all() for p in _psas(again).values())
    assert torch.equal(again.conv1.weight, stock.conv1.weight)


def test_frozen_stages_keep_psa_trainable():
    model = PSAHRNet(extra=NARROW, frozen_stages=1, psa=dict())
    for mode in (True, False, True):
        model.train(mode)
        psa_params = {id(p) for m in _psas(model.layer1).values() for p in m.parameters()}
        assert psa_params
        for p in model.layer1.parameters():
            assert p.requires_grad == (id(p) in psa_params)
        assert all(m.training == mode for m in _psas(model).values())
        assert not model.layer1[0].norm1.training
        assert all(p.requires_grad for p in model.stage2.parameters())


def test_deepcopy_and_with_cp():
    torch.manual_seed(0)
    model = PSAHRNet(extra=NARROW, psa=dict(), with_cp=True)
    twin = copy.deepcopy(model)
    model.eval(), twin.eval()
    with torch.no_grad():
        assert torch.equal(twin(_x())[0], model(_x())[0])
    for m in twin.modules():  # the twin runs without checkpointing
        if hasattr(m, 'with_cp'):
            m.with_cp = False
    grads = []
    for m in (model, twin):
        m.train()
        sum(o.square().mean() for o in m(_x())).backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if '.psa.' in n})
    assert all(g is not None for g in grads[0].values())
    assert grads[0]['stage4.0.branches.3.0.psa.sp_wv.weight'].abs().sum() > 0
    for name, g in grads[1].items():
        torch.testing.assert_close(grads[0][name], g)
    model.eval(), twin.eval()
    with torch.no_grad():
        ref, twin_ref = model(_x())[0], twin(_x())[0]
        # changes the copy only (a ch_wz shift would cancel in the LayerNorm)
        twin.layer1[1].psa.sp_wv.bias.add_(1.0)
        assert not torch.allclose(twin(_x())[0], twin_ref)
        assert torch.equal(model(_x())[0], ref)


def test_registry_builds_by_name():
    for name, cls in [('PSAResNet', PSAResNet), ('PSAResNetV1d', PSAResNetV1d)]:
        model = MODELS.build(dict(type=name, psa=dict(variant='official'), **R18))
        assert type(model) is cls and len(_psas(model)) == 8
    model = MODELS.build(dict(type='PSAHRNet', extra=NARROW, psa=dict()))
    assert type(model) is PSAHRNet and isinstance(model, HRNet)


@pytest.mark.parametrize('psa, match', [
    (dict(position='after_conv2'), "unknown psa key 'position'"),
    (dict(stages=(True, ) * 5), r'one bool per stage \(4\)'),
    (dict(stages=(True, 'yes', True, True)), "entries must be bool, got 'yes'"),
    (dict(mode='parralel'), "mode must be one of .*got 'parralel'"),
])
def test_bad_config(psa, match):
    with pytest.raises(ValueError, match=match):
        MODELS.build(dict(type='PSAResNet', psa=psa, **R18))
    with pytest.raises(ValueError, match=match):
        MODELS.build(dict(type='PSAHRNet', extra=NARROW, psa=psa))


def test_psa_must_be_a_dict():
    with pytest.raises(ValueError, match="psa must be a dict or None, got 'parallel'"):
        PSAHRNet(extra=NARROW, psa='parallel')
