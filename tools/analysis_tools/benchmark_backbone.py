"""Network-level PSA cost: one train step of PSA-HRNet-W48 (timm) / PSA-ResNet-50-D8 vs stock.

Examples::

    python tools/analysis_tools/benchmark_backbone.py --threads 1 --reps 5 --block fused literal
    # the GPU check's network row: timm's HRNet-W48, batch 32, bf16 autocast
    python tools/analysis_tools/benchmark_backbone.py --networks hrnet-w48 --device cuda \
        --amp bf16 --batch 32 --reps 10 --warmup 3

``hrnet-w48`` needs timm (``pip install timm``), ``r50-d8`` mmseg. Prints a Markdown table
(params, step time, overhead vs stock, the path the PSA blocks ran); progress goes to stderr.
"""
import argparse

from mmpsa.analysis.benchmark_backbone import AMP_DTYPES, BLOCKS, NETWORKS, run


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        '--networks',
        nargs='+',
        choices=sorted(NETWORKS),
        default=['hrnet-w48', 'r50-d8'],
        help='networks to time (default: hrnet-w48 r50-d8; tiny is the test network)')
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
    parser.add_argument('--device', default='cpu', help='cpu or cuda (default: cpu)')
    parser.add_argument(
        '--amp',
        choices=sorted(AMP_DTYPES),
        default='none',
        help='autocast dtype of the forward (default: none, fp32)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--quiet', action='store_true', help='no progress on stderr')
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    print(
        run(args.networks,
            args.block,
            batch=args.batch,
            reps=args.reps,
            warmup=args.warmup,
            threads=args.threads,
            seed=args.seed,
            quiet=args.quiet,
            device=args.device,
            amp=args.amp))


if __name__ == '__main__':
    main()
