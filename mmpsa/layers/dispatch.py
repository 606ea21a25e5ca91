"""The dispatch room of the PSA block: which evaluation runs an input, decided in one place.

The paths (:data:`PATHS`), each computing the same output and maps:

* ``'literal'``: the equations as written (:meth:`PolarizedSelfAttention.forward_literal`,
  ``fused=False``); the test oracle.
* ``'plain'``: the fused maths as plain differentiable ops
  (:func:`mmpsa.layers.psa_fused.plain_psa`); what ``torch.jit`` tracing,
  ``torch.compile``/``torch.export`` and a missing extension run.
* ``'cpu'`` / ``'aten'``: the compiled autograd Function of ``mmpsa._ext`` with its per-sample
  CPU kernel / with ATen ops only (large or non-contiguous CPU inputs take ATen ops under
  ``'cpu'`` too, and the block then records ``'aten'``).
* ``'triton'``: the Triton kernels (:mod:`mmpsa.layers.psa_triton`, imported here only, on
  first use), for CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.

Only this module loads ``mmpsa._ext``, reads ``MMPSA_BACKEND`` and imports the Triton module.
The switch is the environment variable (the default for the process) or, for the code inside
it, the thread-local context :func:`backend`. Each block records in ``last_path`` the path its
last forward took. It imports torch alone (triton only for the Triton path).
"""
import contextlib
import importlib
import os
import os.path as osp
import threading
import warnings
from typing import Iterator, List

import torch

from .. import compat
from .ext_source import CSRC_DIR, source_hash
from .psa_fused import PARAM_NAMES, PSAParams, plain_psa

Tensor = torch.Tensor

#: The values of ``MMPSA_BACKEND`` / :func:`backend`.
BACKENDS = ('auto', 'triton', 'cpu', 'aten', 'plain')
#: What ``block.last_path`` can say.
PATHS = ('literal', 'plain', 'aten', 'cpu', 'triton')
#: The oldest triton the kernels are tested with (its interpreter and backends API came in 3.0;
#: torch 2.1's triton 2.1 has neither).
MIN_TRITON = (3, 0)


def _load_extension():
    """``mmpsa._ext``, or None (with a warning) when it is missing or stale."""
    try:
        ext = importlib.import_module('mmpsa._ext')
    except ImportError as e:
        warnings.warn('mmpsa._ext (the compiled fused PolarizedSelfAttention) is not built '
                      f'({e}); the fused block runs as plain autograd ops, which is slower. '
                      'Build it with `pip install --no-build-isolation -e .` (or `make setup`).')
        return None
    if osp.isdir(CSRC_DIR):  # a source checkout: refuse a binary built from other code
        digest = source_hash(CSRC_DIR)
        if digest != ext.SOURCE_HASH:
            warnings.warn(f'mmpsa._ext was built from another version of {CSRC_DIR} (hash '
                          f'{ext.SOURCE_HASH}, source {digest}); the fused block runs as '
                          'plain autograd ops until it is rebuilt with `pip install '
                          '--no-build-isolation -e .` (or `make setup`).')
            return None
    if tuple(ext.PARAM_NAMES) != PARAM_NAMES:
        raise RuntimeError(f'mmpsa._ext takes the parameters {tuple(ext.PARAM_NAMES)}, PSAParams '
                           f'lists {PARAM_NAMES}: mmpsa/csrc/psa_fused.h and psa_fused.py disagree')
    return ext


_EXT = _load_extension()


def extension():
    """The loaded ``mmpsa._ext`` module, or None when it is not built (or stale)."""
    return _EXT


def fused_function(x: Tensor,
                   variant: str,
                   sequential: bool,
                   params: PSAParams,
                   cpu_kernel: bool = True) -> List[Tensor]:
    """The compiled autograd Function: ``[out, a_ch, a_sp]``.

    Args:
        x (Tensor): Input ``(B, C, H, W)``.
        variant (str): ``'paper'`` or ``'official'``.
        sequential (bool): Sequential (True) or parallel mode.
        params (PSAParams): The block's parameters (:meth:`fused_params`).
        cpu_kernel (bool): Take the per-sample CPU kernel where it applies; False forces
            the ATen path. Default: True.

    Returns:
        list[Tensor]: The output and the maps ``a_ch`` ``(B, C, 1, 1)`` and ``a_sp``
        ``(B, 1, H, W)``: in ``x``'s dtype, non-differentiable, and tensors of their
        own (not views of what backward keeps), for the observation points.
    """
    if _EXT is None:
        raise RuntimeError('mmpsa._ext is not built; see the warning above')
    return _EXT.fused_psa(
        x, variant == 'paper', sequential, params.ln_eps, params.tensors, cpu_kernel=cpu_kernel)


# ------------------------------------------------------------------ the switch
_LOCAL = threading.local()


