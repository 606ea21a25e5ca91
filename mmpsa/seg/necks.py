"""``PSANeck`` in mmseg's scope: the one library-free neck, :class:`mmpsa.necks.PSANeck`.

It registers in mmengine's root ``MODELS``, which mmseg's registry falls back to, so
``dict(type='PSANeck', ...)`` builds from mmseg configs; this module keeps the import path
``mmpsa.seg.necks.PSANeck``.
"""
from ..necks import PSANeck

__all__ = ['PSANeck']
