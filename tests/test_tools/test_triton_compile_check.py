"""tools/triton_compile_check.py: the Triton kernels compile for an NVIDIA GPU (sm_90)
here, without one (triton's wheel ships ptxas)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip('triton', reason='triton is not importable (CPU-only torch wheels)')


def _run(*args: str, interpret: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    if interpret:
        env['TRITON_INTERPRET'] = '1'
    return subprocess.run([sys.executable, 'tools/triton_compile_check.py', *args],
                          cwd=ROOT,
                          env=env,
                          capture_output=True,
                          text=True,
                          timeout=600)


def test_kernels_compile_for_sm90(load_tool):
    # fp64 (exp in double precision) at the widest tile (8192 channels, one pixel)
    done = _run('--dtypes', 'fp64', '--tiles', '8192x1')
    assert done.returncode == 0, done.stdout + done.stderr
    total = len(load_tool('triton_compile_check').LAUNCHES)
    assert f'{total}/{total} compiled for sm_90' in done.stdout
    assert done.stdout.count('ok sm_90 _grad_input_kernel fp64') == 8


def test_refuses_the_interpreter():
    done = _run(interpret=True)
    assert done.returncode == 2 and 'TRITON_INTERPRET=1' in done.stderr
