"""model-index.yml and the metafiles stay in sync with configs/."""
from pathlib import Path

import yaml

from mmpsa.apis.model_index import COLLECTIONS, PAPER_RESULTS

REPO = Path(__file__).resolve().parents[1]


def _metafiles():
    index = yaml.safe_load((REPO / 'model-index.yml').read_text())
    return {path: yaml.safe_load((REPO / path).read_text()) for path in index['Import']}


def test_index_imports_one_metafile_per_model_folder():
    expected = {f'configs/{key}/metafile.yml' for key in COLLECTIONS}
    assert set(_metafiles()) == expected


def test_every_config_listed_once_and_every_entry_exists():
    listed = []
    for path, meta in _metafiles().items():
        folder = (REPO / path).parent
        configs = {str(p.relative_to(REPO)) for p in folder.glob('*.py')}
        entries = [m['Config'] for m in meta['Models']]
        assert sorted(entries) == sorted(configs), path
        listed += entries
    assert len(listed) == len(set(listed))


def test_entries_have_measured_complexity_no_weights_and_marked_paper_results():
    seen_paper = set()
    for meta in _metafiles().values():
        for model in meta['Models']:
            assert 'Weights' not in model, model['Name']
            md = model['Metadata']
            assert md['Parameters (M)'] >= md['Stock Parameters (M)'] > 0, model['Name']
            assert md['FLOPs (G)'] >= md['FLOPs fused (G)'] > 0, model['Name']
            for result in model.get('Results', []):
                assert result['Source'].startswith('paper'), model['Name']
                seen_paper.add(model['Name'])
    assert seen_paper == set(PAPER_RESULTS)
