"""A ``CheckpointHook`` whose checkpoints resume exactly and survive a crash at any moment.

mmengine 0.10.7's ``CheckpointHook`` deletes the oldest checkpoint (and, with ``save_best``,
the previous best) *before* writing the new one, writes the checkpoint in place
(``LocalBackend.put`` opens the final name with ``'wb'``) and writes ``last_checkpoint`` with
a plain ``open()``: a process killed at the wrong moment leaves a truncated checkpoint, a
``last_checkpoint`` naming nothing, or no good checkpoint at all. :class:`SafeCheckpointHook`
keeps the stock arguments and behaviour, and

- writes every file to a temporary name in the same folder, then ``os.replace()``s it into
  place (atomic on POSIX): the checkpoints through the :class:`AtomicLocalBackend` storage
  backend (registered in mmengine's fileio as ``'mmpsa_atomic_local'``, so the writes inside
  ``Runner.save_checkpoint`` go through it too), ``last_checkpoint`` directly;
- deletes old checkpoints and the previous best only after the new file is in place;
- gathers the torch, numpy and python RNG states of every rank (:mod:`mmpsa.engine.rng`) at
  each save into the message hub (``Runner.save_checkpoint`` runs on rank 0 only), for the
  exact-resume loops of :mod:`mmpsa.engine.loops` to restore.
"""
import logging
import os
import os.path as osp
import re
from contextlib import suppress
from typing import Any, Dict, List

from mmengine.dist import all_gather_object, is_main_process
from mmengine.fileio import LocalBackend, register_backend
from mmengine.hooks import CheckpointHook
from mmengine.logging import print_log
from mmengine.registry import HOOKS

from ..checkpoint.atomic import atomic_write
from .rng import RNG_STATES_KEY, get_rng_state

#: Name of :class:`AtomicLocalBackend` in mmengine's fileio backends.
ATOMIC_BACKEND = 'mmpsa_atomic_local'

# Temporary names: ``.<final name>.<pid>.tmp`` beside the final file.
_TMP_PATTERN = re.compile(r'^\..+\.\d+\.tmp$')


@register_backend(ATOMIC_BACKEND, force=True)
class AtomicLocalBackend(LocalBackend):
    """mmengine's ``LocalBackend`` whose writes are write-then-rename (:func:`atomic_write`)."""

    def put(self, obj: bytes, filepath) -> None:
        """Write bytes to ``filepath`` atomically.

        Args:
            obj: The bytes.
            filepath: The local path.
        """
        atomic_write(obj, str(filepath))

    def put_text(self, obj: str, filepath, encoding: str = 'utf-8') -> None:
        """Write text to ``filepath`` atomically.

        Args:
            obj: The text.
            filepath: The local path.
            encoding: The text encoding.
        """
        atomic_write(obj.encode(encoding), str(filepath))


