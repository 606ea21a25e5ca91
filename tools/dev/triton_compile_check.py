"""Compile the fused block's Triton kernels for an NVIDIA GPU, on a machine without one, and
report their registers and spills.

The set compiled is what the runtime launches: the block's forward and backward run through
:func:`mmpsa.layers.psa_triton.fused_psa` on ``meta`` tensors with every kernel replaced by a
recorder, for each shape, variant, mode, dtype and gradient need, so each launch comes with
the tile and warps the runtime's own chooser (:class:`psa_triton._Launch`) picked and its real
arguments. Each distinct launch is then specialised as triton's launcher does it on a GPU
(integer arguments equal to 1 become constants, those divisible by 16 and the pointers carry
the divisibility hint: ``native_specialize_impl`` of the CUDA backend), lowered to PTX and
assembled with the ``ptxas`` of triton's wheel (``-v``). One line per kernel: registers, spill
stores/loads and shared memory. Nothing runs.

Usage::

    python tools/dev/triton_compile_check.py                    # sm_90, every shape and dtype
    python tools/dev/triton_compile_check.py --dtypes bf16 fp32 --shapes 32x384x8x6

Exit status: 0 when every kernel compiled without spilling, 1 otherwise, 2 for bad usage.
Run it without ``TRITON_INTERPRET=1`` (under the interpreter kernels are not compiled).
"""
import argparse
import contextlib
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Dict, Iterator, List, NamedTuple, Tuple

#: ``(B, C, H, W)`` of the GPU check: HRNet-W48 at batch 32 (pose, 256x192 crops), the
#: segmentation HRNet-W48 at batch 2 (512x1024 crops), C=512 at 128x256, and every width at 12x9.
SHAPES = ((32, 48, 64, 48), (32, 96, 32, 24), (32, 192, 16, 12), (32, 384, 8, 6), (32, 64, 64, 48),
          (2, 48, 128, 256), (2, 96, 64, 128), (2, 192, 32, 64), (2, 384, 16, 32),
          (2, 512, 128, 256), *((2, c, 12, 9) for c in (48, 64, 96, 192, 384, 512)))
VARIANTS = (('paper', 'parallel'), ('paper', 'sequential'), ('official', 'parallel'),
            ('official', 'sequential'))
#: ``(input needs grad, parameters need grad)``: training; a frozen stage before it; frozen PSA.
NEEDS = ((True, True), (False, True), (True, False))
DTYPES = ('bf16', 'fp16', 'fp32', 'fp64')


class Launch(NamedTuple):
    """One distinct specialisation: kernel name, signature, constants, hints, warps."""
    kernel: str
    signature: Tuple[Tuple[str, str], ...]
    constexprs: Tuple[Tuple[str, object], ...]
    hints: Tuple[Tuple[int, str], ...]  # (argument index, triton attribute string)
    num_warps: int

    def describe(self) -> str:
        flags = ' '.join(f'{k}={getattr(v, "name", v)}' for k, v in self.constexprs if k.isupper())
        io = next((t for k, t in self.signature if k == 'x_ptr'), '?')
        return f'{self.kernel} x={io.lstrip("*")} {flags} num_warps={self.num_warps}'