def _checked(value: str, source: str) -> str:
    value = value.strip().lower() or 'auto'
    if value not in BACKENDS:
        raise ValueError(f'{source} must be one of {BACKENDS}, got {value!r}')
    return value


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Run the code inside on the fused path ``name`` (one of :data:`BACKENDS`).

    Thread-local and nestable; it overrides ``MMPSA_BACKEND`` (the process default, left as
    it is) for this thread only::

        with mmpsa.layers.backend('aten'):
            out = block(x)   # block.last_path == 'aten'

    Args:
        name (str): ``'auto'``, ``'triton'``, ``'cpu'``, ``'aten'`` or ``'plain'``.
    """
    value = _checked(str(name), 'backend name')
    old = getattr(_LOCAL, 'value', None)
    _LOCAL.value = value
    try:
        yield
    finally:
        _LOCAL.value = old


def selected_backend() -> str:
    """The path asked for: the innermost :func:`backend` of this thread, else ``MMPSA_BACKEND``.

    ``auto`` (the default): the Triton kernels for CUDA tensors (when a tested triton is
    importable and :func:`mmpsa.layers.psa_triton.unsupported` finds nothing), else the
    compiled Function (its CPU kernel where it applies, its ATen path elsewhere), else plain
    ops; ``triton``, ``cpu`` (the compiled Function, CPU tensors), ``aten`` (its ATen path) and
    ``plain`` force one path and raise where it cannot run.

    Returns:
        str: One of :data:`BACKENDS`.
    """
    value = getattr(_LOCAL, 'value', None)
    if value is not None:
        return value
    return _checked(os.environ.get('MMPSA_BACKEND', 'auto'), 'MMPSA_BACKEND')


# ------------------------------------------------------------------ triton
_TRITON: list = []  # [module or None, reason] once looked up


def triton_status():
    """``(psa_triton module or None, why not)``, looked up once."""
    if not _TRITON:
        version = compat.triton_version()
        need = '.'.join(map(str, MIN_TRITON))
        if version is None:
            _TRITON.extend([None, 'triton is not importable'])
        elif version < MIN_TRITON:
            reason = (f'the Triton kernels need triton >= {need}, this is triton '
                      f'{".".join(map(str, version))}')
            warnings.warn(f'mmpsa: {reason}; CUDA tensors take the compiled ATen path instead.')
            _TRITON.extend([None, reason])
        else:
            _TRITON.extend([importlib.import_module('mmpsa.layers.psa_triton'), None])
    return _TRITON[0], _TRITON[1]


def triton_module():
    """:mod:`mmpsa.layers.psa_triton`, imported on first use; None when triton is not
    importable or older than :data:`MIN_TRITON` (CPU-only torch wheels have none)."""
    return triton_status()[0]


def _use_triton(x: Tensor, paper: bool, seq: bool, forced: bool) -> bool:
    """Whether the Triton kernels evaluate ``x``; ``forced``: raise where they cannot."""
    if not (forced or x.is_cuda):
        return False
    kernels, reason = triton_status()
    if kernels is not None:
        reason = kernels.unsupported(x, paper, seq)
        if reason is None and not (x.is_cuda or kernels.INTERPRET):
            reason = (f'the Triton kernels run CUDA tensors, and CPU tensors only under '
                      f'TRITON_INTERPRET=1 (set before mmpsa.layers.psa_triton is imported); '
                      f'got a {x.device.type} tensor')
    if reason is not None and forced:
        raise RuntimeError(f'MMPSA_BACKEND=triton: {reason}; use MMPSA_BACKEND=auto or aten')
    return reason is None


# ------------------------------------------------------------------ the choice
def _compiled_triton(x: Tensor, paper: bool, seq: bool) -> bool:
    """Under ``torch.compile``: whether the Triton kernels run ``x`` as the custom op
    ``mmpsa::psa_triton``, which the compiler traces into (torch >= 2.6; CUDA tensors under
    ``auto``, CPU tensors only when ``triton`` is asked for under the interpreter). Everything
    else, ``torch.export`` included, runs plain ops there."""
    if compat.is_exporting() or not compat.has_triton_op():
        return False
    path = selected_backend()
    if not (path == 'triton' or (path == 'auto' and x.is_cuda)):
        return False
    kernels = triton_module()
    return (kernels is not None and kernels.unsupported(x, paper, seq) is None
            and (x.is_cuda or kernels.INTERPRET))


def choose_path(x: Tensor, paper: bool, sequential: bool) -> str:
    """The path the fused block takes for ``x`` (one of :data:`PATHS` but ``'literal'``).

    Raises where a forced path cannot run ``x``.
    """
    if torch.jit.is_tracing() or x.numel() == 0:
        return 'plain'
    if compat.is_compiling():
        return 'triton' if _compiled_triton(x, paper, sequential) else 'plain'
    path = selected_backend()
    if path == 'auto':
        if _use_triton(x, paper, sequential, False):
            return 'triton'
        if _EXT is None:
            return 'plain'
        path = 'cpu' if x.device.type == 'cpu' else 'aten'  # the CPU kernel runs CPU tensors
    elif path == 'triton':
        _use_triton(x, paper, sequential, True)
        return 'triton'
    elif path == 'cpu' and x.device.type != 'cpu':
        raise RuntimeError(f'MMPSA_BACKEND=cpu runs CPU tensors only, got a {x.device.type} '
                           'tensor (aten runs the compiled Function on any device)')
    if path in ('cpu', 'aten') and _EXT is None:
        raise RuntimeError(f'MMPSA_BACKEND={path} needs mmpsa._ext, which is not built (see '
                           'the warning above); use MMPSA_BACKEND=auto or plain')
    if path == 'cpu' and not _EXT.uses_cpu_kernel(x):
        return 'aten'  # what the compiled Function itself will do with it
    return path


def fused_forward(block, x: Tensor) -> Tensor:
    """Evaluate ``block`` (a PolarizedSelfAttention) on ``x`` the fused way, down the path
    :func:`choose_path` picks, and record it in ``block.last_path``."""
    params = block.fused_params()
    paper, sequential = block.variant == 'paper', block.mode == 'sequential'
    path = choose_path(x, paper, sequential)
    if path == 'plain':
        out, a_ch, a_sp = plain_psa(x, paper, sequential, params)
    elif path == 'triton':
        out, a_ch, a_sp = triton_module().fused_psa(x, paper, sequential, params)
    else:
        out, a_ch, a_sp = fused_function(x, block.variant, sequential, params, path == 'cpu')
    block.last_path = path
    block.ch_attn(a_ch)
    block.sp_attn(a_sp)
    return out
