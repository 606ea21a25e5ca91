"""The one compatibility module: every call that exists only on a newer torch/triton.

Each entry names the API and the version that added it; code elsewhere calls the entry, never
``hasattr(torch, ...)``. Imports torch alone (the block's layer room uses it).
A feature that cannot run on an older version raises :class:`UnsupportedVersionError` naming
the version it needs.
"""
import contextlib
from typing import Any, Callable, ContextManager, Iterable, Optional

import torch


class UnsupportedVersionError(RuntimeError):
    """A feature that needs a newer torch/triton than the one installed."""


def _major_minor(version: str) -> tuple:
    major, minor = str(version).split('+')[0].split('.')[:2]
    return int(major), int(minor)


# read once: dynamo 2.1 cannot trace str methods of torch.__version__ (a TorchVersion), and
# is_autocast_enabled() asks inside the block's traced forward
_TORCH_VERSION = _major_minor(torch.__version__)


def torch_version() -> tuple:
    """The installed torch's ``(major, minor)``."""
    return _TORCH_VERSION


def require_torch(version: str, feature: str) -> None:
    """Raise :class:`UnsupportedVersionError` if torch is older than ``version``.

    Args:
        version: ``'MAJOR.MINOR'``, e.g. ``'2.6'``.
        feature: What needs it, put in the message.
    """
    want = tuple(int(v) for v in version.split('.')[:2])
    if torch_version() < want:
        raise UnsupportedVersionError(f'{feature} needs torch >= {version}, this is torch '
                                      f'{torch.__version__}')


# torch.compiler.is_compiling: torch 2.3 (torch._dynamo.is_compiling before).
def is_compiling() -> bool:
    """Whether the code runs under ``torch.compile``/``torch.export`` tracing.

    Both calls are plain attribute calls: dynamo 2.1 knows ``torch._dynamo.is_compiling``
    (True while tracing) only when called so, not through ``getattr(module, name)()``.
    """
    if hasattr(torch.compiler, 'is_compiling'):
        return torch.compiler.is_compiling()
    return torch._dynamo.is_compiling()


# torch.is_autocast_enabled(device_type): torch 2.4 (before: no argument = CUDA,
# torch.is_autocast_cpu_enabled() for CPU).
def is_autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (``'cpu'``, ``'cuda'`` ...)."""
    if torch_version() >= (2, 4):
        return torch.is_autocast_enabled(device_type)
    if device_type == 'cpu':
        return torch.is_autocast_cpu_enabled()
    if device_type == 'cuda':
        return torch.is_autocast_enabled()
    return False


def no_autocast(device_type: str) -> ContextManager:
    """A context that disables autocast on ``device_type`` if it is on there."""
    if is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


# torch.serialization.add_safe_globals: torch 2.4.
def has_add_safe_globals() -> bool:
    """Whether torch's weights-only unpickler takes extra allowed globals (torch >= 2.4)."""
    return hasattr(torch.serialization, 'add_safe_globals')


def add_safe_globals(items: Iterable[Any]) -> bool:
    """``torch.serialization.add_safe_globals(items)`` where torch has it.

    Returns:
        bool: Whether they were added (False on torch < 2.4).
    """
    if not has_add_safe_globals():
        return False
    torch.serialization.add_safe_globals(list(items))
    return True


# torch.compiler.is_exporting: torch 2.6 (before, torch.export and torch.compile cannot be told
# apart from inside: is_compiling() is True for both).
def is_exporting() -> bool:
    """Whether the code runs under ``torch.export`` tracing (False where torch cannot tell)."""
    compiler = getattr(torch, 'compiler', None)
    fn: Optional[Callable[[], bool]] = getattr(compiler, 'is_exporting', None)
    return bool(fn()) if fn is not None else False


