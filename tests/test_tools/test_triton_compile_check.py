"""tools/dev/triton_compile_check.py: the Triton kernels the runtime launches compile for an NVIDIA
GPU (sm_90) here, without one (triton's wheel ships ptxas), and keep their tiles in registers."""
import os
import re
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
    return subprocess.run([sys.executable, 'tools/dev/triton_compile_check.py', *args],
                          cwd=ROOT,
                          env=env,
                          capture_output=True,
                          text=True,
                          timeout=600)


def test_runtime_tiles_do_not_spill_on_sm90():
    # a subset of the GPU check's set: the widest-channel tile (C=384: 512x4), fp32 and bf16,
    # every variant, as the runtime's tile chooser and launches give them
    done = _run('--dtypes', 'fp32', 'bf16', '--shapes', '32x384x8x6')
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith(('ok', 'SPILLS'))]
    total = int(re.search(r'(\d+) distinct launches', done.stdout).group(1))
    assert len(lines) == total and f'{total}/{total} compiled for sm_90, 0 spilling' in done.stdout
    for dtype in ('fp32', 'bf16'):  # every kernel, with the chooser's tile and warps
        for kernel in ('_pool_kernel', '_spatial_kernel', '_grad_pool_kernel',
                       '_grad_input_kernel'):
            assert any(
                f'{kernel} x={dtype} ' in line and 'BLOCK_C=512 BLOCK_N=4 num_warps=8' in line
                for line in lines), (kernel, dtype)
    for kernel in ('_vector_kernel', '_vector_grad_kernel'):  # one program per sample
        for flags in ('PAPER=True SEQ=False', 'PAPER=True SEQ=True', 'PAPER=False SEQ=False',
                      'PAPER=False SEQ=True'):
            assert any(f'{kernel} x=? {flags} ' in line for line in lines), (kernel, flags)
    assert any(line.split()[2] == '_batch_sum_kernel' for line in lines)
    spills = [int(v) for line in lines for v in re.findall(r'spill_(?:stores|loads)=(\d+)', line)]
    assert len(spills) == 2 * total and not any(spills)


def test_per_sample_vector_kernels_do_not_spill_in_fp64():
    # cases that spilled before (issue #27): the per-sample vector kernels in fp64, the paper
    # variant's backward at C=64 (parallel) and official PSA_s's forward at C=192 (sequential),
    # where values live across fp64 division / square root slow-path calls, loop guards and
    # vectors kept live from the top were spilled
    done = _run('--dtypes', 'fp64', '--shapes', '2x64x12x9', '2x192x12x9', '--variants',
                'paper-parallel', 'official-sequential')
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith(('ok', 'SPILLS'))]
    total = int(re.search(r'(\d+) distinct launches', done.stdout).group(1))
    assert len(lines) == total and f'{total}/{total} compiled for sm_90, 0 spilling' in done.stdout
    for kernel, flags, block_c in (('_vector_grad_kernel', 'PAPER=True SEQ=False', 64),
                                   ('_vector_kernel', 'PAPER=False SEQ=True', 256)):
        assert any(f'{kernel} x=? {flags} ' in line and 'ACC=fp64' in line
                   and f'BLOCK_C={block_c} ' in line and 'spill_stores=0 spill_loads=0' in line
                   for line in lines), (kernel, flags, block_c)


def test_refuses_the_interpreter():
    done = _run(interpret=True)
    assert done.returncode == 2 and 'TRITON_INTERPRET=1' in done.stderr
