"""model-index.yml and the metafiles stay in sync with configs/ and with the models they
describe (parameters of every config, FLOPs of one pose and one seg config)."""
import copy
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest
import torch
import yaml
from mmengine.config import Config
from mmengine.registry import MODELS, DefaultScope

from mmpsa.analysis import model_index
from mmpsa.analysis.model_index import COLLECTIONS, paper_results, update_models
from mmpsa.apis.complexity import measure, strip_psa

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


def test_entries_have_measured_complexity_and_only_published_results():
    seen_paper, names = set(), set()
    for meta in _metafiles().values():
        collection = meta['Collections'][0]
        assert {'Paper', 'Code', 'Metadata'} <= set(collection), collection['Name']
        assert collection['Metadata']['Architecture'] and collection['Metadata']['Training Data']
        for model in meta['Models']:
            names.add(model['Name'])
            # Results and Weights come only from tools/reproduce.py publish (finished runs;
            # Weights only where they were uploaded)
            assert 'Results' in model or 'Weights' not in model, model['Name']
            for result in model.get('Results', []):
                assert 'Source' not in result and result['Metrics'], model['Name']
            md = model['Metadata']
            assert md['Parameters (M)'] >= md['Stock Parameters (M)'] > 0, model['Name']
            assert md['FLOPs (G)'] >= md['FLOPs fused (G)'] > 0, model['Name']
            for key in model_index.PAPER_KEYS:
                for result in model.get(key, []):
                    assert {'Split', 'Source', 'Metrics'} <= set(result), model['Name']
                    seen_paper.add(model['Name'])
    papers = paper_results()
    assert seen_paper == set(papers) <= names


def test_publish_writes_measured_entries_and_a_rebuild_keeps_them(tmp_path, monkeypatch):
    key = 'mmseg/psa_ocrnet'
    (tmp_path / key).mkdir(parents=True)
    (tmp_path / key / 'metafile.yml').write_text(
        (REPO / 'configs' / key / 'metafile.yml').read_text())
    monkeypatch.setattr(model_index, 'configs_root', lambda: tmp_path)
    name = 'psa-p_ocrnet_hr48_4xb2-80k_cityscapes-512x1024'
    entry = {
        'Results': [{
            'Task': 'Semantic Segmentation',
            'Dataset': 'Cityscapes',
            'Metrics': {
                'mIoU': 81.23
            }
        }],
        'Weights':
        'https://host/x.pth',
        'Training log':
        'https://host/x.log',
        'Metadata': {
            'Training Resources': '4x GPUs',
            'Memory (MB)': 9000
        }
    }
    assert update_models({name: entry, 'not-a-model': entry}) == [name]
    models = {
        m['Name']: m
        for m in yaml.safe_load((tmp_path / key / 'metafile.yml').read_text())['Models']
    }
    assert models[name]['Results'] == entry['Results']
    assert models[name]['Metadata']['Memory (MB)'] == 9000
    assert models[name]['Metadata']['Parameters (M)'] == 76.73  # the rest stays
    assert 'Results' not in models['psa-s_ocrnet_hr48_4xb2-80k_cityscapes-512x1024']
    kept = model_index._published(tmp_path / key / 'metafile.yml')
    assert kept[name] == {k: v for k, v in entry.items()}


def _entries() -> List[Tuple[str, Dict]]:
    """``(config path, Metadata)`` of every metafile entry."""
    return [(model['Config'], model['Metadata']) for meta in _metafiles().values()
            for model in meta['Models']]


@pytest.fixture(scope='module')
def one_thread() -> Iterator[None]:
    """One intra-op thread (faster on the shared 2-core machine), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _params(cfg: Config, model_cfg: dict) -> int:
    """Parameters of a config's model without its auxiliary head (training only; the
    metafiles count as mmseg's get_flops does), built on the meta device (no memory, no init)."""
    with DefaultScope.overwrite_default_scope(cfg.default_scope), torch.device('meta'):
        model = MODELS.build(copy.deepcopy(model_cfg))
    aux = getattr(model, 'auxiliary_head', None)
    return sum(p.numel() for p in model.parameters()) - (
        sum(p.numel() for p in aux.parameters()) if aux is not None else 0)


def _millions(n: int) -> float:
    return round(n / 1e6, 2)  # the metafiles' precision


def test_parameter_counts_are_the_models():
    stock_params: Dict[str, int] = {}
    for config, md in _entries():
        cfg = Config.fromfile(str(REPO / config))
        stock = strip_psa(cfg.model)
        key = repr(stock.to_dict() if hasattr(stock, 'to_dict') else stock)
        if key not in stock_params:
            stock_params[key] = _params(cfg, stock)
        assert (md['Parameters (M)'],
                md['Stock Parameters (M)']) == (_millions(_params(cfg, cfg.model)),
                                                _millions(stock_params[key])), config


@pytest.mark.parametrize('config, literal_too', [
    ('configs/mmpose/psa_resnet/td-hm_psa-p-res50_8xb64-210e_coco-256x192.py', True),
    ('configs/mmseg/psa_hrnet/psa-p_fcn_hr48_4xb2-80k_cityscapes-512x1024.py', False),
])
def test_flops_are_the_models(config, literal_too, one_thread):
    """The fused FLOPs (and for the cheap pose model the literal and stock ones too), measured
    again at the metafile's input size (full-size seg analyses take ~10 s each here)."""
    md = dict(_entries())[config]
    cfg = Config.fromfile(str(REPO / config))
    h, w = (int(side) for side in md['Input'].split('x'))
    giga = {'FLOPs fused (G)': measure(cfg, (h, w)).flops}
    if literal_too:
        giga['FLOPs (G)'] = measure(cfg, (h, w), literal=True).flops
        giga['Stock FLOPs (G)'] = measure(cfg, (h, w), strip_psa(cfg.model)).flops
    assert {k: md[k] for k in giga} == {k: round(v / 1e9, 2) for k, v in giga.items()}
