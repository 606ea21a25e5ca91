"""ExactResumeRunner's config rewrite: stock loop and checkpoint hook become the exact-resume
ones, custom types stay. Its resume itself is tested in test_loops.py and test_resume.py."""
from mmengine.config import Config
from mmengine.registry import RUNNERS

from mmpsa.engine import ExactResumeRunner
from mmpsa.engine.runner import exact_resume_cfg


def test_exact_resume_cfg_swaps_stock_types_only():
    mmseg_like = Config(
        dict(
            train_cfg=dict(type='IterBasedTrainLoop', max_iters=4),
            default_hooks=dict(checkpoint=dict(type='CheckpointHook'))))
    exact_resume_cfg(mmseg_like)
    assert mmseg_like.train_cfg.type == 'ExactResumeIterBasedTrainLoop'
    assert mmseg_like.default_hooks.checkpoint.type == 'SafeCheckpointHook'

    mmpose_like = Config(dict(train_cfg=dict(by_epoch=True, max_epochs=3), default_hooks={}))
    exact_resume_cfg(mmpose_like)
    assert mmpose_like.train_cfg == dict(type='ExactResumeEpochBasedTrainLoop', max_epochs=3)
    assert mmpose_like.default_hooks.checkpoint == dict(type='SafeCheckpointHook', interval=1)

    custom = Config(
        dict(
            train_cfg=dict(type='MyLoop'),
            default_hooks=dict(checkpoint=dict(type='MyCheckpointHook'))))
    exact_resume_cfg(custom)
    assert custom.train_cfg.type == 'MyLoop'
    assert custom.default_hooks.checkpoint.type == 'MyCheckpointHook'


def test_runner_type_string_of_the_runtime_base_resolves():
    """``configs/_base_/psa_runtime.py`` names the runner by its import path."""
    assert RUNNERS.get('mmpsa.engine.ExactResumeRunner') is ExactResumeRunner
