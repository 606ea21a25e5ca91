"""Safe loading of mmengine checkpoints with ``torch.load(weights_only=True)``.

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
"""
import pickle
from typing import Any, Callable, List, Tuple, Union

import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer

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


register_safe_globals()
