"""Tests of the PolarizedSelfAttention block (mmpsa/layers/psa.py, psa_fused.py, dispatch.py).

Also the oracle of the other block tests (``conftest.py`` loads it): :func:`make`,
:func:`check_fused_vs_literal` ... build their blocks and inputs on :data:`DEVICE`.
"""
import copy
import math
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mmpsa import compat
from mmpsa.layers import PolarizedSelfAttention, dispatch


def pick_device(cuda_available=torch.cuda.is_available) -> torch.device:
    """The device of the block tests: the first GPU if there is one, else the CPU."""
    return torch.device('cuda') if cuda_available() else torch.device('cpu')


def uses_interpreter(device: torch.device) -> bool:
    """Whether the Triton kernels run under triton's interpreter for tensors on ``device``."""
    return device.type != 'cuda'


#: Where :func:`make` and :func:`check_fused_vs_literal` put blocks and inputs.
DEVICE = pick_device()


def randn(*shape, **kwargs) -> torch.Tensor:
    """``torch.randn`` on :data:`DEVICE` (the CPU-kernel tests use the CPU explicitly)."""
    return torch.randn(*shape, device=DEVICE, **kwargs)


VARIANTS = ('paper', 'official')
MODES = ('parallel', 'sequential')
ALL = [(v, m) for v in VARIANTS for m in MODES]
C = 32  # official sequential: LayerNorm over C // 8 = 4 channels


def make(variant, mode, c=C, dtype=torch.float32, seed=0, perturb=0.0, **kw):
    """A block; ``perturb`` adds N(0, perturb^2) noise to every parameter (a non-trivial
    LayerNorm affine, no gradient trivially zero)."""
    torch.manual_seed(seed)
    block = PolarizedSelfAttention(c, mode=mode, variant=variant, **kw)
    if perturb:
        with torch.no_grad():
            for p in block.parameters():
                p.add_(perturb * torch.randn_like(p))
    return block.to(DEVICE, dtype)


def pair(variant, mode, **kw):
    """A fused block and a literal copy with the same parameters."""
    fused = make(variant, mode, **kw)
    literal = copy.deepcopy(fused)
    literal.fused = False
    return fused, literal


