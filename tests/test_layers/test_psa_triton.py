"""The dispatch room (mmpsa/layers/dispatch.py) and the Triton kernels of the fused block
(psa_triton.py): on CUDA tensors where a GPU is present, else on CPU through triton's
interpreter.

The interpreter is slow (about a second per block fwd+bwd at these shapes): the shapes
are tiny, and each case is one comparison against the literal form.
"""
import threading

import pytest
import torch

from mmpsa import compat
from mmpsa.layers import PolarizedSelfAttention, backend, dispatch

C = 32  # official sequential: LayerNorm over C // 8 = 4 channels
SUPPORTED = [('paper', 'parallel'), ('paper', 'sequential'), ('official', 'parallel'),
             ('official', 'sequential')]


@pytest.fixture
def triton_path(triton_kernels, set_fused_path):
    """Fused blocks go through the Triton kernels."""
    set_fused_path('triton')
    return triton_kernels


@pytest.fixture
def randn(block_oracle):
    """``torch.randn`` on the device of the block tests."""
    return block_oracle.randn


# --------------------------------------------------------------- the switch
def test_selected_backend_reads_mmpsa_backend(monkeypatch):
    monkeypatch.delenv('MMPSA_BACKEND', raising=False)
    assert dispatch.selected_backend() == 'auto'
    for value in dispatch.BACKENDS:
        monkeypatch.setenv('MMPSA_BACKEND', value.upper())
        assert dispatch.selected_backend() == value
    monkeypatch.setenv('MMPSA_BACKEND', 'cuda')
    with pytest.raises(ValueError, match="MMPSA_BACKEND must be one of .* got 'cuda'"):
        PolarizedSelfAttention(8)(torch.randn(1, 8, 2, 2))


def test_backend_context_overrides_the_variable_in_this_thread_only(monkeypatch):
    monkeypatch.setenv('MMPSA_BACKEND', 'plain')
    block = PolarizedSelfAttention(8)
    x = torch.randn(1, 8, 2, 3)
    seen = []
    with backend('aten'):
        block(x)
        assert block.last_path == 'aten' and dispatch.selected_backend() == 'aten'
        with backend('plain'):  # nested: the innermost wins, and is undone on exit
            block(x)
            assert block.last_path == 'plain'
        assert dispatch.selected_backend() == 'aten'
        other = threading.Thread(target=lambda: seen.append(dispatch.selected_backend()))
        other.start()
        other.join()
    assert seen == ['plain']  # another thread reads the variable
    assert dispatch.selected_backend() == 'plain'
    import os
    assert os.environ['MMPSA_BACKEND'] == 'plain'  # the variable itself is untouched
    with pytest.raises(ValueError, match="backend name must be one of .* got 'gpu'"):
        with backend('gpu'):
            pass


def test_last_path_records_what_ran():
    # (the Triton branch: test_triton_path_is_taken; the mocked CUDA choice below)
    x = torch.randn(2, 8, 2, 3)
    literal = PolarizedSelfAttention(8, fused=False)
    assert literal.last_path is None
    literal(x)
    assert literal.last_path == 'literal'
    block = PolarizedSelfAttention(8)
    block(x)  # auto on a CPU tensor: the compiled Function's per-sample kernel
    assert block.last_path == ('cpu' if dispatch.extension() is not None else 'plain')
    for path, want in [('plain', 'plain'), ('aten', 'aten'), ('cpu', 'cpu')]:
        with backend(path):
            block(x)
        assert block.last_path == want
    official_s = PolarizedSelfAttention(16, mode='sequential', variant='official')
    with backend('cpu'):  # PSA_s has a per-sample kernel too
        official_s(torch.randn(2, 16, 2, 3))
    assert official_s.last_path == 'cpu'
    with backend('cpu'):  # a channels_last input takes ATen ops
        block(x.contiguous(memory_format=torch.channels_last))
    assert block.last_path == 'aten'
    traced = torch.jit.trace(block, x, check_trace=False)
    assert block.last_path == 'plain' and traced(x).shape == x.shape


