"""Compile the fused block's Triton kernels for an NVIDIA GPU, on a machine without one.

triton lowers each kernel to PTX and assembles it with the ``ptxas`` its wheel ships, for
the target given (default: sm_90, the H100/H200), so what only the GPU compiler would
reject (types that change across a loop, a construct the interpreter accepts) shows here;
nothing runs. It compiles every specialisation :mod:`mmpsa.layers.psa_triton` launches
(each kernel with the constexpr flags the autograd Function uses), for each input dtype
and a few tile shapes, and prints one line per kernel with its shared memory.

Usage::

    python tools/triton_compile_check.py                    # sm_90, every dtype
    python tools/triton_compile_check.py --arch 80 --dtypes bf16 fp32

Run it without ``TRITON_INTERPRET=1`` (under the interpreter kernels are not compiled).
"""
import argparse
import inspect
import itertools
import os
import sys
import time
from typing import Dict, Iterator, List, Tuple

#: ``(kernel, constexpr flags)`` as :class:`psa_triton._TritonPSA` launches them.
LAUNCHES: List[Tuple[str, Dict[str, int]]] = [
    ('_pool_kernel', {}),
    *(('_spatial_kernel', dict(SPATIAL=1, HAS_BIAS=bias, SEQ=seq))
      for bias, seq in itertools.product((0, 1), (0, 1))),  # paper
    ('_spatial_kernel', dict(SPATIAL=0, HAS_BIAS=0, SEQ=0)),  # official PSA_p: logits
    ('_spatial_kernel', dict(SPATIAL=2, HAS_BIAS=0, SEQ=0)),  # PSA_p: output
    ('_spatial_kernel', dict(SPATIAL=2, HAS_BIAS=0, SEQ=1)),  # PSA_s: output
    ('_grad_pool_kernel', dict(SEQ=0, HAS_SM=0)),
    ('_grad_pool_kernel', dict(SEQ=1, HAS_SM=0)),
    ('_grad_pool_kernel', dict(SEQ=0, HAS_SM=1)),
    *(('_grad_input_kernel', dict(SEQ=seq, WANT_DX=dx, WANT_DWQ=dwq, DENSE=0))
      for seq, dx, dwq in itertools.product((0, 1), (0, 1), (0, 1)) if dx or dwq),
    *(('_grad_input_kernel', dict(SEQ=1, WANT_DX=dx, WANT_DWQ=dwq, DENSE=1))
      for dx, dwq in ((1, 0), (1, 1))),
]

#: Pointer arguments in the input's dtype (the others are in the accumulation dtype).
IO_POINTERS = ('x_ptr', 'out_ptr', 'g_ptr', 'dx_ptr', 'e_ptr')
DTYPES = {
    'bf16': ('bf16', 'fp32'),
    'fp16': ('fp16', 'fp32'),
    'fp32': ('fp32', 'fp32'),
    'fp64': ('fp64', 'fp64')
}
#: ``(BLOCK_C, BLOCK_N)``: the HRNet-W48 tiles (C=48/64 and C=384/512) and the widest.
TILES = ((64, 128), (512, 16), (8192, 1))


def parse_args(argv: List[str] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--arch', type=int, default=90, help='CUDA compute capability x 10')
    parser.add_argument('--dtypes', nargs='+', choices=sorted(DTYPES), default=sorted(DTYPES))
    parser.add_argument(
        '--tiles',
        nargs='+',
        default=[f'{c}x{n}' for c, n in TILES],
        help='BLOCK_CxBLOCK_N tile shapes (default: %(default)s)')
    return parser.parse_args(argv)


def specialisations(dtypes: List[str], tiles: List[Tuple[int, int]]) -> Iterator[tuple]:
    """``(kernel name, io dtype, flags)`` for every launch, dtype and tile."""
    for (name, flags), dtype, (block_c, block_n) in itertools.product(LAUNCHES, dtypes, tiles):
        yield name, dtype, dict(flags, BLOCK_C=block_c, BLOCK_N=block_n)


def compile_kernel(kernels, name: str, dtype: str, flags: Dict[str, int], arch: int):
    """Compile one specialisation of ``kernels.<name>`` for ``sm_<arch>``."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget

    fn = getattr(kernels, name)
    io, acc = DTYPES[dtype]
    signature, constexprs = {}, {}
    params = inspect.signature(fn.fn).parameters
    for arg, param in params.items():
        if param.annotation is tl.constexpr:
            signature[arg] = 'constexpr'
            constexprs[arg] = getattr(tl, {'fp32': 'float32', 'fp64': 'float64'}[acc]) \
                if arg == 'ACC' else flags[arg]
        elif arg.endswith('_ptr'):
            signature[arg] = '*' + (io if arg in IO_POINTERS else acc)
        else:
            signature[arg] = 'fp32' if arg == 'inv_n' else 'i32'
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget('cuda', arch, 32))


def main(argv: List[str] = None) -> int:
    args = parse_args(argv)
    if os.environ.get('TRITON_INTERPRET', '0') == '1':
        print(
            'TRITON_INTERPRET=1: the kernels are interpreted, not compiled; unset it',
            file=sys.stderr)
        return 2
    try:
        tiles = [tuple(int(v) for v in t.split('x')) for t in args.tiles]
    except ValueError:
        print(f'--tiles must read BLOCK_CxBLOCK_N, got {args.tiles}', file=sys.stderr)
        return 2
    from mmpsa.layers import psa_triton
    failed = 0
    start = time.perf_counter()
    for name, dtype, flags in specialisations(args.dtypes, tiles):
        shown = ' '.join(f'{k}={v}' for k, v in flags.items())
        try:
            compiled = compile_kernel(psa_triton, name, dtype, flags, args.arch)
        except Exception as e:  # report every failure, then fail
            failed += 1
            lines = [line for line in str(e).splitlines() if line.strip()] or ['']
            print(f'FAILED {name} {dtype} {shown}: {type(e).__name__}: {lines[0]} ... {lines[-1]}')
            continue
        print(f'ok sm_{args.arch} {name} {dtype} {shown} shared={compiled.metadata.shared}')
    total = len(LAUNCHES) * len(args.dtypes) * len(tiles)
    print(f'{total - failed}/{total} compiled for sm_{args.arch} in '
          f'{time.perf_counter() - start:.0f} s')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
