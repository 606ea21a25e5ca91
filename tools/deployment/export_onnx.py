"""Export an mmpsa (or stock mmseg/mmpose) model to ONNX and check it with onnxruntime.

Seg models export their logits (``mode='tensor'``), top-down pose models their heatmaps;
the input is the normalised image batch (the data preprocessor stays outside). Example::

    python tools/deployment/export_onnx.py CONFIG --checkpoint CKPT --out model.onnx \\
        --shape 512 1024 --dynamic
"""
import argparse
import sys
from typing import List, Optional

from mmengine.config import DictAction

from mmpsa.checkpoint import CheckpointReadError
from mmpsa.compat import UnsupportedVersionError
from mmpsa.deploy.onnx import DeployError, export_config


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config', help='an mmseg or mmpose config file')
    parser.add_argument('--checkpoint', help='weights (default: the init of the model)')
    parser.add_argument('--out', required=True, help='the .onnx file to write')
    parser.add_argument(
        '--shape', type=int, nargs=2, required=True, metavar=('H', 'W'), help='input size')
    parser.add_argument(
        '--dynamic',
        action='store_true',
        help='symbolic H and W; checked at a second size, refused if not exact there')
    parser.add_argument(
        '--second-shape',
        type=int,
        nargs=2,
        metavar=('H', 'W'),
        help='the second size --dynamic checks (default: H+D W+D, D the size divisor)')
    parser.add_argument(
        '--size-divisor',
        type=int,
        help='checked sides are multiples of it (default: what the model needs, 32 for '
        "mmseg's/mmpose's HRNet and ResNet models)")
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config settings, key=value pairs (lists as key="[a,b]")')
    parser.add_argument(
        '--allow-missing-psa',
        action='store_true',
        help='export a checkpoint without PSA weights (e.g. stock) with a PSA config on '
        'purpose: the PSA blocks keep their initialisation')
    parser.add_argument('--opset', type=int, help="ONNX opset (default: torch's)")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        report = export_config(
            args.config,
            args.out,
            args.shape,
            checkpoint=args.checkpoint,
            dynamic=args.dynamic,
            opset=args.opset,
            second_shape=args.second_shape,
            size_divisor=args.size_divisor,
            cfg_options=args.cfg_options,
            allow_missing_psa=args.allow_missing_psa)
    except (DeployError, ValueError, CheckpointReadError, UnsupportedVersionError) as e:
        print(f'export_onnx: {e}', file=sys.stderr)
        return 1
    worst = max(c.max_rel for c in report.checks)
    print(f'OK {report.path}: onnxruntime equals eager within {worst:.1e} relative at ' +
          ', '.join(f'{h}x{w}' for h, w in (c.shape for c in report.checks)))
    for note in report.notes:
        print(f'   {note}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
