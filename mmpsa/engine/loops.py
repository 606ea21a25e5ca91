"""Train loops whose resumed continuation is exact, and the runner that selects them.

mmengine 0.10.7 resumes weights, optimizer, schedulers and the iteration, but it saves no RNG
state: after a resume, random augmentations and dropout draw other numbers than the
uninterrupted run would have. Exact resume takes three pieces:

- :class:`~mmpsa.engine.hooks.SafeCheckpointHook` gathers the torch (and CUDA), numpy and
  python ``random`` states of every rank at each save and keeps them in the message hub's
  runtime info under :data:`RNG_STATES_KEY`, which mmengine already saves and resumes;
- the loops here put each rank's states back at the moment the uninterrupted run would draw
  its next batch. The iteration-based loop does it *after* replaying the data pipeline to skip
  the batches already trained (the replay draws random numbers too, and it fetches the first
  new batch before any ``before_train_iter`` hook runs, so a hook would be too early); the
  epoch-based loop (mmpose) has no mid-epoch skip, so there exact resume is at epoch
  boundaries. Both run validation inside :func:`isolated_rng`: a validation at the checkpoint
  draws from torch's RNG (``iter(val_dataloader)``, random test transforms) in the
  uninterrupted run but not in the resumed one;
- :class:`ExactResumeRunner` swaps the stock ``IterBasedTrainLoop``/``EpochBasedTrainLoop``
  and ``CheckpointHook`` of a config for these. ``configs/_base_/psa_runtime.py`` selects it
  with ``runner_type``; see that file for why this is the mechanism.
"""
import copy
import logging
import os
import pickle
import random
import zipfile
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
from mmengine.dist import get_dist_info
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import LOOPS, RUNNERS
from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop, Runner
from mmengine.runner.checkpoint import _load_checkpoint, _load_checkpoint_to_model

#: Message-hub runtime-info key of the gathered RNG states:
#: ``dict(epoch=int, iter=int, states=[one get_rng_state() per rank])``, where ``epoch`` and
#: ``iter`` are the loop counters a run resumed from that checkpoint starts with.
RNG_STATES_KEY = 'rng_states'


def get_rng_state() -> dict:
    """This process's torch, CUDA, numpy and python RNG states, in a ``weights_only`` form.

    Everything is a tensor, an int, a float, a str or None, so that a checkpoint holding it
    loads with ``torch.load(weights_only=True)`` without widening the allow-list.

    Returns:
        A dict for :func:`set_rng_state`.
    """
    bit_generator, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    py_version, py_internal, py_gauss_next = random.getstate()
    state = dict(
        torch=torch.get_rng_state(),
        numpy=dict(
            bit_generator=str(bit_generator),
            keys=torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            pos=int(pos),
            has_gauss=int(has_gauss),
            cached_gaussian=float(cached_gaussian)),
        python=dict(
            version=int(py_version),
            internal=torch.tensor(py_internal, dtype=torch.int64),
            gauss_next=py_gauss_next))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the states returned by :func:`get_rng_state`.

    Args:
        state: A dict from :func:`get_rng_state`.
    """
    torch.set_rng_state(state['torch'])
    np_state = state['numpy']
    np.random.set_state((np_state['bit_generator'], np_state['keys'].numpy().astype(np.uint32),
                         np_state['pos'], np_state['has_gauss'], np_state['cached_gaussian']))
    py_state = state['python']
    random.setstate((py_state['version'], tuple(int(v) for v in py_state['internal'].tolist()),
                     py_state['gauss_next']))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])


@contextmanager
def isolated_rng() -> Iterator[None]:
    """Run a block without it changing any RNG state seen after it (e.g. a validation)."""
    state = get_rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


class _ExactResumeMixin:
    """The RNG restore and validation isolation shared by both loops."""

    def _restore_rng_states(self) -> None:
        """Put back this rank's RNG states saved with the checkpoint resumed from."""
        saved = self.runner.message_hub.get_info(RNG_STATES_KEY)
        if saved is None:
            print_log(
                'The resumed checkpoint holds no RNG states (not written by '
                'SafeCheckpointHook): training continues, but not exactly as the '
                'uninterrupted run would have.',
                logger='current',
                level=logging.WARNING)
            return
        rank, world_size = get_dist_info()
        if (saved['epoch'], saved['iter']) != (self._epoch, self._iter):
            reason = (f'they were saved at epoch {saved["epoch"]}, iteration {saved["iter"]}, '
                      f'but the run resumes at epoch {self._epoch}, iteration {self._iter}')
        elif len(saved['states']) != world_size:
            reason = (f'they were saved by {len(saved["states"])} processes and this run has '
                      f'{world_size}')
        else:
            set_rng_state(saved['states'][rank])
            print_log(
                f'Restored the RNG states of iteration {self._iter} (exact resume).',
                logger='current')
            return
        print_log(
            f'RNG states of the resumed checkpoint not restored: {reason}. Training '
            'continues, but not exactly as the uninterrupted run would have.',
            logger='current',
            level=logging.WARNING)

    def _run_val_loop(self) -> None:
        """Validate without moving the RNG streams the training draws from."""
        with isolated_rng():
            self.runner.val_loop.run()


