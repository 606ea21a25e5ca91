"""Precision rules shared by the PSA block's literal and fused forms.

The small tensors of the block (softmaxes, LayerNorms, the per-sample vectors of the
fused form) are computed in at least fp32, whatever the input dtype or autocast says;
the output and the attention maps are in the input's dtype.
"""
from typing import ContextManager

import torch

from .. import compat


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype small tensors (softmax, LayerNorm, ...) are computed in: >= fp32.

    Args:
        dtype (torch.dtype): The input's dtype.

    Returns:
        torch.dtype: ``float32`` for half inputs, ``dtype`` itself for fp32/fp64.
    """
    # = torch.promote_types(dtype, torch.float32) for the floating dtypes the block takes;
    # dynamo 2.1 breaks the graph at promote_types (a torch.* call returning a dtype)
    return torch.float64 if dtype == torch.float64 else torch.float32


def no_autocast(t: torch.Tensor) -> ContextManager:
    """A context that disables autocast on ``t``'s device if it is enabled there.

    Args:
        t (Tensor): A tensor on the device in question.
    """
    return compat.no_autocast(t.device.type)
