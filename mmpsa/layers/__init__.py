"""The PSA block as a library-free layer: imports torch alone (triton only for the Triton path).

``PolarizedSelfAttention`` is an mmengine ``BaseModule`` registered in mmengine's ``MODELS``
when mmengine is installed, a plain ``nn.Module`` otherwise. :func:`backend` picks the fused
path for the code inside it (:mod:`.dispatch`).
"""
from .dispatch import BACKENDS, PATHS, backend
from .psa import PSA_DEFAULTS, PolarizedSelfAttention, check_psa_cfg

__all__ = [
    'BACKENDS', 'PATHS', 'PSA_DEFAULTS', 'PolarizedSelfAttention', 'backend', 'check_psa_cfg'
]
