"""The one atomic writer: write to a temporary file beside the target, fsync, rename."""
import io
import os
import os.path as osp
from contextlib import suppress

import torch


def atomic_write(data: bytes, filepath: str) -> None:
    """Write ``data`` to a temporary file beside ``filepath``, then rename it into place.

    A reader (or a resumed run) sees either the old file or the complete new one, never a
    part of it, whenever the writing process dies. The data and the rename are fsynced. The
    file gets the permissions a plain ``open()`` would give.

    Args:
        data: The bytes to write.
        filepath: The final local path; its folder is created if needed.
    """
    filepath = osp.abspath(filepath)
    folder = osp.dirname(filepath)
    os.makedirs(folder, exist_ok=True)
    tmp = osp.join(folder, f'.{osp.basename(filepath)}.{os.getpid()}.tmp')
    try:
        with open(tmp, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, filepath)
    except BaseException:
        with suppress(OSError):
            os.remove(tmp)
        raise
    # Make the rename itself durable (a no-op where directories cannot be opened).
    with suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint_atomically(obj, filepath: str) -> None:
    """``torch.save(obj)`` through :func:`atomic_write`."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(buffer.getvalue(), filepath)
