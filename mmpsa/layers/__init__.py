"""Layers that import neither mmseg nor mmpose."""
from .psa import PSA_DEFAULTS, PolarizedSelfAttention, check_psa_cfg

__all__ = ['PSA_DEFAULTS', 'PolarizedSelfAttention', 'check_psa_cfg']
