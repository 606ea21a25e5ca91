"""mmpsa: Polarized Self-Attention (arXiv 2107.00782) for MMSegmentation and MMPose.

Importing the package registers everything (``custom_imports=dict(imports=['mmpsa'])``):
the block, ``PSANeck`` and the checkpoint allow-list when mmengine is installed; the mmseg
part only when mmseg is installed and the mmpose part only when mmpose is. ``find_spec``
decides, not a try/except, so a broken install (e.g. an mmcv built for another torch) still
fails loudly. It also lets mmengine resolve ``_base_ = 'mmpsa::...'``
(:mod:`mmpsa.utils.package_configs`). Without mmengine only the library-free layer is there:
``from mmpsa.layers import PolarizedSelfAttention`` needs torch alone.
"""
import importlib.util

from . import layers  # noqa: F401  (registers the block when mmengine is installed)

__version__ = '0.1.0'

if importlib.util.find_spec('mmengine') is not None:
    from . import checkpoint, engine, necks  # noqa: F401  (registers)
    from .utils.package_configs import enable_package_configs

    enable_package_configs()

    if importlib.util.find_spec('mmseg') is not None:
        from . import seg  # noqa: F401
    if importlib.util.find_spec('mmpose') is not None:
        from . import pose  # noqa: F401
