"""mmseg PSA backbones: PSAResNet, PSAResNetV1c, PSAResNetV1d, PSAHRNet."""
import copy

import pytest
import torch
from mmseg.models.backbones import HRNet, ResNet, ResNetV1c, ResNetV1d
from mmseg.registry import MODELS

from mmpsa.layers import PolarizedSelfAttention
from mmpsa.seg.backbones import PSAHRNet, PSAResNet, PSAResNetV1c, PSAResNetV1d

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
    (PSAResNetV1c, ResNetV1c, R18),
    (PSAResNetV1d, ResNetV1d, dict(depth=50, base_channels=16, stem_channels=16)),
    (PSAHRNet, HRNet, dict(extra=NARROW)),
]
IDS = [c[0].__name__ for c in CASES]


def _psas(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, PolarizedSelfAttention)}


def _x(h=64, w=64):
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize('depth, count', [(50, 16), (18, 8)])
def test_resnet_counts_and_keys(depth, count):
    model = PSAResNetV1c(depth=depth, psa=dict())
    psas = _psas(model)
    assert len(psas) == count
    assert 'layer1.0.psa.ch_wv.weight' in model.state_dict()
    for name, psa in psas.items():
        block = model.get_submodule(name[:-len('.psa')])
        nxt = block.conv3 if depth == 50 else block.conv2
        assert psa.in_channels == nxt.in_channels
    assert psas['layer1.0.psa'].in_channels == 64
    assert psas['layer4.1.psa'].in_channels == 512


def test_hrnet_counts_keys_and_stages():
    psas = _psas(PSAHRNet(extra=NARROW, psa=dict(mode='sequential', variant='official')))
    assert len(psas) == 2 + 2 + 3 + 4
    assert 'stage2.0.branches.0.0.psa' in psas and 'layer1.1.psa' in psas
    assert psas['stage4.0.branches.3.0.psa'].in_channels == 64
    assert psas['layer1.0.psa'].in_channels == 8  # the Bottleneck's conv3 input
    released = PSAHRNet(extra=NARROW, psa=dict(stages=(False, True, True, True)))
    assert sorted(_psas(released)) == sorted(n for n in psas if not n.startswith('layer1'))
    model = PSAHRNet(extra=NARROW, psa=dict())
    assert 'stage2.0.branches.0.0.psa.ch_wv.weight' in model.state_dict()
    assert not hasattr(model, 'psa')  # the root conv1/conv2 are not blocks


def _params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize('mode, variant', [('parallel', 'paper'), ('sequential', 'paper'),
                                           ('parallel', 'official'), ('sequential', 'official')])
@pytest.mark.parametrize('psa_cls, stock_cls, kwargs', CASES, ids=IDS)
def test_params_increase_is_exactly_the_blocks(psa_cls, stock_cls, kwargs, mode, variant,
                                               psa_block_params, psa_input_channels):
    stock = stock_cls(**kwargs)
    model = psa_cls(psa=dict(mode=mode, variant=variant), **kwargs)
    expected = sum(psa_block_params(c, mode, variant) for c in psa_input_channels(stock))
    assert _params(model) - _params(stock) == expected


def test_released_placement_params(psa_block_params, psa_input_channels):
    stock = HRNet(extra=NARROW)
    psa = dict(stages=(False, True, True, True), mode='sequential', variant='official')
    model = PSAHRNet(extra=NARROW, psa=psa)
    channels = [
        c for stage in (stock.stage2, stock.stage3, stock.stage4) for c in psa_input_channels(stage)
    ]
    assert channels == [8, 16, 8, 16, 32, 8, 16, 32, 64]
    expected = sum(psa_block_params(c, 'sequential', 'official') for c in channels)
    assert _params(model) - _params(stock) == expected


def test_resnet_stages_follow_num_stages():
    model = PSAResNet(
        **R18,
        num_stages=3,
        strides=(1, 2, 2),
        dilations=(1, 1, 1),
        out_indices=(0, 1, 2),
        psa=dict(stages=(False, False, True)))
    assert sorted(_psas(model)) == ['layer3.0.psa', 'layer3.1.psa']


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


def test_init_after_backbone_and_pretrained(tmp_path):
    stock = ResNetV1c(**R18)
    stock.init_weights()
    ckpt = tmp_path / 'stock.pth'
    torch.save(stock.state_dict(), ckpt)
    model = PSAResNetV1c(pretrained=str(ckpt), psa=dict(), **R18)
    model.init_weights()
    ours = model.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in stock.state_dict().items())
    # the PSAs got their own init (PyTorch's conv default: |w| <= 1/sqrt(fan_in))
    w = model.layer1[0].psa.ch_wv.weight
    assert 0 < w.abs().max() <= 1 / 16**0.5 and w.std() > 0.1
    # a PSA checkpoint keeps its psa weights through init_weights
    for p in _psas(model).values():
        torch.nn.init.constant_(p.ch_wz.weight, 0.25)
    ckpt_psa = tmp_path / 'psa.pth'
    torch.save(model.state_dict(), ckpt_psa)
    again = PSAResNetV1c(pretrained=str(ckpt_psa), psa=dict(), **R18)
    again.init_weights()
    assert (again.layer4[1].psa.ch_wz.weight == 0.25).all()


