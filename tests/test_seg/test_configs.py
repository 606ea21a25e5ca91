"""The mmseg configs: every one loads, each differs from its base by the PSA change only
(except the released multi-scale OCR family, whose differences are listed), one model per
family builds, and the complexity tool measures PSA against stock."""
import ast
import copy
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.hub import get_config
from mmseg.registry import MODELS

from mmpsa.apis.complexity import compare, default_input_hw, strip_psa
from mmpsa.layers import PolarizedSelfAttention

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / 'configs' / 'mmseg'
ALL = sorted(CONFIGS.rglob('*.py'))
FULL = [p for p in ALL if p.parent.name != 'tiny']
TINY = [p for p in ALL if p.parent.name == 'tiny']
# The documented exception to "stock + one PSA line": the released network (hierarchical
# multi-scale OCR) changes the segmentor, the OCR head and test_cfg too (tested below).
MSCALE = [p for p in FULL if p.parent.name == 'psa_mscale_ocrnet']
BACKBONE_PSA = [
    p for p in FULL if '-psahead' not in p.name and '-psaneck' not in p.name and p not in MSCALE
]
OPT_IN = [p for p in FULL if p not in BACKBONE_PSA and p not in MSCALE]
ALL_STAGES = (True, True, True, True)
RELEASED = (False, True, True, True)


def _ids(paths):
    return [p.name for p in paths]


def _base_of(path: Path) -> str:
    """The first ``_base_`` entry of a config file, as written."""
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and node.targets[0].id == '_base_':
            value = ast.literal_eval(node.value)
            return value[0] if isinstance(value, list) else value
    raise AssertionError(f'{path} has no _base_')


def _load_base(path: Path) -> Config:
    base = _base_of(path)
    return get_config(base) if '::' in base else Config.fromfile(str(path.parent / base))