class _DeferredRemovals:
    """A file backend stand-in that records ``remove``/``rmtree`` instead of doing them."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend
        self.paths: List[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def remove(self, filepath) -> None:
        self.paths.append(str(filepath))

    def rmtree(self, dir_path) -> None:
        self.paths.append(str(dir_path))


@HOOKS.register_module()
class SafeCheckpointHook(CheckpointHook):
    """``CheckpointHook`` with crash-safe saves and every rank's RNG states in each checkpoint.

    Takes the stock hook's arguments. With a local ``out_dir`` (and no other storage
    backend chosen), files are written under a temporary name and renamed into place; with
    remote storage they are written as that backend does. Old checkpoints and the previous
    best are deleted only after the new file is in place.
    """

    def before_train(self, runner) -> None:
        """Pick the write-then-rename backend for a local ``out_dir``, then as the stock hook.

        Args:
            runner: The runner.
        """
        out_dir = self.out_dir if self.out_dir is not None else runner.work_dir
        backend = (self.backend_args or {}).get('backend', 'local')
        other_args = set(self.backend_args or {}) - {'backend'}
        if (self.file_client_args is None and '://' not in str(out_dir) and not other_args
                and backend in ('local', ATOMIC_BACKEND)):
            self.backend_args = dict(backend=ATOMIC_BACKEND)
        else:
            print_log(
                f'SafeCheckpointHook: checkpoints go to {out_dir!r} through the storage '
                f'backend {backend!r}, which writes them as it does (no write-then-rename).',
                logger='current',
                level=logging.WARNING)
        super().before_train(runner)
        self._training = True
        if is_main_process() and '://' not in str(self.out_dir) and osp.isdir(self.out_dir):
            # Temporary files of saves killed midway in an earlier run of this work dir.
            for name in os.listdir(self.out_dir):
                if _TMP_PATTERN.match(name):
                    with suppress(OSError):
                        os.remove(osp.join(self.out_dir, name))

    def after_train(self, runner) -> None:
        """As the stock hook (publishing), and stop capturing RNG states at validations.

        Args:
            runner: The runner.
        """
        self._training = False
        super().after_train(runner)

    def before_val(self, runner) -> None:
        """Keep the RNG states before a validation during training, when ``save_best`` may
        save at its step.

        Validation draws random numbers (the exact-resume loops undo that afterwards): a
        checkpoint saved from inside it must carry the states from before it.

        Args:
            runner: The runner.
        """
        if self.save_best and getattr(self, '_training', False):
            self._store_rng_states(runner, runner.epoch, runner.iter)

    def _store_rng_states(self, runner, epoch: int, iteration: int) -> None:
        """Gather every rank's RNG states into the message hub (a collective call).

        Args:
            runner: The runner.
            epoch: The epoch counter a run resumed from this checkpoint starts at.
            iteration: Its iteration counter.
        """
        states = all_gather_object(get_rng_state())
        runner.message_hub.update_info(RNG_STATES_KEY,
                                       dict(epoch=epoch, iter=iteration, states=states))

    def _save_checkpoint_with_step(self, runner, step: int, meta: Dict[str, int]) -> None:
        """Save the checkpoint of ``step``, then ``last_checkpoint``, then delete the oldest.

        Args:
            runner: The runner.
            step: The epoch or iteration number in the file name.
            meta: ``dict(epoch=..., iter=...)``: the counters a resumed run starts at.
        """
        stored = runner.message_hub.get_info(RNG_STATES_KEY)
        if stored is None or (stored['epoch'], stored['iter']) != (meta['epoch'], meta['iter']):
            self._store_rng_states(runner, meta['epoch'], meta['iter'])

        stale_steps = []
        if self.max_keep_ckpts > 0 and not (self.keep_ckpt_ids and self.keep_ckpt_ids[-1] == step):
            if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
                stale_steps.append(self.keep_ckpt_ids.popleft())
            self.keep_ckpt_ids.append(step)
            runner.message_hub.update_info('keep_ckpt_ids', list(self.keep_ckpt_ids))

        ckpt_filename = self.filename_tmpl.format(step)
        self.last_ckpt = self.file_backend.join_path(self.out_dir, ckpt_filename)
        runner.message_hub.update_info('last_ckpt', self.last_ckpt)
        runner.save_checkpoint(
            self.out_dir,
            ckpt_filename,
            self.file_client_args,
            save_optimizer=self.save_optimizer,
            save_param_scheduler=self.save_param_scheduler,
            meta=meta,
            by_epoch=self.by_epoch,
            backend_args=self.backend_args,
            **self.args)
        if not is_main_process():
            return
        atomic_write(str(self.last_ckpt).encode(), osp.join(runner.work_dir, 'last_checkpoint'))
        for stale in stale_steps:
            self._remove(
                self.file_backend.join_path(self.out_dir, self.filename_tmpl.format(stale)))

    def _save_best_checkpoint(self, runner, metrics: dict) -> None:
        """As the stock hook, but the previous best is deleted after the new one is saved.

        Args:
            runner: The runner.
            metrics: The validation metrics.
        """
        backend = self.file_backend
        deferred = _DeferredRemovals(backend)
        self.file_backend = deferred
        try:
            super()._save_best_checkpoint(runner, metrics)
        finally:
            self.file_backend = backend
        in_use = {
            self.last_ckpt,
            getattr(self, 'best_ckpt_path', None),
            *getattr(self, 'best_ckpt_path_dict', {}).values()
        }
        for path in deferred.paths:
            if path not in in_use:
                self._remove(path)

    def _remove(self, path: str) -> None:
        """Delete a checkpoint file (or a DeepSpeed checkpoint folder) if it exists."""
        if self.file_backend.isfile(path):
            self.file_backend.remove(path)
        elif self.file_backend.isdir(path):
            self.file_backend.rmtree(path)
