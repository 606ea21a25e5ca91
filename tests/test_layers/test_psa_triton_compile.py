"""``torch.compile`` sees the Triton path: the block goes through the custom op
``mmpsa::psa_triton`` (``torch.library.triton_op``, torch >= 2.6), one graph without breaks.

Under triton's interpreter ``wrap_triton`` returns the raw kernel and ``aot_eager`` cannot run
the kernels on fake tensors, so here the check is dynamo's graph; compiled parity and CUDA-graph
capture are the GPU check's.
"""
import pytest
import torch

from mmpsa import compat
from mmpsa.layers import dispatch

SUPPORTED = [('paper', 'parallel'), ('paper', 'sequential'), ('official', 'parallel'),
             ('official', 'sequential')]

pytestmark = pytest.mark.skipif(
    not compat.has_triton_op(), reason='torch.library.triton_op needs torch >= 2.6')


@pytest.mark.parametrize('variant,mode', SUPPORTED)
def test_dynamo_sees_one_graph_with_the_op(variant, mode, triton_kernels, set_fused_path,
                                           block_oracle):
    set_fused_path('triton')
    torch._dynamo.reset()
    block = block_oracle.make(variant, mode)
    x = block_oracle.randn(2, 32, 3, 2, requires_grad=True)
    explained = torch._dynamo.explain(block)(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    targets = [str(node.target) for node in explained.graphs[0].graph.nodes]
    assert 'mmpsa.psa_triton.default' in targets, targets


def test_compile_of_a_cpu_tensor_under_auto_runs_plain_ops(monkeypatch):
    # CPU tensors keep plain ops under torch.compile (the compiled CPU path); so does export
    monkeypatch.setattr(compat, 'is_compiling', lambda: True)
    x = torch.randn(1, 8, 2, 2)
    with dispatch.backend('auto'):
        assert dispatch.choose_path(x, True, False) == 'plain'
    monkeypatch.setattr(compat, 'is_exporting', lambda: True)
    with dispatch.backend('triton'):
        assert dispatch.choose_path(x, True, False) == 'plain'


@pytest.mark.parametrize('variant,mode', [('paper', 'sequential'), ('official', 'sequential')])
def test_the_op_matches_the_function(variant, mode, triton_kernels, block_oracle):
    # eager: the custom op and the autograd Function give the same bits
    block = block_oracle.make(variant, mode, dtype=torch.float64, perturb=0.3)
    x = block_oracle.randn(2, 32, 3, 4, dtype=torch.float64)
    grad = torch.randn_like(x)
    got = []
    for traceable in (False, True):
        leaf = x.clone().requires_grad_()
        block.zero_grad(set_to_none=True)
        out = triton_kernels.fused_psa(
            leaf,
            variant == 'paper',
            mode == 'sequential',
            block.fused_params(),
            traceable=traceable)[0]
        out.backward(grad)
        got.append([out.detach(), leaf.grad, *(p.grad for p in block.parameters())])
    assert all(torch.equal(a, b) for a, b in zip(*got))
