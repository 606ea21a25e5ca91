"""The one door for reading a checkpoint: fetch, CRCs, an allow-listed unpickling.

:func:`read_checkpoint` is the only place in mmpsa that unpickles a checkpoint
(``torch.load``, in :func:`_torch_load`). It

1. fetches a URL first (``http(s)://``, ``open-mmlab://``, ``torchvision://``, ``mmcls://``)
   into torch's hub cache, where mmengine's and torch's own loaders keep it, and then treats
   the file as a local one (:func:`fetch_checkpoint`);
2. checks the file: present, a complete archive, every record against its CRC
   (:func:`verify_checkpoint_file`; ``torch.load`` checks none);
3. unpickles with an explicit allow-list (:mod:`mmpsa.checkpoint.allowlist`) on every torch:
   torch's weights-only unpickler with mmpsa's globals added where torch has
   ``add_safe_globals`` (:mod:`mmpsa.compat`), else a restricted unpickler passed as
   ``pickle_module=`` — never torch's default, which before torch 2.6 (and in
   ``torch.hub.load_state_dict_from_url`` on any torch) runs whatever the pickle says.

mmengine reads ``load_from``, ``resume`` and ``pretrained=``/``init_cfg=dict(type='Pretrained')``
through its ``CheckpointLoader`` schemes: importing mmpsa registers a loader for the local,
``http(s)://``, ``open-mmlab://``, ``torchvision://`` and ``mmcls://`` schemes that goes
through this door inside :func:`checkpoint_door` (which mmpsa's tools enter) and is mmengine's
own loader outside it, so models built elsewhere load as they always did.
"""
import contextlib
import contextvars
import os
import os.path as osp
import pickle
import zipfile
from typing import Callable, Dict, Iterator, Optional
from urllib.parse import urlparse

import torch

from .. import compat
from .allowlist import RESTRICTED_PICKLE, UnsafeCheckpointError
from .errors import CheckpointReadError, UnsafeCheckpointReadError

#: URL schemes :func:`fetch_checkpoint` downloads (others are refused).
URL_PREFIXES = ('http://', 'https://')
#: mmengine's named-model schemes, resolved through mmengine's own tables.
NAMED_PREFIXES = ('open-mmlab://', 'openmmlab://', 'torchvision://', 'modelzoo://', 'mmcls://')
#: The ``CheckpointLoader`` schemes :func:`register_schemes` takes over inside the door.
DOOR_SCHEMES = ('', ) + URL_PREFIXES + NAMED_PREFIXES

_ZIP_MAGIC = b'PK\x03\x04'
_LEGACY_MAGIC = b'\x80\x02\x8a\n'  # torch's legacy format: a pickled magic number first


def is_remote(filename: str) -> bool:
    """Names that are not local paths (``http://``, ``open-mmlab://``, ``s3://`` ...)."""
    return '://' in str(filename)


def _head(filename: str, size: int = 16) -> bytes:
    with open(filename, 'rb') as f:
        return f.read(size)


def _what_is(filename: str) -> str:
    """What a file looks like from its first bytes, for messages."""
    head = _head(filename)
    if head.startswith(_ZIP_MAGIC):
        return 'a zip archive (torch format)'
    if head.startswith(_LEGACY_MAGIC):
        return "a pickle in torch's legacy (non-zip) format"
    if not head:
        return 'an empty file'
    return f'not a torch checkpoint (it starts with {head!r})'


def _unreadable(filename: str,
                err: BaseException,
                found: Optional[str] = None) -> CheckpointReadError:
    """The error for a checkpoint file that exists but cannot be read: what was found."""
    text = str(err).strip()
    cause = text.splitlines()[0] if text else ''
    if len(cause) > 300:
        cause = cause[:300] + '...'
    size = os.path.getsize(filename) if osp.isfile(filename) else 0
    if found is None:
        found = _what_is(filename) if osp.isfile(filename) else 'no file'
    return CheckpointReadError(f'cannot read checkpoint {filename!r} ({size} bytes, {found}): '
                               f'{type(err).__name__}: {cause}')


