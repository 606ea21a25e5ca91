"""The Triton path is deterministic: its reductions across programs are partial sums reduced
in a fixed order, never float atomics (what mmengine's ``deterministic=True`` expects).

Under triton's interpreter the programs run one after another, so a bitwise comparison of two
runs cannot catch atomics here: the source is checked as well (the GPU check compares two runs
on a GPU).
"""
import ast
import inspect

import pytest
import torch

SUPPORTED = [('paper', 'parallel'), ('paper', 'sequential'), ('official', 'parallel'),
             ('official', 'sequential')]


def test_no_atomics_in_the_kernels(triton_kernels):
    tree = ast.parse(inspect.getsource(triton_kernels))
    atomics = [
        f'line {node.lineno}: {ast.unparse(node.func)}' for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr.startswith('atomic_')
    ]
    assert not atomics, f'float atomics make the sums order-dependent: {atomics}'
    assert 'atomic' not in inspect.getsource(triton_kernels).replace('atomics', '')


@pytest.mark.parametrize('variant,mode', SUPPORTED)
def test_two_runs_are_bitwise_equal(variant, mode, triton_kernels, set_fused_path, block_oracle,
                                    monkeypatch):
    # several runs of pixels per sample: partial sums merged across programs
    set_fused_path('triton')
    monkeypatch.setattr(triton_kernels, '_MAX_BLOCK_N', 4)
    monkeypatch.setattr(triton_kernels, '_TARGET_PROGRAMS', 6)
    block = block_oracle.make(variant, mode, perturb=0.3)
    torch.manual_seed(2)
    x = block_oracle.randn(2, 32, 5, 5)
    grad = torch.randn_like(x)
    first, second = (block_oracle.fwd_bwd(block, x, grad) for _ in range(2))
    assert triton_kernels._Launch(x).runs == 3 and block.last_path == 'triton'
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert all(torch.equal(first[2][name], second[2][name]) for name in first[2])
