"""Hooks that keep a run from going on silently wrong.

- :class:`PSACheckpointHook` writes the PSA settings of the model into every checkpoint's
  ``meta`` (:func:`mmpsa.checkpoint.psa_record`, plain data) and compares them when a
  checkpoint is loaded (:func:`mmpsa.checkpoint.check_psa_match`): a resume or a test with a
  checkpoint of another model fails with an error naming the file and both settings.
- :class:`SyncBuffersEveryIterHook` keeps every rank's buffers (BatchNorm running statistics)
  equal in multi-process training without SyncBN (the CPU fallback of
  :func:`mmpsa.apis.runner.prepare_distributed`), so that checkpoints, ``save_best`` and the
  validation on rank 0 see what the saved file gives.

Both work with the stock ``Runner`` and ``CheckpointHook`` (``tools/train.py`` and
``tools/test.py`` add them; the exact-resume runner adds the first).
"""
from collections import defaultdict
from typing import Dict, List, Optional

import torch
import torch.distributed as torch_dist
from mmengine.dist import get_world_size
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from mmengine.runner import find_latest_checkpoint
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..checkpoint import (LOAD_PURPOSES, PSA_RECORD_KEY, check_psa_match, keep_missing_psa,
                          psa_record)


def _unwrapped(runner) -> torch.nn.Module:
    """The runner's model without its DDP wrapper."""
    return runner.model.module if is_model_wrapper(runner.model) else runner.model


@HOOKS.register_module()
class PSACheckpointHook(Hook):
    """Record the model's PSA settings in each checkpoint; check them at every load.

    Args:
        purpose: What a loaded checkpoint is for: ``None`` (from the runner: ``'resume'``
            when it resumes, else ``'load_from'``, fine-tuning) or ``'test'``.
        allow_missing_psa: ``'test'``: a checkpoint without PSA weights is meant.
    """

    priority = 'VERY_HIGH'

    def __init__(self, purpose: Optional[str] = None, allow_missing_psa: bool = False) -> None:
        if purpose is not None and purpose not in LOAD_PURPOSES:
            raise ValueError(f'PSACheckpointHook: purpose must be None or one of '
                             f'{LOAD_PURPOSES}, got {purpose!r}')
        if not isinstance(allow_missing_psa, bool):
            raise ValueError(f'PSACheckpointHook: allow_missing_psa must be a bool, got '
                             f'{allow_missing_psa!r}')
        self.purpose = purpose
        self.allow_missing_psa = allow_missing_psa

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        """Put :func:`~mmpsa.checkpoint.psa_record` into ``checkpoint['meta']``.

        Args:
            runner: The runner.
            checkpoint: The checkpoint about to be written.
        """
        checkpoint.setdefault('meta', {})[PSA_RECORD_KEY] = psa_record(_unwrapped(runner))

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        """Compare the loaded checkpoint with the model before its weights go in.

        Args:
            runner: The runner.
            checkpoint: The loaded checkpoint.
        """
        resuming = bool(getattr(runner, '_resume', False))
        purpose = self.purpose or ('resume' if resuming else 'load_from')
        filename = getattr(runner, '_load_from', None)
        if filename is None and resuming:
            filename = find_latest_checkpoint(runner.work_dir)
        model = _unwrapped(runner)
        accepted = check_psa_match(
            checkpoint, model, str(filename), purpose, allow_missing_psa=self.allow_missing_psa)
        keep_missing_psa(checkpoint, model, accepted)


def sync_buffers(module: torch.nn.Module) -> None:
    """Make every rank's buffers equal: floating ones averaged, others rank 0's.

    Averaging commutes with BatchNorm's running-average update, so averaging after every
    iteration gives the statistics that averaging once at the end would (up to rounding),
    and every rank holds what a checkpoint saved now holds. One collective per dtype.

    Args:
        module: The model (wrapped or not); a no-op without a process group of 2 or more.
    """
    world_size = get_world_size()
    if world_size < 2:
        return
    groups: Dict[torch.dtype, List[torch.Tensor]] = defaultdict(list)
    for buffer in module.buffers():
        groups[buffer.dtype].append(buffer)
    for dtype, buffers in groups.items():
        flat = _flatten_dense_tensors([b.detach() for b in buffers])
        if dtype.is_floating_point or dtype.is_complex:
            torch_dist.all_reduce(flat)
            flat.div_(world_size)
        else:
            torch_dist.broadcast(flat, 0)
        with torch.no_grad():
            for buffer, value in zip(buffers, _unflatten_dense_tensors(flat, buffers)):
                buffer.copy_(value)


@HOOKS.register_module()
class SyncBuffersEveryIterHook(Hook):
    """Average every rank's buffers after each training iteration.

    mmengine's ``SyncBuffersHook`` syncs after a train epoch and before validation; an
    iteration-based ``CheckpointHook`` saves ``iter_N.pth`` before either (its priority is
    lower than this hook's, so it runs after it in ``after_train_iter``). Syncing at every
    iteration puts equal buffers into every checkpoint (interval, best, last) and every
    validation, for iteration- and epoch-based loops, and a resumed run starts from what the
    uninterrupted one had. Cost: one all-reduce of the buffers per iteration.
    """

    priority = 'NORMAL'

    def after_train_iter(self,
                         runner,
                         batch_idx: int,
                         data_batch=None,
                         outputs: Optional[dict] = None) -> None:
        """Average the buffers of every rank.

        Args:
            runner: The runner.
            batch_idx: Unused.
            data_batch: Unused.
            outputs: Unused.
        """
        sync_buffers(runner.model)
