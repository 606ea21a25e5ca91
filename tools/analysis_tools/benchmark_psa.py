"""Benchmark the PolarizedSelfAttention block: fused vs literal, fwd+bwd.

Prints, per shape (batch 2 by default), the median fwd+bwd time of the fused and of
the literal form (timed interleaved, after warm-up), the speed-up, and the
activation memory each keeps for backward; then a Markdown table and the
geometric-mean speed-up over the HRNet-like shapes. This is a benchmark, not a
test: timings depend on the machine and its load.

Usage::

    python tools/analysis_tools/benchmark_psa.py                       # all variants, 2 threads
    python tools/analysis_tools/benchmark_psa.py --configs paper:parallel --shapes 64x32x24
    # each evaluation path (MMPSA_BACKEND) and BatchNorm2d, on a GPU in bf16
    python tools/analysis_tools/benchmark_psa.py --device cuda --dtype bf16 --batch 32 \
        --paths literal aten triton bn
    # errors vs fp64:
    python tools/analysis_tools/benchmark_psa.py --parity --device cuda --dtype bf16
    # where the time goes: torch.profiler split (Triton kernels, other kernels, host)
    python tools/analysis_tools/benchmark_psa.py --profile --device cuda --dtype bf16 --batch 32 \
        --paths triton aten bn

The network-level train step (timm's HRNet-W48, stock vs PSA) is
``tools/analysis_tools/benchmark_backbone.py``; the prepared GPU run of all of them is
``tools/dev/gpu_check.sh``.
"""
import argparse
from typing import List, Tuple

import torch

from mmpsa.analysis.benchmark import (CONFIGS, HRNET_SHAPES, PATHS, SEG_SHAPES, TOLERANCES,
                                      bench_paths, error_text, format_paths_table,
                                      format_profile_table, format_table, parity, profile_split,
                                      run_benchmark)

DTYPES = {
    'fp32': torch.float32,
    'fp64': torch.float64,
    'fp16': torch.float16,
    'bf16': torch.bfloat16
}


def _shape(text: str) -> Tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'shape must read CxHxW, got {text!r}') from None
    return c, h, w


def _config(text: str) -> Tuple[str, str]:
    parts = text.split(':')
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f'config must read variant:mode, got {text!r}')
    return parts[0], parts[1]


def parse_args(argv: List[str] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument(
        '--threads', type=int, default=2, help='torch.set_num_threads; 0 leaves it (default: 2)')
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument(
        '--reps',
        type=int,
        default=0,
        help='interleaved repetitions per shape; 0 picks enough '
        'for --min-time seconds of literal steps (at least 5)')
    parser.add_argument('--min-time', type=float, default=1.0)
    parser.add_argument(
        '--configs', type=_config, nargs='+', default=list(CONFIGS), metavar='VARIANT:MODE')
    parser.add_argument(
        '--shapes',
        type=_shape,
        nargs='+',
        default=list(HRNET_SHAPES + SEG_SHAPES),
        metavar='CxHxW')
    parser.add_argument('--device', default='cpu', help='cpu or cuda (default: cpu)')
    parser.add_argument('--dtype', choices=sorted(DTYPES), default='fp32')
    parser.add_argument(
        '--paths',
        nargs='+',
        choices=PATHS,
        help='time these evaluations (MMPSA_BACKEND values, literal, bn = BatchNorm2d) '
        'instead of fused vs literal')
    parser.add_argument(
        '--parity',
        action='store_true',
        help='print the error of each of --paths (default: aten triton) against the '
        'literal form in fp64 instead of times')
    parser.add_argument(
        '--channels-last', action='store_true', help='--parity: channels_last inputs')
    parser.add_argument(
        '--profile',
        action='store_true',
        help='print the torch.profiler split of each of --paths (default: triton aten bn): '
        'step, host, Triton-kernel and other-kernel ms, launches')
    parser.add_argument('--out', help='also write the Markdown table here')
    return parser.parse_args(argv)


def _table(args: argparse.Namespace) -> str:
    dtype = DTYPES[args.dtype]
    errors = set()
    if args.profile:
        rows = []
        for variant, mode in args.configs:
            for shape in args.shapes:
                for path in args.paths or ['triton', 'aten', 'bn']:
                    try:
                        rows.append(
                            profile_split(variant, mode, shape, path, args.batch, dtype,
                                          args.device, args.reps or 5))
                    except Exception as e:  # noqa: BLE001  (the table notes it)
                        errors.add(f'- {path} n/a: {error_text(e)}')
                        continue
                    print(format_profile_table(rows[-1:]).splitlines()[2], flush=True)
        return '\n'.join([format_profile_table(rows)] + sorted(errors))
    if args.parity:
        paths = args.paths or ['aten', 'triton']
        tol = TOLERANCES.get(dtype)
        lines = [
            '| variant | mode | dtype | B x C @ H x W | ' + ' | '.join(paths) + ' | bitwise |',
            '|' + '---|' * 4 + '---:|' * len(paths) + '---|'
        ]
        for variant, mode in args.configs:
            for c, h, w in args.shapes:
                res = parity(
                    variant,
                    mode, (c, h, w),
                    paths,
                    args.batch,
                    dtype,
                    args.device,
                    channels_last=args.channels_last)
                cells = [
                    f'{r["error"]:.1e} {r["ran"]}' if isinstance(r, dict) else 'n/a'
                    for r in res.values()
                ]
                same = all(r['bitwise'] for r in res.values() if isinstance(r, dict))
                errors |= {f'- {p} n/a: {r}' for p, r in res.items() if isinstance(r, str)}
                lines.append(f'| {variant} | {mode} | {args.dtype} | {args.batch} x {c} @ {h} x '
                             f'{w} | ' + ' | '.join(cells) + f' | {"yes" if same else "no"} |')
                print(lines[-1], flush=True)
        lines += sorted(errors)
        if tol is not None:
            lines.append(f'- tolerance for {args.dtype}: {tol:.0e} (max|err| / max|ref|)')
        return '\n'.join(lines)
    if args.paths:
        results = []
        for variant, mode in args.configs:
            for shape in args.shapes:
                results.append(
                    bench_paths(variant, mode, shape, args.paths, args.batch, args.reps or 20,
                                dtype, args.device))
                print(format_paths_table(results[-1:]).splitlines()[2], flush=True)
        return format_paths_table(results)
    results = run_benchmark(
        args.configs,
        args.shapes,
        batch=args.batch,
        reps=args.reps,
        min_time=args.min_time,
        threads=args.threads or None,
        dtype=dtype,
        device=args.device)
    return format_table(results)


def main(argv: List[str] = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    table = _table(args)
    print()
    print(table)
    if args.out:
        with open(args.out, 'w') as f:
            f.write(table + '\n')


if __name__ == '__main__':
    main()
