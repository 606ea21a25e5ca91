"""mmpsa: Polarized Self-Attention (arXiv 2107.00782) for MMSegmentation and MMPose.

Importing the package registers everything (``custom_imports=dict(imports=['mmpsa'])``):
the block, ``PSANeck`` and the checkpoint allow-list when mmengine is installed; the mmseg
part only when mmseg is installed and the mmpose part only when mmpose is. ``find_spec``
decides, not a try/except, so a broken install (e.g. an mmcv built for another torch) still
fails loudly. Without mmengine only the library-free layer is there:
``from mmpsa.layers import PolarizedSelfAttention`` needs torch alone.

What importing mmpsa changes outside mmpsa (the whole list; ``tests/test_import_effects.py``
checks it):

1. Registrations in the OpenMMLab registries: the block and ``PSANeck`` in mmengine's root
   ``MODELS``; the backbones and heads in mmseg's/mmpose's ``MODELS``; the exact-resume loop,
   hooks and runner in mmengine's root ``LOOPS``/``HOOKS``/``RUNNERS``.
2. The fileio backend ``mmpsa_atomic_local`` (``mmengine.fileio.register_backend``), which
   mmpsa's checkpoint hook writes through; nothing else uses it.
3. mmengine's ``CheckpointLoader`` schemes (local, ``http(s)://``, ``open-mmlab://``,
   ``torchvision://``, ``mmcls://``) get a loader that reads through mmpsa's checkpoint door
   inside :func:`mmpsa.checkpoint.checkpoint_door`, and is mmengine's own loader outside it.
4. torch's weights-only allow-list gains mmengine's ``HistoryBuffer`` and numpy's plain data
   types (``add_safe_globals``, torch >= 2.4): stock tools on torch >= 2.6 need them to resume
   mmengine checkpoints.
5. ``Config._get_cfg_path`` is wrapped so ``_base_ = 'mmpsa::...'`` resolves
   (:mod:`mmpsa.utils.package_configs`; mmengine 0.10.7 offers no registration for it);
   every other name passes through unchanged.

No torch-wide module hooks, no change to how a model without PSA builds or runs.
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
