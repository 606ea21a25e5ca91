"""Runtime pieces registered in mmengine's root registries: exact, crash-safe resume.

- :mod:`.rng`: the snapshot of every rank's RNG states that a checkpoint carries.
- :mod:`.loops`: train loops that restore those states on resume and isolate the RNG around
  validation.
- :mod:`.hooks`: :class:`SafeCheckpointHook`, write-then-rename checkpoints with RNG states.
- :mod:`.consistency`: :class:`PSACheckpointHook` (the PSA record written with each
  checkpoint and checked at each load) and :class:`SyncBuffersEveryIterHook` (equal buffers on
  every rank without SyncBN).
- :mod:`.runner`: :class:`ExactResumeRunner`, which puts the loops and the hook in place of
  the stock ones; ``configs/_base_/psa_runtime.py`` selects it as
  ``runner_type='mmpsa.engine.ExactResumeRunner'``.
"""
from ..checkpoint import CheckpointReadError  # noqa: F401  (raised by ExactResumeRunner)
from .consistency import PSACheckpointHook, SyncBuffersEveryIterHook  # noqa: F401
from .hooks import AtomicLocalBackend, SafeCheckpointHook  # noqa: F401  (registers)
from .loops import ExactResumeEpochBasedTrainLoop, ExactResumeIterBasedTrainLoop  # noqa: F401
from .runner import ExactResumeRunner  # noqa: F401
