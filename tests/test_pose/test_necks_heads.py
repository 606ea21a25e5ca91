"""PSAHeatmapHead, and the build-time checks of PSANeck and the head, in mmpose's scope;
PSANeck itself: tests/test_necks.py."""
import copy

import pytest
import torch
from mmengine.registry import init_default_scope
from mmpose.models.heads import HeatmapHead
from mmpose.registry import MODELS

import mmpsa  # noqa: F401  (registers)
from mmpsa.layers import PolarizedSelfAttention
from mmpsa.necks import check_feature_channels
from mmpsa.pose.heads import PSAHeatmapHead

init_default_scope('mmpose')
pytestmark = pytest.mark.usefixtures('single_thread')

PSA_ARGS = [
    dict(mode=m, variant=v) for m in ('parallel', 'sequential') for v in ('paper', 'official')
]
PSA_IDS = [f"{a['mode']}-{a['variant']}" for a in PSA_ARGS]
# (HeatmapHead kwargs, input channels): HRNet-style (no deconv) and SimpleBaseline-style
HEADS = {
    'hrnet':
    dict(in_channels=16, out_channels=17, deconv_out_channels=None),
    'simplebaseline':
    dict(in_channels=32, out_channels=17, deconv_out_channels=(16, 16), deconv_kernel_sizes=(4, 4)),
    'convs':
    dict(
        in_channels=32,
        out_channels=17,
        deconv_out_channels=(16, ),
        deconv_kernel_sizes=(4, ),
        conv_out_channels=(24, ),
        conv_kernel_sizes=(3, )),
}


def _feats(in_channels, hw=(6, 4), batch=2):
    torch.manual_seed(1)
    return (torch.randn(batch, in_channels, *hw), )


# ------------------------------------------------------------------------------- head
def _pair(kind, psa=None, seed=0):
    """A stock HeatmapHead and a PSAHeatmapHead built under the same seed, initialised."""
    torch.manual_seed(seed)
    stock = HeatmapHead(**HEADS[kind])
    stock.init_weights()
    torch.manual_seed(seed)
    ours = MODELS.build(dict(type='PSAHeatmapHead', psa=psa, **HEADS[kind]))
    ours.init_weights()
    return stock, ours


@pytest.mark.parametrize('kind', HEADS)
def test_head_without_psa_is_the_stock_head(kind):
    stock, ours = _pair(kind)
    assert ours.psa is None
    assert list(ours.state_dict()) == list(stock.state_dict())
    for key, value in stock.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    feats = _feats(HEADS[kind]['in_channels'])
    assert torch.equal(ours(feats), stock(feats))
    # a stock checkpoint loads strictly
    ours.load_state_dict(stock.state_dict(), strict=True)


