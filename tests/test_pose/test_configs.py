"""The MMPose configs: each a stock mmpose config plus the one PSA change; they build."""
import copy
import importlib.util
import re
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmpose.registry import MODELS

import mmpsa  # noqa: F401  (registers)
from mmpsa.layers import PolarizedSelfAttention
from mmpsa.necks import check_feature_channels

init_default_scope('mmpose')
pytestmark = pytest.mark.usefixtures('single_thread')

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / 'configs' / 'mmpose'
STOCK = Path(importlib.util.find_spec('mmpose').submodule_search_locations[0]) / '.mim' / \
    'configs'
BACKBONE_CONFIGS = sorted((CONFIGS / 'psa_hrnet').glob('*.py')) + \
    sorted((CONFIGS / 'psa_resnet').glob('*.py'))
HEAD_NECK_CONFIGS = sorted((CONFIGS / 'psa_head_neck').glob('*.py'))
TINY_CONFIGS = sorted((CONFIGS / 'tiny').glob('*.py'))
# The paper's pose rows: SimpleBaseline R50, HRNet-W32/W48, UDP HRNet-W48 (two sizes each
# but R50), PSA_p and PSA_s.
EXPECTED = {
    f'td-hm_psa-{m}-{tail}.py'
    for m in 'ps'
    for tail in ['res50_8xb64-210e_coco-256x192'] + [
        f'{net}-210e_coco-{size}' for size in ('256x192', '384x288')
        for net in ('hrnet-w32_8xb64', 'hrnet-w48_8xb32', 'hrnet-w48_udp-8xb32')
    ]
}


def _stock_path(cfg_path: Path) -> Path:
    """The stock config a config's first ``_base_`` names (following our own bases)."""
    text = cfg_path.read_text()
    base = re.search(r"_base_ = \[\s*'([^']+)'(?:\s*'([^']+)')?", text)
    name = base.group(1) + (base.group(2) or '')
    if name.startswith('mmpose::'):
        return STOCK / name[len('mmpose::'):]
    return _stock_path((cfg_path.parent / name).resolve())


def _strip_scope(value):
    """Drop the ``_scope_`` keys that a package-scoped ``_base_`` adds to every dict."""
    if isinstance(value, dict):
        return {k: _strip_scope(v) for k, v in value.items() if k != '_scope_'}
    if isinstance(value, (list, tuple)):
        return type(value)(_strip_scope(v) for v in value)
    return value


def _as_dict(path: Path) -> dict:
    return _strip_scope(Config.fromfile(str(path)).to_dict())


def test_the_paper_rows_are_all_there():
    assert {p.name for p in BACKBONE_CONFIGS} == EXPECTED


@pytest.mark.parametrize('path', BACKBONE_CONFIGS, ids=lambda p: p.name)
def test_backbone_config_is_stock_plus_one_line(path):
    ours, stock = _as_dict(path), _as_dict(_stock_path(path))
    assert ours.pop('custom_imports') == dict(imports=['mmpsa'], allow_failed_imports=False)
    backbone, stock_backbone = ours['model']['backbone'], stock['model']['backbone']
    assert backbone.pop('type') == 'PSA' + stock_backbone.pop('type')
    mode = 'parallel' if '_psa-p-' in path.name else 'sequential'
    assert backbone.pop('psa') == dict(mode=mode, variant='paper', stages=(True, True, True, True))
    assert ours == stock  # nothing else differs
    assert ours['train_dataloader']['dataset']['data_root'] == 'data/coco/'


@pytest.mark.parametrize('path', HEAD_NECK_CONFIGS, ids=lambda p: p.name)
def test_head_neck_configs_are_opt_in_diffs(path):
    ours = _as_dict(path)
    base_text = path.read_text()
    stock = _as_dict(_stock_path(path))
    ours.pop('custom_imports')
    model, stock_model = ours['model'], stock['model']
    if 'psa-p-head' in path.name:
        assert model['head'].pop('type') == 'PSAHeatmapHead'
        assert stock_model['head'].pop('type') == 'HeatmapHead'
        assert model['head'].pop('psa') == dict(mode='parallel', variant='paper')
    if 'psa-p-neck' in path.name:
        neck = model.pop('neck')
        assert neck['type'] == 'PSANeck' and neck['in_channels'] == [
            stock_model['head']['in_channels']
        ]
    if path.name.startswith('td-hm_psa-'):  # PSA backbone as well
        assert model['backbone'].pop('type') == 'PSAHRNet'
        stock_model['backbone'].pop('type')
        model['backbone'].pop('psa')
    assert ours == stock, base_text


def _psa_blocks(model):
    return [m for m in model.modules() if isinstance(m, PolarizedSelfAttention)]


