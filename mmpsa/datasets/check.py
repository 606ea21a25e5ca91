"""Find the data that would break or silently corrupt training, per file and annotation id.

The stock libraries fail on bad data with errors that name no file (``IndexError: Target 30
is out of bounds``, ``need at least one array to concatenate``, a bare reshape error), or not
at all: a label map of another size than its image is padded and trained on misaligned,
keypoints with visibility 7 or far outside the image are accepted. :func:`check_dataset`
walks the dataset a config names through mmseg's or mmpose's own dataset class (each dataset
inside a wrapper such as ``RepeatDataset``, ``ConcatDataset``, ``ClassBalancedDataset``,
``MultiImageMixDataset`` or mmpose's ``CombinedDataset``, named by its config path) and reports:

- a split that cannot be listed or is empty;
- images that cannot be read;
- segmentation: label maps that cannot be read, of another size than their image, or with
  values outside the classes (after ``reduce_zero_label``/``label_map``, as mmseg's
  ``LoadAnnotations`` applies them) other than the ignore index;
- COCO-style keypoints (read from the annotation file itself, since a malformed list stops
  mmpose's dataset before it is built): lists of the wrong length or with non-numbers,
  visibility flags other than 0/1/2, labelled keypoints far outside their image (more than
  :data:`KEYPOINT_MARGIN` of its size), annotations of unknown images.

``tools/misc/check_dataset.py`` is its command line; ``tools/train.py`` runs the cheap part
(``full=False``: the listing, the counts, the annotation file, the first sample) first.
"""
import copy
import importlib
import json
import numbers
import os.path as osp
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

import numpy as np

#: Splits a config names as ``<split>_dataloader``.
SPLITS = ('train', 'val', 'test')
#: How far outside its image (a fraction of the image's width/height) a labelled keypoint
#: may lie before it is reported.
KEYPOINT_MARGIN = 0.05


class DatasetCheckError(ValueError):
    """A dataset with problems that would break or silently corrupt a run."""


@dataclass
class Finding:
    """One problem: where (a file or an annotation id) and what."""

    where: str
    kind: str
    detail: str

    def __str__(self) -> str:
        return f'{self.where}: {self.kind}: {self.detail}'


