"""torch.compile and torch.jit.trace parity of PSA models.

The block compiles to one dynamo graph (it runs plain ops while compiling); a tiny
PSA-HRNet seg config trains under mmengine's ``compile`` key (``aot_eager``: the inductor
run takes minutes on a CPU, see ``tools/deployment/check_compile.py``) with the eager losses;
a traced tiny PSA-HRNet pose model gives the eager heatmaps from ordinary ATen ops.
"""
import numpy as np
import pytest
import torch

from mmpsa.datasets.cityscapes_tiny import make_tiny_cityscapes
from mmpsa.datasets.tiny import TINY_POSE, TINY_SEG
from mmpsa.deploy.compile import compile_parity, dynamo_graphs
from mmpsa.deploy.onnx import load_model
from mmpsa.layers import PolarizedSelfAttention


@pytest.mark.parametrize('mode', ['parallel', 'sequential'])
@pytest.mark.parametrize('variant', ['paper', 'official'])
def test_block_compiles_to_one_graph_without_breaks(variant, mode):
    block = PolarizedSelfAttention(16, mode=mode, variant=variant)
    x = torch.randn(2, 16, 6, 8)
    assert dynamo_graphs(block, x) == (1, 0)
    graphs = []

    def backend(gm, example_inputs):  # what torch.compile hands a backend, kept
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(block, backend=backend)
    with torch.no_grad():
        out, expected = compiled(x), block(x)
    assert len(graphs) == 1  # compiled, not run eagerly
    targets = {str(node.target) for node in graphs[0].graph.nodes}
    assert any('matmul' in t or 'bmm' in t or 'softmax' in t for t in targets), targets
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def _is_conv(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Is ``node`` of the dynamo graph ``gm`` a 2-D convolution?"""
    if node.op == 'call_module':
        return isinstance(gm.get_submodule(node.target), torch.nn.Conv2d)
    if node.op != 'call_function':
        return False
    name = getattr(node.target, '__name__', str(node.target))
    return name.split('.')[0] in ('conv2d', 'convolution')


def test_compiled_training_matches_eager(tmp_path):
    from torch._dynamo import register_backend
    from torch._dynamo.backends.debugging import aot_eager
    graphs = []

    def mmpsa_test_counting_aot_eager(gm, example_inputs, **kwargs):
        graphs.append(gm)  # the compiled run really went through torch.compile
        return aot_eager(gm, example_inputs, **kwargs)

    register_backend(mmpsa_test_counting_aot_eager)
    torch._dynamo.reset()
    data_root = tmp_path / 'data'
    make_tiny_cityscapes(data_root, num_train=8, num_val=1, seed=0)
    eager, compiled = compile_parity(
        TINY_SEG, data_root, tmp_path / 'work', iters=2, backend='mmpsa_test_counting_aot_eager')
    assert graphs, 'the compiled run compiled nothing'
    # dynamo inlines nn.Modules: a conv is a call of torch.conv2d (a builtin, whose str
    # names no op), an aten overload, or (older torch) a call_module of a Conv2d
    convs = sum(_is_conv(g, n) for g in graphs for n in g.graph.nodes)
    assert convs > 10  # the network's forward is in the compiled graphs
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
        # not only at the input it was traced with: other values, another batch and size
        for other in (torch.randn(2, 3, 96, 64), torch.randn(1, 3, 128, 96)):
            torch.testing.assert_close(traced(other), model(other), rtol=1e-5, atol=1e-6)
    ops = {node.kind() for node in traced.inlined_graph.nodes()}
    assert 'aten::bmm' in ops  # the block's plain ops
    assert not any('mmpsa' in op or op == 'prim::PythonOp' for op in ops)  # no opaque node
