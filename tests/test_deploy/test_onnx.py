"""ONNX export checked against onnxruntime: the block alone, the export-time rewrite of
mmseg's Upsample, tiny PSA-HRNet seg and pose models, and a user config through the tool.

The model exports take tens of seconds each on two shared cores (torch.export + the ONNX
conversion); the block and Upsample exports a few seconds.
"""
import importlib.util

import pytest
import torch

from mmpsa import compat
from mmpsa.datasets.tiny import TINY_POSE, TINY_SEG
from mmpsa.deploy import rewriters
from mmpsa.deploy.onnx import TOLERANCE, DeployError, export_config, export_module
from mmpsa.layers import PolarizedSelfAttention

# the deploy extra (requirements/deploy.txt; the set-up installs it)
pytest.importorskip('onnxruntime')
pytest.importorskip('onnxscript')
if not compat.has_dynamo_onnx_export():  # the refusal itself: tests/test_compat.py
    pytest.skip(
        f'ONNX export needs torch >= {compat.ONNX_EXPORT_TORCH}, this is {torch.__version__}',
        allow_module_level=True)


def quiet(_line: str) -> None:
    pass


def assert_exact(report, sizes):
    assert [c.shape for c in report.checks] == sizes
    for check in report.checks:
        assert check.max_rel <= TOLERANCE, str(check)


@pytest.mark.parametrize('mode', ['parallel', 'sequential'])
@pytest.mark.parametrize('variant', ['paper', 'official'])
def test_block_exports_exactly_at_two_sizes(tmp_path, variant, mode):
    torch.manual_seed(0)
    block = PolarizedSelfAttention(16, mode=mode, variant=variant).eval()
    for p in block.parameters():  # away from the init (official: zero-initialised maps)
        torch.nn.init.normal_(p, std=0.3)
    report = export_module(
        block, (8, 12), tmp_path / 'psa.onnx', dynamic=True, channels=16, size_divisor=4, log=quiet)
    assert_exact(report, [(8, 12), (12, 16), (16, 16)])
    assert report.path.is_file()


def _block() -> torch.nn.Module:
    torch.manual_seed(0)
    block = PolarizedSelfAttention(16).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return block


def test_a_checked_size_that_is_off_fails_and_removes_the_file(tmp_path, monkeypatch):
    """Issue 26 item 4: the third checked size 50 % off printed OK and kept the file."""
    from mmpsa.deploy import onnx
    real = onnx.run_onnx

    def off_at_the_third_size(path, inputs):
        out = real(path, inputs)
        return out * 1.5 if tuple(inputs.shape[2:]) == (16, 16) else out

    monkeypatch.setattr(onnx, 'run_onnx', off_at_the_third_size)
    out = tmp_path / 'off.onnx'
    with pytest.raises(DeployError) as err:
        export_module(_block(), (8, 12), out, dynamic=True, channels=16, size_divisor=4, log=quiet)
    text = str(err.value)
    assert "16x16" in text and 'relative 5.00e-01' in text  # the size and the error
    assert 'multiples of --size-divisor 4' in text  # the rule
    assert not out.exists()


def test_dynamic_sizes_must_be_multiples_of_the_divisor(tmp_path):
    with pytest.raises(ValueError, match='multiples of --size-divisor 32.*8x12'):
        export_module(_block(), (8, 12), tmp_path / 'x.onnx', dynamic=True, channels=16, log=quiet)


def test_onnxruntime_error_text_is_kept(tmp_path, monkeypatch):
    from mmpsa.deploy import onnx
    real = onnx.run_onnx

    def refuses_the_second_size(path, inputs):
        if tuple(inputs.shape[2:]) == (12, 16):
            raise RuntimeError('[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid '
                               'dimensions for input: inputs')
        return real(path, inputs)

    monkeypatch.setattr(onnx, 'run_onnx', refuses_the_second_size)
    with pytest.raises(DeployError, match='RuntimeError: .*INVALID_ARGUMENT : Got invalid'):
        export_module(
            _block(), (8, 12),
            tmp_path / 'x.onnx',
            dynamic=True,
            channels=16,
            size_divisor=4,
            log=quiet)


class MscaleCascadeEncoderDecoder(torch.nn.Module):
    """Stands for mmpsa's mscale segmentor (refused by its class name and test scales)."""

    def __init__(self, scales):
        super().__init__()
        self.test_cfg = dict(scales=scales)


def test_an_mscale_model_is_refused_saying_why():
    from mmpsa.deploy.onnx import refuse_mscale
    with pytest.raises(DeployError, match=r'combines the scales \[0.5, 1.0, 2.0\].*single-scale'):
        refuse_mscale(MscaleCascadeEncoderDecoder([0.5, 1.0, 2.0]), 'mscale.py')
    refuse_mscale(MscaleCascadeEncoderDecoder([1.0]), 'mscale.py')  # on purpose


