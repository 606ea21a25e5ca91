"""The fused paths' parameter form and source hash, and the attention maps hooks see
(mmpsa/layers/psa_fused.py, psa.py, ext_source.py, mmpsa/csrc)."""
import copy
import shutil

import pytest
import torch

from mmpsa.layers import PolarizedSelfAttention, dispatch, psa_fused
from mmpsa.layers.ext_source import CSRC_DIR, source_hash

VARIANTS = ('paper', 'official')
MODES = ('parallel', 'sequential')
ALL = [(v, m) for v in VARIANTS for m in MODES]
C = 32  # official sequential: LayerNorm over C // 8 = 4 channels
PATHS = ('literal', 'plain', 'aten', 'cpu_kernel')


def make(variant, mode, dtype=torch.float32, seed=0, fused=True):
    torch.manual_seed(seed)
    return PolarizedSelfAttention(C, mode=mode, variant=variant, fused=fused).to(dtype)


# ------------------------------------------------------ parameter form
def test_param_names_agree_with_the_extension():
    from mmpsa import _ext
    assert tuple(_ext.PARAM_NAMES) == psa_fused.PARAM_NAMES == psa_fused.PSAParams._fields[:-1]


@pytest.mark.parametrize('variant,mode', ALL)
def test_fused_params_are_the_block_parameters(variant, mode):
    block = make(variant, mode)
    params = block.fused_params()
    present = [t for t in params.tensors if t is not None]
    # every parameter exactly once, as the tensor itself
    assert sorted(map(id, present)) == sorted(map(id, block.parameters()))
    if variant == 'paper':
        assert params.ch_wz is block.ch_wz.weight and params.ch_ln_w is block.ln.weight
        assert params.ln_eps == block.ln.eps and params.ch_wz2 is None
    elif mode == 'parallel':
        assert params.ch_wz is block.conv_up.weight and params.ch_ln_w is None
        assert params.ch_bq is None and params.sp_bv is None
    else:
        assert params.ch_wz is block.conv_up[0].weight
        assert params.ch_ln_b is block.conv_up[1].bias
        assert params.ch_wz2 is block.conv_up[3].weight
        assert params.ln_eps == block.conv_up[1].eps


def test_fused_params_follow_deepcopy_and_loading():
    block = make('official', 'sequential')
    twin = copy.deepcopy(block)
    assert sorted(id(t) for t in twin.fused_params().tensors
                  if t is not None) == sorted(map(id, twin.parameters()))
    other = make('official', 'sequential', seed=1)
    block.load_state_dict(other.state_dict())
    x = torch.randn(2, C, 4, 3)
    torch.testing.assert_close(block(x), other(x))


def test_source_hash_covers_every_file(tmp_path):
    src = tmp_path / 'csrc'
    shutil.copytree(CSRC_DIR, src)
    base = source_hash(str(src))
    assert base == source_hash(CSRC_DIR) == dispatch.extension().SOURCE_HASH
    names = sorted(p.name for p in src.iterdir())
    assert {'psa_fused.h', 'psa_fused.cpp'} <= set(names)
    for name in names:
        data = (src / name).read_bytes()
        (src / name).write_bytes(data + b' ')
        assert source_hash(str(src)) != base, name
        (src / name).write_bytes(data)
    assert source_hash(str(src)) == base
    (src / 'new.cpp').write_text('')
    assert source_hash(str(src)) != base


# ------------------------------------------------------- maps for hooks
def run_with_hooks(block, x, edit=None):
    """Forward + backward of ``block`` with hooks on the maps; ``edit`` changes them in
    place. Returns (output, x.grad, parameter grads, the maps the hooks saw)."""
    seen = {}

    def hook(name):

        def fn(module, inputs, output):
            seen[name] = output.detach().clone()
            if edit is not None:
                edit(output)

        return fn

    handles = [
        getattr(block, name).register_forward_hook(hook(name)) for name in ('ch_attn', 'sp_attn')
    ]
    try:
        x = x.detach().clone().requires_grad_()
        block.zero_grad(set_to_none=True)
        out = block(x)
        out.float().square().sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    grads = [p.grad.clone() for p in block.parameters()]
    return out.detach(), x.grad, grads, seen


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('variant,mode', ALL)
def test_maps_have_the_input_dtype_on_every_path(variant, mode, dtype, set_fused_path):
    x = torch.randn(2, C, 5, 7, dtype=dtype)
    maps = {}
    for path in PATHS:
        block = make(variant, mode, dtype=dtype, fused=path != 'literal')
        set_fused_path(path)
        maps[path] = run_with_hooks(block, x)[3]
        assert maps[path]['ch_attn'].dtype == dtype, path
        assert maps[path]['sp_attn'].dtype == dtype, path
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for path in PATHS[1:]:
        for name in ('ch_attn', 'sp_attn'):
            torch.testing.assert_close(
                maps[path][name].float(), maps['literal'][name].float(), rtol=tol, atol=tol)


@pytest.mark.parametrize('edit', ['zero_', 'mul_'])
@pytest.mark.parametrize('path', PATHS[1:])
@pytest.mark.parametrize('variant,mode', ALL)
def test_hook_may_edit_maps_in_place(variant, mode, path, edit, set_fused_path):
    # the fused paths compute from their own maps; a hook gets a tensor of its own
    block = make(variant, mode)
    set_fused_path(path)
    x = torch.randn(2, C, 5, 7)
    out, gx, grads, _ = run_with_hooks(block, x)
    change = (lambda t: t.zero_()) if edit == 'zero_' else (lambda t: t.mul_(0))
    out2, gx2, grads2, _ = run_with_hooks(block, x, edit=change)
    assert torch.equal(out, out2)
    assert torch.equal(gx, gx2)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads2))


@pytest.mark.parametrize('variant,mode', ALL)
def test_maps_alias_nothing_saved_for_backward(variant, mode):
    block = make(variant, mode)
    saved = []

    def pack(t):
        saved.append(t.untyped_storage().data_ptr())
        return t

    seen = {}
    for name in ('ch_attn', 'sp_attn'):
        getattr(block,
                name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(torch.randn(2, C, 5, 7, requires_grad=True))
    for name, a in seen.items():
        assert a.untyped_storage().data_ptr() not in saved, name
        assert not a.requires_grad, name
