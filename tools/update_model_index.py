"""Regenerate model-index.yml and configs/*/*/metafile.yml from complexity records.

Results and Weights come from ``tools/reproduce.py TABLE publish`` and are kept.

Example::

    python tools/complexity.py configs/mmseg/psa_*/*.py configs/mmpose/psa_*/*.py --json fused.json
    python tools/complexity.py configs/mmseg/psa_*/*.py configs/mmpose/psa_*/*.py --literal \
        --json literal.json
    python tools/update_model_index.py fused.json literal.json
"""
import argparse
from typing import List, Optional

from mmpsa.utils.model_index import write_model_index


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('json_files', nargs='+', help='tools/complexity.py --json outputs')
    args = parser.parse_args(argv)
    for path in write_model_index(args.json_files):
        print(path)


if __name__ == '__main__':
    main()
