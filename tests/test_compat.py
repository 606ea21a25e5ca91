"""The compatibility module (mmpsa/compat.py): each entry on this torch, and with its API
simulated absent, as on the older torch versions of the support matrix (2.1 ... 2.5)."""
import importlib
import warnings

import pytest
import torch

from mmpsa import compat


def test_torch_version_and_require():
    assert compat.torch_version() >= (2, 1)
    compat.require_torch('2.0', 'anything')
    with pytest.raises(
            compat.UnsupportedVersionError,
            match=r'ONNX export needs torch >= 99\.0, this is torch '):
        compat.require_torch('99.0', 'ONNX export')


def test_is_compiling_without_torch_compiler_api(monkeypatch):
    # torch < 2.3 has no torch.compiler.is_compiling: the entry asks torch._dynamo
    import torch._dynamo  # (imported before the API goes: it imports it)
    assert compat.is_compiling() is False
    monkeypatch.delattr(torch.compiler, 'is_compiling', raising=False)  # absent on 2.1/2.2
    seen = []
    monkeypatch.setattr(torch._dynamo, 'is_compiling', lambda: seen.append(1) or True)
    assert compat.is_compiling() is True and seen == [1]


@pytest.mark.parametrize('version', [(2, 3), None])
def test_autocast_by_device(version, monkeypatch):
    # torch < 2.4: torch.is_autocast_enabled() takes no device (CUDA), the CPU has its own
    if version is not None:  # the old branch: is_autocast_cpu_enabled() for the CPU
        monkeypatch.setattr(compat, 'torch_version', lambda: version)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # is_autocast_cpu_enabled is deprecated on new torch
        assert not compat.is_autocast_enabled('cpu')
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert compat.is_autocast_enabled('cpu')
            with compat.no_autocast('cpu'):
                assert not compat.is_autocast_enabled('cpu')
                assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32
        assert not compat.is_autocast_enabled('cuda')


def test_add_safe_globals_absent(monkeypatch):
    assert compat.has_add_safe_globals() == (compat.torch_version() >= (2, 4))
    monkeypatch.delattr(torch.serialization, 'add_safe_globals', raising=False)
    assert not compat.has_add_safe_globals()
    assert compat.add_safe_globals([object]) is False  # nothing to add to: the door's other branch


def test_triton_op_absent(monkeypatch):
    monkeypatch.setattr(compat, 'torch_version', lambda: (2, 5))
    assert not compat.has_triton_op()
    with pytest.raises(compat.UnsupportedVersionError, match=r'needs torch >= 2\.6'):
        compat.triton_op('mmpsa::nothing', lambda x: x)
    kernel = object()
    assert compat.wrap_triton(kernel) is kernel


def test_load_state_dict_pre_hook_without_public_api(monkeypatch):
    # torch < 2.5 has only the private _register_load_state_dict_pre_hook(with_module=True)
    seen = []

    def hook(module, state_dict, prefix, *args):
        seen.append((module, sorted(state_dict), prefix))

    for absent in (False, True):
        if absent:
            monkeypatch.delattr(torch.nn.Module, 'register_load_state_dict_pre_hook', raising=False)
        seen.clear()
        outer = torch.nn.Sequential(torch.nn.Linear(2, 2))
        handle = compat.register_load_state_dict_pre_hook(outer[0], hook)
        outer.load_state_dict(outer.state_dict())
        assert seen == [(outer[0], ['0.bias', '0.weight'], '0.')]
        handle.remove()
        outer.load_state_dict(outer.state_dict())
        assert len(seen) == 1


@pytest.mark.parametrize('version', [(2, 1), (2, 4)])
def test_onnx_export_refused_before_2_5(version, monkeypatch, tmp_path):
    # torch.export.Dim.AUTO and torch.onnx.export(dynamo=True) come with torch 2.5: an older
    # torch refuses naming the version, never an AttributeError
    from mmpsa.deploy import onnx
    monkeypatch.setattr(compat, 'torch_version', lambda: version)
    assert not compat.has_dynamo_onnx_export()
    message = r'ONNX export .* needs torch >= 2\.5, this is torch '
    with pytest.raises(compat.UnsupportedVersionError, match=message):
        onnx.export_module(torch.nn.Conv2d(3, 1, 1), (32, 32), tmp_path / 'm.onnx', dynamic=True)
    with pytest.raises(compat.UnsupportedVersionError, match=message):
        onnx.export_config('no/such/config.py', tmp_path / 'm.onnx', (32, 32))
    assert not (tmp_path / 'm.onnx').exists()


def test_onnx_export_apis_absent(monkeypatch):
    assert compat.has_dynamo_onnx_export() == (compat.torch_version() >= (2, 5))
    if compat.torch_version() < (2, 5):
        pytest.skip(f'the APIs are absent already: this is torch {torch.__version__}')
    export = importlib.import_module('torch.export')
    assert compat.dim_auto() is export.Dim.AUTO
    monkeypatch.delattr(export.Dim, 'AUTO')  # a torch between 2.2 (Dim) and 2.5
    assert not compat.has_dynamo_onnx_export()
    with pytest.raises(compat.UnsupportedVersionError, match=r'needs torch >= 2\.5'):
        compat.dim_auto()


def test_no_hasattr_torch_outside_compat():
    # the rule of the module: version checks live here only
    import ast
    from pathlib import Path
    root = Path(compat.__file__).parent
    found = []
    for path in root.rglob('*.py'):
        if path.name == 'compat.py':
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, 'id', None) == 'hasattr'
                    and node.args and ast.unparse(node.args[0]).startswith('torch')):
                found.append(f'{path.relative_to(root)}:{node.lineno}')
    assert found == []
