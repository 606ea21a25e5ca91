"""Fixtures of the block tests: the one way to pick the fused block's evaluation path."""
import functools
import types
from typing import Callable, Optional

import pytest

from mmpsa.layers import psa_fused


@pytest.fixture
def set_fused_path(monkeypatch: pytest.MonkeyPatch) -> Callable[..., str]:
    """``set_fused_path(path, patch=None)`` sends fused blocks down ``path``.

    ``'cpu_kernel'``: the compiled Function as built (its per-sample CPU kernel where it
    applies); ``'aten'``: the compiled Function with the kernel off (the device-generic ATen
    path); ``'plain'``: no extension, the fused maths as plain autograd ops; ``'literal'``
    changes nothing (the test builds the block with ``fused=False``). The change lasts
    until ``patch`` (default: this test's ``monkeypatch``) is undone.
    """

    def set_path(path: str, patch: Optional[pytest.MonkeyPatch] = None) -> str:
        patch = monkeypatch if patch is None else patch
        if path == 'plain':
            patch.setattr(psa_fused, '_EXT', None)
        elif path == 'aten':
            ext = psa_fused._EXT
            patch.setattr(
                psa_fused, '_EXT',
                types.SimpleNamespace(fused_psa=functools.partial(ext.fused_psa, cpu_kernel=False)))
        elif path not in ('cpu_kernel', 'literal'):
            raise ValueError(f'unknown evaluation path {path!r}')
        return path

    return set_path
