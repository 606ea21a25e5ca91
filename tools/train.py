"""Train an mmpsa (or any mmseg/mmpose) config: the runner follows the config's default_scope.

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CHECKPOINT]] [--amp]
                                 [--cfg-options KEY=VALUE ...] [--launcher LAUNCHER]
                                 [--no-data-check]

Before training, the train split gets the cheap part of tools/misc/check_dataset.py (listing,
counts, annotation file, first sample): bad data stops it with a message naming the file.

Multi-GPU / multi-node: tools/dist_train.sh; slurm: tools/slurm_train.sh.
"""
import argparse
import os
import sys
from typing import List, Optional

from mmengine.config import DictAction

from mmpsa.apis.runner import LAUNCHERS, LaunchError, train
from mmpsa.checkpoint import CheckpointReadError
from mmpsa.datasets.check import DatasetCheckError


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse the command line (the options of mmpose's tools/train.py that apply here)."""
    parser = argparse.ArgumentParser(description='Train a segmentor or pose model')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--resume',
        nargs='?',
        type=str,
        const='auto',
        help='resume from this checkpoint; with no value, from the latest checkpoint in '
        'the work dir')
    parser.add_argument(
        '--amp', action='store_true', help='automatic mixed precision training (GPU only)')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config settings, key=value pairs (lists as key="[a,b]")')
    parser.add_argument('--launcher', choices=LAUNCHERS, default='none', help='job launcher')
    parser.add_argument(
        '--no-data-check', action='store_true', help='skip the quick dataset check before training')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point."""
    args = parse_args(argv)
    try:
        train(
            args.config,
            work_dir=args.work_dir,
            resume=args.resume,
            amp=args.amp,
            cfg_options=args.cfg_options,
            launcher=args.launcher,
            check_data=not args.no_data_check)
    except (LaunchError, CheckpointReadError, DatasetCheckError) as err:
        sys.exit(f'error: {err}')


if __name__ == '__main__':
    main()
