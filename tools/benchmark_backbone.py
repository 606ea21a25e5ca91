"""Network-level PSA cost: one train step of PSA-HRNet-W48 / PSA-ResNet-50-D8 vs stock.

Example::

    python tools/benchmark_backbone.py --threads 1 --reps 5 --block fused literal

Prints a Markdown table (params, step time, overhead vs stock); progress goes to stderr.
"""
import argparse

from mmpsa.utils.benchmark_backbone import BLOCKS, NETWORKS, run


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        '--networks',
        nargs='+',
        choices=sorted(NETWORKS),
        default=list(NETWORKS),
        help='networks to time (default: all)')
    parser.add_argument(
        '--block',
        nargs='+',
        choices=BLOCKS,
        default=['fused'],
        help='PSA block form(s): fused (default) and/or literal')
    parser.add_argument('--batch', type=int, default=2, help='batch size (default 2)')
    parser.add_argument('--reps', type=int, default=5, help='timed steps per model')
    parser.add_argument('--warmup', type=int, default=1, help='untimed steps per model')
    parser.add_argument(
        '--threads', type=int, default=None, help='torch threads (default: torch decides)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--quiet', action='store_true', help='no progress on stderr')
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    print(
        run(args.networks,
            args.block,
            batch=args.batch,
            reps=args.reps,
            warmup=args.warmup,
            threads=args.threads,
            seed=args.seed,
            quiet=args.quiet))


if __name__ == '__main__':
    main()
