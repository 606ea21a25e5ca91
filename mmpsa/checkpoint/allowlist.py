"""What a checkpoint's pickle may name: torch's weights-only set plus mmpsa's list.

mmengine's Runner checkpoints (mmseg and mmpose alike) carry a few non-tensor globals in their
``message_hub`` and ``meta``: ``HistoryBuffer``, numpy arrays, scalars and dtypes, and
``getattr(HistoryBuffer, 'min')``-style references to its statistics methods.
:func:`safe_globals` lists exactly these. ``builtins.getattr`` is never allowed itself: its
name is bound to :func:`history_buffer_getattr`, which resolves only ``HistoryBuffer``'s
statistics methods, so a pickle cannot reach ``os.system`` or similar through it.

Two ways to enforce the list, chosen per load by :mod:`mmpsa.checkpoint.door`:

- torch >= 2.4 (``torch.serialization.add_safe_globals``, :mod:`mmpsa.compat`): torch's
  weights-only unpickler, with :func:`safe_globals` added at import;
- older torch: :data:`RESTRICTED_PICKLE`, a pickle module for ``torch.load(pickle_module=...,
  weights_only=False)`` whose unpickler resolves exactly :func:`allowed_globals` (torch's
  weights-only set and :func:`safe_globals`) and, as torch's own, calls, instantiates and
  builds only those.
"""
import codecs
import pickle
import types
from typing import Any, Callable, Dict, List, Tuple, Union

import _compat_pickle
import numpy as np
from mmengine.logging.history_buffer import HistoryBuffer

from .. import compat

SafeGlobal = Union[Callable, Tuple[Callable, str]]
# HistoryBuffer's built-in statistics (its ``_statistics_methods`` fills lazily).
STATISTICS_METHODS = frozenset({'min', 'max', 'mean', 'current'})


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A pickle that names a global outside the allow-list, or uses one in a way it refuses."""


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
        raise UnsafeCheckpointError(
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
    """The globals mmpsa adds to torch's weights-only set.

    Returns:
        A list in ``torch.serialization.add_safe_globals`` form.
    """
    # ``_codecs.encode``: numpy arrays pickled with protocol 2 (mmengine's) store their bytes
    # as ``_codecs.encode(text, 'latin1')``. torch's own weights-only set carries it on newer
    # torch (2.14 does), torch 2.1's does not: mmpsa's list carries it (the same object).
    return [
        HistoryBuffer, (history_buffer_getattr, 'builtins.getattr'),
        (codecs.encode, '_codecs.encode')
    ] + _numpy_globals()


def register_safe_globals() -> bool:
    """Add :func:`safe_globals` to torch's allow-list where torch has one (idempotent).

    Returns:
        Whether torch took them (False before torch 2.4: :data:`RESTRICTED_PICKLE` is used).
    """
    return compat.add_safe_globals(safe_globals())


def _torch_weights_only_globals() -> Dict[str, Any]:
    """torch's own weights-only set (``torch._weights_only_unpickler``, torch >= 1.13)."""
    from torch import _weights_only_unpickler
    return dict(_weights_only_unpickler._get_allowed_globals())


def allowed_globals() -> Dict[str, Any]:
    """``'module.name'`` -> object: everything a checkpoint's pickle may name.

    Exactly torch's weights-only set plus :func:`safe_globals`; nothing of torch's
    process-wide ``add_safe_globals`` list that others added.
    """
    allowed = _torch_weights_only_globals()
    for item in safe_globals():
        if isinstance(item, tuple):
            allowed[item[1]] = item[0]
        else:
            allowed[f'{item.__module__}.{item.__qualname__}'] = item
    return allowed


def _refuse(what: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f'{what}, which is not on the allow-list (torch\'s weights-only set plus mmpsa\'s '
        'mmengine/numpy globals, mmpsa.checkpoint.allowlist)')


class RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """An unpickler that resolves, calls, instantiates and builds only allowed globals.

    The pure-Python unpickler, so that the opcodes that call objects can be checked as
    torch's weights-only unpickler checks them; a checkpoint's pickle is small (the tensors
    are separate records), so its speed does not matter.
    """

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._allowed = allowed_globals()
        self._ids = {id(value) for value in self._allowed.values()}

    def _is_allowed(self, obj: Any) -> bool:
        return id(obj) in self._ids

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3 and self.fix_imports:  # Python 2 names, as pickle maps them
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        full = f'{module}.{name}'
        if full not in self._allowed:
            raise _refuse(f'names the global {full}')
        return self._allowed[full]

    def load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if not self._is_allowed(func):
            raise _refuse(f'calls {func!r}')
        self.stack[-1] = func(*args)

    dispatch[pickle.REDUCE[0]] = load_reduce

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        if not self._is_allowed(cls):
            raise _refuse(f'instantiates {cls!r}')
        self.append(cls.__new__(cls, *args))

    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_build(self) -> None:
        inst = self.stack[-2]  # under the state
        if isinstance(inst, type) or not self._is_allowed(type(inst)):
            raise _refuse(f'sets the state of {inst!r}')
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build

    def _refused_opcode(self) -> None:
        raise _refuse('uses an opcode that calls objects by other means '
                      '(INST/OBJ/NEWOBJ_EX/EXT)')

    for _op in (pickle.INST, pickle.OBJ, pickle.NEWOBJ_EX, pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_op[0]] = _refused_opcode
    del _op


def _restricted_load(file, **kwargs) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


def _restricted_loads(data: bytes, **kwargs) -> Any:
    import io
    return RestrictedUnpickler(io.BytesIO(data), **kwargs).load()


#: A pickle module for ``torch.load(pickle_module=...)``: torch subclasses its ``Unpickler``.
RESTRICTED_PICKLE = types.ModuleType('mmpsa_restricted_pickle')
RESTRICTED_PICKLE.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
RESTRICTED_PICKLE.load = _restricted_load  # type: ignore[attr-defined]
RESTRICTED_PICKLE.loads = _restricted_loads  # type: ignore[attr-defined]
RESTRICTED_PICKLE.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]
RESTRICTED_PICKLE.__version__ = pickle.format_version  # type: ignore[attr-defined]