# torch.library.triton_op and torch.library.wrap_triton: torch 2.6. A custom op whose body
# launches Triton kernels through wrap_triton: torch.compile traces into it and sees the kernels;
# its fake implementation is the body itself, run on fake tensors (register_fake(fn)).
def has_triton_op() -> bool:
    """Whether torch has ``torch.library.triton_op`` and ``wrap_triton`` (torch >= 2.6)."""
    library = torch.library
    return (torch_version() >= (2, 6) and hasattr(library, 'triton_op')
            and hasattr(library, 'wrap_triton'))


def triton_op(name: str, fn: Callable, mutates_args: Iterable[str] = ()) -> Any:
    """``torch.library.triton_op(name, fn, mutates_args=...)`` (torch >= 2.6)."""
    if not has_triton_op():
        raise UnsupportedVersionError(f'torch.library.triton_op ({name}) needs torch >= 2.6, '
                                      f'this is torch {torch.__version__}')
    return torch.library.triton_op(name, fn, mutates_args=tuple(mutates_args))


def wrap_triton(kernel: Any) -> Any:
    """``torch.library.wrap_triton(kernel)`` where torch has it (torch >= 2.6), else ``kernel``."""
    return torch.library.wrap_triton(kernel) if has_triton_op() else kernel


# nn.Module.register_load_state_dict_pre_hook (public; the hook gets the module first):
# torch 2.5 (pytorch#126704, relanded as #131690, July 2024). Before, the private
# _register_load_state_dict_pre_hook(hook, with_module=True) does the same (torch >= 1.10).
def register_load_state_dict_pre_hook(module: torch.nn.Module, hook: Callable) -> Any:
    """``module.register_load_state_dict_pre_hook(hook)`` on every supported torch.

    ``hook(module, state_dict, prefix, local_metadata, strict, missing_keys,
    unexpected_keys, error_msgs)`` runs before ``module`` loads its part of a state dict.

    Returns:
        The removable handle.
    """
    public = getattr(module, 'register_load_state_dict_pre_hook', None)
    if public is not None:
        return public(hook)
    return module._register_load_state_dict_pre_hook(hook, with_module=True)


# ONNX export through the dynamo exporter: torch.export.Dim.AUTO (pytorch#133620, #134484,
# August 2024) and torch.onnx.export(ExportedProgram, ..., dynamo=True): torch 2.5.
# (torch.export.export is in 2.1, torch.export.Dim in 2.2, strict=False in 2.3.)
ONNX_EXPORT_TORCH = '2.5'


def has_dynamo_onnx_export() -> bool:
    """Whether torch has what :mod:`mmpsa.deploy.onnx` calls (torch >= 2.5)."""
    if torch_version() < (2, 5):
        return False
    import inspect

    import torch.export
    import torch.onnx
    dim = getattr(torch.export, 'Dim', None)
    try:
        takes_dynamo = 'dynamo' in inspect.signature(torch.onnx.export).parameters
    except (TypeError, ValueError):
        takes_dynamo = False
    return getattr(dim, 'AUTO', None) is not None and takes_dynamo


def require_dynamo_onnx_export() -> None:
    """Raise :class:`UnsupportedVersionError` where ONNX export cannot run (torch < 2.5)."""
    if not has_dynamo_onnx_export():
        raise UnsupportedVersionError(
            f'ONNX export (torch.export with Dim.AUTO, torch.onnx.export(dynamo=True)) needs '
            f'torch >= {ONNX_EXPORT_TORCH}, this is torch {torch.__version__}')


def dim_auto() -> Any:
    """``torch.export.Dim.AUTO`` (torch >= 2.5)."""
    require_dynamo_onnx_export()
    return torch.export.Dim.AUTO


def triton_version() -> Optional[tuple]:
    """The installed triton's ``(major, minor)``, or None when it is not importable (the
    Triton path's gate, :data:`mmpsa.layers.dispatch.MIN_TRITON`, compares with it)."""
    try:
        import triton
    except ImportError:
        return None
    major, minor = triton.__version__.split('+')[0].split('.')[:2]
    return int(major), int(minor)