class StockUpsampleNet(torch.nn.Module):
    """mmseg's Upsample, then a resize to a symbolic size: HRNet's fuse-layer pattern,
    where a baked-in upsample size is hidden by the resize."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        from mmseg.models.utils import Upsample
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.up = Upsample(scale_factor=scale, mode='bilinear', align_corners=False)

    def forward(self, x):
        y = self.up(self.conv(x))
        return torch.nn.functional.interpolate(
            y, size=(x.shape[2] * 2, x.shape[3] * 2), mode='bilinear', align_corners=False)


@pytest.mark.skipif(importlib.util.find_spec('mmseg') is None, reason='needs mmseg')
@pytest.mark.parametrize('scale', [2, 1.5])
def test_upsample_rewrite_keeps_sizes_symbolic(tmp_path, scale):
    from mmseg.models.utils import Upsample
    stock = Upsample.forward
    report = export_module(
        StockUpsampleNet(scale).eval(), (16, 24),
        tmp_path / 'up.onnx',
        dynamic=True,
        size_divisor=8,
        log=quiet)
    assert_exact(report, [(16, 24), (24, 32), (32, 32)])
    assert report.rewrites == ['mmseg.models.utils.wrappers.Upsample.forward']
    assert Upsample.forward is stock  # restored


@pytest.mark.skipif(importlib.util.find_spec('mmseg') is None, reason='needs mmseg')
def test_dynamic_refused_naming_the_module_that_bakes_a_size(tmp_path, monkeypatch):
    monkeypatch.setattr(rewriters, 'REWRITES', [])  # the stock Upsample.forward
    out = tmp_path / 'up.onnx'
    with pytest.raises(DeployError, match=r'--dynamic refused.*baked in.*up \(Upsample\)'):
        export_module(
            StockUpsampleNet(2).eval(), (16, 24), out, dynamic=True, size_divisor=8, log=quiet)
    assert not out.exists()  # never a silently wrong file


def test_tiny_psa_hrnet_seg_model_exact_at_any_size(tmp_path):
    lines = []
    report = export_config(
        TINY_SEG, tmp_path / 'seg.onnx', (64, 128), dynamic=True, log=lines.append)
    assert_exact(report, [(64, 128), (96, 160), (128, 160)])  # multiples of 32
    assert report.notes == ['exact at 64x128, 96x160, 128x160 (multiples of --size-divisor 32)']
    assert any('converting to ONNX' in ln for ln in lines)  # progress


def test_tiny_psa_hrnet_pose_model_exact_at_multiples_of_32(tmp_path):
    report = export_config(TINY_POSE, tmp_path / 'pose.onnx', (96, 64), dynamic=True, log=quiet)
    assert_exact(report, [(96, 64), (128, 96), (160, 96)])
    assert report.notes == ['exact at 96x64, 128x96, 160x96 (multiples of --size-divisor 32)']


def test_user_config_exports_with_the_tool(tmp_path, load_tool, capsys):
    config = tmp_path / 'psa_deeplabv3plus_r18.py'
    config.write_text(
        "_base_ = ['mmseg::deeplabv3plus/deeplabv3plus_r18-d8_4xb2-80k_cityscapes-512x1024.py']\n"
        "custom_imports = dict(imports=['mmpsa'], allow_failed_imports=False)\n"
        "model = dict(backbone=dict(type='PSAResNetV1c', psa=dict(mode='parallel')))\n")
    out = tmp_path / 'user.onnx'
    tool = load_tool('deployment/export_onnx')
    assert tool.main([str(config), '--out', str(out), '--shape', '64', '64']) == 0
    assert out.is_file()
    assert f'OK {out}: onnxruntime equals eager' in capsys.readouterr().out


def test_tool_fails_clearly_on_a_config_it_cannot_export(tmp_path, load_tool, capsys):
    config = tmp_path / 'det.py'
    config.write_text("default_scope = 'mmdet'\nmodel = dict(type='RetinaNet')\n")
    tool = load_tool('deployment/export_onnx')
    assert tool.main([str(config), '--out', str(tmp_path / 'x.onnx'), '--shape', '64', '64']) == 1
    assert "default_scope must be one of ('mmseg', 'mmpose'), got 'mmdet'" in capsys.readouterr(
    ).err
    assert tool.main([str(tmp_path / 'missing.py'), '--out', 'x.onnx', '--shape', '8', '8']) == 1
    assert 'config not found' in capsys.readouterr().err
