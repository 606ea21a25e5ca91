"""Point the built-in tiny configs at generated data (used by the demo and the tests)."""
from pathlib import Path
from typing import Any, Dict, Optional, Union

from mmengine.config import Config

from ..utils.paths import configs_root

TINY_SEG = configs_root() / 'mmseg/tiny/psa-p_fcn_hr-tiny_1xb4-100iter_tiny-cityscapes-64x128.py'
TINY_POSE = configs_root() / 'mmpose/tiny/td-hm_psa-p-hrnet-tiny_1xb16-5e_tinycoco-96x64.py'


def make_tiny_data(root: Union[str, Path], scope: str) -> Path:
    """Generate the tiny Cityscapes- (``mmseg``) or COCO-format (``mmpose``) set once.

    Args:
        root: Folder to write into; reused when it already holds the set.
        scope: ``'mmseg'`` or ``'mmpose'``.

    Returns:
        ``root`` as a Path.
    """
    root = Path(root)
    if scope == 'mmseg':
        from .cityscapes_tiny import make_tiny_cityscapes
        if not (root / 'gtFine' / 'val').is_dir():
            make_tiny_cityscapes(root)
    elif scope == 'mmpose':
        from .coco_tiny import make_tiny_coco
        if not (root / 'annotations' / 'person_keypoints_val2017.json').is_file():
            make_tiny_coco(str(root))
    else:
        raise ValueError(f'scope must be mmseg or mmpose, got {scope!r}')
    return root


def data_root_updates(cfg: Config, data_root: Union[str, Path]) -> Dict[str, str]:
    """The config changes that point a config's datasets (and COCO annotation files) at a folder.

    Args:
        cfg: The config.
        data_root: The data folder (e.g. the generated tiny data).

    Returns:
        ``--cfg-options``-style ``{key: value}`` for the train/val/test datasets' ``data_root``
        and the evaluators' ``ann_file`` (same file name under ``annotations/``).
    """
    root = str(data_root).rstrip('/') + '/'
    updates = {}
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        if cfg.get(loader) is not None:
            updates[f'{loader}.dataset.data_root'] = root
    for evaluator in ('val_evaluator', 'test_evaluator'):
        ev = cfg.get(evaluator)
        if isinstance(ev, dict) and ev.get('ann_file'):
            updates[f'{evaluator}.ann_file'] = root + 'annotations/' + Path(ev.ann_file).name
    return updates


def tiny_config(config: Union[str, Path],
                data_root: Union[str, Path],
                work_dir: Optional[Union[str, Path]] = None,
                cfg_options: Optional[Dict[str, Any]] = None) -> Config:
    """Load a tiny config with its train/val/test data (and COCO metric) under ``data_root``.

    Args:
        config: A tiny mmseg or mmpose config file.
        data_root: The generated data folder.
        work_dir: The run's work dir.
        cfg_options: Extra ``--cfg-options``-style overrides, applied last.

    Returns:
        The config.
    """
    cfg = Config.fromfile(str(config))
    cfg.merge_from_dict(data_root_updates(cfg, data_root))
    if work_dir is not None:
        cfg.work_dir = str(work_dir)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg
