"""Regenerate model-index.yml and configs/*/*/metafile.yml from complexity records.

Results and Weights come from ``tools/reproduce.py TABLE publish`` and are kept; the paper's
numbers come from the reproduction tables (``configs/tables/``). ``--paper-only`` rewrites just
those in the existing metafiles (no complexity records needed).

Example::

    python tools/analysis_tools/complexity.py configs/mmseg/psa_*/*.py \
         configs/mmpose/psa_*/*.py --json fused.json
    python tools/analysis_tools/complexity.py configs/mmseg/psa_*/*.py \
         configs/mmpose/psa_*/*.py --literal \
        --json literal.json
    python tools/dev/update_model_index.py fused.json literal.json
    python tools/dev/update_model_index.py --paper-only
"""
import argparse
from typing import List, Optional

from mmpsa.analysis.model_index import refresh_paper_results, write_model_index


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument(
        'json_files', nargs='*', help='tools/analysis_tools/complexity.py --json outputs')
    parser.add_argument(
        '--paper-only', action='store_true', help="rewrite only the paper's numbers")
    args = parser.parse_args(argv)
    if args.paper_only:
        written = refresh_paper_results()
    elif args.json_files:
        written = write_model_index(args.json_files)
    else:
        parser.error('give the complexity JSON files, or --paper-only')
    for path in written:
        print(path)


if __name__ == '__main__':
    main()
