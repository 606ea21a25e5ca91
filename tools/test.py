"""Test a checkpoint of an mmpsa (or any mmseg/mmpose) config.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out PATH]
                                           [--cfg-options KEY=VALUE ...] [--launcher LAUNCHER]
                                           [--allow-missing-psa]

``--out`` means what it means in the stock tool of the config's scope: for mmseg, a folder
for the predicted label maps; for mmpose, a file for the metric results.

A checkpoint of another model than the config's (other PSA settings, or no PSA weights for a
PSA config) is refused with an error naming both; ``--allow-missing-psa`` tests a stock
checkpoint with a PSA config on purpose (the PSA blocks at their initialisation).
"""
import argparse
import os
import sys
from typing import List, Optional

from mmengine.config import DictAction

from mmpsa.apis.runner import LAUNCHERS, LaunchError, test
from mmpsa.checkpoint import CheckpointReadError


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse the command line (the options of mmseg's/mmpose's tools/test.py that apply)."""
    parser = argparse.ArgumentParser(description='Test (and evaluate) a checkpoint')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='the dir to save logs and metrics')
    parser.add_argument(
        '--out',
        help='mmseg: folder for the predicted label maps; mmpose: file for the metric '
        'results (.json, .yaml or .pkl)')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config settings, key=value pairs (lists as key="[a,b]")')
    parser.add_argument('--launcher', choices=LAUNCHERS, default='none', help='job launcher')
    parser.add_argument(
        '--allow-missing-psa',
        action='store_true',
        help='test a checkpoint without PSA weights (e.g. stock) with a PSA config on '
        'purpose: the PSA blocks keep their initialisation')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point."""
    args = parse_args(argv)
    try:
        test(
            args.config,
            args.checkpoint,
            work_dir=args.work_dir,
            out=args.out,
            cfg_options=args.cfg_options,
            launcher=args.launcher,
            allow_missing_psa=args.allow_missing_psa)
    except (LaunchError, CheckpointReadError) as err:
        sys.exit(f'error: {err}')


if __name__ == '__main__':
    main()