def test_auto_picks_triton_for_cuda_tensors_mocked(monkeypatch):
    # the CUDA branch of auto, here without a GPU: a tensor that says it is CUDA
    class Kernels:
        INTERPRET = False

        @staticmethod
        def unsupported(x, paper, seq):
            return None if x.shape[1] <= 8 else 'too wide'

    class FakeCuda:
        is_cuda = True
        shape = (1, 8, 2, 2)
        device = torch.device('cuda')

        def numel(self):
            return 32

    monkeypatch.setattr(dispatch, '_TRITON', [Kernels, None])
    assert dispatch.choose_path(FakeCuda(), True, False) == 'triton'
    FakeCuda.shape = (1, 16, 2, 2)  # unsupported: auto leaves it to the compiled Function
    want = 'aten' if dispatch.extension() is not None else 'plain'
    assert dispatch.choose_path(FakeCuda(), True, False) == want
    monkeypatch.setattr(dispatch, '_TRITON', [None, 'triton is not importable'])
    FakeCuda.shape = (1, 8, 2, 2)
    assert dispatch.choose_path(FakeCuda(), True, False) != 'triton'


def test_old_triton_is_gated(monkeypatch):
    monkeypatch.setattr(dispatch, '_TRITON', [])
    monkeypatch.setattr(compat, 'triton_version', lambda: (2, 1))
    with pytest.warns(UserWarning, match=r'need triton >= 3\.0, this is triton 2\.1'):
        assert dispatch.triton_module() is None
    with backend('triton'), pytest.raises(RuntimeError, match=r'triton >= 3\.0'):
        PolarizedSelfAttention(8)(torch.randn(1, 8, 2, 2))


def test_forced_paths_that_cannot_run_raise(monkeypatch):
    block = PolarizedSelfAttention(8)
    with backend('cpu'), pytest.raises(RuntimeError, match='CPU tensors only, got a meta tensor'):
        block(torch.empty(1, 8, 2, 2, device='meta'))
    monkeypatch.setattr(dispatch, '_TRITON', [None, 'triton is not importable'])
    with backend('triton'), pytest.raises(RuntimeError, match='triton is not importable'):
        block(torch.randn(1, 8, 2, 2))
    monkeypatch.setattr(dispatch, '_EXT', None)
    with backend('aten'), pytest.raises(RuntimeError, match='needs mmpsa._ext'):
        block(torch.randn(1, 8, 2, 2))


def test_forced_triton_on_cpu_needs_the_interpreter(triton_kernels, monkeypatch):
    monkeypatch.setattr(triton_kernels, 'INTERPRET', False)
    with backend('triton'), pytest.raises(
            RuntimeError, match='CPU tensors only under TRITON_INTERPRET=1'):
        PolarizedSelfAttention(8)(torch.randn(1, 8, 2, 2))


def test_triton_path_is_taken(triton_path, randn):
    block = PolarizedSelfAttention(8).to(randn(1).device)
    out = block(randn(1, 8, 2, 3, requires_grad=True))
    assert out.grad_fn.name() == '_TritonPSABackward' and block.last_path == 'triton'


# ------------------------------------------------- kernels vs literal form
@pytest.mark.parametrize('variant,mode', SUPPORTED)
def test_matches_literal_fp64(variant, mode, triton_path, block_oracle):
    # odd H and W; C = 48: two channel blocks, the second partly masked
    block_oracle.check_fused_vs_literal(
        variant, mode, torch.float64, rtol=1e-11, shape=(2, 48, 5, 3), perturb=0.3)


@pytest.mark.parametrize('variant,mode', SUPPORTED)
def test_matches_literal_fp32_one_sample(variant, mode, triton_path, block_oracle):
    block_oracle.check_fused_vs_literal(variant, mode, torch.float32, rtol=1e-5, shape=(1, C, 7, 5))


