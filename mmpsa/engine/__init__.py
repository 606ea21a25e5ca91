"""Runtime pieces registered in mmengine's root registries: exact, crash-safe resume.

- :mod:`.loops`: train loops that restore every rank's RNG states on resume and isolate the
  RNG around validation, and :class:`ExactResumeRunner`, which puts them (and the hook) in
  place of the stock ones; ``configs/_base_/psa_runtime.py`` selects it.
- :mod:`.hooks`: :class:`SafeCheckpointHook`, write-then-rename checkpoints with RNG states.
"""
from .hooks import AtomicLocalBackend, SafeCheckpointHook  # noqa: F401  (registers)
from .loops import (CheckpointReadError, ExactResumeEpochBasedTrainLoop,  # noqa: F401
                    ExactResumeIterBasedTrainLoop, ExactResumeRunner, check_checkpoint_file,
                    read_checkpoint)