def max_rel_err(a, b):
    """max |a - b| relative to max |b|, the reference (``a`` may be of lower precision)."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item()


# inputs as they come in a network: another memory format, views of a larger tensor
LAYOUTS = {
    'channels_last': lambda t: t.contiguous(memory_format=torch.channels_last),
    'transposed': lambda t: t.transpose(2, 3),  # dense, not contiguous
    'strided': lambda t: t[:, :, :, ::2],  # every other column: not dense
    'offset': lambda t: torch.cat([t, t])[len(t):],  # contiguous, at a storage offset
}


def fwd_bwd(block, x, grad, input_grad=True, autocast=None):
    """Output, input gradient (None without ``input_grad``) and parameter gradients.

    ``x`` is used as it is (strides, storage offset), as a leaf of its own; with
    ``autocast`` (a dtype) the forward runs under CPU autocast to it.
    """
    x = x.detach().requires_grad_(input_grad)
    block.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
        out = block(x)
    out.backward(grad)
    grads = {n: p.grad for n, p in block.named_parameters()}
    return out.detach(), x.grad, grads


def assert_matches(got, ref, rtol):
    """``got`` within ``rtol`` of ``ref`` (both from :func:`fwd_bwd`): the output, the input
    gradient and every parameter gradient, each relative to its largest reference value."""
    (out, dx, dp), (out_r, dx_r, dp_r) = got, ref
    assert max_rel_err(out, out_r) <= rtol
    assert (dx is None) == (dx_r is None)
    if dx_r is not None:
        assert max_rel_err(dx, dx_r) <= rtol
    assert dp.keys() == dp_r.keys() and all(g is not None for g in dp.values())
    for name in dp_r:
        if name == 'ch_wq.bias':
            # softmax is shift invariant: the exact gradient is 0, both forms
            # give rounding noise only
            scale = dp_r['ch_wq.weight'].abs().max()
            assert dp[name].abs().max() <= rtol * scale
            assert dp_r[name].abs().max() <= rtol * scale
        else:
            assert max_rel_err(dp[name], dp_r[name]) <= rtol, name


def check_fused_vs_literal(variant,
                           mode,
                           dtype,
                           rtol,
                           shape=(2, C, 5, 7),
                           perturb=0.0,
                           layout=None,
                           input_grad=True):
    """Fused against literal, forward and backward, on a random ``shape`` input in
    ``dtype`` (then laid out by ``LAYOUTS[layout]``)."""
    fused, literal = pair(variant, mode, c=shape[1], dtype=dtype, perturb=perturb)
    torch.manual_seed(1)
    x = torch.randn(*shape, dtype=dtype, device=DEVICE)
    if layout is not None:
        x = LAYOUTS[layout](x)
    grad = torch.randn(x.shape, dtype=dtype, device=DEVICE)
    ref = fwd_bwd(literal, x, grad, input_grad)
    assert_matches(fwd_bwd(fused, x, grad, input_grad), ref, rtol)


# ----------------------------------------------------------------- basics
@pytest.mark.parametrize('fused', [True, False])
@pytest.mark.parametrize('variant,mode', ALL)
@pytest.mark.parametrize('shape', [(2, C, 6, 4), (1, C, 5, 3), (1, C, 1, 1)])
def test_output_shape(variant, mode, fused, shape):
    block = make(variant, mode, fused=fused)
    x = randn(*shape)
    out = block(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()


@pytest.mark.parametrize('variant,mode', ALL)
def test_state_dict_names(variant, mode):
    block = make(variant, mode)
    c2, c8 = C // 2, C // 8
    if variant == 'paper':
        shapes = {
            'ch_wv.weight': (c2, C, 1, 1),
            'ch_wv.bias': (c2, ),
            'ch_wq.weight': (1, C, 1, 1),
            'ch_wq.bias': (1, ),
            'ch_wz.weight': (C, c2, 1, 1),
            'ch_wz.bias': (C, ),
            'ln.weight': (C, ),
            'ln.bias': (C, ),
            'sp_wv.weight': (c2, C, 1, 1),
            'sp_wv.bias': (c2, ),
            'sp_wq.weight': (c2, C, 1, 1),
            'sp_wq.bias': (c2, )
        }
    elif mode == 'parallel':
        shapes = {
            'conv_q_right.weight': (1, C, 1, 1),
            'conv_v_right.weight': (c2, C, 1, 1),
            'conv_up.weight': (C, c2, 1, 1),
            'conv_q_left.weight': (c2, C, 1, 1),
            'conv_v_left.weight': (c2, C, 1, 1)
        }
    else:
        shapes = {
            'conv_q_right.weight': (1, C, 1, 1),
            'conv_v_right.weight': (c2, C, 1, 1),
            'conv_up.0.weight': (c8, c2, 1, 1),
            'conv_up.0.bias': (c8, ),
            'conv_up.1.weight': (c8, 1, 1),
            'conv_up.1.bias': (c8, 1, 1),
            'conv_up.3.weight': (C, c8, 1, 1),
            'conv_up.3.bias': (C, ),
            'conv_q_left.weight': (c2, C, 1, 1),
            'conv_v_left.weight': (c2, C, 1, 1)
        }
    sd = block.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == shapes
    # the identity observation points hold nothing
    assert not list(block.ch_attn.parameters())
    assert not list(block.sp_attn.parameters())
    assert PolarizedSelfAttention._abbr_ == 'psa'


# ------------------------------------------- literal forms vs references
def _ln(t, weight, bias, eps):
    mu = t.mean(-1, keepdim=True)
    var = ((t - mu)**2).mean(-1, keepdim=True)
    return (t - mu) / torch.sqrt(var + eps) * weight + bias


def paper_equations(block, x):
    """Eq. (1)-(5) of the paper, written with einsum on the block's parameters."""
    b, c, h, w = x.shape
    w2 = lambda conv: conv.weight[:, :, 0, 0]  # noqa: E731

    def a_ch(X):  # X: (B, C, N)
        q = torch.einsum('oc,bcn->bon', w2(block.ch_wq), X)[:, 0]
        q = q + block.ch_wq.bias
        v = torch.einsum('oc,bcn->bon', w2(block.ch_wv), X)
        v = v + block.ch_wv.bias[:, None]
        z = torch.einsum('io,bo->bi', w2(block.ch_wz), torch.einsum('bon,bn->bo', v, q.softmax(-1)))
        z = z + block.ch_wz.bias
        return torch.sigmoid(_ln(z, block.ln.weight, block.ln.bias, block.ln.eps))  # (B, C)

    def a_sp(Y):
        q = torch.einsum('oc,bcn->bon', w2(block.sp_wq), Y)
        q = q + block.sp_wq.bias[:, None]
        v = torch.einsum('oc,bcn->bon', w2(block.sp_wv), Y)
        v = v + block.sp_wv.bias[:, None]
        s = q.mean(-1).softmax(-1)  # softmax(GP(W_q(Y)))
        return torch.sigmoid(torch.einsum('bo,bon->bn', s, v))  # (B, N)

    X = x.flatten(2)
    z_ch = a_ch(X)[:, :, None] * X
    if block.mode == 'parallel':
        out = z_ch + a_sp(X)[:, None, :] * X
    else:
        out = a_sp(z_ch)[:, None, :] * z_ch
    return out.view(b, c, h, w)


