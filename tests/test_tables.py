"""The reproduction tables say where each paper number comes from, and the README's tables are
the tool's output from the committed results JSONs."""
import json
from pathlib import Path

import pytest
import yaml

from mmpsa.analysis.model_index import paper_results
from mmpsa.analysis.reproduce import (RELEASED, TRAINED, compare_results, load_table, paper_cell,
                                      readme_block, readme_results, results_file)

REPO = Path(__file__).resolve().parents[1]
NOT_STATED = 'split not stated by the source'
# The facts, from DeLightCMU/PSA's README (read with the `fetch` tool): Cityscapes val mIoU of
# the two released HRNetV2-OCR (hierarchical multi-scale) checkpoints, and UDP-HRNet-W48 COCO AP
# without a split. config stem -> (metafile key, metric, value, split, reference label)
PAPER = {
    'psa-p_mscale-ocrnet_hr48_official_cityscapes-1024x2048':
    ('Paper Results', 'mIoU', 86.95, 'val', None),
    'psa-s_mscale-ocrnet_hr48_official_cityscapes-1024x2048':
    ('Paper Results', 'mIoU', 86.72, 'val', None),
    'psa-p_mscale-ocrnet_hr48_4xb2-80k_cityscapes-512x1024':
    ('Paper Reference', 'mIoU', 86.95, 'val', 'released recipe'),
    'psa-s_mscale-ocrnet_hr48_4xb2-80k_cityscapes-512x1024':
    ('Paper Reference', 'mIoU', 86.72, 'val', 'released recipe'),
    'td-hm_psa-p-hrnet-w48_udp-8xb32-210e_coco-256x192': ('Paper Results', 'AP', 78.9, NOT_STATED,
                                                          None),
    'td-hm_psa-p-hrnet-w48_udp-8xb32-210e_coco-384x288': ('Paper Results', 'AP', 79.5, NOT_STATED,
                                                          None),
    'td-hm_psa-s-hrnet-w48_udp-8xb32-210e_coco-384x288': ('Paper Results', 'AP', 79.4, NOT_STATED,
                                                          None),
}


def _metafile_models():
    index = yaml.safe_load((REPO / 'model-index.yml').read_text())
    for path in index['Import']:
        yield from yaml.safe_load((REPO / path).read_text())['Models']


def test_metafiles_carry_each_paper_value_on_its_row_with_split_and_label():
    found = {}
    for model in _metafile_models():
        for key in ('Paper Results', 'Paper Reference'):
            for entry in model.get(key, []):
                assert model['Name'] not in found, model['Name']
                (metric, value), = entry['Metrics'].items()
                found[model['Name']] = (key, metric, value, entry['Split'], entry.get('Label'))
                assert entry['Source'].startswith('https://github.com/DeLightCMU/PSA')
                if key == 'Paper Reference':  # names the config whose own result it is
                    assert PAPER[entry['Of']][0] == 'Paper Results'
                    assert PAPER[entry['Of']][2] == value
    assert found == PAPER


def test_tables_show_each_paper_value_on_its_row_labelled():
    shown = {}
    for name in ('cityscapes', 'coco'):
        table = load_table(name)
        for row in table.rows:
            record = {
                'paper': (row.paper or {}).get('value'),
                'paper_split': (row.paper or {}).get('split'),
                'paper_reference': (row.paper or {}).get('reference')
            }
            stem = Path(row.psa).stem
            if row.paper:
                shown[stem] = paper_cell(record)
            else:
                assert paper_cell(record) == 'n/a'
            # the released numbers sit on the rows of the released weights, nothing trained
            assert row.kind == (RELEASED if 'official' in stem else TRAINED)
    assert shown == {
        stem: (f'ref. {value} ({split}; {label})' if label else f'{value} ({split})')
        for stem, (_, _, value, split, label) in PAPER.items()
    }
    assert set(paper_results()) == set(PAPER)


@pytest.mark.parametrize('name', ['tiny', 'cityscapes', 'coco'])
def test_readme_block_is_the_tool_output_from_the_committed_json(name):
    table = load_table(name)
    results = json.loads(results_file(table).read_text())
    assert [r['config'] for r in results['rows']] == [Path(r.psa).stem for r in table.rows]
    assert readme_results(table, str(REPO / 'README.md')) == readme_block(table, results)


def test_compare_says_same_or_names_the_rows_that_differ(tmp_path):
    table = load_table('tiny')
    committed = json.loads(results_file(table).read_text())
    rows = committed['rows']
    same, lines = compare_results(table, rows, str(tmp_path))
    assert same and lines[0].startswith('same as the README'), lines
    changed = [dict(r) for r in rows]
    changed[2]['psa'] = round(changed[2]['psa'] + 1.5, 2)
    same, lines = compare_results(table, changed, str(tmp_path))
    assert not same
    configs = tuple(f'  {r["config"]} ' for r in rows)
    differ = [line for line in lines if line.startswith(configs)]
    assert len(differ) == 1 and rows[2]['config'] in differ[0] and '(+1.50)' in differ[0], lines