@pytest.mark.parametrize('variant,mode', [('paper', 'sequential'), ('official', 'parallel')])
def test_one_pixel(variant, mode, triton_path, block_oracle, randn):
    # HW = 1: a softmax over the pixels is 1, so the exact gradient of what feeds it is 0
    fused, literal = block_oracle.pair(variant, mode, c=C, dtype=torch.float64, perturb=0.3)
    x, grad = randn(2, 2, C, 1, 1, dtype=torch.float64)
    got, ref = block_oracle.fwd_bwd(fused, x, grad), block_oracle.fwd_bwd(literal, x, grad)
    names = (('ch_wq.weight', 'ch_wq.bias') if variant == 'paper' else
             ('conv_q_right.weight', 'conv_q_left.weight', 'conv_v_left.weight'))
    for name in names:
        assert got[2].pop(name).abs().max() <= 1e-12 and ref[2].pop(name).abs().max() <= 1e-12
    block_oracle.assert_matches(got, ref, 1e-11)


@pytest.mark.parametrize('variant,mode', SUPPORTED)
def test_many_tiles_and_runs(variant, mode, triton_path, block_oracle, monkeypatch):
    # 13 x 21 = 273 pixels in tiles of 8: five runs of seven tiles per sample, the last tile
    # of each run partly masked; the runs' online softmaxes are merged
    monkeypatch.setattr(triton_path, '_MAX_BLOCK_N', 8)
    monkeypatch.setattr(triton_path, '_TARGET_PROGRAMS', 10)
    assert triton_path._Launch(torch.empty(2, C, 13, 21)).grid == (2, 5)
    block_oracle.check_fused_vs_literal(
        variant, mode, torch.float64, rtol=1e-11, shape=(2, C, 13, 21), perturb=0.3)


def test_channel_limit(triton_kernels, monkeypatch, randn):
    # a tile holds every channel: auto leaves wider blocks to the compiled Function
    monkeypatch.setattr(triton_kernels, 'MAX_CHANNELS', 8)
    x = randn(1, 16, 2, 2)
    assert 'at most 8 channels' in triton_kernels.unsupported(x, True, False)
    with backend('triton'), pytest.raises(
            RuntimeError, match=r'MMPSA_BACKEND=triton: .* at most 8 channels \(.*\), got 16'):
        PolarizedSelfAttention(16).to(x.device)(x)


@pytest.mark.parametrize('layout', ['channels_last', 'transposed'])
def test_input_layouts(layout, triton_path, block_oracle):
    # channels_last is read as it is; a transposed input is made contiguous first
    block_oracle.check_fused_vs_literal(
        'paper',
        'sequential',
        torch.float64,
        rtol=1e-11,
        perturb=0.3,
        shape=(2, C, 5, 3),
        layout=layout)


@pytest.mark.parametrize('mode', ['parallel', 'sequential'])
def test_input_without_grad(mode, triton_path, block_oracle):
    block_oracle.check_fused_vs_literal(
        'official',
        mode,
        torch.float64,
        rtol=1e-11,
        perturb=0.3,
        shape=(2, C, 5, 3),
        input_grad=False)


@pytest.mark.parametrize('variant,mode', [('paper', 'parallel'), ('official', 'parallel'),
                                          ('official', 'sequential')])
def test_expanded_grad_output(variant, mode, triton_path, block_oracle, randn):
    # out.sum().backward() hands backward a stride-0 gradient
    fused, literal = block_oracle.pair(variant, mode, c=C, dtype=torch.float64, perturb=0.3)
    x = randn(2, C, 4, 3, dtype=torch.float64)
    grad = torch.ones(1, dtype=torch.float64, device=x.device).expand(x.shape)
    assert grad.stride() == (0, 0, 0, 0)
    block_oracle.assert_matches(
        block_oracle.fwd_bwd(fused, x, grad), block_oracle.fwd_bwd(literal, x, grad), 1e-11)


