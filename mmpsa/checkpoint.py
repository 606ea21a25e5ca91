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
missing or truncated file cheaply, before a run is built on it; :func:`verify_checkpoint_file`
also checks every record of a zip checkpoint against its CRC (``torch.load`` does not: a
checkpoint with zeroed bytes inside a tensor loads silently).

What a checkpoint holds is written as plain data at save time: :func:`psa_record` (the PSA
settings of each PSA-bearing module, in ``meta['psa']``). :func:`check_psa_match` compares it
with the model a checkpoint is loaded into, falling back to keys and shapes for checkpoints
without it. A checkpoint's saved config text (``meta['cfg']``) is never parsed: mmengine's
``Config.fromstring`` executes it.
"""
import logging
import os
import pickle
import re
import zipfile
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from mmengine.logging import print_log
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.runner.checkpoint import _load_checkpoint

SafeGlobal = Union[Callable, Tuple[Callable, str]]
#: Key of :func:`psa_record` in a checkpoint's ``meta``.
PSA_RECORD_KEY = 'psa'
#: What :func:`check_psa_match` is checking for.
LOAD_PURPOSES = ('resume', 'test', 'load_from')
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


class CheckpointMismatchError(CheckpointReadError):
    """A checkpoint whose model is not the one the config builds."""


def _is_remote(filename: str) -> bool:
    """Names that mmengine fetches (``http://``, ``open-mmlab://``, ``s3://`` ...)."""
    return '://' in str(filename)


def _is_zip(filename: str) -> bool:
    """Whether a local file starts as a zip archive (torch's format since 1.6)."""
    with open(filename, 'rb') as f:
        return f.read(4) == b'PK\x03\x04'


def check_checkpoint_file(filename: str) -> None:
    """Cheaply check that a local checkpoint is complete, before a run is built on it.

    A checkpoint in torch's (zip) format ends with the archive's central directory: a file
    cut short by a killed save has none, which ``zipfile`` finds without reading the data.
    Corruption inside the data is found by :func:`verify_checkpoint_file`.
    Remote names (``http://``, ``open-mmlab://``, ``s3://`` ...) are left to mmengine.

    Args:
        filename: The checkpoint given to ``resume``/``load_from``.

    Raises:
        CheckpointReadError: If the file is missing, truncated or not a torch archive.
    """
    if _is_remote(filename):
        return
    if not os.path.isfile(filename):
        raise CheckpointReadError(f'checkpoint file {filename!r} does not exist')
    if not _is_zip(filename):
        return  # torch's legacy (non-zip) format: only loading can tell
    try:
        with zipfile.ZipFile(filename) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        raise _unreadable(filename, err) from err
    if not any(name.endswith('/data.pkl') or name == 'data.pkl' for name in names):
        raise _unreadable(filename, ValueError('no data.pkl in the archive'))


# (absolute path, size, mtime_ns) of files whose CRCs were checked in this process.
_VERIFIED: set = set()


def verify_checkpoint_file(filename: str) -> None:
    """Check a local checkpoint completely: complete archive, every record's CRC.

    torch's zip format stores a CRC-32 per record (one per tensor storage, plus the pickle)
    and ``torch.load`` does not check it. Reading every record costs about as much as reading
    the file (0.24 s for 300 MB here, the load itself 0.25-0.36 s). A file already checked in
    this process (same path, size and modification time) is not read twice. Legacy (non-zip)
    checkpoints and remote names carry or reach no CRC: they are left to the loader.

    Args:
        filename: The checkpoint.

    Raises:
        CheckpointReadError: If the file is missing, truncated, or a record fails its CRC
            (the message names the file and the record).
    """
    check_checkpoint_file(filename)
    if _is_remote(filename) or not _is_zip(filename):
        return
    stat = os.stat(filename)
    key = (os.path.abspath(filename), stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:
        return
    try:
        with zipfile.ZipFile(filename) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:  # zlib.error is OSError
        raise _unreadable(filename, err) from err
    if bad is not None:
        raise _unreadable(filename, ValueError(f'record {bad!r} fails its CRC check'))
    _VERIFIED.add(key)


def read_checkpoint(filename: str, map_location='cpu') -> dict:
    """mmengine's checkpoint loading, with an error naming the file if it cannot be read.

    Args:
        filename: Local path or URL.
        map_location: As in mmengine's ``_load_checkpoint``.

    Returns:
        The checkpoint dict.

    Raises:
        CheckpointReadError: If a local file is missing, truncated or corrupt (its CRCs are
            checked, :func:`verify_checkpoint_file`).
    """
    verify_checkpoint_file(filename)
    if _is_remote(filename):
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


def psa_record(model: torch.nn.Module) -> Dict[str, Dict[str, Any]]:
    """The PSA settings of a model, as plain data for a checkpoint's ``meta``.

    One entry per PSA-bearing module path: a backbone built with ``psa=dict(...)`` gives
    ``dict(variant, mode, stages, blocks)`` (``stages`` with the defaults filled in); a block
    outside such a backbone (a head's, a neck's) gives ``dict(variant, mode, in_channels)``
    under its own path. A model without PSA gives ``{}``. The evaluation path (``fused``)
    is not part of the model and is not recorded.

    Args:
        model: The model (not wrapped).

    Returns:
        ``{module path: settings}``.
    """
    from .insertion import parse_psa_cfg, residual_stages
    from .layers import PolarizedSelfAttention
    owners = [
        name for name, module in model.named_modules()
        if getattr(module, 'psa_cfg', None) is not None
    ]
    modules = dict(model.named_modules())
    record: Dict[str, Dict[str, Any]] = {}
    for name, block in modules.items():
        if not isinstance(block, PolarizedSelfAttention):
            continue
        owner = next((o for o in owners if o == '' or name.startswith(o + '.')), None)
        if owner is None:
            record[name] = dict(
                variant=block.variant, mode=block.mode, in_channels=block.in_channels)
            continue
        if owner not in record:
            backbone = modules[owner]
            stages = parse_psa_cfg(backbone.psa_cfg, len(residual_stages(backbone)),
                                   type(backbone).__name__)['stages']
            record[owner] = dict(
                variant=block.variant, mode=block.mode, stages=list(stages), blocks=0)
        record[owner]['blocks'] += 1
    return record


def _describe(settings: Optional[Dict[str, Any]]) -> str:
    """One module's record entry as text."""
    if settings is None:
        return 'no PSA'
    return ', '.join(f'{key}={value!r}' for key, value in settings.items())


def _record_diff(saved: Dict[str, Any], current: Dict[str, Any], limit: int = 6) -> List[str]:
    """Lines naming each module whose PSA settings differ."""
    lines = [
        f'  {path or "(model)"}: checkpoint {_describe(saved.get(path))}; '
        f'config {_describe(current.get(path))}' for path in sorted(set(saved) | set(current))
        if saved.get(path) != current.get(path)
    ]
    if len(lines) > limit:
        lines = lines[:limit] + [f'  ... and {len(lines) - limit} more modules']
    return lines


def _key_list(keys: List[str], limit: int = 5) -> str:
    """Some keys, and how many more."""
    keys = sorted(keys)
    more = f' ... and {len(keys) - limit} more' if len(keys) > limit else ''
    return ', '.join(keys[:limit]) + more


def _strip_prefix(state: Dict[str, Any]) -> Dict[str, Any]:
    """Keys as the unwrapped model names them (mmengine strips ``module.`` the same way)."""
    return {re.sub(r'^module\.', '', key): value for key, value in state.items()}


def check_psa_match(checkpoint: dict,
                    model: torch.nn.Module,
                    filename: str,
                    purpose: str,
                    allow_missing_psa: bool = False) -> List[str]:
    """Refuse (or, for fine-tuning, report) a checkpoint whose model is not the config's.

    The checkpoint's :func:`psa_record` (``meta['psa']``) is compared with the model's; a
    checkpoint without one (written before it existed, or by another tool) is compared by
    state_dict keys and shapes, which cannot tell the paper variant's parallel from its
    sequential mode. Purposes:

    - ``'resume'``: any difference is an error (the run would go on with another model, or
      fail later in the optimizer's state).
    - ``'test'``: a PSA difference is an error; a checkpoint without PSA weights (stock) is
      one too unless ``allow_missing_psa``, then a warning.
    - ``'load_from'`` (fine-tuning): never an error; PSA blocks the checkpoint has no weights
      for are listed once, and differing PSA settings are a warning.

    Args:
        checkpoint: The loaded checkpoint dict.
        model: The model it is loaded into (not wrapped).
        filename: The checkpoint's name, for messages.
        purpose: One of :data:`LOAD_PURPOSES`.
        allow_missing_psa: ``'test'`` only: a stock checkpoint is meant.

    Returns:
        The model's PSA state_dict keys that the checkpoint lacks and that are accepted
        (fine-tuning, or a test with ``allow_missing_psa``); :func:`keep_missing_psa` fills
        them in so that mmengine's loader does not list them again.

    Raises:
        CheckpointMismatchError: As above, naming the file and both settings.
        ValueError: For an unknown ``purpose``.
    """
    if purpose not in LOAD_PURPOSES:
        raise ValueError(f'purpose must be one of {LOAD_PURPOSES}, got {purpose!r}')
    from .layers import PolarizedSelfAttention
    current = psa_record(model)
    saved = (checkpoint.get('meta') or {}).get(PSA_RECORD_KEY)
    state = _strip_prefix(checkpoint.get('state_dict', checkpoint))
    model_state = model.state_dict()
    blocks = [
        name for name, module in model.named_modules() if isinstance(module, PolarizedSelfAttention)
    ]
    psa_keys = {key for key in model_state if any(key.startswith(b + '.') for b in blocks)}
    missing = set(model_state) - set(state)
    unexpected = set(state) - set(model_state)
    reshaped = [
        key for key in set(model_state) & set(state)
        if getattr(state[key], 'shape', None) != model_state[key].shape
    ]
    stock = bool(blocks) and psa_keys <= missing and (saved is None or saved == {})
    head = f'{purpose}: checkpoint {filename!r}'

    if purpose == 'load_from':
        without = [b for b in blocks if any(k.startswith(b + '.') for k in missing & psa_keys)]
        if without:
            print_log(
                f'{head} has no weights for {len(without)} of the {len(blocks)} PSA blocks '
                f'of this model; they keep their initialisation: {", ".join(without)}',
                logger='current',
                level=logging.WARNING)
        if saved is not None and saved != {} and saved != current:
            print_log(
                f'{head} was trained with other PSA settings (fine-tuning goes on):\n' +
                '\n'.join(_record_diff(saved, current)),
                logger='current',
                level=logging.WARNING)
        return sorted(missing & psa_keys)

    if stock and purpose == 'test' and allow_missing_psa:
        print_log(
            f'{head} has no PSA weights: the {len(blocks)} PSA blocks of this model are '
            'tested at their initialisation (--allow-missing-psa).',
            logger='current',
            level=logging.WARNING)
        return sorted(missing & psa_keys)
    problems: List[str] = []
    if saved is not None:
        problems = _record_diff(saved, current)
    else:
        unexpected_psa = [key for key in unexpected if '.psa.' in f'.{key}']
        if reshaped:
            problems.append(f'  tensors of other shapes: {_key_list(reshaped)}')
        if missing & psa_keys or unexpected_psa:
            problems.append('  PSA tensors: '
                            f'{len(missing & psa_keys)} of the config\'s missing from the '
                            f'checkpoint ({_key_list(list(missing & psa_keys))}); '
                            f'{len(unexpected_psa)} in the checkpoint that the config '
                            f'lacks ({_key_list(unexpected_psa)})')
        if purpose == 'resume' and (missing - psa_keys or set(unexpected) - set(unexpected_psa)):
            problems.append(f'  other keys: missing {_key_list(list(missing - psa_keys))}; '
                            f'unexpected {_key_list(list(set(unexpected) - set(unexpected_psa)))}')
    if not problems:
        return []
    source = ('its PSA record (meta[\'psa\'])'
              if saved is not None else 'its state_dict keys and shapes (no PSA record)')
    hint = ''
    if stock and purpose == 'test':
        hint = ('\nIt holds no PSA weights (a stock checkpoint?): to test the PSA blocks at '
                'their initialisation on purpose, pass --allow-missing-psa.')
    elif purpose == 'resume':
        hint = ('\nResume from a checkpoint of this config, or start a new run with '
                'load_from=... to fine-tune from it.')
    raise CheckpointMismatchError(
        f'{head} does not hold the model this config builds, by {source}:\n' + '\n'.join(problems) +
        hint)


def keep_missing_psa(checkpoint: dict, model: torch.nn.Module, keys: List[str]) -> None:
    """Put the model's own values of ``keys`` into the checkpoint's state_dict.

    Loading then leaves those tensors as they are (their initialisation), and mmengine's
    list of missing keys does not repeat what :func:`check_psa_match` has already listed.

    Args:
        checkpoint: The loaded checkpoint dict; changed in place.
        model: The model it is loaded into (not wrapped).
        keys: State_dict keys of ``model``.
    """
    state = checkpoint['state_dict'] if 'state_dict' in checkpoint else checkpoint
    model_state = model.state_dict()
    for key in keys:
        state[key] = model_state[key]


register_safe_globals()
