"""The block as a library-free layer: ``mmpsa.layers`` and ``mmpsa.insertion`` with torch alone.

Each check runs in a fresh interpreter in which the OpenMMLab libraries and OpenCV cannot be
imported (``sys.modules[name] = None`` makes ``import name`` raise), as on a bare GPU machine
that has only torch, triton and timm.
"""
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BLOCKED = ('mmengine', 'mmcv', 'cv2', 'mmseg', 'mmpose', 'mmdet')

SCRIPT = textwrap.dedent('''
    import json, os, sys
    BLOCKED = {blocked!r}
    for name in BLOCKED:
        sys.modules[name] = None  # `import name` now raises ImportError
    import torch
    from torch import nn
    from mmpsa.layers import PolarizedSelfAttention, backend
    from mmpsa.layers import dispatch
    from mmpsa.insertion import insert_psa

    report = dict(paths={{}}, base=PolarizedSelfAttention.__mro__[1].__module__)
    paths = ['auto', 'plain'] + (['triton'] if dispatch.triton_module() is not None else [])
    for variant in ('paper', 'official'):
        for mode in ('parallel', 'sequential'):
            for path in paths:
                torch.manual_seed(0)
                block = PolarizedSelfAttention(16, mode=mode, variant=variant).double()
                x = torch.randn(2, 16, 5, 3, dtype=torch.float64, requires_grad=True)
                with backend(path):
                    out = block(x)
                out.square().sum().backward()
                literal = PolarizedSelfAttention(16, mode=mode, variant=variant, fused=False)
                literal.load_state_dict(block.state_dict())
                ref = literal.double()(x.detach())
                err = (out - ref).abs().max().item()
                ok = err < 1e-10 and all(p.grad is not None for p in block.parameters())
                report['paths'][f'{{variant}}/{{mode}}/{{path}}'] = [block.last_path, ok]
    try:
        PolarizedSelfAttention(8, init_cfg=dict(type='Normal'))
    except ValueError as e:
        report['init_cfg'] = str(e)

    class Basic(nn.Module):  # the shape of a residual block: conv1, conv2
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return x + self.conv2(torch.relu(self.conv1(x)))

    net = nn.Module()
    net.layer1 = nn.Sequential(Basic(), Basic())
    net.res_layers = ['layer1']
    report['inserted'] = insert_psa(net, dict())
    net.layer1(torch.randn(1, 8, 4, 4)).sum().backward()
    report['psa_keys'] = sorted(k for k in net.state_dict() if '.psa.' in k)[:2]
    report['imported'] = sorted(
        name for name, mod in sys.modules.items()
        if mod is not None and name.split('.')[0] in BLOCKED)
    print(json.dumps(report))
''')


@pytest.fixture(scope='module')
def isolated_report(python_json):
    env = {'TRITON_INTERPRET': '1', 'PYTHONPATH': str(REPO), 'PATH': '/usr/bin:/bin'}
    return python_json(SCRIPT.format(blocked=BLOCKED), env)


def test_layer_imports_and_runs_without_the_openmmlab_libraries(isolated_report):
    assert isolated_report['imported'] == []
    assert isolated_report['base'] == 'torch.nn.modules.module'  # a plain nn.Module
    paths = isolated_report['paths']
    assert len(paths) >= 4 * 2
    for key, (taken, ok) in paths.items():
        assert ok, key  # equals the literal form, every parameter has a gradient
        asked = key.rsplit('/', 1)[1]
        assert taken == asked or (asked == 'auto' and taken in ('cpu', 'aten', 'plain')), key


def test_triton_path_runs_without_the_openmmlab_libraries(isolated_report):
    from mmpsa.layers import dispatch
    if dispatch.triton_module() is None:
        pytest.skip(dispatch.triton_status()[1])
    triton_runs = {k: v for k, v in isolated_report['paths'].items() if k.endswith('/triton')}
    assert len(triton_runs) == 4 and all(v == ['triton', True] for v in triton_runs.values())


def test_init_cfg_without_mmengine_is_refused(isolated_report):
    assert 'init_cfg needs mmengine' in isolated_report['init_cfg']
    assert "{'type': 'Normal'}" in isolated_report['init_cfg']


def test_insertion_without_mmengine(isolated_report):
    assert isolated_report['inserted'] == ['layer1.0.psa', 'layer1.1.psa']
    assert isolated_report['psa_keys'][0].startswith('layer1.0.psa.')