@pytest.mark.parametrize('mode', MODES)
def test_literal_paper_is_the_equations(mode):
    block = make('paper', mode, dtype=torch.float64, fused=False)
    with torch.no_grad():  # non-trivial LayerNorm affine
        block.ln.weight.uniform_(0.5, 1.5)
        block.ln.bias.uniform_(-0.5, 0.5)
    x = randn(2, C, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(block(x), paper_equations(block, x), rtol=1e-12, atol=1e-12)


class ExtAttnLayout(nn.Module):
    """External-Attention-pytorch's PSA parameter layout (construction order)."""

    def __init__(self, channel):
        super().__init__()
        self.ch_wv = nn.Conv2d(channel, channel // 2, 1)
        self.ch_wq = nn.Conv2d(channel, 1, 1)
        self.ch_wz = nn.Conv2d(channel // 2, channel, 1)
        self.ln = nn.LayerNorm(channel)
        self.sp_wv = nn.Conv2d(channel, channel // 2, 1)
        self.sp_wq = nn.Conv2d(channel, channel // 2, 1)


@pytest.mark.parametrize('mode', MODES)
def test_paper_state_dict_layout_and_default_init(mode):
    torch.manual_seed(3)
    ref = ExtAttnLayout(C)
    block = make('paper', mode, seed=3)
    assert list(block.state_dict()) == list(ref.state_dict())
    for k, v in ref.state_dict().items():  # same default init, same RNG order
        assert torch.equal(block.state_dict()[k], v), k
    block.load_state_dict(ExtAttnLayout(C).state_dict(), strict=True)


class RefPSA(nn.Module):
    """Re-statement of the released PSA_p (parallel) / PSA_s (sequential) ops."""

    def __init__(self, c, sequential):
        super().__init__()
        self.sequential = sequential
        c2 = c // 2
        self.conv_q_right = nn.Conv2d(c, 1, 1, bias=False)
        self.conv_v_right = nn.Conv2d(c, c2, 1, bias=False)
        if sequential:
            self.conv_up = nn.Sequential(
                nn.Conv2d(c2, c2 // 4, 1), nn.LayerNorm([c2 // 4, 1, 1]), nn.ReLU(inplace=True),
                nn.Conv2d(c2 // 4, c, 1))
        else:
            self.conv_up = nn.Conv2d(c2, c, 1, bias=False)
        self.conv_q_left = nn.Conv2d(c, c2, 1, bias=False)
        self.conv_v_left = nn.Conv2d(c, c2, 1, bias=False)
        for m in (self.conv_q_right, self.conv_v_right, self.conv_q_left, self.conv_v_left):
            nn.init.kaiming_normal_(m.weight, mode='fan_in', nonlinearity='relu')

    def channel_attention(self, x):  # the released `spatial_pool`
        v = self.conv_v_right(x)
        b, c2, h, w = v.shape
        v = v.view(b, c2, h * w)
        q = F.softmax(self.conv_q_right(x).view(b, 1, h * w), dim=2)
        ctx = torch.matmul(v, q.transpose(1, 2)).unsqueeze(-1)
        return x * torch.sigmoid(self.conv_up(ctx))

    def spatial_attention(self, x):  # the released `channel_pool`
        g = self.conv_q_left(x)
        b, c2, h, w = g.shape
        g = F.adaptive_avg_pool2d(g, 1).view(b, c2, 1).permute(0, 2, 1)
        theta = self.conv_v_left(x).view(b, c2, h * w)
        if self.sequential:
            theta = F.softmax(theta, dim=2)
        ctx = torch.matmul(g, theta)
        if not self.sequential:
            ctx = F.softmax(ctx, dim=2)
        return x * torch.sigmoid(ctx.view(b, 1, h, w))

    def forward(self, x):
        if self.sequential:
            return self.spatial_attention(self.channel_attention(x))
        return self.channel_attention(x) + self.spatial_attention(x)


@pytest.mark.parametrize('mode', MODES)
def test_literal_official_is_the_released_ops(mode):
    torch.manual_seed(5)
    ref = RefPSA(C, mode == 'sequential').double()
    block = make('official', mode, seed=5, fused=False).double()
    # same construction order and init: same weights under the same seed
    assert list(block.state_dict()) == list(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(block.state_dict()[k], v), k
    with torch.no_grad():  # non-trivial conv_up
        for p in ref.conv_up.parameters():
            p.normal_(0, 0.3)
    block.load_state_dict(ref.state_dict(), strict=True)
    x = randn(2, C, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(block(x), ref(x), rtol=1e-13, atol=1e-13)


# --------------------------------------------------- fused vs literal
@pytest.fixture(params=['cpu_kernel', 'aten'])
def fused_path(request, set_fused_path):
    """Run a test through both compiled paths (CPU kernel where it applies)."""
    return set_fused_path(request.param)


@pytest.fixture(params=['cpu_kernel', 'aten', 'literal'])
def form(request, set_fused_path):
    """Run a test through every evaluation: both compiled paths and the literal form
    (build the block with ``fused=form != 'literal'``)."""
    return set_fused_path(request.param)


@pytest.mark.parametrize('variant,mode', ALL)
def test_fused_matches_literal_fp32(variant, mode, fused_path):
    check_fused_vs_literal(variant, mode, torch.float32, rtol=1e-5)
    check_fused_vs_literal(variant, mode, torch.float32, rtol=1e-5, shape=(1, C, 7, 5))


@pytest.mark.parametrize('variant,mode', ALL)
def test_fused_matches_literal_fp64(variant, mode, fused_path):
    check_fused_vs_literal(variant, mode, torch.float64, rtol=1e-11, perturb=0.3)
    check_fused_vs_literal(
        variant, mode, torch.float64, rtol=1e-11, shape=(1, C, 3, 1), perturb=0.3)


def kernel_taken(x, params, **kw):
    """Run the compiled Function on ``x``; whether it took the per-sample CPU kernel.

    The kernel keeps x and one buffer for backward (besides the parameters); the ATen
    path a dozen tensors. Returns ``(taken, a_ch)``.
    """
    param_ptrs = {p.data_ptr() for p in params.tensors if p is not None}
    own = []

    def pack(t):
        if t.data_ptr() not in param_ptrs:
            own.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        a_ch = dispatch.extension().fused_psa(x, True, False, params.ln_eps, params.tensors,
                                              **kw)[1]
    return len(own) <= 2, a_ch


def test_cpu_kernel_is_taken_where_it_applies():
    block = make('paper', 'parallel').cpu()
    params = block.fused_params()
    x = torch.randn(2, C, 6, 5)
    taken_a, a = kernel_taken(x, params)
    taken_b, b = kernel_taken(x, params, cpu_kernel=False)
    assert taken_a and not taken_b
    assert max_rel_err(a, b) <= 1e-6
    # channels_last is not what the kernel reads: the ATen path takes it
    assert not kernel_taken(x.to(memory_format=torch.channels_last), params)[0]


def test_cpu_kernel_size_rule():
    # one large image on two threads goes to ATen's multithreaded ops; a batch that
    # fills the threads, or at most 2^18 elements per sample, to the kernel
    params = make('paper', 'parallel', c=8).cpu().fused_params()
    torch.set_num_threads(2)
    assert kernel_taken(torch.randn(1, 8, 512, 64), params)[0]  # 2^18 elements
    assert not kernel_taken(torch.randn(1, 8, 512, 66), params)[0]
    assert kernel_taken(torch.randn(2, 8, 512, 66), params)[0]


@pytest.mark.parametrize('shape', [(1, C, 5, 3), (3, C, 5, 3), (4, 512, 5, 3)])
@pytest.mark.parametrize('variant,mode', ALL)
def test_cpu_kernel_two_threads(variant, mode, shape):
    # as in real use: the kernel splits the batch over the threads (1: one thread idle;
    # 3: unevenly) and the rows of the weight gradients (C = 512: more than one share)
    torch.set_num_threads(2)
    params = make('paper', 'parallel', c=shape[1]).cpu().fused_params()
    assert kernel_taken(torch.randn(*shape), params)[0]
    check_fused_vs_literal(variant, mode, torch.float64, rtol=1e-11, shape=shape, perturb=0.3)


@pytest.mark.parametrize('variant,mode', ALL)
def test_fused_function_gradcheck(variant, mode, fused_path):
    # full mode, through the block's forward with its parameters as gradcheck's inputs;
    # PSA_s: C = 24, a LayerNorm over C // 8 = 3 channels (over 1 its output is constant
    # and no gradient reaches the parameters before it)
    c = 24 if (variant, mode) == ('official', 'sequential') else 16
    block = make(variant, mode, c=c, dtype=torch.float64, perturb=0.3)
    names = [name for name, _ in block.named_parameters()]
    leaves = [p.detach().clone().requires_grad_() for p in block.parameters()]
    x = randn(2, c, 3, 2, dtype=torch.float64, requires_grad=True)

    def fn(x, *leaves):
        return torch.func.functional_call(block, dict(zip(names, leaves)), (x, ))

    out = fn(x, *leaves)
    assert out.grad_fn.name() == 'torch::autograd::CppNode<mmpsa::FusedPSA>'
    grads = torch.autograd.grad(out.square().sum(), (x, *leaves))
    assert all(g.abs().max() > 1e-3 for name, g in zip(['x', *names], grads)
               if name != 'ch_wq.bias')  # (its exact gradient is 0)
    assert torch.autograd.gradcheck(fn, (x, *leaves))


def test_compiled_extension_is_built_and_used():
    # CI builds mmpsa._ext; a silent fall back to plain ops would hide a broken build
    assert dispatch.extension() is not None
    block = make('paper', 'parallel').cpu()
    out = block(torch.randn(1, C, 3, 4, requires_grad=True))
    assert out.grad_fn.name() == 'torch::autograd::CppNode<mmpsa::FusedPSA>'
    assert block.last_path == 'cpu'


def test_without_extension_runs_plain_ops(monkeypatch):
    monkeypatch.setattr(dispatch, '_EXT', None)
    for variant, mode in ALL:
        check_fused_vs_literal(variant, mode, torch.float64, rtol=1e-11)
    with pytest.raises(RuntimeError, match='not built'):
        dispatch.fused_function(
            torch.randn(1, 8, 2, 2), 'paper', False,
            make('paper', 'parallel', c=8).cpu().fused_params())


def test_stale_extension_is_refused(monkeypatch):
    from mmpsa import _ext

    class Stale:
        SOURCE_HASH = '0' * 16
        fused_psa = _ext.fused_psa

    monkeypatch.setitem(sys.modules, 'mmpsa._ext', Stale)
    with pytest.warns(UserWarning, match='another version'):
        assert dispatch._load_extension() is None
    monkeypatch.setitem(sys.modules, 'mmpsa._ext', None)  # import fails
    with pytest.warns(UserWarning, match='not built'):
        assert dispatch._load_extension() is None


@pytest.mark.parametrize('variant,mode', ALL)
def test_plain_fused_path_matches_literal(variant, mode, monkeypatch):
    # the path taken under torch.compile / torch.export
    monkeypatch.setattr(compat, 'is_compiling', lambda: True)  # what dispatch asks
    check_fused_vs_literal(variant, mode, torch.float64, rtol=1e-11)


@pytest.mark.filterwarnings('ignore::FutureWarning')
@pytest.mark.parametrize('variant,mode', ALL)
def test_jit_trace_runs_plain_ops(variant, mode):
    block = make(variant, mode)
    x = randn(2, C, 6, 5)
    traced = torch.jit.trace(block, x)
    # a custom autograd.Function would show up as prim::PythonOp (0 FLOPs in
    # mmengine's analysis); the trace must hold plain aten ops
    assert 'prim::PythonOp' not in str(traced.inlined_graph)
    x2 = randn(2, C, 6, 5)
    torch.testing.assert_close(traced(x2), block(x2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('variant,mode', ALL)
def test_fused_output_not_view_and_inplace_after(variant, mode):
    fused, literal = pair(variant, mode)
    x = randn(2, C, 5, 7)
    grads = []
    for block in (fused, literal):
        xi = x.clone().requires_grad_()
        out = block(xi)
        assert out._base is None
        F.relu(out, inplace=True)  # as the blocks of mmseg/mmpose do
        out.sum().backward()
        grads.append(xi.grad)
    assert max_rel_err(grads[0], grads[1]) <= 1e-5


@pytest.mark.parametrize('variant,mode', ALL)
def test_no_grad_eval_deepcopy(variant, mode):
    fused, literal = pair(variant, mode)
    x = randn(2, C, 5, 7)
    ref = literal(x).detach()
    fused.eval()
    with torch.no_grad():
        assert max_rel_err(fused(x), ref) <= 1e-5
        twin = copy.deepcopy(fused)
        assert max_rel_err(twin(x), ref) <= 1e-5


@pytest.mark.parametrize('layout', sorted(LAYOUTS))
@pytest.mark.parametrize('variant,mode', ALL)
def test_fused_input_layouts(variant, mode, layout, fused_path):
    # forward and backward on inputs as they come: the kernel reads only contiguous ones
    check_fused_vs_literal(variant, mode, torch.float64, rtol=1e-11, perturb=0.3, layout=layout)


@pytest.mark.parametrize('variant,mode', ALL)
def test_input_without_grad(variant, mode, fused_path):
    # as the first block of a network: only the parameters need gradients
    check_fused_vs_literal(variant, mode, torch.float64, rtol=1e-11, perturb=0.3, input_grad=False)


def test_double_backward_refuses():
    block = make('paper', 'parallel')
    x = randn(1, C, 3, 3, requires_grad=True)
    (gx, ) = torch.autograd.grad(block(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()


# ------------------------------------------------------ observability
@pytest.mark.parametrize('variant,mode', ALL)
def test_attention_maps_through_identities(variant, mode):
    fused, literal = pair(variant, mode)
    x = randn(2, C, 5, 7)
    maps = []
    for block in (fused, literal):
        seen = {}
        for name in ('ch_attn', 'sp_attn'):
            getattr(block, name).register_forward_hook(
                lambda m, i, o, name=name: seen.__setitem__(name, o.detach()))
        out = block(x).detach()
        assert seen['ch_attn'].shape == (2, C, 1, 1)
        assert seen['sp_attn'].shape == (2, 1, 5, 7)
        a_ch, a_sp = seen['ch_attn'], seen['sp_attn']
        if mode == 'parallel':
            expect = x * a_ch + x * a_sp
        else:
            expect = x * a_ch * a_sp
        assert max_rel_err(out, expect) <= 1e-5
        maps.append(seen)
    for name in ('ch_attn', 'sp_attn'):
        assert max_rel_err(maps[0][name], maps[1][name]) <= 1e-5


# ------------------------------------------------------------ numerics
def fp64_literal(block, x, grad):
    """:func:`fwd_bwd` of the literal form in fp64, with ``block``'s parameters as they
    are (rounded to its dtype) and ``x``, ``grad`` as given.

    Asserts that no input of PSA_s's ReLU lies within 0.05 of 0: half precision could
    move it across (an O(1) change of the gradients in every form, no error of any).
    """
    ref = copy.deepcopy(block).double()
    ref.fused = False
    relu_in = []
    if block.variant == 'official' and block.mode == 'sequential':
        ref.conv_up[2].register_forward_pre_hook(
            lambda m, args: relu_in.append(args[0].abs().min().item()))
    got = fwd_bwd(ref, x.double(), grad.double())
    assert all(m > 0.05 for m in relu_in), f'ReLU input {relu_in}: take another seed'
    return got


# Half precision against the fp64 literal form: the largest error of the output, the
# input gradient and each parameter gradient, relative to that tensor's largest value.
# Measured here (C = 32, 2 x 6 x 5, parameters perturbed by 0.3; seed 0 / the worst of
# 8 seeds): the per-sample CPU kernel (fp32 inside) bf16 3.1e-3 / 3.7e-3, fp16
# 4.3e-4 / 4.7e-4; the ATen path, which contracts in the input dtype, and the literal
# form bf16 3.3e-2 / 8.6e-2 (an ill-conditioned sp_wv.bias gradient), fp16 6.8e-3 /
# 8.8e-3; PSA_s (its GEMMs in x's dtype) bf16 1.5e-2, fp16 3.3e-3 at seed 0. A dropped
# bias, a wrong sign or a missing 1/HW is >= 8.5e-2 in some tensor (fp64, every
# parameter tried), most 5 % errors of one parameter >= 1e-2.
HALF_RTOL = {torch.bfloat16: 5e-2, torch.float16: 1e-2}
KERNEL_HALF_RTOL = {torch.bfloat16: 1e-2, torch.float16: 1.5e-3}


def half_rtol(dtype, variant, mode, form):
    """The tolerance of ``form`` (a :func:`form` value) in ``dtype``."""
    kernel = form == 'cpu_kernel' and (variant == 'paper' or mode == 'parallel')
    return (KERNEL_HALF_RTOL if kernel else HALF_RTOL)[dtype]


def cpu_half_ops_missing(dtype) -> str:
    """Why ``dtype`` cannot run the block's ATen ops on the CPU here ('' if it can): torch
    2.1 has no CPU fp16 ``baddbmm``/``conv2d`` (newer torch has them; mmpsa's CPU kernel,
    fp32 inside, is not the limit)."""
    if DEVICE.type != 'cpu' or dtype != torch.float16:
        return ''
    one = torch.ones(1, 2, 2, dtype=dtype)
    for op, call in (('baddbmm', lambda: torch.baddbmm(one, one, one)),
                     ('conv2d', lambda: F.conv2d(one[None], one[None]))):
        try:
            call()
        except RuntimeError:
            return (f'CPU fp16 {op} is not implemented in torch {torch.__version__}: the '
                    f'test needs a newer torch (2.14 has it)')
    return ''


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=['bf16', 'fp16'])
@pytest.mark.parametrize('variant,mode', ALL)
def test_half_matches_fp64(variant, mode, dtype, form):
    # half activations and parameters: the output and gradients in half
    missing = cpu_half_ops_missing(dtype)
    if missing:
        pytest.skip(missing)
    block = make(variant, mode, perturb=0.3, fused=form != 'literal').to(dtype)
    torch.manual_seed(1)
    x = randn(2, C, 6, 5).to(dtype)
    grad = randn(2, C, 6, 5).to(dtype)
    got = fwd_bwd(block, x, grad)
    assert got[0].dtype == got[1].dtype == dtype
    assert all(g.dtype == dtype for g in got[2].values())
    assert_matches(got, fp64_literal(block, x, grad), half_rtol(dtype, variant, mode, form))


class DtypeRecorder(TorchDispatchMode):
    """Records the input dtypes of softmax and layer norm calls."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ('_softmax', 'softmax', 'native_layer_norm', 'layer_norm'):
            self.seen.append((name, args[0].dtype))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize('variant,mode', ALL)
def test_autocast_bf16(variant, mode, form):
    # fp32 parameters under bf16 autocast, fed a conv's output there (bf16): softmax and
    # LayerNorm in fp32, the output and input gradient in bf16, the rest in fp32
    block = make(variant, mode, perturb=0.3, fused=form != 'literal')
    torch.manual_seed(1)
    x = randn(2, C, 6, 5).bfloat16()
    grad = randn(2, C, 6, 5).bfloat16()
    rec = DtypeRecorder()
    with rec:
        got = fwd_bwd(block, x, grad, autocast=torch.bfloat16)
    assert rec.seen and all(dt == torch.float32 for _, dt in rec.seen)
    assert got[0].dtype == got[1].dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in got[2].values())
    assert_matches(got, fp64_literal(block, x, grad), half_rtol(torch.bfloat16, variant, mode,
                                                                form))


@pytest.mark.parametrize('variant,mode', ALL)
def test_large_input_finite(variant, mode):
    # HW = 512 x 1024, |x| up to 1e4, autocast bf16 and fp32
    torch.manual_seed(0)
    x = (torch.rand(1, 8, 512, 1024) * 2 - 1) * 1e4
    for fused in (True, False):
        block = make(variant, mode, c=8, fused=fused)
        with torch.no_grad():
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
                assert torch.isfinite(block(x)).all()
            if fused:
                assert torch.isfinite(block(x)).all()


# ---------------------------------------------------------------- init
@pytest.mark.parametrize('variant,mode', ALL)
def test_init_weights_reapplies(variant, mode):
    block = make(variant, mode, c=64)
    with torch.no_grad():
        for p in block.parameters():
            p.fill_(0.123)
    for _ in range(3):  # any number of times, each re-initialises
        block.init_weights()
        assert not block.is_init
        for name, p in block.named_parameters():
            assert not torch.all(p == 0.123), name
    if variant == 'official':
        # kaiming normal, fan_in, ReLU gain: std = sqrt(2 / C)
        std = block.conv_v_left.weight.std().item()
        assert abs(std / math.sqrt(2 / 64) - 1) < 0.15
    else:  # PyTorch default conv init: U(+-1/sqrt(fan_in)); LayerNorm 1, 0
        bound = 1 / math.sqrt(64)
        assert block.ch_wv.weight.abs().max() <= bound
        assert torch.all(block.ln.weight == 1) and torch.all(block.ln.bias == 0)


def test_init_cfg_and_parent_init():
    from mmengine.model import BaseModule
    block = PolarizedSelfAttention(16, init_cfg=dict(type='Constant', val=0.5, layer='Conv2d'))
    for _ in range(2):
        block.init_weights()
        assert torch.all(block.ch_wv.weight == 0.5)

    class Parent(BaseModule):

        def __init__(self):
            super().__init__(init_cfg=dict(type='Constant', val=0.0, layer='Conv2d'))
            self.psa = PolarizedSelfAttention(16)

    parent = Parent()
    parent.init_weights()
    # the parent's init_cfg zeroed the convs, then the block re-applied its own
    assert parent.psa.ch_wv.weight.abs().sum() > 0


# -------------------------------------------------------------- errors
@pytest.mark.parametrize('kwargs,word', [
    (dict(in_channels=0), 'in_channels'),
    (dict(in_channels=-4), 'in_channels'),
    (dict(in_channels=7), 'in_channels'),
    (dict(in_channels=8.0), 'in_channels'),
    (dict(in_channels=True), 'in_channels'),
    (dict(in_channels='8'), 'in_channels'),
    (dict(in_channels=6, mode='sequential', variant='official'), 'in_channels'),
    (dict(in_channels=8, mode='serial'), 'mode'),
    (dict(in_channels=8, variant='released'), 'variant'),
    (dict(in_channels=8, fused='yes'), 'fused'),
])
def test_bad_arguments(kwargs, word):
    value = {'in_channels': kwargs['in_channels'], **kwargs}[word]
    with pytest.raises(ValueError, match=word) as err:
        PolarizedSelfAttention(**kwargs)
    assert repr(value) in str(err.value)


@pytest.mark.parametrize('fused', [True, False])
@pytest.mark.parametrize('shape', [(8, 5, 5), (1, 8, 5, 5, 1), (1, 6, 5, 5)])
def test_bad_inputs(shape, fused):
    block = PolarizedSelfAttention(8, fused=fused)
    with pytest.raises(ValueError, match='x') as err:
        block(randn(*shape))
    assert repr(tuple(shape)) in str(err.value)


# ------------------------------------------------ registry and plugin
def test_registered_once_builds_from_both_scopes():
    from mmengine.registry import MODELS as ROOT
    from mmpose.registry import MODELS as POSE
    from mmseg.registry import MODELS as SEG
    assert ROOT.get('PolarizedSelfAttention') is PolarizedSelfAttention
    for registry in (SEG, POSE):
        assert 'PolarizedSelfAttention' not in registry.module_dict
        block = registry.build(dict(type='PolarizedSelfAttention', in_channels=8))
        assert type(block) is PolarizedSelfAttention
        assert block.in_channels == 8
    block = SEG.build(
        dict(
            type='PolarizedSelfAttention',
            in_channels=16,
            mode='sequential',
            variant='official',
            fused=False))
    assert (block.mode, block.variant, block.fused) == ('sequential', 'official', False)


def test_mmseg_resnet50_plugin():
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS as SEG
    with DefaultScope.overwrite_default_scope('mmseg'):  # whatever scope earlier tests left
        backbone = SEG.build(
            dict(
                type='ResNetV1c',
                depth=50,
                init_cfg=None,
                plugins=[dict(cfg=dict(type='PolarizedSelfAttention'), position='after_conv2')]))
    keys = backbone.state_dict().keys()
    assert 'layer1.0.psa.ch_wv.weight' in keys
    assert 'layer4.2.psa.sp_wq.bias' in keys
    assert not any('polarized' in k for k in keys)
    assert backbone.layer1[0].psa.in_channels == 64
    outs = backbone(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [256, 512, 1024, 2048]
    assert all(torch.isfinite(o).all() for o in outs)


# ------------------------------------------------------------- memory
@pytest.mark.parametrize('variant,mode', ALL)
def test_fused_keeps_only_small_tensors_for_backward(variant, mode):
    from mmpsa.analysis.benchmark import saved_activation_bytes
    fused, literal = pair(variant, mode)
    b, c, h, w = 2, C, 16, 12
    x = torch.randn(b, c, h, w, requires_grad=True)
    beyond_input = saved_activation_bytes(fused, x) - x.nbytes
    # O(B (C + HW)): a handful of per-sample vectors, no (C/2, HW) tensor
    assert 0 < beyond_input <= 8 * b * (c + h * w) * x.element_size()
    assert saved_activation_bytes(literal, x) - x.nbytes > 4 * beyond_input


def test_benchmark_table_smoke():
    from mmpsa.analysis.benchmark import bench_shape, format_table
    r = bench_shape('paper', 'parallel', (8, 4, 4), reps=1)
    assert r['fused_s'] > 0 and r['literal_s'] > 0
    assert r['literal_saved'] > r['fused_saved'] > 0
    table = format_table([r], hrnet_shapes=[(8, 4, 4)])
    assert '| paper | parallel | 2 x 8 @ 4 x 4 |' in table
    assert 'geometric-mean speed-up' in table


@pytest.mark.filterwarnings('ignore::FutureWarning')
@pytest.mark.parametrize('variant,mode', ALL)
def test_mmengine_flops_count_the_fused_ops(variant, mode):
    from mmengine.analysis import FlopAnalyzer
    b, c, h, w = 2, C, 6, 5
    x = torch.randn(b, c, h, w)
    flops = FlopAnalyzer(make(variant, mode), (x, )).total()
    literal = FlopAnalyzer(make(variant, mode, fused=False), (x, )).total()
    # three C-length contractions per pixel at least (0 if a custom
    # autograd.Function were traced), and well below the literal 1x1 convs
    assert 3 * b * c * h * w <= flops < literal
