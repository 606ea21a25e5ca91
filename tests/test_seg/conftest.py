"""Session fixtures for the seg tests: the tiny data set, and each tiny model trained once.

``tiny_run(name)`` trains a tiny config through mmseg's Runner in two legs -- to the middle
checkpoint, then a fresh Runner with ``resume=True`` to the end -- validating (mmseg's
IoUMetric) at the end; it returns what the tests check. Each config trains once per pytest
session, however many tests read it, on a schedule shortened from the config's 100 iterations
to ``TEST_ITERS`` for the test budget.

Every seg test module runs with one intra-op thread: on two shared cores, two threads contend
with the other processes and run several times slower (a tiny model's FLOPs analysis: 7.8 s
with two threads, 1.3 s with one, measured here under load).
"""
import copy
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List

import pytest
import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.runner import Runner

from mmpsa.checkpoint import read_checkpoint
from mmpsa.datasets.cityscapes_tiny import make_tiny_cityscapes

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / 'configs' / 'mmseg' / 'tiny'
TINY_CONFIGS = {
    'hrnet': TINY / 'psa-p_fcn_hr-tiny_1xb4-100iter_tiny-cityscapes-64x128.py',
    'deeplabv3plus':
    TINY / 'psa-p_deeplabv3plus_r18-tiny-d8_1xb4-100iter_tiny-cityscapes-64x128.py',
}
NUM_VAL = 4
TEST_ITERS = 60


def tiny_cfg(config: Path, data_root: Path, work_dir: Path, max_iters: int) -> Config:
    """A tiny config pointed at ``data_root`` and ``work_dir``, on a ``max_iters`` schedule,
    quiet, with its own visualizer."""
    cfg = Config.fromfile(str(config))
    cfg.train_cfg.max_iters = cfg.train_cfg.val_interval = max_iters
    cfg.param_scheduler[0].end = max_iters
    cfg.default_hooks.checkpoint.interval = max_iters
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = str(data_root)
    cfg.work_dir = str(work_dir)
    cfg.log_level = 'WARNING'
    # one visualizer per Runner (a reused instance would write into the first work_dir)
    cfg.visualizer.name = f'visualizer_{uuid.uuid4().hex[:8]}'
    return cfg


class _Record(Hook):
    """Records the iteration and weights the Runner starts training from, and val metrics."""

    def __init__(self) -> None:
        self.start_iter = None
        self.start_state = None
        self.val_metrics = None

    def before_train(self, runner) -> None:
        self.start_iter = runner.iter
        self.start_state = {k: v.detach().clone() for k, v in runner.model.state_dict().items()}

    def after_val_epoch(self, runner, metrics=None) -> None:
        self.val_metrics = dict(metrics or {})


@dataclass
class TinyRun:
    """What one tiny training session produced."""

    config: Path
    cfg: Config
    work_dir: Path
    mid_iter: int
    max_iters: int
    resumed_from_iter: int
    resumed_state_matches: bool
    val_metrics: Dict[str, float]
    checkpoints: List[str] = field(default_factory=list)


def _train_tiny(config: Path, data_root: Path, work_dir: Path) -> TinyRun:
    cfg = tiny_cfg(config, data_root, work_dir, TEST_ITERS)
    max_iters = cfg.train_cfg.max_iters
    mid = max_iters // 2

    # leg 1: train to the middle and save there (the schedule still spans max_iters)
    first = copy.deepcopy(cfg)
    first.train_cfg.max_iters = mid
    first.train_cfg.val_interval = max_iters + 1  # no validation in leg 1
    first.default_hooks.checkpoint.interval = mid
    Runner.from_cfg(first).train()

    # leg 2: a fresh Runner resumes from the latest checkpoint and trains to the end
    second = copy.deepcopy(cfg)
    second.resume = True
    runner = Runner.from_cfg(second)
    record = _Record()
    runner.register_hook(record, priority='LOWEST')
    runner.train()

    saved = read_checkpoint(work_dir / f'iter_{mid}.pth')
    matches = record.start_state is not None and all(
        torch.equal(record.start_state[k], v) for k, v in saved['state_dict'].items())
    return TinyRun(
        config=config,
        cfg=cfg,
        work_dir=work_dir,
        mid_iter=mid,
        max_iters=max_iters,
        resumed_from_iter=record.start_iter,
        resumed_state_matches=matches and set(saved['state_dict']) == set(record.start_state),
        val_metrics=record.val_metrics,
        checkpoints=sorted(p.name for p in work_dir.glob('*.pth')))


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """One intra-op thread for the module, restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='session')
def tiny_data_root(tmp_path_factory) -> Path:
    """The tiny Cityscapes-format data set, written once per session."""
    root = tmp_path_factory.mktemp('tiny_cityscapes')
    make_tiny_cityscapes(root, num_train=12, num_val=NUM_VAL, seed=0)
    return root


@pytest.fixture(scope='session')
def make_tiny_cfg() -> Callable[..., Config]:
    """:func:`tiny_cfg`, for the test modules (importlib mode: no conftest imports)."""
    return tiny_cfg


@pytest.fixture(scope='session')
def tiny_run(tiny_data_root, tmp_path_factory) -> Callable[[str], TinyRun]:
    """``tiny_run('hrnet' | 'deeplabv3plus')``: the trained tiny model, trained on first use."""
    runs: Dict[str, TinyRun] = {}

    def get(name: str) -> TinyRun:
        if name not in runs:
            work_dir = tmp_path_factory.mktemp(f'work_{name}')
            runs[name] = _train_tiny(TINY_CONFIGS[name], tiny_data_root, work_dir)
        return runs[name]

    return get


@pytest.fixture(autouse=True)
def _mmseg_default_scope():
    """Build in the mmseg scope: mmengine's registries prefer the *current* default scope,
    which an earlier test's runner (of the other library) may have left behind."""
    from mmengine.registry import DefaultScope
    with DefaultScope.overwrite_default_scope('mmseg'):
        yield
