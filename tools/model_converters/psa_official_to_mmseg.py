"""Convert a released PSA Cityscapes checkpoint (DeLightCMU/PSA, HRNetV2-OCR + PSA_p or
PSA_s, hierarchical multi-scale) to an mmseg checkpoint for mmpsa's configs.

    python tools/model_converters/psa_official_to_mmseg.py SRC DST [--config CONFIG]

It finds the variant from the keys, maps every key, loads the result strictly into the model
of the variant's config (or ``--config``) and only then writes DST; on any problem it names
the keys and writes nothing. The logic is :mod:`mmpsa.seg.released`.
"""
import argparse
import os.path as osp
import sys
from typing import List, Optional

from mmpsa.checkpoint import CheckpointReadError
from mmpsa.seg.released import VARIANT_NAMES, ConversionError, convert_released_checkpoint


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description='Convert a released PSA Cityscapes checkpoint to mmseg')
    parser.add_argument('src', help='the released checkpoint (.pth)')
    parser.add_argument('dst', help='where the mmseg checkpoint goes')
    parser.add_argument(
        '--config',
        help='check against this mmseg config (default: the official config of the variant)')
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point."""
    args = parse_args(argv)
    try:
        info = convert_released_checkpoint(args.src, args.dst, config=args.config)
    except (ConversionError, CheckpointReadError) as err:
        sys.exit(f'error: {err}')
    print(f'found {VARIANT_NAMES[info["variant"]]} with scale_attn; {info["num_keys"]} keys '
          f'mapped, {", ".join(info["folded_biases"])} folded into their BNs; ignored: '
          f'{", ".join(info["ignored"]) or "nothing"}')
    config = osp.relpath(info['config'])
    config = info['config'] if config.startswith('..') else config
    print(f'wrote {info["dst"]} (loads strictly into {config})')
    print(f'test it with: python tools/test.py {config} {info["dst"]}')


if __name__ == '__main__':
    main()