@pytest.mark.parametrize('psa', PSA_ARGS, ids=PSA_IDS)
@pytest.mark.parametrize('kind', HEADS)
def test_head_psa_before_final_layer(kind, psa):
    stock, ours = _pair(kind, psa)
    cfg = HEADS[kind]
    channels = (cfg.get('conv_out_channels') or cfg['deconv_out_channels']
                or (cfg['in_channels'], ))[-1]
    assert isinstance(ours.psa, PolarizedSelfAttention)
    assert ours.psa.in_channels == channels and ours.psa.mode == psa['mode']
    # stock weights load with only the psa keys missing
    result = ours.load_state_dict(stock.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(k.startswith('psa.') for k in result.missing_keys)
    seen = {}
    ours.psa.register_forward_hook(lambda m, i, o: seen.update(x=i[0], y=o))
    feats = _feats(cfg['in_channels'])
    out = ours(feats)
    assert out.shape == stock(feats).shape
    # the block sees the deconvolved/convolved features, the final 1x1 sees its output
    torch.testing.assert_close(seen['x'], ours.conv_layers(ours.deconv_layers(feats[-1])))
    torch.testing.assert_close(out, ours.final_layer(seen['y']))
    assert not torch.allclose(out, stock(feats))


def test_head_psa_keeps_its_own_init():
    """The head's init_cfg (Normal std=0.001 on every Conv2d) must not reach the block."""
    _, ours = _pair('hrnet', dict(mode='parallel', variant='paper'))
    assert ours.final_layer.weight.std() < 0.01  # the stock init did run
    for name in ('ch_wv', 'ch_wq', 'ch_wz', 'sp_wv', 'sp_wq'):
        assert getattr(ours.psa, name).weight.std() > 0.05, name
    fresh = PolarizedSelfAttention(16)
    assert float(ours.psa.ch_wv.weight.std()) == pytest.approx(
        float(fresh.ch_wv.weight.std()), rel=0.5)


def test_head_trains_the_block():
    _, ours = _pair('simplebaseline', dict(mode='sequential', variant='paper'))
    ours(_feats(32)).square().mean().backward()
    grads = [p.grad for p in ours.psa.parameters()]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_head_bad_config():
    with pytest.raises(ValueError, match="PSAHeatmapHead: unknown psa key 'foo'"):
        PSAHeatmapHead(
            in_channels=16,
            out_channels=17,
            deconv_out_channels=None,
            psa=dict(mode='parallel', foo=1))
    with pytest.raises(ValueError, match='psa must be a dict'):
        PSAHeatmapHead(in_channels=16, out_channels=17, psa='parallel')
    with pytest.raises(ValueError, match='in_channels'):
        PSAHeatmapHead(
            in_channels=[16, 32],
            out_channels=17,
            deconv_out_channels=None,
            psa=dict(mode='parallel'))
    with pytest.raises(ValueError, match='variant'):
        PSAHeatmapHead(
            in_channels=16, out_channels=17, deconv_out_channels=None, psa=dict(variant='released'))
    head = PSAHeatmapHead(
        in_channels=16, out_channels=17, deconv_out_channels=None, psa=dict(mode='parallel'))
    with pytest.raises(ValueError, match='in_channels=16 does not match'):
        head((torch.randn(1, 32, 8, 6), ))


def test_head_survives_deepcopy():
    _, ours = _pair('hrnet', dict(mode='parallel', variant='paper'))
    twin = copy.deepcopy(ours)
    feats = _feats(16)
    torch.testing.assert_close(twin(feats), ours(feats))


# ---- cross-module mismatches: found by check_feature_channels (mmpsa's build paths run it)


def _tiny_estimator_cfg() -> dict:
    from mmpsa.datasets.tiny import TINY_POSE, tiny_config
    return copy.deepcopy(tiny_config(TINY_POSE, '/nonexistent').model.to_dict())


def test_head_in_channels_mismatch_fails_at_build_naming_it():
    from mmpose.registry import MODELS as POSE_MODELS
    cfg = _tiny_estimator_cfg()  # tiny HRNet: one 16-channel output
    cfg['head'].update(type='PSAHeatmapHead', in_channels=24, psa=dict(mode='parallel'))
    with pytest.raises(ValueError, match=r'PSAHeatmapHead: in_channels=24 .*got 16'):
        check_feature_channels(POSE_MODELS.build(cfg))
    cfg['head']['in_channels'] = 16
    assert POSE_MODELS.build(cfg).head.psa is not None


def test_neck_level_count_mismatch_fails_at_build_naming_it():
    from mmpose.registry import MODELS as POSE_MODELS
    cfg = _tiny_estimator_cfg()
    cfg['neck'] = dict(type='PSANeck', in_channels=[16, 32])
    with pytest.raises(ValueError, match=r'PSANeck: in_channels has 2 levels but the backbone'):
        check_feature_channels(POSE_MODELS.build(cfg))
    cfg['neck'] = dict(type='PSANeck', in_channels=[16])
    cfg['head'].update(type='PSAHeatmapHead', in_channels=8)
    with pytest.raises(ValueError, match=r'in_channels=8 does not match the neck \(PSANeck\)'):
        check_feature_channels(POSE_MODELS.build(cfg))


@pytest.mark.parametrize('depth, out_indices', [(18, (3, )), (50, (0, 1, 2, 3))])
def test_backbone_out_channels_match_the_real_outputs(depth, out_indices):
    from mmpose.models.backbones import ResNet

    from mmpsa.insertion import backbone_out_channels
    backbone = ResNet(depth=depth, out_indices=out_indices)
    backbone.eval()  # mmpose's ResNet.train() returns None: do not chain
    with torch.no_grad():
        outs = backbone(torch.rand(1, 3, 32, 32))
    assert backbone_out_channels(backbone) == [o.shape[1] for o in outs]
