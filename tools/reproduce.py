"""Reproduce a results table: train and test every row and its stock twin, gather, publish.

Examples::

    python tools/reproduce.py tiny                       # the demo: launch + gather, CPU
    python tools/reproduce.py cityscapes --launcher pytorch --gpus 4 --dry-run
    python tools/reproduce.py coco --launcher slurm --partition gpu --gpus 8
    python tools/reproduce.py coco gather                # the table of the finished runs
    python tools/reproduce.py coco publish --weights-url https://host/mmpsa

Tables are configs/tables/<name>.py. Re-running skips finished runs and resumes unfinished ones.
"""
import argparse
import warnings
from typing import List, Optional

# the stock libraries import pkg_resources again and again (mmengine's config imports); its
# deprecation note would repeat between the progress lines
warnings.filterwarnings('ignore', message='pkg_resources is deprecated')

from mmpsa.utils.reproduce import LAUNCHERS, LaunchOptions, reproduce  # noqa: E402


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('table', help='tiny, cityscapes, coco, or a table file')
    parser.add_argument(
        'steps', nargs='*', metavar='STEP', help='launch, gather, publish (default: launch gather)')
    parser.add_argument('--work-dir', default='work_dirs/reproduce', help='WORK_DIR')
    parser.add_argument('--launcher', choices=LAUNCHERS, default='local', help='how runs start')
    parser.add_argument('--gpus', type=int, default=1, help='GPUs per run (pytorch: per node)')
    parser.add_argument('--nnodes', type=int, default=1, help='pytorch: nodes (NNODES)')
    parser.add_argument('--partition', help='slurm (and mim on slurm): the partition')
    parser.add_argument('--gpus-per-node', type=int, help='slurm: GPUs per node')
    parser.add_argument('--data-root', help='data folder of every config (default: theirs)')
    parser.add_argument('--dry-run', action='store_true', help='print the launch commands')
    parser.add_argument('--weights-url', help='publish: URL prefix of the uploaded checkpoints')
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point."""
    args = parse_args(argv)
    opts = LaunchOptions(args.launcher, args.gpus, args.nnodes, args.partition, args.gpus_per_node,
                         args.data_root)
    reproduce(args.table, tuple(args.steps or ('launch', 'gather')), args.work_dir, opts,
              args.dry_run, args.weights_url)


if __name__ == '__main__':
    main()
