"""``_base_ = 'mmpsa::mmseg/psa_hrnet/...'``: mmpsa's configs as package configs, after
``import mmpsa``.

mmengine 0.10.7 resolves a ``pkg::path`` base through a fixed table of OpenMMLab packages
(``mmengine.config.utils.MODULE2PACKAGE``, which refuses ``mmpsa``) and ``get_installed_path``
(``site-packages/mmpsa`` for a PEP 660 editable install, a folder that does not exist).
:func:`enable_package_configs` (run by ``import mmpsa``) wraps ``Config._get_cfg_path``, the
one function that resolves a base name: a name starting with ``mmpsa::`` becomes the file
:func:`~mmpsa.utils.paths.config_path` finds (wheel and checkout alike); every other name goes
to mmengine unchanged.

The scope: a ``mmseg::`` base gives its dicts ``_scope_='mmseg'``. mmpsa has no registry scope
of its own: its configs are mmseg or mmpose configs (their ``default_scope`` says which) whose
types live in those libraries' registries and mmengine's root. So a ``mmpsa::`` base reads
exactly as its file path does, with no ``_scope_`` added. (``_scope_='mmpsa'``, what mmengine
would add, makes a build fall back to the calling registry -- mmcv's ``TRANSFORMS`` for a
pipeline, which has no ``PackSegInputs`` -- and breaks ``test_pipeline = _base_.test_pipeline``.)

Where it cannot work: a tool that parses the config before anything imports mmpsa (mmseg's and
mmpose's own ``tools/train.py``, ``mim train``) resolves ``_base_`` before ``custom_imports``
run; there, name the base by its path.
"""
from typing import Callable, Optional, Tuple

from mmengine.config import Config

from .paths import PACKAGE_PREFIX, config_path


def _mmpsa_first(original: Callable) -> Callable:
    """``Config._get_cfg_path`` that resolves ``mmpsa::`` names and passes the rest on."""

    def get_cfg_path(cfg_path: str, filename: str) -> Tuple[str, Optional[str]]:
        if cfg_path.startswith(PACKAGE_PREFIX):
            return str(config_path(cfg_path)), None  # no scope: as the path form
        return original(cfg_path, filename)

    get_cfg_path.mmpsa_original = original
    return get_cfg_path


def enable_package_configs() -> None:
    """Let mmengine resolve ``mmpsa::`` bases in every config parsed from now on (idempotent)."""
    current = Config._get_cfg_path
    if not hasattr(current, 'mmpsa_original'):
        Config._get_cfg_path = staticmethod(_mmpsa_first(current))