def check_checkpoint_file(filename: str) -> None:
    """Cheaply check that a local checkpoint is complete, before a run is built on it.

    A checkpoint in torch's (zip) format ends with the archive's central directory: a file
    cut short has none, which ``zipfile`` finds without reading the data. Corruption inside
    the data is found by :func:`verify_checkpoint_file`. Remote names are checked after
    :func:`fetch_checkpoint` has downloaded them.

    Args:
        filename: The checkpoint.

    Raises:
        CheckpointReadError: If the file is missing, truncated or not a torch archive.
    """
    if is_remote(filename):
        return
    if not osp.isfile(filename):
        raise CheckpointReadError(f'checkpoint file {filename!r} does not exist')
    head = _head(filename)
    if not head.startswith(_ZIP_MAGIC):
        if head.startswith(_LEGACY_MAGIC):
            return  # torch's legacy (non-zip) format: only loading can tell
        raise _unreadable(filename, ValueError('neither a zip archive nor a legacy torch pickle'))
    try:
        with zipfile.ZipFile(filename) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        raise _unreadable(
            filename, err, 'a zip archive without its central directory: the file ends '
            'before the archive does') from err
    if not any(name.endswith('/data.pkl') or name == 'data.pkl' for name in names):
        raise _unreadable(filename, ValueError('no data.pkl in the archive'),
                          f'a zip archive of {len(names)} records, none of them data.pkl')


# (absolute path, size, mtime_ns) of files whose CRCs were checked in this process.
_VERIFIED: set = set()


