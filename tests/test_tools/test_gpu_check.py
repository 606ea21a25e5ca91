"""tools/gpu_check.sh in its CPU smoke mode (TRITON_INTERPRET=1, tiny shapes): every section
runs and writes its part, and each row says which path ran."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_smoke(tmp_path):
    pytest.importorskip('triton', reason='triton is not importable (CPU-only torch wheels)')
    env = dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES='')
    env.pop('MMPSA_BACKEND', None)
    proc = subprocess.run(
        ['bash', str(REPO / 'tools' / 'gpu_check.sh'),
         str(tmp_path), '--smoke'],
        env=env,
        capture_output=True,
        text=True,
        timeout=1500)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (tmp_path / 'summary.txt').read_text().split('\n')
    for section in ('env', 'wheels', 'build', 'parity', 'block'):
        assert f'{section} rc=0' in summary, proc.stdout
    assert 'network skipped' in summary
    env_md = (tmp_path / 'env.md').read_text()
    assert 'TRITON_INTERPRET=1' in env_md and 'mmpsa._ext built and loaded' in env_md
    # parity: auto, triton and aten each a small error against the fp64 literal form
    row = [
        line for line in (tmp_path / 'parity.md').read_text().splitlines()
        if line.startswith('| paper | sequential | bf16')
    ][-1]
    errors = [float(cell) for cell in row.strip('|').split('|')[4:]]
    assert len(errors) == 3 and all(0 < e < 5e-2 for e in errors), row
    block = (tmp_path / 'block.md').read_text()
    assert 'literal ms | aten ms | triton ms | bn ms | ran' in block
    assert 'literal=plain/literal, aten=compiled, triton=triton, bn=bn' in block
