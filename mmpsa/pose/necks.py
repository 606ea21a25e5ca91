"""``PSANeck`` in mmpose's scope: the one library-free neck, :class:`mmpsa.necks.PSANeck`.

It registers in mmengine's root ``MODELS``, which mmpose's registry falls back to, so
``dict(type='PSANeck', ...)`` builds from mmpose configs; this module keeps the import path
``mmpsa.pose.necks.PSANeck``.
"""
from ..necks import PSANeck

__all__ = ['PSANeck']