@dataclass
class DatasetReport:
    """What :func:`check_dataset` found in one split."""

    split: str
    dataset: str
    num_samples: int = 0
    num_checked: int = 0
    findings: List[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether nothing is wrong."""
        return not self.findings

    def add(self, where: str, kind: str, detail: str) -> None:
        """Record a problem."""
        self.findings.append(Finding(where, kind, detail))

    def summary(self, limit: int = 20) -> str:
        """The findings (the first ``limit``), counts per kind and a verdict."""
        head = (f'{self.split} split ({self.dataset}): {self.num_samples} samples, '
                f'{self.num_checked} checked')
        if self.ok:
            return head + ': no problems found'
        lines = [str(f) for f in self.findings[:limit]]
        if len(self.findings) > limit:
            lines.append(f'... and {len(self.findings) - limit} more')
        kinds = Counter(f.kind for f in self.findings)
        counts = ', '.join(f'{n} {kind}' for kind, n in kinds.most_common())
        return '\n'.join([head] + lines + [f'{len(self.findings)} problems: {counts}'])

    def raise_if_bad(self) -> None:
        """Raise :class:`DatasetCheckError` with the summary if anything is wrong."""
        if not self.ok:
            raise DatasetCheckError(
                'dataset check failed (python tools/misc/check_dataset.py CONFIG --split '
                f'{self.split} lists every problem):\n{self.summary()}')


def _read(path: str, backend_args: Optional[dict], flag: str, backend: str) -> np.ndarray:
    """Read an image as mmseg's/mmpose's loading transforms do; raise if unreadable."""
    import mmcv
    from mmengine import fileio
    array = mmcv.imfrombytes(
        fileio.get(path, backend_args=backend_args), flag=flag, backend=backend)
    if array is None:
        raise ValueError('not a readable image')
    return array


def _check_image(report: DatasetReport, path: str,
                 backend_args: Optional[dict]) -> Optional[np.ndarray]:
    """The image at ``path``, or None after recording why it cannot be read."""
    try:
        return _read(path, backend_args, 'color', 'cv2')
    except Exception as err:  # noqa: BLE001 - any reader failure is the finding
        report.add(path, 'unreadable image', f'{type(err).__name__}: {err}')
        return None


def _check_seg_sample(report: DatasetReport, info: dict, num_classes: int, ignore_index: int,
                      backend_args: Optional[dict]) -> None:
    """One mmseg sample: image, label map size and values."""
    image = _check_image(report, info['img_path'], backend_args)
    seg_path = info.get('seg_map_path')
    if seg_path is None:
        return
    try:
        label = _read(seg_path, backend_args, 'unchanged', 'pillow')
    except Exception as err:  # noqa: BLE001
        report.add(seg_path, 'unreadable label map', f'{type(err).__name__}: {err}')
        return
    if label.ndim != 2:
        report.add(seg_path, 'label map not single-channel', f'shape {label.shape}')
        return
    if image is not None and label.shape != image.shape[:2]:
        report.add(
            seg_path, 'label map size differs from its image',
            f'{label.shape[0]}x{label.shape[1]}, image {info["img_path"]} '
            f'{image.shape[0]}x{image.shape[1]}')
    values = np.unique(label).astype(np.int64)
    if info.get('reduce_zero_label'):
        values = np.where(values == 0, 255, values - 1)
        values[values == 254] = 255
    label_map = info.get('label_map') or {}
    values = np.unique([label_map.get(int(v), int(v)) for v in values])
    bad = [int(v) for v in values if not (0 <= v < num_classes or v == ignore_index)]
    if bad:
        report.add(seg_path, 'label values outside the classes',
                   f'{bad} (classes 0..{num_classes - 1}, ignore_index {ignore_index})')


def _far_outside(x: float, y: float, width: float, height: float) -> bool:
    """Whether a point lies more than :data:`KEYPOINT_MARGIN` of the image size outside it.

    Annotators' clicks on the border land a little outside (and mmpose's transforms handle
    that); swapped or mis-scaled coordinates land far outside.
    """
    mx, my = KEYPOINT_MARGIN * width, KEYPOINT_MARGIN * height
    return not (-mx <= x <= width + mx and -my <= y <= height + my)


def _check_coco_keypoints(report: DatasetReport, ann_file: str, num_keypoints: int,
                          names: Dict[int, str]) -> None:
    """Check a COCO-style keypoint annotation file's annotations (before mmpose parses it)."""
    try:
        with open(ann_file) as f:
            coco = json.load(f)
        images = {image['id']: image for image in coco['images']}
        annotations = coco['annotations']
    except (OSError, ValueError, KeyError, TypeError) as err:
        report.add(ann_file, 'unreadable annotation file', f'{type(err).__name__}: {err}')
        return
    for ann in annotations:
        where = f'{osp.basename(ann_file)} annotation id {ann.get("id")!r}'
        image = images.get(ann.get('image_id'))
        if image is None:
            report.add(where, 'annotation of an unknown image', f'image_id {ann.get("image_id")!r}')
            continue
        where += f' (image {image.get("file_name")})'
        keypoints = ann.get('keypoints')
        if keypoints is None:
            continue
        if (not isinstance(keypoints, list) or len(keypoints) != 3 * num_keypoints
                or not all(isinstance(v, numbers.Real) for v in keypoints)):
            size = len(keypoints) if isinstance(keypoints, list) else type(keypoints).__name__
            report.add(
                where, 'malformed keypoints',
                f'{size} entries, expected {3 * num_keypoints} numbers '
                f'([x, y, v] for each of {num_keypoints} keypoints)')
            continue
        width, height = image.get('width'), image.get('height')
        for k in range(num_keypoints):
            x, y, v = keypoints[3 * k:3 * k + 3]
            name = f'keypoint {k} ({names.get(k, "?")})'
            if v not in (0, 1, 2):
                report.add(where, 'bad visibility flag', f'{name}: {v!r}, expected 0, 1 or 2')
            elif v > 0 and width and height and _far_outside(x, y, width, height):
                report.add(where, 'keypoint outside its image',
                           f'{name} at ({x}, {y}), image {width}x{height}')


def wrapped_datasets(dataset_cfg: dict, path: str) -> List[tuple]:
    """The datasets inside wrappers, with their config paths.

    A wrapper holds its dataset(s) under ``dataset`` (``RepeatDataset``,
    ``ClassBalancedDataset``, ``MultiImageMixDataset``) or ``datasets`` (``ConcatDataset``,
    mmpose's ``CombinedDataset``); any config that does is looked through, recursively.

    Args:
        dataset_cfg: A dataset config.
        path: Its config path (``'train_dataloader.dataset'``).

    Returns:
        ``(config path, dataset config)`` of each inner (non-wrapper) dataset, in order.
    """
    inner = dataset_cfg.get('dataset')
    if isinstance(inner, dict):
        return wrapped_datasets(inner, f'{path}.dataset')
    many = dataset_cfg.get('datasets')
    if isinstance(many, (list, tuple)) and all(isinstance(d, dict) for d in many):
        found = []
        for i, one in enumerate(many):
            found += wrapped_datasets(one, f'{path}.datasets[{i}]')
        return found
    return [(path, dataset_cfg)]


