"""Reproduce a results table: train and test every row and its stock twin, gather, publish.

Examples::

    python tools/reproduce.py tiny                       # the demo: launch + gather, CPU
    python tools/reproduce.py cityscapes --launcher pytorch --gpus 4 --dry-run
    python tools/reproduce.py coco --launcher slurm --partition gpu --gpus 8
    python tools/reproduce.py cityscapes --released psa_p=P.pth --released psa_s=S.pth ...
    python tools/reproduce.py coco gather                # the table of the finished runs
    python tools/reproduce.py tiny gather --into README.md   # + configs/tables/results/tiny.json
    python tools/reproduce.py tiny --check               # the demo: compare with the README's
    python tools/reproduce.py coco publish --weights-url https://host/mmpsa

Tables are configs/tables/<name>.py. Re-running skips finished runs and resumes unfinished ones.
"""
import argparse
import sys
import warnings
from typing import List, Optional

# the stock libraries import pkg_resources again and again (mmengine's config imports); its
# deprecation note would repeat between the progress lines
warnings.filterwarnings('ignore', message='pkg_resources is deprecated')

from mmpsa.analysis import reproduce as lib  # noqa: E402


def _released(text: str) -> tuple:
    variant, sep, path = text.partition('=')
    if not sep or variant not in ('psa_p', 'psa_s') or not path:
        raise argparse.ArgumentTypeError(f'expected psa_p=FILE or psa_s=FILE, got {text!r}')
    return variant, path


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('table', help='tiny, cityscapes, coco, or a table file')
    parser.add_argument(
        'steps', nargs='*', metavar='STEP', help='launch, gather, publish (default: launch gather)')
    parser.add_argument('--work-dir', default='work_dirs/reproduce', help='WORK_DIR')
    parser.add_argument('--launcher', choices=lib.LAUNCHERS, default='local', help='how runs start')
    parser.add_argument('--gpus', type=int, default=1, help='GPUs per run (pytorch: per node)')
    parser.add_argument('--nnodes', type=int, default=1, help='pytorch: nodes (NNODES)')
    parser.add_argument('--partition', help='slurm (and mim on slurm): the partition')
    parser.add_argument('--gpus-per-node', type=int, help='slurm: GPUs per node')
    parser.add_argument('--data-root', help='data folder of every config (default: theirs)')
    parser.add_argument('--dry-run', action='store_true', help='print the launch commands')
    parser.add_argument(
        '--released',
        type=_released,
        action='append',
        default=[],
        metavar='psa_p=FILE',
        help='a released checkpoint, for the released-weights rows (repeat for psa_s)')
    parser.add_argument(
        '--weights-url',
        help='publish: URL prefix of the uploaded checkpoints and logs (none without it)')
    parser.add_argument(
        '--into',
        metavar='README',
        help='gather: write the table between its marker comments in this file, and the '
        'results JSON it is made from to configs/tables/results/TABLE.json')
    parser.add_argument(
        '--check',
        action='store_true',
        help='gather: compare the metrics with configs/tables/results/TABLE.json (the '
        "README's); exit status 1 where they differ beyond the measured spread")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point."""
    args = parse_args(argv)
    opts = lib.LaunchOptions(args.launcher, args.gpus, args.nnodes, args.partition,
                             args.gpus_per_node, args.data_root, dict(args.released))
    records = lib.reproduce(
        args.table,
        tuple(args.steps or ('launch', 'gather')),
        args.work_dir,
        opts,
        args.dry_run,
        args.weights_url,
        into=args.into)
    if args.check and records is not None:
        same, lines = lib.compare_results(lib.load_table(args.table), records, args.work_dir)
        print('\n'.join(lines))
        sys.exit(0 if same else 1)


if __name__ == '__main__':
    main()
