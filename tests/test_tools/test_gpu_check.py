"""tools/dev/gpu_check.sh in its CPU smoke mode (TRITON_INTERPRET=1, tiny shapes), as on a bare GPU
machine: mmengine, mmcv, cv2, mmseg, mmpose and mmdet are blocked (a ``sitecustomize`` sets
``sys.modules[name] = None``, so importing any of them raises). Every section passes, the parity
rows are within tolerance, and each row names the path that ran."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmpsa.analysis.gpu_check import OPENMMLAB, SECTIONS

REPO = Path(__file__).resolve().parents[2]
TOL = {'fp32': 1e-5, 'bf16': 2e-2, 'fp64': 1e-10}


def _rows(text: str, first: str) -> list:
    """The cells of the Markdown rows of ``text`` whose first cell is ``first``-like."""
    return [[c.strip() for c in line.strip().strip('|').split('|')] for line in text.splitlines()
            if re.match(rf'\| ({first}) \|', line)]


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    pytest.importorskip('triton', reason='triton is not importable (CPU-only torch wheels)')
    from mmpsa import compat
    from mmpsa.layers import dispatch
    if compat.triton_version() < dispatch.MIN_TRITON:  # the check runs the Triton path
        pytest.skip(f'needs triton >= {".".join(map(str, dispatch.MIN_TRITON))}, this is triton '
                    f'{".".join(map(str, compat.triton_version()))} (torch {torch.__version__})')
    tmp = tmp_path_factory.mktemp('gpu_check')
    site = tmp / 'site'
    site.mkdir()
    (site / 'sitecustomize.py').write_text(
        'import sys\n'
        f'for name in {OPENMMLAB!r}:\n'
        '    sys.modules[name] = None  # import raises ImportError\n')
    env = dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES='', PYTHONPATH=str(site))
    env.pop('MMPSA_BACKEND', None)
    out = tmp / 'out'
    proc = subprocess.run(
        ['bash', str(REPO / 'tools' / 'dev' / 'gpu_check.sh'),
         str(out), '--smoke'],
        env=env,
        capture_output=True,
        text=True,
        timeout=3000)
    return proc, out


def test_every_section_passes_without_openmmlab(smoke):
    proc, out = smoke
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (out / 'summary.txt').read_text().splitlines()
    assert summary == [f'{s} rc=0' for s in SECTIONS], proc.stdout
    pre = (out / 'preflight.md').read_text()
    assert 'mmpsa.layers: imported' in pre and 'TRITON_INTERPRET=1' in pre
    assert 'OpenMMLab modules imported: none' in pre
    for name in SECTIONS:  # the blocker held: nothing tried to import them
        assert 'ModuleNotFoundError' not in (out / f'{name}.md').read_text(), name


def test_parity_rows_within_tolerance_and_name_the_paths(smoke):
    from mmpsa.layers import dispatch
    _, out = smoke
    text = (out / 'parity.md').read_text()
    header = _rows(text, 'variant')[0]
    assert header[6:10] == ['literal', 'auto', 'triton', 'aten'], header
    rows = _rows(text, 'paper|official')
    # every variant x mode, and fp32, bf16, fp64, channels_last
    assert {(r[0], r[1])
            for r in rows} == {('paper', 'parallel'), ('paper', 'sequential'),
                               ('official', 'parallel'), ('official', 'sequential')}
    assert {r[2] for r in rows} == set(TOL) and 'channels_last' in {r[4] for r in rows}
    built = dispatch.extension() is not None
    for r in rows:
        assert r[-1] == 'pass' and r[-2] == 'yes', r
        cells = dict(zip(header[6:10], r[6:10]))
        # the path each ran, by name: the interpreter ran the Triton kernels
        assert cells['triton'].endswith(' triton'), r
        assert cells['literal'].endswith(' literal'), r
        assert cells['auto'].split()[1] in (('cpu', 'aten') if built else ('plain', )), r
        if built:
            assert cells['aten'].endswith(' aten'), r
        else:
            assert cells['aten'] == 'n/a', r
        for path in ('auto', 'triton') + (('aten', ) if built else ()):
            error = float(cells[path].split()[0])
            assert 0 <= error <= TOL[r[2]], (path, r)


def test_block_kernels_and_network_name_what_ran(smoke):
    _, out = smoke
    block = (out / 'block.md').read_text()
    assert 'literal ms | triton ms | aten ms | bn ms | ran' in block
    assert 'literal=literal, triton=triton' in block and 'bn=bn' in block
    profile = _rows(block, 'paper')
    assert {r[4] for r in profile} >= {'bn', 'triton'}
    assert all(r[4] == r[5] for r in profile if r[4] in ('bn', 'triton')), profile
    kernels = (out / 'kernels.md').read_text()
    assert '_pool_kernel' in kernels and 'nothing is compiled' in kernels
    network = _rows((out / 'network.md').read_text(), 'tiny ResNet.*?')
    assert [r[4] for r in network] == ['stock', 'fused'], network
    assert network[1][-1].split()[0] in ('cpu', 'aten', 'plain'), network