def _build_dataset(cfg, dataset_cfg: dict, report: DatasetReport, where: str):
    """One (inner) dataset, built unlisted (``lazy_init``), or None after a finding."""
    dataset_cfg = copy.deepcopy(dataset_cfg)
    if cfg.get('custom_imports'):
        from mmengine.utils import import_modules_from_strings
        import_modules_from_strings(**cfg['custom_imports'])
    from mmengine.registry import init_default_scope
    scope = cfg.get('default_scope')
    init_default_scope(scope)
    registry = importlib.import_module(f'{scope}.registry').DATASETS
    from mmengine.dataset import BaseDataset
    try:
        cls = registry.get(dataset_cfg['type']) if isinstance(dataset_cfg['type'],
                                                              str) else dataset_cfg['type']
        if isinstance(cls, type) and issubclass(cls, BaseDataset):
            dataset_cfg.update(lazy_init=True, serialize_data=False)
        return registry.build(dataset_cfg)
    except Exception as err:  # noqa: BLE001 - the dataset class's own error, named
        report.add(where, 'cannot build the dataset', f'{type(err).__name__}: {err}')
        return None


def check_dataset(cfg,
                  split: str = 'train',
                  full: bool = True,
                  progress: bool = False) -> DatasetReport:
    """Check the dataset of one split of a config, and every dataset inside its wrappers.

    Args:
        cfg: A loaded mmengine ``Config`` with ``default_scope`` ``'mmseg'`` or ``'mmpose'``.
        split: One of :data:`SPLITS`.
        full: Check every sample; otherwise only the listing, the counts, the annotation file
            and the first sample (what ``tools/train.py`` runs before training).
        progress: Show a progress bar over the samples.

    Returns:
        The report (``report.ok``, ``report.summary()``, ``report.raise_if_bad()``); with a
        wrapper (``RepeatDataset``, ``ConcatDataset`` ...), each finding starts with the config
        path of its inner dataset (``train_dataloader.dataset.dataset``).
    """
    if split not in SPLITS:
        raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
    report = DatasetReport(split=split, dataset='?')
    loader = cfg.get(f'{split}_dataloader')
    if not loader or not loader.get('dataset'):
        report.add(f'{split}_dataloader', 'no dataset', 'the config names no dataset here')
        return report
    outer = loader['dataset']
    inner = wrapped_datasets(outer, f'{split}_dataloader.dataset')
    names = [str(one.get('type')) for _, one in inner]
    wrapped = len(inner) > 1 or inner[0][1] is not outer
    report.dataset = (f'{outer.get("type")}({", ".join(names)})' if wrapped else names[0])
    for path, dataset_cfg in inner:
        one = DatasetReport(split=split, dataset=str(dataset_cfg.get('type')))
        _check_one(cfg, dataset_cfg, one, full, progress)
        report.num_samples += one.num_samples
        report.num_checked += one.num_checked
        for finding in one.findings:
            where = f'{path} ({one.dataset}): {finding.where}' if wrapped else finding.where
            report.add(where, finding.kind, finding.detail)
    return report


def _check_one(cfg, dataset_cfg: dict, report: DatasetReport, full: bool, progress: bool) -> None:
    """:func:`check_dataset` of one inner dataset, into ``report``."""
    dataset = _build_dataset(cfg, dataset_cfg, report, report.dataset)
    if dataset is None:
        return
    meta = getattr(dataset, 'metainfo', None) or {}
    ann_file = getattr(dataset, 'ann_file', '')
    if 'num_keypoints' in meta and str(ann_file).endswith('.json'):
        names = {i: n for i, n in (meta.get('keypoint_id2name') or {}).items()}
        _check_coco_keypoints(report, ann_file, meta['num_keypoints'], names)
        if not report.ok:
            return  # mmpose's parser would stop at the first malformed list
    try:
        if hasattr(dataset, 'full_init'):
            dataset.full_init()
        report.num_samples = len(dataset)
    except Exception as err:  # noqa: BLE001
        report.add(report.dataset, 'cannot list the dataset', f'{type(err).__name__}: {err}')
        return
    if report.num_samples == 0:
        where = str(getattr(dataset, 'data_prefix', None) or ann_file or report.dataset)
        report.add(
            where, 'empty split', f'{report.dataset} lists no samples '
            f'(data_root {getattr(dataset, "data_root", None)!r})')
        return
    if not hasattr(dataset, 'get_data_info'):
        return  # not an mmengine dataset: no file list to check
    indices: Iterable[int] = range(report.num_samples if full else 1)
    if progress:
        from mmengine.utils import track_iter_progress
        indices = track_iter_progress(list(indices))
    backend_args = getattr(dataset, 'backend_args', None)
    seen_images = set()
    for index in indices:
        info = dataset.get_data_info(index)
        report.num_checked += 1
        if 'seg_map_path' in info:
            _check_seg_sample(report, info, len(meta['classes']),
                              getattr(dataset, 'ignore_index', 255), backend_args)
        elif info.get('img_path') and info['img_path'] not in seen_images:
            seen_images.add(info['img_path'])
            _check_image(report, info['img_path'], backend_args)
