"""Train a tiny mmpsa config eager and under torch.compile and compare the losses.

The CI test uses ``--backend aot_eager`` (seconds); the default inductor backend compiles
C++ kernels (minutes on a CPU). Example::

    python tools/deployment/check_compile.py --backend inductor --iters 3
"""
import argparse
import sys
import tempfile
from typing import List, Optional

import numpy as np

from mmpsa.datasets.tiny import TINY_SEG, make_tiny_data
from mmpsa.deploy.compile import compile_parity


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument(
        '--config', default=str(TINY_SEG), help='a tiny seg config (default: PSA-HRNet FCN)')
    parser.add_argument('--data-root', default='data/tiny_cityscapes', help='tiny data')
    parser.add_argument('--backend', default='inductor', help='torch.compile backend')
    parser.add_argument('--iters', type=int, default=3, help='training iterations')
    parser.add_argument('--rtol', type=float, default=1e-4, help='loss tolerance')
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    data_root = make_tiny_data(args.data_root, 'mmseg')
    with tempfile.TemporaryDirectory() as work_dir:
        print(f'training {args.iters} iterations eager, then with torch.compile '
              f'(backend={args.backend}; the first compile is the slow part) ...')
        eager, compiled = compile_parity(args.config, data_root, work_dir, args.iters, args.backend)
    rel = np.abs(np.subtract(compiled, eager)) / np.abs(eager)
    print('eager   ', ' '.join(f'{v:.6f}' for v in eager))
    print('compiled', ' '.join(f'{v:.6f}' for v in compiled))
    print(f'max relative loss difference {rel.max():.2e} (tolerance {args.rtol:g})')
    return 0 if rel.max() <= args.rtol else 1


if __name__ == '__main__':
    sys.exit(main())
