"""Write ``model-index.yml`` and per-folder ``metafile.yml`` (OpenMMLab format).

Each metafile has a ``Collections`` entry per family (``Paper``, ``Code``: where in mmpsa,
``Metadata``: architecture, training data, resources) and per model ``Config`` and ``Metadata``
(params and FLOPs from :mod:`mmpsa.apis.complexity` records,
``tools/analysis_tools/complexity.py --json``,
input, training data). ``Results``, ``Weights``, ``Training log`` and the measured ``Metadata``
(``Training Resources``, ``Memory (MB)``) are written only by ``tools/reproduce.py TABLE
publish`` (:func:`update_models`) from finished runs, and kept when the metafiles are rebuilt;
the paper's numbers are kept apart, from ``configs/tables/`` only: ``Paper Results`` on the
config of the network that made the number (with its split and source), ``Paper Reference``
(labelled, e.g. ``released recipe``) on a config that trains that network another way. The
configs of the released PSA Cityscapes weights carry ``Converted From`` (the released download
page, and what mmpsa verified). The config folders are found by
:func:`~mmpsa.utils.paths.configs_root`; ``model-index.yml`` goes beside that folder, its
paths relative to there (the repository root in a checkout).
"""
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import yaml

from ..utils.paths import configs_root

PAPER = dict(
    URL='https://arxiv.org/abs/2107.00782',
    Title='Polarized Self-Attention: Towards High-quality Pixel-wise Regression')

# The configs of the released weights (mmpsa.seg.released converts them) say what was checked.
RELEASED_CODE = 'https://github.com/DeLightCMU/PSA'
RELEASED_VERIFIED = ("outputs equal the released network's (per scale and joined, 1e-4 relative; "
                     'tests/test_seg/test_released_weights.py); mIoU not measured (no Cityscapes)')

#: Metadata keys that only publish writes (measured), kept when the metafiles are rebuilt.
PUBLISHED = ('Results', 'Weights', 'Training log')
PUBLISHED_METADATA = ('Training Resources', 'Training Software', 'Test Resources', 'Test Software',
                      'Memory (MB)')
#: The keys of the paper's numbers (from the reproduction tables).
PAPER_KEYS = ('Paper Results', 'Paper Reference')
# The collection's architecture, per family folder.
ARCHITECTURES = {
    'mmseg/psa_deeplabv3plus': ['ResNet', 'PSA', 'DeepLabV3+'],
    'mmseg/psa_hrnet': ['HRNetV2', 'PSA', 'FCN'],
    'mmseg/psa_ocrnet': ['HRNetV2', 'PSA', 'OCR'],
    'mmseg/psa_mscale_ocrnet': ['HRNetV2', 'PSA', 'OCR', 'Hierarchical multi-scale attention'],
    'mmpose/psa_hrnet': ['HRNet', 'PSA', 'Top-down heatmap'],
    'mmpose/psa_resnet': ['ResNet', 'PSA', 'SimpleBaseline', 'Top-down heatmap'],
    'mmpose/psa_head_neck': ['HRNet', 'ResNet', 'PSA', 'Top-down heatmap'],
}

COLLECTIONS = {
    'mmseg/psa_deeplabv3plus': ('PSA-DeepLabV3+', 'Cityscapes', 'Semantic Segmentation'),
    'mmseg/psa_hrnet': ('PSA-FCN-HRNetV2', 'Cityscapes', 'Semantic Segmentation'),
    'mmseg/psa_ocrnet': ('PSA-OCRNet-HRNetV2', 'Cityscapes', 'Semantic Segmentation'),
    'mmseg/psa_mscale_ocrnet': ('PSA-OCRNet-HRNetV2-Mscale', 'Cityscapes', 'Semantic Segmentation'),
    'mmpose/psa_hrnet': ('PSA-TopDown-HRNet', 'COCO', 'Body 2D Keypoint'),
    'mmpose/psa_resnet': ('PSA-SimpleBaseline', 'COCO', 'Body 2D Keypoint'),
    'mmpose/psa_head_neck': ('PSA-Heads-Necks-Pose', 'COCO', 'Body 2D Keypoint'),
}


def _records(json_files: Iterable[str]) -> Dict[str, Dict[str, dict]]:
    """config stem -> {'fused'|'literal': record} from complexity JSON files."""
    out: Dict[str, Dict[str, dict]] = defaultdict(dict)
    for path in json_files:
        for rec in json.loads(Path(path).read_text()):
            out[Path(rec['config']).stem][rec.get('psa_form', 'fused')] = rec
    return out


