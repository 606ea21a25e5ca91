"""Safe reading of mmengine checkpoints: the ``weights_only`` allow-list, errors naming the file.

torch >= 2.6 loads with ``weights_only=True``; the checkpoints that mmengine's Runner
writes (for mmseg and mmpose alike) carry a few non-tensor globals in their
``message_hub`` and ``meta``: ``HistoryBuffer``, numpy arrays, scalars and dtypes, and
``getattr(HistoryBuffer, 'min')``-style references to its statistics methods. Without
them ``resume=True`` fails with ``UnpicklingError ... Unsupported global``.

Rather than turning ``weights_only`` off (which lets a checkpoint run code), importing
:mod:`mmpsa` adds exactly these globals to torch's allow-list. ``builtins.getattr`` is
never allowed itself: its name is bound to :func:`history_buffer_getattr`, which
resolves only ``HistoryBuffer``'s registered statistics methods and refuses anything
else, so a pickle cannot reach ``os.system`` or similar through it.

Reading a checkpoint file goes through :func:`read_checkpoint` (mmengine's loading, behind the
exact-resume runner's ``resume``/``load_from``): a missing, truncated or corrupt file fails
with a :class:`CheckpointReadError` that names it. :func:`check_checkpoint_file` finds a
missing or truncated file cheaply, before a run is built on it.
"""
import os
import pickle
import zipfile
from typing import Any, Callable, List, Tuple, Union

import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.runner.checkpoint import _load_checkpoint

SafeGlobal = Union[Callable, Tuple[Callable, str]]
# HistoryBuffer's built-in statistics (its ``_statistics_methods`` fills lazily).
STATISTICS_METHODS = frozenset({'min', 'max', 'mean', 'current'})


def history_buffer_getattr(obj: Any, name: str) -> Callable:
    """Stand-in for ``builtins.getattr`` while unpickling a checkpoint.

    mmengine pickles ``HistoryBuffer._statistics_methods`` as
    ``getattr(HistoryBuffer, 'min')`` etc. Only that form is resolved.

    Args:
        obj: The object the pickle asks an attribute of; must be ``HistoryBuffer``.
        name: The attribute; must be a registered statistics method name.

    Returns:
        The statistics method (a plain function, called later only on buffers).
    """
    allowed = STATISTICS_METHODS | set(HistoryBuffer._statistics_methods)
    if obj is not HistoryBuffer or not isinstance(name, str) or name not in allowed \
            or not callable(getattr(HistoryBuffer, name, None)):
        raise pickle.UnpicklingError(
            f'mmpsa checkpoint allow-list: getattr({obj!r}, {name!r}) refused; only '
            f'getattr(HistoryBuffer, m) for m in {sorted(allowed)} is allowed in a '
            'checkpoint')
    return getattr(HistoryBuffer, name)


def _numpy_globals() -> List[SafeGlobal]:
    """numpy's array/scalar/dtype reconstruction globals under both module names."""
    from numpy.core import multiarray
    items: List[SafeGlobal] = [np.ndarray, np.dtype]
    # numpy 1.x pickles say ``numpy.core.multiarray``, numpy 2.x ``numpy._core``.
    for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        items.append((multiarray._reconstruct, f'{module}._reconstruct'))
        items.append((multiarray.scalar, f'{module}.scalar'))
    # Metadata such as mmpose's ``dataset_meta`` holds arrays whose dtype pickles as
    # its dtype class (``numpy.dtypes.UInt8DType``). Allow the plain-data kinds only.
    data_kinds = 'biufcSUmM'  # bool, ints, floats, complex, bytes, str, time
    for name in dir(np.dtypes):
        cls = getattr(np.dtypes, name)
        if (isinstance(cls, type) and issubclass(cls, np.dtype) and cls is not np.dtype
                and getattr(cls, 'type', None) is not None
                and np.dtype(cls.type).kind in data_kinds):
            items.append(cls)
    return list(dict.fromkeys(items))  # aliases (Byte/Int8) name one class


def safe_globals() -> List[SafeGlobal]:
    """The globals mmpsa adds to torch's ``weights_only`` allow-list.

    Returns:
        A list in ``torch.serialization.add_safe_globals`` form.
    """
    return [HistoryBuffer, (history_buffer_getattr, 'builtins.getattr')] + _numpy_globals()


def register_safe_globals() -> None:
    """Add :func:`safe_globals` to torch's allow-list (idempotent)."""
    torch.serialization.add_safe_globals(safe_globals())


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
    if 'unsupported global' in text.lower():  # torch: 'Unsupported global' / 'unsupported GLOBAL'
        return CheckpointReadError(
            message + f' -- it holds objects that weights_only loading refuses ({text})')
    return CheckpointReadError(
        message + ' -- the file is truncated or corrupt; use an earlier checkpoint of the run '
        '(SafeCheckpointHook never leaves a partial file under a checkpoint name).')


register_safe_globals()
