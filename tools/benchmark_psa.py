"""Benchmark the PolarizedSelfAttention block: fused vs literal, fwd+bwd.

Prints, per shape (batch 2 by default), the median fwd+bwd time of the fused and of
the literal form (timed interleaved, after warm-up), the speed-up, and the
activation memory each keeps for backward; then a Markdown table and the
geometric-mean speed-up over the HRNet-like shapes. This is a benchmark, not a
test: timings depend on the machine and its load.

Usage::

    python tools/benchmark_psa.py                       # all variants, 2 threads
    python tools/benchmark_psa.py --configs paper:parallel --shapes 64x32x24
"""
import argparse
from typing import List, Tuple

from mmpsa.utils.benchmark import CONFIGS, HRNET_SHAPES, SEG_SHAPES, format_table, run_benchmark


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
    parser.add_argument('--threads', type=int, default=2, help='torch.set_num_threads (default: 2)')
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
    parser.add_argument('--out', help='also write the Markdown table here')
    return parser.parse_args(argv)


def main(argv: List[str] = None) -> None:
    args = parse_args(argv)
    results = run_benchmark(
        args.configs,
        args.shapes,
        batch=args.batch,
        reps=args.reps,
        min_time=args.min_time,
        threads=args.threads)
    table = format_table(results)
    print()
    print(table)
    if args.out:
        with open(args.out, 'w') as f:
            f.write(table + '\n')


if __name__ == '__main__':
    main()