def verify_checkpoint_file(filename: str) -> None:
    """Check a local checkpoint completely: complete archive, every record's CRC.

    torch's zip format stores a CRC-32 per record (one per tensor storage, plus the pickle)
    and ``torch.load`` does not check it. A file already checked in this process (same path,
    size and modification time) is not read twice. Legacy (non-zip) checkpoints carry no CRC.

    Args:
        filename: The checkpoint (a local path; remote names are left to
            :func:`read_checkpoint`, which fetches them first).

    Raises:
        CheckpointReadError: If the file is missing, truncated, or a record fails its CRC
            (the message names the file and the record).
    """
    check_checkpoint_file(filename)
    if is_remote(filename) or not _head(filename).startswith(_ZIP_MAGIC):
        return
    stat = os.stat(filename)
    key = (os.path.abspath(filename), stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:
        return
    try:
        with zipfile.ZipFile(filename) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:  # zlib.error is OSError
        raise _unreadable(filename, err, 'a zip archive whose records cannot be read') from err
    if bad is not None:
        raise _unreadable(
            filename, ValueError(f'record {bad!r} fails its CRC check'),
            f'a zip archive whose record {bad!r} holds other bytes than were written')
    _VERIFIED.add(key)


def _resolve_named(filename: str) -> str:
    """The URL (or local file) behind an mmengine named-model scheme."""
    from mmengine.runner import checkpoint as mm
    prefix = next(p for p in NAMED_PREFIXES if filename.startswith(p))
    name = filename[len(prefix):]
    if prefix in ('torchvision://', 'modelzoo://'):
        table = mm.get_torchvision_models()
    elif prefix == 'mmcls://':
        table = mm.get_mmcls_models()
    else:
        name = mm.get_deprecated_model_names().get(name, name)
        table = mm.get_external_models()
    if name not in table:
        raise CheckpointReadError(f'checkpoint {filename!r}: mmengine knows no model {name!r} '
                                  f'under {prefix}')
    url = table[name]
    if url.startswith(URL_PREFIXES):
        return url
    return osp.join(mm._get_mmengine_home(), url)


def cache_path(url: str) -> str:
    """Where a downloaded checkpoint is kept: torch's hub cache, as
    ``torch.hub.load_state_dict_from_url`` (mmengine's ``load_from_http``) keeps it."""
    name = osp.basename(urlparse(url).path) or 'checkpoint.pth'
    return osp.join(torch.hub.get_dir(), 'checkpoints', name)


def _download(url: str) -> str:
    dst = cache_path(url)
    if osp.isfile(dst):
        return dst
    os.makedirs(osp.dirname(dst), exist_ok=True)
    try:
        # writes a temporary file beside dst and renames it: never a partial file under dst
        torch.hub.download_url_to_file(url, dst, progress=False)
    except Exception as err:
        raise CheckpointReadError(
            f'checkpoint {url!r}: download failed: {type(err).__name__}: {err}') from err
    return dst


def fetch_checkpoint(filename: str) -> str:
    """The local file of a checkpoint name: a URL is downloaded (once) to the cache.

    With several processes, rank 0 downloads first and the others then use its file.

    Args:
        filename: A local path, an ``http(s)://`` URL, or an mmengine named model
            (``open-mmlab://``, ``torchvision://``, ``mmcls://``).

    Returns:
        A local path.

    Raises:
        CheckpointReadError: For a scheme the door does not fetch (``s3://``, ``pavi://`` ...)
            or a failed download.
    """
    filename = str(filename)
    if filename.startswith(NAMED_PREFIXES):
        filename = _resolve_named(filename)
    if not is_remote(filename):
        return osp.expanduser(filename)
    if not filename.startswith(URL_PREFIXES):
        raise CheckpointReadError(
            f'checkpoint {filename!r}: mmpsa reads local files and {", ".join(URL_PREFIXES)} '
            f'{", ".join(NAMED_PREFIXES)} names; copy this one to a local file first')
    from mmengine.dist import barrier, get_dist_info
    rank, world_size = get_dist_info()
    if rank == 0:
        local = _download(filename)
    if world_size > 1:
        barrier()
        if rank > 0:
            local = _download(filename)
    return local


def _shown(name: str, local: str) -> str:
    """A checkpoint as messages name it: the name the user gave, and where it was fetched."""
    return local if local == name else f'{name} (downloaded to {local})'


def fetch_and_verify(filename: str) -> str:
    """:func:`fetch_checkpoint`, then :func:`verify_checkpoint_file`: the checks of
    :func:`read_checkpoint` before the unpickling, for a tool to run before it builds a run.

    Args:
        filename: Local path, URL or mmengine named model.

    Returns:
        The local file.

    Raises:
        CheckpointReadError: Missing, truncated, corrupt (CRCs), not a checkpoint, or a
            failed download; the message names ``filename`` as given (and the downloaded
            file of a URL).
    """
    name = str(filename)
    local = fetch_checkpoint(name)
    try:
        verify_checkpoint_file(local)
    except CheckpointReadError as err:
        raise CheckpointReadError(str(err).replace(repr(local), repr(_shown(name, local)),
                                                   1)) from err
    return local


#: torch's variable that forces ``weights_only=True`` on every ``torch.load`` (any torch).
FORCE_WEIGHTS_ONLY_VAR = 'TORCH_FORCE_WEIGHTS_ONLY_LOAD'


def forced_weights_only() -> bool:
    """Whether the user set ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` (as torch reads it)."""
    return os.getenv(FORCE_WEIGHTS_ONLY_VAR, '0').lower() in ('1', 'y', 'yes', 'true')


def _torch_load(filename: str, map_location) -> dict:
    """The one ``torch.load`` of mmpsa: an explicit allow-list on every torch.

    ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` changes nothing on torch >= 2.4 (the door asks for
    weights-only already). On an older torch it makes torch refuse any ``pickle_module``, so
    the restricted unpickler cannot run: the door then loads with torch's own weights-only
    set alone, as the variable asks. Plain state dicts load; mmengine's Runner checkpoints
    (``message_hub``: ``HistoryBuffer``, numpy) are refused, the message naming the variable.
    """
    if compat.has_add_safe_globals():
        return torch.load(filename, map_location=map_location, weights_only=True)
    if forced_weights_only():  # torch < 2.4 refuses a pickle module under the variable
        return torch.load(filename, map_location=map_location, weights_only=True)
    # torch < 2.4: torch accepts a pickle module only with weights_only=False
    return torch.load(
        filename, map_location=map_location, weights_only=False, pickle_module=RESTRICTED_PICKLE)


def _forced_note() -> str:
    """What the variable did, for a refusal on a torch without ``add_safe_globals``."""
    if compat.has_add_safe_globals() or not forced_weights_only():
        return ''
    return (f' {FORCE_WEIGHTS_ONLY_VAR} is set: on torch {torch.__version__} (< 2.4) torch '
            "then loads with its own weights-only set alone and refuses mmpsa's allow-list "
            "(mmengine's HistoryBuffer and numpy metadata); unset it to read mmengine "
            "checkpoints through mmpsa's restricted unpickler, which runs nothing either.")


# torch's weights-only refusals (2.1's words: 'Unsupported class', 2.14's: 'Unsupported global')
_REFUSALS = ('unsupported global', 'unsupported class', 'allow-list', 'can only build',
             'can only create', 'trying to call reduce', 'unsupported operand', 'is blocked',
             'weights only load failed')


def read_checkpoint(filename: str, map_location='cpu') -> dict:
    """Read a checkpoint through the door: fetch, CRCs, allow-listed unpickling.

    Args:
        filename: Local path, URL or mmengine named model.
        map_location: As in ``torch.load``.

    Returns:
        The checkpoint (a dict, or what the file holds).

    Raises:
        UnsafeCheckpointReadError: The pickle names or calls something outside the
            allow-list (the message names the file and what it found).
        CheckpointReadError: Missing, truncated, corrupt (CRCs), or not a checkpoint.
    """
    name = str(filename)
    local = fetch_and_verify(name)
    shown = _shown(name, local)
    try:
        checkpoint = _torch_load(local, map_location)
    except (UnsafeCheckpointError, pickle.UnpicklingError, RuntimeError, EOFError,
            zipfile.BadZipFile, ValueError, KeyError, OSError, AttributeError, TypeError) as err:
        text = str(err)
        if isinstance(err, UnsafeCheckpointError) or any(r in text.lower() for r in _REFUSALS):
            raise UnsafeCheckpointReadError(
                f'refused checkpoint {shown!r}: its pickle {_refusal(text)}; nothing of it '
                'was run. A checkpoint of mmseg/mmpose/mmengine needs nothing else: if you '
                'trust this file and need more, convert it to a plain state_dict of '
                f'tensors.{_forced_note()}') from err
        raise _unreadable(local, err) from err
    if name.startswith('mmcls://'):
        from mmengine.runner.checkpoint import _process_mmcls_checkpoint
        checkpoint = _process_mmcls_checkpoint(checkpoint)
    return checkpoint


def _refusal(text: str) -> str:
    """torch's (or the restricted unpickler's) refusal as one short clause."""
    first = text.strip().splitlines()[0] if text.strip() else 'was refused'
    first = first.replace('Weights only load failed. ', '')
    if 'allow-list' in first:  # the restricted unpickler's own words
        return first
    if 'Unsupported class ' in text:  # torch < 2.4's weights-only unpickler
        rest = text[text.index('Unsupported class ') + len('Unsupported class '):].split()
        return f'names the global {rest[0] if rest else "?"}, which is not on the allow-list'
    if 'GLOBAL' in text:
        start = text.index('GLOBAL')
        name = text[start:].split()[1] if len(text[start:].split()) > 1 else '?'
        return f'names the global {name}, which is not on the allow-list'
    return first[:300]


# --- the door for mmengine's CheckpointLoader schemes -------------------------------------

_DOOR_ACTIVE: contextvars.ContextVar = contextvars.ContextVar(
    'mmpsa_checkpoint_door', default=False)


def door_active() -> bool:
    """Whether mmengine's checkpoint loading goes through the door here and now."""
    return _DOOR_ACTIVE.get()


@contextlib.contextmanager
def checkpoint_door() -> Iterator[None]:
    """Within this context, mmengine's ``CheckpointLoader`` (``load_from``, ``resume``,
    ``pretrained=``, ``init_cfg=dict(type='Pretrained')``, ``load_checkpoint``) reads every
    local file and URL through :func:`read_checkpoint`. mmpsa's tools run inside it."""
    token = _DOOR_ACTIVE.set(True)
    try:
        yield
    finally:
        _DOOR_ACTIVE.reset(token)


def _door_loader(stock: Optional[Callable]) -> Callable:
    """A ``CheckpointLoader`` scheme loader: the door inside :func:`checkpoint_door`,
    mmengine's own loader (``stock``) outside it."""

    def load_from_mmpsa_door(filename: str, map_location=None) -> dict:
        if door_active() or stock is None:
            return read_checkpoint(filename, map_location=map_location)
        return stock(filename, map_location)

    load_from_mmpsa_door.mmpsa_stock = stock  # type: ignore[attr-defined]
    return load_from_mmpsa_door


def register_schemes() -> None:
    """Register the door's loader for :data:`DOOR_SCHEMES` in mmengine's ``CheckpointLoader``
    (idempotent; ``register_scheme(force=True)``, the registration mmengine offers)."""
    from mmengine.runner.checkpoint import CheckpointLoader
    schemes: Dict[str, Callable] = dict(CheckpointLoader._schemes)
    for prefix in DOOR_SCHEMES:
        current = schemes.get(prefix)
        stock = getattr(current, 'mmpsa_stock', current)
        CheckpointLoader.register_scheme(prefix, _door_loader(stock), force=True)