def paper_results() -> Dict[str, Dict[str, List[dict]]]:
    """Config stem -> ``{'Paper Results': [...]}`` or ``{'Paper Reference': [...]}``: the
    reproduction tables' paper values on the rows that carry them.

    An entry has ``Task``, ``Dataset``, ``Split`` (``val``, or ``split not stated by the
    source``), ``Metrics`` and ``Source``; a reference also ``Label`` (the table's, e.g.
    ``released recipe``) and ``Of``: the config of the table whose own result it is.
    """
    from .tables import config_name, load_table, tables_root
    out: Dict[str, Dict[str, List[dict]]] = {}
    for path in sorted(tables_root().glob('*.py')):
        table = load_table(str(path))
        own = {
            (row.paper['value'], row.paper['source']): config_name(row.psa)
            for row in table.rows if row.paper and not row.paper.get('reference')
        }
        for row in table.rows:
            if not row.paper:
                continue
            entry = {
                'Task': table.task,
                'Dataset': table.dataset,
                'Split': row.paper['split'],
                'Metrics': {
                    row.label: row.paper['value']
                },
                'Source': row.paper['source'],
            }
            key = 'Paper Results'
            if row.paper.get('reference'):
                key = 'Paper Reference'
                entry['Label'] = row.paper['reference']
                entry['Of'] = own.get((row.paper['value'], row.paper['source']))
            out.setdefault(config_name(row.psa), {}).setdefault(key, []).append(entry)
    return out


def _with_papers(model: dict, papers: Dict[str, List[dict]]) -> dict:
    """A metafile model entry with its paper keys replaced (before ``Converted From``)."""
    model = {k: v for k, v in model.items() if k not in PAPER_KEYS}
    converted = model.pop('Converted From', None)
    model.update(papers)
    if converted is not None:
        model['Converted From'] = converted
    return model


def refresh_paper_results(root: Optional[Path] = None) -> List[Path]:
    """Rewrite the paper keys of every existing metafile from the tables (nothing else
    changes; no complexity records needed). Returns the metafiles written."""
    root = root or configs_root()
    papers = paper_results()
    written = []
    for key in COLLECTIONS:
        path = root / key / 'metafile.yml'
        if not path.is_file():
            continue
        content = yaml.safe_load(path.read_text())
        models = [_with_papers(m, papers.get(m['Name'], {})) for m in content.get('Models', [])]
        if models != content.get('Models', []):
            content['Models'] = models
            path.write_text(yaml.safe_dump(content, sort_keys=False, width=100))
            written.append(path)
    return written


def _published(path: Path) -> Dict[str, dict]:
    """Model name -> what publish wrote into an existing metafile (kept on rebuild)."""
    if not path.is_file():
        return {}
    kept = {}
    for model in (yaml.safe_load(path.read_text()) or {}).get('Models', []):
        entry = {k: model[k] for k in PUBLISHED if k in model}
        meta = {
            k: model.get('Metadata', {})[k]
            for k in PUBLISHED_METADATA if k in model.get('Metadata', {})
        }
        if meta:
            entry['Metadata'] = meta
        kept[model['Name']] = entry
    return kept


def _resources(stem: str) -> Optional[str]:
    """``'4x GPUs'`` from a config name's ``{gpus}xb{batch}`` part (OpenMMLab naming)."""
    match = re.search(r'(\d+)xb\d+', stem)
    return f'{match.group(1)}x GPUs' if match else None


def converted_from() -> Dict[str, dict]:
    """Config stem -> ``Converted From`` entry, for the configs of the released weights."""
    from ..seg.released import CONFIGS, RELEASED_WEIGHTS  # mmseg: imported when needed
    return {
        Path(path).stem: {
            'Weights': RELEASED_WEIGHTS[variant],
            'Code': RELEASED_CODE,
            'Verified': RELEASED_VERIFIED
        }
        for variant, path in CONFIGS.items()
    }


