"""Where mmpsa's configs are: the one place that computes it.

A wheel carries ``configs/``, ``tools/`` and ``model-index.yml`` in ``mmpsa/.mim/`` (setup.py's
``build_py`` step copies them there; the OpenMMLab layout that mim and mmengine read). A source
checkout and an editable install (PEP 660: the package is imported from the checkout) have no
``.mim``: the configs are the checkout's ``configs/`` beside the package folder.
"""
import importlib.resources
from pathlib import Path
from typing import Union

#: The prefix of mmpsa's package config names, as ``mmseg::`` is mmseg's.
PACKAGE_PREFIX = 'mmpsa::'
# a file every mmpsa config root holds (tells the checkout's configs/ from another one)
_MARKER = Path('_base_') / 'psa_runtime.py'


def package_root() -> Path:
    """The folder of the imported ``mmpsa`` package (installed, or in the checkout)."""
    return Path(str(importlib.resources.files('mmpsa')))


def mim_root() -> Path:
    """``mmpsa/.mim``, where a wheel keeps ``configs/``, ``tools/`` and ``model-index.yml``.

    Returns:
        ``mmpsa/.mim`` of an installed wheel, else the source checkout's root (the folder
        holding ``configs/``, ``tools/`` and ``model-index.yml`` there).

    Raises:
        FileNotFoundError: Neither holds mmpsa's configs (e.g. a wheel built without them).
    """
    package = package_root()
    candidates = (package / '.mim', package.parent)
    for root in candidates:
        if (root / 'configs' / _MARKER).is_file():
            return root
    raise FileNotFoundError(f'no mmpsa configs in {" or ".join(str(c) for c in candidates)}: '
                            'reinstall mmpsa (pip install mmpsa-*.whl, or pip install -e . '
                            'in a checkout)')


def configs_root() -> Path:
    """The ``configs/`` folder of mmpsa (wheel: ``mmpsa/.mim/configs``; checkout/editable).

    Returns:
        The folder holding ``_base_/``, ``mmseg/`` and ``mmpose/``.
    """
    return mim_root() / 'configs'


def config_path(name: Union[str, Path]) -> Path:
    """The file of an mmpsa config named relative to the config root.

    Args:
        name: ``'mmseg/psa_hrnet/psa-p_fcn_hr48_4xb2-80k_cityscapes-512x1024.py'``, with or
            without the ``mmpsa::`` prefix.

    Returns:
        The config file.

    Raises:
        FileNotFoundError: No such config (the message names the folder searched).
    """
    name = str(name)
    if name.startswith(PACKAGE_PREFIX):
        name = name[len(PACKAGE_PREFIX):]
    root = configs_root()
    path = root / name
    if not path.is_file():
        raise FileNotFoundError(f'no mmpsa config {name!r} in {root}')
    return path
