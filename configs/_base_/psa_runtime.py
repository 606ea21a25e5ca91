# Exact, crash-safe resume for any MMSegmentation or MMPose config (mmpsa.engine).
#
# Use: list it beside the stock base, e.g.
#     _base_ = ['mmseg::hrnet/fcn_hr18s_4xb2-40k_cityscapes-512x1024.py',
#               '../_base_/psa_runtime.py']
# It works the same for mmseg's IterBasedTrainLoop and mmpose's EpochBasedTrainLoop, with
# our tools/train.py, mmseg's or mmpose's own tools/train.py and `mim train`.
#
# What it changes: the train loop becomes ExactResumeIterBasedTrainLoop or
# ExactResumeEpochBasedTrainLoop (every rank's torch/numpy/python RNG states restored on
# resume, after the data skip; the RNG isolated around validation) and
# default_hooks.checkpoint becomes SafeCheckpointHook (RNG states saved with each checkpoint;
# write-then-rename files and last_checkpoint; old/best checkpoints deleted only after the new
# one is in place). Other loop or hook types are kept, with a warning. A config without this
# base keeps mmengine's normal resume (weights, optimizer, schedulers, iteration; no RNG).
#
# How, and why this way: a base listed beside a stock base cannot set `train_cfg` or
# `default_hooks` -- mmengine refuses a key defined in two bases, and it cannot know whether
# the other base's loop is iteration- or epoch-based. It sets the one runtime key no stock
# config uses: `runner_type`, mmengine's switch for a custom runner, which every OpenMMLab 2.x
# train/test tool honours (`RUNNERS.build(cfg)` when `runner_type` is in the config). That
# runner, mmpsa.engine.ExactResumeRunner, is the stock Runner except that `from_cfg` swaps the
# stock loop and hook types for ours by name. The dotted name lets mmengine's registry import
# mmpsa by itself, so this base needs no `custom_imports` (a key that would clash with a
# `custom_imports` in another base).
runner_type = 'mmpsa.engine.ExactResumeRunner'