@LOOPS.register_module()
class ExactResumeIterBasedTrainLoop(_ExactResumeMixin, IterBasedTrainLoop):
    """``IterBasedTrainLoop`` that continues a resumed run exactly.

    Same arguments as the stock loop. On resume it restores every rank's RNG states after
    skipping the batches already trained; validation runs inside :func:`isolated_rng`.
    """

    def run(self) -> torch.nn.Module:
        """Launch training (the stock loop's steps, plus the RNG restore and isolation)."""
        self.runner.call_hook('before_train')
        # As in the stock loop, the whole run is one big epoch for the hooks.
        self.runner.call_hook('before_train_epoch')
        if self._iter > 0:
            print_log(
                f'Advance dataloader {self._iter} steps to skip data that has already '
                'been trained',
                logger='current',
                level=logging.WARNING)
            for _ in range(self._iter):
                next(self.dataloader_iterator)
            self._restore_rng_states()
        while self._iter < self._max_iters and not self.stop_training:
            self.runner.model.train()

            data_batch = next(self.dataloader_iterator)
            self.run_iter(data_batch)

            self._decide_current_val_interval()
            if (self.runner.val_loop is not None and self._iter >= self.val_begin
                    and (self._iter % self.val_interval == 0
                         or self._iter == self._max_iters)):
                self._run_val_loop()

        self.runner.call_hook('after_train_epoch')
        self.runner.call_hook('after_train')
        return self.runner.model


@LOOPS.register_module()
class ExactResumeEpochBasedTrainLoop(_ExactResumeMixin, EpochBasedTrainLoop):
    """``EpochBasedTrainLoop`` that continues a run resumed at an epoch boundary exactly.

    Same arguments as the stock loop. On resume it restores every rank's RNG states before
    the first epoch it runs; validation runs inside :func:`isolated_rng`. A checkpoint saved
    mid-epoch (an iteration-based ``CheckpointHook``) resumes as in mmengine: the epoch starts
    over, not exactly.
    """

    def run(self) -> torch.nn.Module:
        """Launch training (the stock loop's steps, plus the RNG restore and isolation)."""
        self.runner.call_hook('before_train')
        if self._iter != self._epoch * len(self.dataloader):
            print_log(
                f'Resumed at iteration {self._iter}, inside epoch {self._epoch + 1}: the '
                'epoch-based loop starts that epoch over, so training does not continue '
                'exactly (checkpoint by epoch for that).',
                logger='current',
                level=logging.WARNING)
        elif self._epoch > 0:
            self._restore_rng_states()

        while self._epoch < self._max_epochs and not self.stop_training:
            self.run_epoch()

            self._decide_current_val_interval()
            if (self.runner.val_loop is not None and self._epoch >= self.val_begin
                    and (self._epoch % self.val_interval == 0
                         or self._epoch == self._max_epochs)):
                self._run_val_loop()

        self.runner.call_hook('after_train')
        return self.runner.model


