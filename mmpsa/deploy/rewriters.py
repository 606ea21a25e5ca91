"""Export-time rewrites of stock OpenMMLab code, mmdeploy style.

A rewrite replaces one stock function while an export runs and restores it afterwards
(:func:`export_rewrites`); mmseg and mmpose themselves are never edited. Each rewrite
computes what the stock code computes in eager mode, in a form that ``torch.export``
keeps symbolic, so a model exported with dynamic shapes stays exact at other sizes.
"""
import importlib
import importlib.util
from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator, List, NamedTuple, Union

import torch


class Rewrite(NamedTuple):
    """Replace ``module.owner.attr`` (an attribute of a class) by ``func`` during export."""
    package: str  # the distribution that must be importable (``mmseg``)
    module: str
    owner: str
    attr: str
    func: Callable


def scaled_size(size: Union[int, torch.SymInt], factor: float) -> Union[int, torch.SymInt]:
    """``int(size * factor)`` that stays symbolic under ``torch.export``.

    ``int()`` of a symbolic float makes the exporter bake the value in as a constant;
    an integral factor is an integer product, any other factor a symbolic truncation.

    Args:
        size: A side of the input (an int, or a symbolic int while exporting).
        factor: The scale factor.
    """
    if float(factor).is_integer():
        return size * int(factor)
    return torch.sym_int(size * factor)


def mmseg_upsample_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``mmseg.models.utils.Upsample.forward`` with the output size kept symbolic.

    The stock forward computes ``[int(t * self.scale_factor) for t in x.shape[-2:]]``,
    which an export fixes to the example's sizes (HRNet's fuse layers then resize to the
    other branch's size, which hides the mismatch but changes the values).
    """
    from mmseg.models.utils import resize
    if self.size:
        size = self.size
    else:
        factors = self.scale_factor
        if not isinstance(factors, tuple):
            factors = (factors, factors)
        size = [scaled_size(t, f) for t, f in zip(x.shape[-2:], factors)]
    return resize(x, size, None, self.mode, self.align_corners)


#: The rewrites :func:`export_rewrites` applies (those whose package is installed).
REWRITES: List[Rewrite] = [
    Rewrite('mmseg', 'mmseg.models.utils.wrappers', 'Upsample', 'forward', mmseg_upsample_forward),
]


@contextmanager
def export_rewrites() -> Iterator[List[str]]:
    """Apply :data:`REWRITES` (of installed packages) inside the block, restore them after.

    Yields:
        The rewritten names (``'mmseg.models.utils.wrappers.Upsample.forward'``).
    """
    applied = []
    with ExitStack() as stack:
        for rw in REWRITES:
            if importlib.util.find_spec(rw.package) is None:
                continue
            owner = getattr(importlib.import_module(rw.module), rw.owner)
            original = owner.__dict__[rw.attr]
            setattr(owner, rw.attr, rw.func)
            stack.callback(setattr, owner, rw.attr, original)
            applied.append(f'{rw.module}.{rw.owner}.{rw.attr}')
        yield applied
