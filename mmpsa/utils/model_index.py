"""Write ``model-index.yml`` and per-folder ``metafile.yml`` (OpenMMLab format).

The numbers come from :mod:`mmpsa.apis.complexity` records (``tools/complexity.py --json``);
the only results listed are the paper's own, marked as such. No ``Weights`` entries: mmpsa
publishes no trained checkpoints. The config folders are found by
:func:`~mmpsa.utils.paths.configs_root`; ``model-index.yml`` goes beside that folder, its
paths relative to there (the repository root in a checkout).
"""
import json
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import yaml

from .paths import configs_root

PAPER = dict(
    URL='https://arxiv.org/abs/2107.00782',
    Title='Polarized Self-Attention: Towards High-quality Pixel-wise Regression')

# Results the released repository (DeLightCMU/PSA README, Tables 4 and 5 of the paper)
# reports, obtained with its own pipeline, keyed by our config stem.
PAPER_RESULTS = {
    'psa-p_ocrnet_hr48_4xb2-80k_cityscapes-512x1024': ('mIoU', 86.95),
    'psa-s_ocrnet_hr48_4xb2-80k_cityscapes-512x1024': ('mIoU', 86.72),
    'td-hm_psa-p-hrnet-w48_udp-8xb32-210e_coco-256x192': ('AP', 78.9),
    'td-hm_psa-p-hrnet-w48_udp-8xb32-210e_coco-384x288': ('AP', 79.5),
    'td-hm_psa-s-hrnet-w48_udp-8xb32-210e_coco-384x288': ('AP', 79.4),
    'psa-p_mscale-ocrnet_hr48_official_cityscapes-1024x2048': ('mIoU', 86.95),
    'psa-s_mscale-ocrnet_hr48_official_cityscapes-1024x2048': ('mIoU', 86.72),
}
PAPER_SOURCE = 'paper (its pipeline), not reproduced here'
# The configs of the released weights (mmpsa.seg.released converts them) say what was checked.
RELEASED_CODE = 'https://github.com/DeLightCMU/PSA'
RELEASED_SOURCE = ('paper: the released weights, evaluated by the released code; mmpsa verified '
                   'that the converted weights give the released outputs, not this mIoU')
RELEASED_VERIFIED = ("outputs equal the released network's (per scale and joined, 1e-4 relative; "
                     'tests/test_seg/test_released_weights.py); mIoU not measured (no Cityscapes)')

COLLECTIONS = {
    'mmseg/psa_deeplabv3plus': ('PSA-DeepLabV3+', 'Cityscapes', 'Semantic Segmentation'),
    'mmseg/psa_hrnet': ('PSA-FCN-HRNetV2', 'Cityscapes', 'Semantic Segmentation'),
    'mmseg/psa_ocrnet': ('PSA-OCRNet-HRNetV2', 'Cityscapes', 'Semantic Segmentation'),
    'mmseg/psa_mscale_ocrnet':
    ('PSA-OCRNet-HRNetV2-Mscale', 'Cityscapes', 'Semantic Segmentation'),
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
    metafiles = {}
    for key in COLLECTIONS if keys is None else keys:
        name, dataset, task = COLLECTIONS[key]
        folder = configs_root() / key
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
            }
            model = {'Name': stem, 'In Collection': name,
                     'Config': str(config.relative_to(repo)), 'Metadata': meta}
            if stem in PAPER_RESULTS:
                metric, value = PAPER_RESULTS[stem]
                model['Results'] = [{'Task': task, 'Dataset': dataset,
                                     'Metrics': {metric: value},
                                     'Source': RELEASED_SOURCE if stem in released
                                     else PAPER_SOURCE}]
            if stem in released:
                model['Converted From'] = released[stem]
            models.append(model)
        metafiles[folder / 'metafile.yml'] = {
            'Collections': [{'Name': name, 'Metadata': {'Training Data': dataset},
                             'Paper': PAPER, 'README': 'README.md'}],
            'Models': models,
        }
    return metafiles


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