def _diff(a, b, prefix=''):
    """Paths whose values differ between two nested dict/list structures (mmengine's
    ``_scope_`` bookkeeping, added when a config inherits a package's config, aside)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted((set(a) | set(b)) - {'_scope_'}, key=str):
            out += _diff(a.get(key, '<absent>'), b.get(key, '<absent>'), f'{prefix}{key}.')
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f'{prefix}{i}.')]
    return [] if a == b else [prefix.rstrip('.')]


def _mode(path: Path) -> str:
    return {'psa-p': 'parallel', 'psa-s': 'sequential'}[path.name[:5]]


def test_the_issue_configs_exist():
    names = {p.name for p in BACKBONE_PSA}
    for mode in ('p', 's'):
        for stem in ('deeplabv3plus_r50-d8', 'deeplabv3plus_r101-d8', 'fcn_hr48', 'ocrnet_hr48'):
            assert f'psa-{mode}_{stem}_4xb2-80k_cityscapes-512x1024.py' in names
    assert len(OPT_IN) >= 3 and len(TINY) == 5
    kinds = ('official_cityscapes-1024x2048', '4xb2-80k_cityscapes-512x1024')
    assert sorted(p.name for p in MSCALE) == sorted(f'psa-{mode}_mscale-ocrnet_hr48_{kind}.py'
                                                    for mode in ('p', 's') for kind in kinds)


@pytest.mark.parametrize('path', ALL, ids=_ids(ALL))
def test_config_loads(path):
    cfg = Config.fromfile(str(path))
    assert cfg.default_scope == 'mmseg'
    if path.name.startswith('psa-'):
        assert cfg.custom_imports == dict(imports=['mmpsa'], allow_failed_imports=False)
    root = 'data/tiny_cityscapes/' if path in TINY else 'data/cityscapes/'
    assert cfg.train_dataloader.dataset.data_root == root


@pytest.mark.parametrize('path', BACKBONE_PSA, ids=_ids(BACKBONE_PSA))
def test_backbone_config_is_stock_plus_the_psa_line(path):
    cfg, base = Config.fromfile(str(path)), _load_base(path)
    assert _base_of(path).startswith('mmseg::')
    assert path.name.endswith(Path(_base_of(path)).name)  # psa-x_<the stock file name>
    changed = _diff(cfg.to_dict(), base.to_dict())
    assert sorted(changed) == ['custom_imports', 'model.backbone.psa', 'model.backbone.type']
    psa = cfg.model.backbone.psa
    if 'hr48' in path.name:  # the released placement and block
        assert cfg.model.backbone.type == 'PSAHRNet'
        assert psa == dict(mode=_mode(path), variant='official', stages=RELEASED)
    else:
        assert cfg.model.backbone.type == 'PSAResNetV1c'
        assert psa == dict(mode=_mode(path), variant='paper', stages=ALL_STAGES)


@pytest.mark.parametrize('path', OPT_IN, ids=_ids(OPT_IN))
def test_opt_in_config_is_its_psa_config_plus_one_module(path):
    cfg, base = Config.fromfile(str(path)), _load_base(path)
    changed = sorted(_diff(cfg.to_dict(), base.to_dict()))
    if '-psaneck' in path.name:
        assert changed == ['model.neck']
        assert cfg.model.neck.type == 'PSANeck'
        assert cfg.model.neck.in_channels == cfg.model.decode_head.in_channels
    elif 'ocrnet' in path.name:  # the restated list: only the OCR head's type and psa
        assert changed == ['model.decode_head.1.psa', 'model.decode_head.1.type']
        assert cfg.model.decode_head[1].type == 'PSAOCRHead'
    else:
        assert changed == ['model.decode_head.psa', 'model.decode_head.type']
        assert cfg.model.decode_head.type in ('PSASepASPPHead', 'PSAFCNHead')
    head = cfg.model.decode_head[1] if 'ocrnet' in path.name else cfg.model.decode_head
    if '-psahead' in path.name:
        assert head.psa['mode'] == _mode(path)


def _mscale_config(mode: str, kind: str) -> Path:
    return CONFIGS / 'psa_mscale_ocrnet' / f'psa-{mode}_mscale-ocrnet_hr48_{kind}.py'


OFFICIAL, TRAIN = 'official_cityscapes-1024x2048', '4xb2-80k_cityscapes-512x1024'


def test_official_mscale_config_is_stock_ocrnet_plus_the_released_network():
    """PSA_p official = the stock OCRNet-HR48 config with: the PSA backbone (released placement),
    the multi-scale segmentor and OCR head (scale_attn of 256 channels), the released 3-scale
    evaluation and the strict load check; PSA_s official = that with PSA_s."""
    path = _mscale_config('p', OFFICIAL)
    cfg, base = Config.fromfile(str(path)), _load_base(path)
    assert _base_of(path) == 'mmseg::ocrnet/ocrnet_hr48_4xb2-80k_cityscapes-512x1024.py'
    assert sorted(_diff(cfg.to_dict(), base.to_dict())) == [
        'custom_imports', 'model.backbone.psa', 'model.backbone.type',
        'model.decode_head.1.attn_channels', 'model.decode_head.1.type', 'model.strict_load',
        'model.test_cfg.scales', 'model.type'
    ]
    assert cfg.model.type == 'MscaleCascadeEncoderDecoder' and cfg.model.strict_load is True
    assert cfg.model.backbone.psa == dict(mode='parallel', variant='official', stages=RELEASED)
    assert cfg.model.decode_head[1].type == 'MscaleOCRHead'
    assert cfg.model.decode_head[1].attn_channels == 256
    assert cfg.model.test_cfg == dict(mode='whole', scales=[0.5, 1.0, 2.0])
    # the released evaluation: the whole 1024x2048 frame, mmseg's default normalization
    resize = cfg.test_dataloader.dataset.pipeline[1]
    assert (resize.type, resize.scale, resize.keep_ratio) == ('Resize', (2048, 1024), True)
    assert cfg.model.data_preprocessor.mean == [123.675, 116.28, 103.53]
    assert cfg.model.data_preprocessor.std == [58.395, 57.12, 57.375]

    psa_s = _mscale_config('s', OFFICIAL)
    assert _diff(Config.fromfile(str(psa_s)).to_dict(),
                 cfg.to_dict()) == ['model.backbone.psa.mode']
    assert Config.fromfile(str(psa_s)).model.backbone.psa.mode == 'sequential'


@pytest.mark.parametrize('mode', ['p', 's'])
def test_mscale_train_config_is_the_official_one_with_two_scale_training(mode):
    path = _mscale_config(mode, TRAIN)
    cfg = Config.fromfile(str(path))
    assert _base_of(path) == f'./{_mscale_config(mode, OFFICIAL).name}'
    assert sorted(_diff(cfg.to_dict(),
                        _load_base(path).to_dict())) == [
                            'model.strict_load', 'model.train_cfg.scale_loss_weight',
                            'model.train_cfg.scales'
                        ]
    assert cfg.model.train_cfg == dict(scales=[0.5, 1.0], scale_loss_weight=0.0)
    assert cfg.model.strict_load is False
    assert 'NOT the released recipe' in path.read_text()


@pytest.mark.parametrize('mode, params', [('parallel', 78_497_398), ('sequential', 77_526_742)])
def test_mscale_model_has_the_released_networks_size(mode, params):
    """78.50 M (PSA_p) and 77.53 M (PSA_s) parameters, as the released MscaleOCR built from
    its code; the released aux-head and OCR 3x3 conv biases (720 + 512) are folded away."""
    cfg = Config.fromfile(str(_mscale_config(mode[0], OFFICIAL)))
    with torch.device('meta'):
        model = MODELS.build(cfg.model)
    assert sum(p.numel() for p in model.parameters()) == params
    assert round((params + 720 + 512) / 1e6, 2) == {'parallel': 78.50, 'sequential': 77.53}[mode]


@pytest.mark.parametrize(
    'path', [p for p in TINY if p.name.startswith('psa-')],
    ids=_ids([p for p in TINY if p.name.startswith('psa-')]))
def test_tiny_psa_config_is_tiny_stock_plus_the_psa_line(path):
    cfg, base = Config.fromfile(str(path)), _load_base(path)
    assert sorted(
        _diff(cfg.to_dict(),
              base.to_dict())) == ['custom_imports', 'model.backbone.psa', 'model.backbone.type']
    # CPU-ready: plain BN, nothing to download, no worker processes
    assert base.model.pretrained is None and base.model.backbone.init_cfg is None
    assert 'SyncBN' not in repr(cfg.model)
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        assert cfg[loader].num_workers == 0 and cfg[loader].persistent_workers is False


@pytest.mark.parametrize(
    'name, expected_psa',
    [
        ('psa_deeplabv3plus/psa-s_deeplabv3plus-psahead_r50-d8_4xb2-80k_cityscapes-512x1024.py',
         16 + 1),  # 3 + 4 + 6 + 3 Bottlenecks, plus the head's
        ('psa_hrnet/psa-p_fcn-psaneck_hr48_4xb2-80k_cityscapes-512x1024.py',
         8 + 48 + 48 + 4),  # BasicBlocks of stages 2-4, plus one per neck level
        ('psa_ocrnet/psa-p_ocrnet-psahead_hr48_4xb2-80k_cityscapes-512x1024.py', 8 + 48 + 48 + 1),
        ('psa_mscale_ocrnet/psa-s_mscale-ocrnet_hr48_official_cityscapes-1024x2048.py',
         8 + 48 + 48),
    ])
def test_one_model_per_family_builds(name, expected_psa):
    cfg = Config.fromfile(str(CONFIGS / name))
    model = MODELS.build(cfg.model)  # SyncBN builds on CPU; no forward at 512x1024 here
    blocks = [n for n, m in model.named_modules() if isinstance(m, PolarizedSelfAttention)]
    assert len(blocks) == expected_psa
    if 'hr48' in name:
        assert not any(n.startswith('backbone.layer1.') for n in blocks)  # stage 1 stays stock
        assert 'backbone.stage2.0.branches.0.0.psa' in blocks
    else:
        assert 'backbone.layer1.0.psa' in blocks and 'decode_head.psa' in blocks


# ---- the complexity tool (small inputs; the 512x1024 table comes from
# tools/analysis_tools/complexity.py)


def test_input_size_comes_from_the_config():
    assert default_input_hw(Config.fromfile(str(BACKBONE_PSA[0]))) == (512, 1024)
    pose_like = Config(dict(codec=dict(type='MSRAHeatmap', input_size=(192, 256))))
    assert default_input_hw(pose_like) == (256, 192)  # mmpose's codec says (W, H)
    with pytest.raises(ValueError, match='--shape'):
        default_input_hw(Config(dict(model=dict(type='X'))))


def test_strip_psa_gives_the_stock_model():
    cfg = Config.fromfile(
        str(CONFIGS / 'psa_hrnet' / 'psa-p_fcn-psaneck_hr48_4xb2-80k_cityscapes-512x1024.py'))
    stripped = strip_psa(cfg.model)
    assert stripped['neck'] is None and stripped['backbone']['psa'] is None
    assert cfg.model.neck.type == 'PSANeck'  # the input is left alone


TINY_HR = CONFIGS / 'tiny' / 'psa-p_fcn_hr-tiny_1xb4-100iter_tiny-cityscapes-64x128.py'
TINY_DL = (
    CONFIGS / 'tiny' / 'psa-p_deeplabv3plus_r18-tiny-d8_1xb4-100iter_tiny-cityscapes-64x128.py')


def _psa_params(model_cfg) -> int:
    model = MODELS.build(copy.deepcopy(model_cfg))
    return sum(p.numel() for m in model.modules() if isinstance(m, PolarizedSelfAttention)
               for p in m.parameters())


def _params_without_aux(model_cfg) -> int:
    model = MODELS.build(copy.deepcopy(model_cfg))
    aux = getattr(model, 'auxiliary_head', None)
    return sum(p.numel() for p in model.parameters()) - (
        sum(p.numel() for p in aux.parameters()) if aux is not None else 0)


def test_complexity_tool_hrnet_and_deeplabv3plus(capsys, monkeypatch, tmp_path):
    """The CLI on the tiny FCN-HRNet and DeepLabV3+ configs, at their own crop size."""
    records = tmp_path / 'complexity.json'
    monkeypatch.setattr(
        sys, 'argv',
        ['complexity.py', str(TINY_HR),
         str(TINY_DL), '--json',
         str(records)])
    runpy.run_path(str(REPO / 'tools' / 'analysis_tools' / 'complexity.py'), run_name='__main__')
    out = capsys.readouterr().out
    rows = json.loads(records.read_text())
    assert [r['config'] for r in rows] == [str(TINY_HR), str(TINY_DL)]
    for path, row in zip((TINY_HR, TINY_DL), rows):
        assert len([
            line for line in out.splitlines() if line.startswith(f'| {path.stem} | 64x128 |')
        ]) == 1
        assert row['psa']['input_shape'] == [3, 64, 128]
        cfg = Config.fromfile(str(path))
        # PSA − stock is exactly the blocks' parameters; stock is the stock tiny config's model
        assert row['extra_params'] == _psa_params(cfg.model)
        stock_cfg = Config.fromfile(str(path.parent / _base_of(path)))
        assert row['stock']['params'] == _params_without_aux(stock_cfg.model)
        assert row['extra_flops'] == row['psa']['flops'] - row['stock']['flops'] > 0


def test_complexity_ocr_family_fused_and_literal():
    """The library on a tiny OCRNet (cascade heads, PSA backbone and PSAOCRHead)."""
    cfg = Config.fromfile(str(TINY_HR))
    channels = [8, 16, 32, 64]
    cfg.model.type = 'CascadeEncoderDecoder'
    cfg.model.num_stages = 2
    head = dict(
        in_channels=channels,
        in_index=(0, 1, 2, 3),
        input_transform='resize_concat',
        num_classes=19,
        norm_cfg=dict(type='BN'),
        align_corners=False)
    cfg.model.decode_head = [
        dict(
            type='FCNHead',
            channels=sum(channels),
            kernel_size=1,
            num_convs=1,
            concat_input=False,
            **head),
        dict(
            type='PSAOCRHead',
            channels=32,
            ocr_channels=16,
            psa=dict(mode='sequential', variant='official'),
            **head),
    ]
    fused, literal = compare(cfg), compare(cfg, literal=True)
    assert fused.extra_params == literal.extra_params == _psa_params(cfg.model)
    assert (fused.stock.params, fused.stock.flops) == (literal.stock.params, literal.stock.flops)
    assert 0 < fused.extra_flops < literal.extra_flops  # the fused evaluation saves work
    stock = copy.deepcopy(cfg.model)
    stock.backbone.type, stock.decode_head[1].type = 'HRNet', 'OCRHead'
    del stock.backbone.psa, stock.decode_head[1].psa
    assert fused.stock.params == _params_without_aux(stock)
