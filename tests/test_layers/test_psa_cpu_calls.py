"""The ATen-call budget of the compiled Function's CPU path (issue #27 item 6): ATen calls per
block fwd+bwd under ``backend('cpu')``, counted with a ``TorchDispatchMode`` as
``test_psa_triton_launches.py`` counts the Triton path's host calls (views, ``detach``, ``t``,
``empty*`` not counted); harness: parameter ``.grad = None``, ``y = block(x)``,
``torch.autograd.backward(y, g)`` with a precomputed ``g``.

The per-sample CPU kernel evaluates the vector maths and the passes over X in loops; the
calls left are the maps' copies for the observation points and the dtype promotions (2 + 2),
the paper variant's and PSA_p's per-pixel softmax/sigmoid (ATen's SIMD exp, called inside
the kernel per sample: a mode sees only those of the calling thread, hence two threads
here, one sample each), and official PSA_s's (C/2, HW) GEMMs and softmax (batched ATen ops,
one call each whatever the batch and the threads). Before the PSA_s kernel, PSA_s took ~72
calls (its ATen path).
"""
import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mmpsa.layers import PolarizedSelfAttention, backend, dispatch

NOT_CALLS = {
    'detach', 't', 'empty', 'empty_like', 'empty_strided', 'new_empty', 'new_empty_strided',
    '_unsafe_view'
}
#: The issue's budget: paper (both modes) and official PSA_p 7, PSA_s 14.
BUDGET = {
    ('paper', 'parallel'): 7,
    ('paper', 'sequential'): 7,
    ('official', 'parallel'): 7,
    ('official', 'sequential'): 14
}
#: PSA_s's calls: its batched GEMMs (1 in forward, 3 in backward) and softmaxes (1 + 1), and
#: the maps' copies and the dtype promotions; none inside the per-sample loops.
PSA_S_GEMMS = {'bmm': 3, 'baddbmm_': 1}
PSA_S_OTHERS = {'_softmax', '_to_copy', 'promote_types'}
SHAPES = [(2, 48, 16, 12), (2, 40, 5, 7)]  # the second: odd sizes


class _Calls(TorchDispatchMode):

    def __init__(self) -> None:
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in NOT_CALLS:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def calls(block, x, grad) -> collections.Counter:
    """The ATen calls of one fwd+bwd of ``block`` on ``x`` (the harness above)."""
    for p in block.parameters():
        p.grad = None
    x.grad = None
    mode = _Calls()
    with mode:
        y = block(x)
        torch.autograd.backward(y, grad)
    return mode.counts


@pytest.fixture
def count():
    if dispatch.extension() is None:
        pytest.skip('mmpsa._ext is not built')

    def count_block(variant, mode, shape, threads):
        torch.set_num_threads(threads)  # (the autouse fixture restores it)
        torch.manual_seed(0)
        block = PolarizedSelfAttention(shape[1], mode=mode, variant=variant)
        x = torch.randn(*shape, requires_grad=True)
        grad = torch.randn_like(x)
        with backend('cpu'):
            calls(block, x, grad)  # first call: caches
            got = calls(block, x, grad)
        assert block.last_path == 'cpu'
        assert x.grad is not None and all(p.grad is not None for p in block.parameters())
        return got

    return count_block


@pytest.mark.parametrize('shape', SHAPES, ids=['48x16x12', '40x5x7'])
@pytest.mark.parametrize('variant,mode', list(BUDGET))
def test_cpu_call_budget(variant, mode, shape, count):
    got = count(variant, mode, shape, threads=2)
    assert sum(got.values()) <= BUDGET[variant, mode], dict(got)


@pytest.mark.parametrize('threads', [1, 2])
@pytest.mark.parametrize('shape', SHAPES + [(3, 16, 4, 4)], ids=['48x16x12', '40x5x7', 'b3'])
def test_official_s_calls_do_not_grow_with_the_batch(shape, threads, count):
    got = count('official', 'sequential', shape, threads)
    assert sum(got.values()) <= BUDGET['official', 'sequential'], dict(got)
    assert {name: got[name] for name in PSA_S_GEMMS} == PSA_S_GEMMS, dict(got)
    assert got['_softmax'] == 2 and set(got) <= set(PSA_S_GEMMS) | PSA_S_OTHERS, dict(got)
