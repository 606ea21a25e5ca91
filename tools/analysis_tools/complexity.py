"""Params and FLOPs of PSA configs beside their stock counterparts (mmengine's analysis).

Works for seg and pose configs (the registry scope is each config's ``default_scope``); the
input size is each config's own (``crop_size`` / ``codec.input_size``) unless ``--shape``.

Example::

    python tools/analysis_tools/complexity.py configs/mmseg/psa_ocrnet/*.py --json complexity.json
    python tools/analysis_tools/complexity.py CONFIG --literal --shape 512 1024 \
        --stock mmseg::ocrnet/ocrnet_hr48_4xb2-80k_cityscapes-512x1024.py
"""
import argparse
import json
import sys

from mmengine.config import DictAction

from mmpsa.apis.complexity import as_records, compare_many, format_table


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('configs', nargs='+', help='config files')
    parser.add_argument(
        '--shape',
        type=int,
        nargs=2,
        metavar=('H', 'W'),
        help='input height and width (default: each config\'s own)')
    parser.add_argument(
        '--stock',
        help='explicit stock config to compare with (default: '
        'the config with its PSA parts stripped); scope::path allowed')
    parser.add_argument(
        '--literal',
        action='store_true',
        help='count the literal form of each PSA block (the paper\'s and the '
        'released code\'s) instead of the fused evaluation that runs here')
    parser.add_argument('--json', help='also write the records to this JSON file')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='overrides merged into every config, key=value')
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    rows = []
    for i, row in enumerate(
            compare_many(
                args.configs,
                stock=args.stock,
                input_hw=args.shape,
                cfg_options=args.cfg_options,
                literal=args.literal), 1):
        print(
            f'[{i}/{len(args.configs)}] {row.config}: {row.psa.params / 1e6:.2f} M params, '
            f'{row.psa.flops / 1e9:.2f} GFLOPs ({row.extra_params / 1e6:+.2f} M, '
            f'{row.extra_flops / 1e9:+.2f} G vs stock)',
            file=sys.stderr,
            flush=True)
        rows.append(row)
    print(format_table(rows))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(as_records(rows), f, indent=2)


if __name__ == '__main__':
    main()