def build_metafiles(json_files: Iterable[str],
                    keys: Optional[Iterable[str]] = None) -> Dict[Path, dict]:
    """The metafile content of each model folder.

    Args:
        json_files: Complexity records covering every config (fused and literal) of the
            folders built.
        keys: The :data:`COLLECTIONS` keys to build (default: all).

    Returns:
        ``{metafile path: content}``.
    """
    records = _records(json_files)
    repo = configs_root().parent
    released = converted_from()
    papers = paper_results()
    metafiles = {}
    for key in COLLECTIONS if keys is None else keys:
        name, dataset, task = COLLECTIONS[key]
        folder = configs_root() / key
        published = _published(folder / 'metafile.yml')
        models = []
        for config in sorted(folder.glob('*.py')):
            stem = config.stem
            forms = records.get(stem, {})
            if 'literal' not in forms or 'fused' not in forms:
                raise KeyError(f'no complexity record (fused and literal) for {config}')
            lit, fus = forms['literal'], forms['fused']
            _, h, w = lit['psa']['input_shape']
            meta = {
                'Parameters (M)': round(lit['psa']['params'] / 1e6, 2),
                'FLOPs (G)': round(lit['psa']['flops'] / 1e9, 2),
                'FLOPs fused (G)': round(fus['psa']['flops'] / 1e9, 2),
                'Stock Parameters (M)': round(lit['stock']['params'] / 1e6, 2),
                'Stock FLOPs (G)': round(lit['stock']['flops'] / 1e9, 2),
                'Input': f'{h}x{w}',
                'Training Data': dataset,
            }
            kept = dict(published.get(stem, {}))
            meta.update(kept.pop('Metadata', {}))
            model = {
                'Name': stem,
                'In Collection': name,
                'Config': str(config.relative_to(repo)),
                'Metadata': meta
            }
            model.update(kept)  # Results, Weights, Training log: only from publish
            model.update(papers.get(stem, {}))
            if stem in released:
                model['Converted From'] = released[stem]
            models.append(model)
        collection = {
            'Name': name,
            'Metadata': {
                'Architecture': ARCHITECTURES[key],
                'Training Data': dataset,
            },
            'Paper': PAPER,
            'Code': {
                'URL': f'mmpsa/{"seg" if key.startswith("mmseg") else "pose"}',
            },
            'README': 'README.md'
        }
        resources = {_resources(m['Name']) for m in models} - {None}
        if len(resources) == 1:
            collection['Metadata']['Training Resources'] = resources.pop()
        metafiles[folder / 'metafile.yml'] = {'Collections': [collection], 'Models': models}
    return metafiles


def metafile_metadata(name: str) -> Optional[dict]:
    """The ``Metadata`` of a model in mmpsa's metafiles, or None."""
    for key in COLLECTIONS:
        path = configs_root() / key / 'metafile.yml'
        if path.is_file():
            for model in (yaml.safe_load(path.read_text()) or {}).get('Models', []):
                if model['Name'] == name:
                    return model.get('Metadata', {})
    return None


def update_models(updates: Dict[str, dict], root: Optional[Path] = None) -> List[str]:
    """Write published entries into the metafiles (``tools/reproduce.py TABLE publish``).

    Args:
        updates: Model name -> ``{'Results': ..., 'Weights': ..., 'Training log': ...,
            'Metadata': {...}}``; ``Metadata`` keys are merged, the others replaced.
        root: The configs folder holding the metafiles (default: mmpsa's).

    Returns:
        The names of the models written (names without a metafile entry are skipped).
    """
    written = []
    for key in COLLECTIONS:
        path = (root or configs_root()) / key / 'metafile.yml'
        if not path.is_file():
            continue
        content = yaml.safe_load(path.read_text())
        changed = False
        for model in content.get('Models', []):
            update = updates.get(model['Name'])
            if update is None:
                continue
            update = dict(update)
            model.setdefault('Metadata', {}).update(update.pop('Metadata', {}))
            model.update({k: v for k, v in update.items() if v is not None})
            written.append(model['Name'])
            changed = True
        if changed:
            path.write_text(yaml.safe_dump(content, sort_keys=False, width=100))
    return written


def write_model_index(json_files: Iterable[str],
                      metafiles: Optional[Dict[Path, dict]] = None) -> List[Path]:
    """Write every metafile and ``model-index.yml``.

    Args:
        json_files: Complexity records covering every config (fused and literal).
        metafiles: Content to write instead of :func:`build_metafiles`'s.

    Returns:
        The written paths.
    """
    repo = configs_root().parent
    metafiles = metafiles or build_metafiles(json_files)
    written = []
    for path, content in metafiles.items():
        path.write_text(yaml.safe_dump(content, sort_keys=False, width=100))
        written.append(path)
    # every collection's metafile, also when only some were rebuilt
    index = {'Import': [f'configs/{key}/metafile.yml' for key in COLLECTIONS]}
    (repo / 'model-index.yml').write_text(yaml.safe_dump(index, sort_keys=False))
    return written + [repo / 'model-index.yml']
