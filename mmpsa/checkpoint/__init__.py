"""The one door for checkpoints: safe reading, integrity, and does it fit the model.

- :mod:`.door`: :func:`read_checkpoint` (URL -> cache -> local file; CRCs; unpickling with
  an explicit allow-list on every torch) and :func:`checkpoint_door`, within which
  mmengine's ``CheckpointLoader`` (``load_from``, ``resume``, ``pretrained=``) reads through it.
- :mod:`.allowlist`: what a checkpoint's pickle may name (torch's weights-only set plus
  mmengine's ``HistoryBuffer`` and numpy's plain data), and the restricted unpickler used
  where torch has no ``add_safe_globals``.
- :mod:`.match`: the PSA record written at save time, :func:`key_diff`, and
  :func:`check_psa_match`, where the purpose (resume, test, export, attention, load_from)
  decides what is an error.
- :mod:`.build`: config -> scope -> model, with the weights through the door.
- :mod:`.atomic`: the one write-then-rename writer (fsync).

Importing it (``import mmpsa`` does) has two global effects, both registrations: mmpsa's
globals join torch's weights-only allow-list (``add_safe_globals``, torch >= 2.4), and a
loader joins mmengine's ``CheckpointLoader`` for the local, ``http(s)://``,
``open-mmlab://``, ``torchvision://`` and ``mmcls://`` schemes that reads through the door
inside :func:`checkpoint_door` and is mmengine's own loader outside it.
"""
# One import line per group of names (re-exported), kept apart:
# isort: off
from .allowlist import RESTRICTED_PICKLE, RestrictedUnpickler  # noqa: F401
from .allowlist import STATISTICS_METHODS, UnsafeCheckpointError  # noqa: F401
from .allowlist import allowed_globals, history_buffer_getattr  # noqa: F401
from .allowlist import register_safe_globals, safe_globals  # noqa: F401
from .atomic import atomic_write, save_checkpoint_atomically  # noqa: F401
from .build import build_model, build_model_cfg, load_into_model, scope_of  # noqa: F401
from .door import check_checkpoint_file, checkpoint_door, door_active  # noqa: F401
from .door import fetch_checkpoint, read_checkpoint, register_schemes  # noqa: F401
from .door import fetch_and_verify, verify_checkpoint_file  # noqa: F401
from .errors import CheckpointMismatchError, CheckpointReadError  # noqa: F401
from .errors import UnsafeCheckpointReadError  # noqa: F401
from .match import EVAL_PURPOSES, LOAD_PURPOSES, PSA_RECORD_KEY, KeyDiff  # noqa: F401
from .match import check_psa_match, keep_missing_psa, key_diff, psa_record  # noqa: F401
# isort: on

register_safe_globals()
register_schemes()
