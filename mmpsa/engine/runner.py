"""The runner of exact, crash-safe resume, and the config rewrite behind it.

:class:`ExactResumeRunner` is the stock ``Runner`` except that it swaps a config's stock train
loop and ``CheckpointHook`` for the exact-resume ones (:mod:`mmpsa.engine.loops`,
:mod:`mmpsa.engine.hooks`) and reads checkpoints with an error that names the file
(:func:`mmpsa.checkpoint.read_checkpoint`). ``configs/_base_/psa_runtime.py`` selects it with
``runner_type``; see that file for why this is the mechanism.
"""
import copy
import logging

from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import RUNNERS
from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop, Runner
from mmengine.runner.checkpoint import _load_checkpoint_to_model

from ..checkpoint import read_checkpoint


def _is_type(value, name: str, cls: type) -> bool:
    """Whether a config ``type`` names ``cls`` (by registry name or as the class)."""
    return value == name or value is cls


def add_custom_hook(cfg, hook: dict, replace: bool = False) -> None:
    """Add ``hook`` to ``cfg.custom_hooks`` unless a hook of its type is there already.

    Args:
        cfg: A mmengine ``Config``/dict; changed in place.
        hook: The hook config, with ``type``.
        replace: Replace an entry of the same type instead of keeping it.
    """
    hooks = list(cfg.get('custom_hooks') or [])
    same = [i for i, entry in enumerate(hooks) if entry.get('type') == hook['type']]
    if not same:
        hooks.append(dict(hook))
    elif replace:
        hooks[same[0]] = dict(hook)
    cfg['custom_hooks'] = hooks


def exact_resume_cfg(cfg) -> None:
    """Swap a config's stock train loop and checkpoint hook for the exact-resume ones.

    Other (custom) types are kept, with a warning. ``train_cfg=dict(by_epoch=...)`` (no
    ``type``, as mmpose writes it) is handled too; a missing ``default_hooks.checkpoint``
    becomes ours with mmengine's default ``interval=1``. :class:`~mmpsa.engine.PSACheckpointHook`
    is added unless the config has one.

    Args:
        cfg: A mmengine ``Config``/dict with ``train_cfg`` and ``default_hooks``; changed
            in place.
    """
    from mmengine.hooks import CheckpointHook

    train_cfg = cfg.get('train_cfg')
    if train_cfg is not None:
        if 'type' not in train_cfg and 'by_epoch' in train_cfg:
            by_epoch = train_cfg.pop('by_epoch')
            train_cfg['type'] = 'EpochBasedTrainLoop' if by_epoch else 'IterBasedTrainLoop'
        loop_type = train_cfg.get('type')
        if _is_type(loop_type, 'IterBasedTrainLoop', IterBasedTrainLoop):
            train_cfg['type'] = 'ExactResumeIterBasedTrainLoop'
        elif _is_type(loop_type, 'EpochBasedTrainLoop', EpochBasedTrainLoop):
            train_cfg['type'] = 'ExactResumeEpochBasedTrainLoop'
        elif loop_type not in ('ExactResumeIterBasedTrainLoop', 'ExactResumeEpochBasedTrainLoop'):
            print_log(
                f'train_cfg type {loop_type!r} is not a stock loop: it is kept, so a '
                'resumed run does not restore RNG states.',
                logger='current',
                level=logging.WARNING)

    if cfg.get('default_hooks') is None:
        cfg['default_hooks'] = dict()
    hooks = cfg['default_hooks']
    if 'checkpoint' not in hooks:
        hooks['checkpoint'] = dict(type='SafeCheckpointHook', interval=1)
    elif hooks['checkpoint'] is not None:
        hook_type = hooks['checkpoint'].get('type')
        if _is_type(hook_type, 'CheckpointHook', CheckpointHook):
            hooks['checkpoint']['type'] = 'SafeCheckpointHook'
        elif hook_type != 'SafeCheckpointHook':
            print_log(
                f'default_hooks.checkpoint type {hook_type!r} is not the stock '
                'CheckpointHook: it is kept, so checkpoints carry no RNG states and are '
                'not written crash-safely.',
                logger='current',
                level=logging.WARNING)
    add_custom_hook(cfg, dict(type='PSACheckpointHook'))


@RUNNERS.register_module()
class ExactResumeRunner(Runner):
    """mmengine ``Runner`` with exact, crash-safe resume, for configs built with ``from_cfg``.

    It swaps the stock train loop for
    :class:`~mmpsa.engine.loops.ExactResumeIterBasedTrainLoop` /
    :class:`~mmpsa.engine.loops.ExactResumeEpochBasedTrainLoop` and the stock
    ``CheckpointHook`` for :class:`~mmpsa.engine.hooks.SafeCheckpointHook` (see
    :func:`exact_resume_cfg`), and makes an unreadable checkpoint fail with an error that names
    the file. Everything else is the stock runner.
    """

    @classmethod
    def from_cfg(cls, cfg) -> 'ExactResumeRunner':
        """Build the runner from a config, with the exact-resume loop and hook.

        Args:
            cfg: The config (not modified).

        Returns:
            The runner.
        """
        cfg = copy.deepcopy(cfg)
        exact_resume_cfg(cfg)
        return super().from_cfg(cfg)

    def load_checkpoint(self,
                        filename: str,
                        map_location='cpu',
                        strict: bool = False,
                        revise_keys: list = [(r'^module.', '')]) -> dict:  # noqa: B006
        """``Runner.load_checkpoint`` (behind ``resume`` and ``load_from``), failing with a
        :class:`~mmpsa.checkpoint.CheckpointReadError` that names the file when it cannot be read.

        Args:
            filename: Local path or URL of the checkpoint.
            map_location: As in mmengine.
            strict: Whether the state_dict keys must match the model's.
            revise_keys: ``(pattern, replacement)`` pairs applied to the keys.

        Returns:
            The checkpoint dict.
        """
        checkpoint = read_checkpoint(filename, map_location=map_location)
        self.call_hook('after_load_checkpoint', checkpoint=checkpoint)
        model = self.model.module if is_model_wrapper(self.model) else self.model
        checkpoint = _load_checkpoint_to_model(model, checkpoint, strict, revise_keys=revise_keys)
        self._has_loaded = True
        self.logger.info(f'Load checkpoint from {filename}')
        return checkpoint
