"""tools/model_converters/psa_official_to_mmseg.py and mmpsa/seg/released.py: released-format
checkpoints (keys written down from the released hrnetv2.py, ocrnet.py, ocr_utils.py and
utils.make_attn_head) map completely, the bias folding is exact, bad inputs fail naming what
is wrong and write nothing, and a converted checkpoint runs through tools/test.py.

The comparison with the released network itself needs a checkout of it:
tests/test_seg/test_released_weights.py (``PSA_OFFICIAL_REPO``).
"""
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pytest
import torch
from mmcv.cnn import ConvModule
from mmengine.runner import load_checkpoint
from mmseg.datasets import CityscapesDataset

from mmpsa.apis.runner import test as run_test_tool
from mmpsa.checkpoint import CheckpointMismatchError, CheckpointReadError
from mmpsa.datasets.cityscapes_tiny import make_tiny_cityscapes
from mmpsa.seg.released import (ConversionError, build_model_of, convert_released_checkpoint,
                                map_released_state_dict, psa_variant)

REPO = Path(__file__).resolve().parents[2]
OFFICIAL = {
    v:
    REPO / 'configs/mmseg/psa_mscale_ocrnet' /
    f'psa-{v[-1]}_mscale-ocrnet_hr48_official_cityscapes-1024x2048.py'
    for v in ('psa_p', 'psa_s')
}
BN_KEYS = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')
OCB = 'ocr.ocr_distri_head.object_context_block.'

# A tiny HRNet (one block per branch, widths 8-64) with tiny heads, on top of the official
# configs: (high-level channels, OCR mid, OCR key, classes, scale_attn) = (120, 32, 16, 19, 16).
TINY_DIMS = (120, 32, 16, 19, 16)
W48_DIMS = (720, 512, 256, 19, 256)
TINY_P = '''_base_ = [{base!r}]
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    backbone=dict(norm_cfg=norm_cfg, extra=dict(
        stage1=dict(num_blocks=(1, ), num_channels=(16, )),
        stage2=dict(num_blocks=(1, 1), num_channels=(8, 16)),
        stage3=dict(num_modules=1, num_blocks=(1, 1, 1), num_channels=(8, 16, 32)),
        stage4=dict(num_modules=1, num_blocks=(1, 1, 1, 1), num_channels=(8, 16, 32, 64)))),
    decode_head=[
        dict(type='FCNHead', in_channels=[8, 16, 32, 64], channels=120, kernel_size=1,
             num_convs=1, concat_input=False, dropout_ratio=-1, input_transform='resize_concat',
             in_index=(0, 1, 2, 3), num_classes=19, norm_cfg=norm_cfg, align_corners=False),
        dict(type='MscaleOCRHead', attn_channels=16, in_channels=[8, 16, 32, 64], channels=32,
             ocr_channels=16, dropout_ratio=-1, input_transform='resize_concat',
             in_index=(0, 1, 2, 3), num_classes=19, norm_cfg=norm_cfg, align_corners=False),
    ])
'''
TINY_S = '''_base_ = ['./tiny_psa_p.py']
model = dict(backbone=dict(psa=dict(mode='sequential')))
'''


