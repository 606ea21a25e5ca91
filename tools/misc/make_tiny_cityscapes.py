"""Write the tiny Cityscapes-format data set (synthetic street scenes) for the seg configs.

Example::

    python tools/misc/make_tiny_cityscapes.py data/tiny_cityscapes
    mim train mmseg configs/mmseg/tiny/psa-p_fcn_hr-tiny_1xb4-100iter_tiny-cityscapes-64x128.py \
        --gpus 0 --work-dir work_dirs/tiny
"""
import argparse

from mmpsa.datasets.cityscapes_tiny import make_tiny_cityscapes


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        'out',
        nargs='?',
        default='data/tiny_cityscapes',
        help='data root to write (default: data/tiny_cityscapes)')
    parser.add_argument('--num-train', type=int, default=12, help='training frames')
    parser.add_argument('--num-val', type=int, default=4, help='validation frames')
    parser.add_argument('--height', type=int, default=128, help='frame height')
    parser.add_argument('--width', type=int, default=256, help='frame width')
    parser.add_argument('--seed', type=int, default=0, help='layout seed')
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    written = make_tiny_cityscapes(
        args.out,
        num_train=args.num_train,
        num_val=args.num_val,
        size=(args.height, args.width),
        seed=args.seed)
    for split, paths in written.items():
        print(f'{split}: {len(paths)} frames under {args.out}/leftImg8bit/{split}')


if __name__ == '__main__':
    main()
