"""Layers that import neither mmseg nor mmpose."""
from .psa import PolarizedSelfAttention

__all__ = ['PolarizedSelfAttention']
