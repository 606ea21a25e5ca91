"""The MMPSA_BACKEND switch and the Triton kernels of the fused block
(mmpsa/layers/psa_fused.py, psa_triton.py), run on CPU through triton's interpreter.

The interpreter is slow (about a second per block fwd+bwd at these shapes): the shapes
are tiny, and each case is one comparison against the literal form.
"""
import pytest
import torch

from mmpsa.layers import PolarizedSelfAttention, psa_fused

C = 32  # official sequential: LayerNorm over C // 8 = 4 channels
SUPPORTED = [('paper', 'parallel'), ('paper', 'sequential'), ('official', 'parallel'),
             ('official', 'sequential')]


@pytest.fixture
def triton_path(triton_kernels, set_fused_path):
    """Fused blocks go through the Triton kernels."""
    set_fused_path('triton')
    return triton_kernels


# --------------------------------------------------------------- the switch
def test_backend_reads_mmpsa_backend(monkeypatch):
    monkeypatch.delenv('MMPSA_BACKEND', raising=False)
    assert psa_fused.backend() == 'auto'
    for value in psa_fused.BACKENDS:
        monkeypatch.setenv('MMPSA_BACKEND', value.upper())
        assert psa_fused.backend() == value
    monkeypatch.setenv('MMPSA_BACKEND', 'cuda')
    with pytest.raises(ValueError, match="MMPSA_BACKEND must be one of .* got 'cuda'"):
        PolarizedSelfAttention(8)(torch.randn(1, 8, 2, 2))


def test_auto_takes_the_compiled_function_on_cpu(monkeypatch):
    monkeypatch.setenv('MMPSA_BACKEND', 'auto')
    out = PolarizedSelfAttention(8)(torch.randn(1, 8, 2, 2, requires_grad=True))
    expected = 'CppNode<mmpsa::FusedPSA>' if psa_fused._EXT is not None else 'MulBackward0'
    assert expected in out.grad_fn.name()


def test_forced_paths_that_cannot_run_raise(monkeypatch):
    block = PolarizedSelfAttention(8)
    monkeypatch.setenv('MMPSA_BACKEND', 'cpu')
    with pytest.raises(RuntimeError, match='CPU tensors only, got a meta tensor'):
        block(torch.empty(1, 8, 2, 2, device='meta'))
    monkeypatch.setenv('MMPSA_BACKEND', 'triton')
    monkeypatch.setattr(psa_fused, '_TRITON', [None])  # as without triton
    with pytest.raises(RuntimeError, match='triton is not importable'):
        block(torch.randn(1, 8, 2, 2))


def test_forced_triton_on_cpu_needs_the_interpreter(triton_kernels, monkeypatch):
    monkeypatch.setenv('MMPSA_BACKEND', 'triton')
    monkeypatch.setattr(triton_kernels, 'INTERPRET', False)
    with pytest.raises(RuntimeError, match='CPU tensors only under TRITON_INTERPRET=1'):
        PolarizedSelfAttention(8)(torch.randn(1, 8, 2, 2))


def test_triton_path_is_taken(triton_path):
    out = PolarizedSelfAttention(8)(torch.randn(1, 8, 2, 3, requires_grad=True))
    assert out.grad_fn.name() == '_TritonPSABackward'


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
def test_one_pixel(variant, mode, triton_path, block_oracle):
    # HW = 1: a softmax over the pixels is 1, so the exact gradient of what feeds it is 0
    fused, literal = block_oracle.pair(variant, mode, c=C, dtype=torch.float64, perturb=0.3)
    x, grad = torch.randn(2, 2, C, 1, 1, dtype=torch.float64)
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


def test_channel_limit(triton_kernels, monkeypatch):
    # a tile holds every channel: auto leaves wider blocks to the compiled Function
    monkeypatch.setattr(triton_kernels, 'MAX_CHANNELS', 8)
    x = torch.randn(1, 16, 2, 2)
    assert 'at most 8 channels' in triton_kernels.unsupported(x, True, False)
    monkeypatch.setenv('MMPSA_BACKEND', 'triton')
    with pytest.raises(
            RuntimeError, match=r'MMPSA_BACKEND=triton: .* at most 8 channels \(.*\), got 16'):
        PolarizedSelfAttention(16)(x)


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
def test_expanded_grad_output(variant, mode, triton_path, block_oracle):
    # out.sum().backward() hands backward a stride-0 gradient
    fused, literal = block_oracle.pair(variant, mode, c=C, dtype=torch.float64, perturb=0.3)
    x = torch.randn(2, C, 4, 3, dtype=torch.float64)
    grad = torch.ones(1, dtype=torch.float64).expand(x.shape)
    assert grad.stride() == (0, 0, 0, 0)
    block_oracle.assert_matches(
        block_oracle.fwd_bwd(fused, x, grad), block_oracle.fwd_bwd(literal, x, grad), 1e-11)


@pytest.mark.parametrize(
    'dtype,param_dtype', [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                          (torch.bfloat16, torch.float32)],
    ids=['bf16', 'fp16', 'bf16-fp32-params'])  # the last: as under autocast
@pytest.mark.parametrize('variant,mode', SUPPORTED)
def test_half_matches_fp64(variant, mode, dtype, param_dtype, triton_path, block_oracle):
    # accumulated in fp32 like the CPU kernel: its measured tolerances (test_psa.py)
    block = block_oracle.make(variant, mode, perturb=0.3).to(param_dtype)
    torch.manual_seed(1)
    x = torch.randn(2, 32, 6, 5).to(dtype)
    grad = torch.randn(2, 32, 6, 5).to(dtype)
    got = block_oracle.fwd_bwd(block, x, grad)
    assert got[0].dtype == got[1].dtype == dtype
    assert all(g.dtype == param_dtype for g in got[2].values())
    block_oracle.assert_matches(got, block_oracle.fp64_literal(block, x, grad),
                                block_oracle.KERNEL_HALF_RTOL[dtype])
