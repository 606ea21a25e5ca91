"""PSANeck (mmpsa/necks.py): one library-free neck for mmseg and mmpose."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.registry import MODELS

import mmpsa  # noqa: F401  (registers)
from mmpsa.layers import PolarizedSelfAttention
from mmpsa.necks import PSANeck

REPO = Path(__file__).resolve().parents[1]
LEVELS = [8, 16, 24, 32]
PSA_ARGS = [
    dict(mode=m, variant=v) for m in ('parallel', 'sequential') for v in ('paper', 'official')
]
PSA_IDS = [f"{a['mode']}-{a['variant']}" for a in PSA_ARGS]

pytestmark = pytest.mark.usefixtures('one_torch_thread')


def _features(levels=LEVELS, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(batch, c, 16 // 2**i, 12 // 2**i, generator=g) for i, c in enumerate(levels))


@pytest.mark.parametrize('psa', PSA_ARGS, ids=PSA_IDS)
def test_neck_keeps_shapes_one_block_per_level(psa):
    neck = MODELS.build(dict(type='PSANeck', in_channels=LEVELS, psa=psa))
    neck.init_weights()
    feats = _features()
    outs = neck(feats)
    assert isinstance(outs, tuple) and len(outs) == len(LEVELS)
    for block, x, y in zip(neck.psa, feats, outs):
        assert isinstance(block, PolarizedSelfAttention)
        assert (block.mode, block.variant) == (psa['mode'], psa['variant'])
        assert y.shape == x.shape and not torch.allclose(y, x)
        torch.testing.assert_close(y, block(x))  # level i goes through block i
    first = 'ch_wv.weight' if psa['variant'] == 'paper' else 'conv_v_right.weight'
    assert {f'psa.{i}.{first}' for i in range(len(LEVELS))} <= set(neck.state_dict())
    assert all(k.startswith('psa.') for k in neck.state_dict())


def test_neck_single_tensor_and_block_defaults():
    neck = PSANeck(in_channels=16)
    assert neck.in_channels == [16]
    block = neck.psa[0]
    assert (block.mode, block.variant, block.fused) == ('parallel', 'paper', True)
    x = torch.randn(1, 16, 8, 6)
    y = neck(x)
    assert isinstance(y, torch.Tensor) and y.shape == x.shape


def test_one_class_in_every_scope():
    from mmpose.registry import MODELS as POSE_MODELS
    from mmseg.registry import MODELS as SEG_MODELS

    from mmpsa.pose.necks import PSANeck as PoseNeck
    from mmpsa.seg.necks import PSANeck as SegNeck
    assert SegNeck is PSANeck and PoseNeck is PSANeck
    for registry in (MODELS, SEG_MODELS, POSE_MODELS):
        assert type(registry.build(dict(type='PSANeck', in_channels=[8]))) is PSANeck


def test_init_cfg_then_each_block_own_init():
    """A Normal(std=0.001) init_cfg on every Conv2d must not leave the blocks at it."""
    torch.manual_seed(0)
    neck = PSANeck(in_channels=[16, 32], init_cfg=dict(type='Normal', layer='Conv2d', std=0.001))
    neck.init_weights()
    for block in neck.psa:
        assert block.ch_wv.weight.std() > 0.05


@pytest.mark.parametrize('kwargs, match', [
    (dict(), 'in_channels is required'),
    (dict(in_channels=[]), 'in_channels must be'),
    (dict(in_channels=0), 'in_channels must be'),
    (dict(in_channels=[8, -2]), 'in_channels must be'),
    (dict(in_channels=[8, 0]), 'in_channels must be'),
    (dict(in_channels='eight'), 'in_channels must be'),
    (dict(in_channels=[8.0]), 'in_channels must be'),
    (dict(in_channels=[8], psa=dict(mode='parallel', stages=(True, ))),
     r"PSANeck: unknown psa key 'stages' \(allowed: mode, variant, fused\)"),
    (dict(in_channels=[8], psa='parallel'), "PSANeck: psa must be a dict or None, got 'parallel'"),
    (dict(in_channels=[8], psa=dict(mode='diagonal')), "mode must be one of .*got 'diagonal'"),
])
def test_neck_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PSANeck(**kwargs)


def test_neck_rejects_a_wrong_input_at_forward():
    neck = PSANeck(in_channels=[8, 16])
    with pytest.raises(ValueError, match='in_channels has 2 levels but the input returns 1'):
        neck((torch.randn(1, 8, 4, 4), ))
    with pytest.raises(ValueError, match=r'does not match the input.*\[8, 12\]'):
        neck((torch.randn(1, 8, 4, 4), torch.randn(1, 12, 2, 2)))


def test_neck_imports_neither_mmseg_nor_mmpose():
    code = ('import sys\n'
            'for name in ("mmseg", "mmpose", "mmdet"): sys.modules[name] = None\n'
            'import torch, mmpsa\n'
            'from mmengine.registry import MODELS\n'
            'assert not [m for m in sys.modules if m.startswith(("mmseg.", "mmpose."))]\n'
            'neck = MODELS.build(dict(type="PSANeck", in_channels=[8]))\n'
            'print(tuple(neck(torch.randn(1, 8, 4, 4)).shape))\n')
    out = subprocess.run([sys.executable, '-c', code],
                         cwd=REPO,
                         capture_output=True,
                         text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == '(1, 8, 4, 4)'
