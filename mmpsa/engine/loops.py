"""Train loops whose resumed continuation is exact.

mmengine 0.10.7 resumes weights, optimizer, schedulers and the iteration, but it saves no RNG
state: after a resume, random augmentations and dropout draw other numbers than the
uninterrupted run would have. Exact resume takes three pieces:

- :class:`~mmpsa.engine.hooks.SafeCheckpointHook` gathers the torch (and CUDA), numpy and
  python ``random`` states of every rank at each save and keeps them in the message hub's
  runtime info under :data:`~mmpsa.engine.rng.RNG_STATES_KEY`, which mmengine already saves
  and resumes;
- the loops here put each rank's states back at the moment the uninterrupted run would draw
  its next batch. The iteration-based loop does it *after* replaying the data pipeline to skip
  the batches already trained (the replay draws random numbers too, and it fetches the first
  new batch before any ``before_train_iter`` hook runs, so a hook would be too early); the
  epoch-based loop (mmpose) has no mid-epoch skip, so there exact resume is at epoch
  boundaries. Both run validation inside :func:`~mmpsa.engine.rng.isolated_rng`: a validation
  at the checkpoint draws from torch's RNG (``iter(val_dataloader)``, random test transforms)
  in the uninterrupted run but not in the resumed one;
- :class:`~mmpsa.engine.runner.ExactResumeRunner` swaps the stock
  ``IterBasedTrainLoop``/``EpochBasedTrainLoop`` and ``CheckpointHook`` of a config for these.
"""
import logging

import torch
from mmengine.dist import get_dist_info
from mmengine.logging import print_log
from mmengine.registry import LOOPS
from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop

from .rng import RNG_STATES_KEY, isolated_rng, set_rng_state


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
                    and (self._iter % self.val_interval == 0 or self._iter == self._max_iters)):
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
                    and (self._epoch % self.val_interval == 0 or self._epoch == self._max_epochs)):
                self._run_val_loop()

        self.runner.call_hook('after_train')
        return self.runner.model
