"""Check the dataset a config names, per file and annotation id, before training on it.

    python tools/misc/check_dataset.py CONFIG [--split train|val|test] [--quick]
                                         [--cfg-options KEY=VALUE ...]

Walks the split through mmseg's/mmpose's own dataset class and lists unreadable images,
label maps of the wrong size or with values outside the classes, empty splits, malformed or
out-of-image keypoints and bad visibility flags; a summary, and exit status 1 if anything is
wrong (2 for a config that cannot be loaded).
"""
import argparse
import sys
from typing import List, Optional

from mmengine.config import DictAction

from mmpsa.apis.runner import load_config
from mmpsa.datasets.check import SPLITS, check_dataset


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description='Check the dataset of a config')
    parser.add_argument('config', help='config file path')
    parser.add_argument('--split', choices=SPLITS, default='train', help='which dataloader')
    parser.add_argument(
        '--quick',
        action='store_true',
        help='only the listing, counts, annotation file and first sample (what '
        'tools/train.py checks before training)')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config settings, key=value pairs (lists as key="[a,b]")')
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; returns the exit status."""
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.cfg_options)
    except (OSError, ValueError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    report = check_dataset(cfg, args.split, full=not args.quick, progress=not args.quick)
    print(report.summary(limit=200))
    return 0 if report.ok else 1


if __name__ == '__main__':
    sys.exit(main())
