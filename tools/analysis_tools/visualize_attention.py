"""Draw the PSA attention maps of a seg or pose model on images.

Example::

    python tools/analysis_tools/visualize_attention.py CONFIG CHECKPOINT demo.png \
        --out-dir outputs/attn
"""
import argparse
import sys
from typing import List, Optional

from mmpsa.apis.attention import visualize_attention
from mmpsa.checkpoint import CheckpointReadError


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config', help='an mmpsa (mmseg or mmpose) config file')
    parser.add_argument('checkpoint', help="weights, or 'none' for the model's init")
    parser.add_argument('images', nargs='+', help='image files')
    parser.add_argument('--out-dir', default='outputs/attention', help='where PNGs go')
    parser.add_argument('--blocks', help='regex selecting PSA blocks by module name')
    parser.add_argument(
        '--num-blocks',
        type=int,
        default=4,
        help='without --blocks, how many blocks (spread) to draw')
    parser.add_argument('--device', default='cpu')
    parser.add_argument(
        '--allow-missing-psa',
        action='store_true',
        help='draw a checkpoint without PSA weights (e.g. stock) with a PSA config on purpose: '
        'the blocks keep their initialisation')
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    checkpoint = None if args.checkpoint.lower() == 'none' else args.checkpoint
    try:
        written = visualize_attention(
            args.config,
            checkpoint,
            args.images,
            args.out_dir,
            args.blocks,
            args.num_blocks,
            args.device,
            allow_missing_psa=args.allow_missing_psa)
    except CheckpointReadError as err:
        sys.exit(f'error: {err}')
    for path in written:
        print(path)


if __name__ == '__main__':
    main()