def parse_args(argv: List[str] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--arch', type=int, default=90, help='CUDA compute capability x 10')
    parser.add_argument('--dtypes', nargs='+', choices=DTYPES, default=list(DTYPES))
    parser.add_argument(
        '--shapes',
        nargs='+',
        default=['x'.join(map(str, s)) for s in SHAPES],
        help='BxCxHxW input shapes (default: the GPU check\'s and 12x9)')
    parser.add_argument(
        '--variants',
        nargs='+',
        choices=[f'{v}-{m}' for v, m in VARIANTS],
        default=[f'{v}-{m}' for v, m in VARIANTS])
    return parser.parse_args(argv)


class _Recorder:
    """Stands for a kernel: ``kernel[grid](*args, **kwargs)`` records instead of launching."""

    def __init__(self, name: str, seen: list) -> None:
        self.name, self.seen = name, seen

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.seen.append((self.name, args, kwargs))


@contextlib.contextmanager
def recording(kernels) -> Iterator[list]:
    """Replace every ``@triton.jit`` function of ``kernels`` by a :class:`_Recorder` (and its
    autocast guard, which has no ``meta`` device, by a no-op)."""
    from triton.runtime.jit import JITFunction
    names = [n for n, v in vars(kernels).items() if isinstance(v, JITFunction)]
    saved = {n: getattr(kernels, n) for n in names + ['no_autocast']}
    seen: list = []
    try:
        for name in names:
            setattr(kernels, name, _Recorder(name, seen))
        kernels.no_autocast = lambda t: contextlib.nullcontext()
        yield seen
    finally:
        for name, fn in saved.items():
            setattr(kernels, name, fn)


def runtime_launches(kernels, shape, dtype, variant: str, mode: str, needs) -> list:
    """``(kernel name, args, kwargs)`` of every launch of one block fwd+bwd on ``meta``."""
    import torch

    from mmpsa.layers import PolarizedSelfAttention
    block = PolarizedSelfAttention(shape[1], variant=variant, mode=mode)
    block = block.to(device='meta', dtype=dtype)
    block.requires_grad_(needs[1])
    x = torch.empty(shape, device='meta', dtype=dtype, requires_grad=needs[0])
    with recording(kernels) as seen:
        out = kernels.fused_psa(x, variant == 'paper', mode == 'sequential',
                                block.fused_params())[0]
        if out.requires_grad:
            torch.autograd.backward(out, torch.empty_like(out))
    return seen


def specialise(kernels, name: str, args: tuple, kwargs: dict, backend) -> Launch:
    """The specialisation triton's CUDA launcher makes of this call."""
    from triton._C.libtriton import native_specialize_impl
    fn = getattr(kernels, name)
    values = dict(zip(fn.arg_names, args), **{k: v for k, v in kwargs.items() if k in fn.arg_names})
    signature, constexprs, hints = [], [], []
    for i, param in enumerate(fn.params):
        value = values[param.name]
        if param.is_constexpr:
            kind, attr = 'constexpr', None
        else:
            kind, attr = native_specialize_impl(
                type(backend), value, False, not param.do_not_specialize,
                not param.do_not_specialize_on_alignment)[:2]
        signature.append((param.name, kind))
        if kind == 'constexpr':
            constexprs.append((param.name, value))
        elif attr:
            hints.append((i, attr))
    return Launch(name, tuple(signature), tuple(constexprs), tuple(hints),
                  kwargs.get('num_warps', 4))


def plan(kernels, shapes, dtypes, variants, backend) -> Dict[Launch, List[str]]:
    """Every distinct launch of the runtime for these cases, with the cases that make it."""
    import torch
    torch_dtypes = dict(
        bf16=torch.bfloat16, fp16=torch.float16, fp32=torch.float32, fp64=torch.float64)
    launches: Dict[Launch, List[str]] = {}
    for shape, dtype, (variant, mode), needs in itertools.product(shapes, dtypes, variants, NEEDS):
        for name, args, kwargs in runtime_launches(kernels, shape, torch_dtypes[dtype], variant,
                                                   mode, needs):
            case = f'{"x".join(map(str, shape))} {dtype} {variant}-{mode}'
            launches.setdefault(specialise(kernels, name, args, kwargs, backend), []).append(case)
    return launches


def compile_launch(kernels, launch: Launch, target, backend):
    """Compile one specialisation; returns triton's compiled kernel."""
    import triton
    fn = getattr(kernels, launch.kernel)
    src = triton.compiler.ASTSource(
        fn=fn,
        signature=dict(launch.signature),
        constexprs=dict(launch.constexprs),
        attrs={
            (i, ): backend.parse_attr(a)
            for i, a in launch.hints
        })
    return triton.compile(src, target=target, options=dict(num_warps=launch.num_warps))


def ptxas_report(ptx: str, arch: int) -> Dict[str, int]:
    """``registers``, ``spill_stores``, ``spill_loads`` (bytes) from ``ptxas -v`` on ``ptx``,
    with the options triton assembles with."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, 'k.ptx')
        with open(src, 'w') as f:
            f.write(ptx)
        done = subprocess.run([
            get_ptxas(arch).path, '-lineinfo', '-v', '--regAllocOptLevel=2',
            f'--gpu-name={sm_arch_from_capability(arch)}', src, '-o',
            os.path.join(tmp, 'k.o')
        ],
                              capture_output=True,
                              text=True,
                              check=True)
    log = done.stdout + done.stderr
    regs = re.search(r'Used (\d+) registers', log)
    spills = re.search(r'(\d+) bytes spill stores, (\d+) bytes spill loads', log)
    if regs is None or spills is None:
        raise RuntimeError(f'unexpected ptxas -v output: {log}')
    return dict(
        registers=int(regs.group(1)),
        spill_stores=int(spills.group(1)),
        spill_loads=int(spills.group(2)))


def main(argv: List[str] = None) -> int:
    args = parse_args(argv)
    if os.environ.get('TRITON_INTERPRET', '0') == '1':
        print(
            'TRITON_INTERPRET=1: the kernels are interpreted, not compiled; unset it',
            file=sys.stderr)
        return 2
    try:
        shapes = [tuple(int(v) for v in s.split('x')) for s in args.shapes]
        if any(len(s) != 4 for s in shapes):
            raise ValueError
    except ValueError:
        print(f'--shapes must read BxCxHxW, got {args.shapes}', file=sys.stderr)
        return 2
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend

    from mmpsa.layers import psa_triton
    target = GPUTarget('cuda', args.arch, 32)
    backend = CUDABackend(target)
    variants = [tuple(v.split('-')) for v in args.variants]
    start = time.perf_counter()
    launches = plan(psa_triton, shapes, args.dtypes, variants, backend)
    print(
        f'{len(launches)} distinct launches from {len(shapes)} shapes x {len(args.dtypes)} '
        f'dtypes x {len(variants)} variants x {len(NEEDS)} gradient needs',
        flush=True)
    failed = spilled = 0
    for launch, cases in launches.items():
        try:
            compiled = compile_launch(psa_triton, launch, target, backend)
            report = ptxas_report(compiled.asm['ptx'], args.arch)
        except Exception as e:  # report every failure, then fail
            failed += 1
            lines = [line for line in str(e).splitlines() if line.strip()] or ['']
            print(f'FAILED {launch.describe()}: {type(e).__name__}: {lines[0]} ... {lines[-1]}')
            continue
        spill = report['spill_stores'] + report['spill_loads']
        spilled += spill > 0
        print(
            f'{"ok" if not spill else "SPILLS"} sm_{args.arch} {launch.describe()} '
            f'registers={report["registers"]} spill_stores={report["spill_stores"]} '
            f'spill_loads={report["spill_loads"]} shared={compiled.metadata.shared} '
            f'(e.g. {cases[0]})',
            flush=True)
    total = len(launches)
    print(f'{total - failed}/{total} compiled for sm_{args.arch}, {spilled} spilling, in '
          f'{time.perf_counter() - start:.0f} s')
    return 1 if failed or spilled else 0


if __name__ == '__main__':
    sys.exit(main())
