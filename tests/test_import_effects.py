"""Importing mmpsa registers and changes nothing else (the list in ``mmpsa/__init__.py``).

Each check runs in a fresh interpreter, so what earlier tests imported cannot hide an effect.
"""
import pytest

#: Torch's process-wide module hooks: a plugin must leave every one of them as it found it.
TORCH_GLOBAL_HOOKS = r'''
import json, sys
import torch.nn.modules.module as m
def hooks():
    return {name: len(value) for name, value in vars(m).items()
            if name.startswith('_global') and isinstance(value, dict)}
before = hooks()
import mmpsa, mmpsa.seg, mmpsa.pose, mmpsa.analysis  # noqa: E401
after = hooks()
print(json.dumps(dict(before=before, after=after, n=len(before))))
'''

#: A stock mmseg segmentor (no PSA anywhere) built and run with fixed seeds; ``IMPORT`` is
#: replaced by ``import mmpsa`` or nothing.
STOCK_MODEL = r'''
import json, sys
IMPORT
import torch
from mmengine.registry import init_default_scope
from mmseg.registry import MODELS
init_default_scope('mmseg')
torch.manual_seed(0)
bn = dict(type='BN', requires_grad=True)
model = MODELS.build(dict(
    type='EncoderDecoder',
    data_preprocessor=dict(type='SegDataPreProcessor', size=(32, 64)),
    backbone=dict(type='ResNetV1c', depth=18, num_stages=4, out_indices=(0, 1, 2, 3),
                  norm_cfg=bn, strides=(1, 2, 2, 2), dilations=(1, 1, 1, 1)),
    neck=dict(type='FPN', in_channels=[64, 128, 256, 512], out_channels=16, num_outs=4),
    decode_head=dict(type='FCNHead', in_channels=16, in_index=3, channels=8, num_convs=1,
                     num_classes=5, norm_cfg=bn),
))
model.init_weights()
model.train()
x = torch.randn(2, 3, 32, 64)
out = model(x, mode='tensor')
out.square().mean().backward()
grads = [p.grad.double().sum().item() for p in model.parameters() if p.grad is not None]
print(json.dumps(dict(
    keys=sorted(model.state_dict()),
    modules=[type(m).__name__ for m in model.modules()],
    out=out.double().sum().item(), out_abs=out.double().abs().sum().item(), grads=grads)))
'''


def test_import_leaves_torch_global_module_hooks_unchanged(python_json):
    seen = python_json(TORCH_GLOBAL_HOOKS)
    assert seen['n'] >= 4, seen  # the forward/backward/registration hook dicts were found
    assert seen['after'] == seen['before'], seen


def test_a_stock_mmseg_model_builds_and_runs_the_same_with_and_without_mmpsa(python_json):
    without = python_json(STOCK_MODEL.replace('IMPORT', 'pass'))
    with_mmpsa = python_json(STOCK_MODEL.replace('IMPORT', 'import mmpsa  # noqa: F401'))
    assert with_mmpsa == without  # keys, module types, outputs and gradients, bit for bit


def test_the_global_effects_are_the_documented_ones(python_json, tmp_path):
    """Items 2-5 of ``mmpsa/__init__``'s list, each seen in a fresh process; item 4 by its
    use: a weights-only ``torch.load`` of an mmengine ``HistoryBuffer`` fails before the import
    and succeeds after it."""
    from mmpsa import compat
    allow_list = compat.has_add_safe_globals()
    code = r'''
import json
import pickle
import torch
from mmengine.config import Config
from mmengine.fileio.backends.registry_utils import backends
from mmengine.logging import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader
cfg_path, schemes, names = Config._get_cfg_path, dict(CheckpointLoader._schemes), set(backends)
buffer = HistoryBuffer()
buffer.update(1.0)  # as a message hub's loss history
torch.save(dict(buffer=buffer), PATH)
def loads():
    try:
        torch.load(PATH, weights_only=True)
        return True
    except pickle.UnpicklingError:
        return False
before = loads() if ALLOW_LIST else None
import mmpsa
print(json.dumps(dict(
    cfg_path_wrapped=Config._get_cfg_path is not cfg_path,
    new_backends=sorted(set(backends) - names),
    changed_schemes=sorted(k for k, v in CheckpointLoader._schemes.items()
                           if schemes.get(k) is not v),
    loads=[before, loads() if ALLOW_LIST else None])))
'''.replace('PATH', repr(str(tmp_path / 'buffer.pth'))).replace('ALLOW_LIST', str(allow_list))
    seen = python_json(code)
    assert seen['cfg_path_wrapped']
    assert seen['new_backends'] == ['mmpsa_atomic_local']
    from mmpsa.checkpoint.door import DOOR_SCHEMES
    assert sorted(DOOR_SCHEMES) == seen['changed_schemes']
    if not allow_list:
        pytest.skip('torch < 2.4 has no weights-only allow-list to extend (mmpsa.compat)')
    assert seen['loads'] == [False, True]
