"""Fixtures of the block tests: the device they run on, and the one way to pick the fused
block's evaluation path.

The block tests run on CUDA tensors where a GPU is present (the Triton kernels compiled, no
interpreter) and on CPU tensors otherwise (the Triton kernels under triton's interpreter):
``test_psa.pick_device`` decides, and ``test_psa.py`` (the oracle) builds its blocks and
inputs there.
"""
import contextlib
import importlib.util
import os
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator

import pytest
import torch

from mmpsa.layers import backend, dispatch


def _load_oracle() -> ModuleType:
    """The oracle helpers of ``test_psa.py`` (``make``, ``pair``, ``fwd_bwd``, ``pick_device``
    ...), loaded from its file (test modules do not import each other under
    ``--import-mode=importlib``). It imports no Triton module, so the variable below still
    takes effect."""
    path = Path(__file__).with_name('test_psa.py')
    spec = importlib.util.spec_from_file_location('mmpsa_block_oracle', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ORACLE = _load_oracle()

if ORACLE.uses_interpreter(ORACLE.pick_device()):
    # triton's interpreter runs the Triton kernels on CPU tensors; triton reads the variable
    # when a kernel is decorated and when it runs, so it is set for the whole session
    os.environ.setdefault('TRITON_INTERPRET', '1')

#: ``set_fused_path`` names and the fused path (:func:`mmpsa.layers.backend`) each selects.
FUSED_PATHS = {'cpu_kernel': 'cpu', 'aten': 'aten', 'plain': 'plain', 'triton': 'triton'}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: a second OpenMP thread only adds waiting on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='session')
def device() -> torch.device:
    """The device of the block tests (``test_psa.pick_device``)."""
    return ORACLE.pick_device()


@pytest.fixture
def set_fused_path(device: torch.device) -> Iterator[Callable[..., str]]:
    """``set_fused_path(path)`` sends fused blocks down ``path`` until the test ends.

    Enters :func:`mmpsa.layers.backend` (thread-local; ``MMPSA_BACKEND`` is left alone):
    ``'cpu_kernel'`` (``cpu``): the compiled Function as built (its per-sample CPU kernel
    where it applies); ``'aten'``: the compiled Function with the kernel off (the
    device-generic ATen path); ``'plain'``: the fused maths as plain autograd ops;
    ``'triton'``: the Triton kernels (on CPU under triton's interpreter); ``'literal'``
    changes nothing (the test builds the block with ``fused=False``). A later call replaces
    an earlier one. ``'cpu_kernel'`` skips on a GPU machine (the kernel runs CPU tensors,
    and the block tests' tensors are CUDA there).
    """
    stack = contextlib.ExitStack()

    def set_path(path: str) -> str:
        if path == 'cpu_kernel' and device.type != 'cpu':
            pytest.skip(f'the per-sample CPU kernel runs CPU tensors; the tests run {device}')
        stack.close()
        if path in FUSED_PATHS:
            stack.enter_context(backend(FUSED_PATHS[path]))
        elif path != 'literal':
            raise ValueError(f'unknown evaluation path {path!r}')
        return path

    with stack:
        yield set_path


@pytest.fixture(scope='session')
def triton_kernels() -> ModuleType:
    """:mod:`mmpsa.layers.psa_triton` where its kernels can run here (CUDA, or CPU under
    triton's interpreter); skips the test with the reason otherwise."""
    kernels, reason = dispatch.triton_status()
    if kernels is None:  # no triton (CPU-only torch wheels), or one older than the kernels need
        pytest.skip(reason)
    if not (kernels.INTERPRET or ORACLE.pick_device().type == 'cuda'):
        pytest.fail('mmpsa.layers.psa_triton was imported without TRITON_INTERPRET=1 and '
                    'there is no GPU')
    return kernels


@pytest.fixture(scope='session')
def block_oracle() -> ModuleType:
    """The oracle helpers of ``test_psa.py`` (``make``, ``pair``, ``fwd_bwd``,
    ``assert_matches``, ``check_fused_vs_literal``, tolerances, ``DEVICE``)."""
    return ORACLE