@pytest.mark.parametrize('name, blocks, params', [
    ('psa_resnet/td-hm_psa-p-res50_8xb64-210e_coco-256x192.py', 16, None),
    ('psa_hrnet/td-hm_psa-s-hrnet-w48_udp-8xb32-210e_coco-256x192.py', 4 + 104, 6_455_148),
])
def test_full_size_models_build_and_run(name, blocks, params):
    """``params``: the exact increase over the stock model (the paper: 70.1 M in all for
    (UDP-)HRNet-W48 + PSA; tests/test_pose/test_backbones.py derives 6,455,148 per block)."""
    cfg = Config.fromfile(str(CONFIGS / name))
    model = MODELS.build(cfg.model)
    assert len(_psa_blocks(model.backbone)) == blocks
    mode = 'parallel' if '_psa-p-' in name else 'sequential'
    assert {(b.mode, b.variant) for b in _psa_blocks(model)} == {(mode, 'paper')}
    if params is not None:
        stock_cfg = copy.deepcopy(cfg.model)
        stock_cfg.backbone.psa = None
        stock = MODELS.build(stock_cfg)
        n_ours, n_stock = (sum(p.numel() for p in m.parameters()) for m in (model, stock))
        assert n_ours - n_stock == params
        assert round(n_ours / 1e6, 1) == 70.1
    model.eval()
    w, h = cfg.codec.input_size
    with torch.no_grad():
        heatmaps = model(torch.randn(1, 3, h, w), None, mode='tensor')
    assert heatmaps.shape == (1, 17, *cfg.codec.heatmap_size[::-1])


@pytest.mark.parametrize('path', TINY_CONFIGS, ids=lambda p: p.name)
def test_tiny_configs_fit_a_cpu(path):
    cfg = Config.fromfile(str(path))
    if '_psa-' in path.name:  # td-hm_hrnet-tiny is the PSA tiny configs' stock twin
        assert cfg.model.backbone.type.startswith('PSA') and cfg.model.backbone.psa
    assert cfg.model.backbone.init_cfg is None
    assert all(side % 32 == 0 for side in cfg.codec.input_size)
    for name in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        loader = cfg[name]
        assert loader.num_workers == 0 and loader.persistent_workers is False
        assert loader.dataset.data_root == 'data/tiny_coco/'
    assert cfg.val_dataloader.dataset.bbox_file is None
    assert cfg.val_evaluator.type == 'CocoMetric'
    assert cfg.val_evaluator.ann_file == \
        'data/tiny_coco/annotations/person_keypoints_val2017.json'
    model = MODELS.build(cfg.model)
    norms = {type(m).__name__ for m in model.modules() if 'Norm' in type(m).__name__}
    assert 'SyncBatchNorm' not in norms


# ------------------------------------------------------------------------- bad configs
TINY_HRNET = CONFIGS / 'tiny' / 'td-hm_psa-p-hrnet-tiny_1xb16-5e_tinycoco-96x64.py'


def _tiny_model_cfg():
    return Config.fromfile(str(TINY_HRNET)).model


def _dry_run(model):
    model.eval()
    with torch.no_grad():
        return model(torch.randn(1, 3, 96, 64), None, mode='tensor')


def test_bad_backbone_psa_key_fails_at_build():
    cfg = _tiny_model_cfg()
    cfg.backbone.psa['heads'] = 8
    with pytest.raises(ValueError, match='heads'):
        MODELS.build(cfg)


def test_bad_head_psa_key_fails_at_build():
    cfg = _tiny_model_cfg()
    cfg.head.type = 'PSAHeatmapHead'
    cfg.head.psa = dict(mode='parallel', reduction=4)
    with pytest.raises(ValueError, match="PSAHeatmapHead: unknown psa key 'reduction'"):
        MODELS.build(cfg)


def test_bad_neck_psa_key_fails_at_build():
    cfg = _tiny_model_cfg()
    cfg.neck = dict(type='PSANeck', in_channels=[16], psa=dict(modes='parallel'))
    with pytest.raises(ValueError, match="PSANeck: unknown psa key 'modes'"):
        MODELS.build(cfg)


def test_neck_level_count_mismatch_names_in_channels():
    cfg = _tiny_model_cfg()
    cfg.neck = dict(type='PSANeck', in_channels=[16, 32])
    with pytest.raises(ValueError, match='in_channels has 2 levels but the backbone'):
        check_feature_channels(MODELS.build(cfg))  # as mmpsa's tools build it
    with pytest.raises(ValueError, match='in_channels has 2 levels but the input returns 1'):
        _dry_run(MODELS.build(cfg))  # a plain build: the first forward


def test_neck_channel_mismatch_names_in_channels():
    cfg = _tiny_model_cfg()
    cfg.neck = dict(type='PSANeck', in_channels=[32])
    with pytest.raises(
            ValueError, match=r'in_channels does not match the backbone.*got in_channels=\[32\]'):
        check_feature_channels(MODELS.build(cfg))
    with pytest.raises(
            ValueError, match=r'in_channels does not match the input.*got in_channels=\[32\]'):
        _dry_run(MODELS.build(cfg))


def test_head_channel_mismatch_names_in_channels():
    cfg = _tiny_model_cfg()
    cfg.head.type = 'PSAHeatmapHead'
    cfg.head.in_channels = 24
    cfg.head.psa = dict(mode='parallel')
    with pytest.raises(ValueError, match='in_channels=24 does not match'):
        _dry_run(MODELS.build(cfg))


def test_good_neck_and_head_run_in_the_model():
    cfg = _tiny_model_cfg()
    cfg.neck = dict(type='PSANeck', in_channels=[16])
    cfg.head.type = 'PSAHeatmapHead'
    cfg.head.psa = dict(mode='sequential')
    model = MODELS.build(cfg)
    assert _dry_run(model).shape == (1, 17, 24, 16)
