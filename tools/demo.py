"""The main job: stock vs PSA_p vs PSA_s, seg and pose, on the built-in tiny data (CPU).

Example::

    python tools/demo.py                      # everything, into outputs/demo
    python tools/demo.py --only seg/stock seg/psa-p
"""
import argparse
from typing import List, Optional

from mmpsa.utils.demo import RUNS, run_demo


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out-dir', default='outputs/demo', help='output folder')
    parser.add_argument('--only', nargs='+', choices=list(RUNS), help='a subset of runs')
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    run_demo(args.out_dir, args.only)


if __name__ == '__main__':
    main()
