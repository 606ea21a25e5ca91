"""Write the tiny COCO-keypoints dataset (synthetic figures) in mmpose's CocoDataset layout.

Example::

    python tools/misc/make_tiny_coco.py data/tiny_coco
    python tools/train.py configs/mmpose/tiny/td-hm_psa-p-hrnet-tiny_1xb16-5e_tinycoco-96x64.py
"""
import argparse

from mmpsa.datasets.coco_tiny import make_tiny_coco


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        'out', nargs='?', default='data/tiny_coco', help='output folder (default: data/tiny_coco)')
    parser.add_argument('--num-train', type=int, default=96, help='training images')
    parser.add_argument('--num-val', type=int, default=24, help='validation images')
    parser.add_argument('--seed', type=int, default=0, help='dataset seed')
    parser.add_argument('--width', type=int, default=192, help='image width')
    parser.add_argument('--height', type=int, default=144, help='image height')
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    files = make_tiny_coco(
        args.out,
        num_train=args.num_train,
        num_val=args.num_val,
        seed=args.seed,
        width=args.width,
        height=args.height)
    for split, path in files.items():
        print(f'{split}: {path}')


if __name__ == '__main__':
    main()