def _is_type(value, name: str, cls: type) -> bool:
    """Whether a config ``type`` names ``cls`` (by registry name or as the class)."""
    return value == name or value is cls


def exact_resume_cfg(cfg) -> None:
    """Swap a config's stock train loop and checkpoint hook for the exact-resume ones.

    Other (custom) types are kept, with a warning. ``train_cfg=dict(by_epoch=...)`` (no
    ``type``, as mmpose writes it) is handled too; a missing ``default_hooks.checkpoint``
    becomes ours with mmengine's default ``interval=1``.

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
        elif loop_type not in ('ExactResumeIterBasedTrainLoop',
                               'ExactResumeEpochBasedTrainLoop'):
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


@RUNNERS.register_module()
class ExactResumeRunner(Runner):
    """mmengine ``Runner`` with exact, crash-safe resume, for configs built with ``from_cfg``.

    It swaps the stock train loop for :class:`ExactResumeIterBasedTrainLoop` /
    :class:`ExactResumeEpochBasedTrainLoop` and the stock ``CheckpointHook`` for
    :class:`~mmpsa.engine.hooks.SafeCheckpointHook` (see :func:`exact_resume_cfg`), and makes
    an unreadable checkpoint fail with an error that names the file. Everything else is the
    stock runner.
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
        :class:`CheckpointReadError` that names the file when it cannot be read.

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


class CheckpointReadError(RuntimeError):
    """A checkpoint file that is missing, truncated or corrupt."""


def check_checkpoint_file(filename: str) -> None:
    """Cheaply check that a local checkpoint is complete, before a run is built on it.

    A checkpoint in torch's (zip) format ends with the archive's central directory: a file
    cut short by a killed save has none, which ``zipfile`` finds without reading the data.
    Corruption inside the data is found when the file is loaded (:func:`read_checkpoint`).
    Remote names (``http://``, ``open-mmlab://``, ``s3://`` ...) are left to mmengine.

    Args:
        filename: The checkpoint given to ``resume``/``load_from``.

    Raises:
        CheckpointReadError: If the file is missing, truncated or not a torch archive.
    """
    if '://' in str(filename):
        return
    if not os.path.isfile(filename):
        raise CheckpointReadError(f'checkpoint file {filename!r} does not exist')
    with open(filename, 'rb') as f:
        magic = f.read(4)
    if magic != b'PK\x03\x04':
        return  # torch's legacy (non-zip) format: only loading can tell
    try:
        with zipfile.ZipFile(filename) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        raise _unreadable(filename, err) from err
    if not any(name.endswith('/data.pkl') or name == 'data.pkl' for name in names):
        raise _unreadable(filename, ValueError('no data.pkl in the archive'))


def read_checkpoint(filename: str, map_location='cpu') -> dict:
    """mmengine's checkpoint loading, with an error naming the file if it cannot be read.

    Args:
        filename: Local path or URL.
        map_location: As in mmengine's ``_load_checkpoint``.

    Returns:
        The checkpoint dict.

    Raises:
        CheckpointReadError: If a local file is missing, truncated or corrupt.
    """
    check_checkpoint_file(filename)
    if '://' in str(filename):
        return _load_checkpoint(filename, map_location=map_location)
    try:
        return _load_checkpoint(filename, map_location=map_location)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError,
            KeyError, OSError) as err:
        raise _unreadable(filename, err) from err


def _unreadable(filename: str, err: BaseException) -> CheckpointReadError:
    """The error for a checkpoint file that exists but cannot be read."""
    text = str(err).strip()
    cause = text.splitlines()[0] if text else ''
    if len(cause) > 300:
        cause = cause[:300] + '...'
    message = (f'cannot read checkpoint {filename!r} ({os.path.getsize(filename)} bytes): '
               f'{type(err).__name__}: {cause}')
    if 'Unsupported global' in text:
        return CheckpointReadError(
            message + f' -- it holds objects that weights_only loading refuses ({text})')
    return CheckpointReadError(
        message + ' -- the file is truncated or corrupt; use an earlier checkpoint of the run '
        '(SafeCheckpointHook never leaves a partial file under a checkpoint name).')
