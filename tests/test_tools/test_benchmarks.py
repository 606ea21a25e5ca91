"""The benchmark library (mmpsa.analysis.benchmark, .benchmark_backbone) and the GPU check's
helpers on CPU: the one train-step benchmark on its timm-free test network, hrnet-w48 without
timm, parity's detail, the profiler split off CUDA, and the JIT-cache reader on both cache
layouts of triton 3.x. No timings are asserted."""
import sys
from types import SimpleNamespace

import pytest
import torch

from mmpsa.analysis import benchmark, benchmark_backbone, gpu_check


def test_train_step_on_the_test_network_names_what_ran():
    rows = benchmark_backbone.benchmark_network(
        'tiny', ('fused', 'literal'), batch=2, reps=1, warmup=1, amp='bf16')
    assert [r['block'] for r in rows] == ['stock', 'fused', 'literal']
    stock, fused, literal = rows
    assert stock['ran'] == '—' and literal['ran'] == 'literal x4'
    assert fused['ran'].split()[0] in ('cpu', 'aten', 'plain') and fused['ran'].endswith(' x4')
    assert fused['params'] == literal['params'] > stock['params']
    assert stock['amp'] == 'bfloat16' and stock['device'] == 'cpu'
    assert stock['wall_overhead_pct'] is None and isinstance(fused['wall_overhead_pct'], float)
    table = benchmark_backbone.format_table(rows)
    assert '| tiny ResNet (test network) | 2x3x32x32 | cpu | bfloat16 | literal |' in table
    assert table.splitlines()[0].endswith('| ran |')


def test_step_options_are_checked():
    with pytest.raises(ValueError, match='amp must be one of'):
        benchmark_backbone.benchmark_network('tiny', amp='fp8')
    with pytest.raises(ValueError, match='name must be one of'):
        benchmark_backbone.benchmark_network('hrnet-w32')
    with pytest.raises(ValueError, match='reps must be >= 1'):
        benchmark_backbone.benchmark_network('tiny', reps=0)


def test_hrnet_w48_without_timm_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, 'timm', None)  # import timm raises ImportError
    with pytest.raises(ImportError, match=r'`pip install timm`'):
        benchmark_backbone.benchmark_network('hrnet-w48', reps=1)
    with pytest.raises(ImportError, match=r'`pip install timm`'):
        benchmark_backbone.run(['hrnet-w48'], quiet=True)


def test_hrnet_w48_is_timms_with_a_psa_in_every_residual_block():
    pytest.importorskip('timm', reason='timm is not installed (not one of mmpsa\'s requirements)')
    _, build, _ = benchmark_backbone.NETWORKS['hrnet-w48']
    stock = build(None)
    psa = build(dict(mode='parallel', variant='paper', fused=True))
    missing, unexpected = psa.load_state_dict(stock.state_dict(), strict=False)
    assert not unexpected and missing and all('.psa.' in k for k in missing)
    assert sum(1 for m in psa.modules() if hasattr(m, 'last_path')) == 108


def test_parity_gives_error_path_and_reproducibility():
    res = benchmark.parity(
        'official', 'sequential', (32, 5, 3), ('literal', 'plain', 'triton'), channels_last=True)
    assert res['literal']['ran'] == 'literal' and res['plain']['ran'] == 'plain'
    for path in ('literal', 'plain'):
        assert 0 <= res[path]['error'] <= benchmark.TOLERANCES[torch.float32]
        assert res[path]['bitwise'] is True
    if isinstance(res['triton'], dict):  # TRITON_INTERPRET=1 (or CUDA): the kernels ran
        assert res['triton']['ran'] == 'triton'
        assert res['triton']['error'] <= benchmark.TOLERANCES[torch.float32]
    else:  # a CPU tensor without the interpreter: the forced path says why it cannot run
        assert not _interpreting() and res['triton'].startswith('RuntimeError'), res
    with pytest.raises(ValueError, match='no literal form'):
        benchmark.parity('paper', 'parallel', (32, 5, 3), ('bn', ))


def _interpreting() -> bool:
    from mmpsa.layers import dispatch
    module = dispatch.triton_module()
    return module is not None and module.INTERPRET


def test_profile_split_off_cuda_has_host_times_only():
    row = benchmark.profile_split('paper', 'parallel', (32, 5, 3), 'plain', steps=1)
    assert row['ran'] == 'plain' and row['path'] == 'plain'
    assert row['step_ms'] > 0 and row['host_ms'] > 0
    assert row['triton_ms'] is None and row['other_ms'] is None and row['launches'] is None
    table = benchmark.format_profile_table([row])
    assert '| plain | plain |' in table and table.rstrip().endswith('| n/a | n/a | n/a |')


class _Kernel:
    """Stands for a triton CompiledKernel after its first launch."""

    def __init__(self, regs, spills):
        self.n_regs, self.n_spills = regs, spills
        self.src = SimpleNamespace(
            signature={
                'x_ptr': '*bf16',
                'B': 'i32',
                'BLOCK_C': 'constexpr'
            },
            constants={
                (2, ): 64,
                (3, ): SimpleNamespace(name='fp32')
            })
        self.metadata = SimpleNamespace(num_warps=4, num_stages=3, shared=512)


def test_jit_cache_reader_reads_both_cache_layouts():
    kernel = _Kernel(96, 0)
    new = SimpleNamespace(
        arg_names=['x_ptr', 'B', 'BLOCK_C', 'ACC'],
        device_caches={0: ({
            'key': kernel
        }, {}, None, None, None)})  # triton >= 3.2
    old = SimpleNamespace(arg_names=new.arg_names, cache={0: {'key': _Kernel(255, 40)}})  # 3.0/3.1
    interpreted = SimpleNamespace(arg_names=new.arg_names)  # TRITON_INTERPRET=1: no cache
    rows = gpu_check.kernel_rows(dict(_a_kernel=new, _b_kernel=old, _c_kernel=interpreted))
    assert [(r['kernel'], r['n_regs'], r['n_spills']) for r in rows] == [('_a_kernel', 96, 0),
                                                                         ('_b_kernel', 255, 40)]
    assert rows[0]['dtype'] == 'bf16' and rows[0]['constexprs'] == 'ACC=fp32, BLOCK_C=64'
    text = gpu_check.format_kernel_rows(rows)
    assert '| _a_kernel | bf16 | ACC=fp32, BLOCK_C=64 | 4 | 3 | 512 | 96 | 0 |' in text
    assert text.endswith('2 compiled kernels; most registers: 255; with spills: 1')


def test_shape_specs():
    assert gpu_check.parse_shape('48x13x21:cl') == ((48, 13, 21), True)
    assert gpu_check.parse_shape('384x16x32') == ((384, 16, 32), False)
    with pytest.raises(ValueError, match='CxHxW or CxHxW:cl'):
        gpu_check.parse_shape('48x13x21:nhwc')
    # the GPU preset's section limits are the script's; its shapes parse
    for _, shapes in gpu_check.PRESETS['gpu']['parity']:
        for text in shapes:
            gpu_check.parse_shape(text)