@pytest.fixture(scope='module', autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def tiny_configs(tmp_path_factory) -> Dict[str, str]:
    folder = tmp_path_factory.mktemp('tiny_configs')
    (folder / 'tiny_psa_p.py').write_text(TINY_P.format(base=str(OFFICIAL['psa_p'])))
    (folder / 'tiny_psa_s.py').write_text(TINY_S)
    return {'psa_p': str(folder / 'tiny_psa_p.py'), 'psa_s': str(folder / 'tiny_psa_s.py')}


def released_head_shapes(c: int, mid: int, key: int, k: int,
                         attn: int) -> Dict[str, Tuple[int, ...]]:
    """Shapes of the released ``OCR_block`` and ``scale_attn`` parameters and buffers."""
    shapes = {
        'ocr.conv3x3_ocr.0.weight': (mid, c, 3, 3),
        'ocr.conv3x3_ocr.0.bias': (mid, ),
        OCB + 'f_pixel.0.weight': (key, mid, 1, 1),
        OCB + 'f_pixel.2.weight': (key, key, 1, 1),
        OCB + 'f_object.0.weight': (key, mid, 1, 1),
        OCB + 'f_object.2.weight': (key, key, 1, 1),
        OCB + 'f_down.0.weight': (key, mid, 1, 1),
        OCB + 'f_up.0.weight': (mid, key, 1, 1),
        'ocr.ocr_distri_head.conv_bn_dropout.0.weight': (mid, 2 * mid, 1, 1),
        'ocr.cls_head.weight': (k, mid, 1, 1),
        'ocr.cls_head.bias': (k, ),
        'ocr.aux_head.0.weight': (c, c, 1, 1),
        'ocr.aux_head.0.bias': (c, ),
        'ocr.aux_head.2.weight': (k, c, 1, 1),
        'ocr.aux_head.2.bias': (k, ),
        'scale_attn.conv0.weight': (attn, mid, 3, 3),
        'scale_attn.conv1.weight': (attn, attn, 3, 3),
        'scale_attn.conv2.weight': (1, attn, 1, 1),
    }
    norms = {
        'ocr.conv3x3_ocr.1.0': mid,
        OCB + 'f_pixel.1.0': key,
        OCB + 'f_pixel.3.0': key,
        OCB + 'f_object.1.0': key,
        OCB + 'f_object.3.0': key,
        OCB + 'f_down.1.0': key,
        OCB + 'f_up.1.0': mid,
        'ocr.ocr_distri_head.conv_bn_dropout.1.0': mid,
        'ocr.aux_head.1.0': c,
        'scale_attn.bn0': attn,
        'scale_attn.bn1': attn
    }
    for prefix, n in norms.items():
        for name in BN_KEYS:
            shapes[f'{prefix}.{name}'] = () if name == 'num_batches_tracked' else (n, )
    return shapes


# Released backbone keys read off hrnetv2.py (PSA in the BasicBlocks as ``deattn``).
RELEASED_BACKBONE_KEYS = [
    'backbone.conv1.weight',
    'backbone.bn2.running_var',
    'backbone.layer1.0.conv3.weight',
    'backbone.layer1.0.downsample.1.weight',
    'backbone.transition1.0.0.weight',
    'backbone.transition1.1.0.1.running_mean',
    'backbone.transition3.3.0.0.weight',
    'backbone.stage2.0.branches.0.0.deattn.conv_q_right.weight',
    'backbone.stage2.0.branches.1.0.bn1.num_batches_tracked',
    'backbone.stage2.0.fuse_layers.0.1.0.weight',
    'backbone.stage2.0.fuse_layers.1.0.0.1.bias',
    'backbone.stage4.0.fuse_layers.3.0.2.1.weight',
    'backbone.stage4.0.fuse_layers.3.0.1.0.weight',
]


def _tensor(name: str, shape: Tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Random values of the right kind (positive variances, BN scales near 1)."""
    if name.endswith('num_batches_tracked'):
        return torch.tensor(100)
    if name.endswith('running_var'):
        return 0.5 + torch.rand(shape, generator=g)
    if name.endswith('.weight') and len(shape) == 1:
        return 1 + 0.1 * torch.randn(shape, generator=g)
    if len(shape) == 4:
        return torch.randn(shape, generator=g) * (2.0 / np.prod(shape[1:]))**0.5
    return 0.1 * torch.randn(shape, generator=g)


def released_state_dict(config: str,
                        dims: Tuple[int, ...],
                        seed: int = 0,
                        prefix: str = 'module.') -> 'OrderedDict[str, torch.Tensor]':
    """A random released-format state dict for the network of ``config``: the backbone keys
    of mmseg's HRNet under the released names (``psa`` -> ``deattn``; checked against
    :data:`RELEASED_BACKBONE_KEYS`), the head keys from :func:`released_head_shapes`."""
    g = torch.Generator().manual_seed(seed)
    backbone = {
        k.replace('.psa.', '.deattn.'): tuple(v.shape)
        for k, v in build_model_of(config).state_dict().items() if k.startswith('backbone.')
    }
    shapes = dict(backbone, **released_head_shapes(*dims))
    return OrderedDict((prefix + k, _tensor(k, s, g)) for k, s in shapes.items())


def released_checkpoint(state_dict) -> dict:
    """What the released training saved beside the weights."""
    return dict(
        state_dict=state_dict,
        epoch=174,
        arch='network.ocrnet.HRNet_Mscale',
        optimizer=dict(state={}, param_groups=[dict(lr=0.01, params=[0, 1])]),
        mean_iu=np.float64(0.8695),
        command='python -m torch.distributed.launch train.py ...')


def _save(obj, path: Path) -> str:
    torch.save(obj, path)
    return str(path)


def _assert_nothing_written(folder: Path, dst: Path) -> None:
    assert not dst.exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(dst.name)]  # no temp files


# ---- the key mapping


@pytest.mark.parametrize('variant', ['psa_p', 'psa_s'])
def test_every_released_key_maps_onto_the_model(tiny_configs, variant):
    released = released_state_dict(tiny_configs[variant], TINY_DIMS)
    mapped, info = map_released_state_dict(released)
    model = build_model_of(tiny_configs[variant]).state_dict()
    assert set(mapped) == set(model)  # every key maps, nothing left over, nothing missing
    assert {
        k: tuple(v.shape)
        for k, v in mapped.items()
    } == {
        k: tuple(v.shape)
        for k, v in model.items()
    }
    assert len(mapped) == len(released) - 2  # the two folded biases
    assert info == dict(
        variant=variant,
        num_keys=len(mapped),
        scale_attn=True,
        folded_biases=['ocr.aux_head.0.bias', 'ocr.conv3x3_ocr.0.bias'])
    # without ``module.`` the result is the same
    assert list(map_released_state_dict({k[7:]: v for k, v in released.items()})[0]) == list(mapped)


@pytest.mark.parametrize('variant, released_tensors', [('psa_p', 2423), ('psa_s', 2943)])
def test_w48_has_as_many_keys_as_the_released_network(variant, released_tensors):
    """The counts of the released MscaleOCR built from its code (PSA_p: 2,423 tensors, PSA_s:
    2,943) equal the synthetic released state dict's, whose backbone holds the released key
    examples; the mmseg model has two fewer (the folded biases)."""
    released = released_state_dict(str(OFFICIAL[variant]), W48_DIMS)
    assert len(released) == released_tensors
    assert set(RELEASED_BACKBONE_KEYS) < {k[len('module.'):] for k in released}
    assert len(build_model_of(str(OFFICIAL[variant])).state_dict()) == released_tensors - 2


@pytest.mark.parametrize('released_prefix, mmseg_prefix, kernel', [
    ('ocr.aux_head', 'decode_head.0.convs.0', 1),
    ('ocr.conv3x3_ocr', 'decode_head.1.bottleneck', 3),
])
def test_folding_the_conv_bias_into_the_bn_is_exact(released_prefix, mmseg_prefix, kernel):
    """The released Sequential(conv with bias, BNReLU) and the converted mmcv ConvModule (no
    bias; BN running_mean - bias) give the same output (eval)."""
    g = torch.Generator().manual_seed(0)
    c_in, c_out = 6, 5
    conv = torch.nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=True)
    bn = torch.nn.BatchNorm2d(c_out)
    conv.weight.data.copy_(torch.randn(conv.weight.shape, generator=g))
    conv.bias.data.copy_(torch.randn(c_out, generator=g))
    bn.load_state_dict({name: _tensor(name, (c_out, ), g) for name in BN_KEYS})
    bn.running_mean.copy_(torch.randn(c_out, generator=g))
    released = {f'{released_prefix}.0.{k}': v for k, v in conv.state_dict().items()}
    released.update({f'{released_prefix}.1.0.{k}': v for k, v in bn.state_dict().items()})
    reference = torch.nn.Sequential(conv, bn, torch.nn.ReLU()).eval()

    mapped, info = map_released_state_dict(released)
    assert info['folded_biases'] == [f'{released_prefix}.0.bias']
    module = ConvModule(c_in, c_out, kernel, padding=kernel // 2, norm_cfg=dict(type='BN')).eval()
    module.load_state_dict({k[len(mmseg_prefix) + 1:]: v for k, v in mapped.items()})
    x = torch.randn(2, c_in, 7, 9, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(module(x), reference(x), rtol=0, atol=1e-5)


def test_variant_detection():
    p = ['backbone.stage2.0.branches.0.0.deattn.conv_up.weight']
    s = ['module.backbone.stage3.1.branches.2.3.deattn.conv_up.0.weight']
    assert psa_variant(p) == 'psa_p' and psa_variant(s) == 'psa_s'
    assert psa_variant([k.replace('deattn', 'psa') for k in p]) == 'psa_p'  # mmseg keys
    assert psa_variant(p + s) == 'mixed'
    assert psa_variant(['backbone.layer1.0.psa.ch_wz.weight']) == 'other'  # paper variant
    assert psa_variant(['backbone.conv1.weight', 'ocr.cls_head.weight']) is None


def test_unmapped_keys_and_non_tensors_are_named(tiny_configs):
    released = released_state_dict(tiny_configs['psa_p'], TINY_DIMS)
    released['module.ocr.extra_head.weight'] = torch.zeros(1)
    with pytest.raises(
            ConversionError, match=r'1 keys .* match no rule .*: '
            r'module\.ocr\.extra_head\.weight'):
        map_released_state_dict(released)
    with pytest.raises(ConversionError, match=r'not tensors \(epoch\)'):
        map_released_state_dict({'epoch': 3})


# ---- the converter end to end


@pytest.mark.parametrize('variant, wrapped', [('psa_p', True), ('psa_s', False)])
def test_convert_writes_an_mmseg_checkpoint(tiny_configs, tmp_path, variant, wrapped):
    released = released_state_dict(tiny_configs[variant], TINY_DIMS, prefix='module.' * wrapped)
    src = _save(released_checkpoint(released) if wrapped else released, tmp_path / 'src.pth')
    dst = tmp_path / 'out' / 'converted.pth'
    info = convert_released_checkpoint(src, str(dst), config=tiny_configs[variant])
    assert info['variant'] == variant and info['config'] == tiny_configs[variant]
    assert info['ignored'] == (['arch', 'command', 'epoch', 'mean_iu', 'optimizer']
                               if wrapped else [])
    saved = torch.load(dst, map_location='cpu', weights_only=True)
    assert saved['meta']['dataset_meta'] == dict(
        classes=CityscapesDataset.METAINFO['classes'],
        palette=CityscapesDataset.METAINFO['palette'])
    assert saved['meta']['converted_from']['psa'] == variant
    mapped, _ = map_released_state_dict(released)
    assert saved['state_dict'].keys() == mapped.keys()
    assert all(torch.equal(saved['state_dict'][k], v) for k, v in mapped.items())
    # what the Runner does with it: mmengine's loading into the config's model (strict_load)
    model = build_model_of(tiny_configs[variant]).to_empty(device='cpu')
    load_checkpoint(model, str(dst), map_location='cpu')
    assert torch.equal(model.decode_head[1].scale_attn[2].weight,
                       released[('module.' * wrapped) + 'scale_attn.conv2.weight'])


def test_cli_prints_the_variant_and_the_config(load_tool, tiny_configs, tmp_path, capsys):
    src = _save(
        released_checkpoint(released_state_dict(tiny_configs['psa_s'], TINY_DIMS)),
        tmp_path / 'released.pth')
    tool = load_tool('model_converters/psa_official_to_mmseg')
    tool.main([src, str(tmp_path / 'converted.pth'), '--config', tiny_configs['psa_s']])
    out = capsys.readouterr().out
    assert 'found PSA_s (sequential) with scale_attn' in out
    assert f'test it with: python tools/test.py {tiny_configs["psa_s"]} ' in out


# ---- bad inputs: a clear error, nothing written


def test_psa_p_checkpoint_with_the_psa_s_config_fails(tiny_configs, tmp_path):
    src = _save(
        released_checkpoint(released_state_dict(tiny_configs['psa_p'], TINY_DIMS)),
        tmp_path / 'released.pth')
    dst = tmp_path / 'converted.pth'
    with pytest.raises(ConversionError) as err:
        convert_released_checkpoint(src, str(dst), config=tiny_configs['psa_s'])
    assert re.search(
        r'holds PSA_p \(parallel\) blocks, but .*tiny_psa_s\.py builds PSA_s '
        r'\(sequential\) blocks: use --config .*psa-p_mscale-ocrnet_hr48_official', str(err.value))
    _assert_nothing_written(tmp_path, dst)


def test_checkpoint_that_does_not_fit_the_config_names_the_keys(tiny_configs, tmp_path):
    """A tiny PSA_p checkpoint against the W48 config (the default): shape mismatches."""
    src = _save(
        released_checkpoint(released_state_dict(tiny_configs['psa_p'], TINY_DIMS)),
        tmp_path / 'released.pth')
    dst = tmp_path / 'converted.pth'
    with pytest.raises(
            ConversionError,
            match=r'does not fit the model of .*psa-p_mscale-ocrnet'
            r'[\s\S]*shape mismatches: backbone\.'):
        convert_released_checkpoint(src, str(dst))
    _assert_nothing_written(tmp_path, dst)


@pytest.mark.parametrize('case', ['no_psa', 'no_scale_attn', 'not_a_checkpoint'])
def test_not_a_released_psa_checkpoint(tiny_configs, tmp_path, case):
    released = released_state_dict(tiny_configs['psa_p'], TINY_DIMS)
    if case == 'no_psa':
        obj = {k: v for k, v in released.items() if '.deattn.' not in k}
        message = r'no official PSA_p/PSA_s blocks .* not a released PSA checkpoint'
    elif case == 'no_scale_attn':
        obj = {k: v for k, v in released.items() if 'scale_attn' not in k}
        message = 'no scale_attn keys: not a HRNet_Mscale'
    else:
        obj = dict(meta=dict(epoch=3), weights=[1, 2])
        message = r'no state_dict in the checkpoint \(top-level keys: meta, weights\)'
    src = _save(obj, tmp_path / 'src.pth')
    dst = tmp_path / 'converted.pth'
    with pytest.raises(ConversionError, match=message):
        convert_released_checkpoint(src, str(dst), config=tiny_configs['psa_p'])
    _assert_nothing_written(tmp_path, dst)


class _Payload:
    """Not on any allow-list: weights_only loading must refuse to build it."""

    def __reduce__(self):
        return (os.getcwd, ())


@pytest.mark.parametrize('case', ['truncated', 'missing', 'unsafe'])
def test_unreadable_checkpoints_are_refused(load_tool, tiny_configs, tmp_path, case, capsys):
    src = tmp_path / 'released.pth'
    if case == 'truncated':
        _save(released_checkpoint(released_state_dict(tiny_configs['psa_p'], TINY_DIMS)), src)
        src.write_bytes(src.read_bytes()[:20000])
        message = r'released\.pth.*without its central directory'
    elif case == 'unsafe':
        _save({'state_dict': {}, 'hook': _Payload()}, src)
        message = r'released\.pth.*not on the allow-list'
    else:
        message = r'released\.pth.* does not exist'
    dst = tmp_path / 'converted.pth'
    with pytest.raises(CheckpointReadError, match=message):
        convert_released_checkpoint(str(src), str(dst), config=tiny_configs['psa_p'])
    tool = load_tool('model_converters/psa_official_to_mmseg')
    with pytest.raises(SystemExit) as exit_info:  # the CLI: one line, no traceback
        tool.main([str(src), str(dst), '--config', tiny_configs['psa_p']])
    assert str(exit_info.value).startswith('error: ') and re.search(message, str(exit_info.value))
    _assert_nothing_written(tmp_path, dst)


# ---- tools/test.py with converted checkpoints, on the tiny Cityscapes data


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('tiny_cityscapes')
    make_tiny_cityscapes(root, num_train=1, num_val=1, seed=0)
    return root


def _data_options(root: Path, scale=(128, 64)) -> dict:
    return {
        'test_dataloader.dataset.data_root': str(root),
        'test_dataloader.dataset.pipeline.1.scale': scale,
        'test_dataloader.num_workers': 0,
        'test_dataloader.persistent_workers': False,
    }


def test_testing_with_the_other_variants_config_fails(tiny_configs, tiny_data, tmp_path):
    """mmengine's Runner loads non-strictly; mmpsa's load check (tools/test.py) fails, naming
    the file and the keys (``strict_load`` of the segmentor says the same for any other
    loader: tests/test_seg/test_mscale_ocr.py)."""
    src = _save(
        released_checkpoint(released_state_dict(tiny_configs['psa_p'], TINY_DIMS)),
        tmp_path / 'released.pth')
    dst = str(tmp_path / 'converted_p.pth')
    convert_released_checkpoint(src, dst, config=tiny_configs['psa_p'])
    with pytest.raises(CheckpointMismatchError) as err:
        run_test_tool(
            tiny_configs['psa_s'],
            dst,
            work_dir=str(tmp_path / 'work'),
            cfg_options=dict(_data_options(tiny_data), log_level='WARNING'))
    text = str(err.value)
    assert 'converted_p.pth' in text and 'does not hold the model this config builds' in text
    assert 'backbone.stage2.0.branches.0.0.psa.conv_up.0.weight' in text
    # the right config runs
    metrics = run_test_tool(
        tiny_configs['psa_p'],
        dst,
        work_dir=str(tmp_path / 'work'),
        cfg_options=dict(_data_options(tiny_data), log_level='WARNING'))
    assert 0 <= metrics['mIoU'] <= 100


def test_tools_test_runs_the_official_config_on_a_converted_checkpoint(
        load_tool, tiny_data, tmp_path, capsys):
    """The issue's check: a synthetic released PSA_s W48 checkpoint, converted, tested with
    the official config by tools/test.py (3 scales; the frame resized to 64x128): wiring,
    not accuracy."""
    src = _save(
        released_checkpoint(released_state_dict(str(OFFICIAL['psa_s']), W48_DIMS)),
        tmp_path / 'released_psa_s.pth')
    dst = tmp_path / 'converted.pth'
    load_tool('model_converters/psa_official_to_mmseg').main([src, str(dst)])
    os.remove(src)
    options = [f'{k}={v}'.replace(' ', '') for k, v in _data_options(tiny_data).items()]
    load_tool('test').main([
        str(OFFICIAL['psa_s']),
        str(dst), '--work-dir',
        str(tmp_path / 'work'), '--cfg-options', *options
    ])
    out = capsys.readouterr().out
    assert 'found PSA_s (sequential)' in out
    assert re.search(r'Iter\(test\) \[1/1\] .*mIoU: \d+\.\d+', out)
    os.remove(dst)
