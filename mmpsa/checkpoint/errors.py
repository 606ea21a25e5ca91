"""The errors of :mod:`mmpsa.checkpoint`; each message names the file and what was found."""


class CheckpointReadError(RuntimeError):
    """A checkpoint that cannot be read: missing, truncated, corrupt, or refused."""


class CheckpointMismatchError(CheckpointReadError):
    """A checkpoint whose model is not the one the config builds."""


class UnsafeCheckpointReadError(CheckpointReadError):
    """A checkpoint whose pickle names (or calls) something outside the allow-list."""