@pytest.mark.parametrize('cls, kwargs, frozen, free', [
    (PSAResNet, R18, 'layer2', 'layer3'),
    (PSAHRNet, dict(extra=NARROW), 'stage2', 'stage3'),
])
def test_frozen_stages_keep_psa_trainable(cls, kwargs, frozen, free):
    model = cls(frozen_stages=2, psa=dict(), **kwargs)
    model.train()
    stage = getattr(model, frozen)
    psa_params = {id(p) for m in _psas(stage).values() for p in m.parameters()}
    assert psa_params
    for p in stage.parameters():
        assert p.requires_grad == (id(p) in psa_params)
    assert all(m.training for m in _psas(stage).values())
    bns = [m for m in stage.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert all(p.requires_grad for p in getattr(model, free).parameters())


def test_deepcopy_follows_the_copy():
    torch.manual_seed(0)
    model = PSAHRNet(extra=NARROW, psa=dict())
    model.eval()  # the stock train() returns None, so no chaining
    with torch.no_grad():
        ref = model(_x())[0]
        twin = copy.deepcopy(model)
        assert torch.equal(twin(_x())[0], ref)
        twin.stage3[0].branches[1][0].psa.ch_wz.weight.mul_(2)
        assert not torch.allclose(twin(_x())[0], ref)
        assert torch.equal(model(_x())[0], ref)


def test_with_cp_gives_psa_gradients():
    grads = []
    for with_cp in (False, True):
        torch.manual_seed(0)
        model = PSAResNetV1c(with_cp=with_cp, psa=dict(), **R18)
        sum(o.square().mean() for o in model(_x())).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if '.psa.' in n})
    assert all(g is not None for g in grads[1].values())
    assert grads[1]['layer2.1.psa.sp_wv.weight'].abs().sum() > 0
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g)


def test_jit_trace():
    torch.manual_seed(0)
    stock = ResNetV1c(**R18)
    stock.eval()
    model = PSAResNetV1c(psa=dict(mode='sequential', variant='official'), **R18)
    model.eval()
    model.load_state_dict(stock.state_dict(), strict=False)
    with torch.no_grad(), torch.jit.optimized_execution(False):
        traced = torch.jit.trace(model, _x(32, 32), check_trace=False)
        x = _x(64, 96)
        for t, e, s in zip(traced(x), model(x), stock(x)):
            torch.testing.assert_close(t, e)
        assert not torch.allclose(t, s)  # the traced graph holds the PSAs


def test_registry_builds_by_name():
    for name, cls in [('PSAResNet', PSAResNet), ('PSAResNetV1c', PSAResNetV1c),
                      ('PSAResNetV1d', PSAResNetV1d)]:
        model = MODELS.build(dict(type=name, psa=dict(mode='sequential'), **R18))
        assert type(model) is cls and len(_psas(model)) == 8
    model = MODELS.build(dict(type='PSAHRNet', extra=NARROW, psa=dict()))
    assert type(model) is PSAHRNet and isinstance(model, HRNet)
    assert isinstance(MODELS.build(dict(type='PSAResNetV1c', **R18)), ResNetV1c)


@pytest.mark.parametrize('psa, match', [
    (dict(mdoe='parallel'), "unknown psa key 'mdoe'"),
    (dict(stages=(True, ) * 3), r'one bool per stage \(4\), got \(True, True, True\)'),
    (dict(stages=(True, True, None, True)), 'entries must be bool, got None'),
    (dict(variant='v2'), "variant must be one of .*got 'v2'"),
])
def test_bad_config(psa, match):
    with pytest.raises(ValueError, match=match):
        MODELS.build(dict(type='PSAResNet', psa=psa, **R18))
    with pytest.raises(ValueError, match=match):
        MODELS.build(dict(type='PSAHRNet', extra=NARROW, psa=psa))


def test_revert_sync_batchnorm_keeps_the_psa():
    from mmengine.model import revert_sync_batchnorm

    torch.manual_seed(0)
    syncbn = dict(type='SyncBN', requires_grad=True)
    model = revert_sync_batchnorm(PSAResNetV1c(norm_cfg=syncbn, psa=dict(), **R18))
    stock = revert_sync_batchnorm(ResNetV1c(norm_cfg=syncbn, **R18))
    stock.load_state_dict(model.state_dict(), strict=False)
    model.eval(), stock.eval()
    with torch.no_grad():  # runs on CPU (SyncBN would refuse), and the PSAs still act
        assert not torch.allclose(model(_x())[-1], stock(_x())[-1])
    assert len(_psas(model)) == 8
