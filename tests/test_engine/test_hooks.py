"""SafeCheckpointHook: RNG states in every checkpoint, write-then-rename, delete-after-write.

Toy runs (a linear model with dropout on randomly augmented data, a few iterations) through
``ExactResumeRunner``; failures are injected where a killed process would stop: in
``torch.save`` (before any byte is written) and in ``os.replace`` (after the temporary file is
written, before it takes the final name).
"""
import os
from typing import Dict, List

import pytest
import torch
from mmengine.config import Config
from mmengine.evaluator import BaseMetric
from mmengine.hooks import Hook
from mmengine.registry import HOOKS, METRICS, RUNNERS

import mmpsa  # noqa: F401  (registers)
from mmpsa.checkpoint import read_checkpoint

LOSSES: Dict[str, Dict[int, float]] = {}


class _Crash(Exception):
    """Stands for the process dying."""


@METRICS.register_module(name='PsaTestHooksMetric', force=True)
class ImprovingMetric(BaseMetric):
    """A score that improves at every validation (so every validation saves a best)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls = 0

    def process(self, data_batch, data_samples) -> None:
        self.results.extend(sample['pred'] for sample in data_samples)

    def compute_metrics(self, results: list) -> dict:
        self.calls += 1
        return dict(score=float(self.calls))


@HOOKS.register_module(name='PsaTestHooksRecorder', force=True)
class Recorder(Hook):
    """Records each iteration's loss in LOSSES[tag]; raises _Crash after ``crash_at``."""

    priority = 'LOWEST'

    def __init__(self, tag: str, crash_at: int = -1) -> None:
        self.tag = tag
        self.crash_at = crash_at

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        LOSSES.setdefault(self.tag, {})[runner.iter] = float(outputs['loss'].detach())
        if runner.iter + 1 == self.crash_at:
            raise _Crash


def _cfg(work_dir,
         tag: str,
         max_iters: int = 4,
         interval: int = 2,
         val_interval: int = 100,
         safe: bool = True,
         resume: bool = False,
         crash_at: int = -1,
         **hook_args) -> Config:
    """An iteration-based toy config (SafeCheckpointHook unless ``safe=False``)."""
    cfg = dict(
        model=dict(type='PsaTestToyModel'),
        work_dir=str(work_dir),
        experiment_name=f'{tag}-{"resume" if resume else "run"}',
        train_dataloader=dict(
            dataset=dict(type='PsaTestAugDataset'),
            sampler=dict(type='InfiniteSampler', shuffle=True),
            batch_size=2,
            num_workers=0),
        val_dataloader=dict(
            dataset=dict(type='PsaTestAugDataset'),
            sampler=dict(type='DefaultSampler', shuffle=False),
            batch_size=4,
            num_workers=0),
        val_evaluator=dict(type='PsaTestHooksMetric'),
        val_cfg=dict(),
        train_cfg=dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=val_interval),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        default_hooks=dict(
            checkpoint=dict(type='CheckpointHook', interval=interval, by_epoch=False, **hook_args)),
        custom_hooks=[dict(type='PsaTestHooksRecorder', tag=tag, crash_at=crash_at)],
        randomness=dict(seed=0),
        resume=resume,
        log_level='WARNING')
    if safe:
        cfg['runner_type'] = 'mmpsa.engine.ExactResumeRunner'
    return Config(cfg)


def _last_checkpoint(work_dir) -> str:
    with open(os.path.join(work_dir, 'last_checkpoint')) as f:
        return f.read()


def _ckpts(work_dir) -> List[str]:
    return sorted(n for n in os.listdir(work_dir) if n.endswith('.pth') or n.endswith('.tmp'))


def test_checkpoints_carry_rng_states_and_load_weights_only(tmp_path):
    runner = RUNNERS.build(_cfg(tmp_path, 'states'))
    runner.train()
    assert 'SafeCheckpointHook' in [type(hook).__name__ for hook in runner.hooks]
    ckpt = read_checkpoint(tmp_path / 'iter_2.pth')
    saved = ckpt['message_hub']['runtime_info']['rng_states']
    assert (saved['epoch'], saved['iter']) == (0, 2) == (ckpt['meta']['epoch'],
                                                         ckpt['meta']['iter'])
    assert len(saved['states']) == 1  # one process
    assert set(saved['states'][0]) >= {'torch', 'numpy', 'python'}
    assert _last_checkpoint(tmp_path) == str(tmp_path / 'iter_4.pth')


@pytest.mark.parametrize('safe', [True, False])
def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, safe):
    """torch.save dies at the second save; with max_keep_ckpts=1 the stock hook has already
    deleted the first checkpoint by then (the control), ours has not."""
    real_save, calls = torch.save, []

    def dying_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError('killed while saving')
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, 'save', dying_save)
    with pytest.raises(OSError, match='killed while saving'):
        RUNNERS.build(_cfg(tmp_path, f'failed-save-{safe}', safe=safe, max_keep_ckpts=1)).train()
    if safe:
        assert _ckpts(tmp_path) == ['iter_2.pth']
        assert read_checkpoint(tmp_path / 'iter_2.pth')['meta']['iter'] == 2
    else:
        assert _ckpts(tmp_path) == []  # mmengine deleted it before saving iter_4
    assert _last_checkpoint(tmp_path) == str(tmp_path / 'iter_2.pth')


