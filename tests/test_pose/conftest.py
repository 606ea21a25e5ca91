"""Session fixtures for the MMPose tests: the tiny COCO data and each tiny model, trained once."""
import contextlib
import copy
from pathlib import Path
from typing import Dict, Iterator, Optional

import pytest
import torch
from mmengine.config import Config

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / 'configs' / 'mmpose' / 'tiny'
TINY_CONFIGS = {
    'hrnet': TINY / 'td-hm_psa-p-hrnet-tiny_1xb16-5e_tinycoco-96x64.py',
    'simplebaseline': TINY / 'td-hm_psa-s-res18-tiny_1xb16-10e_tinycoco-96x64.py',
}


def tiny_config(name: str, data_root: str, work_dir: Optional[str] = None, **overrides) -> Config:
    """A tiny config with its data (train, val, test, metric) under ``data_root``.

    Args:
        name: a key of ``TINY_CONFIGS``.
        data_root: the tiny COCO folder.
        work_dir: the runner's work dir, if any.
        **overrides: top-level keys merged into the config (``Config.merge_from_dict``).
    """
    cfg = Config.fromfile(str(TINY_CONFIGS[name]))
    root = str(data_root).rstrip('/') + '/'
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader]['dataset']['data_root'] = root
    for evaluator in ('val_evaluator', 'test_evaluator'):
        cfg[evaluator]['ann_file'] = root + 'annotations/person_keypoints_val2017.json'
    if work_dir is not None:
        cfg.work_dir = str(work_dir)
    cfg.merge_from_dict(overrides)
    return cfg


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread, then restore the previous count.

    On 2 cores shared with other processes, torch's default 2 OpenMP threads made the
    tiny HRNet's training 12x slower (340 s instead of 28 s, measured here).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def single_thread() -> Iterator[None]:
    """Each test that uses this runs on one torch thread."""
    with one_thread():
        yield


@pytest.fixture(scope='session')
def torch_one_thread():
    """:func:`one_thread`, for the test modules (importlib mode: no conftest imports)."""
    return one_thread


@pytest.fixture(scope='session')
def tiny_coco(tmp_path_factory) -> Path:
    """The default tiny COCO set (as ``tools/misc/make_tiny_coco.py`` writes it)."""
    from mmpsa.datasets.coco_tiny import make_tiny_coco
    root = tmp_path_factory.mktemp('tiny_coco')
    make_tiny_coco(str(root))
    return root


def _train(name: str, data_root: Path, work_dir: Path) -> Dict:
    from mmengine.runner import Runner
    cfg = tiny_config(name, str(data_root), str(work_dir))
    runner = Runner.from_cfg(copy.deepcopy(cfg))
    with one_thread():
        runner.train()
    hub = runner.message_hub
    return dict(
        cfg=cfg,
        work_dir=work_dir,
        epochs=cfg.train_cfg.max_epochs,
        iters=runner.iter,
        ap=hub.get_scalar('val/coco/AP').current(),
        checkpoint=work_dir / f'epoch_{cfg.train_cfg.max_epochs}.pth')


@pytest.fixture(scope='session')
def trained_hrnet(tiny_coco, tmp_path_factory) -> Dict:
    """The tiny PSA-HRNet trained and validated once per session."""
    return _train('hrnet', tiny_coco, tmp_path_factory.mktemp('work_hrnet'))


@pytest.fixture(scope='session')
def trained_simplebaseline(tiny_coco, tmp_path_factory) -> Dict:
    """The tiny PSA-SimpleBaseline trained and validated once per session."""
    return _train('simplebaseline', tiny_coco, tmp_path_factory.mktemp('work_sb'))


@pytest.fixture(scope='session')
def make_tiny_config():
    """:func:`tiny_config`, for the test modules (importlib mode: no conftest imports)."""
    return tiny_config


@pytest.fixture(autouse=True)
def _mmpose_default_scope():
    """Build in the mmpose scope: mmengine's registries prefer the *current* default scope,
    which an earlier test's runner (of the other library) may have left behind."""
    from mmengine.registry import DefaultScope
    with DefaultScope.overwrite_default_scope('mmpose'):
        yield
