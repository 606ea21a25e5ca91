"""Fixtures of the block tests: the one way to pick the fused block's evaluation path."""
import importlib.util
import os
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator, Optional

import pytest
import torch

from mmpsa.layers import psa_fused

if not torch.cuda.is_available():
    # triton's interpreter runs the Triton kernels on CPU tensors; triton reads the variable
    # when a kernel is decorated and when it runs, so it is set for the whole session
    os.environ.setdefault('TRITON_INTERPRET', '1')

#: ``set_fused_path`` names and the ``MMPSA_BACKEND`` value each sets.
FUSED_PATHS = {'cpu_kernel': 'cpu', 'aten': 'aten', 'plain': 'plain', 'triton': 'triton'}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: a second OpenMP thread only adds waiting on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def set_fused_path(monkeypatch: pytest.MonkeyPatch) -> Callable[..., str]:
    """``set_fused_path(path, patch=None)`` sends fused blocks down ``path``.

    Sets ``MMPSA_BACKEND`` (:func:`mmpsa.layers.psa_fused.backend`): ``'cpu_kernel'``
    (``cpu``): the compiled Function as built (its per-sample CPU kernel where it applies);
    ``'aten'``: the compiled Function with the kernel off (the device-generic ATen path);
    ``'plain'``: the fused maths as plain autograd ops; ``'triton'``: the Triton kernels
    (on CPU under triton's interpreter); ``'literal'`` changes nothing (the test builds the
    block with ``fused=False``). The change lasts until ``patch`` (default: this test's
    ``monkeypatch``) is undone.
    """

    def set_path(path: str, patch: Optional[pytest.MonkeyPatch] = None) -> str:
        patch = monkeypatch if patch is None else patch
        if path in FUSED_PATHS:
            patch.setenv('MMPSA_BACKEND', FUSED_PATHS[path])
        elif path != 'literal':
            raise ValueError(f'unknown evaluation path {path!r}')
        return path

    return set_path


@pytest.fixture(scope='session')
def triton_kernels() -> ModuleType:
    """:mod:`mmpsa.layers.psa_triton` where its kernels can run here (CUDA, or CPU under
    triton's interpreter); skips the test with the reason otherwise."""
    kernels = psa_fused.triton_module()
    if kernels is None:
        pytest.skip('triton is not importable (CPU-only torch wheels have none)')
    if not (kernels.INTERPRET or torch.cuda.is_available()):
        pytest.skip('mmpsa.layers.psa_triton was imported without TRITON_INTERPRET=1 and '
                    'there is no GPU')
    return kernels


@pytest.fixture(scope='session')
def block_oracle() -> ModuleType:
    """The oracle helpers of ``test_psa.py`` (``make``, ``pair``, ``fwd_bwd``,
    ``assert_matches``, ``check_fused_vs_literal``, ``fp64_literal``, tolerances), loaded
    from its file (test modules do not import each other under ``--import-mode=importlib``)."""
    path = Path(__file__).with_name('test_psa.py')
    spec = importlib.util.spec_from_file_location('mmpsa_block_oracle', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
