"""Benchmark the PolarizedSelfAttention block: fused vs literal, fwd+bwd.

Prints, per shape (batch 2 by default), the median fwd+bwd time of the fused and of
the literal form (timed interleaved, after warm-up), the speed-up, and the
activation memory each keeps for backward; then a Markdown table and the
geometric-mean speed-up over the HRNet-like shapes. This is a benchmark, not a
test: timings depend on the machine and its load.

Usage::

    python tools/benchmark_psa.py                       # all variants, 2 threads
    python tools/benchmark_psa.py --configs paper:parallel --shapes 64x32x24
    # each evaluation path (MMPSA_BACKEND) and BatchNorm2d, on a GPU in bf16
    python tools/benchmark_psa.py --device cuda --dtype bf16 --batch 32 \
        --paths literal aten triton bn
    python tools/benchmark_psa.py --parity --device cuda --dtype bf16  # errors vs fp64
    python tools/benchmark_psa.py --network --device cuda  # HRNet-W48 step (needs timm)
"""
import argparse
from typing import List, Tuple

import torch

from mmpsa.utils.benchmark import (CONFIGS, HRNET_SHAPES, PATHS, SEG_SHAPES, bench_paths,
                                   format_paths_table, format_table, hrnet_w48_step, parity,
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
        '--network',
        action='store_true',
        help='time a train step of timm\'s HRNet-W48 at 256x192, stock and with PSA, in '
        'bf16 autocast (needs timm; --batch, --reps, --device apply)')
    parser.add_argument('--out', help='also write the Markdown table here')
    return parser.parse_args(argv)


def _network(args: argparse.Namespace) -> str:
    rows = [
        hrnet_w48_step(psa, args.batch, reps=args.reps or 10, device=args.device)
        for psa in (False, True)
    ]
    stock, psa = rows
    lines = [
        '| HRNet-W48 256x192 | batch | step ms | params | PSA blocks | ran |',
        '|---|---:|---:|---:|---:|---|'
    ]
    for r in rows:
        lines.append(f'| {"PSA" if r["psa"] else "stock"} | {args.batch} | {r["ms"]:.2f} '
                     f'| {r["params"]:,} | {r["blocks"]} | {r["ran"]} |')
    lines.append(f'- PSA step over stock: {100 * (psa["ms"] / stock["ms"] - 1):+.1f} %, '
                 f'parameters +{psa["params"] - stock["params"]:,}')
    return '\n'.join(lines)


def _table(args: argparse.Namespace) -> str:
    dtype = DTYPES[args.dtype]
    if args.network:
        return _network(args)
    if args.parity:
        paths = args.paths or ['aten', 'triton']
        lines = [
            '| variant | mode | dtype | B x C @ H x W | ' + ' | '.join(paths) + ' |',
            '|' + '---|' * 4 + '---:|' * len(paths)
        ]
        for variant, mode in args.configs:
            for c, h, w in args.shapes:
                err = parity(variant, mode, (c, h, w), paths, args.batch, dtype, args.device)
                cells = [f'{e:.1e}' if isinstance(e, float) else 'n/a' for e in err.values()]
                lines.append(f'| {variant} | {mode} | {args.dtype} | {args.batch} x {c} @ {h} x '
                             f'{w} | ' + ' | '.join(cells) + ' |')
                print(lines[-1], flush=True)
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