@pytest.mark.parametrize('dies_at', ['iter_4.pth', 'last_checkpoint'])
def test_death_before_rename_leaves_complete_files(tmp_path, monkeypatch, dies_at):
    """The process dies after writing the temporary file, before ``os.replace``: the final
    names still hold complete files that agree, and a resumed run finishes normally."""
    real_replace = os.replace

    def dying_replace(src, dst):
        # the second save: iter_4.pth, or the last_checkpoint naming it
        if os.path.basename(dst) == dies_at and (tmp_path / 'iter_4.pth').exists() == (
                dies_at == 'last_checkpoint'):
            raise KeyboardInterrupt  # as abrupt as it gets in-process
        return real_replace(src, dst)

    monkeypatch.setattr(os, 'replace', dying_replace)
    with pytest.raises(KeyboardInterrupt):
        RUNNERS.build(_cfg(tmp_path, f'die-{dies_at}')).train()
    monkeypatch.setattr(os, 'replace', real_replace)

    expected = ['iter_2.pth'] if dies_at == 'iter_4.pth' else ['iter_2.pth', 'iter_4.pth']
    assert _ckpts(tmp_path) == expected  # the temporary file was cleaned up
    for name in expected:
        read_checkpoint(tmp_path / name)
    assert _last_checkpoint(tmp_path) == str(tmp_path / 'iter_2.pth')

    # A SIGKILL would have left the temporary file: the next run removes it.
    stale = tmp_path / '.iter_4.pth.12345.tmp'
    stale.write_bytes(b'half a checkpoint')
    RUNNERS.build(_cfg(tmp_path, f'die-{dies_at}', resume=True, max_iters=6)).train()
    assert not stale.exists()
    assert _ckpts(tmp_path) == ['iter_2.pth', 'iter_4.pth', 'iter_6.pth']
    assert _last_checkpoint(tmp_path) == str(tmp_path / 'iter_6.pth')


def _watch_renames(monkeypatch, folder) -> List[tuple]:
    """Record (final name, files in the folder just before) for every os.replace."""
    real_replace, seen = os.replace, []

    def watching_replace(src, dst):
        seen.append((os.path.basename(dst), set(os.listdir(folder))))
        return real_replace(src, dst)

    monkeypatch.setattr(os, 'replace', watching_replace)
    return seen


def test_old_checkpoint_deleted_only_after_the_new_one_is_in_place(tmp_path, monkeypatch):
    seen = _watch_renames(monkeypatch, tmp_path)
    RUNNERS.build(_cfg(tmp_path, 'keep1', max_iters=6, max_keep_ckpts=1)).train()
    before = {name: files for name, files in seen}
    assert 'iter_2.pth' in before['iter_4.pth']
    assert 'iter_4.pth' in before['iter_6.pth']
    assert _ckpts(tmp_path) == ['iter_6.pth']


def test_previous_best_deleted_only_after_the_new_best_is_in_place(tmp_path, monkeypatch):
    seen = _watch_renames(monkeypatch, tmp_path)
    RUNNERS.build(
        _cfg(
            tmp_path,
            'best',
            max_iters=6,
            interval=100,
            val_interval=2,
            save_best='score',
            rule='greater')).train()
    before = {name: files for name, files in seen}
    assert 'best_score_iter_2.pth' in before['best_score_iter_4.pth']
    assert 'best_score_iter_4.pth' in before['best_score_iter_6.pth']
    assert [n for n in _ckpts(tmp_path) if n.startswith('best')] == ['best_score_iter_6.pth']


def test_checkpoint_saved_during_validation_resumes_exactly(tmp_path):
    """With save_best, mmengine re-saves the step checkpoint from inside the validation
    (iter_6 here, not a regular save step): it must carry the states from before it."""
    args = dict(max_iters=8, interval=4, val_interval=2, save_best='score', rule='greater')
    RUNNERS.build(_cfg(tmp_path / 'full', 'val-save-full', **args)).train()
    with pytest.raises(_Crash):
        RUNNERS.build(_cfg(tmp_path / 'cut', 'val-save-cut', crash_at=7, **args)).train()
    assert _last_checkpoint(tmp_path / 'cut') == str(tmp_path / 'cut' / 'iter_6.pth')
    LOSSES['val-save-cut'] = {}
    RUNNERS.build(_cfg(tmp_path / 'cut', 'val-save-cut', resume=True, **args)).train()
    resumed, full = LOSSES['val-save-cut'], LOSSES['val-save-full']
    assert sorted(resumed) == [6, 7]
    assert [resumed[6], resumed[7]] == [full[6], full[7]]
