"""torch.compile and torch.jit.trace parity of PSA models.

The block compiles to one dynamo graph (it runs plain ops while compiling); a tiny
PSA-HRNet seg config trains under mmengine's ``compile`` key (``aot_eager``: the inductor
run takes minutes on a CPU, see ``tools/deploy/check_compile.py``) with the eager losses;
a traced tiny PSA-HRNet pose model gives the eager heatmaps from ordinary ATen ops.
"""
import numpy as np
import pytest
import torch

from mmpsa.datasets.cityscapes_tiny import make_tiny_cityscapes
from mmpsa.deploy.compile import compile_parity, dynamo_graphs
from mmpsa.deploy.onnx import load_model
from mmpsa.layers import PolarizedSelfAttention
from mmpsa.utils.tiny import TINY_POSE, TINY_SEG


@pytest.mark.parametrize('mode', ['parallel', 'sequential'])
@pytest.mark.parametrize('variant', ['paper', 'official'])
def test_block_compiles_to_one_graph_without_breaks(variant, mode):
    block = PolarizedSelfAttention(16, mode=mode, variant=variant)
    assert dynamo_graphs(block, torch.randn(2, 16, 6, 8)) == (1, 0)


def test_compiled_training_matches_eager(tmp_path):
    data_root = tmp_path / 'data'
    make_tiny_cityscapes(data_root, num_train=8, num_val=1, seed=0)
    eager, compiled = compile_parity(TINY_SEG, data_root, tmp_path / 'work', iters=2)
    assert len(eager) == len(compiled) == 2
    assert eager[0] != eager[-1]  # it trains
    np.testing.assert_allclose(compiled, eager, rtol=1e-4)


def test_traced_pose_model_matches_eager():
    model = load_model(TINY_POSE)
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
        expected = model(x)
        torch.testing.assert_close(traced(x), expected, rtol=1e-5, atol=1e-6)
    ops = {node.kind() for node in traced.inlined_graph.nodes()}
    assert 'aten::bmm' in ops  # the block's plain ops
    assert not any('mmpsa' in op or op == 'prim::PythonOp' for op in ops)  # no opaque node