@pytest.mark.parametrize(
    'dtype,param_dtype', [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                          (torch.bfloat16, torch.float32)],
    ids=['bf16', 'fp16', 'bf16-fp32-params'])  # the last: as under autocast
@pytest.mark.parametrize('variant,mode', SUPPORTED)
def test_half_matches_fp64(variant, mode, dtype, param_dtype, triton_path, block_oracle, randn):
    # accumulated in fp32 like the CPU kernel: its measured tolerances (test_psa.py)
    block = block_oracle.make(variant, mode, perturb=0.3).to(param_dtype)
    torch.manual_seed(1)
    x = randn(2, 32, 6, 5).to(dtype)
    grad = randn(2, 32, 6, 5).to(dtype)
    got = block_oracle.fwd_bwd(block, x, grad)
    assert got[0].dtype == got[1].dtype == dtype
    assert all(g.dtype == param_dtype for g in got[2].values())
    block_oracle.assert_matches(got, block_oracle.fp64_literal(block, x, grad),
                                block_oracle.KERNEL_HALF_RTOL[dtype])


# ------------------------------------------------- what the interpreter hides
@pytest.mark.parametrize('variant,mode', SUPPORTED)
def test_no_float_kernel_arguments(variant, mode, triton_path, block_oracle, randn, monkeypatch):
    # a Python float argument is an fp32 kernel argument on a GPU, also for fp64 inputs
    from triton.runtime.interpreter import InterpretedFunction
    seen, run = [], InterpretedFunction.run

    def recording(self, *args, **kwargs):
        seen.append((self.fn.__name__, [type(a) for a in args + tuple(kwargs.values())]))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, 'run', recording)
    block = block_oracle.make(variant, mode, dtype=torch.float64)
    x = randn(2, C, 3, 2, dtype=torch.float64)
    block_oracle.fwd_bwd(block, x, torch.randn_like(x))
    assert {name for name, _ in seen} >= {'_pool_kernel', '_grad_input_kernel'}
    assert not [(name, t) for name, types in seen for t in types if t is float]


_KERNELS = None  # mmpsa.layers.psa_triton, for the kernel below (set by the test)


def test_sample_offsets_are_int64(triton_kernels, device, monkeypatch):
    # b * stride in int64: a view into a large tensor passes 2^31 with strides below it
    import triton
    import triton.language as tl

    @triton.jit
    def offsets(out_ptr, stride, BLOCK_C: tl.constexpr):
        b, k, offs_c, mask_c, start, end = _KERNELS._program(1, 1, 1, BLOCK_C)
        tl.store(out_ptr + b, b * stride)

    monkeypatch.setitem(globals(), '_KERNELS', triton_kernels)
    out = torch.zeros(4, dtype=torch.int64, device=device)
    offsets[(4, 1)](out, 2**30, BLOCK_C=1)
    assert out.tolist() == [b * 2**30 for b in range(4)]


def test_unsupported_reads_the_sample_not_the_tensor(triton_kernels):
    # meta tensors: shapes and strides without memory
    many = torch.empty(2**31 // (48 * 4) + 1, 48, 2, 2, device='meta')
    assert many.numel() >= 2**31 and triton_kernels.unsupported(many, True, False) is None
    wide = torch.empty(1, 2048, 2**10, 2**10, device='meta')
    assert 'fewer than 2^31 elements' in triton_kernels.unsupported(wide, True, False)
    # a view whose offsets within a sample pass 2^31 is read from a contiguous copy
    view = torch.empty(1, 4, 2**16, 2**16, device='meta')[:, :, :8, :8]
    assert triton_kernels._bcn(view)[1] == (256, 64, 1)
    parent = torch.empty(3, 1024, 8, 8, device='meta')[:, :48]  # batch stride as it is
    assert triton_kernels._bcn(parent)[1] == (1024 * 64, 64, 1)
