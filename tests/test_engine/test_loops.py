"""Exact resume of the mmpsa train loops, on a toy model whose every step draws random numbers.

Each run trains a tiny linear model with dropout on a dataset whose ``__getitem__`` draws
from torch, numpy and python ``random`` (random augmentation), with a validation that draws
too, at the checkpoint step. A run "crashes" (an exception from a hook, after a checkpoint)
and a fresh runner resumes from the work dir: its per-iteration losses must equal the
uninterrupted run's, bit for bit. The stock runner does not get there (checked, so the
comparison can fail).
"""
from typing import Dict

import numpy as np
import pytest
from mmengine.config import Config
from mmengine.evaluator import BaseMetric
from mmengine.hooks import Hook
from mmengine.registry import HOOKS, METRICS, RUNNERS

import mmpsa  # noqa: F401  (registers)

LOSSES: Dict[str, Dict[int, float]] = {}


class _Crash(Exception):
    """Stands for the process dying."""


@METRICS.register_module(name='PsaTestLoopsMetric', force=True)
class ToyMetric(BaseMetric):
    """Mean prediction (a number that changes as training goes)."""

    def process(self, data_batch, data_samples) -> None:
        self.results.extend(sample['pred'] for sample in data_samples)

    def compute_metrics(self, results: list) -> dict:
        return dict(score=float(np.mean(results)))


@HOOKS.register_module(name='PsaTestLoopsRecorder', force=True)
class Recorder(Hook):
    """Records the loss of every iteration in LOSSES[tag]; raises _Crash after ``crash_at``."""

    priority = 'LOWEST'  # after the CheckpointHook

    def __init__(self, tag: str, crash_at: int = -1) -> None:
        self.tag = tag
        self.crash_at = crash_at

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        LOSSES.setdefault(self.tag, {})[runner.iter] = float(outputs["loss"].detach())
        if runner.iter + 1 == self.crash_at:
            raise _Crash


def _cfg(work_dir: str,
         tag: str,
         by_epoch: bool,
         exact: bool,
         crash_at: int = -1,
         resume: bool = False) -> Config:
    """A toy config: iteration-based (8 iters, checkpoint + val at 4) or epoch-based (4
    epochs of 4 iterations, checkpoint every epoch, val every 2, in mmpose's train_cfg form)."""
    if by_epoch:
        train_cfg = dict(by_epoch=True, max_epochs=4, val_interval=2)
        checkpoint = dict(type='CheckpointHook', interval=1)
        sampler = dict(type='DefaultSampler', shuffle=True)
    else:
        train_cfg = dict(type='IterBasedTrainLoop', max_iters=8, val_interval=4)
        checkpoint = dict(type='CheckpointHook', interval=4, by_epoch=False)
        sampler = dict(type='InfiniteSampler', shuffle=True)
    cfg = dict(
        model=dict(type='PsaTestToyModel'),
        work_dir=work_dir,
        experiment_name=f'{tag}-{"resume" if resume else "run"}',
        train_dataloader=dict(
            dataset=dict(type='PsaTestAugDataset'),
            sampler=sampler,
            batch_size=2,
            num_workers=0,
            collate_fn=dict(type='pseudo_collate')),
        val_dataloader=dict(
            dataset=dict(type='PsaTestAugDataset'),
            sampler=dict(type='DefaultSampler', shuffle=False),
            batch_size=4,
            num_workers=0),
        val_evaluator=dict(type='PsaTestLoopsMetric'),
        val_cfg=dict(),
        train_cfg=train_cfg,
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01, momentum=0.9)),
        default_hooks=dict(checkpoint=checkpoint, logger=dict(type='LoggerHook', interval=1)),
        custom_hooks=[dict(type='PsaTestLoopsRecorder', tag=tag, crash_at=crash_at)],
        randomness=dict(seed=0),
        resume=resume,
        log_level='WARNING')
    if exact:
        cfg['runner_type'] = 'mmpsa.engine.ExactResumeRunner'
    return Config(cfg)


def _crash_and_resume(tmp_path, by_epoch: bool, exact: bool, crash_at: int):
    """Losses of an uninterrupted run, and of a run crashed at ``crash_at`` then resumed."""
    name = f'{"epoch" if by_epoch else "iter"}-{"exact" if exact else "stock"}'
    full, cut = f'{name}-full', f'{name}-cut'
    for tag in (full, cut):
        LOSSES.pop(tag, None)
    RUNNERS.build(_cfg(str(tmp_path / full), full, by_epoch, exact)).train()
    with pytest.raises(_Crash):
        RUNNERS.build(_cfg(str(tmp_path / cut), cut, by_epoch, exact, crash_at=crash_at)).train()
    before_crash = dict(LOSSES[cut])
    LOSSES[cut] = {}
    runner = RUNNERS.build(_cfg(str(tmp_path / cut), cut, by_epoch, exact, resume=True))
    runner.train()
    return runner, LOSSES[full], before_crash, LOSSES[cut]


def test_iter_based_resume_is_exact(tmp_path):
    runner, full, before_crash, resumed = _crash_and_resume(
        tmp_path, by_epoch=False, exact=True, crash_at=6)
    assert type(runner.train_loop).__name__ == 'ExactResumeIterBasedTrainLoop'
    assert [before_crash[i] for i in range(6)] == [full[i] for i in range(6)]
    # resumed from iter_4.pth: iterations 5..8 (indices 4..7) again, as uninterrupted
    assert sorted(resumed) == [4, 5, 6, 7]
    assert [resumed[i] for i in range(4, 8)] == [full[i] for i in range(4, 8)]


def test_epoch_based_resume_is_exact_at_epoch_boundary(tmp_path):
    # crash in epoch 3 (iteration 10), after the epoch-2 checkpoint and validation
    runner, full, _, resumed = _crash_and_resume(tmp_path, by_epoch=True, exact=True, crash_at=10)
    assert type(runner.train_loop).__name__ == 'ExactResumeEpochBasedTrainLoop'
    assert sorted(resumed) == list(range(8, 16))
    assert [resumed[i] for i in range(8, 16)] == [full[i] for i in range(8, 16)]


def test_stock_runner_resume_is_not_exact(tmp_path):
    """The control: mmengine's own loop and hook continue with other random numbers."""
    runner, full, _, resumed = _crash_and_resume(tmp_path, by_epoch=False, exact=False, crash_at=6)
    assert type(runner.train_loop).__name__ == 'IterBasedTrainLoop'
    assert sorted(resumed) == [4, 5, 6, 7]
    assert [resumed[i] for i in range(4, 8)] != [full[i] for i in range(4, 8)]
